"""Shared pieces of the gradient attacks: argument checks and coordinate-wise statistics
of the honest rows (one fused pass each, bit-identical on coordinate shards)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import safe_math
from flagjax.core import tree as tree_lib

PyTree = tree_lib.PyTree


def check_counts(name: str, honest: PyTree, f) -> tuple[int, int]:
  """``(h, f)`` after checking that ``f >= 0`` and ``h >= 1`` honest rows share one axis."""
  f = checks.check_num_byzantine(name, f)
  for leaf in jax.tree.leaves(honest):
    if jnp.ndim(leaf) and jnp.shape(leaf)[0] == 0:
      raise ValueError(f"{name} needs h >= 1 honest rows, got h=0")
  h = tree_lib.num_workers(name, honest)
  return h, f


def compute(tree: PyTree) -> PyTree:
  return jax.tree.map(tree_lib.to_compute, tree)


def honest_mean(honest32: PyTree, h: int) -> PyTree:
  """Per-coordinate mean of the honest rows: one fused pass (``core.gram.combine``), summed
  in row order per coordinate, so a coordinate shard gets bit-identical values."""
  return gram_lib.combine(jnp.full((h,), 1.0 / h), honest32)


def honest_std(honest32: PyTree, mean32: PyTree, h: int) -> PyTree:
  """Per-coordinate population standard deviation, two-pass (stable for large means).

  Written as fused sums over the rows (:func:`flagjax.core.tree.fold_rows`), so no
  ``[h, ...]`` temporary of squared deviations is ever written. The deviations are divided
  by their per-coordinate largest magnitude ``m`` before squaring (``std = m *
  sqrt(mean((dev / m)^2))``), so rows near the float maximum (1e30 in float32) give a
  finite std.
  """
  def leaf_fn(leaf, mean):
    peak = tree_lib.fold_rows(leaf, jnp.zeros_like(mean),
                              lambda peak, row, _: jnp.maximum(peak, jnp.abs(row - mean)))
    inverse = jnp.where(peak > 0, 1.0 / jnp.where(peak > 0, peak, 1.0), 0.0)
    total = tree_lib.fold_rows(
        leaf, jnp.zeros_like(mean),
        lambda total, row, _: total + jnp.square((row - mean) * inverse))
    return peak * safe_math.sqrt(total / h)
  return jax.tree.map(leaf_fn, honest32, mean32)


def repeat_row(row: PyTree, f: int, like: PyTree) -> PyTree:
  """``f`` copies of ``row`` stacked on a leading axis, in the output dtypes of ``like``'s
  leaves (:func:`flagjax.core.tree.output_dtype`: floating point kept, integers -> float32)."""
  def leaf_fn(r, leaf):
    r = tree_lib.to_output(r, leaf.dtype)
    if f <= 1:
      return jnp.broadcast_to(r[None], (f,) + r.shape)
    # zeros_like(r): the buffer has r's sharding type (varying inside shard_map).
    out = jnp.zeros_like(r, shape=(f,) + r.shape)
    # Copies written in a loop, not a broadcast: XLA fuses a cheap producer (the fused row sum
    # of the mean) into a broadcast and recomputes it for every copy (f passes over the
    # honest rows instead of one: sign_flip took 7.8x one pass at h=24, f=8, d=1e6; ~2.5x now).
    return jax.lax.fori_loop(0, f, lambda k, o: jax.lax.dynamic_update_index_in_dim(o, r, k, 0),
                             out)
  return jax.tree.map(leaf_fn, row, like)


def mean_direction_rows(name: str, honest: PyTree, f, scale: float) -> PyTree:
  """``f`` rows equal to ``scale * mean(honest)``."""
  h, f = check_counts(name, honest, f)
  mean32 = honest_mean(compute(honest), h)
  return repeat_row(jax.tree.map(lambda m: scale * m, mean32), f, honest)

def alie_rows(honest32: PyTree, mean32: PyTree, std32: PyTree, z, f: int,
               like: PyTree) -> PyTree:
  return repeat_row(jax.tree.map(lambda m, s: m + z * s, mean32, std32), f, like)
