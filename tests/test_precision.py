"""Every matrix product in flagjax runs at full float32 precision, on every backend.

JAX's default precision for float32 products is backend-dependent: full float32 on CPU, but
TF32 (10 mantissa bits) on recent NVIDIA GPUs and bfloat16 passes (8 bits) on TPUs. A robust
rule's Gram, weighted mean or covariance computed that way is wrong in the third digit, and a
finite row near the float maximum can round to Inf. The CPU cannot show the difference (it
ignores the setting), so these tests read the traced programs instead: every ``dot_general``
in every rule, pre-aggregator and attack, unsharded and coordinate-sharded, must ask for
``Precision.HIGHEST`` on both operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import PartitionSpec as P

import flagjax
from flagjax import aggregators
from flagjax import attacks
from flagjax import preaggregators
from flagjax.core import spectral
from tests import helpers

_KEY = jax.random.key(0)


def _products(jaxpr) -> list:
  """Every ``dot_general`` equation of a jaxpr and of the jaxprs nested in it (cond branches,
  loop bodies, shard_map, custom derivatives, pjit)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for param in eqn.params.values():
      for value in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(value, jax_core.ClosedJaxpr):
          found += _products(value.jaxpr)
        elif isinstance(value, jax_core.Jaxpr):
          found += _products(value)
  return found


def _below_highest(fn, *args) -> list[str]:
  """The products in ``fn``'s traced program that do not ask for HIGHEST on both operands,
  each named by where it was written."""
  low = []
  for eqn in _products(jax.make_jaxpr(fn)(*args).jaxpr):
    precision = eqn.params["precision"]
    pair = precision if isinstance(precision, tuple) else (precision, precision)
    if any(p != jax.lax.Precision.HIGHEST for p in pair):
      low.append(_where(eqn))
  return low


def _where(eqn) -> str:
  """Where an equation was written (``file:line (function)``), or the equation itself where
  this jax keeps that elsewhere (the helper is internal)."""
  try:
    from jax._src import source_info_util  # noqa: PLC0415
    return source_info_util.summarize(eqn.source_info)
  except (ImportError, AttributeError):
    return str(eqn)


def _rows(n: int):
  """A two-leaf pytree of ``n`` rows (16 coordinates each leaf, divisible by 8 shards)."""
  rng = np.random.default_rng(n)
  return {"w": jnp.asarray(rng.normal(size=(n, 2, 8)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(n, 16)), jnp.float32)}


# Every rule and pre-aggregator with its static arguments, as ``(n, f) -> fn(x, **sharding)``.
_RULES = {
    "mean": lambda n, f: aggregators.mean,
    "median": lambda n, f: aggregators.median,
    "trimmed_mean": lambda n, f: functools.partial(aggregators.trimmed_mean, f=f),
    "meamed": lambda n, f: functools.partial(aggregators.meamed, f=f),
    "phocas": lambda n, f: functools.partial(aggregators.phocas, f=f),
    "krum": lambda n, f: functools.partial(aggregators.krum, f=f),
    "multi_krum": lambda n, f: functools.partial(aggregators.multi_krum, f=f),
    "bulyan": lambda n, f: functools.partial(aggregators.bulyan, f=(n - 3) // 4),
    "geometric_median": lambda n, f: aggregators.geometric_median,
    "centered_clipping": lambda n, f: aggregators.centered_clipping,
    "mda": lambda n, f: functools.partial(aggregators.mda, f=min(f, 2)),
    "monna": lambda n, f: functools.partial(aggregators.monna, f=f),
    "flag": lambda n, f: aggregators.flag,
    "flag(lam=8, num_starts)": lambda n, f: functools.partial(
        lambda x, **kw: aggregators.flag_solve(x, lam=8.0, num_starts=3, **kw).aggregate),
    "normalized_mean": lambda n, f: aggregators.normalized_mean,
    "caf": lambda n, f: functools.partial(aggregators.caf, f=f),
    "smea": lambda n, f: functools.partial(aggregators.smea, f=min(f, 2)),
    "dnc": lambda n, f: functools.partial(aggregators.dnc, f=f, key=_KEY),
    "signguard": lambda n, f: functools.partial(aggregators.signguard, key=_KEY),
    "clipped_clustering": lambda n, f: aggregators.clipped_clustering,
    "nnm": lambda n, f: functools.partial(preaggregators.nnm, f=f),
    "clip": lambda n, f: functools.partial(preaggregators.clip, c=1.0),
    "arc": lambda n, f: functools.partial(preaggregators.arc, f=f),
}


@pytest.mark.parametrize("name", sorted(_RULES))
def test_rules_ask_for_full_precision(name):
  n = 12
  rule = _RULES[name](n, 2)
  assert _below_highest(rule, _rows(n)) == []


def test_fltrust_and_bucketing_ask_for_full_precision():
  x = _rows(12)
  server = jax.tree.map(lambda leaf: leaf[0], x)
  assert _below_highest(lambda x: aggregators.fltrust(x, server), x) == []
  assert _below_highest(lambda x: preaggregators.bucketing(x, 2, _KEY), x) == []


def test_large_matrix_paths_ask_for_full_precision():
  """From ``LANCZOS_MIN_ROWS`` rows the spectral filters take the Lanczos path."""
  n = spectral.LANCZOS_MIN_ROWS
  x = _rows(n)
  assert _below_highest(lambda x: aggregators.caf(x, 4), x) == []
  assert _below_highest(lambda x: aggregators.dnc(x, 4, _KEY), x) == []


@pytest.mark.parametrize("name", ["mean", "krum", "flag", "caf", "smea", "dnc", "signguard",
                                  "clipped_clustering", "geometric_median", "median", "nnm"])
def test_sharded_rules_ask_for_full_precision(name):
  n = 12
  rule = _RULES[name](n, 2)
  mesh = helpers.coordinate_mesh()
  sharded = jax.shard_map(lambda xs: rule(xs, axis_name="coords"), mesh=mesh,
                          in_specs=P(None, "coords"), out_specs=P(None, "coords")
                          if name == "nnm" else P("coords"))
  x = {"b": _rows(n)["b"]}
  assert _below_highest(sharded, x) == []


@pytest.mark.parametrize("name", ["gaussian", "uniform", "sign_flip", "ipm", "alie", "mimic",
                                  "nan", "inf", "scaled", "min_max", "min_sum", "fang"])
def test_gradient_attacks_ask_for_full_precision(name):
  attack = getattr(attacks, name)
  assert _below_highest(lambda h: attack(h, 3, _KEY), _rows(9)) == []


@pytest.mark.parametrize("factory", [attacks.optimal_alie, attacks.optimal_ipm])
def test_adaptive_attacks_ask_for_full_precision(factory):
  attack = factory(functools.partial(aggregators.krum, f=3))
  assert _below_highest(lambda h: attack(h, 3, _KEY), _rows(9)) == []


def test_optax_aggregate_asks_for_full_precision():
  tx = flagjax.aggregate(aggregators.flag, worker_momentum=0.9, num_workers=12)
  updates = _rows(12)
  state = tx.init(jax.tree.map(lambda leaf: leaf[0], updates))
  assert _below_highest(lambda u, s: tx.update(u, s)[0], updates, state) == []


def test_the_check_finds_a_default_precision_product():
  """The reader above is not vacuous: a plain ``@`` (default precision) is reported, and a
  HIGHEST product is not."""
  a = jnp.ones((3, 4))
  assert len(_below_highest(lambda a: a @ a.T, a)) == 1
  assert _below_highest(lambda a: jnp.matmul(a, a.T, precision="highest"), a) == []
  assert len(_below_highest(lambda a: jax.lax.cond(True, lambda: a @ a.T,
                                                   lambda: a[:, :3]), a)) == 1
