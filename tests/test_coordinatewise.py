"""Coordinate-wise rules (mean, median, trimmed mean) against numpy oracles and invariants."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from flagjax import aggregators
from tests import helpers


def np_median(x):
  return np.median(x, axis=0)


def np_trimmed_mean(x, f):
  s = np.sort(x, axis=0)
  return s[f:x.shape[0] - f].mean(axis=0)


class CoordinatewiseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters((7, 2), (8, 3), (32, 8), (3, 1))
  def test_against_numpy(self, n, f):
    x = helpers.random_rows(n, n, 13)
    med = self.variant(aggregators.median)(x)
    tm = self.variant(aggregators.trimmed_mean, static_argnums=1)(x, f)
    mean = self.variant(aggregators.mean)(x)
    chex.assert_shape([med, tm, mean], (13,))
    chex.assert_trees_all_close(med, np_median(x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(tm, np_trimmed_mean(x, f), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(mean, x.mean(0), rtol=1e-5, atol=1e-6)

  def test_pytree_and_trailing_dims(self):
    x = {"w": helpers.random_rows(0, 9, 12).reshape(9, 3, 4), "b": helpers.random_rows(1, 9, 2)}
    out = aggregators.trimmed_mean(x, 2)
    chex.assert_shape(out["w"], (3, 4))
    chex.assert_trees_all_close(out["w"], np_trimmed_mean(x["w"], 2), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(aggregators.median(x)["b"], np_median(x["b"]), atol=1e-6)

  def test_vmap_over_batch(self):
    x = np.stack([helpers.random_rows(s, 7, 5) for s in range(4)])
    out = jax.vmap(lambda b: aggregators.trimmed_mean(b, 2))(x)
    ref = np.stack([np_trimmed_mean(b, 2) for b in x])
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)

  def test_bfloat16_and_float64(self):
    x = helpers.random_rows(3, 9, 6)
    out = aggregators.median(jnp.asarray(x, jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(out.astype(np.float32),
                                np_median(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)),
                                atol=1e-2)
    with jax.enable_x64(True):
      x64 = helpers.random_rows(4, 9, 6, np.float64)
      out = aggregators.trimmed_mean(jnp.asarray(x64), 3)
      self.assertEqual(out.dtype, jnp.float64)
      np.testing.assert_allclose(out, np_trimmed_mean(x64, 3), rtol=1e-12)

  def test_bounds(self):
    x = helpers.random_rows(0, 6, 3)
    with self.assertRaisesRegex(ValueError, r"trimmed_mean needs n > 2\*f, got n=6, f=3"):
      aggregators.trimmed_mean(x, 3)
    with self.assertRaisesRegex(ValueError, "trimmed_mean needs f >= 0"):
      aggregators.trimmed_mean(x, -1)

  @parameterized.parameters("median", "trimmed_mean")
  def test_nonfinite_rows_do_not_leak(self, name):
    n, f = 11, 3
    x = helpers.random_rows(5, n, 16)
    bad = helpers.poison(x, rows=[0, 4, 10])
    out = aggregators.median(bad) if name == "median" else aggregators.trimmed_mean(bad, f)
    self.assertTrue(np.all(np.isfinite(out)))
    honest = np.delete(x, [0, 4, 10], axis=0)
    self.assertTrue(np.all(out >= honest.min(0) - 1e-6) and np.all(out <= honest.max(0) + 1e-6))

  @parameterized.parameters("median", "trimmed_mean", "mean")
  def test_coordinate_sharded_matches_unsharded(self, name):
    x = helpers.random_rows(7, 10, 64)
    kw = {"f": 3} if name == "trimmed_mean" else {}
    rule = getattr(aggregators, name)
    chex.assert_trees_all_close(helpers.run_coordinate_sharded(rule, x, **kw),
                                rule(x, **kw), rtol=1e-6, atol=1e-6)


@hypothesis.given(n=st.integers(3, 40), d=st.integers(1, 9), seed=st.integers(0, 2**16),
                  data=st.data())
def test_property_permutation_invariance_and_range(n, d, seed, data):
  f = data.draw(st.integers(0, (n - 1) // 2))
  tied = data.draw(st.booleans())
  x = (helpers.tied_rows if tied else helpers.random_rows)(seed, n, d)
  perm = np.random.default_rng(seed + 1).permutation(n)
  tm = aggregators.trimmed_mean(x, f)
  np.testing.assert_allclose(tm, np_trimmed_mean(x, f), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aggregators.trimmed_mean(x[perm], f), tm, rtol=1e-5, atol=1e-5)
  # With f huge rows the trimmed mean stays inside the honest rows' range.
  hostile = x.copy()
  hostile[:f] = 1e30
  out = aggregators.trimmed_mean(hostile, f)
  honest = x[f:]
  assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5)
  np.testing.assert_allclose(aggregators.median(x), np_median(x), rtol=1e-6, atol=1e-6)
