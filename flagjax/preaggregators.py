r"""Pre-aggregators: maps ``[n, ...] -> [n', ...]`` of stacked worker updates.

Each composes with any rule, e.g. ``aggregators.trimmed_mean(nnm(x, f), f)``. Like the rules
they are pure, take ``n`` and ``f`` as static ints, work under ``jit``/``vmap``, in float32,
bfloat16 (computed in float32) and float64, on pytrees, and take ``axis_name`` for coordinate
shards (only the ``n x n`` Gram or the ``n`` squared norms are ``psum``-ed).

Non-finite rows (NaN/Inf) are never turned into finite values that look honest: an output row
that depends on a non-finite input row is non-finite, so the downstream rule treats it as
Byzantine. NNM mixes each non-finite row only into itself (it stays all-NaN) and never into
a finite row while at most ``f`` rows are non-finite; bucketing makes a bucket holding a
non-finite row non-finite; clipping passes non-finite rows through unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

__all__ = [
    "arc",
    "bucketing",
    "clip",
    "nnm",
    "nnm_coefficients",
]


def nnm_coefficients(K: jax.Array, f: int) -> jax.Array:
  r"""Mixing matrix of NNM: row ``i`` has :math:`1/(n-f)` on the ``n - f`` rows nearest to row i.

  Each row's own column always counts as nearest; distance ties go to the lowest index.
  Non-finite workers are at ``+inf`` distance from every other worker, so a finite row never
  picks one while at most ``f`` rows are non-finite.

  Args:
    K: Gram matrix ``[n, n]`` from :func:`flagjax.core.gram.gram`.
    f: number of Byzantine workers tolerated (static).

  Returns:
    ``[n, n]`` coefficients; output row ``i`` is :math:`\sum_j C_{ij} x_j`.
  """
  n = K.shape[0]
  D = jnp.where(jnp.eye(n, dtype=bool), -1, gram_lib.sq_distances(K))
  return gram_lib.nearest_mask(D, n - f).astype(K.dtype) / (n - f)


def nnm(x, f: int, *, axis_name=None):
  r"""Nearest-neighbour mixing: each row becomes the mean of its ``n - f`` nearest rows.

  .. math:: y_i = \frac{1}{n-f} \sum_{j \in N_{n-f}(x_i)} x_j

  where :math:`N_{n-f}(x_i)` holds the ``n - f`` rows nearest to :math:`x_i`, itself included
  (ties: lowest index). Needs ``n > 2f``. One pass for the Gram, one ``n x n`` by ``n x d``
  product (:func:`flagjax.core.gram.combine_many`). A non-finite input row gives an all-NaN
  output row (it stays Byzantine); with at most ``f`` of them, every finite row's neighbours
  are finite.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards: the Gram is
      ``psum``-ed over it and the result is this shard of the unsharded answer.

  Returns:
    ``[n, ...]`` mixed rows, in ``x``'s structure and dtype.

  References:
    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for
    Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
  """
  f = checks.check_num_byzantine("nnm", f)
  n = tree_lib.num_workers("nnm", x)
  checks.require("nnm", n > 2 * f, "n > 2*f", n=n, f=f)
  K = gram_lib.gram(x, axis_name=axis_name, centered=True)
  coefficients = gram_lib.nan_beyond_bound(nnm_coefficients(K, f), K, f)
  return gram_lib.combine_many(coefficients, x, gram_lib.finite_rows(K))


def bucketing(x, s: int, key: jax.Array, *, axis_name=None):
  r"""Bucketing: shuffle the rows, then average buckets of ``s`` consecutive rows.

  With a random permutation :math:`\pi` (from ``key``), output row ``b`` is

  .. math:: y_b = \frac{1}{|B_b|} \sum_{t \in B_b} x_{\pi(t)}, \qquad
            B_b = \{bs, \dots, \min((b+1)s, n) - 1\},

  for :math:`b = 0 .. \lceil n/s \rceil - 1`: the last bucket holds ``n mod s`` rows when
  ``s`` does not divide ``n`` (its mean is over those rows only). A bucket holding a
  non-finite row is non-finite at those coordinates (the downstream rule treats it as
  Byzantine); no other bucket is touched.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    s: bucket size (static, ``s >= 1``).
    key: a ``jax.random`` key; the same key gives the same buckets (on every shard).
    axis_name: accepted for a uniform signature (nothing is reduced over coordinates).

  Returns:
    ``[ceil(n / s), ...]`` bucket means, in ``x``'s structure and dtype.

  References:
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022.
  """
  del axis_name
  n = tree_lib.num_workers("bucketing", x)
  s = checks.check_int("bucketing", "s", s, minimum=1)
  checks.check_key("bucketing", key)
  num_buckets = math.ceil(n / s)
  padded = num_buckets * s
  order = jnp.concatenate([jax.random.permutation(key, n),
                           jnp.zeros((padded - n,), jnp.int32)]).reshape(num_buckets, s)
  sizes = [min(s, n - b * s) for b in range(num_buckets)]
  # weights[b, t] = 1/|B_b| on real slots, 0 on the last bucket's padding.
  weights = [[1.0 / sizes[b] if t < sizes[b] else 0.0 for t in range(s)]
             for b in range(num_buckets)]

  def leaf_fn(leaf):
    dtype = tree_lib.compute_dtype(leaf.dtype)
    w = jnp.asarray(weights, dtype)
    total = jnp.zeros((num_buckets,) + leaf.shape[1:], dtype)
    expand = (slice(None),) + (None,) * (leaf.ndim - 1)
    for t in range(s):
      # One gathered row per bucket; where(), so a padded slot (weight 0) adds exactly 0.
      rows = leaf[order[:, t]].astype(dtype)
      total = total + jnp.where(w[:, t][expand] != 0, w[:, t][expand] * rows, 0)
    return total.astype(tree_lib.output_dtype(leaf.dtype))
  return jax.tree.map(leaf_fn, x)


def _scale_leaf(leaf: jax.Array, scale: jax.Array) -> jax.Array:
  """``leaf_i * scale_i`` (scale in the compute dtype, result in the output dtype)."""
  dtype = tree_lib.compute_dtype(leaf.dtype)
  s = scale.astype(dtype).reshape((-1,) + (1,) * (leaf.ndim - 1))
  return (leaf.astype(dtype) * s).astype(tree_lib.output_dtype(leaf.dtype))


def _scale_rows(x, scale: jax.Array):
  """``x_i * scale_i`` for every leaf (scale in the compute dtype, result in the leaf dtype)."""
  return jax.tree.map(lambda leaf: _scale_leaf(leaf, scale), x)


# Coordinates per row from which _rescale_rows rewrites only the listed rows of a leaf.
ROW_UPDATE_MIN_SIZE = 1 << 15


def _rescale_rows(x, scale: jax.Array, rows: jax.Array):
  """:func:`_scale_rows` when only ``rows`` (distinct indices) can have ``scale != 1``.

  A leaf of at least :data:`ROW_UPDATE_MIN_SIZE` coordinates per row has just those rows
  rewritten (a ``fori_loop`` of ``dynamic_update_slice``), which XLA does in place whenever
  the leaf's buffer is free: donated, or an intermediate such as the gradients inside a
  training step. The result is the same bit for bit (``x * 1 = x``). Measured for ARC
  (float32, 2-core CPU, one process; n = 16, f = 4: 6 of 16 rows; n = 32, f = 8: 12 of 32),
  against the whole-array multiply: inside a jitted function whose rows are an intermediate
  (a product), ARC's own share 21.6 -> 12.1 ms (n = 16, d = 1e6), 37 -> 28 ms (n = 32,
  d = 1e6), 0.73 -> 0.42 ms and 1.9 -> 1.3 ms at d = 1e5; donated, 4.6x -> 3.8x and 5.1x ->
  4.4x one pass at d = 1e6. A standalone call without donation pays XLA's copy of the input
  first and is 13-34% slower (n = 16, d = 1e6: 8.3x -> 10.3x). Smaller leaves (the MLPs of the
  experiments) keep the one fused multiply per leaf: there the two were within noise (digits
  MLP, 16 rows, 4 leaves, in a jitted function: 200-245 us either way), and under ``vmap``
  (batched runs, as the leaderboard runs them) the row updates would become scatters.
  """
  def leaf_fn(leaf):
    out_dtype = tree_lib.output_dtype(leaf.dtype)
    if (leaf.ndim < 2 or math.prod(leaf.shape[1:]) < ROW_UPDATE_MIN_SIZE
        or jnp.dtype(out_dtype) != jnp.dtype(leaf.dtype)):
      return _scale_leaf(leaf, scale)

    def rescale(j, leaf):
      i = rows[j]
      row = jax.lax.dynamic_index_in_dim(leaf, i, 0, keepdims=True)
      new = _scale_leaf(row, jax.lax.dynamic_index_in_dim(scale, i, 0, keepdims=True))
      return jax.lax.dynamic_update_index_in_dim(leaf, new, i, 0)

    return jax.lax.fori_loop(0, rows.shape[0], rescale, leaf)
  return jax.tree.map(leaf_fn, x)


def clip(x, c, *, axis_name=None):
  r"""Clips each row to norm at most ``c``: :math:`y_i = x_i \min(1, c / |x_i|)`.

  Norms are taken over the whole update (all leaves; ``psum``-ed over ``axis_name``) in one
  pass (:func:`flagjax.core.gram.row_norms`). Non-finite rows pass through unchanged (they stay
  non-finite, so the downstream rule treats them as Byzantine).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    c: the norm bound (``c >= 0``; a Python float or a traced scalar).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards.

  Returns:
    ``[n, ...]`` clipped rows, in ``x``'s structure and dtype.
  """
  tree_lib.num_workers("clip", x)
  checks.check_real("clip", "c", c, minimum=0)
  norms = gram_lib.row_norms(x, axis_name=axis_name)
  return _scale_rows(x, gram_lib.clip_scale(norms, jnp.maximum(jnp.asarray(c, norms.dtype), 0)))


def arc(x, f: int, *, axis_name=None):
  r"""Adaptive robust clipping: the ``k`` largest-norm rows clipped to the (k+1)-th largest norm.

  .. math:: k = \left\lfloor 2 \frac{f}{n} (n - f) \right\rfloor, \qquad
            y_i = x_i \min\left(1, \frac{|x|_{(k+1)}}{|x_i|}\right)

  where :math:`|x|_{(k+1)}` is the (k+1)-th largest row norm. Needs ``n > 2f`` (then
  ``f <= k < n``). Non-finite rows count as the largest norms, so with at most ``f`` of them
  the threshold is an honest row's norm; they pass through unchanged (they stay non-finite).
  With ``f = 0``, ``k = 0``: nothing is clipped.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards: the squared norms
      are ``psum``-ed over it.

  Returns:
    ``[n, ...]`` clipped rows, in ``x``'s structure and dtype.

  References:
    Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Adaptive Gradient Clipping for
    Robust Federated Learning", 2024 (ICLR 2025).
  """
  f = checks.check_num_byzantine("arc", f)
  n = tree_lib.num_workers("arc", x)
  checks.require("arc", n > 2 * f, "n > 2*f", n=n, f=f)
  k = (2 * f * (n - f)) // n
  norms = gram_lib.row_norms(x, axis_name=axis_name)
  ranked = jnp.where(jnp.isfinite(norms), norms, jnp.inf)
  # The (k+1)-th largest norm; top_k is over n values (tiny). Only the k rows above it can
  # have a scale below 1: only they are rewritten (in place where XLA can, _rescale_rows).
  largest, order = jax.lax.top_k(ranked, k + 1)
  return _rescale_rows(x, gram_lib.clip_scale(norms, largest[k]), order[:k])
