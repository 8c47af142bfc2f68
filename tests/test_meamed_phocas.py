"""MeaMed and Phocas against numpy oracles written from DESIGN.md, and invariants."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from flagjax import aggregators
from flagjax.core import sorting
from tests import helpers


# ----------------------------------------------------------------------------- numpy oracles
# NaN counts as +inf (a non-finite value is at infinite distance from any finite centre).

def np_mean_nearest(x, center, size):
  """Per coordinate, the mean of the ``size`` values of least ``|x_i - center|``."""
  flat = x.reshape(x.shape[0], -1)
  center = center.reshape(-1)
  out = np.empty(flat.shape[1])
  for k in range(flat.shape[1]):
    col = flat[:, k]
    nearest = np.argsort(np.abs(col - center[k]), kind="stable")[:size]
    out[k] = col[nearest].mean()
  return out.reshape(x.shape[1:])


def np_meamed(x, f):
  x = np.asarray(x, np.float64)
  x = np.where(np.isnan(x), np.inf, x)
  return np_mean_nearest(x, np.median(x, axis=0), x.shape[0] - f)


def np_phocas(x, f):
  x = np.asarray(x, np.float64)
  x = np.where(np.isnan(x), np.inf, x)
  n = x.shape[0]
  trimmed = np.sort(x, axis=0)[f:n - f].mean(axis=0)
  return np_mean_nearest(x, trimmed, n - f)


RULES = {"meamed": np_meamed, "phocas": np_phocas}


class MeaMedPhocasTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((7, 2), (8, 3), (32, 8), (3, 1), (6, 0))
  def test_against_numpy(self, n, f):
    x = helpers.random_rows(n, n, 13)
    for name, oracle in RULES.items():
      out = self.variant(getattr(aggregators, name), static_argnums=1)(x, f)
      chex.assert_shape(out, (13,))
      chex.assert_trees_all_close(out, oracle(x, f).astype(np.float32), rtol=1e-5, atol=1e-6)

  def test_f_zero_is_the_mean(self):
    x = helpers.random_rows(1, 9, 5)
    for name in RULES:
      chex.assert_trees_all_close(getattr(aggregators, name)(x, 0), x.mean(0),
                                  rtol=1e-5, atol=1e-6)

  def test_pytree_and_trailing_dims(self):
    x = {"w": helpers.random_rows(0, 9, 12).reshape(9, 3, 4), "b": helpers.random_rows(1, 9, 2)}
    for name, oracle in RULES.items():
      out = getattr(aggregators, name)(x, 3)
      chex.assert_shape([out["w"], out["b"]], [(3, 4), (2,)])
      chex.assert_trees_all_close(
          out, {k: oracle(v, 3).astype(np.float32) for k, v in x.items()}, rtol=1e-5, atol=1e-6)

  def test_vmap_over_batch(self):
    x = np.stack([helpers.random_rows(s, 7, 5) for s in range(4)])
    for name, oracle in RULES.items():
      out = jax.vmap(lambda b: getattr(aggregators, name)(b, 2))(x)
      ref = np.stack([oracle(b, 2) for b in x]).astype(np.float32)
      chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)

  def test_bfloat16_and_float64(self):
    x = helpers.random_rows(3, 9, 6)
    xb = jnp.asarray(x, jnp.bfloat16)
    for name, oracle in RULES.items():
      out = getattr(aggregators, name)(xb, 3)
      self.assertEqual(out.dtype, jnp.bfloat16)
      chex.assert_trees_all_close(out.astype(np.float32),
                                  oracle(np.asarray(xb, np.float32), 3).astype(np.float32),
                                  atol=1e-2, rtol=1e-2)
    with jax.enable_x64(True):
      x64 = helpers.random_rows(4, 9, 6, np.float64)
      for name, oracle in RULES.items():
        out = getattr(aggregators, name)(jnp.asarray(x64), 3)
        self.assertEqual(out.dtype, jnp.float64)
        np.testing.assert_allclose(out, oracle(x64, 3), rtol=1e-12, atol=1e-12)

  @parameterized.parameters("meamed", "phocas")
  def test_bounds(self, name):
    x = helpers.random_rows(0, 6, 3)
    rule = getattr(aggregators, name)
    with self.assertRaisesRegex(ValueError, rf"^{name} needs n > 2\*f, got n=6, f=3$"):
      rule(x, 3)
    with self.assertRaisesRegex(ValueError, f"{name} needs f >= 0"):
      rule(x, -1)
    with self.assertRaisesRegex(ValueError, "static Python int"):
      rule(x, None)

  @parameterized.parameters("meamed", "phocas")
  def test_nonfinite_rows_do_not_leak(self, name):
    n, f = 11, 3
    x = helpers.random_rows(5, n, 16)
    bad = helpers.poison(x, rows=[0, 4, 10])
    out = jax.jit(lambda b: getattr(aggregators, name)(b, f))(bad)
    self.assertTrue(np.all(np.isfinite(out)))
    honest = np.delete(x, [0, 4, 10], axis=0)
    self.assertTrue(np.all(out >= honest.min(0) - 1e-6) and np.all(out <= honest.max(0) + 1e-6))
    chex.assert_trees_all_close(out, RULES[name](bad, f).astype(np.float32),
                                rtol=1e-5, atol=1e-6)

  @parameterized.parameters("meamed", "phocas")
  def test_coordinate_sharded_matches_unsharded(self, name):
    x = {"a": helpers.poison(helpers.random_rows(7, 10, 64), rows=[2]),
         "b": helpers.random_rows(8, 10, 8)}
    rule = getattr(aggregators, name)
    chex.assert_trees_all_close(helpers.run_coordinate_sharded(rule, x, f=3),
                                rule(x, f=3), rtol=1e-6, atol=1e-6)


@hypothesis.given(n=st.integers(3, 40), d=st.integers(1, 9), seed=st.integers(0, 2**16),
                  data=st.data())
def test_property_oracle_invariances_and_range(n, d, seed, data):
  f = data.draw(st.integers(0, (n - 1) // 2))
  if data.draw(st.booleans()):
    # Repeated values: the tie-aware oracles (values nearest the centre, ties to the lower
    # value); Phocas' centre is exact in float32 only when n - 2f is a power of two.
    from tests import test_regressions as oracles
    x = helpers.tied_rows(seed, n, d)
    np.testing.assert_allclose(aggregators.meamed(x, f), oracles.np_meamed(x, f), atol=1e-6)
    if n - 2 * f in (1, 2, 4, 8, 16, 32):
      np.testing.assert_allclose(aggregators.phocas(x, f), oracles.np_phocas(x, f), atol=1e-6)
    perm = np.random.default_rng(seed + 1).permutation(n)
    for name in RULES:
      rule = getattr(aggregators, name)
      np.testing.assert_array_equal(rule(x[perm], f), rule(x, f))
    return
  x = helpers.random_rows(seed, n, d)
  perm = np.random.default_rng(seed + 1).permutation(n)
  shift = np.random.default_rng(seed + 2).normal(size=d).astype(np.float32)
  hostile = x.copy()
  hostile[:f] = np.where(np.arange(d) % 2, 1e30, -1e30)
  honest = x[f:]
  for name, oracle in RULES.items():
    rule = getattr(aggregators, name)
    out = rule(x, f)
    np.testing.assert_allclose(out, oracle(x, f), rtol=1e-5, atol=1e-5)
    # Sorting is exact, so a permutation of the workers changes nothing at all.
    np.testing.assert_array_equal(rule(x[perm], f), out)
    np.testing.assert_allclose(rule(x + shift, f), out + shift, rtol=1e-5, atol=1e-5)
    # With f huge rows the result stays inside the honest rows' range.
    out = rule(hostile, f)
    assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5)


# ---------------------------------------------------------------------------------------------
# Many workers: above NETWORK_MAX_WORKERS the staged bitonic network sorts column blocks.

def many_worker_rows(n, d, seed):
  """Ties (duplicated rows, a repeated value), a constant column, huge finite values, a
  near-zero row, and f rows holding NaN/Inf, on d not a multiple of the block width."""
  f = n // 4
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  x[1] = x[2]
  x[:, 7] = 0.5
  x[::5, 11] = 2.0
  x[3, :] = 1e-30
  x[4, 13] = 1e30
  x[5, 13] = -1e30
  return helpers.poison(x, rows=range(n - f, n)), f


def test_bitonic_sort_sorts_every_column():
  rng = np.random.default_rng(130)
  for size, width in ((2, 3), (64, 5), (256, 17)):
    block = rng.integers(-3, 4, size=(size, width)).astype(np.float32)   # many ties
    block[0, 0] = np.inf
    block[1, 1] = -np.inf
    np.testing.assert_array_equal(jax.jit(sorting.bitonic_sort)(block), np.sort(block, 0))
  with np.testing.assert_raises_regex(ValueError, "power-of-two"):
    sorting.bitonic_sort(jnp.zeros((6, 2)))


@pytest.mark.parametrize("n", [sorting.NETWORK_MAX_WORKERS + 3, 257])
def test_coordinate_wise_rules_beyond_the_unrolled_network(n):
  x, f = many_worker_rows(n, 700, n)
  xs = np.where(np.isnan(x), np.inf, x).astype(np.float64)
  rules = jax.jit(lambda x: {"median": aggregators.median(x),
                             "trimmed_mean": aggregators.trimmed_mean(x, f),
                             "meamed": aggregators.meamed(x, f),
                             "phocas": aggregators.phocas(x, f)})
  out = rules(x)
  sorted_xs = np.sort(xs, axis=0)
  expected = {"median": np.median(xs, axis=0),
              "trimmed_mean": sorted_xs[f:n - f].mean(axis=0),
              "meamed": np_meamed(x, f), "phocas": np_phocas(x, f)}
  for name, value in out.items():
    assert np.all(np.isfinite(value)), name
    np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Permutation invariance: the blocks see the workers in another order.
  perm = np.random.default_rng(n + 1).permutation(n)
  chex.assert_trees_all_close(rules(x[perm]), out, rtol=1e-6, atol=1e-7)


def test_bitonic_path_coordinate_sharded_matches_unsharded():
  # 150 coordinates per shard: a full block and an overlapping last one on every device.
  n = sorting.NETWORK_MAX_WORKERS + 3
  x, f = many_worker_rows(n, 8 * 150, 132)

  def rules(rows, axis_name=None):
    return {"median": aggregators.median(rows, axis_name=axis_name),
            "meamed": aggregators.meamed(rows, f, axis_name=axis_name)}
  sharded = helpers.run_coordinate_sharded(rules, x)
  chex.assert_trees_all_close(sharded, jax.jit(rules)(x), rtol=1e-6, atol=1e-7)
