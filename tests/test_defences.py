"""The defences of the other toolkits: CAF, SMEA, DnC, SignGuard, Clipped Clustering, FLTrust.

Each against an oracle written here (float64 numpy eigen-decompositions in d-space for CAF,
SMEA and DnC; scikit-learn's MeanShift and scipy's average linkage for the two clusterings;
FLTrust's formula), plus bounds, NaN/Inf rows, permutations, pytrees, jit/vmap, shards and a
robustness property.
"""

import functools
import importlib
import itertools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from scipy.cluster import hierarchy
from sklearn import cluster as sk_cluster

from flagjax import aggregators
from flagjax.core import clustering
from flagjax.core import gram as gram_lib
from flagjax.core import sampling
from flagjax.core import spectral
from flagjax.core import subsets
from tests import helpers


# Every rule jitted once per shape (calling them eagerly compiles each of their ops apart).
_STATIC = {"caf": ("f", "max_iters"), "smea": ("f",),
           "dnc": ("f", "num_iters", "subsample_size", "filter_fraction"),
           "signguard": ("lower", "upper", "coordinate_fraction"),
           "clipped_clustering": ("tau",), "fltrust": ()}
rules = types.SimpleNamespace(**{
    name: jax.jit(getattr(aggregators, name), static_argnames=static + ("axis_name",))
    for name, static in _STATIC.items()})


# ---------------------------------------------------------------------------------------------
# Oracles (float64, d-space).


def np_caf(x, f):
  x = np.asarray(x, np.float64)
  n = len(x)
  c = np.ones(n)
  best, best_value = x.mean(0), np.inf
  while f > 0 and c.sum() > n - 2 * f:
    mu = c @ x / c.sum()
    z = x - mu
    values, vectors = np.linalg.eigh((c[:, None] * z).T @ z / c.sum())
    if values[-1] < best_value:
      best, best_value = mu, values[-1]
    tau = (z @ vectors[:, -1]) ** 2
    top = tau[c > 0].max()
    if top <= 0:
      break
    c = np.where((c > 0) & (tau < top), c * (1 - tau / top), 0.0)
  return best


def np_smea(x, f):
  x = np.asarray(x, np.float64)
  n = len(x)
  best, best_value = None, np.inf
  for kept in itertools.combinations(range(n), n - f):
    rows = x[list(kept)]
    z = rows - rows.mean(0)
    value = np.linalg.eigvalsh(z.T @ z / len(kept))[-1]
    if value < best_value * (1 - 1e-9):
      best, best_value = rows.mean(0), value
  return best


def np_dnc_kept(columns, f, filter_fraction=1.0):
  """The rows DnC keeps in one iteration, from the subsampled columns [n, s]."""
  n = len(columns)
  z = columns - columns.mean(0)
  _, _, vt = np.linalg.svd(z, full_matrices=False)
  scores = (z @ vt[0]) ** 2
  keep = n - int(np.floor(filter_fraction * f))
  return set(np.argsort(scores, kind="stable")[:keep].tolist())


def np_fltrust(x, g0):
  x = np.asarray(x, np.float64)
  g0 = np.asarray(g0, np.float64)
  norms = np.linalg.norm(x, axis=1)
  trust = np.maximum(x @ g0 / norms / np.linalg.norm(g0), 0)
  if trust.sum() == 0:
    return np.zeros_like(g0)
  return (trust * np.linalg.norm(g0) / norms) @ x / trust.sum()


def np_average_linkage_larger_group(x):
  """scipy's average linkage on cosine distances, cut into two groups; the larger one."""
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  distances = 1 - np.clip(unit @ unit.T, -1, 1)
  condensed = distances[np.triu_indices(len(x), 1)]
  labels = hierarchy.fcluster(hierarchy.linkage(condensed, method="average"), 2, "maxclust")
  sizes = np.bincount(labels)
  return labels == np.argmax(sizes)


def spread_rows(seed, n, d, f, distance=50.0):
  """Honest Gaussian rows around a common mean, the last f far away in random directions."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) + 3.0
  x[n - f:] += distance * rng.normal(size=(f, d))
  return x


# ---------------------------------------------------------------------------------------------
# CAF and SMEA: exact eigenproblems in Gram space.


class SpectralFilterTest(parameterized.TestCase):

  @parameterized.parameters((7, 5, 2), (9, 3, 3), (12, 6, 0))
  def test_caf_and_smea_match_numpy_in_d_space(self, n, d, f):
    # n > d (rank-deficient covariances) and a duplicated row among the inputs.
    x = spread_rows(n + d, n, d, f, distance=5.0)
    x[1] = x[0]
    with jax.enable_x64(True):
      np.testing.assert_allclose(rules.caf(jnp.asarray(x), f), np_caf(x, f), rtol=1e-9,
                                 atol=1e-9)
      np.testing.assert_allclose(rules.smea(jnp.asarray(x), f), np_smea(x, f), rtol=1e-9,
                                 atol=1e-9)

  @parameterized.parameters((5, 3), (12, 4))
  def test_caf_above_the_lanczos_threshold_matches_numpy(self, d, f):
    # From spectral.LANCZOS_MIN_ROWS rows on, each eigenpair is certified Lanczos, not eigh:
    # still the d-space oracle's filter, step for step (n > d: rank-deficient covariances).
    # The eigh fallback is poisoned (NaN), so Lanczos and its certificate answered every step.
    n = spectral.LANCZOS_MIN_ROWS + 2
    x = spread_rows(7 * d, n, d, f, distance=5.0)
    x[1] = x[0]
    with jax.enable_x64(True), pytest.MonkeyPatch.context() as patch:
      patch.setattr(spectral, "_eigh_top", lambda M: (jnp.full((), jnp.nan, M.dtype),
                                                      jnp.full(M.shape[:1], jnp.nan, M.dtype)))
      caf = jax.jit(aggregators.caf, static_argnames="f")
      np.testing.assert_allclose(caf(jnp.asarray(x), f), np_caf(x, f), rtol=1e-9, atol=1e-9)
    # On 8 coordinate shards (one psum of K; the Lanczos start is the same everywhere).
    x32 = np.pad(x, ((0, 0), (0, 8 - d % 8))).astype(np.float32)
    np.testing.assert_allclose(helpers.run_coordinate_sharded(rules.caf, x32, f=f),
                               rules.caf(x32, f), rtol=1e-5, atol=1e-5)

  def test_float32_ties_constant_column_and_nonfinite_rows(self):
    x = helpers.tied_rows(3, 9, 6).astype(np.float64)
    x[:, 2] = 7.0
    x[:, 3] += np.arange(9)              # break the exact eigenvalue ties of the grid
    for rule, oracle in ((rules.caf, np_caf), (rules.smea, np_smea)):
      got = rule(x.astype(np.float32), 2)
      np.testing.assert_allclose(got, oracle(x, 2), rtol=2e-4, atol=2e-4, err_msg=rule.__name__)
      # Up to f rows of NaN/Inf never reach the output; more than f give NaN.
      bad = helpers.poison(x.astype(np.float32), rows=[4, 7])
      out = np.asarray(rule(bad, 2))
      self.assertTrue(np.isfinite(out).all(), rule.__name__)
      self.assertTrue(np.isnan(rule(helpers.poison(x.astype(np.float32), rows=[1, 4, 7]), 2)).all())
      # A 1e30 row overflows the float32 Gram: it counts as Byzantine and is left out.
      big = x.astype(np.float32).copy()
      big[5] = 1e30
      out = np.asarray(rule(big, 2))
      self.assertTrue(np.isfinite(out).all() and np.abs(out).max() < 100, rule.__name__)

  def test_smea_bound_pruned_search_picks_the_exhaustive_searchs_subset(self):
    # SMEA scores subsets in order of a lower bound and stops early; the exhaustive search
    # (every subset's eigenvalue, first minimum) must pick the same subset on every input:
    # low-rank structure (where the bound prunes), i.i.d. rows (where it prunes nothing),
    # ties, far outliers, n > d, non-finite rows, rows whose centred Gram overflows, float64.
    smea_module = importlib.import_module("flagjax.aggregators.smea")
    rng = np.random.default_rng(11)

    def structured(n, d, f, spread=1.0):
      basis = rng.normal(size=(2, d))
      x = rng.normal(size=(n, 2)) @ basis * 3 + spread * rng.normal(size=(n, d)) + 1.0
      x[n - f:] += rng.normal(size=(f, d)) * 2
      return x
    cases = [(structured(12, 300, 4), 4), (structured(12, 300, 3), 3),
             (structured(12, 40, 4, spread=0.01), 4), (helpers.random_rows(1, 12, 500), 4),
             (helpers.tied_rows(2, 12, 6), 3), (spread_rows(3, 12, 30, 4, distance=1e4), 4),
             (helpers.random_rows(4, 12, 3), 4),
             (helpers.poison(structured(12, 50, 4), rows=[2, 9]), 4),
             (helpers.random_rows(5, 12, 3) * 6e18, 4)]      # the centred Gram overflows
    def both(K, f):
      n = K.shape[0]
      clean, finite = gram_lib.clean_gram(K)
      uniform = jnp.full((n - f,), 1.0 / (n - f), clean.dtype)

      def score(removed, kept):
        kept = kept.astype(jnp.int32)
        value = spectral.top_eigenvalue(clean[kept][:, kept], uniform)
        return jnp.where(jnp.all(finite[kept]), value, jnp.inf)
      return (subsets.best_subset(score, n, f, elements_per_subset=1),
              smea_module.smea_coefficients(K, f) > 0)
    both = jax.jit(both, static_argnums=1)
    # Jitted: op by op, every input shape compiled each operation anew (~25 s of compiles).
    centred_gram = jax.jit(functools.partial(gram_lib.gram, centered=True))

    @functools.partial(jax.jit, static_argnums=1)
    def eigenvalue_bounds(K, f):
      clean, finite = gram_lib.clean_gram(K)
      return smea_module._eigenvalue_bounds(clean, finite, K.shape[0], f)
    # The bound itself: below every subset's exact (float64, d-space) top eigenvalue, and
    # close to it where the rows have structure (which is what makes the pruning pay).
    for index, (x, f) in enumerate(cases[:7]):
      n = x.shape[0]
      K = centred_gram(jnp.asarray(np.asarray(x, np.float32)))
      bounds = np.asarray(eigenvalue_bounds(K, f), np.float64)
      exact = []
      for kept in subsets.kept_sets(n, f):
        rows = np.asarray(x, np.float64)[kept]
        centred = rows - rows.mean(0)
        exact.append(np.linalg.eigvalsh(centred @ centred.T / len(kept))[-1])
      exact = np.array(exact)
      self.assertTrue(np.all(bounds <= exact), f"case {index}: {np.max(bounds / exact)}")
      if index < 3:
        self.assertGreater(np.median(bounds / exact), 0.8, f"case {index}")
    for dtype, chosen in ((np.float32, cases), (np.float64, cases[:1] + cases[5:6])):
      with jax.enable_x64(dtype == np.float64):
        for x, f in chosen:
          x = np.asarray(x, dtype)
          exhaustive, got = both(centred_gram(jnp.asarray(x)), f)
          np.testing.assert_array_equal(np.asarray(got), np.asarray(exhaustive),
                                        err_msg=f"{dtype.__name__} n={x.shape[0]}, f={f}")

  def test_bound_pruned_search_with_ties_and_nan_scores(self):
    # Integer scores with many ties and some NaN (never chosen), bounds anywhere below them:
    # the first minimum in kept-set order, as the exhaustive search finds it.
    n, f = 10, 3
    kept_sets = subsets.kept_sets(n, f)
    count = len(kept_sets)
    index_of = {tuple(k): i for i, k in enumerate(kept_sets.tolist())}
    lookup = jnp.asarray(np.array([index_of[tuple(k)] for k in kept_sets.tolist()]))
    masks = jnp.asarray(np.array([sum(1 << int(i) for i in k) for k in kept_sets]))

    # Jitted with the score table as an argument: one compilation per search variant for all
    # trials (op by op, each trial's closure compiled anew, ~30 s).
    @functools.partial(jax.jit, static_argnums=2)
    def searches(table, bounds, variant):
      def score(removed, kept):
        del removed
        # The subset's position in kept-set order, from its kept rows (a bitmask).
        mask = jnp.sum(jnp.left_shift(1, kept.astype(jnp.int32)))
        return table[lookup[jnp.argmax(masks == mask)]]
      if variant == "exhaustive":
        return subsets.best_subset(score, n, f, elements_per_subset=1)
      if variant == "one chunk":
        return subsets.best_subset_by_bound(score, bounds, n, f, elements_per_subset=1)
      if variant == "chunks of 7":   # first, second and many rest chunks, the last padded
        return subsets.best_subset_by_bound(score, bounds, n, f,
                                            elements_per_subset=2**20 // 7)
      # A score that takes a whole chunk of subsets ([c, f], [c, n - f] -> [c]).
      return subsets.best_subset_by_bound(
          lambda removed, kept: jnp.stack([score(r, k) for r, k in zip(removed, kept)]),
          bounds, n, f, elements_per_subset=1, batched=True)

    rng = np.random.default_rng(0)
    for trial in range(5):
      values = rng.integers(3, 9, size=count).astype(np.float32)
      values[rng.random(count) < 0.1] = np.nan
      bounds = values - rng.random(count).astype(np.float32) * 4 * (trial % 2)
      bounds[rng.random(count) < 0.05] = np.nan       # unknown bound: scored first
      table, bounds = jnp.asarray(values), jnp.asarray(bounds)
      expected = np.asarray(searches(table, bounds, "exhaustive"))
      for variant in ("one chunk", "chunks of 7", "batched"):
        np.testing.assert_array_equal(np.asarray(searches(table, bounds, variant)), expected,
                                      err_msg=f"trial {trial}, {variant}")
      first = np.nanargmin(np.where(np.isnan(values), np.inf, values))
      np.testing.assert_array_equal(np.flatnonzero(expected), kept_sets[first])

  def test_pair_sums_against_numpy(self):
    rng = np.random.default_rng(3)
    for n, f in ((5, 1), (9, 4), (12, 3)):
      first, second = np.triu_indices(n, 1)
      values = rng.integers(-5, 6, size=(len(first), 2)).astype(np.float32)
      expected = np.array([[values[p] for p in range(len(first))
                            if first[p] in kept and second[p] in kept]
                           for kept in map(set, subsets.kept_sets(n, f).tolist())]).sum(1)
      np.testing.assert_array_equal(np.asarray(subsets.pair_sums(jnp.asarray(values), n, f)),
                                    expected)

  def test_bounds_permutations_pytrees_vmap_and_shards(self):
    for rule in (rules.caf, rules.smea):
      with self.assertRaisesRegex(ValueError, f"{rule.__name__} needs n > 2\\*f"):
        rule(np.zeros((6, 3), np.float32), 3)
    with self.assertRaisesRegex(ValueError, "smea needs C\\(n, f\\) <= 100000 subsets"):
      rules.smea(np.zeros((60, 2), np.float32), 5)
    with self.assertRaisesRegex(ValueError, "caf needs max_iters >= 1"):
      rules.caf(np.zeros((6, 3), np.float32), 1, max_iters=0)
    x = spread_rows(5, 10, 16, 3).astype(np.float32)
    perm = np.random.default_rng(1).permutation(10)
    for eager in (rules.caf, rules.smea):
      rule = jax.jit(eager, static_argnums=1)      # one compilation, not one per operation
      expected = np.asarray(rule(x, 3))
      np.testing.assert_allclose(rule(x[perm], 3), expected, rtol=1e-4, atol=1e-4)
      tree = {"a": x[:, :8], "b": x[:, 8:].reshape(10, 4, 2)}
      out = rule(tree, 3)
      np.testing.assert_allclose(np.concatenate([out["a"], out["b"].reshape(8)]), expected,
                                 rtol=1e-4, atol=1e-4)
      batched = jax.jit(jax.vmap(lambda rows: eager(rows, 3)))(np.stack([x, x[perm]]))
      np.testing.assert_allclose(batched, np.stack([expected, expected]), rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(helpers.run_coordinate_sharded(eager, x, f=3), expected,
                                 rtol=1e-4, atol=1e-4)

  def test_far_away_rows_leave_the_output_near_the_honest_mean(self):
    # Bound tested: |rule - mean(honest)| <= 2 max_i |x_i - mean(honest)| / sqrt(n - f)... in
    # practice far smaller; we assert it is below the honest rows' own spread, while the plain
    # mean moves by about f / n * 500.
    x = spread_rows(7, 12, 30, 3, distance=500.0).astype(np.float32)
    honest = x[:9].mean(0)
    spread = np.linalg.norm(x[:9] - honest, axis=1).max()
    self.assertGreater(np.linalg.norm(x.mean(0) - honest), 10 * spread)
    for rule in (rules.caf, rules.smea):
      self.assertLess(np.linalg.norm(np.asarray(rule(x, 3)) - honest), spread, rule.__name__)

  def test_smea_differentiates_as_its_mean(self):
    # The subset is a discrete choice, so d/dx_i of sum(smea(x)) is 1/(n - f) on the chosen
    # rows and 0 elsewhere (the eigenvalue search carries no derivative); under vmap too.
    x = spread_rows(3, 10, 6, 3, distance=50.0).astype(np.float32)
    grad = np.asarray(jax.grad(lambda x: rules.smea(x, 3).sum())(x))
    chosen = np.zeros(10, bool)
    chosen[:7] = True                       # spread_rows puts the f far rows last
    np.testing.assert_allclose(grad, np.where(chosen, 1 / 7, 0)[:, None] * np.ones((1, 6)),
                               rtol=1e-6)
    batched = jax.vmap(jax.grad(lambda x: rules.smea(x, 3).sum()))(np.stack([x, x[::-1]]))
    np.testing.assert_allclose(batched[1], grad[::-1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# DnC and SignGuard: a random coordinate subset, the same on shards.


class SamplingTest(parameterized.TestCase):

  @parameterized.parameters((1000, 37), (64, 64), (10, 50), (1001, 1000))
  def test_stratified_indices_one_per_block(self, d, s):
    indices = np.asarray(sampling.stratified_indices(jax.random.key(0), d, s))
    if s >= d:
      np.testing.assert_array_equal(indices, np.arange(d))
      return
    starts = np.arange(s + 1) * d // s
    self.assertEqual(indices.shape, (s,))
    self.assertTrue(((indices >= starts[:-1]) & (indices < starts[1:])).all())

  def test_every_coordinate_equally_likely(self):
    # 2000 draws of 5 of 20 coordinates: each coordinate's frequency near 1/4.
    keys = jax.random.split(jax.random.key(3), 2000)
    draws = jax.vmap(lambda k: sampling.stratified_indices(k, 20, 5))(keys)
    frequency = np.bincount(np.asarray(draws).ravel(), minlength=20) / 2000
    np.testing.assert_allclose(frequency, 0.25, atol=0.05)


class DncTest(parameterized.TestCase):

  def test_against_numpy_svd_on_the_same_subsets(self):
    x = spread_rows(11, 11, 40, 3, distance=3.0)
    key = jax.random.key(5)
    kept = set(range(11))
    for iteration_key in jax.random.split(key, 4):
      columns = np.asarray(sampling.stratified_indices(iteration_key, 40, 16))
      kept &= np_dnc_kept(x[:, columns], 3)
    expected = x[sorted(kept)].mean(0)
    with jax.enable_x64(True):
      got = rules.dnc(jnp.asarray(x), 3, key, num_iters=4, subsample_size=16)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    # Every coordinate (subsample_size >= d): deterministic, any key.
    full = np_dnc_kept(x, 3, filter_fraction=1.5)
    got = rules.dnc(x.astype(np.float32), 3, jax.random.key(9), subsample_size=100,
                          filter_fraction=1.5)
    np.testing.assert_allclose(got, x[sorted(full)].mean(0), rtol=1e-5, atol=1e-5)

  def test_nonfinite_ties_bounds_pytrees_and_shards(self):
    x = helpers.tied_rows(2, 10, 32)
    key = jax.random.key(1)
    bad = helpers.poison(x, rows=[3, 8])
    out = np.asarray(rules.dnc(bad, 2, key, subsample_size=8))
    self.assertTrue(np.isfinite(out).all())
    self.assertTrue(np.isnan(rules.dnc(helpers.poison(x, rows=[1, 3, 8]), 2, key,
                                       subsample_size=8)).all())
    with self.assertRaisesRegex(ValueError, "dnc needs n > 2\\*f"):
      rules.dnc(x, 5, key)
    with self.assertRaisesRegex(ValueError, "dnc needs a jax.random key"):
      rules.dnc(x, 2, None)
    with self.assertRaisesRegex(ValueError, "dnc needs subsample_size >= 1"):
      rules.dnc(x, 2, key, subsample_size=0)
    y = spread_rows(4, 10, 64, 2).astype(np.float32)
    expected = np.asarray(rules.dnc(y, 2, key, subsample_size=24))
    tree = {"a": y[:, :24], "b": y[:, 24:].reshape(10, 5, 8)}
    out = rules.dnc(tree, 2, key, subsample_size=24)
    np.testing.assert_allclose(np.concatenate([out["a"], out["b"].reshape(40)]), expected,
                               rtol=1e-5, atol=1e-5)
    sharded = helpers.run_coordinate_sharded(rules.dnc, y, f=2, key=key,
                                             subsample_size=24)
    np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-5)
    perm = np.random.default_rng(0).permutation(10)
    # Row order does not change which coordinates are read, so the kept set is permuted too.
    np.testing.assert_allclose(rules.dnc(y[perm], 2, key, subsample_size=24), expected,
                               rtol=1e-5, atol=1e-5)

  def test_far_away_rows_are_dropped(self):
    x = spread_rows(8, 16, 2000, 4, distance=20.0).astype(np.float32)
    honest = x[:12].mean(0)
    spread = np.linalg.norm(x[:12] - honest, axis=1).max()
    keys = jax.random.split(jax.random.key(0), 2)
    out = jax.jit(jax.vmap(lambda k: aggregators.dnc(x, 4, k, subsample_size=200)))(keys)
    for row in np.asarray(out):      # vmap over keys: each draw drops the far rows
      self.assertLess(np.linalg.norm(row - honest), spread / 2)


  def test_a_large_common_offset_keeps_the_scores_digits(self):
    """Honest rows at 1e4 + 1e-3 noise and two Byzantine rows 1.0 away from two of them
    (d = 40, float32): the float64 numpy oracle drops the two; with the plain Gram of the
    subsample (|x|^2 ~ 4e9, float32 spacing ~500 against score gaps ~1) DnC kept them. Their
    pull on the mean is 2/12 = 0.17 per coordinate; the tolerance 0.02 is float32 rounding of
    means near 1e4 (spacing 1e-3)."""
    rng = np.random.default_rng(7)
    honest = 1e4 + 1e-3 * rng.normal(size=(10, 40))
    x = np.concatenate([honest, honest[:2] + 1.0]).astype(np.float32)
    kept = np_dnc_kept(x.astype(np.float64), 2)
    self.assertEqual(kept, set(range(10)))
    dnc = jax.jit(rules.dnc, static_argnums=1, static_argnames="subsample_size")
    for key in jax.random.split(jax.random.key(3), 3):
      got = dnc(jnp.asarray(x), 2, key, subsample_size=100)
      np.testing.assert_allclose(got, x[:10].astype(np.float64).mean(0), rtol=0, atol=2e-2)
      # Coordinate shards pick the same reference row from the psum-ed norms.
      sharded = helpers.run_coordinate_sharded(rules.dnc, x, f=2, key=key, subsample_size=16)
      expected = dnc(jnp.asarray(x), 2, key, subsample_size=16)
      np.testing.assert_allclose(sharded, expected, rtol=0, atol=2e-2)
      np.testing.assert_allclose(expected, x[:10].astype(np.float64).mean(0), rtol=0, atol=2e-2)


class SignGuardTest(parameterized.TestCase):

  def _rows(self, seed=0):
    # 9 honest rows (about half their coordinates positive), 3 sign-flipped Byzantine rows
    # with most coordinates negative, 1 row 10x too long.
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=(9, 400)) + rng.uniform(-0.05, 0.05, size=(9, 1))
    flipped = -np.abs(rng.normal(size=(3, 400)))
    long = 10 * rng.normal(size=(1, 400))
    return np.concatenate([honest, flipped, long]).astype(np.float32)

  def test_against_sklearn_mean_shift_and_the_norm_filter(self):
    x = self._rows()
    norms = np.linalg.norm(x, axis=1)
    median = np.median(norms)
    signs = np.stack([(x > 0).mean(1), (x == 0).mean(1), (x < 0).mean(1)], 1)
    features = signs / signs.max(0).clip(1e-30)
    bandwidth = sk_cluster.estimate_bandwidth(features, quantile=0.5)
    labels = sk_cluster.MeanShift(bandwidth=bandwidth, cluster_all=False).fit(features).labels_
    largest = labels == np.argmax(np.bincount(labels[labels >= 0]))
    chosen = largest & (norms >= 0.1 * median) & (norms <= 3.0 * median)
    np.testing.assert_array_equal(np.flatnonzero(chosen), np.arange(9))
    expected = (x[chosen] * np.minimum(1, median / norms[chosen])[:, None]).mean(0)
    got = rules.signguard(x, jax.random.key(0), coordinate_fraction=1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(2).permutation(13)
    np.testing.assert_allclose(rules.signguard(x[perm], jax.random.key(0),
                                               coordinate_fraction=1.0), expected, rtol=1e-5,
                               atol=1e-6)

  def test_mean_shift_core_matches_sklearn(self):
    rng = np.random.default_rng(4)
    points = np.concatenate([rng.normal(0, 0.05, (7, 3)), rng.normal(1, 0.05, (4, 3)),
                             [[3.0, 3.0, 3.0]]]).astype(np.float32)
    active = np.ones(12, bool)
    bandwidth = sk_cluster.estimate_bandwidth(points, quantile=0.3)
    np.testing.assert_allclose(clustering.mean_shift_bandwidth(points, active, 0.3), bandwidth,
                               rtol=1e-5)
    labels = sk_cluster.MeanShift(bandwidth=bandwidth, cluster_all=False).fit(points).labels_
    largest = labels == np.argmax(np.bincount(labels[labels >= 0]))
    np.testing.assert_array_equal(clustering.largest_mean_shift_cluster(points, active), largest)
    # An inactive point is in no cluster and does not move the others.
    active[0] = False
    got = np.asarray(clustering.largest_mean_shift_cluster(points, active))
    self.assertFalse(got[0])

  def test_nonfinite_zero_median_bounds_shards_and_vmap(self):
    x = self._rows(1)
    key = jax.random.key(2)
    bad = helpers.poison(x, rows=[0, 4, 9, 10, 11])          # any number of NaN/Inf rows
    self.assertTrue(np.isfinite(rules.signguard(bad, key)).all())
    self.assertTrue(np.isnan(rules.signguard(helpers.poison(x, rows=range(13)), key)).all())
    zeros = np.zeros_like(x)
    zeros[:2] = x[:2]
    np.testing.assert_array_equal(rules.signguard(zeros, key), 0)
    with self.assertRaisesRegex(ValueError, "signguard needs lower <= upper"):
      rules.signguard(x, key, lower=2.0, upper=1.0)
    with self.assertRaisesRegex(ValueError, "signguard needs coordinate_fraction > 0"):
      rules.signguard(x, key, coordinate_fraction=0.0)
    expected = np.asarray(rules.signguard(x, key, coordinate_fraction=0.25))
    sharded = helpers.run_coordinate_sharded(rules.signguard, x, key=key,
                                             coordinate_fraction=0.25)
    np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-6)
    batched = jax.jit(jax.vmap(lambda rows: rules.signguard(rows, key)))(np.stack([x, x]))
    np.testing.assert_allclose(batched[1], rules.signguard(x, key), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Clipped Clustering and FLTrust: Gram space (with the server's update).


class ClippedClusteringTest(parameterized.TestCase):

  def test_against_scipy_average_linkage(self):
    rng = np.random.default_rng(6)
    direction = rng.normal(size=20)
    honest = direction + 0.3 * rng.normal(size=(8, 20))
    honest *= rng.uniform(0.5, 2.0, size=(8, 1))
    byzantine = -direction + 0.3 * rng.normal(size=(4, 20))
    x = np.concatenate([honest, 5 * byzantine])
    group = np_average_linkage_larger_group(x)
    np.testing.assert_array_equal(np.flatnonzero(group), np.arange(8))
    norms = np.linalg.norm(x, axis=1)
    tau = np.median(norms)
    expected = (x[group] * np.minimum(1, tau / norms[group])[:, None]).mean(0)
    np.testing.assert_allclose(rules.clipped_clustering(x.astype(np.float32)), expected,
                               rtol=1e-5, atol=1e-5)
    fixed = (x[group] * np.minimum(1, 0.5 / norms[group])[:, None]).mean(0)
    np.testing.assert_allclose(rules.clipped_clustering(x.astype(np.float32), tau=0.5),
                               fixed, rtol=1e-5, atol=1e-6)
    perm = rng.permutation(12)
    np.testing.assert_allclose(rules.clipped_clustering(x[perm].astype(np.float32)),
                               expected, rtol=1e-5, atol=1e-5)
    batched = jax.vmap(rules.clipped_clustering)(np.stack([x, x[perm]]).astype(np.float32))
    np.testing.assert_allclose(batched, np.stack([expected, expected]), rtol=1e-5, atol=1e-5)

  def test_core_matches_scipy_on_random_distances(self):
    rng = np.random.default_rng(8)
    for n in (3, 7, 11):
      points = rng.normal(size=(n, 4))
      distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
      labels = hierarchy.fcluster(hierarchy.linkage(distances[np.triu_indices(n, 1)],
                                                    method="average"), 2, "maxclust")
      sizes = np.bincount(labels)
      larger = labels == (np.argmax(sizes) if sizes.max() * 2 != n else labels[0])
      got = jax.jit(clustering.largest_agglomerative_group)(
          jnp.asarray(distances, jnp.float32), jnp.ones(n, bool))
      np.testing.assert_array_equal(got, larger, err_msg=f"n={n}")

  def test_core_matches_a_numpy_loop_with_ties_and_inactive_rows(self):
    # The oracle merges the least pair i < j of alive groups (ties: lowest i, then lowest j)
    # with the Lance-Williams average (times the reciprocal of the merged size, as the code
    # writes it), as the docstring states; the inputs are small-integer
    # distances (many exact ties), duplicated points and inactive rows, at sizes up to 90.
    def np_larger_group(distances, active):
      n = len(distances)
      linkage = distances.astype(np.float64).copy()
      sizes = active.astype(np.float64)
      alive, label = active.copy(), np.arange(n)
      while alive.sum() > 2:
        pairs = [(linkage[i, j], i, j) for i in range(n) for j in range(i + 1, n)
                 if alive[i] and alive[j]]
        _, i, j = min(pairs)
        row = (sizes[i] * linkage[i] + sizes[j] * linkage[j]) * (1 / (sizes[i] + sizes[j]))
        linkage[i, :], linkage[:, i] = row, row
        sizes[i], sizes[j], alive[j] = sizes[i] + sizes[j], 0, False
        label[label == j] = i
      winner = np.argmax(np.where(alive, sizes, -1))
      return active & (label == winner)

    rng = np.random.default_rng(11)
    for n in (1, 2, 3, 6, 17, 40, 90):
      points = rng.integers(0, 4, size=(n, 2))
      points[n // 2:n // 2 + 2] = points[0]
      distances = np.abs(points[:, None] - points[None]).sum(-1).astype(np.float64)
      active = rng.random(n) > 0.15
      with jax.enable_x64(True):
        got = jax.jit(clustering.largest_agglomerative_group)(jnp.asarray(distances),
                                                              jnp.asarray(active))
      np.testing.assert_array_equal(got, np_larger_group(distances, active), err_msg=f"n={n}")

  def test_nonfinite_zero_rows_pytrees_and_shards(self):
    x = spread_rows(9, 10, 16, 3, distance=2.0).astype(np.float32)
    expected = np.asarray(rules.clipped_clustering(x))
    bad = np.concatenate([x, helpers.poison(x[:4], rows=range(4))])   # more NaN rows than f
    np.testing.assert_allclose(rules.clipped_clustering(bad), expected, rtol=1e-5,
                               atol=1e-6)
    self.assertTrue(np.isnan(rules.clipped_clustering(helpers.poison(x, range(10)))).all())
    with_zero = np.concatenate([x, np.zeros((1, 16), np.float32)])
    self.assertTrue(np.isfinite(rules.clipped_clustering(with_zero)).all())
    tree = {"a": x[:, :8], "b": x[:, 8:].reshape(10, 2, 4)}
    out = rules.clipped_clustering(tree)
    np.testing.assert_allclose(np.concatenate([out["a"], out["b"].reshape(8)]), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(helpers.run_coordinate_sharded(rules.clipped_clustering, x),
                               expected, rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "clipped_clustering needs tau > 0"):
      rules.clipped_clustering(x, tau=0.0)


class FLTrustTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_against_the_formula(self):
    fn = self.variant(rules.fltrust)
    x = helpers.tied_rows(12, 8, 10)
    x[2] = 0.0                                     # a zero row gets no trust
    g0 = np.random.default_rng(0).normal(size=10).astype(np.float32) + 1.0
    usable = np.linalg.norm(x, axis=1) > 0
    expected = np_fltrust(x[usable], g0)
    chex.assert_trees_all_close(fn(x, g0), expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    # Every row against g0: zero update (the paper), not a uniform fallback.
    np.testing.assert_array_equal(fn(-np.abs(x) - 1, np.abs(g0)), 0)

  def test_nonfinite_huge_pytrees_shards_vmap(self):
    x = helpers.random_rows(3, 9, 16)
    g0 = x[:5].mean(0)
    expected = np_fltrust(x, g0)
    bad = helpers.poison(x, rows=[0, 1, 2, 3, 4, 5])    # any number of NaN/Inf rows
    np.testing.assert_allclose(rules.fltrust(bad, g0), np_fltrust(x[6:], g0), rtol=1e-5,
                               atol=1e-6)
    big = x.copy()
    big[7] = 1e30 * np.sign(g0)                          # trusted, but rescaled to |g0|
    np.testing.assert_allclose(rules.fltrust(big, g0),
                               np_fltrust(np.where(np.arange(9)[:, None] == 7, np.sign(g0), x),
                                          g0), rtol=1e-4, atol=1e-5)
    self.assertTrue(np.isnan(rules.fltrust(x, g0 * np.nan)).all())
    tree = {"a": x[:, :8], "b": x[:, 8:].reshape(9, 2, 4)}
    out = rules.fltrust(tree, {"a": g0[:8], "b": g0[8:].reshape(2, 4)})
    np.testing.assert_allclose(np.concatenate([out["a"], out["b"].reshape(8)]), expected,
                               rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "fltrust needs server_update shaped like"):
      rules.fltrust(x, g0[:3])
    mesh = helpers.coordinate_mesh()
    P = jax.sharding.PartitionSpec
    sharded = jax.jit(jax.shard_map(
        lambda rows, g: rules.fltrust(rows, g, axis_name="coords"), mesh=mesh,
        in_specs=(P(None, "coords"), P("coords")), out_specs=P("coords")))(x, g0)
    np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(1).permutation(9)
    batched = jax.vmap(rules.fltrust, in_axes=(0, None))(np.stack([x, x[perm]]), g0)
    np.testing.assert_allclose(batched, np.stack([expected, expected]), rtol=1e-5, atol=1e-6)
    # Robustness: f rows against g0, however long, get no trust at all.
    attacked = np.concatenate([x, -100 * np.tile(g0, (3, 1))])
    np.testing.assert_allclose(rules.fltrust(attacked, g0), expected, rtol=1e-5,
                               atol=1e-6)
