"""The released-code port of the Flag Aggregator against a numpy restatement of its step."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.flag_released import flag_released, released_start
from flagjax import aggregators


def np_released(x, start, rank, lam, eps=1e-7):
  """The released ``aggregate`` with ``n_its = 1`` from ``start``, restated in numpy (float64):
  weights ``(|1 - |Y^T v|^2| + eps)^(-1/4)`` on the vectors, ordered pairs ``u_i - u_j``
  scaled by ``lam / (p (p-1))``, an SVD, the step kept only if it lowers the pair-free
  objective, output ``sum_i Y Y^T u_i / r``."""
  x = np.asarray(x, np.float64)
  units = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  p = len(units)
  Y0 = np.asarray(start, np.float64)

  def weight(v, Y):
    return (abs(1 - np.sum((Y.T @ v) ** 2)) + eps) ** -0.25

  vectors = [weight(u, Y0) * u for u in units]
  if lam > 0:
    for i in range(p):
      for j in range(p):
        if i != j:
          v = units[i] - units[j]
          vectors.append(weight(v, Y0) * lam / (p * (p - 1)) * v)
  Y1 = np.linalg.svd(np.stack(vectors, 1), full_matrices=False)[0][:, :rank]

  def err(Y):
    return sum(np.sqrt(max(0.0, 1 - np.sum((Y.T @ u) ** 2))) for u in units)

  Y = Y1 if err(Y0) - err(Y1) > 0 else Y0
  return sum(Y @ (Y.T @ u) for u in units) / rank


@pytest.mark.parametrize("lam", [0.0, 8.0])
@pytest.mark.parametrize("rank", [1, 3])
def test_released_step_matches_a_numpy_restatement(lam, rank):
  x = np.random.default_rng(0).normal(size=(7, 30)).astype(np.float32)
  start = np.asarray(released_start(30, rank, seed=1))
  np.testing.assert_allclose(start.T @ start, np.eye(rank), atol=1e-5)
  out = flag_released(jnp.asarray(x), rank=rank, lam=lam)
  np.testing.assert_allclose(out, np_released(x, start, rank, lam), rtol=2e-4, atol=2e-5)


def test_released_start_is_the_same_every_call_and_pytrees_work():
  x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
  a = flag_released(jnp.asarray(x), rank=2)
  np.testing.assert_array_equal(a, flag_released(jnp.asarray(x), rank=2))
  # A pytree is one vector per worker, its leaves in tree order ("b" before "w").
  tree = flag_released({"w": jnp.asarray(x[:, :8]), "b": jnp.asarray(x[:, 8:])}, rank=2)
  flat = flag_released(jnp.asarray(np.concatenate([x[:, 8:], x[:, :8]], 1)), rank=2)
  np.testing.assert_allclose(np.concatenate([tree["b"], tree["w"]]), flat, rtol=1e-5,
                             atol=1e-6)


def test_released_divides_by_the_requested_rank():
  # 15 rows of rank 3: flagjax's "rank" scale divides by r capped at 3, the released code
  # by the requested 8; from the same subspace the two outputs differ by that factor.
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(15, 3)) @ rng.normal(size=(3, 40))).astype(np.float32)
  ours = np.asarray(aggregators.flag(jnp.asarray(x), rank=8, scale="rank"))
  units = x / np.linalg.norm(x, axis=1, keepdims=True)
  # The released output for a start inside the rows' span (so Y spans the same 3 directions):
  span = np.linalg.svd(units.T, full_matrices=False)[0][:, :3]
  start = np.concatenate([span, np.linalg.qr(rng.normal(size=(40, 5)) - span @ (
      span.T @ rng.normal(size=(40, 5))))[0]], axis=1)
  start = np.linalg.qr(start)[0]
  released = np.asarray(flag_released(jnp.asarray(x), rank=8, start=start))
  np.testing.assert_allclose(np.linalg.norm(released) * 8 / 3, np.linalg.norm(ours), rtol=2e-2)
