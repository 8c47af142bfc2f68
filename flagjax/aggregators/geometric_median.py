r"""The geometric median by smoothed Weiszfeld iterations, entirely in Gram space.

The iterate is kept as coefficients, :math:`z = \sum_j c_j x_j`, so every distance it needs
comes from the Gram matrix :math:`K`:

.. math:: |x_i - z|^2 = K_{ii} - 2 (K c)_i + c^\top K c, \qquad
          |z' - z|^2 = (c' - c)^\top K (c' - c).

One pass forms ``K``, the iterations are ``n x n`` work in a ``jax.lax.while_loop``, and one
pass forms :math:`c^\top X`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import sorting
from flagjax.core import tree as tree_lib

__all__ = [
    "geometric_median",
    "geometric_median_coefficients",
]


class _WeiszfeldState(NamedTuple):
  coefficients: jax.Array  # [n], z = sum_j c_j x_j
  gram_times_c: jax.Array  # [n], K c, carried so each step needs K c only once
  num_iters: jax.Array     # int32 scalar
  converged: jax.Array     # bool scalar


@gram_lib.translation_invariant
def geometric_median_coefficients(K: jax.Array, *, max_iters: int = 100, tol: float = 1e-6,
                                  nu: float = 1e-8) -> jax.Array:
  r"""Coefficients of the geometric median (Weiszfeld with Vardi-Zhang's step) from the Gram.

  Start: the medoid, the finite row of least :math:`\sum_j |x_i - x_j|` (the objective
  restricted to the rows). Not the mean: far Byzantine rows move the mean arbitrarily far,
  and from there a capped Weiszfeld run does not come back (rows ``0, 1, 2, 3`` and three
  of ``1e15``: 242 after 100 steps from the mean; 3, the answer, from the medoid).

  Each step, with :math:`d_i = |x_i - z|` and the rows that coincide with ``z`` (``d_i``
  within the Gram's rounding, ``C``, :math:`\eta = |C|`) set apart,

  .. math:: w_i = \frac{1}{\max(d_i, \nu)}\ (i \notin C), \quad
            T = \frac{\sum_{i \notin C} w_i x_i}{\sum_{i \notin C} w_i}, \quad
            \rho = \Big(\sum_{i \notin C} w_i\Big) |T - z|, \quad
            z' = \big(1 - \min(1, \tfrac{\eta}{\rho})\big) T
                 + \min(1, \tfrac{\eta}{\rho})\, z,

  which is plain (smoothed) Weiszfeld away from the rows and, at a row, moves only if that
  row is not the minimum (Vardi and Zhang 2000): no ``1/0`` (``nu = 0`` on duplicated rows
  is finite), no sticking at a row that is not the answer. Non-finite rows get weight 0.
  It stops after ``max_iters`` steps, or once
  :math:`|z' - z| \le tol \cdot \max(|z' - r|, \mathrm{median}_i\, d_i)`, with ``r``
  the Gram's centring reference (a scale of the data, not of a common offset).

  Derivative (``jax.grad``, ``jax.jvp``): that of the fixed point, not of the iterations
  (implicit function theorem on the Weiszfeld map, one ``n x n`` pseudo-inverse; see
  ``_weiszfeld_jvp``), so reverse mode goes through the ``while_loop`` and costs the same
  however many steps ran. At a data row the answer moves with that row. A capped,
  unconverged run gets the derivative at the point it reached (chosen over unrolling the
  steps: the fixed point's is what a converged run's difference quotients give, and it
  needs no memory per step).

  Args:
    K: Gram matrix ``[n, n]``, centred (:func:`flagjax.core.gram.gram` with
      ``centered=True``; the plain Gram gives the same point, with less precision when the
      rows share a large component). Rows of non-finite workers are non-finite.
    max_iters: the most steps (static or traced int); 0 returns the medoid.
    tol: relative-change tolerance.
    nu: smoothing: distances below ``nu`` count as ``nu`` (absolute, in the units of ``x``).

  Returns:
    Coefficients ``[n]`` (non-negative, summing to one, zero on non-finite rows); NaN when
    no row is finite.

  References:
    Weiszfeld, "Sur le point pour lequel la somme des distances de n points donnés est
    minimum", Tohoku Math. J. 1937. Vardi and Zhang, "The multivariate L1-median and
    associated data depth", PNAS 2000. Pillutla, Kakade, Harchaoui, "Robust Aggregation for
    Federated Learning", IEEE TSP 2022 (smoothed Weiszfeld, RFA).
  """
  return _weiszfeld(K, max_iters, tol, nu)


def _distances_to(c: jax.Array, Kc: jax.Array, diag: jax.Array):
  """``(|x_i - z|^2 for every row, |z|^2)`` for ``z = c^T X``, from ``K c`` and ``diag K``."""
  cKc = jnp.dot(c, Kc, precision=tree_lib.HIGHEST)
  return jnp.maximum(diag - 2 * Kc + cKc, 0), cKc


def _coincident(sq_dist, cKc, diag, finite, nu):
  """The finite rows at ``z``: within ``nu``, or within the Gram's rounding of it."""
  rounding = 256 * jnp.finfo(diag.dtype).eps
  return finite & (sq_dist <= nu**2 + rounding * (diag + jnp.maximum(cKc, 0)))


def _weiszfeld_target(sq_dist, away, nu):
  r"""``(T, sum_i w_i)``: Weiszfeld's weights :math:`w_i = 1 / \max(d_i, \nu)` on the rows
  ``away`` from ``z`` (else 0), normalised to the target coefficients ``T`` (0 if none)."""
  w = jnp.where(away, 1 / jnp.maximum(jnp.sqrt(jnp.where(away, sq_dist, 1)), nu), 0)
  total = jnp.sum(w)
  return w / jnp.where(total > 0, total, 1), total


@jax.custom_jvp
def _weiszfeld(K, max_iters, tol, nu):
  """The iterations of :func:`geometric_median_coefficients` (its derivative: below)."""
  D = gram_lib.sq_distances(K)
  K, finite = gram_lib.clean_gram(K)
  dtype = K.dtype
  diag = jnp.diagonal(K)
  nu = jnp.asarray(nu, dtype)

  def matvec(c):
    return jnp.matmul(K, c, precision=tree_lib.HIGHEST)

  medoid_scores = jnp.sum(jnp.where(finite[None, :], jnp.sqrt(D), 0), axis=1)
  medoid = jnp.argmin(jnp.where(finite, medoid_scores, jnp.inf))
  start = jnp.where(jnp.arange(K.shape[0]) == medoid, 1, 0).astype(dtype)
  start = jnp.where(jnp.any(finite), start, jnp.nan)

  def cond(state):
    return (state.num_iters < max_iters) & ~state.converged

  def body(state):
    c, Kc = state.coefficients, state.gram_times_c
    sq_dist, cKc = _distances_to(c, Kc, diag)
    coincident = _coincident(sq_dist, cKc, diag, finite, nu)
    target, total = _weiszfeld_target(sq_dist, finite & ~coincident, nu)
    step = target - c
    step_sq_norm = jnp.dot(step, matvec(step), precision=tree_lib.HIGHEST)
    pull = total * jnp.sqrt(jnp.maximum(step_sq_norm, 0))
    count = jnp.sum(coincident).astype(dtype)
    stay = jnp.where(count > 0, jnp.minimum(1, count / jnp.where(pull > 0, pull, 1)), 0)
    stay = jnp.where((count > 0) & (pull <= 0), 1, stay)
    stay = jnp.where(total > 0, stay, 1)   # every finite row at z: nothing to move towards
    new = (1 - stay) * target + stay * c
    K_new = matvec(new)
    delta = new - c
    # |z' - z|^2 as delta^T K delta, not from K_new - Kc: that difference cancels badly.
    sq_change = jnp.maximum(jnp.dot(delta, matvec(delta), precision=tree_lib.HIGHEST), 0)
    sq_scale = jnp.maximum(jnp.dot(new, K_new, precision=tree_lib.HIGHEST),
                           sorting.masked_median(sq_dist, finite, lower=True))
    converged = sq_change <= tol**2 * sq_scale
    return _WeiszfeldState(new, K_new, state.num_iters + 1, converged)

  init = _WeiszfeldState(start, matvec(start), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  return jax.lax.while_loop(cond, body, init).coefficients


@_weiszfeld.defjvp
def _weiszfeld_jvp(primals, tangents):
  r"""The derivative of the fixed point, by the implicit function theorem in ``n x n`` space.

  Away from every row the answer solves :math:`c = T(c, K)`, the Weiszfeld map
  :math:`T = w / \sum_i w_i`, so :math:`dc = (I - \partial_c T)^{+} \partial_K T\, dK`.
  :math:`I - \partial_c T` is :math:`I` outside the span of the rows and, on it, the
  objective's Hessian :math:`\sum_i (I - e_i e_i^\top) / d_i` over :math:`\sum_i w_i`:
  invertible unless the minimum is not unique (all rows on a line, an even number of
  them), where the pseudo-inverse takes the least-norm change. At a row (the median sits
  on a data point, where it stays under small moves of the others) ``dc = 0``: ``z``
  moves with that row.
  """
  K, max_iters, tol, nu = primals
  dK = tangents[0]
  c = _weiszfeld(K, max_iters, tol, nu)
  K, finite = gram_lib.clean_gram(K)
  dK = jnp.where(finite[:, None] & finite[None, :], dK, 0)
  diag = jnp.diagonal(K)
  nu = jnp.asarray(nu, K.dtype)
  sq_dist, cKc = _distances_to(c, jnp.matmul(K, c, precision=tree_lib.HIGHEST), diag)
  coincident = _coincident(sq_dist, cKc, diag, finite, nu)
  away = finite & ~coincident

  # Where dc is 0, every matrix below is kept finite as well: reverse mode transposes them,
  # and a NaN there would turn the zero cotangent into NaN (0 * NaN).
  implicit = ~jnp.any(coincident) & jnp.any(away)
  at = jnp.where(jnp.isfinite(c), c, 0)   # NaN when no row is finite

  def weiszfeld_map(c, K):
    sq_dist, _ = _distances_to(c, jnp.matmul(K, c, precision=tree_lib.HIGHEST),
                               jnp.diagonal(K))
    return _weiszfeld_target(sq_dist, away, nu)[0]

  jacobian = jax.jacfwd(weiszfeld_map)(at, K)
  _, moved = jax.jvp(lambda K: weiszfeld_map(at, K), (K,), (dK,))
  inverse = jnp.linalg.pinv(jnp.eye(c.shape[0], dtype=K.dtype) - jacobian)
  inverse = jnp.where(implicit & jnp.all(jnp.isfinite(inverse)), inverse, 0)
  # where(), not a product: in reverse mode it also zeroes the cotangents of the rows left
  # out, which are NaN when such a row holds NaN (the combination's d(c^T X)/dc_i = x_i).
  return c, jnp.where(away, jnp.matmul(inverse, moved, precision=tree_lib.HIGHEST), 0)


@gram_lib.rotation_equivariant
def geometric_median(x, *, max_iters: int = 100, tol: float = 1e-6, nu: float = 1e-8,
                     axis_name=None):
  r"""Geometric median :math:`\arg\min_z \sum_i |x_i - z|` by smoothed Weiszfeld iterations.

  Weiszfeld from the medoid (the best row by the objective) with weights
  :math:`1 / \max(|x_i - z|, \nu)` and Vardi-Zhang's step at a row, stopping when the
  relative change of ``z`` is below ``tol`` (see :func:`geometric_median_coefficients`).
  Computed in Gram space: one pass for the centred ``K``, ``n x n`` iterations, one pass for
  the output.

  The geometric median has breakdown point 1/2 and takes no ``f``. Rows holding NaN/Inf get
  weight 0, so the result stays finite whenever at least one row is finite (it is robust
  while fewer than half the rows are Byzantine); it is NaN when no row is finite.

  Numerics: distances come from the centred Gram (rows taken relative to a robust reference
  in the same pass), so rows sharing a component much larger than their spread keep their
  distances in float32.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    max_iters: the most Weiszfeld steps.
    tol: relative-change tolerance on ``z``.
    nu: smoothing of the distances (absolute, in the units of ``x``).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards: the ``n x n`` Gram
      is ``psum``-ed over it and the result is this shard of the unsharded answer.

  Returns:
    The geometric median, shaped like one worker's update, in the input dtype.

  References:
    Weiszfeld, Tohoku Math. J. 1937. Pillutla, Kakade, Harchaoui, "Robust Aggregation for
    Federated Learning", IEEE TSP 2022.
  """
  tree_lib.num_workers("geometric_median", x)
  checks.check_int("geometric_median", "max_iters", max_iters, static=False)
  checks.check_real("geometric_median", "tol", tol, minimum=0)
  checks.check_real("geometric_median", "nu", nu, minimum=0)
  return gram_lib.combine_by_gram(
      x, lambda K: geometric_median_coefficients(K, max_iters=max_iters, tol=tol, nu=nu),
      axis_name=axis_name, centered=True)
