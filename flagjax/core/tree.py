"""Pytree and dtype conventions shared by every rule.

Worker updates arrive stacked on a leading axis: an array ``[n, ...]`` or a pytree whose
leaves all share the leading ``n``. Rules compute in float32 for half-precision inputs
(bfloat16, float16) and in the input's own precision for float32 / float64, and return each
leaf in its input dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def num_workers(rule: str, x: PyTree) -> int:
  """The static number of workers ``n``: the shared leading dimension of every leaf."""
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"{rule} needs at least one array of stacked worker updates, got {x!r}")
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


def result_dtype(x: PyTree) -> jnp.dtype:
  """The widest compute dtype over the leaves: the dtype of n x n quantities (K, c)."""
  return jnp.result_type(*[compute_dtype(leaf.dtype) for leaf in jax.tree.leaves(x)])


def rows(leaf: jax.Array) -> list[jax.Array]:
  """The n worker rows of one leaf as a Python list (static slices; XLA fuses them)."""
  return [leaf[i] for i in range(leaf.shape[0])]


def to_compute(value: jax.Array) -> jax.Array:
  """Casts an array to its compute dtype (a no-op for float32 / float64)."""
  return value.astype(compute_dtype(value.dtype))
