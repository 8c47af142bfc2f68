"""Shared test utilities: numpy references' inputs, sharded execution, dtype helpers."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

NUM_DEVICES = 8


def coordinate_mesh():
  """A 1-D mesh over the 8 simulated CPU devices, axis ``"coords"``."""
  return jax.sharding.Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("coords",))


def run_coordinate_sharded(rule, x, **hparams):
  """Runs ``rule(x_shard, axis_name="coords", **hparams)`` with coordinates split 8 ways.

  Every leaf of ``x`` is ``[n, d_leaf]`` with ``d_leaf`` divisible by 8; each output leaf is
  sharded on its last axis (a rule's ``[d]``, a pre-aggregator's or an attack's ``[m, d]``)
  and gathered back, so the result is comparable with the unsharded ``rule(x, **hparams)``.
  Differentiable, like the rule.
  """
  mesh = coordinate_mesh()
  sharded_rule = lambda xs: rule(xs, axis_name="coords", **hparams)  # noqa: E731
  # The output's rank per leaf, from the unsharded shapes (sharding keeps the rank).
  out_shapes = jax.eval_shape(lambda xs: rule(xs, **hparams), x)
  out_specs = jax.tree.map(lambda leaf: P(*([None] * (leaf.ndim - 1)), "coords"), out_shapes)
  fn = jax.shard_map(sharded_rule, mesh=mesh, in_specs=P(None, "coords"), out_specs=out_specs)
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


def finite_mask(x) -> np.ndarray:
  """Which rows of ``x [n, ...]`` hold only finite values."""
  return np.all(np.isfinite(np.asarray(x).reshape(np.shape(x)[0], -1)), axis=1)


def np_sq_distances(x) -> np.ndarray:
  """Squared distances in d-space (float64); non-finite rows at +inf from every other row."""
  x = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
  keep = finite_mask(x)
  safe = np.where(keep[:, None], x, 0)
  D = ((safe[:, None, :] - safe[None, :, :]) ** 2).sum(-1)
  D[~keep, :] = np.inf
  D[:, ~keep] = np.inf
  np.fill_diagonal(D, 0)
  return D


def tied_rows(seed: int, n: int, d: int, dtype=np.float32) -> np.ndarray:
  """Rows with repeated values: a grid of 1/2, every third row a copy of row 0, and a
  constant first column (the ties that the mimic attack and duplicated workers make)."""
  x = np.round(np.random.default_rng(seed).normal(size=(n, d)) * 2) / 2
  x[1::3] = x[0]
  x[:, 0] = 0.5
  return x.astype(dtype)
