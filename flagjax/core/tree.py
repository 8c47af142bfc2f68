"""Pytree and dtype conventions shared by every rule.

Worker updates arrive stacked on a leading axis: an array ``[n, ...]`` or a pytree whose
leaves all share the leading ``n``. Rules compute in float32 for half-precision inputs
(bfloat16, float16) and in the input's own precision for float32 / float64, and return each
leaf in its input dtype. Integer (and bool) updates are computed in float32 and returned in
float32, like ``jnp.mean``: truncating an aggregate back to integers would be a silent wrong
answer. Complex updates are refused (a ``ValueError``): the rules' geometry is real.

A top-level Python ``list`` of equally shaped 1-D arrays is refused with a ``ValueError``
that says to stack them: users coming from ByzFL pass a list of worker vectors, which JAX
would read as a pytree of ``d``-row leaves and aggregate silently wrong. A pytree of stacked
leaves goes as a tuple or a dict (or a list of leaves of different shapes).

Every matrix product computes in the full precision of its dtype (:data:`HIGHEST`), on every
backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "HIGHEST",
    "check_dtypes",
    "check_not_worker_list",
    "check_rows_match_params",
    "compute_dtype",
    "map_column_blocks",
    "num_workers",
    "output_dtype",
    "result_dtype",
    "rows",
    "to_compute",
    "to_output",
]

PyTree = Any

# The precision every product in flagjax asks for. JAX's default for float32 products is full
# float32 only on the CPU: TF32 (10 mantissa bits) on recent NVIDIA GPUs and bfloat16 passes
# on TPUs. tests/test_precision.py checks every rule's traced program for it.
HIGHEST = jax.lax.Precision.HIGHEST


def check_not_worker_list(rule: str, x: PyTree) -> None:
  """Refuses a Python list of equally shaped 1-D arrays (one per worker): see the module doc."""
  if (type(x) is list and len(x) >= 2  # pylint: disable=unidiomatic-typecheck
      and all(hasattr(item, "shape") and jnp.ndim(item) == 1 for item in x)
      and len({jnp.shape(item) for item in x}) == 1):
    raise ValueError(
        f"{rule} got a Python list of {len(x)} vectors of shape {jnp.shape(x[0])}; flagjax "
        f"reads a list as a pytree of stacked leaves, not as workers: stack them "
        f"(jnp.stack(updates)), or pass a tuple if you meant a pytree")


def check_dtypes(rule: str, x: PyTree) -> None:
  """Refuses complex (and other non-real) leaves with a ``ValueError`` naming the rule."""
  for leaf in jax.tree.leaves(x):
    dtype = jnp.result_type(leaf)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
            or dtype == jnp.bool_):
      raise ValueError(f"{rule} needs real (floating-point or integer) updates, got {dtype}")


def num_workers(rule: str, x: PyTree) -> int:
  """The static number of workers ``n``: the shared leading dimension of every leaf.

  Also the entry check of every rule: refuses a list of worker vectors
  (:func:`check_not_worker_list`) and complex updates (:func:`check_dtypes`).
  """
  check_not_worker_list(rule, x)
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"{rule} needs at least one array of stacked worker updates, got {x!r}")
  check_dtypes(rule, x)
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes:
    raise ValueError(f"{rule} needs every leaf stacked on a leading worker axis, "
                     f"got a scalar leaf")
  if len(sizes) != 1:
    raise ValueError(f"{rule} needs every leaf to share the leading worker axis n, "
                     f"got leading sizes {sorted(sizes)}")
  n = sizes.pop()
  if n < 1:
    raise ValueError(f"{rule} needs n >= 1 workers, got n={n}")
  return n


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype a rule computes in for inputs of ``dtype``: float32, or float64 for float64."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    return dtype
  return jnp.dtype(jnp.float32)


def output_dtype(dtype) -> jnp.dtype:
  """The dtype a rule returns for inputs of ``dtype``: the input's own for floating point,
  float32 for integers and bool (never truncated back)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return dtype
  return jnp.dtype(jnp.float32)


def result_dtype(x: PyTree) -> jnp.dtype:
  """The widest compute dtype over the leaves: the dtype of n x n quantities (K, c)."""
  return jnp.result_type(*[compute_dtype(leaf.dtype) for leaf in jax.tree.leaves(x)])


def rows(leaf: jax.Array) -> list[jax.Array]:
  """The n worker rows of one leaf as a Python list (static slices; XLA fuses them).

  One ``split``, not ``n`` indexings: the same slices forward, and its transpose (reverse
  mode) is one ``concatenate`` where ``n`` indexings give ``n`` zero-padded copies summed,
  which XLA fused into one kernel that LLVM compiled for seconds (the gradient of MeaMed
  over 11 rows: 8 s).
  """
  if leaf.shape[0] == 0:
    return []
  return [part.reshape(leaf.shape[1:]) for part in jnp.split(leaf, leaf.shape[0])]


# Up to this many rows :func:`fold_rows` unrolls its loop; beyond, a fori_loop.
FOLD_UNROLL_MAX_ROWS = 256


def fold_rows(leaf: jax.Array, init, step, *, start: int = 0):
  """``carry = step(carry, row, i)`` over the rows ``row = leaf[i]``, ``i >= start``, in
  order; the same operations in the same order either way, so the same values.

  Up to :data:`FOLD_UNROLL_MAX_ROWS` rows unrolled (static slices that XLA fuses into one
  pass); beyond, a ``fori_loop`` of one row per iteration, so the program does not grow
  with the rows (ALIE's statistics over 1,000 honest rows compiled in ~7 s unrolled).
  """
  n = leaf.shape[0]
  if n - start <= FOLD_UNROLL_MAX_ROWS:
    carry = init
    for i, row in enumerate(rows(leaf)[start:]):
      carry = step(carry, row, start + i)
    return carry
  return jax.lax.fori_loop(
      start, n,
      lambda i, carry: step(carry, jax.lax.dynamic_index_in_dim(leaf, i, 0, False), i), init)


def map_column_blocks(flat: jax.Array, width: int, block_fn) -> jax.Array:
  """``block_fn`` on column blocks of ``flat [n, size]``, its outputs side by side.

  ``block_fn`` maps a block ``[n, width]`` to ``[..., width]``; the result is
  ``[..., size]``. The blocks are read and their results written in place by a
  ``fori_loop`` (one block's temporaries at a time); the last block overlaps the one before
  (its columns are computed twice, alike), so no padded copy of the input is made. The first
  block is taken before the loop and seeds the output, so the loop's carry has the block
  results' type (inside ``shard_map``: varying over the coordinate axis, like the data).
  """
  size = flat.shape[-1]
  if size == 0:
    return block_fn(flat)
  width = min(width, size)

  def block_at(k):
    start = jnp.minimum(k * width, size - width)
    return start, block_fn(jax.lax.dynamic_slice_in_dim(flat, start, width, axis=1))

  _, first = block_at(0)
  out = jnp.zeros(first.shape[:-1] + (size,), first.dtype)
  out = jax.lax.dynamic_update_slice_in_dim(out, first, 0, axis=-1)

  def body(k, out):
    start, value = block_at(k)
    return jax.lax.dynamic_update_slice_in_dim(out, value, start, axis=-1)

  return jax.lax.fori_loop(1, -(-size // width), body, out)


def to_output(value: jax.Array, like_dtype) -> jax.Array:
  """Casts a computed value to the output dtype for inputs of ``like_dtype``."""
  return value.astype(output_dtype(like_dtype))


def to_compute(value: jax.Array) -> jax.Array:
  """Casts an array to its compute dtype (a no-op for float32 / float64)."""
  return value.astype(compute_dtype(value.dtype))


def check_rows_match_params(name: str, rows: PyTree, params: PyTree, *,
                            sharded: bool = False) -> None:
  """Refuses stacked rows that do not fit ``params``, with both shapes in the message.

  Unsharded, each leaf must be ``[n, *param_leaf_shape]``; sharded (coordinate shards), each
  leaf must be ``[n, s]``. Without this, ``[5, 4]`` rows against params ``[3]`` aggregate to a
  ``[4]`` that optax then broadcasts or refuses far from the cause.
  """
  row_leaves, row_tree = jax.tree.flatten(rows)
  param_leaves, param_tree = jax.tree.flatten(params)
  if row_tree != param_tree:
    raise ValueError(f"{name} got updates with tree structure {row_tree}, but params have "
                     f"{param_tree}: the updates must be the params' pytree, stacked on a "
                     f"leading worker axis")
  for leaf, param in zip(row_leaves, param_leaves):
    shape, param_shape = tuple(jnp.shape(leaf)), tuple(jnp.shape(param))
    fits = len(shape) == 2 if sharded else shape[1:] == param_shape and len(shape) >= 1
    if not fits:
      expected = "[n, s] coordinate shards" if sharded else f"[n, *{list(param_shape)}]"
      raise ValueError(f"{name} got an update leaf of shape {list(shape)} for a parameter of "
                       f"shape {list(param_shape)}; expected {expected} (one row per worker)")
