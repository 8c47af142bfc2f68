"""Gram-space rules (geometric median, centered clipping, MDA, MoNNA) against numpy oracles.

Every oracle is written in coordinate space (d-space) from the DESIGN.md definition, never in
Gram space, so the tests also check the Gram-space algebra of the rules.
"""

import importlib
import itertools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from flagjax import aggregators
from flagjax.core import gram as gram_lib
from tests import helpers
from tests.helpers import finite_mask
from tests.helpers import np_sq_distances

# The package re-exports each rule under its module's name, so reach the modules directly.
cc_lib = importlib.import_module("flagjax.aggregators.centered_clipping")
gm_lib = importlib.import_module("flagjax.aggregators.geometric_median")
mda_lib = importlib.import_module("flagjax.aggregators.mda")
monna_lib = importlib.import_module("flagjax.aggregators.monna")


# ----------------------------------------------------------------------------- numpy oracles


def np_weiszfeld(x, max_iters=100, tol=1e-6, nu=1e-8):
  """Weiszfeld with Vardi-Zhang's step at a row, from the medoid, in d-space (float64).

  Stops when ``|z' - z| <= tol * max(|z'|, median_i |x_i - z|)``; the rule measures ``|z'|``
  from its centring reference instead, so comparisons at a finite ``tol`` use a tight one.
  """
  x = np.asarray(x, np.float64)
  x = x[finite_mask(x)]
  pairwise = np.linalg.norm(x[:, None] - x[None], axis=-1)
  z = x[np.argmin(pairwise.sum(1))]
  for _ in range(max_iters):
    d = np.linalg.norm(x - z, axis=1)
    coincident = d <= max(nu, 1e-12 * (1 + np.linalg.norm(z)))
    w = np.where(coincident, 0, 1 / np.maximum(d, nu))
    if w.sum() == 0:
      break
    target = (w[:, None] * x).sum(0) / w.sum()
    pull = w.sum() * np.linalg.norm(target - z)
    count = coincident.sum()
    stay = 0.0 if count == 0 else (1.0 if pull == 0 else min(1.0, count / pull))
    new = (1 - stay) * target + stay * z
    done = np.linalg.norm(new - z) <= tol * max(np.linalg.norm(new), np.median(d))
    z = new
    if done:
      break
  return z


def np_centered_clipping(x, center=None, tau=10.0, num_iters=3):
  """v <- v + mean_i (x_i - v) min(1, tau / |x_i - v|); non-finite rows contribute 0."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  keep = finite_mask(x)
  v = np.zeros(x.shape[1:]) if center is None else np.asarray(center, np.float64)
  for _ in range(num_iters):
    step = np.zeros_like(v)
    for i in range(n):
      if keep[i]:
        diff = x[i] - v
        dist = np.linalg.norm(diff)
        step += diff * (min(1.0, tau / dist) if dist > 0 else 1.0)
    v = v + step / n
  return v


def np_mda(x, f):
  """(mean of the n-f rows of least diameter, whether that subset is the unique minimiser).

  Ties go to the lowest lexicographic subset (itertools order, first strict minimum).
  """
  n = x.shape[0]
  D = np_sq_distances(x)
  subsets = list(itertools.combinations(range(n), n - f))
  diameters = np.array([D[np.ix_(s, s)].max() for s in subsets])
  best = int(np.argmin(diameters))
  unique = np.sum(diameters == diameters[best]) == 1
  return np.asarray(x, np.float64)[list(subsets[best])].mean(0), unique


def np_monna(x, f, idx=0):
  n = x.shape[0]
  order = np.argsort(np_sq_distances(x)[idx], kind="stable")
  return np.asarray(x, np.float64)[order[:n - f]].mean(0)


def random_rotation(seed, d):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q * np.sign(np.diag(r))


# ------------------------------------------------------------------- shared compiled rules
# Module-level jitted rules: every test that reuses the standard shape (N, D) and these
# hyperparameters hits the compilation cache instead of compiling again.

N, D, F = 9, 8, 3
TAU = 1.0
GM = jax.jit(aggregators.geometric_median, static_argnames=("max_iters", "tol", "nu"))
# max_iters and tol traced: one compilation serves every stopping rule.
GM_TRACED = jax.jit(lambda x, max_iters, tol: aggregators.geometric_median(
    x, max_iters=max_iters, tol=tol))
CC = jax.jit(aggregators.centered_clipping, static_argnames=("tau", "num_iters"))
MDA = jax.jit(aggregators.mda, static_argnames=("f",))
MONNA = jax.jit(aggregators.monna, static_argnames=("f", "idx"))

STANDARD_RULES = {
    "geometric_median": (lambda x, c: GM(x, max_iters=1000, tol=1e-12),
                         lambda x, c: np_weiszfeld(x, 5000, 1e-14)),
    "centered_clipping": (lambda x, c: CC(x, c, tau=TAU),
                          lambda x, c: np_centered_clipping(x, c, tau=TAU)),
    "mda": (lambda x, c: MDA(x, f=F), lambda x, c: np_mda(x, F)[0]),
    "monna": (lambda x, c: MONNA(x, f=F, idx=2), lambda x, c: np_monna(x, F, 2)),
}


def standard_rows(seed, dtype=np.float32):
  x = helpers.random_rows(seed, N, D, dtype)
  x[1] *= 4.0   # an outlier, so that the selections are not trivial
  return x


def standard_center(seed, dtype=np.float32):
  return helpers.random_rows(seed, 1, D, dtype)[0]


# ------------------------------------------------------------------------------- unit tests

class GramRulesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_against_numpy(self):
    x, center = standard_rows(0), standard_center(1)
    fixed = self.variant(lambda x: aggregators.geometric_median(x, max_iters=30, tol=0.0))(x)
    chex.assert_shape(fixed, (D,))
    chex.assert_trees_all_close(fixed, np_weiszfeld(x, 30, 0.0), rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(self.variant(aggregators.geometric_median)(x),
                                np_weiszfeld(x), rtol=1e-4, atol=1e-4)
    cc = self.variant(lambda x, c: aggregators.centered_clipping(x, c, tau=TAU))
    chex.assert_trees_all_close(cc(x, center), np_centered_clipping(x, center, tau=TAU),
                                rtol=1e-5, atol=1e-5)
    cc0 = self.variant(lambda x: aggregators.centered_clipping(x, tau=TAU, num_iters=5))
    chex.assert_trees_all_close(cc0(x), np_centered_clipping(x, None, TAU, 5),
                                rtol=1e-5, atol=1e-5)
    mda = self.variant(aggregators.mda, static_argnums=1)(x, F)
    chex.assert_trees_all_close(mda, np_mda(x, F)[0], rtol=1e-5, atol=1e-6)
    monna = self.variant(aggregators.monna, static_argnums=(1, 2))(x, F, 5)
    chex.assert_trees_all_close(monna, np_monna(x, F, 5), rtol=1e-5, atol=1e-6)

  def test_small_and_edge_cases_against_numpy(self):
    for n, f in [(3, 1), (5, 0), (6, 1), (1, 0)]:
      x = helpers.random_rows(10 + n, n, 5)
      np.testing.assert_allclose(MDA(x, f=f), np_mda(x, f)[0], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(MONNA(x, f=f, idx=n - 1), np_monna(x, f, n - 1),
                                 rtol=1e-5, atol=1e-6)

  def test_geometric_median_objective_decreases_and_beats_rows(self):
    x = standard_rows(3)
    x[:3] += 20.0   # a cluster far away pulls the mean, not the median
    objective = lambda z: np.linalg.norm(x - np.asarray(z, np.float64), axis=1).sum()
    values = [objective(GM_TRACED(x, k, 0.0)) for k in range(6)]
    self.assertTrue(np.all(np.diff(values) <= 1e-5 * values[0]), values)
    self.assertLess(values[-1], values[0])
    medoid = x[np.argmin(np.linalg.norm(x[:, None] - x[None], axis=-1).sum(1))]
    np.testing.assert_allclose(GM_TRACED(x, 0, 0.0), medoid, rtol=1e-5, atol=1e-6)
    best = objective(GM_TRACED(x, 100, 1e-6))
    self.assertLessEqual(best, min(objective(row) for row in x))

  def test_geometric_median_stopping_rule(self):
    x = standard_rows(4)
    loose = GM_TRACED(x, 100, 0.1)
    converged = np_weiszfeld(x, 5000, 0.0)
    self.assertFalse(np.allclose(loose, converged, atol=1e-5))
    objective = lambda z: np.linalg.norm(x - np.asarray(z, np.float64), axis=1).sum()
    self.assertLess(objective(loose), objective(np_weiszfeld(x, 0, 0.0)))
    np.testing.assert_allclose(GM_TRACED(x, 7, 0.0), np_weiszfeld(x, 7, 0.0),
                               rtol=1e-5, atol=1e-6)

  def test_centered_clipping_limits(self):
    x, center = standard_rows(5), standard_center(6)
    # tau = inf: one step from any centre lands on the mean; zero steps stay at the centre.
    np.testing.assert_allclose(CC(x, center, tau=np.inf, num_iters=1), x.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(CC(x, center, tau=TAU, num_iters=0), center)
    # Each step moves the centre by at most tau.
    prev = center
    for k in range(1, 4):
      out = CC(x, center, tau=TAU, num_iters=k)
      self.assertLessEqual(np.linalg.norm(out - prev), TAU * (1 + 1e-5))
      prev = out

  def test_mda_ties_go_to_lowest_lexicographic_subset(self):
    # Four corners of a unit square: every 3-subset has squared diameter 2 (a diagonal).
    x = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    chex.assert_trees_all_close(MDA(x, f=1), x[:3].mean(0))
    chex.assert_trees_all_close(MDA(x, f=1), np_mda(x, 1)[0])

  def test_coefficients_match_rules(self):
    x, center = standard_rows(30), standard_center(31)
    K = gram_lib.gram(x)
    coefficients = jax.jit(lambda K: {
        "geometric_median": gm_lib.geometric_median_coefficients(K),
        "mda": mda_lib.mda_coefficients(K, F),
        "monna": monna_lib.monna_coefficients(K, F, 2)})(K)
    for name, c in coefficients.items():
      chex.assert_shape(c, (N,))
      np.testing.assert_allclose(np.sum(c), 1.0, rtol=1e-6)
      self.assertTrue(np.all(np.asarray(c) >= 0))
      np.testing.assert_allclose(np.asarray(c) @ x, STANDARD_RULES[name][0](x, center),
                                 rtol=1e-5, atol=1e-6, err_msg=name)
    c = cc_lib.centered_clipping_coefficients(gram_lib.gram(x, extra=center), tau=TAU,
                                              num_iters=3)
    chex.assert_shape(c, (N + 1,))
    np.testing.assert_allclose(np.asarray(c) @ np.vstack([x, center[None]]),
                               CC(x, center, tau=TAU), rtol=1e-5, atol=1e-6)

  def test_pytree_equals_concatenated_leaves(self):
    tree = {"w": helpers.random_rows(40, N, 12).reshape(N, 3, 4),
            "b": helpers.random_rows(41, N, 2)}
    tree["w"][0] += 5.0
    flat = np.concatenate([tree["w"].reshape(N, -1), tree["b"]], axis=1)
    center = {"w": np.ones((3, 4), np.float32), "b": np.zeros((2,), np.float32)}
    flat_center = np.concatenate([center["w"].ravel(), center["b"]])
    for name, (rule, oracle) in STANDARD_RULES.items():
      out = rule(tree, center)
      chex.assert_shape([out["w"], out["b"]], [(3, 4), (2,)])
      got = np.concatenate([np.ravel(out["w"]), out["b"]])
      np.testing.assert_allclose(got, oracle(flat, flat_center), rtol=1e-4, atol=1e-5,
                                 err_msg=name)

  def test_vmap_over_batch(self):
    x = np.stack([standard_rows(50 + s) for s in range(3)])
    x[0, 2:] = 1.0   # identical rows: this member converges at once, the others iterate
    center = helpers.random_rows(60, 3, D)
    for name, (rule, oracle) in STANDARD_RULES.items():
      out = jax.vmap(rule)(x, center)
      ref = np.stack([oracle(b, c) for b, c in zip(x, center)])
      np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=name)

  def test_bfloat16_and_float64(self):
    x, center = standard_rows(80), standard_center(81)
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    cb = np.asarray(jnp.asarray(center, jnp.bfloat16), np.float32)
    for name, (rule, oracle) in STANDARD_RULES.items():
      # Jitted: eager calls compile every op of the rule apart.
      out = jax.jit(rule)(jnp.asarray(x, jnp.bfloat16), jnp.asarray(center, jnp.bfloat16))
      self.assertEqual(out.dtype, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(out, np.float32), oracle(xb, cb), rtol=2e-2,
                                 atol=2e-2, err_msg=name)
    with jax.enable_x64(True):
      x64, c64 = standard_rows(82, np.float64), standard_center(83, np.float64)
      for name, (rule, oracle) in STANDARD_RULES.items():
        out = jax.jit(rule)(x64, c64)
        self.assertEqual(out.dtype, jnp.float64)
        np.testing.assert_allclose(out, oracle(x64, c64), rtol=1e-6, atol=1e-8, err_msg=name)
      np.testing.assert_allclose(GM_TRACED(x64, 200, 0.0), np_weiszfeld(x64, 200, 0.0),
                                 rtol=1e-10)

  def test_bounds(self):
    x = helpers.random_rows(0, 6, 3)
    with self.assertRaisesRegex(ValueError, r"mda needs n > 2\*f, got n=6, f=3"):
      aggregators.mda(x, 3)
    with self.assertRaisesRegex(ValueError, r"monna needs n > 2\*f, got n=6, f=3"):
      aggregators.monna(x, 3)
    with self.assertRaisesRegex(ValueError, r"monna needs 0 <= idx < n, got n=6, idx=6"):
      aggregators.monna(x, 1, 6)
    with self.assertRaisesRegex(ValueError, "mda needs f >= 0"):
      aggregators.mda(x, -1)
    with self.assertRaisesRegex(ValueError, "monna needs f"):
      aggregators.monna(x, 1.5)
    # C(40, 6) = 3838380 subsets: refused at trace time, before any work.
    big = jax.ShapeDtypeStruct((40, 3), jnp.float32)
    with self.assertRaisesRegex(
        ValueError, r"mda needs C\(n, f\) <= 100000 subsets, got n=40, f=6"):
      jax.eval_shape(lambda x: aggregators.mda(x, 6), big)
    self.assertEqual(jax.eval_shape(lambda x: aggregators.mda(x, 4), big).shape, (3,))

  def test_nonfinite_rows_do_not_leak(self):
    bad_rows = [0, 2, 8]   # row 2 is MoNNA's reference: the first finite row stands in
    x, center = standard_rows(90), standard_center(91)
    bad = helpers.poison(x, rows=bad_rows)
    honest = np.delete(x, bad_rows, axis=0)
    expected = {"geometric_median": np_weiszfeld(honest),
                "centered_clipping": np_centered_clipping(bad, center, tau=TAU),
                "mda": honest.mean(0), "monna": honest.mean(0)}
    for name, (rule, _) in STANDARD_RULES.items():
      out = rule(bad, center)
      self.assertTrue(np.all(np.isfinite(out)), name)
      np.testing.assert_allclose(out, expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # A non-finite (trusted) centre shows in the output instead of being hidden.
    self.assertFalse(np.all(np.isfinite(CC(x, np.full(D, np.nan, np.float32), tau=TAU))))

  def test_geometric_median_with_a_minority_of_huge_rows(self):
    x = standard_rows(92)
    x[:4] = 1e6   # 4 of 9 rows far away: below the breakdown point 1/2
    out = GM(x)
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertLess(np.linalg.norm(out - x[4:].mean(0)), 5.0)

  def test_invariances(self):
    with jax.enable_x64(True):
      x, center = standard_rows(101, np.float64), standard_center(105, np.float64)
      perm = np.random.default_rng(102).permutation(N)
      shift = 3.0 * standard_center(103, np.float64)
      Q = random_rotation(104, D)
      self.assertTrue(np_mda(x, F)[1])   # a unique minimiser, so MDA is permutation invariant
      rules = {name: rule for name, (rule, _) in STANDARD_RULES.items()}
      # A fixed number of steps: the relative stopping rule is not translation invariant.
      rules["geometric_median"] = lambda x, c: GM_TRACED(x, 50, 0.0)
      for name, rule in rules.items():
        out = np.asarray(rule(x, center))
        # Rotation equivariance: rule(x Q) = rule(x) Q (Gram-space rules see only K).
        np.testing.assert_allclose(rule(x @ Q, center @ Q), out @ Q, rtol=1e-8, atol=1e-9,
                                   err_msg=name)
        # Translation equivariance (centered clipping: the centre moves too).
        np.testing.assert_allclose(rule(x + shift, center + shift), out + shift,
                                   rtol=1e-8, atol=1e-8, err_msg=name)
        if name != "monna":
          np.testing.assert_allclose(rule(x[perm], center), out, rtol=1e-8, atol=1e-9,
                                     err_msg=name)
      # MoNNA is permutation invariant once its reference row moves with it.
      np.testing.assert_allclose(MONNA(x[perm], f=F, idx=int(np.argsort(perm)[2])),
                                 STANDARD_RULES["monna"][0](x, center), rtol=1e-8, atol=1e-9)

  def test_coordinate_sharded_matches_unsharded(self):
    # All rules in one shard_map (one compilation); the centre travels as a [1, D] leaf so
    # that the helper shards it like the rows.
    x, center = standard_rows(110), standard_center(111)

    def all_rules(t, axis_name=None):
      rows, c = t["x"], t["center"][0]
      return {
          "geometric_median": aggregators.geometric_median(rows, axis_name=axis_name),
          "centered_clipping": aggregators.centered_clipping(rows, c, tau=TAU,
                                                             axis_name=axis_name),
          "centered_clipping_no_center": aggregators.centered_clipping(
              rows, tau=TAU, axis_name=axis_name),
          "one_step": aggregators.centered_clipping(rows, c, tau=TAU, num_iters=1,
                                                    axis_name=axis_name),
          "one_step_no_center": aggregators.centered_clipping(rows, tau=TAU, num_iters=1,
                                                              axis_name=axis_name),
          "mda": aggregators.mda(rows, F, axis_name=axis_name),
          "monna": aggregators.monna(rows, F, 2, axis_name=axis_name),
      }
    sharded = helpers.run_coordinate_sharded(all_rules, {"x": x, "center": center[None]})
    for name, (rule, _) in STANDARD_RULES.items():
      np.testing.assert_allclose(sharded[name], rule(x, center), rtol=1e-5, atol=1e-5,
                                 err_msg=name)
    np.testing.assert_allclose(sharded["centered_clipping_no_center"], CC(x, tau=TAU),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded["one_step"], CC1(x, center), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded["one_step_no_center"], CC1_ZERO(x), rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------- property tests

# Every n is a new compilation of every rule: 6 cases keep this within the suite's budget.
@hypothesis.settings(max_examples=6)
@hypothesis.given(n=st.integers(3, 40), seed=st.integers(0, 2**16), data=st.data())
def test_property_oracles_invariance_and_byzantine_rows(n, seed, data):
  f = data.draw(st.integers(0, (n - 1) // 2))
  idx = data.draw(st.integers(0, n - 1))
  x = helpers.random_rows(seed, n, D) * np.float32(1 + seed % 3)
  perm = np.random.default_rng(seed + 1).permutation(n)
  np.testing.assert_allclose(MONNA(x, f=f, idx=idx), np_monna(x, f, idx), rtol=1e-5, atol=1e-5)
  gm = GM(x)
  np.testing.assert_allclose(gm, np_weiszfeld(x), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(GM(x[perm]), gm, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(CC(x, tau=TAU), np_centered_clipping(x, tau=TAU),
                             rtol=1e-4, atol=1e-5)
  # MDA's oracle enumerates subsets in Python: keep C(n, f) small.
  f_mda = max(k for k in range(f + 1) if math.comb(n, k) <= 800)
  mda = MDA(x, f=f_mda)
  expected, unique = np_mda(x, f_mda)
  np.testing.assert_allclose(mda, expected, rtol=1e-5, atol=1e-5)
  if unique:   # with tied diameters the lexicographic tie-break depends on the order
    np.testing.assert_allclose(MDA(x[perm], f=f_mda), mda, rtol=1e-5, atol=1e-5)
  # f rows of NaN/Inf (same shapes: no new compilation) never reach the output.
  bad = helpers.poison(x, rows=range(n - f, n))
  honest = x[:n - f]
  monna, gm, cc = MONNA(bad, f=f, idx=idx % (n - f)), GM(bad), CC(bad, tau=TAU)
  assert all(np.all(np.isfinite(out)) for out in (monna, gm, cc))
  if f:   # the n-f honest rows are exactly the reference's nearest ones
    np.testing.assert_allclose(monna, honest.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gm, np_weiszfeld(honest), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(cc, np_centered_clipping(bad, tau=TAU), rtol=1e-4, atol=1e-5)
  if f_mda == f:
    np.testing.assert_allclose(MDA(bad, f=f), honest.mean(0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The normalised mean (flag's "norm" scale without the subspace).


def np_normalized_mean(x):
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=1)
  kept = np.isfinite(norms) & (norms > 0)
  return (x[kept] / norms[kept, None]).mean(0) * np.median(norms[kept])


class NormalizedMeanTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_against_numpy_with_ties_zeros_and_byzantine_rows(self):
    fn = self.variant(aggregators.normalized_mean)
    x = helpers.tied_rows(30, 9, 12)
    x[3] = 0.0                                          # a zero row is left out
    x[:, 4] = 1.5                                       # a constant column
    chex.assert_trees_all_close(fn(x), np_normalized_mean(x), rtol=1e-5, atol=1e-6)
    bad = helpers.poison(x, rows=[0, 5])                # NaN/Inf rows never leak
    out = np.asarray(fn(bad))
    self.assertTrue(np.isfinite(out).all())
    np.testing.assert_allclose(out, np_normalized_mean(np.delete(x, [0, 5], 0)), rtol=1e-5,
                               atol=1e-6)
    # A huge finite row is rescaled like any other: its influence is m / k.
    big = x.copy()
    big[1] = np.float32(1e30) * np.sign(x[1] + 0.5)
    np.testing.assert_allclose(fn(big), np_normalized_mean(big), rtol=1e-4, atol=1e-5)
    # Permutation invariant; equals flag(scale="norm") with a full-rank subspace (Y Y^T = I
    # on the span of the rows).
    perm = np.random.default_rng(0).permutation(9)
    np.testing.assert_allclose(fn(x[perm]), fn(x), rtol=1e-5, atol=1e-6)
    full = aggregators.flag(jnp.asarray(x), rank=9, scale="norm", max_iters=0)
    np.testing.assert_allclose(full, fn(x), rtol=1e-4, atol=1e-5)

  def test_nothing_to_aggregate_pytree_and_shards(self):
    x = helpers.random_rows(31, 5, 16)
    self.assertTrue(np.isnan(aggregators.normalized_mean(helpers.poison(x, rows=range(5)))).all())
    np.testing.assert_array_equal(aggregators.normalized_mean(np.zeros_like(x)), 0)
    tree = {"a": x[:, :6], "b": x[:, 6:].reshape(5, 5, 2)}
    out = aggregators.normalized_mean(tree)
    np.testing.assert_allclose(np.concatenate([out["a"], out["b"].reshape(10)]),
                               np_normalized_mean(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(helpers.run_coordinate_sharded(aggregators.normalized_mean, x),
                               np_normalized_mean(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One-pass paths: MoNNA and one step of centered clipping take only n distances, no Gram.

CC1 = jax.jit(lambda x, c: aggregators.centered_clipping(x, c, tau=TAU, num_iters=1))
CC1_ZERO = jax.jit(lambda x: aggregators.centered_clipping(x, tau=TAU, num_iters=1))


def nasty_rows(seed):
  """Ties (a duplicated row, a repeated value), a constant column, a near-zero row, a large
  common offset (every distance is small against the norms), and an outlier."""
  x = helpers.random_rows(seed, N, D).astype(np.float64)
  x[3] = x[4]
  x[:, 0] = 0.25
  x[5] = 1e-30
  x[1] *= 4.0
  return x


def test_one_step_centered_clipping_matches_oracle_and_gram_path():
  for seed in (120, 121):
    x = nasty_rows(seed).astype(np.float32)
    center = standard_center(seed + 10)
    for c in (center, None):
      out = CC1(x, c) if c is not None else CC1_ZERO(x)
      np.testing.assert_allclose(out, np_centered_clipping(x, c, tau=TAU, num_iters=1),
                                 rtol=1e-5, atol=1e-6)
    # The Gram path with one step chooses the same coefficients.
    K = gram_lib.gram(x, extra=center, centered=True)
    np.testing.assert_allclose(
        cc_lib.centered_clipping_row_coefficients(x, center, tau=TAU, num_iters=1),
        cc_lib.centered_clipping_coefficients(K, tau=TAU, num_iters=1), rtol=1e-5, atol=1e-6)


def test_one_step_centered_clipping_nonfinite_and_huge_rows():
  x = standard_rows(122)
  center = standard_center(123)
  bad = helpers.poison(x, rows=(0, 6, 7))
  honest_only = np_centered_clipping(bad, center, tau=TAU, num_iters=1)
  out = CC1(bad, center)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, honest_only, rtol=1e-5, atol=1e-6)
  # A huge finite row (its squared norm overflows float32) is clipped to tau like any other:
  # it moves the centre by at most tau / n.
  huge = np.array(x, copy=True)
  huge[2] = 1e30
  out0 = np.asarray(CC1_ZERO(huge))
  assert np.all(np.isfinite(out0))
  np.testing.assert_allclose(out0, np_centered_clipping(huge, None, tau=TAU, num_iters=1),
                             rtol=1e-5, atol=1e-6)
  assert np.linalg.norm(out0 - np_centered_clipping(np.delete(x, 2, 0), None, tau=TAU,
                                                    num_iters=1) * (N - 1) / N) <= TAU / N * 1.01
  # A non-finite centre, or no finite row, says so with NaN.
  assert np.all(np.isnan(CC1(x, np.full(D, np.inf, np.float32))))
  assert np.all(np.isnan(CC1_ZERO(helpers.poison(x, rows=range(N)))))


def test_monna_one_pass_precise_with_large_common_offset():
  # Rows share an offset 1e4 times their spread: |x_i|^2 - 2 x_i.r + |r|^2 loses the
  # distances in float32, the direct differences keep them.
  rng = np.random.default_rng(124)
  spread = rng.normal(size=(N, D))
  spread[7] *= 3.0
  x = (1e4 + spread).astype(np.float32)
  for idx in (0, 7):
    np.testing.assert_allclose(MONNA(x, f=F, idx=idx), np_monna(x, F, idx), rtol=1e-6)
  nasty = nasty_rows(125).astype(np.float32)
  np.testing.assert_allclose(MONNA(nasty, f=F, idx=3), np_monna(nasty, F, 3), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(
      monna_lib.monna_row_coefficients(nasty, F, 3),
      monna_lib.monna_coefficients(gram_lib.gram(nasty, centered=True), F, 3), atol=1e-7)


def test_monna_reference_fallback_huge_rows_and_bound():
  x = standard_rows(126)
  honest = np.delete(x, [2, 8], 0)
  # Reference row 2 holds NaN: the lowest-index finite row (0) stands in.
  bad = helpers.poison(x, rows=(2,))
  bad[8] = 1e30   # finite, but infinitely far in float32: never chosen, counts against f
  out = MONNA(bad, f=F, idx=2)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, np_monna(honest, F - 2, 0), rtol=1e-5, atol=1e-6)
  # More than f rows without a finite distance: NaN, not an aggregate.
  assert np.all(np.isnan(MONNA(helpers.poison(x, rows=(1, 2, 3, 4)), f=F, idx=0)))
  with jax.checking_leaks():
    coefficients = jax.vmap(lambda r: monna_lib.monna_row_coefficients(r, F, 2))(
        jnp.stack([jnp.asarray(x), jnp.asarray(bad)]))
  chex.assert_shape(coefficients, (2, N))
  np.testing.assert_allclose(coefficients.sum(1), 1.0, rtol=1e-6)
