r"""Random coordinate subsets of stacked updates, the same on one device and on shards.

DnC and SignGuard look at a random subset of the ``d`` coordinates of every row. The
coordinates are numbered in the flattened concatenation of the pytree's leaves (in
``jax.tree.leaves`` order, each leaf row-major). The subset of size ``s`` is **stratified**:
the coordinates are cut into ``s`` consecutive blocks of sizes ``floor(d/s)`` or
``ceil(d/s)`` and one coordinate is drawn uniformly from each block. Every coordinate is
about equally likely (``s/d``), none is drawn twice, it takes ``s`` random integers (a
uniform ``s``-subset would take a permutation of all ``d``: at ``d = 10^6`` that costs more
than the rule), and the reads run in address order.

On coordinate shards (``axis_name`` set, each leaf ``[n, ...]`` flattened being device
``j``'s block ``[j m, (j+1) m)`` of the leaf, as :mod:`flagjax.sim` lays them out) the
leaf's full length is ``m`` times the axis size; each device reads the drawn coordinates that
fall in its block, so with the same key the shards together read exactly the unsharded subset.
(The simulator pads each leaf to a multiple of the device count; the padding coordinates are
then part of the numbering, so the subset equals the unsharded one when every leaf's size is
a multiple of the device count.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flagjax.core import tree as tree_lib

__all__ = [
    "Sample",
    "num_coordinates",
    "sample_coordinates",
    "stratified_indices",
]

PyTree = tree_lib.PyTree


class Sample(NamedTuple):
  """The sampled columns of one leaf: ``values [n, m]`` (zero where not ``valid``) and
  ``valid [m]``, whether each column is a drawn coordinate held here."""
  values: jax.Array
  valid: jax.Array


def _leaf_sizes(x: PyTree, axis_name) -> list[int]:
  """Each leaf's full flattened size per row (its shard size times the axis size)."""
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  return [int(np.prod(leaf.shape[1:], dtype=np.int64)) * devices for leaf in jax.tree.leaves(x)]


def num_coordinates(x: PyTree, axis_name=None) -> int:
  """``d``: the number of coordinates of one row over all leaves (static)."""
  return sum(_leaf_sizes(x, axis_name))


def _block_starts(d: int, s: int) -> np.ndarray:
  return (np.arange(s + 1, dtype=np.int64) * d) // s


def stratified_indices(key: jax.Array, d: int, s: int) -> jax.Array:
  """``s`` sorted coordinates in ``[0, d)``, one uniform draw from each of ``s`` equal blocks.

  ``s >= d`` gives every coordinate (``arange(d)``), without using the key.
  """
  if s >= d:
    return jnp.arange(d, dtype=jnp.int32)
  starts = _block_starts(d, s)
  sizes = jnp.asarray(np.diff(starts), jnp.int32)
  return jnp.asarray(starts[:-1], jnp.int32) + jax.random.randint(key, (s,), 0, sizes,
                                                                  dtype=jnp.int32)


def sample_coordinates(x: PyTree, key: jax.Array, s: int, *, axis_name=None) -> list[Sample]:
  """The stratified sample of ``s`` coordinates of every row, as one :class:`Sample` per leaf.

  Only the blocks that overlap a leaf are read from it (static ranges), so the work is
  ``O(n s)`` gathers. Values are in the compute dtype (:func:`flagjax.core.tree.to_compute`).

  Args:
    x: stacked updates ``[n, ...]`` or a pytree of them (a coordinate shard with
      ``axis_name``).
    key: the ``jax.random`` key of the draw (the same on every shard).
    s: the sample size (static); ``s >= d`` reads every coordinate.
    axis_name: the coordinate-shard axis, or None.

  Returns:
    One :class:`Sample` per leaf, in ``jax.tree.leaves`` order.
  """
  sizes = _leaf_sizes(x, axis_name)
  d = sum(sizes)
  indices = stratified_indices(key, d, s)
  starts = np.arange(d + 1) if s >= d else _block_starts(d, s)
  samples = []
  begin = 0
  for leaf, size in zip(jax.tree.leaves(x), sizes):
    end = begin + size
    first = int(np.searchsorted(starts, begin, side="right")) - 1
    last = int(np.searchsorted(starts, end, side="left"))
    flat = leaf.reshape(leaf.shape[0], -1)
    local_size = flat.shape[1]
    local = indices[first:last] - begin
    if axis_name is not None:
      local = local - jax.lax.axis_index(axis_name) * local_size
    valid = (local >= 0) & (local < local_size)
    columns = jnp.take(flat, jnp.clip(local, 0, max(local_size - 1, 0)), axis=1)
    values = jnp.where(valid[None, :], tree_lib.to_compute(columns), 0)
    samples.append(Sample(values, valid))
    begin = end
  return samples
