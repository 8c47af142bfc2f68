r"""The order-statistics core: sorting networks over the worker axis, chosen by ``n``.

Coordinate-wise rules (median, trimmed mean, MeaMed, Phocas, Bulyan's second stage) need, per
coordinate, a few order statistics of ``n`` values, where ``n`` (workers) is small and static
and the number of coordinates is huge. A sort along axis 0 (``jnp.sort``/``jnp.median``) is
~200-500x one pass over the input on a 2-core CPU; a comparator network written as
``jnp.minimum``/``jnp.maximum`` of whole rows fuses into one elementwise loop and costs
~1.5x one pass for the median at n=32. The network is Batcher's odd-even merge sort for the
next power of two, with comparators that touch padding (+inf) dropped, then pruned backwards
to the output positions a rule asks for.

The unrolled network's program grows as ``n log^2 n`` comparators and XLA compiles it in
~2.5-6 s at n=128 but not within 9 minutes at n=256. Above :data:`NETWORK_MAX_WORKERS` the
values are sorted by a *staged* bitonic network instead (:func:`sorted_statistic`): column
blocks of ``[2^k, B]`` (the workers padded with ``+inf`` to a power of two) go through its
``k (k + 1) / 2`` stages, each one ``minimum``/``maximum`` over the whole block, while the
block sits in cache. Measured on a 2-core CPU, median at d=1e5, ratios to one pass
``ones @ x``: unrolled network 10x (n=64), 14x (n=128); staged bitonic 35x (n=64), 43x
(n=128), 32x (n=256), 75-99x (n=1024); ``jnp.median`` (XLA's sort along axis 0) 630-1280x
at every n in 64..1024. So the crossover is n = 128 (the network up to it, bitonic above).

NaN is mapped to ``+inf`` before sorting, so a NaN worker sorts last, like an ``+inf`` one;
with at most ``f`` non-finite workers, the positions ``f .. n-f-1`` are all finite.

The helpers that read sorted values (:func:`mean_of_sorted`, :func:`median_of_sorted`,
:func:`mean_closest_to`) take either a list of arrays (the network's output) or one array
whose leading axis is the sorted position (the bitonic path's block).
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp

from flagjax.core import tree as tree_lib

__all__ = [
    "NETWORK_MAX_WORKERS",
    "batcher_comparators",
    "bitonic_sort",
    "compare_exchange",
    "mean_closest_to",
    "masked_median",
    "mean_of",
    "mean_of_sorted",
    "median_of_sorted",
    "median_positions",
    "nan_if_nonfinite",
    "order_statistics",
    "pruned_comparators",
    "sorted_statistic",
]

# The largest n sorted by the unrolled network; above it, the staged bitonic network.
NETWORK_MAX_WORKERS = 128


@functools.lru_cache(maxsize=None)
def batcher_comparators(n: int) -> tuple[tuple[int, int], ...]:
  """Comparators ``(i, j)``, ``i < j`` (min goes to i), of Batcher's network sorting n items.

  Built for the next power of two; comparators reaching past ``n`` compare with ``+inf``
  padding, never swap, and are dropped.
  """
  size = 1
  while size < n:
    size *= 2
  out = []
  p = 1
  while p < size:
    k = p
    while k >= 1:
      for j in range(k % p, size - k, 2 * k):
        for i in range(min(k, size - j - k)):
          a, b = i + j, i + j + k
          if a // (2 * p) == b // (2 * p) and b < n:
            out.append((a, b))
      k //= 2
    p *= 2
  return tuple(out)


@functools.lru_cache(maxsize=None)
def pruned_comparators(n: int, positions: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """The comparators of :func:`batcher_comparators` that the given output positions need."""
  needed = set(positions)
  kept = []
  for a, b in reversed(batcher_comparators(n)):
    if a in needed or b in needed:
      kept.append((a, b))
      needed.update((a, b))
  return tuple(reversed(kept))


def _nan_to_inf(value: jax.Array) -> jax.Array:
  return jnp.where(jnp.isnan(value), jnp.inf, value)


def order_statistics(rows: Sequence[jax.Array],
                     positions: Iterable[int] | None = None) -> list[jax.Array]:
  """Per-coordinate order statistics of ``n`` equally shaped arrays.

  Args:
    rows: ``n`` arrays of the same shape (one per worker).
    positions: the sorted positions wanted (0 = smallest); all of them when None.

  Returns:
    A list of arrays, one per requested position in the order asked, where entry ``k`` holds
    per coordinate the ``positions[k]``-th smallest value (NaN sorted as ``+inf``).
  """
  n = len(rows)
  positions = tuple(range(n)) if positions is None else tuple(positions)
  for p in positions:
    if not 0 <= p < n:
      raise ValueError(f"order_statistics needs positions in [0, {n}), got {p}")
  values = [_nan_to_inf(r) for r in rows]
  for a, b in pruned_comparators(n, tuple(sorted(set(positions)))):
    values[a], values[b] = compare_exchange(values[a], values[b])
  return [values[p] for p in positions]


@jax.custom_jvp
def compare_exchange(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One comparator of a sorting network: ``(minimum(a, b), maximum(a, b))`` elementwise.

  Its derivative is the exchange itself: each output's tangent is the tangent of the input it
  took (ties: ``a``'s goes to the minimum), so a network's derivative is the permutation
  that sorts, as for a sort. ``jnp.minimum``/``jnp.maximum``'s own rules split ties half and
  half with several compares and selects per comparator, and reverse mode through a network of
  them compiled for seconds: the gradient of the trimmed mean of 11 rows compiled in 9.8 s,
  3.0 s with this rule, 0.3 s with :func:`flagjax.core.tree.rows` split once as well (2-core
  CPU). The forward program is unchanged.
  """
  return jnp.minimum(a, b), jnp.maximum(a, b)


@compare_exchange.defjvp
def _compare_exchange_jvp(primals, tangents):
  (a, b), (da, db) = primals, tangents
  swap = b < a
  return ((jnp.where(swap, b, a), jnp.where(swap, a, b)),
          (jnp.where(swap, db, da), jnp.where(swap, da, db)))


def mean_of(values: Sequence[jax.Array]) -> jax.Array:
  """Elementwise mean of equally shaped arrays, without overflow, inside their range.

  An unrolled, fusible sum of ``v / m`` (not ``sum(v) / m``: the sum of finite values near
  the float maximum overflows), clamped to ``[min, max]`` of the values when they are given
  in sorted order by the caller (see :func:`mean_of_sorted`).
  """
  m = len(values)
  inverse = 1.0 / m
  if isinstance(values, jax.Array):
    return jnp.sum(values * inverse, axis=0)
  total = values[0] * inverse
  for value in values[1:]:
    total = total + value * inverse
  return total


def mean_of_sorted(sorted_values: Sequence[jax.Array]) -> jax.Array:
  """:func:`mean_of` of values in ascending order, clamped to ``[first, last]``.

  Rounding of ``sum(v / m)`` can step just outside the values' range (all values equal,
  ``m = 3``); the clamp makes "inside the range of the averaged values" exact.
  """
  return jnp.clip(mean_of(sorted_values), sorted_values[0], sorted_values[-1])


def median_of_sorted(sorted_values: Sequence[jax.Array]) -> jax.Array:
  """Median of values already in sorted order (even count: mean of the two middle ones).

  The two middle values are halved before adding (exact in binary floating point, short of
  subnormals), so two finite values near the float maximum never overflow to ``inf``.
  """
  n = len(sorted_values)
  if n % 2:
    return sorted_values[n // 2]
  low, high = sorted_values[n // 2 - 1], sorted_values[n // 2]
  return jnp.clip(0.5 * low + 0.5 * high, low, high)


def median_positions(n: int) -> tuple[int, ...]:
  """The sorted positions the median of ``n`` values reads."""
  return (n // 2,) if n % 2 else (n // 2 - 1, n // 2)


def nan_if_nonfinite(value: jax.Array) -> jax.Array:
  """``value`` with every non-finite entry replaced by NaN.

  A coordinate-wise rule whose averaged positions reach a non-finite value (more of them at
  that coordinate than the rule tolerates, or every worker non-finite) says so with NaN, the
  one value no consumer mistakes for an aggregate (``+inf`` from the NaN-as-``+inf``
  ordering would look like a huge finite step to some).
  """
  return jnp.where(jnp.isfinite(value), value, jnp.nan)


def mean_closest_to(sorted_values: Sequence[jax.Array], center: jax.Array,
                    size: int) -> jax.Array:
  r"""Per coordinate, the mean of the ``size`` values closest to ``center``.

  The ``size`` values nearest to a point form a contiguous window ``[j, j + size)`` of the
  sorted values. Sliding the window one step right swaps :math:`s_j` out for
  :math:`s_{j+size}`, which is a strict improvement exactly when :math:`s_{j+size}` is
  nearer: :math:`s_j + s_{j+size} < 2c` (with :math:`s_j < s_{j+size}`; when they are equal
  the two windows hold the same values). The left-hand side grows with ``j``, so the best
  start is the number of ``j`` for which it holds:

  .. math:: j^\star = \#\{\, j < m - size : 	frac12 s_j + 	frac12 s_{j+size} < c \,\}.

  Ties in distance (equally near on both sides) go to the lower values. This counts *values*,
  not distinct positions: with a repeated far value (identical Byzantine rows), only as many
  copies are kept as are among the nearest, never every copy at the expense of values
  strictly nearer the centre. Halving before adding avoids overflow; ``-inf`` is passed, and
  ``+inf`` (and NaN, mapped to it by the network) never is, as long as enough finite values
  exist. The sum is taken with selects, so values outside the window never reach it.

  Args:
    sorted_values: ``m`` arrays, per coordinate in ascending order.
    center: array of the same shape (e.g. the median).
    size: how many values to average, ``1 <= size <= m``.

  Returns:
    The per-coordinate mean of the chosen window, inside the window's range.
  """
  m = len(sorted_values)
  if not 1 <= size <= m:
    raise ValueError(f"mean_closest_to needs 1 <= size <= {m}, got size={size}")
  if isinstance(sorted_values, jax.Array):
    return _mean_closest_to_array(sorted_values, center, size)
  start = jnp.zeros(center.shape, jnp.int32)
  for j in range(m - size):
    nearer = 0.5 * sorted_values[j] + 0.5 * sorted_values[j + size] < center
    start = start + nearer.astype(jnp.int32)
  inverse = 1.0 / size
  total = jnp.zeros(center.shape, center.dtype)
  low = sorted_values[0]
  high = sorted_values[0]
  for k, value in enumerate(sorted_values):
    if k < m - size + 1:
      low = jnp.where(start == k, value, low)
    if k >= size - 1:
      high = jnp.where(start + size - 1 == k, value, high)
    inside = (start <= k) & (k < start + size)
    total = total + jnp.where(inside, value * inverse, 0)
  return jnp.clip(total, low, high)


def _mean_closest_to_array(sorted_values: jax.Array, center: jax.Array,
                           size: int) -> jax.Array:
  """:func:`mean_closest_to` on one array ``[m, ...]`` (the same window, vectorized)."""
  m = sorted_values.shape[0]
  nearer = 0.5 * sorted_values[:m - size] + 0.5 * sorted_values[size:] < center
  start = jnp.sum(nearer.astype(jnp.int32), axis=0)
  position = jax.lax.broadcasted_iota(jnp.int32, sorted_values.shape, 0)
  inside = (start <= position) & (position < start + size)
  total = jnp.sum(jnp.where(inside, sorted_values * (1.0 / size), 0), axis=0)
  low = jnp.take_along_axis(sorted_values, start[None], axis=0)[0]
  high = jnp.take_along_axis(sorted_values, start[None] + size - 1, axis=0)[0]
  return jnp.clip(total, low, high)


def bitonic_sort(block: jax.Array) -> jax.Array:
  """Sorts ``[P, B]`` along axis 0 (``P`` a power of two) by the staged bitonic network.

  Each merge of sorted runs of ``k / 2`` into runs of ``k`` starts with one stage comparing
  position ``i`` with its mirror in the run (``i XOR (k - 1)``), so that every comparator
  puts its minimum first (no direction masks), then half-cleaners at distances
  ``k / 4, ..., 1``: ``log P (log P + 1) / 2`` stages, each a ``minimum``/``maximum`` of
  two reshaped halves of the block.
  """
  size, width = block.shape
  if size & (size - 1):
    raise ValueError(f"bitonic_sort needs a power-of-two length, got {size}")
  values = block
  k = 2
  while k <= size:
    runs = values.reshape(size // k, k, width)
    low, high = compare_exchange(runs[:, :k // 2], runs[:, k // 2:][:, ::-1])
    values = jnp.concatenate([low, high[:, ::-1]], axis=1).reshape(size, width)
    distance = k // 4
    while distance >= 1:
      pairs = values.reshape(size // (2 * distance), 2, distance, width)
      low, high = compare_exchange(pairs[:, 0], pairs[:, 1])
      values = jnp.stack([low, high], axis=1).reshape(size, width)
      distance //= 2
    k *= 2
  return values


def _block_width(padded: int) -> int:
  """Columns per bitonic block: ``[padded, width]`` float32 of 64 KiB-2 MiB stays in cache."""
  return 128 if padded <= 256 else 512


def sorted_statistic(values, fn, positions: Iterable[int] | None = None, *,
                     network_max_workers: int = NETWORK_MAX_WORKERS) -> jax.Array:
  """``fn(sorted values)`` per coordinate, over the leading (worker) axis of ``values``.

  Args:
    values: one array ``[n, ...]``, or a list of ``n`` equally shaped arrays (one per
      worker); cast to their compute dtype.
    fn: maps the sorted values (NaN as ``+inf``) to the statistic; it gets a list of arrays
      (network) or one array with the sorted position as its leading axis (bitonic) and must
      accept both (the helpers of this module do).
    positions: the sorted positions ``fn`` reads, a contiguous range (all when None); the
      network is pruned to them, and ``fn`` gets exactly these, in order.
    network_max_workers: the crossover (``experiments.bench_sorting`` moves it to time
      both methods at one ``n``).

  Returns:
    The statistic, shaped like one worker's value.

  Up to ``network_max_workers`` (:data:`NETWORK_MAX_WORKERS`) workers, the unrolled network of
  :func:`order_statistics`; above, :func:`bitonic_sort` of column blocks
  (:func:`flagjax.core.tree.map_column_blocks`: one block at a time, no padded copy).
  """
  n = len(values)
  positions = tuple(range(n)) if positions is None else tuple(positions)
  if positions != tuple(range(positions[0], positions[0] + len(positions))):
    raise ValueError(f"sorted_statistic needs contiguous positions, got {positions}")
  if n <= network_max_workers:
    rows = tree_lib.rows(values) if isinstance(values, jax.Array) else values
    return fn(order_statistics([tree_lib.to_compute(r) for r in rows], positions))
  stacked = jnp.stack(values) if not isinstance(values, jax.Array) else values
  shape = stacked.shape[1:]
  flat = stacked.reshape(n, -1)
  dtype = tree_lib.compute_dtype(flat.dtype)
  padded = 1 << (n - 1).bit_length()
  first, last = positions[0], positions[-1] + 1

  def block_fn(block):
    block = _nan_to_inf(block.astype(dtype))
    if padded > n:
      block = jnp.concatenate([block, jnp.full((padded - n, block.shape[1]), jnp.inf, dtype)])
    return fn(bitonic_sort(block)[first:last]).astype(dtype)

  out = tree_lib.map_column_blocks(flat, _block_width(padded), block_fn)
  return out.reshape(shape)


def masked_median(values: jax.Array, mask: jax.Array, *, lower: bool = False) -> jax.Array:
  """Median of the ``values`` where ``mask`` (a few scalars, e.g. ``n`` row norms).

  Even counts average the two middle values, or take the lower one with ``lower=True``;
  0 when the mask is empty. A plain sort: this is for ``n`` scalars, not per coordinate.
  """
  count = jnp.sum(mask)
  ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
  low = ordered[jnp.maximum(count - 1, 0) // 2]
  middle = low if lower else (low + ordered[count // 2]) / 2
  return jnp.where(count > 0, middle, 0)
