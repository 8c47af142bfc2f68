"""Differentiating through the rules, pre-aggregators and attacks.

A rule used inside a model (robust pooling), a gradient-based adaptive attack, or a
meta-learned defence takes ``jax.grad`` through ``rule(x)``. The derivative must then be the
derivative: finite on the inputs a rule meets (zero rows, duplicated rows, constant columns)
wherever the function is differentiable, and equal to a central difference of the function
itself on generic inputs (float64). ``geometric_median`` stops on a data-dependent test (a
``while_loop``): forward mode (``jax.jvp``) only, reverse mode raises JAX's own error.
``flag`` refuses both by name (``checks.NotDifferentiableError``).
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
}
FORWARD_ONLY = {"geometric_median": A.geometric_median}
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


@pytest.mark.parametrize("rows", sorted(NASTY))
@pytest.mark.parametrize("name", sorted(REVERSE))
def test_reverse_mode_gradient_is_finite_on_nasty_rows(name, rows):
  grad = jax.jit(jax.grad(weighted_sum(REVERSE[name])))(jnp.asarray(NASTY[rows]()))
  assert bool(jnp.all(jnp.isfinite(grad))), np.asarray(grad)


@pytest.mark.parametrize("rows", sorted(NASTY))
@pytest.mark.parametrize("name", sorted(FORWARD_ONLY))
def test_forward_mode_derivative_is_finite_on_nasty_rows(name, rows):
  x = jnp.asarray(NASTY[rows]())
  tangent = jnp.asarray(generic_rows()[::-1].copy())
  _, derivative = jax.jit(lambda x, t: jax.jvp(FORWARD_ONLY[name], (x,), (t,)))(x, tangent)
  assert bool(jnp.all(jnp.isfinite(derivative))), np.asarray(derivative)


def test_reverse_mode_through_a_stopping_test_raises_jax_s_error():
  with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
    jax.grad(weighted_sum(A.geometric_median))(jnp.asarray(generic_rows()))


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


@pytest.mark.parametrize("name", sorted(REVERSE) + sorted(FORWARD_ONLY))
def test_derivative_equals_a_central_difference_on_generic_rows(name):
  # float64, generic rows: every selection has a margin far above the step, so the function
  # is smooth there and the difference is its derivative to ~1e-8.
  fn = {**REVERSE, **FORWARD_ONLY}[name]
  with jax.enable_x64(True):
    x = jnp.asarray(generic_rows(np.float64))
    direction = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    value = jax.jit(weighted_sum(fn))
    if name in REVERSE:
      derivative = float(jnp.vdot(jax.jit(jax.grad(value))(x), direction))
    else:
      derivative = float(jax.jit(lambda x, t: jax.jvp(value, (x,), (t,))[1])(x, direction))
    expected = central_difference(value, x, direction)
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


# (Fang draws its rows for the shard's shape, so its sharded rows differ by design.)
@pytest.mark.parametrize("name", sorted(set(REVERSE) - {"fang"}))
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
