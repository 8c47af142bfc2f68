"""Krum, Multi-Krum and Bulyan against numpy oracles written from DESIGN.md, and invariants."""

import importlib

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from flagjax import aggregators
from flagjax.core import gram as gram_lib
from tests import helpers

# The function flagjax.aggregators.krum shadows its module's name on the package.
krum_lib = importlib.import_module("flagjax.aggregators.krum")


# ----------------------------------------------------------------------------- numpy oracles
# Each worker's update is flattened (pytree leaves concatenated: only the oracle may do this).
# A non-finite worker is at +inf distance from every other and ranks after every finite one.

def np_flat(x):
  leaves = jax.tree.leaves(x)
  n = leaves[0].shape[0]
  return np.concatenate([np.asarray(l, np.float64).reshape(n, -1) for l in leaves], axis=1)


def np_sq_distances(flat):
  n = flat.shape[0]
  finite = np.all(np.isfinite(flat), axis=1)
  D = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      if i != j:
        D[i, j] = np.sum((flat[i] - flat[j]) ** 2) if finite[i] and finite[j] else np.inf
  return D, finite


def np_krum_order(flat, f, remainder=None):
  """Workers of ``remainder`` by ascending Krum score within it (ties: lowest index)."""
  n = flat.shape[0]
  D, finite = np_sq_distances(flat)
  remainder = list(range(n)) if remainder is None else remainder
  k = max(len(remainder) - f - 2, 0)
  scores = {}
  for i in remainder:
    nearest = sorted(D[i, j] for j in remainder if j != i)
    scores[i] = sum(nearest[:k])
  return sorted(remainder, key=lambda i: (not finite[i], scores[i], i))


def np_krum_index(flat, f):
  return np_krum_order(flat, f)[0]


def np_multi_krum_indices(flat, f, m):
  return np_krum_order(flat, f)[:m]


def np_bulyan_indices(flat, f):
  """Krum repeatedly; ties in score go to the row nearest the selection, then lowest index."""
  n = flat.shape[0]
  D, finite = np_sq_distances(flat)
  remainder, chosen = list(range(n)), []
  for _ in range(n - 2 * f):
    k = max(len(remainder) - f - 2, 0)
    scores = {i: sum(sorted(D[i, j] for j in remainder if j != i)[:k]) for i in remainder}
    best = min((not finite[i], scores[i]) for i in remainder)
    tied = [i for i in remainder if (not finite[i], scores[i]) == best]
    pick = min(tied, key=lambda i: (sum(D[i, j] for j in chosen), i))
    remainder.remove(pick)
    chosen.append(pick)
  return sorted(chosen)


def np_mean_nearest_median(values, size):
  """Per column: the mean of the ``size`` values nearest to the column's median."""
  out = np.empty(values.shape[1])
  for k in range(values.shape[1]):
    col = values[:, k]
    nearest = np.argsort(np.abs(col - np.median(col)), kind="stable")[:size]
    out[k] = col[nearest].mean()
  return out


def np_bulyan(x, f):
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  chosen = np_bulyan_indices(np_flat(x), f)
  selected = x[chosen].reshape(len(chosen), -1)
  return np_mean_nearest_median(selected, n - 4 * f).reshape(x.shape[1:])


def np_krum(x, f):
  return np.asarray(x)[np_krum_index(np_flat(x), f)]


def np_multi_krum(x, f, m=None):
  m = x.shape[0] - f if m is None else m
  return np.asarray(x, np.float64)[np_multi_krum_indices(np_flat(x), f, m)].mean(0)


RULES = {"krum": np_krum, "multi_krum": np_multi_krum, "bulyan": np_bulyan}


class KrumTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters((7, 2), (11, 2), (12, 4), (3, 0))
  def test_krum_and_multi_krum_against_numpy(self, n, f):
    x = helpers.random_rows(n, n, 13)
    out = self.variant(aggregators.krum, static_argnums=1)(x, f)
    chex.assert_shape(out, (13,))
    np.testing.assert_array_equal(out, np_krum(x, f))
    for m in {None, 1, n - f - 1 or 1}:
      out = self.variant(aggregators.multi_krum, static_argnums=(1, 2))(x, f, m)
      chex.assert_trees_all_close(out, np_multi_krum(x, f, m).astype(np.float32),
                                  rtol=1e-5, atol=1e-6)

  # Jitted only: eager Bulyan dispatches its two sorting networks op by op (~7 s a case);
  # Krum's test above runs both variants.
  @chex.variants(with_jit=True)
  @parameterized.parameters((7, 1), (11, 2), (16, 3), (4, 0))
  def test_bulyan_against_numpy(self, n, f):
    x = helpers.random_rows(100 + n, n, 13)
    out = self.variant(aggregators.bulyan, static_argnums=1)(x, f)
    chex.assert_shape(out, (13,))
    chex.assert_trees_all_close(out, np_bulyan(x, f).astype(np.float32), rtol=1e-5, atol=1e-6)

  def test_coefficients_and_selection(self):
    n, f = 11, 2
    x = helpers.random_rows(3, n, 6)
    K = gram_lib.gram(x)
    flat = np_flat(x)
    c = krum_lib.krum_coefficients(K, f)
    np.testing.assert_array_equal(c, np.eye(n)[np_krum_index(flat, f)])
    c = krum_lib.multi_krum_coefficients(K, f, m=4)
    expected = np.zeros(n)
    expected[np_multi_krum_indices(flat, f, 4)] = 0.25
    np.testing.assert_allclose(c, expected, rtol=1e-7)
    mask = krum_lib.bulyan_selection(K, f)
    self.assertEqual(mask.dtype, jnp.bool_)
    np.testing.assert_array_equal(np.flatnonzero(mask), np_bulyan_indices(flat, f))

  @parameterized.parameters((17, 3), (24, 5), (41, 9))
  def test_bulyan_selection_sorting_once_against_numpy(self, n, f):
    # Above BULYAN_SORT_ONCE_ABOVE workers the distances are sorted once: ties (integer rows,
    # a duplicated row), a NaN row and a far row must select as the oracle does.
    self.assertGreater(n, krum_lib.BULYAN_SORT_ONCE_ABOVE)
    rng = np.random.default_rng(n)
    x = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    x[3] = x[2]
    x[5, 1] = np.nan
    x[7] = 1e3
    mask = krum_lib.bulyan_selection(gram_lib.gram(x), f)
    np.testing.assert_array_equal(np.flatnonzero(mask), np_bulyan_indices(np_flat(x), f))
    # The whole rule on untied values (the second stage's ties in |x - median| between
    # different values have no stated order).
    x = x + rng.normal(scale=0.1, size=x.shape).astype(np.float32)
    out = jax.jit(aggregators.bulyan, static_argnums=1)(x, f)
    chex.assert_trees_all_close(out, np_bulyan(x, f).astype(np.float32), rtol=1e-5, atol=1e-6)

  def test_krum_scores_with_active_mask(self):
    n = 9
    x = helpers.random_rows(4, n, 5)
    D, _ = np_sq_distances(np_flat(x))
    active = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    for k in (0, 2, 5):
      scores = krum_lib.krum_scores(jnp.asarray(D, jnp.float32), k, jnp.asarray(active))
      expected = [sum(sorted(D[i, j] for j in range(n) if active[j] and j != i)[:k])
                  for i in range(n)]
      np.testing.assert_allclose(scores, expected, rtol=1e-5)
    # More neighbours than active others: +inf.
    scores = krum_lib.krum_scores(jnp.asarray(D, jnp.float32), 6, jnp.asarray(active))
    np.testing.assert_array_equal(np.isinf(scores), active)
    scores = krum_lib.krum_scores(jnp.asarray(D, jnp.float32), 7, jnp.asarray(active))
    self.assertTrue(np.all(np.isinf(scores)))

  def test_pytree_and_trailing_dims(self):
    n, f = 11, 2
    x = {"w": helpers.random_rows(0, n, 12).reshape(n, 3, 4), "b": helpers.random_rows(1, n, 2)}
    for name in RULES:
      out = getattr(aggregators, name)(x, f)
      chex.assert_shape([out["w"], out["b"]], [(3, 4), (2,)])
      if name == "bulyan":
        # The second stage is coordinate-wise; the selection uses the whole update.
        chosen = np_bulyan_indices(np_flat(x), f)
        ref = {k: np_mean_nearest_median(np.asarray(v, np.float64)[chosen].reshape(
            len(chosen), -1), n - 4 * f).reshape(v.shape[1:]) for k, v in x.items()}
      else:
        idx = (np_multi_krum_indices(np_flat(x), f, n - f) if name == "multi_krum"
               else [np_krum_index(np_flat(x), f)])
        ref = {k: np.asarray(v, np.float64)[idx].mean(0) for k, v in x.items()}
      chex.assert_trees_all_close(out, jax.tree.map(lambda r: r.astype(np.float32), ref),
                                  rtol=1e-5, atol=1e-6)

  def test_vmap_over_batch(self):
    n, f = 11, 2
    x = np.stack([helpers.random_rows(s, n, 5) for s in range(4)])
    for name, oracle in RULES.items():
      out = jax.jit(jax.vmap(lambda b: getattr(aggregators, name)(b, f)))(x)
      ref = np.stack([oracle(b, f) for b in x]).astype(np.float32)
      chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)

  def test_bfloat16_and_float64(self):
    n, f = 11, 2
    x = helpers.random_rows(3, n, 6)
    xb = jnp.asarray(x, jnp.bfloat16)
    rounded = np.asarray(xb, np.float32)
    for name, oracle in RULES.items():
      # Jitted: eager calls compile every op of the rule apart (most of this test's time).
      out = jax.jit(getattr(aggregators, name), static_argnums=1)(xb, f)
      self.assertEqual(out.dtype, jnp.bfloat16)
      chex.assert_trees_all_close(out.astype(np.float32),
                                  oracle(rounded, f).astype(np.float32), atol=1e-2, rtol=1e-2)
    with jax.enable_x64(True):
      x64 = helpers.random_rows(4, n, 6, np.float64)
      for name, oracle in RULES.items():
        out = jax.jit(getattr(aggregators, name), static_argnums=1)(jnp.asarray(x64), f)
        self.assertEqual(out.dtype, jnp.float64)
        np.testing.assert_allclose(out, oracle(x64, f), rtol=1e-12, atol=1e-12)

  def test_bounds(self):
    x = helpers.random_rows(0, 6, 3)
    with self.assertRaisesRegex(ValueError, r"^krum needs n >= 2\*f \+ 3, got n=6, f=2$"):
      aggregators.krum(x, 2)
    with self.assertRaisesRegex(ValueError, r"^multi_krum needs n >= 2\*f \+ 3, got n=6, f=2$"):
      aggregators.multi_krum(x, 2)
    with self.assertRaisesRegex(ValueError, "krum needs f >= 0"):
      aggregators.krum(x, -1)
    with self.assertRaisesRegex(ValueError, "static Python int"):
      aggregators.krum(x, 1.5)
    for m in (0, 6):
      with self.assertRaisesRegex(
          ValueError, rf"^multi_krum needs 1 <= m <= n - f, got m={m}, n=6, f=1$"):
        aggregators.multi_krum(x, 1, m)
    x = helpers.random_rows(0, 10, 3)
    with self.assertRaisesRegex(ValueError, r"^bulyan needs n >= 4\*f \+ 3, got n=10, f=2$"):
      aggregators.bulyan(x, 2)
    with self.assertRaisesRegex(ValueError, r"^bulyan needs n >= 4\*f \+ 3, got n=10, f=2$"):
      krum_lib.bulyan_selection(gram_lib.gram(x), 2)
    with self.assertRaisesRegex(ValueError, r"^krum needs n >= 2\*f \+ 3, got n=10, f=4$"):
      krum_lib.krum_coefficients(gram_lib.gram(x), 4)

  @parameterized.parameters("krum", "multi_krum", "bulyan")
  def test_nonfinite_rows_are_never_selected(self, name):
    n, f = 11, 2
    x = helpers.random_rows(5, n, 16)
    bad = helpers.poison(x, rows=[0, 7])
    bad[7] = np.inf
    out = jax.jit(lambda b: getattr(aggregators, name)(b, f))(bad)
    self.assertTrue(np.all(np.isfinite(out)))
    chex.assert_trees_all_close(out, RULES[name](bad, f).astype(np.float32),
                                rtol=1e-5, atol=1e-6)
    # Huge finite rows overflow K in float32: treated as non-finite, still never selected.
    huge = x.copy()
    huge[[0, 7]] = 1e30
    out = getattr(aggregators, name)(huge, f)
    honest = np.delete(x, [0, 7], axis=0)
    self.assertTrue(np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5))

  def test_bulyan_never_picks_nonfinite_without_neighbours(self):
    # n=7, f=1: the last pick scores over max(3-1-2, 0) = 0 neighbours, so every score is 0
    # and the lowest index would win; a NaN row 0 must still lose to the finite ones.
    x = helpers.random_rows(6, 7, 4)
    x[0, 1] = np.nan
    mask = krum_lib.bulyan_selection(gram_lib.gram(x), 1)
    self.assertFalse(bool(mask[0]))
    self.assertEqual(int(mask.sum()), 5)
    self.assertTrue(np.all(np.isfinite(aggregators.bulyan(x, 1))))

  @parameterized.parameters("krum", "multi_krum", "bulyan")
  def test_coordinate_sharded_matches_unsharded(self, name):
    n, f = 11, 2
    x = {"a": helpers.random_rows(7, n, 64), "b": helpers.random_rows(8, n, 16)}
    x["a"] = helpers.poison(x["a"], rows=[3])
    rule = getattr(aggregators, name)
    chex.assert_trees_all_close(helpers.run_coordinate_sharded(rule, x, f=f),
                                rule(x, f=f), rtol=1e-6, atol=1e-6)

  def test_krum_output_is_an_input_row_and_multi_krum_m1_is_krum(self):
    x = helpers.random_rows(9, 10, 7)
    out = aggregators.krum(x, 3)
    self.assertTrue(any(np.array_equal(out, row) for row in x))
    chex.assert_trees_all_close(aggregators.multi_krum(x, 3, m=1), out, atol=0)
    # Bulyan with f = 0 keeps every row and averages all of them.
    chex.assert_trees_all_close(aggregators.bulyan(x, 0), x.mean(0), rtol=1e-5, atol=1e-6)


# Property tests run jitted: one compilation per drawn shape instead of one per eager op.
jit_krum = jax.jit(aggregators.krum, static_argnums=1)
jit_multi_krum = jax.jit(aggregators.multi_krum, static_argnums=(1, 2))
jit_bulyan = jax.jit(aggregators.bulyan, static_argnums=1)


@hypothesis.settings(max_examples=6)  # each new shape compiles anew
@hypothesis.given(n=st.integers(3, 40), d=st.integers(1, 9), seed=st.integers(0, 2**16),
                  data=st.data())
def test_property_krum_family(n, d, seed, data):
  f = data.draw(st.integers(0, (n - 3) // 2))
  m = data.draw(st.integers(1, n - f))
  x = helpers.random_rows(seed, n, d)
  perm = np.random.default_rng(seed + 1).permutation(n)
  shift = np.random.default_rng(seed + 2).normal(size=d).astype(np.float32)

  out = jit_krum(x, f)
  np.testing.assert_array_equal(out, np_krum(x, f))
  np.testing.assert_array_equal(jit_krum(x[perm], f), out)
  np.testing.assert_allclose(jit_krum(x + shift, f), out + shift, rtol=1e-5, atol=1e-5)

  out = jit_multi_krum(x, f, m)
  np.testing.assert_allclose(out, np_multi_krum(x, f, m), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jit_multi_krum(x[perm], f, m), out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jit_multi_krum(x + shift, f, m), out + shift,
                             rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=6)  # each new shape compiles anew
@hypothesis.given(n=st.integers(3, 40), d=st.integers(1, 9), seed=st.integers(0, 2**16),
                  data=st.data())
def test_property_bulyan(n, d, seed, data):
  f = data.draw(st.integers(0, (n - 3) // 4))
  x = helpers.random_rows(seed, n, d)
  perm = np.random.default_rng(seed + 1).permutation(n)
  shift = np.random.default_rng(seed + 2).normal(size=d).astype(np.float32)
  out = jit_bulyan(x, f)
  np.testing.assert_allclose(out, np_bulyan(x, f), rtol=1e-5, atol=1e-5)
  if f != 1:
    # At f = 1 the last pick scores max(3 - 1 - 2, 0) = 0 neighbours: a tie that the lowest
    # index breaks, so only then does the order of the workers matter.
    np.testing.assert_allclose(jit_bulyan(x[perm], f), out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jit_bulyan(x + shift, f), out + shift, rtol=1e-5, atol=1e-5)
  # f non-finite rows are never selected: the result stays that of a finite selection.
  if f:
    bad = helpers.poison(x, rows=range(f))
    out = jit_bulyan(bad, f)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np_bulyan(bad, f), rtol=1e-5, atol=1e-5)


def test_bulyan_second_stage_beyond_the_unrolled_network():
  # theta = n - 2f selected rows above NETWORK_MAX_WORKERS: the staged bitonic path, with
  # duplicated rows, a constant column and one NaN row (f = 1).
  from flagjax.core import sorting
  f = 1
  n = sorting.NETWORK_MAX_WORKERS + 2 * f + 1
  x = helpers.random_rows(131, n, 150)
  x[1] = x[2]
  x[:, 4] = 0.25
  x = helpers.poison(x, rows=(7,))
  out = jax.jit(aggregators.bulyan, static_argnums=1)(x, f)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, np_bulyan(x, f), rtol=1e-5, atol=1e-5)
