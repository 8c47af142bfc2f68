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

N, F, D = 11, 2, 7
KEY = jax.random.key(0)

REVERSE = {
    "mean": A.mean,
    "median": A.median,
    "trimmed_mean": lambda x: A.trimmed_mean(x, F),
    "meamed": lambda x: A.meamed(x, F),
    "phocas": lambda x: A.phocas(x, F),
    "krum": lambda x: A.krum(x, F),
    "multi_krum": lambda x: A.multi_krum(x, F),
    "bulyan": lambda x: A.bulyan(x, F),
    "centered_clipping": A.centered_clipping,
    "mda": lambda x: A.mda(x, F),
    "monna": lambda x: A.monna(x, F),
    "normalized_mean": A.normalized_mean,
    "caf": lambda x: A.caf(x, F),
    "smea": lambda x: A.smea(x, F),
    "dnc": lambda x: A.dnc(x, F, KEY),
    "signguard": lambda x: A.signguard(x, KEY),
    "clipped_clustering": A.clipped_clustering,
    "fltrust": lambda x: A.fltrust(x, 2 * x[0]),
    "nnm": lambda x: PA.nnm(x, F),
    "bucketing": lambda x: PA.bucketing(x, 2, KEY),
    "clip": lambda x: PA.clip(x, 1.0),
    "arc": lambda x: PA.arc(x, F),
    **{name: functools.partial(attack, f=F, key=KEY) for name, attack in (
        ("sign_flip", attacks.sign_flip), ("ipm", attacks.ipm), ("alie", attacks.alie),
        ("mimic", attacks.mimic), ("scaled", attacks.scaled), ("min_max", attacks.min_max),
        ("min_sum", attacks.min_sum), ("fang", attacks.fang),
        ("optimal_ipm(median)", attacks.optimal_ipm(A.median)),
        ("optimal_alie(krum)", attacks.optimal_alie(A.krum, f=F)))},
}
FORWARD_ONLY = {"geometric_median": A.geometric_median}


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


NASTY = {"zero_rows": zero_rows, "tied_rows": tied_rows}


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
