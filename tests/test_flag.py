"""The Flag Aggregator against a d-space numpy oracle (docs/design.md), and invariants."""

import functools
import importlib

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from experiments.flag_dspace import flag_dspace
from flagjax import aggregators
from flagjax.core import gram as gram_lib
from tests import helpers

# The module (its name is shadowed by the function in flagjax.aggregators).
flag_lib = importlib.import_module("flagjax.aggregators.flag")

SCALES = ("rank", "mean", "norm")
# Float32 comparisons between two computation orders: a fixed number of IRLS steps (with
# tol > 0 the stopping step is decided by float32 noise in A) and tolerances for weights up
# to 1/sqrt(eps) acting on rounding.
FIXED_F32 = dict(max_iters=8, tol=0.0)

# Jitted once per input shape (hyperparameters other than rank and scale are traced).
# One start (the flag mean), as the oracle; several starts are tested on their own.
solve = jax.jit(functools.partial(aggregators.flag_solve, num_starts=1),
                static_argnames=("rank", "scale"))


def np_flag(x, rank=None, lam=0.0, max_iters=20, tol=1e-6, eps=1e-7, scale="norm"):
  """The Flag Aggregator in d-space (float64): scatter matrices and ``eigh``.

  Pairs: ``|u_i - u_j| > 1e-6`` whose difference the retained eigen-directions of the
  normalised Gram (eigenvalues above 1e-10 x the largest) hold to at least 99%; the pair
  direction is that resolved part, normalised (``(u_i - u_j) / |u_i - u_j|`` when nothing is
  dropped).

  Returns ``(aggregate, coefficients, values, objective, num_iters)``; the coefficients are
  the minimum-norm ones on the u_i (unique whenever the kept u_i are independent), divided by
  |x_i|.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  flat = x.reshape(n, -1)
  finite = np.all(np.isfinite(flat), axis=1)
  norms = np.linalg.norm(np.where(finite[:, None], flat, 0), axis=1)
  kept = finite & (norms > 0)
  units = flat[kept] / norms[kept, None]  # [k, d]
  k = len(units)
  gram_eigvals, gram_eigvecs = np.linalg.eigh(units @ units.T)
  retained = gram_eigvals > 1e-10 * gram_eigvals.max()
  numerical_rank = int(np.sum(retained))
  r = min(n // 2 + 1 if rank is None else rank, numerical_rank)
  # The retained span in d-space, orthonormal: V = U^T Q g^{-1/2}.
  span = units.T @ gram_eigvecs[:, retained] / np.sqrt(gram_eigvals[retained])
  pairs, directions = [], []
  for i in range(k):
    for j in range(i + 1, k):
      difference = units[i] - units[j]
      resolved = span @ (span.T @ difference)
      if (np.linalg.norm(difference) > 1e-6
          and resolved @ resolved >= 0.99 * (difference @ difference)):
        pairs.append((i, j))
        directions.append(resolved / np.linalg.norm(resolved))
  directions = np.array(directions).reshape(len(pairs), flat.shape[1])
  num_pairs = len(pairs)

  def top(weights, pair_weights):
    scatter = units.T @ (weights[:, None] * units)
    if num_pairs:
      scatter += lam / num_pairs * directions.T @ (pair_weights[:, None] * directions)
    _, vecs = np.linalg.eigh(scatter)
    return vecs[:, ::-1][:, :r]

  def ratios(Y):
    return np.sum((units @ Y) ** 2, 1), np.sum((directions @ Y) ** 2, 1)

  def objective(Y):
    values, pair_values = ratios(Y)
    total = np.sum(np.sqrt(np.maximum(0, 1 - values)))
    if num_pairs:
      total += lam * np.mean(np.sqrt(np.maximum(0, 1 - pair_values)))
    return total

  Y = top(np.ones(k), np.ones(num_pairs))
  A = objective(Y)
  num_iters = 0
  while num_iters < max_iters:
    values, pair_values = ratios(Y)
    Y_next = top(1 / np.sqrt(1 - values + eps), 1 / np.sqrt(1 - pair_values + eps))
    A_next = objective(Y_next)
    num_iters += 1
    stop = tol > 0 and A - A_next <= tol * abs(A)
    Y, A = Y_next, A_next
    if stop:
      break
  if scale == "rank":
    aggregate = Y @ (Y.T @ units.sum(0)) / r
  elif scale == "mean":
    aggregate = Y @ (Y.T @ flat[kept].mean(0))
  else:
    aggregate = Y @ (Y.T @ units.sum(0)) / k * np.median(norms[kept])
  coefficients = np.zeros(n)
  coefficients[kept] = np.linalg.pinv(units.T, rcond=1e-8) @ aggregate / norms[kept]
  values = np.zeros(n)
  values[kept] = ratios(Y)[0]
  return aggregate.reshape(x.shape[1:]), coefficients, values, A, num_iters


@functools.partial(jax.jit, static_argnames=("rank",))
def solve_all_scales(x, lam, max_iters, tol, eps=1e-7, rank=None):
  """One compilation per input shape: hyperparameters traced, the three scales at once."""
  return {scale: aggregators.flag_solve(x, rank=rank, lam=lam, max_iters=max_iters, tol=tol,
                                        eps=eps, scale=scale, num_starts=1)
          for scale in SCALES}


def reference_case(name):
  rng = np.random.default_rng(11)
  if name == "random":
    return rng.normal(size=(7, 12)), None
  if name == "duplicated":  # a repeated row and a positive multiple: rank 6 of 8
    x = rng.normal(size=(8, 12))
    x[3] = x[1]
    x[6] = 2.5 * x[2]
    return x, None
  if name == "wide_default_rank":  # n > d: default rank 6 capped at d = 4
    return rng.normal(size=(10, 4)), None
  return rng.normal(size=(10, 4)), 2  # n > d with a proper subspace


def assert_matches_reference(result, expected, atol, objective_atol):
  aggregate, coefficients, values, objective, num_iters = expected
  np.testing.assert_allclose(result.aggregate, aggregate, atol=atol)
  np.testing.assert_allclose(result.coefficients, coefficients, atol=atol)
  np.testing.assert_allclose(result.values, values, atol=atol)
  np.testing.assert_allclose(result.objective, objective, atol=objective_atol)
  assert int(result.num_iters) == num_iters


class FlagReferenceTest(parameterized.TestCase):

  @parameterized.parameters("random", "duplicated", "wide_default_rank", "wide_rank_2")
  def test_against_dspace_reference(self, name):
    x, rank = reference_case(name)
    with jax.enable_x64(True):
      for lam in (0.0, 2.5):
        for max_iters in (0, 1, 5, 25):
          results = solve_all_scales(jnp.asarray(x), lam, max_iters, 0.0, rank=rank)
          for scale in SCALES:
            with self.subTest(lam=lam, max_iters=max_iters, scale=scale):
              result = results[scale]
              self.assertEqual(result.aggregate.dtype, jnp.float64)
              expected = np_flag(x, rank=rank, lam=lam, max_iters=max_iters, tol=0.0,
                                 scale=scale)
              # sqrt(1 - v) near v = 1 turns ~1e-15 errors in v into ~1e-7 per row in A.
              assert_matches_reference(result, expected, atol=1e-9,
                                       objective_atol=x.shape[0] * 1e-7)
              np.testing.assert_allclose(result.coefficients @ x, result.aggregate,
                                         atol=1e-12)

  def test_tol_stops_where_the_reference_stops(self):
    x, _ = reference_case("random")
    with jax.enable_x64(True):
      for lam in (0.0, 2.5):
        result = solve_all_scales(jnp.asarray(x), lam, 200, 1e-6)["rank"]
        expected = np_flag(x, lam=lam, max_iters=200, tol=1e-6, scale="rank")
        self.assertBetween(int(result.num_iters), 2, 199)
        assert_matches_reference(result, expected, atol=1e-9, objective_atol=1e-7)

  def test_flag_dspace_port_agrees(self):
    x = helpers.random_rows(3, 7, 12, np.float64)
    x[2, 0] = np.nan
    x[5] = 0
    with jax.enable_x64(True):
      for lam in (0.0, 2.0):
        ported = flag_dspace(jnp.asarray(x), rank=4, lam=lam, max_iters=5)
        expected = np_flag(x, rank=4, lam=lam, max_iters=5, tol=0.0, scale="rank")[0]
        np.testing.assert_allclose(ported, expected, atol=1e-10)

  def test_coefficients_from_gram_alone(self):
    x = helpers.random_rows(4, 9, 20)
    K = gram_lib.gram(x)
    coefficients = jax.jit(functools.partial(flag_lib.flag_coefficients, scale="norm"))(
        K, lam=1.0)
    result = solve(x, lam=1.0, scale="norm")
    np.testing.assert_allclose(coefficients, result.coefficients, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(coefficients @ x, result.aggregate, rtol=1e-5, atol=1e-6)


class FlagIrlsTest(parameterized.TestCase):

  def test_objective_never_increases(self):
    x, _ = reference_case("random")
    with jax.enable_x64(True):
      for lam in (0.0, 2.5):
        # eps -> 0: the IRLS majorizes sum sqrt(sin^2 + eps), within n sqrt(eps) of A.
        objectives, smoothed = [], []
        for max_iters in range(12):
          result = solve_all_scales(jnp.asarray(x), lam, max_iters, 0.0, eps=1e-12)["rank"]
          self.assertEqual(int(result.num_iters), max_iters)
          objectives.append(float(result.objective))
          smoothed.append(np.sum(np.sqrt(1 - np.asarray(result.values) + 1e-12)))
        steps = np.diff(objectives)
        self.assertTrue(np.all(steps <= 1e-9 + 7e-6), steps)
        self.assertLess(objectives[-1], objectives[0] - 1e-3)  # it does move
        if lam == 0.0:
          self.assertTrue(np.all(np.diff(smoothed) <= 1e-12), np.diff(smoothed))


@hypothesis.given(n=st.sampled_from([5, 8]), seed=st.integers(0, 2**16),
                  lam=st.sampled_from([0.0, 1.0, 4.0]))
def test_property_monotone_and_equivariant(n, seed, lam):
  d = 6  # n = 8 > d: rank-deficient half of the time
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  with jax.enable_x64(True):
    solve = functools.partial(solve_all_scales, lam=lam, tol=0.0, eps=1e-12)
    previous = None
    for max_iters in (0, 1, 2, 4, 8):
      result = solve(jnp.asarray(x), max_iters=max_iters)["rank"]
      if previous is not None:
        assert float(result.objective) <= previous + n * 1e-6 + 1e-9
      previous = float(result.objective)
    results = solve(jnp.asarray(x), max_iters=8)
    # Permuting workers permutes coefficients and values and leaves the aggregate.
    perm = rng.permutation(n)
    permuted = solve(jnp.asarray(x[perm]), max_iters=8)
    # Rotating coordinates rotates the aggregate; positive row scalings change nothing in
    # the "rank" output (the rows are normalised).
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = solve(jnp.asarray(x @ rotation), max_iters=8)
    rescaled = solve(jnp.asarray(x * rng.uniform(0.1, 10, size=(n, 1))), max_iters=8)
    for scale in SCALES:
      np.testing.assert_allclose(permuted[scale].aggregate, results[scale].aggregate,
                                 atol=1e-8)
      np.testing.assert_allclose(permuted[scale].coefficients,
                                 results[scale].coefficients[perm], atol=1e-8)
      np.testing.assert_allclose(permuted[scale].values, results[scale].values[perm],
                                 atol=1e-8)
      np.testing.assert_allclose(rotated[scale].aggregate,
                                 np.asarray(results[scale].aggregate) @ rotation, atol=1e-8)
    np.testing.assert_allclose(rescaled["rank"].aggregate, results["rank"].aggregate,
                               atol=1e-8)
    values = np.asarray(results["rank"].values)
    assert np.all((values >= 0) & (values <= 1))


class FlagTransformsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters(0.0, 3.0)
  def test_float32_against_reference(self, lam):
    x = helpers.random_rows(5, 9, 40)
    result = self.variant(
        functools.partial(aggregators.flag_solve, lam=lam, max_iters=6, tol=0.0,
                          num_starts=1))(x)
    chex.assert_shape(result.aggregate, (40,))
    chex.assert_shape([result.coefficients, result.values], (9,))
    self.assertEqual(result.aggregate.dtype, jnp.float32)
    aggregate, coefficients, values, objective, _ = np_flag(x, lam=lam, max_iters=6, tol=0.0)
    scale = np.abs(aggregate).max()
    # float32 eigensolvers (backward error ~1e-7 |G|) put IRLS transients ~1e-5 off.
    np.testing.assert_allclose(result.aggregate, aggregate, atol=2e-4 * scale)
    np.testing.assert_allclose(result.values, values, atol=2e-4)
    c = np.asarray(result.coefficients, np.float64)
    # A float32 sum of c_i x_i: rounding relative to sum |c_i x_i|, not to the result.
    np.testing.assert_allclose(c @ x, result.aggregate, atol=1e-6 * np.max(np.abs(c) @ np.abs(x)))
    np.testing.assert_allclose(result.objective, objective, atol=1e-4)

  def test_vmap_over_a_batch_of_problems(self):
    x = np.stack([helpers.random_rows(s, 7, 12) for s in range(3)])
    # Early stopping under vmap: each problem keeps its own iteration count and result.
    batched = jax.jit(jax.vmap(lambda b: aggregators.flag_solve(b, lam=1.0, max_iters=50)))(x)
    chex.assert_shape(batched.aggregate, (3, 12))
    for b in range(3):
      single = solve(x[b], lam=1.0, max_iters=50)
      self.assertEqual(int(batched.num_iters[b]), int(single.num_iters))
      np.testing.assert_allclose(batched.aggregate[b], single.aggregate, atol=1e-5)
      np.testing.assert_allclose(batched.values[b], single.values, atol=1e-5)
    self.assertGreater(len(set(np.asarray(batched.num_iters).tolist())), 1)

  def test_pytree_equals_concatenated_rows(self):
    flat = helpers.random_rows(6, 9, 17)
    tree = {"w": flat[:, :12].reshape(9, 3, 4), "b": flat[:, 12:]}
    out = aggregators.flag(tree, lam=2.0, scale="norm", **FIXED_F32)
    chex.assert_shape([out["w"], out["b"]], [(3, 4), (5,)])
    expected = aggregators.flag(flat, lam=2.0, scale="norm", **FIXED_F32)
    np.testing.assert_allclose(out["w"].reshape(-1), expected[:12], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], expected[12:], rtol=1e-5, atol=1e-6)

  def test_bfloat16_computes_in_float32(self):
    x = jnp.asarray(helpers.random_rows(7, 9, 16), jnp.bfloat16)
    flag = jax.jit(functools.partial(aggregators.flag, lam=1.0))  # eager: every op compiled
    out = flag(x)
    self.assertEqual(out.dtype, jnp.bfloat16)
    expected = flag(x.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(np.float32), expected, atol=1e-2)

  def test_nonfinite_and_zero_rows_are_left_out(self):
    n = 9
    x = helpers.random_rows(8, n, 16)
    bad_rows = [0, 4, 7]
    bad = helpers.poison(x, rows=[0, 4])
    bad[7] = 0
    kept = [i for i in range(n) if i not in bad_rows]
    for scale in SCALES:
      result = solve(bad, lam=1.0, scale=scale, **FIXED_F32)
      self.assertTrue(np.all(np.isfinite(result.aggregate)))
      np.testing.assert_array_equal(result.coefficients[np.array(bad_rows)], 0)
      np.testing.assert_array_equal(result.values[np.array(bad_rows)], 0)
      # Same as the kept rows alone (with the rank that n = 9 rows give by default).
      alone = solve(x[kept], lam=1.0, scale=scale, **FIXED_F32, rank=flag_lib.default_rank(n))
      np.testing.assert_allclose(result.aggregate, alone.aggregate, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(result.coefficients[np.array(kept)], alone.coefficients,
                                 rtol=1e-4, atol=1e-5)

  def test_a_single_finite_row_and_none(self):
    x = helpers.random_rows(9, 3, 8)
    bad = helpers.poison(x, rows=[1, 2])
    # One kept row: rank 1, the "rank" output is that row normalised; "mean" and the default
    # "norm" (its direction times the median kept norm, its own) give the row itself.
    np.testing.assert_allclose(solve(bad, scale="rank").aggregate, x[0] / np.linalg.norm(x[0]),
                               rtol=1e-5)
    np.testing.assert_allclose(solve(bad, scale="mean").aggregate, x[0], rtol=1e-5)
    np.testing.assert_allclose(solve(bad).aggregate, x[0], rtol=1e-5)
    # No finite row: NaN says there is nothing to aggregate; finite zero rows give zero.
    nothing = solve(helpers.poison(x, rows=[0, 1, 2]))
    self.assertTrue(np.all(np.isnan(nothing.aggregate)))
    self.assertTrue(np.all(np.isnan(nothing.coefficients)))
    zeros = solve(np.zeros_like(x))
    np.testing.assert_array_equal(zeros.aggregate, 0)

  @parameterized.parameters(("rank", 0.0), ("norm", 2.0))
  def test_coordinate_sharded_matches_unsharded(self, scale, lam):
    x = {"a": helpers.random_rows(10, 10, 64), "b": helpers.random_rows(11, 10, 16)}
    rule = functools.partial(aggregators.flag, lam=lam, scale=scale, **FIXED_F32)
    sharded = helpers.run_coordinate_sharded(rule, x)
    # The psum-ed K rounds differently from the unsharded one and 8 float32 IRLS updates carry
    # it: ~1e-5 on outputs of size ~0.3 (5e-5 is ~1.5e-4 of the output's scale).
    chex.assert_trees_all_close(sharded, rule(x), rtol=1e-4, atol=5e-5)

  def test_coordinate_sharded_reduces_one_gram_and_shares_one_solve(self):
    x = helpers.random_rows(12, 10, 64)
    fn = jax.shard_map(lambda xs: aggregators.flag(xs, lam=2.0, axis_name="coords"),
                       mesh=helpers.coordinate_mesh(),
                       in_specs=jax.sharding.PartitionSpec(None, "coords"),
                       out_specs=jax.sharding.PartitionSpec("coords"))
    reductions = []

    def visit(jaxpr):
      for eqn in jaxpr.eqns:
        if "psum" in eqn.primitive.name or "all_gather" in eqn.primitive.name:
          reductions.append([v.aval.shape for v in eqn.invars])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          visit(sub)

    visit(jax.make_jaxpr(fn)(x).jaxpr)
    # The n x n Gram, then the solve's result (coefficients, values, objective, num_iters,
    # converged: 23 words in one vector) from the one device that ran it
    # (gram_lib.solve_once): nothing of size d.
    self.assertEqual(reductions, [[(10, 10)], [(23,)]])

  def test_bounds(self):
    x = helpers.random_rows(0, 5, 3)
    with self.assertRaisesRegex(ValueError, "flag needs rank >= 1, got rank=0"):
      aggregators.flag(x, rank=0)
    with self.assertRaisesRegex(ValueError, "flag needs scale in"):
      aggregators.flag(x, scale="median")
    with self.assertRaisesRegex(ValueError, "flag needs max_iters >= 0, got max_iters=-1"):
      aggregators.flag(x, max_iters=-1)
    with self.assertRaisesRegex(ValueError, "flag needs lam >= 0, got lam=-1.0"):
      aggregators.flag(x, lam=-1.0)
    with self.assertRaisesRegex(ValueError, "flag needs eps > 0"):
      aggregators.flag(x, eps=0.0)


@functools.partial(jax.jit, static_argnames=("scale",))
def flag_and_mean(x, lam, scale):
  return aggregators.flag(x, lam=lam, scale=scale), aggregators.mean(x)


@hypothesis.given(n=st.sampled_from([7, 11]), seed=st.integers(0, 2**16), data=st.data(),
                  attack=st.sampled_from(["same_direction", "orthogonal", "gaussian", "flip"]))
def test_property_byzantine_rows_do_not_turn_the_aggregate(n, seed, data, attack):
  """With f < n/2 Byzantine rows pointing elsewhere, flag keeps to the honest mean."""
  # Opposite rows (flip) cancel honest ones one for one after normalisation: f <= n/3 there.
  f = data.draw(st.integers(1, n // 3 if attack == "flip" else (n - 1) // 2), label="f")
  lam = data.draw(st.sampled_from([0.0, 4.0]), label="lam")
  d = 32
  rng = np.random.default_rng(seed)
  center = rng.normal(size=d)
  # Honest rows: the common direction plus noise, cosine ~0.9 with it.
  honest = center + 0.5 * np.linalg.norm(center) / np.sqrt(d) * rng.normal(size=(n - f, d))
  honest_mean = honest.mean(0)
  elsewhere = rng.normal(size=d)
  if attack == "orthogonal":
    elsewhere -= elsewhere @ honest_mean / (honest_mean @ honest_mean) * honest_mean
  if attack == "gaussian":
    byzantine = 100 * rng.normal(size=(f, d))
  elif attack == "flip":
    byzantine = -10 * honest_mean + rng.normal(size=(f, d))
  else:
    byzantine = 100 * elsewhere + 0.1 * rng.normal(size=(f, d))
  x = np.concatenate([byzantine, honest]).astype(np.float32)

  def cosine(v):
    v = np.asarray(v, np.float64)
    return v @ honest_mean / np.linalg.norm(v) / np.linalg.norm(honest_mean)

  for scale in ("rank", "norm"):
    out, mean = flag_and_mean(x, lam, scale)
    assert cosine(out) > 0.2, (scale, cosine(out))
    assert cosine(out) > cosine(mean), (scale, cosine(out), cosine(mean))


def near_duplicate_case(gap, seed=0, n=10, d=40, rank_of_rows=None):
  """Rows in general position except ``u_9``, ``gap`` away from ``u_0`` (float64)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  u0 = x[0] / np.linalg.norm(x[0])
  step = rng.normal(size=d)
  step -= (step @ u0) * u0
  x[n - 1] = 1.7 * (u0 + gap * step / np.linalg.norm(step))
  return x


@pytest.mark.parametrize("gap", [3e-6, 3e-5, 1e-4, 1e-3, 0.0])
@pytest.mark.parametrize("lam", [0.0, 8.0])
def test_near_duplicate_rows_match_the_dspace_oracle(gap, lam):
  x = near_duplicate_case(gap)
  with jax.enable_x64(True):
    result = solve(jnp.asarray(x), rank=3, lam=lam, max_iters=30, tol=0.0)
  expected = np_flag(x, rank=3, lam=lam, max_iters=30, tol=0.0)
  scale = np.linalg.norm(expected[0])
  np.testing.assert_allclose(np.asarray(result.aggregate), expected[0], atol=1e-8 * scale)
  np.testing.assert_allclose(float(result.objective), expected[3], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("lam", [0.0, 8.0])
def test_objective_is_zero_when_the_subspace_fits_exactly(dtype, tolerance, lam):
  rng = np.random.default_rng(3)
  x = np.zeros((8, 10))
  x[:, :3] = rng.integers(-3, 4, size=(8, 3))
  x[np.abs(x).sum(1) == 0, 0] = 1
  with jax.enable_x64(dtype == np.float64):
    result = solve(jnp.asarray(x, dtype), rank=3, lam=lam)
  assert float(result.objective) <= tolerance
  np.testing.assert_allclose(np.asarray(result.values), 1, atol=10 * tolerance)


def test_objective_has_no_noise_floor_for_a_close_pair_with_n_above_d():
  # n = 8 rows in d = 3, one pair 1e-4 apart, lam = 8 (float64): the rank-3 subspace is
  # the whole space, so A is 0.
  x = np.random.default_rng(4).normal(size=(8, 3))
  x[7] = x[2] + 1e-4 * np.array([1.0, -2.0, 0.5])
  with jax.enable_x64(True):
    result = solve(jnp.asarray(x), rank=3, lam=8.0)
  assert float(result.objective) <= 1e-12


def np_grassmann_best(x, rank, lam, restarts=30, seed=0):
  """The least A over restarts of Riemannian gradient descent on Gr(rank, span of the rows),
  written here in numpy (float64) independently of flagjax: Armijo steps, QR retraction."""
  units = x / np.linalg.norm(x, axis=1, keepdims=True)
  basis = np.linalg.svd(units.T, full_matrices=False)[0]
  a = units @ basis
  pairs = [(a[i] - a[j]) / np.linalg.norm(a[i] - a[j])
           for i in range(len(a)) for j in range(i + 1, len(a))]
  pairs = np.array(pairs) if lam > 0 else np.zeros((0, a.shape[1]))

  def value_and_grad(Z, smooth):
    # smooth = 0 (the final, exact value) may meet a zero sine: its gradient is not used.
    total, grad = 0.0, np.zeros_like(Z)
    for vectors, scale in ((a, 1.0), (pairs, lam / max(len(pairs), 1))):
      if not len(vectors):
        continue
      p = vectors @ Z
      sines = np.sqrt(np.maximum(1 - np.sum(p * p, 1), 0) + smooth)
      total += scale * sines.sum()
      if smooth > 0:
        grad -= scale * vectors.T @ (p / sines[:, None])
    return total, grad - Z @ (Z.T @ grad)

  rng = np.random.default_rng(seed)
  best = np.inf
  for _ in range(restarts):
    Z = np.linalg.qr(rng.normal(size=(a.shape[1], rank)))[0]
    for smooth in (1e-8, 1e-14):
      value, grad = value_and_grad(Z, smooth)
      step = 0.1
      for _ in range(300):
        norm2 = np.sum(grad * grad)
        while step > 1e-12:
          candidate = np.linalg.qr(Z - step * grad)[0]
          new, new_grad = value_and_grad(candidate, smooth)
          if new <= value - 1e-4 * step * norm2:
            Z, value, grad, step = candidate, new, new_grad, 2 * step
            break
          step /= 2
    best = min(best, value_and_grad(Z, 0.0)[0])
  return best


# Each case costs ~20 s of Grassmannian search: one clean case, one with Byzantine rows and
# the pair term.
@pytest.mark.parametrize("seed,d,lam,byzantine", [(0, 20, 0.0, 0), (2, 200, 8.0, 3)])
def test_multistart_flag_against_an_independent_grassmannian_search(seed, d, lam, byzantine):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(15, d))
  x[15 - byzantine:] = rng.uniform(size=(byzantine, d))
  best = np_grassmann_best(x, 8, lam, seed=seed)
  with jax.enable_x64(True):
    single = aggregators.flag_solve(jnp.asarray(x), rank=8, lam=lam, max_iters=500)
    several = aggregators.flag_solve(jnp.asarray(x), rank=8, lam=lam, max_iters=500,
                                     num_starts=8)
  assert bool(single.converged) and bool(several.converged)
  assert float(several.objective) <= float(single.objective) + 1e-12
  # The measured state (module docstring): within 1% of the search's best, not yet 0.05%.
  assert float(several.objective) <= best * 1.01, (float(several.objective), best)


def test_more_starts_never_raise_the_objective_and_one_start_is_the_flag_mean_run():
  x = np.random.default_rng(5).normal(size=(15, 20)).astype(np.float32)
  solve_k = jax.jit(aggregators.flag_solve, static_argnames=("num_starts",))
  objectives = [float(solve_k(jnp.asarray(x), num_starts=k).objective) for k in (1, 2, 4, 8)]
  # (float32: the batched start 0 rounds like the single run only to ~1e-6 of A)
  assert all(b <= a * (1 + 1e-5) for a, b in zip(objectives, objectives[1:])), objectives
  single = solve_k(jnp.asarray(x), num_starts=1)
  chex.assert_trees_all_close(single.aggregate, solve(jnp.asarray(x)).aggregate, atol=1e-5)
  with pytest.raises(ValueError, match="flag needs num_starts >= 1"):
    aggregators.flag(jnp.asarray(x), num_starts=0)
