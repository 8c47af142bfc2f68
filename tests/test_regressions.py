"""Regression tests for the cross-check and fuzzing findings: ties, portability, bad input.

Each test names the defect it guards against; every one failed before its fix.
"""


import functools
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flagjax
from flagjax import aggregators as A
from flagjax import attacks
from flagjax import preaggregators as PA
import importlib
from flagjax.core import gram as gram_lib
from tests import helpers

krum_lib = importlib.import_module("flagjax.aggregators.krum")


# ---------------------------------------------------------------------------------------------
# Oracles written here, in float64 numpy.


def np_mean_nearest(values, center, size):
  """Per column: the mean of the ``size`` values nearest ``center`` (ties: the lower value)."""
  values = np.asarray(values, np.float64)
  out = np.empty(values.shape[1])
  for k in range(values.shape[1]):
    column = values[:, k]
    order = np.lexsort((column, np.abs(column - center[k])))  # distance, then value
    out[k] = column[order[:size]].mean()
  return out


def np_meamed(x, f):
  x = np.asarray(x, np.float64)
  return np_mean_nearest(x, np.median(x, 0), x.shape[0] - f)


def np_phocas(x, f):
  x = np.asarray(x, np.float64)
  s = np.sort(x, 0)
  return np_mean_nearest(x, s[f:x.shape[0] - f].mean(0), x.shape[0] - f)


def quantised_rows(seed, n, d, *, duplicates=True):
  """Values on a grid of 1/4 (exact sums), with duplicated rows and a constant column."""
  rng = np.random.default_rng(seed)
  x = np.round(rng.normal(size=(n, d)) * 4) / 4
  if duplicates:
    x[1] = x[0]
    x[2] = x[0]
    x[-1] = x[-2]
  x[:, 0] = 1.25
  return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Ties (repeated values): MeaMed, Phocas, Bulyan.


def test_meamed_keeps_only_the_nearest_copies_of_a_repeated_value():
  column = np.array([-3.2, -3.2, -3.2, -2.1, -0.75, -0.02, -0.02, 0.04, 0.44, 1.62],
                    np.float32)[:, None]
  out = A.meamed(jnp.asarray(column), 2)
  chex.assert_trees_all_close(out, np_meamed(column, 2), rtol=1e-6)


@pytest.mark.parametrize("n,f,seed", [(10, 3, 0), (15, 3, 1), (7, 2, 2), (12, 4, 3)])
def test_meamed_and_phocas_on_ties_match_numpy(n, f, seed):
  x = quantised_rows(seed, n, 64)
  chex.assert_trees_all_close(A.meamed(jnp.asarray(x), f), np_meamed(x, f), rtol=1e-6,
                              atol=1e-6)
  if n - 2 * f in (1, 2, 4, 8):  # the trimmed mean (Phocas' centre) is then exact in float32
    chex.assert_trees_all_close(A.phocas(jnp.asarray(x), f), np_phocas(x, f), rtol=1e-6,
                                atol=1e-6)


def test_mimic_rows_are_counted_once_per_copy():
  honest = quantised_rows(4, 12, 40, duplicates=False)
  x = np.concatenate([honest, np.asarray(attacks.mimic(jnp.asarray(honest), 3))])
  chex.assert_trees_all_close(A.meamed(jnp.asarray(x), 3), np_meamed(x, 3), atol=1e-6)
  chex.assert_trees_all_close(A.phocas(jnp.asarray(x), 3),
                              np_mean_nearest(x, np.sort(x, 0)[3:12].mean(0), 12), atol=1e-5)


def test_bulyan_second_stage_on_ties_matches_numpy():
  n, f = 15, 3
  x = quantised_rows(5, n, 48)
  K = gram_lib.gram(jnp.asarray(x), centered=True)
  selected = np.asarray(krum_lib.bulyan_selection(K, f))
  rows = x[selected]
  beta = rows.shape[0] - 2 * f
  expected = np_mean_nearest(rows, np.median(rows.astype(np.float64), 0), beta)
  chex.assert_trees_all_close(A.bulyan(jnp.asarray(x), f), expected, atol=1e-6)


def test_bulyan_at_f1_does_not_select_a_far_row_by_its_index():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  x[0] = 50.0  # Byzantine, at index 0
  selected = np.asarray(krum_lib.bulyan_selection(gram_lib.gram(jnp.asarray(x)), 1))
  assert not selected[0]
  out = np.asarray(A.bulyan(jnp.asarray(x), 1))
  assert np.all(np.abs(out) < 5)


def test_bulyan_is_permutation_invariant_with_duplicates():
  x = quantised_rows(6, 11, 16)
  out = A.bulyan(jnp.asarray(x), 2)
  for seed in range(3):
    perm = np.random.default_rng(seed).permutation(11)
    chex.assert_trees_all_close(A.bulyan(jnp.asarray(x[perm]), 2), out, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The Gram matrix: symmetric by construction; distances without cancellation or NaN.


@pytest.mark.parametrize("n,d", [(40, 32768), (33, 40000), (8, 100)])
@pytest.mark.parametrize("centered", [False, True])
def test_gram_is_exactly_symmetric_on_every_path(n, d, centered):
  x = jnp.asarray(helpers.random_rows(n, n, d))
  for K in (gram_lib.gram(x, centered=centered),
            gram_lib.gram(x, centered=centered, extra=x[0] * 2),
            gram_lib.gram(x, centered=centered, origin=True)):
    np.testing.assert_array_equal(np.asarray(K), np.asarray(K).T)


def test_centred_gram_gives_the_same_distances():
  x = helpers.random_rows(0, 9, 300).astype(np.float64)
  with jax.enable_x64(True):
    D = gram_lib.sq_distances(gram_lib.gram(jnp.asarray(x), centered=True))
    np.testing.assert_allclose(np.asarray(D), helpers.np_sq_distances(x), rtol=1e-10,
                               atol=1e-10)


def offset_rows():
  """The fuzzer's case: 9 honest rows at 1000 + 0.01 noise, 2 Byzantine rows at 1001."""
  h = 1000 + .01 * np.random.default_rng(0).normal(size=(9, 100))
  b = np.full((2, 100), 1001.)
  return np.concatenate([b, h]).astype(np.float32)


GRAM_RULES = {
    "krum": lambda x: A.krum(x, 2),
    "multi_krum": lambda x: A.multi_krum(x, 2),
    "bulyan": lambda x: A.bulyan(x, 2),
    "mda": lambda x: A.mda(x, 2),
    "monna": lambda x: A.monna(x, 2, idx=3),
    "nnm+mean": lambda x: A.mean(PA.nnm(x, 2)),
    "geometric_median": A.geometric_median,
}


@pytest.mark.parametrize("name", sorted(GRAM_RULES))
def test_translation_equivariance_with_a_large_common_offset(name):
  rule = jax.jit(GRAM_RULES[name])
  x = offset_rows()
  centred = x - np.float32(1000)  # exact: Sterbenz
  shifted_out = np.asarray(rule(jnp.asarray(x)), np.float64) - 1000
  centred_out = np.asarray(rule(jnp.asarray(centred)), np.float64)
  # 1e5 x the spread: a different choice of rows moves the output by >= 1e-3;
  # rounding of values near 1000 (ulp 6e-5) stays below.
  np.testing.assert_allclose(shifted_out, centred_out, atol=4e-4)  # ~6 ulp at 1000


def test_multi_krum_drops_the_close_byzantine_rows_under_an_offset():
  x = offset_rows()
  out = np.asarray(A.multi_krum(jnp.asarray(x), 2), np.float64)
  np.testing.assert_allclose(out.mean(), x[2:].astype(np.float64).mean(), atol=1e-4)


def test_centered_clipping_translation_equivariance():
  x = offset_rows()
  center = x[5] + np.float32(0.5)
  out = np.asarray(A.centered_clipping(jnp.asarray(x), jnp.asarray(center), tau=0.1),
                   np.float64) - 1000
  ref = np.asarray(A.centered_clipping(jnp.asarray(x - np.float32(1000)),
                                       jnp.asarray(center - np.float32(1000)), tau=0.1))
  np.testing.assert_allclose(out, ref, atol=2e-4)


def test_mda_eager_and_jit_agree_on_overflowing_distances():
  x = jnp.array([[0], [1], [2], [3], [1.5e19], [1.5e19], [1.5e19]], jnp.float32)
  eager = A.mda(x, 3)
  jitted = jax.jit(A.mda, static_argnums=1)(x, 3)
  chex.assert_trees_all_close(eager, jitted)
  chex.assert_trees_all_close(eager, jnp.array([1.5]))


# ---------------------------------------------------------------------------------------------
# Huge finite Byzantine values and underflow.

F_RULES = {
    "median": lambda x, f: A.median(x),
    "trimmed_mean": A.trimmed_mean,
    "meamed": A.meamed,
    "phocas": A.phocas,
    "krum": A.krum,
    "multi_krum": A.multi_krum,
    "bulyan": A.bulyan,
    "mda": A.mda,
    "monna": A.monna,
    "geometric_median": lambda x, f: A.geometric_median(x),
    "centered_clipping": lambda x, f: A.centered_clipping(x, tau=1.0),
    "flag": lambda x, f: A.flag(x, scale="norm"),
    "flag_lam8": lambda x, f: A.flag(x, lam=8.0, scale="norm"),
    "nnm+trimmed_mean": lambda x, f: A.trimmed_mean(PA.nnm(x, f), f),
    "clip+trimmed_mean": lambda x, f: A.trimmed_mean(PA.clip(x, 3.0), f),
    "arc+trimmed_mean": lambda x, f: A.trimmed_mean(PA.arc(x, f), f),
}
COORDINATE_RULES = ("median", "trimmed_mean", "meamed", "phocas", "bulyan")


@functools.lru_cache(maxsize=None)
def _jitted_f_rule(name):
  """``F_RULES[name]`` jitted once (the three magnitudes share a shape: one compilation)."""
  return jax.jit(F_RULES[name], static_argnums=1)


@pytest.mark.parametrize("name", sorted(F_RULES))
@pytest.mark.parametrize("big", [1e15, 1e20, 3e38])
def test_huge_finite_byzantine_rows_do_not_break_a_rule(name, big):
  n, f, d = 15, 3, 24
  honest = helpers.random_rows(1, n - f, d)
  byzantine = np.stack([np.full(d, big), np.full(d, -big), np.full(d, big / 7)])
  x = jnp.asarray(np.concatenate([honest, byzantine]).astype(np.float32))
  out = np.asarray(_jitted_f_rule(name)(x, f))
  assert np.all(np.isfinite(out)), name
  if name in COORDINATE_RULES:
    assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5)
  else:
    spread = np.max(np.linalg.norm(honest - honest.mean(0), axis=1))
    assert np.linalg.norm(out - honest.mean(0)) <= 2 * spread, name


def test_clip_and_arc_clip_rows_whose_squared_norm_overflows():
  x = np.ones((5, 8), np.float32)
  x[4] = 1e20
  clipped = np.asarray(PA.clip(jnp.asarray(x), 2.0))
  np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [2.0] * 5, rtol=1e-5)
  arced = np.asarray(PA.arc(jnp.asarray(x), 1))
  assert np.all(np.isfinite(arced))
  assert np.linalg.norm(arced[4]) <= np.linalg.norm(x[0]) * (1 + 1e-5)


def test_arc_then_trimmed_mean_with_underflowing_rows():
  honest = helpers.random_rows(2, 12, 10)
  x = np.concatenate([honest, np.full((3, 10), 1e-30, np.float32)])
  clipped = np.asarray(PA.arc(jnp.asarray(x), 3))
  out = np.asarray(A.trimmed_mean(jnp.asarray(clipped), 3))
  # Inside the range of the (clipped) honest rows: the tiny rows are never clipped up.
  assert np.all(out >= clipped[:12].min(0) - 1e-6) and np.all(out <= clipped[:12].max(0) + 1e-6)
  np.testing.assert_array_equal(clipped[12:], x[12:])


# ---------------------------------------------------------------------------------------------
# Beyond the bound, and nothing finite: NaN, the honest signal.

WITH_F = ("trimmed_mean", "meamed", "phocas", "krum", "multi_krum", "bulyan", "mda", "monna",
          "nnm+trimmed_mean")


@pytest.mark.parametrize("name", WITH_F)
def test_more_than_f_nonfinite_rows_give_nan(name):
  n, f = 15, 3
  x = helpers.random_rows(3, n, 6)
  x[-(f + 1):] = np.nan
  out = np.asarray(F_RULES[name](jnp.asarray(x), f))
  assert np.all(np.isnan(out)), (name, out)
  x = helpers.random_rows(3, n, 6)
  x[-f:] = np.nan
  assert np.all(np.isfinite(np.asarray(F_RULES[name](jnp.asarray(x), f))))


@pytest.mark.parametrize("name", sorted(F_RULES))
def test_all_rows_nonfinite_give_nan(name):
  x = np.full((15, 6), np.nan, np.float32)
  x[::2] = np.inf
  out = np.asarray(F_RULES[name](jnp.asarray(x), 3))
  assert np.all(np.isnan(out)), (name, out)


# ---------------------------------------------------------------------------------------------
# Properties that failed under random search.


def test_median_and_trimmed_mean_of_huge_values_stay_in_range():
  x = np.array([[3e38, -3e38], [3e38, -3e38], [3.2e38, -3.1e38], [-1.0, 2.0]], np.float32)
  med = np.asarray(A.median(jnp.asarray(x)))
  tm = np.asarray(A.trimmed_mean(jnp.asarray(x), 1))
  for out in (med, tm):
    assert np.all(np.isfinite(out))
    assert np.all(out >= x.min(0)) and np.all(out <= x.max(0))


def test_trimmed_mean_of_equal_values_is_exact():
  x = np.full((7, 3), 0.1, np.float32)
  np.testing.assert_array_equal(np.asarray(A.trimmed_mean(jnp.asarray(x), 2)), x[0])


def np_geometric_median(x, iters=2000):
  z = np.median(x, 0)
  for _ in range(iters):
    d = np.maximum(np.linalg.norm(x - z, axis=1), 1e-12)
    z = (x / d[:, None]).sum(0) / (1 / d).sum()
  return z


def test_geometric_median_from_a_robust_start():
  x = jnp.array([[0.], [1.], [2.], [3.], [1e15], [1e15], [1e15]], jnp.float32)
  chex.assert_trees_all_close(A.geometric_median(x), jnp.array([3.0]), atol=1e-4)


@pytest.mark.parametrize("nu", [0.0, 1e-8])
def test_geometric_median_on_duplicated_rows_is_finite_and_right(nu):
  rng = np.random.default_rng(7)
  x = rng.normal(size=(6, 3))
  x = np.concatenate([x, x[:3], x[:1]])  # duplicates, some rows three times
  out = np.asarray(A.geometric_median(jnp.asarray(x, jnp.float32), nu=nu, tol=1e-7,
                                      max_iters=1000))
  assert np.all(np.isfinite(out))
  ref = np_geometric_median(x)
  objective = lambda z: np.linalg.norm(x - z, axis=1).sum()
  assert objective(out) <= objective(ref) * (1 + 1e-5)


def test_geometric_median_far_rows_in_training_scale():
  rng = np.random.default_rng(8)
  honest = rng.normal(size=(4, 50))
  x = np.concatenate([honest, 1e16 * rng.normal(size=(3, 50))]).astype(np.float32)
  out = np.asarray(A.geometric_median(jnp.asarray(x)))
  assert np.linalg.norm(out - honest.mean(0)) < 3 * np.linalg.norm(honest, axis=1).max()


# ---------------------------------------------------------------------------------------------
# Input types and bad arguments.


def test_integer_input_is_computed_in_float():
  x = np.array([[1, 2], [2, 3], [4, 4], [7, 1], [5, 5]], np.int32)
  for rule, ref in ((A.mean, x.mean(0)), (A.median, np.median(x, 0)),
                    (lambda v: A.trimmed_mean(v, 1), np.sort(x, 0)[1:4].mean(0))):
    out = rule(jnp.asarray(x))
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, ref.astype(np.float32), rtol=1e-6)


def test_float16_like_bfloat16():
  x = helpers.random_rows(4, 7, 5)
  for rule in (A.median, lambda v: A.krum(v, 1), lambda v: A.trimmed_mean(v, 2), A.flag):
    rule = jax.jit(rule)  # eager calls compile every op of the rule apart
    out = rule(jnp.asarray(x, jnp.float16))
    assert out.dtype == jnp.float16
    ref = rule(jnp.asarray(jnp.asarray(x, jnp.float16), jnp.float32))
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("rule", [A.mean, A.median, A.flag, lambda v: A.krum(v, 1)])
def test_complex_input_is_refused(rule):
  with pytest.raises(ValueError, match="real"):
    rule(jnp.ones((5, 3), jnp.complex64))


def test_a_list_of_worker_vectors_says_stack_them():
  with pytest.raises(ValueError, match=r"mean got a Python list of 3 vectors.*jnp.stack"):
    A.mean([jnp.ones(4), jnp.zeros(4), jnp.ones(4)])
  # A tuple is a pytree of stacked leaves, as before.
  out = A.mean((jnp.ones((3, 4)), jnp.zeros((3, 2))))
  chex.assert_trees_all_close(out, (jnp.ones(4), jnp.zeros(2)))


KEY = jax.random.key(0)
X = jnp.ones((7, 3))


@pytest.mark.parametrize("call,message", [
    (lambda: PA.clip(X, jnp.array(-1.0)), r"clip needs c >= 0"),
    (lambda: PA.clip(X, np.float32(-2)), r"clip needs c >= 0"),
    (lambda: PA.bucketing(X, 2, None), r"bucketing needs a jax.random key"),
    (lambda: PA.bucketing(X, 2, 3), r"bucketing needs a jax.random key"),
    (lambda: PA.bucketing(X, 2.0, KEY), r"bucketing needs s as a static Python int"),
    (lambda: A.trimmed_mean(X, 2.5), r"trimmed_mean needs f"),
    (lambda: A.krum(X, -1), r"krum needs f >= 0"),
    (lambda: A.centered_clipping(X, tau=-1.0), r"centered_clipping needs tau >= 0"),
    (lambda: A.centered_clipping(X, num_iters=1.5), r"centered_clipping needs num_iters"),
    (lambda: A.geometric_median(X, max_iters=2.5), r"geometric_median needs max_iters"),
    (lambda: A.geometric_median(X, tol=-1e-3), r"geometric_median needs tol >= 0"),
    (lambda: A.geometric_median(X, nu=-1.0), r"geometric_median needs nu >= 0"),
    (lambda: A.flag(X, eps=0.0), r"flag needs eps > 0"),
    (lambda: A.flag(X, max_iters=-1), r"flag needs max_iters >= 0"),
    (lambda: attacks.gaussian(X, 2, KEY, sigma=-1.0), r"gaussian needs sigma >= 0"),
    (lambda: attacks.gaussian(X, 2, None), r"gaussian needs a jax.random key"),
    (lambda: attacks.uniform(X, 2, KEY, minval=1.0, maxval=0.0), r"uniform needs minval"),
    (lambda: attacks.mimic(X, 2, idx=-1), r"mimic needs idx >= 0"),
    (lambda: attacks.mimic(X, 2, idx=7), r"mimic needs 0 <= idx < h"),
    (lambda: attacks.mimic(X, 2, idx=1.0), r"mimic needs idx"),
    (lambda: attacks.ipm(X, 2, eps=float("nan")), r"ipm needs eps to be a number"),
])
def test_out_of_domain_arguments_raise_naming_the_rule(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_aggregate_refuses_unknown_hyperparameters_when_built():
  with pytest.raises(ValueError, match=r"aggregate\(krum\) got unknown hyperparameter\(s\) ff"):
    flagjax.aggregate(A.krum, ff=1)
  with pytest.raises(ValueError, match=r"aggregate\(flag\) got unknown hyperparameter\(s\) f;"):
    flagjax.aggregate(A.flag, f=1)
  with pytest.raises(ValueError, match=r"krum needs f >= 0"):
    flagjax.aggregate(A.krum, f=-2)
  with pytest.raises(ValueError, match=r"preaggregate\(nnm\) got unknown"):
    flagjax.preaggregate(PA.nnm, g=1)


@pytest.mark.parametrize("module", [flagjax.aggregators, flagjax.attacks,
                                    flagjax.preaggregators, flagjax.sim, flagjax.aggregating,
                                    flagjax.core.gram, flagjax.core.sorting, flagjax])
def test_public_modules_declare_what_is_public(module):
  assert module.__all__
  for name in module.__all__:
    assert hasattr(module, name), name
    assert name not in ("Callable", "Mapping", "Optional", "Sequence", "annotations")


def test_aggregate_matches_the_rule_with_the_centred_gram():
  x = jnp.asarray(offset_rows())
  tx = flagjax.aggregate(A.multi_krum, f=2)
  out, state = tx.update(x, tx.init(x[0]))
  chex.assert_trees_all_close(out, A.multi_krum(x, 2), atol=1e-4)
  assert float(jnp.sum(state.coefficients[:2])) == 0.0
  tx = flagjax.aggregate(A.centered_clipping, tau=0.5)
  out, _ = tx.update(x - 1000, tx.init(x[0]))
  chex.assert_trees_all_close(out, A.centered_clipping(x - 1000, tau=0.5), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A pytree with an empty leaf (a zero-size parameter).

EMPTY_LEAF_CALLS = {
    **F_RULES,
    "mean": lambda x, f: A.mean(x),
    "normalized_mean": lambda x, f: A.normalized_mean(x),
    "caf": A.caf,   # (smea: MDA's subset search on the same Gram, and ~7 s to compile)
    "dnc": lambda x, f: A.dnc(x, f, KEY, subsample_size=5),
    "signguard": lambda x, f: A.signguard(x, KEY),
    "clipped_clustering": lambda x, f: A.clipped_clustering(x),
    "fltrust": lambda x, f: A.fltrust(x, jax.tree.map(lambda leaf: leaf[0], x)),
    "bucketing": lambda x, f: PA.bucketing(x, 2, KEY),
    # Deterministic attacks (a random one draws per leaf: another leaf, other draws).
    **{name: functools.partial(attack, key=KEY) for name, attack in (
        ("sign_flip", attacks.sign_flip), ("alie", attacks.alie), ("min_max", attacks.min_max),
        ("min_sum", attacks.min_sum), ("optimal_ipm(median)", attacks.optimal_ipm(A.median)))},
}
EMPTY_LEAF_CALLS.pop("flag_lam8")


@pytest.mark.parametrize("name", sorted(EMPTY_LEAF_CALLS))
def test_an_empty_leaf_changes_nothing(name):
  # min_max / min_sum raised "zero-size array to reduction operation max" on a [n, 0] leaf.
  call = jax.jit(EMPTY_LEAF_CALLS[name], static_argnums=1)
  x = {"w": jnp.asarray(quantised_rows(3, 15, 6))}
  out = call({**x, "empty": jnp.zeros((15, 0, 2))}, 3)
  chex.assert_shape(out["empty"], out["w"].shape[:-1] + (0, 2))
  chex.assert_trees_all_close(out["w"], call(x, 3)["w"], rtol=1e-6, atol=1e-6)
