"""Differentiating through the rules, pre-aggregators and attacks.

A rule used inside a model (robust pooling), a gradient-based adaptive attack, or a
meta-learned defence takes ``jax.grad`` through ``rule(x)``. The derivative must then be the
derivative: finite on the inputs a rule meets (zero rows, duplicated rows, constant columns)
wherever the function is differentiable, and equal to a central difference of the function
itself on generic inputs (float64). A Byzantine row of NaN/Inf that a rule leaves out gets
gradient 0 and leaves every other row's gradient finite. ``geometric_median`` is
differentiated at its fixed point (implicit function theorem), in both modes. ``flag``
refuses both by name (``checks.NotDifferentiableError``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flagjax import aggregators as A
from flagjax import attacks
from flagjax import preaggregators as PA
from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import safe_math
from tests import helpers

N, F, D = 11, 2, 7
KEY = jax.random.key(0)

REVERSE = {
    "mean": A.mean,
    "median": A.median,
    "trimmed_mean": lambda x, **kw: A.trimmed_mean(x, F, **kw),
    "meamed": lambda x, **kw: A.meamed(x, F, **kw),
    "phocas": lambda x, **kw: A.phocas(x, F, **kw),
    "krum": lambda x, **kw: A.krum(x, F, **kw),
    "multi_krum": lambda x, **kw: A.multi_krum(x, F, **kw),
    "bulyan": lambda x, **kw: A.bulyan(x, F, **kw),
    "centered_clipping": A.centered_clipping,
    "mda": lambda x, **kw: A.mda(x, F, **kw),
    "monna": lambda x, **kw: A.monna(x, F, **kw),
    "normalized_mean": A.normalized_mean,
    "caf": lambda x, **kw: A.caf(x, F, **kw),
    "smea": lambda x, **kw: A.smea(x, F, **kw),
    "dnc": lambda x, **kw: A.dnc(x, F, KEY, **kw),
    "signguard": lambda x, **kw: A.signguard(x, KEY, **kw),
    "clipped_clustering": A.clipped_clustering,
    "fltrust": lambda x, **kw: A.fltrust(x, 2 * x[0], **kw),
    "nnm": lambda x, **kw: PA.nnm(x, F, **kw),
    "bucketing": lambda x, **kw: PA.bucketing(x, 2, KEY, **kw),
    "clip": lambda x, **kw: PA.clip(x, 1.0, **kw),
    "arc": lambda x, **kw: PA.arc(x, F, **kw),
    **{name: functools.partial(attack, f=F, key=KEY) for name, attack in (
        ("sign_flip", attacks.sign_flip), ("ipm", attacks.ipm), ("alie", attacks.alie),
        ("mimic", attacks.mimic), ("scaled", attacks.scaled), ("min_max", attacks.min_max),
        ("min_sum", attacks.min_sum), ("fang", attacks.fang),
        ("optimal_ipm(median)", attacks.optimal_ipm(A.median)),
        ("optimal_alie(krum)", attacks.optimal_alie(A.krum, f=F)))},
    # Converged (tol far below the central difference's step): its derivative is the fixed
    # point's, and so is the difference of two converged answers.
    "geometric_median": lambda x, **kw: A.geometric_median(x, max_iters=1000, tol=1e-12, **kw),
}
# The rules that leave out every row holding NaN/Inf (up to F of them).
ROBUST = sorted({"median", "trimmed_mean", "meamed", "phocas", "krum", "multi_krum", "bulyan",
                 "centered_clipping", "mda", "monna", "normalized_mean", "caf", "smea", "dnc",
                 "signguard", "clipped_clustering", "fltrust", "geometric_median"})
COORDINATEWISE = {"median", "trimmed_mean", "meamed", "phocas"}
# Rules whose derivative runs through a hand-written JVP beyond the Gram and the combination
# (the implicit fixed point, the top eigenpair, products with g0, the sorting comparators).
OWN_JVP = {"geometric_median", "caf", "fltrust", "median", "centered_clipping"}
SHARDED_D = 16   # coordinates, split 8 ways


def generic_rows(dtype=np.float32):
  return np.random.default_rng(0).normal(size=(N, D)).astype(dtype)


def zero_rows():
  """A zero row and a row of 1e-20 (its squared norm underflows to 0 in float32)."""
  x = generic_rows()
  x[5] = 0
  x[6] = 1e-20
  return x


def tied_rows():
  """Duplicated rows and a constant column."""
  x = generic_rows()
  x[8] = x[7]
  x[3] = x[7]
  x[:, 2] = 1.5
  return x


def equal_rows():
  """Every row the same (no spread at all: zero distances, zero covariance, zero slack)."""
  return np.tile(generic_rows()[:1], (N, 1))


NASTY = {"zero_rows": zero_rows, "tied_rows": tied_rows, "equal_rows": equal_rows}


def weighted_sum(fn):
  """``x -> sum(fn(x) * w)``, a fixed generic weighting of every output entry."""
  def value(x):
    leaves = jax.tree.leaves(fn(x))
    return sum(jnp.sum(leaf * jnp.cos(jnp.arange(leaf.size, dtype=leaf.dtype)).reshape(
        leaf.shape)) for leaf in leaves)
  return value


def nonfinite_rows():
  """F Byzantine rows: one all NaN, one with a single +Inf."""
  x = generic_rows()
  x[2] = np.nan
  x[4, 3] = np.inf
  return x


def check_nonfinite_rows_get_gradient_zero(name, gradient):
  """A row of NaN/Inf that the rule leaves out gets gradient 0, and every other row a finite
  one (with :func:`nonfinite_rows`; called from the nasty-rows test, which compiled
  ``gradient`` for this shape)."""
  # 0 * NaN in reverse mode: the Gram's transpose multiplied every row's cotangent by the NaN
  # row, the combination sent the NaN row's x_i back as its coefficient's cotangent, and the
  # row sums of squares sent 2 x_i * 0. Geometric median, centered clipping, CAF, Clipped
  # Clustering and FLTrust had NaN gradients on every row; normalized mean and SignGuard on
  # the NaN rows.
  x = jnp.asarray(nonfinite_rows())
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(REVERSE[name](x)))
  grad = np.asarray(gradient(x))
  assert np.all(np.isfinite(grad)), grad
  # Coordinate-wise rules judge each coordinate alone: row 4's finite entries may be used.
  left_out = ~np.isfinite(np.asarray(x))
  if name not in COORDINATEWISE:
    left_out = np.broadcast_to(np.any(left_out, axis=1, keepdims=True), left_out.shape)
  np.testing.assert_array_equal(grad[left_out], 0)


@pytest.mark.parametrize("name", sorted(REVERSE))
def test_gradient_is_finite_on_nasty_rows_and_zero_on_left_out_byzantine_rows(name):
  gradient = jax.jit(jax.grad(weighted_sum(REVERSE[name])))   # one compile for every input
  for rows in sorted(NASTY):
    grad = gradient(jnp.asarray(NASTY[rows]()))
    assert bool(jnp.all(jnp.isfinite(grad))), (rows, np.asarray(grad))
  if name in ROBUST:
    check_nonfinite_rows_get_gradient_zero(name, gradient)


def test_geometric_median_gradient_ignores_nonfinite_rows_as_if_removed():
  # The geometric median gives NaN/Inf rows weight 0, so near x it is the geometric median of
  # the finite rows alone: the same gradient on those rows.
  x = nonfinite_rows()
  finite = np.all(np.isfinite(x), axis=1)
  value = weighted_sum(REVERSE["geometric_median"])
  grad = np.asarray(jax.jit(jax.grad(value))(jnp.asarray(x)))
  alone = np.asarray(jax.jit(jax.grad(value))(jnp.asarray(x[finite])))
  np.testing.assert_allclose(grad[finite], alone, rtol=1e-4, atol=1e-5)


def test_gradient_with_respect_to_fltrust_s_server_update_ignores_nonfinite_rows():
  # A row of zero norm and a NaN row both get trust 0 whatever g0 is: replacing the NaN rows
  # by zero rows leaves the function of g0 unchanged, hence its gradient.
  x = nonfinite_rows()
  zeroed = np.where(np.all(np.isfinite(x), axis=1, keepdims=True), x, 0)
  server = jnp.asarray(np.random.default_rng(3).normal(size=D).astype(np.float32))

  def grad_of(rows):
    value = lambda g: weighted_sum(lambda x: A.fltrust(x, g))(jnp.asarray(rows))  # noqa: E731
    return np.asarray(jax.jit(jax.grad(value))(server))

  with_nan = grad_of(x)
  assert np.all(np.isfinite(with_nan))
  np.testing.assert_allclose(with_nan, grad_of(zeroed), rtol=1e-5, atol=1e-6)


def test_geometric_median_derivative_at_a_row_follows_that_row():
  # The median sits on row 0 (the other rows in opposite pairs around it): small moves of the
  # others leave it there, so the Jacobian is the identity on row 0 and 0 elsewhere.
  with jax.enable_x64(True):
    pairs = np.random.default_rng(4).normal(size=(4, 5))
    x = jnp.asarray(np.concatenate([np.full((1, 5), 1e-3), pairs, -pairs]))
    jacobian = np.asarray(jax.jit(jax.jacrev(A.geometric_median))(x))   # [5, 9, 5]
  np.testing.assert_allclose(jacobian[:, 0, :], np.eye(5), atol=1e-12)
  np.testing.assert_array_equal(jacobian[:, 1:, :], 0)


@pytest.mark.parametrize("name", ["geometric_median", "centered_clipping", "caf"])
@pytest.mark.parametrize("reference", ["sampled", "rejected"])
def test_gradient_through_a_large_leaf_equals_the_split_leaves_one(name, reference):
  # A leaf of two Gram chunks or more centres its Gram on a row sampled from the first chunk,
  # checked in a while_loop through which reverse mode did not go: jax.grad of geometric
  # median, centered clipping and CAF raised on any such leaf (a 32k-parameter layer). Split
  # into leaves under one chunk (a plain reference, no loop), the rows are the same function
  # input, so the gradient must be the same. "rejected": row 0 looks central in the first
  # chunk and lies far away beyond it, so the check fails and the full-norm reference is used.
  size = 2 * gram_lib.GRAM_CHUNK + 5
  x = np.random.default_rng(5).normal(size=(N, size)).astype(np.float32)
  if reference == "rejected":
    x[0, :gram_lib.GRAM_CHUNK] = np.mean(x[1:, :gram_lib.GRAM_CHUNK], axis=0)
    x[0, gram_lib.GRAM_CHUNK:] += 50
  x = jnp.asarray(x)
  bounds = [0, gram_lib.GRAM_CHUNK - 1, 2 * gram_lib.GRAM_CHUNK - 2, size]
  split = lambda x: [x[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # noqa: E731
  fn = REVERSE[name]
  whole = jax.jit(jax.grad(weighted_sum(fn)))(x)
  pieces = jax.jit(jax.grad(lambda x: weighted_sum(lambda parts: jnp.concatenate(
      jax.tree.leaves(fn(parts)), -1))(split(x))))(x)
  assert bool(jnp.all(jnp.isfinite(whole)))
  np.testing.assert_allclose(np.asarray(whole), np.asarray(pieces), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("derivative", ["grad", "jvp"])
def test_flag_refuses_a_derivative_by_name_and_passes_stop_gradient(derivative):
  # Forward mode used to return NaN (eigenvector derivatives at repeated eigenvalues), also on
  # generic rows with n > d.
  x = jnp.asarray(generic_rows())
  value = weighted_sum(A.flag)
  with pytest.raises(checks.NotDifferentiableError, match="flag is not differentiable"):
    if derivative == "grad":
      jax.grad(value)(x)
    else:
      jax.jvp(value, (x,), (x,))
  # Differentiating something else through a stopped flag is fine.
  stopped = jax.grad(lambda s: s * value(jax.lax.stop_gradient(x)))(1.0)
  np.testing.assert_allclose(float(stopped), float(value(x)), rtol=1e-6)


def central_difference(fn, x, direction, step=1e-6):
  return (float(fn(x + step * direction)) - float(fn(x - step * direction))) / (2 * step)


@pytest.mark.parametrize("name", sorted(REVERSE))
def test_derivative_equals_a_central_difference_on_generic_rows(name):
  # float64, generic rows: every selection has a margin far above the step, so the function
  # is smooth there and the difference is its derivative to ~1e-8; forward mode agrees.
  fn = REVERSE[name]
  with jax.enable_x64(True):
    x = jnp.asarray(generic_rows(np.float64))
    direction = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    value = jax.jit(weighted_sum(fn))
    derivative = float(jnp.vdot(jax.jit(jax.grad(value))(x), direction))
    expected = central_difference(value, x, direction)
    if name in OWN_JVP:   # forward mode runs the hand-written rules directly
      forward = float(jax.jit(lambda x, t: jax.jvp(value, (x,), (t,))[1])(x, direction))
      np.testing.assert_allclose(forward, derivative, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(derivative, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_derivative_through_the_bitonic_sort_equals_a_central_difference(name):
  # Above NETWORK_MAX_WORKERS (128) the coordinate-wise rules sort column blocks by the
  # bitonic network, whose comparators share the network's derivative (core.sorting).
  fn = {"median": A.median, "trimmed_mean": lambda x: A.trimmed_mean(x, 20)}[name]
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(130, 9)))
    direction = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    value = jax.jit(weighted_sum(fn))
    derivative = float(jnp.vdot(jax.jit(jax.grad(value))(x), direction))
    expected = central_difference(value, x, direction)
  np.testing.assert_allclose(derivative, expected, rtol=1e-5, atol=1e-7)


# Rules and attacks with a reduction across coordinates (a psum when sharded), whose
# transposes the sharded gradient runs through. The others (mean, the coordinate-wise rules,
# bucketing, sign flip, IPM, ALIE, mimic, scaled) compute each coordinate from that coordinate
# alone, so their sharded program holds no collective to differentiate. (Fang draws its rows
# for the shard's shape, so its sharded rows differ by design.)
CROSS_COORDINATE = sorted(set(REVERSE) - COORDINATEWISE - {
    "mean", "bucketing", "sign_flip", "ipm", "alie", "mimic", "scaled", "fang"})


@pytest.mark.parametrize("name", CROSS_COORDINATE)
def test_coordinate_sharded_gradient_equals_the_unsharded_one(name):
  # CAF's sharded gradient left out how its weights move with the rows (its n x n solve is
  # shared between devices as int32 bits, which carry no derivative: 0.1 off), and Min-Max /
  # Min-Sum's failed ("Differentiation rule for 'pmax' not implemented").
  x = np.random.default_rng(2).normal(size=(N, SHARDED_D)).astype(np.float32)
  x[5] = 0
  x = jnp.asarray(x)
  unsharded = jax.jit(jax.grad(weighted_sum(REVERSE[name])))(x)
  sharded_fn = lambda x: helpers.run_coordinate_sharded(REVERSE[name], x)  # noqa: E731
  sharded = jax.jit(jax.grad(weighted_sum(sharded_fn)))(x)
  assert bool(jnp.all(jnp.isfinite(sharded)))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), rtol=1e-5, atol=1e-5)


def test_flag_refuses_a_derivative_also_when_sharded():
  # The shared solve's int32 bits had hidden flag's solve from the derivative: the sharded
  # gradient was the one with the subspace held fixed.
  x = jnp.asarray(np.random.default_rng(2).normal(size=(N, SHARDED_D)).astype(np.float32))
  with pytest.raises(checks.NotDifferentiableError, match="flag is not differentiable"):
    jax.grad(weighted_sum(lambda x: helpers.run_coordinate_sharded(A.flag, x)))(x)


@pytest.mark.parametrize("name", ["centered_clipping", "fltrust"])
def test_gradient_with_respect_to_a_float_argument_of_a_rule_on_integer_rows(name):
  # Integer rows are computed in float32, and their own tangent is float0: differentiating
  # with respect to the float argument (the centre, the server's update) must work and equal
  # the derivative on the same rows given as float32.
  rule = {"centered_clipping": lambda x, v: A.centered_clipping(x, center=v),
          "fltrust": A.fltrust}[name]
  x = np.random.default_rng(6).integers(-5, 5, size=(N, D)).astype(np.int32)
  v = jnp.asarray(np.random.default_rng(7).normal(size=D).astype(np.float32))
  grad_of = lambda rows: np.asarray(jax.jit(jax.grad(  # noqa: E731
      lambda v: weighted_sum(lambda x: rule(x, v))(rows)))(v))
  np.testing.assert_allclose(grad_of(jnp.asarray(x)), grad_of(jnp.asarray(x, jnp.float32)),
                             rtol=1e-6, atol=1e-7)


def test_safe_sqrt_has_jnp_sqrt_s_values_and_a_finite_slope_at_zero():
  values = np.array([0.0, -0.0, 1e-30, 2.5, 3e38, np.inf, -1.0, -np.inf, np.nan], np.float32)
  with np.errstate(invalid="ignore"):   # numpy's sqrt of a negative number: NaN, as expected
    expected = np.sqrt(values)
  np.testing.assert_array_equal(np.asarray(safe_math.sqrt(jnp.asarray(values))), expected)
  slope = jax.grad(safe_math.sqrt)
  assert float(slope(0.0)) == 0.0 and float(jax.grad(slope)(0.0)) == 0.0
  np.testing.assert_allclose(float(slope(4.0)), 0.25)
  np.testing.assert_allclose(float(jax.grad(slope)(4.0)), -1 / 32)


@pytest.mark.parametrize("name", ["caf", "geometric_median", "fltrust"])
def test_hessian_vector_product_equals_a_central_difference_of_the_gradient(name):
  # Second order (a meta-learned defence, an attack that optimises through a gradient): CAF's
  # was NaN (safe_math.sqrt as a custom_jvp inside its scan) and, before that, wrong by 10%
  # (its eigenvector derivative was a sum over eigh's vectors, whose own derivative was taken).
  with jax.enable_x64(True):
    x = jnp.asarray(generic_rows(np.float64))
    direction = jnp.asarray(np.random.default_rng(8).normal(size=x.shape))
    gradient = jax.jit(jax.grad(weighted_sum(REVERSE[name])))
    product = jax.jit(lambda x, t: jax.jvp(gradient, (x,), (t,))[1])(x, direction)
    step = 1e-5
    expected = (gradient(x + step * direction) - gradient(x - step * direction)) / (2 * step)
  assert bool(jnp.all(jnp.isfinite(product)))
  np.testing.assert_allclose(np.asarray(product), np.asarray(expected), rtol=1e-4, atol=1e-6)
