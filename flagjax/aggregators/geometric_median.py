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

from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

_HIGHEST = jax.lax.Precision.HIGHEST


class _WeiszfeldState(NamedTuple):
  coefficients: jax.Array  # [n], z = sum_j c_j x_j
  gram_times_c: jax.Array  # [n], K c, carried so each step needs K c only once
  num_iters: jax.Array     # int32 scalar
  converged: jax.Array     # bool scalar


def geometric_median_coefficients(K: jax.Array, *, max_iters: int = 100, tol: float = 1e-6,
                                  nu: float = 1e-8) -> jax.Array:
  r"""Coefficients of the smoothed Weiszfeld geometric median from the Gram matrix.

  Starting from the mean of the finite rows (:math:`c^{(0)}_i = 1/k` on the ``k`` finite
  rows), each step sets

  .. math:: w_i = \frac{1}{\max(|x_i - z|, \nu)}, \qquad c'_i = \frac{w_i}{\sum_j w_j},

  with :math:`w_i = 0` for non-finite rows. It stops after ``max_iters`` steps, or as soon as
  the relative change of ``z`` is below ``tol``: :math:`|z' - z| \le tol\,|z'|`.

  Args:
    K: Gram matrix ``[n, n]`` from :func:`flagjax.core.gram.gram` (rows of non-finite
      workers are non-finite).
    max_iters: the most Weiszfeld steps (static or traced int); 0 returns the mean of the
      finite rows.
    tol: relative-change tolerance.
    nu: smoothing: distances below ``nu`` count as ``nu`` (no division by zero when ``z``
      lands on a row).

  Returns:
    Coefficients ``[n]`` (non-negative, summing to one, zero on non-finite rows); NaN when
    no row is finite.

  References:
    Weiszfeld, "Sur le point pour lequel la somme des distances de n points donnés est
    minimum", Tohoku Math. J. 1937. Pillutla, Kakade, Harchaoui, "Robust Aggregation for
    Federated Learning", IEEE TSP 2022 (smoothed Weiszfeld, RFA).
  """
  K, finite = gram_lib.clean_gram(K)
  dtype = K.dtype
  weights_mask = finite.astype(dtype)
  start = weights_mask / jnp.sum(weights_mask)
  diag = jnp.diagonal(K)

  def matvec(c):
    return jnp.matmul(K, c, precision=_HIGHEST)

  def cond(state):
    return (state.num_iters < max_iters) & ~state.converged

  def body(state):
    c, Kc = state.coefficients, state.gram_times_c
    sq_dist = jnp.maximum(diag - 2 * Kc + jnp.dot(c, Kc, precision=_HIGHEST), 0)
    w = weights_mask / jnp.maximum(jnp.sqrt(sq_dist), nu)
    new = w / jnp.sum(w)
    K_new = matvec(new)
    delta = new - c
    # |z' - z|^2 as delta^T K delta, not from K_new - Kc: that difference cancels badly.
    sq_change = jnp.dot(delta, matvec(delta), precision=_HIGHEST)
    sq_norm = jnp.dot(new, K_new, precision=_HIGHEST)   # |z'|^2
    # Squared form of |z' - z| <= tol |z'| (both sides clamped against rounding).
    converged = jnp.maximum(sq_change, 0) <= tol**2 * jnp.maximum(sq_norm, 0)
    return _WeiszfeldState(new, K_new, state.num_iters + 1, converged)

  init = _WeiszfeldState(start, matvec(start), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  return jax.lax.while_loop(cond, body, init).coefficients


def geometric_median(x, *, max_iters: int = 100, tol: float = 1e-6, nu: float = 1e-8,
                     axis_name=None):
  r"""Geometric median :math:`\arg\min_z \sum_i |x_i - z|` by smoothed Weiszfeld iterations.

  Weiszfeld from the mean with weights :math:`1 / \max(|x_i - z|, \nu)`, stopping when the
  relative change of ``z`` is below ``tol`` (see :func:`geometric_median_coefficients`).
  Computed in Gram space: one pass for ``K``, ``n x n`` iterations, one pass for the output.

  The geometric median has breakdown point 1/2 and takes no ``f``. Rows holding NaN/Inf get
  weight 0, so the result stays finite whenever at least one row is finite (it is robust
  while fewer than half the rows are Byzantine); it is NaN when no row is finite.

  Numerics: distances from ``K`` cancel when the rows share a component much larger than
  their spread (relative error ~ eps |x|^2 / |x_i - z|^2); float32 is fine for gradients,
  pass float64 rows for tight tolerances on offset data.

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
  return gram_lib.combine_by_gram(
      x, lambda K: geometric_median_coefficients(K, max_iters=max_iters, tol=tol, nu=nu),
      axis_name=axis_name)
