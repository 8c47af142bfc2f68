"""Shared test utilities: numpy references' inputs, sharded execution, dtype helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

NUM_DEVICES = 8


def coordinate_mesh():
  """A 1-D mesh over the 8 simulated CPU devices, axis ``"coords"``."""
  return jax.sharding.Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("coords",))


def run_coordinate_sharded(rule, x, **hparams):
  """Runs ``rule(x_shard, axis_name="coords", **hparams)`` with coordinates split 8 ways.

  Every leaf of ``x`` is ``[n, d_leaf]`` with ``d_leaf`` divisible by 8; the shard outputs are
  concatenated back, so the result is comparable with the unsharded ``rule(x, **hparams)``.
  """
  mesh = coordinate_mesh()
  fn = jax.shard_map(lambda xs: rule(xs, axis_name="coords", **hparams), mesh=mesh,
                     in_specs=P(None, "coords"), out_specs=P("coords"))
  return jax.jit(fn)(x)


def random_rows(seed: int, n: int, d: int, dtype=np.float32) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


def poison(x: np.ndarray, rows, values=(np.nan, np.inf, -np.inf)) -> np.ndarray:
  """A copy of ``x`` where each of ``rows`` holds a non-finite value (cycling ``values``)."""
  x = np.array(x, copy=True)
  for k, i in enumerate(rows):
    x[i, k % x.shape[1]] = values[k % len(values)]
    x[i, (k + 1) % x.shape[1]] = values[(k + 1) % len(values)]
  return x
