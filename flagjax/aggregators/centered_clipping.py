r"""Centered clipping in Gram space, with the centre as an extra row.

The iterate is kept as coefficients over the ``n`` rows and the centre,
:math:`v = \sum_{j<n} a_j x_j + a_n v_0`, so every distance :math:`|x_i - v|` comes from the
``(n + 1) x (n + 1)`` centred Gram matrix of the rows and the centre (the coefficients sum to
one, so any centring reference gives the same distances). Without a centre (``v_0 = 0``) the
origin is that extra row (:func:`flagjax.core.gram.gram` with ``origin=True``): no extra pass
over the input.

One step (``num_iters=1``) needs only the ``n`` distances to the starting centre, so it skips
the Gram: the row norms (no centre) or :func:`flagjax.core.gram.sq_distances_to` (a centre)
in one pass, then the combination (:func:`centered_clipping_row_coefficients`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import safe_math
from flagjax.core import tree as tree_lib

__all__ = [
    "centered_clipping",
    "centered_clipping_coefficients",
    "centered_clipping_row_coefficients",
]


@gram_lib.translation_invariant
def centered_clipping_coefficients(K: jax.Array, *, tau: float = 10.0,
                                   num_iters: int = 3) -> jax.Array:
  r"""Coefficients of centered clipping from the Gram matrix of the rows and the centre.

  With :math:`v = \sum_{j \le n} a_j y_j` over the rows :math:`y_{0..n-1} = x` and
  :math:`y_n = v_0` (the centre), starting from :math:`a = e_n` (``v = v_0``), each of the
  ``num_iters`` steps is

  .. math:: v \leftarrow v + \frac{1}{n} \sum_i s_i (x_i - v), \qquad
            s_i = \min\left(1, \frac{\tau}{|x_i - v|}\right),

  i.e. :math:`a \leftarrow (1 - \tfrac{1}{n}\sum_i s_i)\, a + \tfrac{1}{n} (s, 0)`, with
  :math:`|x_i - v|^2 = K_{ii} - 2 (K a)_i + a^\top K a`. A non-finite row gets
  :math:`s_i = 0`: it contributes nothing to the step (the mean still divides by ``n``, as if
  the row sat on ``v``). A row at distance 0 gets :math:`s_i = 1`.

  Args:
    K: Gram matrix ``[n + 1, n + 1]`` of the ``n`` rows and the centre (last row), e.g.
      ``gram(x, extra=center)``; a zero last row and column when the centre is zero.
    tau: the clipping radius.
    num_iters: the number of clipping steps (static).

  Returns:
    Coefficients ``[n + 1]``; the last multiplies the centre. Non-finite rows get 0.
    A non-finite centre (trusted, e.g. the last aggregate) makes them NaN.

  References:
    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021.
  """
  num_rows = K.shape[0] - 1
  finite_rows = gram_lib.finite_rows(K)
  # Only the rows are screened: the centre is trusted, a non-finite one must show.
  finite = jnp.concatenate([finite_rows[:num_rows], jnp.ones((1,), bool)])
  both = finite[:, None] & finite[None, :]
  K = jnp.where(both, K, 0)
  diag = jnp.diagonal(K)[:num_rows]
  row_mask = finite[:num_rows]

  def step(_, a):
    Ka = jnp.matmul(K, a, precision=tree_lib.HIGHEST)
    aKa = jnp.dot(a, Ka, precision=tree_lib.HIGHEST)
    sq_dist = jnp.maximum(diag - 2 * Ka[:num_rows] + aKa, 0)
    dist = safe_math.sqrt(sq_dist)
    # min(1, tau / dist) written so that dist = 0 gives 1, never tau / 0.
    scale = jnp.where(dist > tau, tau / jnp.where(dist > tau, dist, 1), 1)
    scale = jnp.where(row_mask, scale, 0) / num_rows
    return (1 - jnp.sum(scale)) * a + jnp.concatenate([scale, jnp.zeros((1,), a.dtype)])

  start = jnp.zeros((num_rows + 1,), K.dtype).at[num_rows].set(1)
  coefficients = jax.lax.fori_loop(0, num_iters, step, start)
  # A non-finite centre would otherwise drop out silently (NaN distances clip nothing, and
  # its own coefficient reaches exactly 0 after one step), leaving the plain mean. With no
  # finite row at all there is nothing to aggregate: NaN, not the centre.
  usable = finite_rows[num_rows] & jnp.any(finite_rows[:num_rows])
  return jnp.where(usable, coefficients, jnp.nan)


def _one_step_coefficients(distances: jax.Array, tau: float) -> jax.Array:
  """Coefficients ``[n + 1]`` of one clipping step from the ``n`` distances to the centre.

  ``s_i = min(1, tau / |x_i - v_0|) / n`` on rows with a finite distance, 0 elsewhere; the
  centre keeps ``1 - sum(s)``. NaN when no distance is finite (a NaN/Inf centre makes every
  distance non-finite).
  """
  n = distances.shape[0]
  finite = jnp.isfinite(distances)
  over = finite & (distances > tau)
  scale = jnp.where(over, tau / jnp.where(over, distances, 1), 1)
  scale = jnp.where(finite, scale, 0) / n
  coefficients = jnp.concatenate([scale, (1 - jnp.sum(scale))[None]])
  return jnp.where(jnp.any(finite), coefficients, jnp.nan)


def centered_clipping_row_coefficients(x, center=None, *, tau: float = 10.0,
                                       num_iters: int = 3, axis_name=None) -> jax.Array:
  r"""Coefficients ``[n + 1]`` of centered clipping from the rows (the last for the centre).

  With ``num_iters = 1`` no Gram is formed: the distances to the centre are the row norms
  (:func:`flagjax.core.gram.row_norms`, finite for every finite row, when ``center`` is
  None) or :math:`|x_i - v_0|` from :func:`flagjax.core.gram.sq_distances_to` (one fused
  pass), and :math:`s_i = \min(1, \tau / |x_i - v_0|) / n`. A row whose distance is
  NaN/Inf (it holds NaN/Inf, or its squared distance to a given centre overflows) gets 0,
  as on the Gram path; without a centre a huge finite row is clipped like any other (its
  norm is finite), where the Gram path, whose squared norm overflows, gives it 0. A
  non-finite centre, or no finite row, makes the coefficients NaN. More steps read the
  ``(n + 1) x (n + 1)`` Gram (:func:`centered_clipping_coefficients`).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    center: a pytree shaped like one worker's update, or None for zeros (then the last
      coefficient multiplies the origin and can be dropped).
    tau: the clipping radius.
    num_iters: the number of clipping steps (static).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards (``psum``-ed sums).

  Returns:
    ``[n + 1]`` coefficients in the compute dtype.
  """
  tree_lib.num_workers("centered_clipping", x)
  checks.check_real("centered_clipping", "tau", tau, minimum=0)
  num_iters = checks.check_int("centered_clipping", "num_iters", num_iters)
  if num_iters == 1:
    if center is None:
      distances = gram_lib.row_norms(x, axis_name=axis_name)
    else:
      distances = safe_math.sqrt(gram_lib.sq_distances_to(x, center, axis_name=axis_name))
    return _one_step_coefficients(distances, tau)
  if center is None:
    K = gram_lib.gram(x, axis_name=axis_name, centered=True, origin=True)
  else:
    K = gram_lib.gram(x, axis_name=axis_name, extra=center, centered=True)
  return centered_clipping_coefficients(K, tau=tau, num_iters=num_iters)


@gram_lib.rotation_equivariant
def centered_clipping(x, center=None, *, tau: float = 10.0, num_iters: int = 3,
                      axis_name=None):
  r"""Centered clipping: clipped mean steps around a centre.

  .. math:: v_0 = \text{center}\ (0\ \text{if None}), \qquad
            v \leftarrow v + \frac{1}{n} \sum_i (x_i - v)\,
            \min\left(1, \frac{\tau}{|x_i - v|}\right)

  repeated ``num_iters`` times. Computed in Gram space with the centre as an extra row (see
  :func:`centered_clipping_coefficients`); one step (``num_iters=1``, ByzFL's default) from
  the ``n`` distances to the centre alone (see :func:`centered_clipping_row_coefficients`).
  Rows holding NaN/Inf contribute nothing to any step (weight 0), so the result is finite
  whenever the centre is; each finite Byzantine row moves ``v`` by at most ``tau / n`` per
  step. Stateful use (the centre is the last aggregate) keeps the centre in the caller's
  (optax) state.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    center: a pytree shaped like one worker's update (no leading axis), or None for zeros;
      with ``axis_name``, this shard of the centre.
    tau: the clipping radius.
    num_iters: the number of clipping steps (static).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards: the Gram (or the
      distances) are ``psum``-ed over it and the result is this shard of the unsharded
      answer.

  Returns:
    The clipped centre after ``num_iters`` steps, shaped like one worker's update, in the
    input dtype.

  References:
    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021.
  """
  n = tree_lib.num_workers("centered_clipping", x)
  coefficients = centered_clipping_row_coefficients(x, center, tau=tau, num_iters=num_iters,
                                                    axis_name=axis_name)
  if center is None:
    return gram_lib.combine(coefficients[:n], x)
  return gram_lib.combine(coefficients, x, extra=center)
