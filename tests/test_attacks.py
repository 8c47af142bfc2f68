"""Attacks against numpy formulas written from DESIGN.md, on arrays, pytrees and shards."""

import functools
import inspect

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
import scipy.ndimage
import scipy.stats
from absl.testing import parameterized

from flagjax import aggregators
from flagjax import attacks
from flagjax.attacks import adaptive
from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib
from tests import helpers

KEY = jax.random.key(0)


def np_alie_z(n, f):
  s = np.floor(n / 2 + 1) - f
  return scipy.stats.norm.ppf((n - s) / n)


# Each deterministic attack's rows from its DESIGN.md definition: (name, kwargs, oracle).
DETERMINISTIC = {
    "sign_flip": ({}, lambda x, f: np.repeat(-x.mean(0)[None], f, 0)),
    "ipm": ({"eps": 0.3}, lambda x, f: np.repeat(-0.3 * x.mean(0)[None], f, 0)),
    "scaled": ({}, lambda x, f: np.repeat(-10 * x.mean(0)[None], f, 0)),
    "alie": ({"z": 1.7}, lambda x, f: np.repeat((x.mean(0) + 1.7 * x.std(0))[None], f, 0)),
    "alie_default": ({}, lambda x, f: np.repeat(
        (x.mean(0) + np_alie_z(len(x) + f, f) * x.std(0))[None], f, 0)),
    "mimic": ({"idx": 2}, lambda x, f: np.repeat(x[2][None], f, 0)),
    "nan": ({}, lambda x, f: np.full((f,) + x.shape[1:], np.nan)),
    "inf": ({}, lambda x, f: np.full((f,) + x.shape[1:], np.inf)),
}


def _attack(name):
  return attacks.alie if name == "alie_default" else getattr(attacks, name)


def damage(rule, honest, byzantine, **kw):
  """|rule(honest + byzantine) - mean(honest)| in numpy terms (rule output read back)."""
  out = np.asarray(rule(np.concatenate([honest, np.asarray(byzantine)]), **kw))
  return np.linalg.norm(out - honest.mean(0))


def run_sharded(attack, honest, f):
  """``attack`` on coordinate shards of ``honest`` (``[h, d]``, d divisible by 8)."""
  return helpers.run_coordinate_sharded(
      lambda rows, **kw: attack(rows, f, KEY, **kw), honest)


class GradientAttackTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters(*DETERMINISTIC)
  def test_against_formula(self, name):
    kwargs, oracle = DETERMINISTIC[name]
    x = helpers.random_rows(1, 7, 11) + 0.5
    f = 3
    out = self.variant(functools.partial(_attack(name), **kwargs), static_argnums=1)(x, f, KEY)
    chex.assert_shape(out, (f, 11))
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, oracle(x, f), rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*DETERMINISTIC)
  def test_pytree_and_trailing_dims(self, name):
    kwargs, oracle = DETERMINISTIC[name]
    honest = {"w": helpers.random_rows(2, 6, 12).reshape(6, 3, 4),
              "b": helpers.random_rows(3, 6, 2)}
    out = _attack(name)(honest, 2, KEY, **kwargs)
    chex.assert_shape(out["w"], (2, 3, 4))
    chex.assert_shape(out["b"], (2, 2))
    np.testing.assert_allclose(out["w"], oracle(honest["w"], 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["b"], oracle(honest["b"], 2), rtol=1e-5, atol=1e-5)

  @parameterized.parameters("sign_flip", "alie", "mimic")
  def test_dtypes(self, name):
    x = helpers.random_rows(4, 5, 6)
    kwargs, oracle = DETERMINISTIC[name if name != "alie" else "alie_default"]
    out = _attack(name)(jnp.asarray(x, jnp.bfloat16), 2, KEY, **kwargs)
    self.assertEqual(out.dtype, jnp.bfloat16)
    x_bf = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), oracle(x_bf, 2), atol=3e-2, rtol=2e-2)
    with jax.enable_x64(True):
      x64 = helpers.random_rows(5, 5, 6, np.float64)
      out = attacks.alie(jnp.asarray(x64), 2, KEY, z=0.5)
      self.assertEqual(out.dtype, jnp.float64)
      np.testing.assert_allclose(out[0], x64.mean(0) + 0.5 * x64.std(0), rtol=1e-12)

  def test_integer_rows_give_float32_rows_never_truncated(self):
    # The rules return float32 for integer rows; the attacks do too. Truncating to int32
    # would turn NaN into an integer and -0.1 * mean into 0, a silent wrong attack. One
    # attack per code path: repeated rows (ipm, min_max), constant rows (nan), random rows
    # (gaussian, fang), the optimal attacks' search and its simulated server update.
    x = np.random.default_rng(7).integers(-5, 6, size=(7, 12)).astype(np.int32)
    x[:, 0] = 3                                                  # a constant column
    as_float = jnp.asarray(x, jnp.float32)
    for name, attack in {"ipm": attacks.ipm, "nan": attacks.nan, "gaussian": attacks.gaussian,
                         "fang": attacks.fang, "min_max": attacks.min_max,
                         "optimal_ipm(median)": attacks.optimal_ipm(aggregators.median),
                         "optimal_ipm(fltrust)": attacks.optimal_ipm(aggregators.fltrust),
                         }.items():
      with self.subTest(name):
        out = attack(jnp.asarray(x), 2, KEY)
        expected = np.asarray(attack(as_float, 2, KEY))
        self.assertEqual(out.dtype, jnp.float32)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        if name in ("ipm", "nan"):
          self.assertFalse(np.any(np.asarray(out) == np.round(np.asarray(out))))

  def test_alie_default_z_matches_scipy(self):
    for n, f in [(4, 1), (10, 2), (13, 4), (25, 12), (50, 5), (7, 3)]:
      np.testing.assert_allclose(attacks.alie_default_z(n, f), np_alie_z(n, f), rtol=1e-5,
                                 atol=1e-6)

  def test_many_honest_rows_loop_instead_of_unrolling(self):
    # Beyond FOLD_UNROLL_MAX_ROWS the per-row statistics (ALIE's std, Fang's extremes) are a
    # fori_loop: the same formulas, and a program that does not grow with h (unrolled, ALIE
    # over 1,000 rows compiled in ~5-7 s).
    h = tree_lib.FOLD_UNROLL_MAX_ROWS + 44
    x = helpers.random_rows(11, h, 30) + 5.0
    x[:, 2] = 1.5                                                # a constant column
    out = jax.jit(lambda x: attacks.alie(x, 3, z=1.2))(x)
    np.testing.assert_allclose(out[0], x.mean(0) + 1.2 * x.std(0), rtol=1e-5, atol=1e-5)
    rows = np.asarray(jax.jit(lambda x: attacks.fang(x, 3, KEY))(x))
    mean = x.mean(0)
    upper = np.where(mean > 0, x.min(0), np.where(x.max(0) > 0, 2 * x.max(0), x.max(0) / 2))
    lower = np.where(mean > 0, np.where(x.min(0) > 0, x.min(0) / 2, 2 * x.min(0)), x.max(0))
    self.assertTrue(np.all((rows >= lower - 1e-5) & (rows <= upper + 1e-5)))

    def size(rows):   # equations, loop bodies and branches included
      def count(jaxpr):
        total = 0
        for e in jaxpr.eqns:
          total += 1
          for value in e.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
              inner = getattr(sub, "jaxpr", None)
              if inner is not None:
                total += count(getattr(inner, "jaxpr", inner))
        return total
      return count(jax.make_jaxpr(lambda x: attacks.alie(x, 3))(jnp.ones((rows, 8))).jaxpr)
    self.assertEqual(size(h), size(2 * h))

  def test_gaussian_and_uniform_statistics(self):
    x = np.zeros((3, 4000), np.float32)
    g = attacks.gaussian(x, 5, KEY, mu=2.0, sigma=3.0)
    chex.assert_shape(g, (5, 4000))
    self.assertAlmostEqual(float(np.mean(g)), 2.0, delta=0.1)
    self.assertAlmostEqual(float(np.std(g)), 3.0, delta=0.1)
    u = attacks.uniform(x, 5, KEY)
    self.assertTrue(np.all((u >= 0) & (u < 1)))
    self.assertAlmostEqual(float(np.mean(u)), 0.5, delta=0.02)
    self.assertAlmostEqual(float(np.var(u)), 1 / 12, delta=0.01)
    u2 = attacks.uniform(x, 5, KEY, minval=-4.0, maxval=-2.0)
    self.assertTrue(np.all((u2 >= -4) & (u2 < -2)))
    # Same key, same rows; another key, other rows; rows differ from one another.
    np.testing.assert_array_equal(g, attacks.gaussian(x, 5, KEY, mu=2.0, sigma=3.0))
    self.assertFalse(np.allclose(g, attacks.gaussian(x, 5, jax.random.key(1), mu=2.0,
                                                     sigma=3.0)))
    self.assertFalse(np.allclose(g[0], g[1]))
    tree = attacks.gaussian({"a": x[:, :3], "b": x[:, :2].astype(jnp.bfloat16)}, 2, KEY)
    self.assertEqual(tree["b"].dtype, jnp.bfloat16)
    chex.assert_shape(tree["a"], (2, 3))

  def test_zero_byzantine_rows(self):
    x = helpers.random_rows(0, 4, 3)
    for name in ("sign_flip", "alie", "gaussian", "nan", "mimic"):
      chex.assert_shape(getattr(attacks, name)(x, 0, KEY), (0, 3))
    chex.assert_shape(attacks.optimal_alie(aggregators.median)(x, 0, KEY), (0, 3))

  def test_invalid_counts_and_hparams(self):
    x = helpers.random_rows(0, 4, 3)
    with self.assertRaisesRegex(ValueError, "sign_flip needs f >= 0, got f=-1"):
      attacks.sign_flip(x, -1, KEY)
    with self.assertRaisesRegex(ValueError, "gaussian needs h >= 1 honest rows, got h=0"):
      attacks.gaussian(np.zeros((0, 3), np.float32), 2, KEY)
    with self.assertRaisesRegex(ValueError, "ipm needs f .* static Python int"):
      attacks.ipm(x, 1.5, KEY)
    with self.assertRaisesRegex(ValueError, "alie needs every leaf to share"):
      attacks.alie({"a": x, "b": x[:3]}, 1, KEY)
    with self.assertRaisesRegex(ValueError, r"mimic needs 0 <= idx < h, got idx=4, h=4"):
      attacks.mimic(x, 1, KEY, idx=4)
    # n = 7, f = 3: s = floor(4.5) - 3 = 1 is fine; f = 4 (n = 8) gives s = 1; f = 5 breaks.
    attacks.alie(x, 4, KEY)
    with self.assertRaisesRegex(ValueError, r"alie needs 1 <= f <= floor\(n/2\).*n=9, f=5"):
      attacks.alie(x, 5, KEY)
    with self.assertRaisesRegex(ValueError, "lossy_link needs 0 <= drop_fraction <= 1"):
      attacks.lossy_link(x, KEY, 1.5)
    with self.assertRaisesRegex(ValueError, "optimal_ipm needs search_range"):
      attacks.optimal_ipm(aggregators.median, search_range=(2.0, 1.0))


class AdaptiveAttackTest(chex.TestCase):

  def test_search_factor_finds_the_global_maximum(self):
    # Two bumps; the higher one sits between coarse grid points, the lower one on one.
    fn = lambda t: jnp.exp(-(t - 2.0) ** 2) + 1.5 * jnp.exp(-((t - 6.3) / 0.8) ** 2)
    best, value = jax.jit(lambda: attacks.search_factor(fn, 0.0, 10.0))()
    self.assertAlmostEqual(float(best), 6.3, delta=0.05)
    self.assertAlmostEqual(float(value), 1.5, delta=0.01)
    # NaN is never chosen.
    nan_fn = lambda t: jnp.where(t > 5, jnp.nan, t)
    best, _ = attacks.search_factor(nan_fn, 0.0, 10.0)
    self.assertLessEqual(float(best), 5.0)
    self.assertGreater(float(best), 4.5)

  @parameterized.parameters(("optimal_alie", "alie", {}), ("optimal_ipm", "ipm", {}))
  def test_optimal_beats_the_fixed_factor(self, name, fixed_name, kw):
    h, f, d = 9, 4, 24
    honest = helpers.random_rows(11, h, d) + 1.0
    attack = jax.jit(getattr(attacks, name)(aggregators.trimmed_mean), static_argnums=1)
    rows = np.asarray(attack(honest, f, KEY))
    chex.assert_shape(rows, (f, d))
    tm = functools.partial(aggregators.trimmed_mean, f=f)
    optimal = damage(tm, honest, rows)
    fixed = damage(tm, honest, getattr(attacks, fixed_name)(honest, f, KEY))
    self.assertGreater(optimal, 1.2 * fixed)
    # The rows keep the attack's form: alie rows are mean + z std, ipm rows -eps mean.
    if fixed_name == "alie":
      z = (rows[0] - honest.mean(0)) / honest.std(0)
    else:
      z = -rows[0] / honest.mean(0)
    np.testing.assert_allclose(z, np.full(d, z[0]), rtol=1e-3, atol=1e-3)
    self.assertTrue(0.0 <= z[0] <= 10.0)
    # No factor on a fine grid does markedly better than the one found (numpy throughout).
    def np_damage(t):
      row = (honest.mean(0) + t * honest.std(0) if fixed_name == "alie"
             else -t * honest.mean(0))
      stacked = np.concatenate([honest, np.repeat(row[None], f, 0)])
      return np.linalg.norm(np.sort(stacked, 0)[f:h].mean(0) - honest.mean(0))
    self.assertAlmostEqual(optimal, np_damage(z[0]), delta=1e-4)
    self.assertGreaterEqual(optimal, 0.99 * max(np_damage(t) for t in np.linspace(0, 10, 201)))

  def test_rule_hyperparameters_and_bound_rules(self):
    honest = helpers.random_rows(12, 8, 8) + 1.0
    # f given to the rule explicitly, or taken from the attack; a bound rule (x, **kw) works.
    a1 = attacks.optimal_ipm(aggregators.trimmed_mean, f=2)(honest, 2, KEY)
    a2 = attacks.optimal_ipm(aggregators.trimmed_mean)(honest, 2, KEY)
    bound = lambda x, **kw: aggregators.trimmed_mean(x, f=2, **kw)
    a3 = attacks.optimal_ipm(bound)(honest, 2, KEY)
    np.testing.assert_allclose(a1, a2)
    np.testing.assert_allclose(a1, a3)
    # Against the mean the damage grows with eps: the search runs to the top of its range.
    rows = attacks.optimal_ipm(aggregators.mean, search_range=(0.0, 3.0))(honest, 2, KEY)
    np.testing.assert_allclose(rows[0], -3.0 * honest.mean(0), rtol=1e-5)

  def test_marked_rules_are_rotation_equivariant(self):
    # The optimal attacks evaluate a marked rule on coordinates in the rows' span; that is
    # exact only if rule(x Q) = rule(x) Q for every orthogonal Q. Nasty rows: a duplicate, a
    # near-zero row, a row along one axis.
    rng = np.random.default_rng(4)
    x = helpers.random_rows(21, 9, 12) + 0.3
    x[3] = x[1]
    x[5] *= 1e-6
    x[7] = 0.0
    x[7, 2] = 4.0
    q = np.linalg.qr(rng.standard_normal((12, 12)))[0].astype(np.float32)
    marked = sorted(name for name in aggregators.__all__
                    if gram_lib.is_rotation_equivariant(getattr(aggregators, name)))
    self.assertEqual(marked, sorted(["caf", "centered_clipping", "clipped_clustering", "flag",
                                     "fltrust", "geometric_median", "krum", "mda", "mean",
                                     "monna", "multi_krum", "normalized_mean", "smea"]))

    def compiled(name):   # one compilation per rule for both calls (same shapes)
      rule = getattr(aggregators, name)
      kwargs = {"f": 2} if "f" in inspect.signature(rule).parameters else {}
      if name == "fltrust":
        return jax.jit(lambda rows, server: rule(rows, server_update=server, **kwargs))
      return jax.jit(lambda rows, server: rule(rows, **kwargs))
    for name in marked + ["median", "trimmed_mean"]:
      call = compiled(name)
      rotated_input = np.asarray(call(x @ q, x.mean(0) @ q))
      rotated_output = np.asarray(call(x, x.mean(0))) @ q
      # 1e-3: flag's float32 IRLS (20 updates, compiled) rounds to ~2e-4 of its output's scale
      # (~1) apart; the coordinate-wise rules miss by 0.25-0.65 here, so the check can tell.
      equal = np.allclose(rotated_input, rotated_output, rtol=1e-3, atol=1e-3)
      self.assertEqual(equal, name in marked, name)

  @parameterized.parameters("krum", "caf", "smea", "flag", "centered_clipping", "fltrust",
                            "clipped_clustering", "monna")
  def test_span_damage_equals_the_damage_on_the_rows(self, name):
    rule = getattr(aggregators, name)
    h, f = 8, 3
    kwargs = {"f": f} if "f" in inspect.signature(rule).parameters else {}
    server = name == "fltrust"
    cases = [helpers.random_rows(31, h, 40) + 0.5,
             helpers.tied_rows(32, h, 40),                          # repeated values, rows
             np.concatenate([helpers.random_rows(33, h, 20) * 1e-3,
                             np.full((h, 20), 2.0, np.float32)], 1)]  # constant columns
    cases[1][2] = cases[1][0]
    rule_kwargs = lambda mean: dict(kwargs, **({"server_update": mean} if server else {}))
    factors = jnp.asarray([0.0, 0.6, 2.5, 9.0], jnp.float32)

    def both(tree):   # the damages of ALIE rows with these factors, in the span and on rows
      mean = adaptive.honest_mean(tree, h)
      std = adaptive.honest_std(tree, mean, h)
      in_span = jax.vmap(adaptive._damage_in_span(rule, kwargs, server, tree, h, mean, mean,
                                                  std, f))
      on_rows = jax.vmap(lambda z: adaptive._damage(
          rule, rule_kwargs(mean), tree, adaptive.alie_rows(tree, mean, std, z, f, tree),
          mean, None))
      return in_span(factors), on_rows(factors)

    both = jax.jit(both)   # one compilation for the three inputs (same shapes)
    for honest in cases:
      tree = {"w": jnp.asarray(honest[:, :32].reshape(h, 4, 8)), "b": jnp.asarray(honest[:, 32:])}
      got, expected = map(np.asarray, both(tree))
      np.testing.assert_allclose(got, expected,
                                 atol=1e-3 * max(1.0, float(np.max(expected))), err_msg=name)

  def test_optimal_attack_on_a_marked_rule_matches_the_search_on_rows(self):
    # The same search through the rule on the d-dimensional rows (a wrapper hides the mark):
    # the same factor, hence the same rows. (SMEA's span damage is checked above; its search
    # here would add ~25 s of compilation and nothing the search does differently.)
    honest = helpers.random_rows(14, 9, 24) + 0.5
    f = 4
    for rule in (aggregators.krum, aggregators.caf, aggregators.geometric_median):
      unmarked = lambda x, rule=rule, **kw: rule(x, **kw)
      unmarked.__signature__ = inspect.signature(rule)
      for factory in (attacks.optimal_alie, attacks.optimal_ipm):
        fast = jax.jit(factory(rule), static_argnums=1)(honest, f, KEY)
        slow = jax.jit(factory(unmarked), static_argnums=1)(honest, f, KEY)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{factory.__name__}({rule.__name__})")

  def test_sharded_equals_unsharded(self):
    honest = helpers.random_rows(13, 7, 32) + 0.5
    for attack in (attacks.optimal_alie(aggregators.trimmed_mean),
                   attacks.optimal_ipm(aggregators.krum),
                   attacks.alie, attacks.sign_flip):
      sharded = run_sharded(attack, honest, 3)
      chex.assert_shape(sharded, (3, 32))
      np.testing.assert_allclose(sharded, attack(honest, 3, KEY), rtol=1e-5, atol=1e-5)


class LossyLinkTest(chex.TestCase):

  def test_lossy_link(self):
    update = {"w": helpers.random_rows(0, 50, 40) + 3.0, "b": np.ones(7, np.float32)}
    out = jax.jit(attacks.lossy_link, static_argnums=2)(update, KEY, 0.3)
    lost = out["w"] == 0
    self.assertAlmostEqual(float(lost.mean()), 0.3, delta=0.03)
    np.testing.assert_array_equal(out["w"][~lost], update["w"][~lost])
    np.testing.assert_array_equal(attacks.lossy_link(update, KEY, 0.0)["w"], update["w"])
    np.testing.assert_array_equal(attacks.lossy_link(update, KEY, 1.0)["b"], np.zeros(7))

  def test_lossy_rows(self):
    x = helpers.random_rows(1, 6, 500) + 3.0
    out = np.asarray(attacks.lossy(0.5)(x, KEY))
    for i in range(6):
      np.testing.assert_array_equal(
          out[i], attacks.lossy_link(x[i], jax.random.fold_in(KEY, i), 0.5))
    self.assertAlmostEqual(float((out == 0).mean()), 0.5, delta=0.05)
    only = np.asarray(attacks.lossy(0.5, workers=[4])(x, KEY))
    np.testing.assert_array_equal(np.delete(only, 4, 0), np.delete(x, 4, 0))
    self.assertGreater((only[4] == 0).mean(), 0.4)
    with self.assertRaisesRegex(ValueError, "lossy needs worker indices in"):
      attacks.lossy(0.1, workers=[6])(x, KEY)

  def test_lossy_on_shards_draws_per_shard(self):
    x = helpers.random_rows(2, 4, 64) + 3.0
    out = np.asarray(helpers.run_coordinate_sharded(
        lambda rows, **kw: attacks.lossy(0.5)(rows, KEY, **kw), x))
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept])
    masks = kept.reshape(4, 8, 8).transpose(1, 0, 2)  # [shard, row, coordinate]
    self.assertFalse(all(np.array_equal(masks[0], m) for m in masks[1:]))


# ---------------------------------------------------------------------------------------------
# Data attacks.


def np_cat_map(image, iterations):
  """Arnold's cat map by its definition: pixel (i, j) -> ((2i + j) mod N, (i + j) mod N)."""
  n = image.shape[0]
  for _ in range(iterations):
    out = np.empty_like(image)
    for i in range(n):
      for j in range(n):
        out[(2 * i + j) % n, (i + j) % n] = image[i, j]
    image = out
  return image


def lv_field(_, z, a=1.0, b=1.0, c=1.0, d=1.0):
  u, v = z
  return [a * u - b * u * v, d * u * v - c * v]


class DataAttackTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.images = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
    self.labels = np.array([0, 3, 9], np.int32)

  def test_label_flip_and_batch_conventions(self):
    flip = attacks.label_flip(10)
    expected = 9 - self.labels
    for batch in ({"x": self.images, "y": self.labels, "w": 1.0},
                  {"image": self.images, "label": self.labels},
                  (self.images, self.labels), [self.images, self.labels]):
      out = jax.jit(flip)(batch, KEY)
      self.assertIs(type(out), type(batch))
      if isinstance(batch, dict):
        x, y = (out["x"], out["y"]) if "x" in batch else (out["image"], out["label"])
      else:
        x, y = out
      np.testing.assert_array_equal(y, expected)
      self.assertEqual(y.dtype, jnp.int32)
      np.testing.assert_array_equal(x, self.images)
    self.assertEqual(flip({"x": self.images, "y": self.labels, "w": 1.0}, KEY)["w"], 1.0)
    with self.assertRaisesRegex(ValueError, "label_flip needs a batch dict"):
      flip({"inputs": self.images}, KEY)
    with self.assertRaisesRegex(ValueError, "label_flip needs num_classes >= 1"):
      attacks.label_flip(0)

  def test_augment_gaussian(self):
    big = np.zeros((4, 32, 32, 3), np.float32)
    out = attacks.augment_gaussian(0.5)({"x": big, "y": self.labels}, KEY)["x"]
    self.assertAlmostEqual(float(np.std(out)), 0.5, delta=0.02)
    self.assertAlmostEqual(float(np.mean(out)), 0.0, delta=0.02)
    other = attacks.augment_gaussian(0.5)({"x": big, "y": self.labels}, jax.random.key(3))
    self.assertFalse(np.allclose(out, other["x"]))

  def test_integer_images_round_and_saturate(self):
    # uint8 images: x + sigma * noise rounded to the nearest level and clipped to [0, 255]
    # (a plain cast truncates and wraps 200 + 100 around to 44); the noise is the float
    # call's own (same key, same shape), so the oracle is exact.
    images = np.random.default_rng(1).integers(0, 256, size=(4, 8, 8, 1)).astype(np.uint8)
    images[0] = 255                                              # saturated and black images
    images[1] = 0
    sigma = 40.0
    noise = jax.jit(attacks.augment_gaussian(sigma))
    noisy = noise((images.astype(np.float32), self.labels), KEY)[0]
    out = noise((images, self.labels), KEY)[0]
    self.assertEqual(out.dtype, jnp.uint8)
    np.testing.assert_array_equal(out, np.clip(np.round(np.asarray(noisy)), 0, 255))
    self.assertGreater(np.mean(np.asarray(out)[0] == 255), 0.4)  # ~half the noise saturates
    self.assertGreater(np.mean(np.asarray(out)[1] == 0), 0.4)
    # int8 (signed) clips to [-128, 127]; the Lotka-Volterra warp rounds its interpolation.
    signed = (images.astype(np.int16) - 128).astype(np.int8)
    out = noise((signed, self.labels), KEY)[0]
    self.assertEqual(out.dtype, jnp.int8)
    noisy = noise((signed.astype(np.float32), self.labels), KEY)[0]
    np.testing.assert_array_equal(out, np.clip(np.round(np.asarray(noisy)), -128, 127))
    warp = jax.jit(attacks.augment_lotka_volterra(0.7))
    warped = warp((images, self.labels), KEY)[0]
    float_warped = warp((images.astype(np.float32), self.labels), KEY)[0]
    np.testing.assert_array_equal(warped, np.round(np.asarray(float_warped)))

  @parameterized.parameters(0, 1, 2, 5)
  def test_cat_map_against_definition(self, iterations):
    out = jax.jit(attacks.augment_cat_map(iterations))((self.images, self.labels), KEY)[0]
    for b in range(3):
      np.testing.assert_array_equal(out[b], np_cat_map(self.images[b], iterations))
    # Flat features with an image shape; [b, H, W] without channels.
    flat = self.images[..., 0].reshape(3, 64)
    out_flat = attacks.augment_cat_map(iterations, image_shape=(8, 8))((flat, self.labels),
                                                                       KEY)[0]
    np.testing.assert_array_equal(out_flat.reshape(3, 8, 8),
                                  np.stack([np_cat_map(im[..., 0], iterations)
                                            for im in self.images]))
    with self.assertRaisesRegex(ValueError, "augment_cat_map needs square images"):
      attacks.augment_cat_map(1)((np.zeros((2, 4, 6), np.float32), self.labels), KEY)

  def test_lotka_volterra_source_follows_the_flow(self):
    time, spread = 0.7, 0.5
    source = attacks.lotka_volterra_source(9, 7, time=time, alpha=1.0, beta=1.0, gamma=1.0,
                                           delta=1.0, spread=spread, num_steps=16)
    for i, j in [(0, 0), (4, 3), (8, 6), (2, 5)]:
      # Source pixel -> (u, v) domain, flowed forward by `time`, lands on target (i, j).
      u0 = 1 + spread * (2 * source[1, i, j] / 6 - 1)
      v0 = 1 + spread * (2 * source[0, i, j] / 8 - 1)
      end = scipy.integrate.solve_ivp(lv_field, (0, time), [u0, v0], rtol=1e-10,
                                      atol=1e-12).y[:, -1]
      np.testing.assert_allclose(end, [1 + spread * (2 * j / 6 - 1),
                                       1 + spread * (2 * i / 8 - 1)], atol=1e-5)

  def test_lotka_volterra_warp(self):
    warp = attacks.augment_lotka_volterra(0.7)
    out = np.asarray(jax.jit(warp)({"image": self.images, "label": self.labels}, KEY)["image"])
    source = attacks.lotka_volterra_source(8, 8, time=0.7, alpha=1.0, beta=1.0, gamma=1.0,
                                           delta=1.0, spread=0.5, num_steps=16)
    for b in range(3):
      for c in range(2):
        expected = scipy.ndimage.map_coordinates(self.images[b, :, :, c], source, order=1,
                                                 mode="nearest")
        np.testing.assert_allclose(out[b, :, :, c], expected, atol=1e-5)
    # Time 0 is the identity; a positive time moves the image.
    same = attacks.augment_lotka_volterra(0.0)((self.images, self.labels), KEY)[0]
    np.testing.assert_allclose(same, self.images, atol=1e-5)
    self.assertGreater(np.abs(out - self.images).mean(), 0.1)

  def test_augmented_picks_one_of_three(self):
    batch = {"x": self.images, "y": self.labels}
    lv = attacks.augment_lotka_volterra(0.5)(batch, KEY)["x"]
    cat = attacks.augment_cat_map(1)(batch, KEY)["x"]
    augmented = jax.jit(attacks.augmented(sigma=0.1))
    seen = set()
    for seed in range(12):
      out = np.asarray(augmented(batch, jax.random.key(seed))["x"])
      if np.allclose(out, lv, atol=1e-6):
        seen.add("lotka_volterra")
      elif np.array_equal(out, cat):
        seen.add("cat_map")
      else:
        noise = out - self.images
        self.assertAlmostEqual(float(noise.std()), 0.1, delta=0.02)
        seen.add("gaussian")
    self.assertEqual(seen, {"gaussian", "lotka_volterra", "cat_map"})


@hypothesis.settings(max_examples=6)  # each new shape compiles anew
@hypothesis.given(h=st.integers(1, 12), f=st.integers(0, 6), d=st.integers(1, 7),
                  seed=st.integers(0, 2**16))
def test_property_mean_statistics(h, f, d, seed):
  x = helpers.random_rows(seed, h, d) * 3 + 1
  np.testing.assert_allclose(attacks.sign_flip(x, f), np.repeat(-x.mean(0)[None], f, 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attacks.alie(x, f, z=-0.8),
                             np.repeat((x.mean(0) - 0.8 * x.std(0))[None], f, 0),
                             rtol=1e-4, atol=1e-4)
  # Permuting the honest rows changes nothing but mimic.
  perm = np.random.default_rng(seed).permutation(h)
  np.testing.assert_allclose(attacks.alie(x[perm], f, z=1.0), attacks.alie(x, f, z=1.0),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Min-Max, Min-Sum (Shejwalkar & Houmansadr, NDSS 2021) and Fang (USENIX Security 2020).


def np_perturbation(x, kind):
  mu = x.mean(0)
  return {"unit": -mu / np.linalg.norm(mu), "std": -x.std(0), "sign": -np.sign(mu)}[kind]


def np_manipulation_gamma(x, kind, attack):
  """Largest gamma meeting the paper's constraint, by bisection in float64 (independent of
  the closed form): feasibility is an interval [0, gamma*] because each constraint is a
  convex quadratic that holds at gamma = 0."""
  x = x.astype(np.float64)
  mu, p = x.mean(0), np_perturbation(x, kind)
  pair = np.linalg.norm(x[:, None] - x[None], axis=-1)
  if attack == "min_max":
    bound = pair.max()
    feasible = lambda g: np.linalg.norm(mu + g * p - x, axis=1).max() <= bound
  else:
    bound = (pair ** 2).sum(1).max()
    feasible = lambda g: (np.linalg.norm(mu + g * p - x, axis=1) ** 2).sum() <= bound
  lo, hi = 0.0, 1.0
  while feasible(hi):
    hi *= 2
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
  return lo, mu, p


def jit_attack(attack):
  """``attack`` jitted with its row count (and perturbation) static."""
  names = ("perturbation",) if attack in (attacks.min_max, attacks.min_sum) else ()
  return jax.jit(attack, static_argnums=1, static_argnames=names)


class ManipulationAttackTest(chex.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.product(attack=("min_max", "min_sum"), kind=("unit", "std", "sign"))
  def test_closed_form_equals_bisection_and_is_tight(self, attack, kind):
    h, f, d = 9, 3, 40
    fn = self.variant(functools.partial(getattr(attacks, attack), perturbation=kind),
                      static_argnums=1)
    for x in (helpers.random_rows(21, h, d) + 0.3, helpers.tied_rows(21, h, d) + 0.3):
      x[:, 5] = 2.0                                    # a constant column
      self._check_closed_form(np.asarray(fn(x, f), np.float64), x, f, d, attack, kind)

  def _check_closed_form(self, rows, x, f, d, attack, kind):
    chex.assert_shape(rows, (f, d))
    np.testing.assert_array_equal(rows, np.repeat(rows[:1], f, 0))
    gamma, mu, p = np_manipulation_gamma(x, kind, attack)
    np.testing.assert_allclose(rows[0], mu + gamma * p, rtol=2e-4, atol=2e-4 * np.abs(p).max())
    # The constraint is tight at the returned row.
    x64 = x.astype(np.float64)
    pair = np.linalg.norm(x64[:, None] - x64[None], axis=-1)
    dist = np.linalg.norm(rows[0] - x64, axis=1)
    if attack == "min_max":
      np.testing.assert_allclose(dist.max(), pair.max(), rtol=1e-4)
    else:
      np.testing.assert_allclose((dist ** 2).sum(), (pair ** 2).sum(1).max(), rtol=1e-4)

  def test_degenerate_huge_and_pytree_inputs(self):
    h, f = 6, 2
    min_max, min_sum = jit_attack(attacks.min_max), jit_attack(attacks.min_sum)
    # Equal honest rows: p = -std = 0, so b = mu.
    same = np.tile(helpers.random_rows(22, 1, 10), (h, 1))
    for attack in (min_max, min_sum):
      np.testing.assert_allclose(attack(same, f)[0], same[0], rtol=1e-6)
    # Huge finite rows (a float32 Gram of them overflows): the result scales with the input.
    x = helpers.random_rows(23, h, 10)
    for attack, kind in ((min_max, "std"), (min_max, "unit"), (min_sum, "std")):
      small = np.asarray(attack(x, f, perturbation=kind))
      big = np.asarray(attack(x * np.float32(1e30), f, perturbation=kind))
      self.assertTrue(np.isfinite(big).all())
      np.testing.assert_allclose(big / np.float32(1e30), small, rtol=1e-4, atol=1e-5)
    # A pytree equals its flat concatenation (the constraint couples the leaves).
    flat = helpers.random_rows(24, h, 12) + 1.0
    tree = {"a": flat[:, :5], "b": flat[:, 5:].reshape(h, 7, 1)}
    for attack in (min_max, min_sum):
      out = attack(tree, f)
      chex.assert_shape(out["b"], (f, 7, 1))
      np.testing.assert_allclose(
          np.concatenate([out["a"], out["b"].reshape(f, 7)], 1), attack(flat, f), rtol=1e-5)
    # vmap over independent honest sets equals one call per set.
    sets = np.stack([flat, 2 * flat[::-1] + 1])
    batched = jax.jit(jax.vmap(lambda rows: attacks.min_sum(rows, f)))(sets)
    for k in range(2):
      np.testing.assert_allclose(batched[k], min_sum(sets[k], f), rtol=1e-5, atol=1e-6)
    # dtypes follow the honest rows; float16 computes in float32.
    half = min_max(flat.astype(np.float16), f)
    self.assertEqual(half.dtype, np.float16)
    np.testing.assert_allclose(half, min_max(flat, f), rtol=2e-2, atol=2e-2)

  def test_sharded_equals_unsharded(self):
    honest = helpers.random_rows(25, 7, 32) + 0.5
    for attack in (attacks.min_max, attacks.min_sum,
                   functools.partial(attacks.min_max, perturbation="unit")):
      np.testing.assert_allclose(run_sharded(attack, honest, 3), jit_attack(attack)(honest, 3),
                                 rtol=1e-5, atol=1e-5)

  def test_fang_against_its_ranges(self):
    h, f, d = 8, 5, 60
    x = helpers.random_rows(26, h, d)
    x[:, :10] += 3.0                                  # all-positive columns
    x[:, 10:20] -= 3.0                                # all-negative columns
    x[:, 20] = 0.0                                    # a constant zero column
    rows = np.asarray(jax.jit(attacks.fang, static_argnums=1)(x, f, KEY), np.float64)
    chex.assert_shape(rows, (f, d))
    mu, w_max, w_min = x.mean(0), x.max(0), x.min(0)
    lo = np.where(mu > 0, np.where(w_min > 0, w_min / 2, 2 * w_min), w_max)
    hi = np.where(mu > 0, w_min, np.where(w_max > 0, 2 * w_max, w_max / 2))
    tol = 1e-6 * (1 + np.abs(x).max())
    self.assertTrue(np.all(rows >= lo - tol) and np.all(rows <= hi + tol))
    # Beyond the honest extreme opposite to the mean's sign; rows drawn independently.
    self.assertTrue(np.all(np.where(mu > 0, rows <= w_min + tol, rows >= w_max - tol)))
    self.assertGreater(np.abs(rows[0] - rows[1]).max(), 0)
    # b scales the range; b <= 1 and an unknown perturbation are refused, naming the rule.
    with self.assertRaisesRegex(ValueError, "fang.*b > 1"):
      attacks.fang(x, f, KEY, b=1.0)
    with self.assertRaisesRegex(ValueError, "min_max.*perturbation"):
      attacks.min_max(x, f, perturbation="gaussian")

  @parameterized.parameters(
      ("min_max", aggregators.krum), ("min_max", aggregators.multi_krum),
      ("min_sum", aggregators.krum), ("fang", aggregators.trimmed_mean),
      ("fang", aggregators.median))
  def test_at_least_as_damaging_as_alie_on_its_target(self, name, rule):
    h, f, d = 11, 4, 100
    honest = helpers.random_rows(27, h, d) + 0.5
    kw = {"f": f} if rule is not aggregators.median else {}
    rule = jax.jit(functools.partial(rule, **kw))
    strong = damage(rule, honest, jit_attack(getattr(attacks, name))(honest, f, KEY))
    self.assertGreaterEqual(strong, damage(rule, honest, jit_attack(attacks.alie)(honest, f)))
