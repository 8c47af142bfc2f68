r"""Byzantine attacks: what the ``f`` Byzantine workers send, or the data they train on.

Gradient attacks share one signature,

    ``attack(honest, f, key=None, *, axis_name=None, **hparams) -> byzantine``,

where ``honest`` holds the honest workers' updates stacked on a leading axis (``[h, ...]`` or
a pytree of such leaves) and the result holds ``f`` rows in the same structure and dtype
(``[f, ...]``). Hyperparameters are keyword arguments; bind them with ``functools.partial``
(``functools.partial(attacks.ipm, eps=0.5)``) to hand an attack to :mod:`flagjax.sim`.

=================  =========================================================================
attack             Byzantine rows (``mu``, ``sigma``: coordinate-wise mean and std of honest)
=================  =========================================================================
``gaussian``       ``N(mu, sigma^2)`` noise, hyperparameters ``mu=0``, ``sigma=1``
``uniform``        ``U[minval, maxval)`` noise, ``U[0, 1)`` by default (as in the paper)
``sign_flip``      ``-mu``
``ipm``            ``-eps * mu`` (inner-product manipulation), ``eps=0.1``
``alie``           ``mu + z * sigma`` ("a little is enough"), ``z`` from Baruch et al.
``mimic``          a copy of honest row ``idx`` (``idx=0``)
``nan`` / ``inf``  rows of NaN / ``+inf``
``scaled``         ``factor * mu``, ``factor=-10`` (a large sign flip)
``optimal_alie``   ``alie`` with ``z`` searched to do the most damage to a given rule
``optimal_ipm``    ``ipm`` with ``eps`` searched to do the most damage to a given rule
=================  =========================================================================

Coordinate-wise statistics are per-coordinate fused sums over the honest rows in row order
(the mean by :func:`flagjax.core.gram.combine`; never a reduction along axis 0), so every
attack also runs on a
coordinate shard ``[h, s]`` (the simulator applies gradient attacks after its
``all_to_all``); ``axis_name`` is only needed by the adaptive attacks, which call the rule on
the shards. ``sigma`` is the population standard deviation (numpy's default, ``ddof=0``).

Data attacks are factories returning ``data_attack(batch, key) -> batch`` for one worker's
batch, applied before its gradient is taken: :func:`label_flip`, and the paper's workers on
augmented data, :func:`augment_gaussian`, :func:`augment_lotka_volterra`,
:func:`augment_cat_map` and :func:`augmented` (one of the three at random per batch). A batch
is a dict with images and labels under ``"x"``/``"y"`` or ``"image"``/``"label"`` (other keys
pass through), or a pair ``(x, y)``; the same structure comes back. Images are
``[batch, H, W]`` or ``[batch, H, W, C]`` (channels last); flat features ``[batch, H*W*C]``
are read as images of a given ``image_shape``.

Lossy links (a fraction of each update's coordinates lost in transit, read as zeros) act on a
worker's *own* update, not on rows made from the honest ones: :func:`lossy_link` drops the
coordinates of one update, :func:`lossy` of every row (or chosen rows) of stacked updates.
``lossy(p)`` has the signature of a pre-aggregator with a key, so it composes in front of any
rule through :func:`flagjax.preaggregate` (in ``optax.chain`` or the ``pre`` slot of
``optax.experimental.aggregating.process``).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

__all__ = [
    "alie",
    "alie_default_z",
    "augment_cat_map",
    "augment_gaussian",
    "augment_lotka_volterra",
    "augmented",
    "cat_map_source",
    "gaussian",
    "inf",
    "ipm",
    "label_flip",
    "lossy",
    "lossy_link",
    "lotka_volterra_source",
    "mimic",
    "nan",
    "optimal_alie",
    "optimal_ipm",
    "scaled",
    "search_factor",
    "sign_flip",
    "uniform",
]

PyTree = tree_lib.PyTree


# ---------------------------------------------------------------------------------------------
# Shared pieces: argument checks and coordinate-wise statistics of the honest rows.


def _check_counts(name: str, honest: PyTree, f) -> tuple[int, int]:
  """``(h, f)`` after checking that ``f >= 0`` and ``h >= 1`` honest rows share one axis."""
  f = checks.check_num_byzantine(name, f)
  for leaf in jax.tree.leaves(honest):
    if jnp.ndim(leaf) and jnp.shape(leaf)[0] == 0:
      raise ValueError(f"{name} needs h >= 1 honest rows, got h=0")
  h = tree_lib.num_workers(name, honest)
  return h, f


def _compute(tree: PyTree) -> PyTree:
  return jax.tree.map(tree_lib.to_compute, tree)


def _honest_mean(honest32: PyTree, h: int) -> PyTree:
  """Per-coordinate mean of the honest rows: one fused pass (``core.gram.combine``), summed
  in row order per coordinate, so a coordinate shard gets bit-identical values."""
  return gram_lib.combine(jnp.full((h,), 1.0 / h), honest32)


def _honest_std(honest32: PyTree, mean32: PyTree, h: int) -> PyTree:
  """Per-coordinate population standard deviation, two-pass (stable for large means).

  Written as one fused sum over the rows of ``(x_i - mean)^2`` (each row a static slice),
  so no ``[h, ...]`` temporary of squared deviations is ever written.
  """
  def leaf_fn(leaf, mean):
    total = jnp.zeros_like(mean)
    for row in tree_lib.rows(leaf):
      total = total + jnp.square(row - mean)
    return jnp.sqrt(total / h)
  return jax.tree.map(leaf_fn, honest32, mean32)


def _repeat(row: PyTree, f: int, like: PyTree) -> PyTree:
  """``f`` copies of ``row`` stacked on a leading axis, in the dtypes of ``like``'s leaves."""
  def leaf_fn(r, leaf):
    r = r.astype(leaf.dtype)
    if f <= 1:
      return jnp.broadcast_to(r[None], (f,) + r.shape)
    # zeros_like(r): the buffer has r's sharding type (varying inside shard_map).
    out = jnp.zeros_like(r, shape=(f,) + r.shape)
    # Copies written in a loop, not a broadcast: XLA fuses a cheap producer (the fused row sum
    # of the mean) into a broadcast and recomputes it for every copy (f passes over the
    # honest rows instead of one: sign_flip took 7.8x one pass at h=24, f=8, d=1e6; ~2.5x now).
    return jax.lax.fori_loop(0, f, lambda k, o: jax.lax.dynamic_update_index_in_dim(o, r, k, 0),
                             out)
  return jax.tree.map(leaf_fn, row, like)


def _mean_direction_rows(name: str, honest: PyTree, f, scale: float) -> PyTree:
  """``f`` rows equal to ``scale * mean(honest)``."""
  h, f = _check_counts(name, honest, f)
  mean32 = _honest_mean(_compute(honest), h)
  return _repeat(jax.tree.map(lambda m: scale * m, mean32), f, honest)


# ---------------------------------------------------------------------------------------------
# Gradient attacks.


def gaussian(honest: PyTree, f: int, key: jax.Array, *, mu: float = 0.0, sigma: float = 1.0,
             axis_name=None) -> PyTree:
  r"""Gaussian noise rows: every coordinate of every Byzantine row drawn from
  :math:`\mathcal{N}(\mu, \sigma^2)`, independently.

  On a coordinate shard the noise is drawn for the shard's shape from ``key`` as given: fold
  the shard index into the key for independent shards (:mod:`flagjax.sim` does), so the
  sharded draw differs from the unsharded one.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree); only their shapes and dtypes are used.
    f: number of Byzantine rows (static).
    key: a ``jax.random`` key.
    mu: mean of the noise.
    sigma: standard deviation of the noise.
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.

  References:
    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017.
  """
  del axis_name
  _, f = _check_counts("gaussian", honest, f)
  checks.check_key("gaussian", key)
  checks.check_real("gaussian", "mu", mu)
  checks.check_real("gaussian", "sigma", sigma, minimum=0)
  leaves, treedef = jax.tree.flatten(honest)
  keys = jax.random.split(key, len(leaves))
  rows = [(mu + sigma * jax.random.normal(k, (f,) + leaf.shape[1:],
                                          tree_lib.compute_dtype(leaf.dtype))).astype(leaf.dtype)
          for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, rows)


def uniform(honest: PyTree, f: int, key: jax.Array, *, minval: float = 0.0,
            maxval: float = 1.0, axis_name=None) -> PyTree:
  r"""Uniform noise rows: every coordinate drawn from :math:`U[\text{minval}, \text{maxval})`,
  ``U[0, 1)`` by default as in the Flag Aggregator paper.

  Randomness on shards as in :func:`gaussian`.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree); only their shapes and dtypes are used.
    f: number of Byzantine rows (static).
    key: a ``jax.random`` key.
    minval: lower end of the interval.
    maxval: upper end of the interval (excluded).
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.

  References:
    Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and
    Augmented Losses using Convex Optimization", ICLR 2024.
  """
  del axis_name
  _, f = _check_counts("uniform", honest, f)
  checks.check_key("uniform", key)
  checks.check_real("uniform", "minval", minval)
  checks.check_real("uniform", "maxval", maxval)
  if all(isinstance(v, (int, float)) for v in (minval, maxval)):
    checks.require("uniform", minval < maxval, "minval < maxval", minval=minval, maxval=maxval)
  leaves, treedef = jax.tree.flatten(honest)
  keys = jax.random.split(key, len(leaves))
  rows = [jax.random.uniform(k, (f,) + leaf.shape[1:], tree_lib.compute_dtype(leaf.dtype),
                             minval, maxval).astype(leaf.dtype)
          for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, rows)


def sign_flip(honest: PyTree, f: int, key: Optional[jax.Array] = None, *,
              axis_name=None) -> PyTree:
  r"""Sign flip: every Byzantine row is :math:`-\bar{x}`, the negated mean of the honest rows.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree).
    f: number of Byzantine rows (static).
    key: unused (deterministic attack).
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.

  References:
    Allen-Zhu et al., "Byzantine-Resilient Non-Convex Stochastic Gradient Descent", ICLR 2021.
  """
  del key, axis_name
  return _mean_direction_rows("sign_flip", honest, f, -1.0)


def ipm(honest: PyTree, f: int, key: Optional[jax.Array] = None, *, eps: float = 0.1,
        axis_name=None) -> PyTree:
  r"""Inner-product manipulation: every Byzantine row is :math:`-\epsilon\, \bar{x}`.

  A small ``eps`` keeps the rows close to the honest cloud (past distance filters) while
  making the aggregate's inner product with the true gradient negative for a non-robust rule.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree).
    f: number of Byzantine rows (static).
    key: unused (deterministic attack).
    eps: the factor :math:`\epsilon`.
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.

  References:
    Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation", UAI 2019.
  """
  del key, axis_name
  checks.check_real("ipm", "eps", eps)
  return _mean_direction_rows("ipm", honest, f, -eps)


def scaled(honest: PyTree, f: int, key: Optional[jax.Array] = None, *,
           factor: float = -10.0, axis_name=None) -> PyTree:
  r"""Scaled mean: every Byzantine row is ``factor`` times the honest mean (``-10``: a large
  sign flip; ``factor=-1`` is :func:`sign_flip`, ``factor=-eps`` is :func:`ipm`).

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree).
    f: number of Byzantine rows (static).
    key: unused (deterministic attack).
    factor: the scale applied to the honest mean.
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.
  """
  del key, axis_name
  checks.check_real("scaled", "factor", factor)
  return _mean_direction_rows("scaled", honest, f, factor)


def alie_default_z(num_workers: int, num_byzantine: int) -> jax.Array:
  r"""The default ``z`` of "a little is enough" (Baruch et al.) for ``n`` workers, ``f`` bad.

  .. math:: s = \lfloor n/2 + 1 \rfloor - f, \qquad z = \Phi^{-1}\left(\frac{n - s}{n}\right)

  where :math:`\Phi` is the standard normal CDF: the largest shift for which the ``f``
  Byzantine rows still need only ``s`` honest rows "behind" them to sit inside a majority.
  Needs ``1 <= f <= floor(n / 2)`` (``s >= 1``; otherwise ``z`` is infinite).

  Args:
    num_workers: ``n = h + f``, all workers.
    num_byzantine: ``f``.

  Returns:
    ``z`` as a float32 scalar.

  References:
    Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
    Learning", NeurIPS 2019.
  """
  n, f = num_workers, checks.check_num_byzantine("alie", num_byzantine)
  s = math.floor(n / 2 + 1) - f
  checks.require("alie", f >= 1 and s >= 1,
                 "1 <= f <= floor(n/2) for the default z (s = floor(n/2 + 1) - f >= 1)",
                 n=n, f=f)
  return jax.scipy.stats.norm.ppf(jnp.float32((n - s) / n))


def _alie_rows(honest32: PyTree, mean32: PyTree, std32: PyTree, z, f: int,
               like: PyTree) -> PyTree:
  return _repeat(jax.tree.map(lambda m, s: m + z * s, mean32, std32), f, like)


def alie(honest: PyTree, f: int, key: Optional[jax.Array] = None, *, z=None,
         axis_name=None) -> PyTree:
  r"""A little is enough: every Byzantine row is :math:`\bar{x} + z\,\sigma` per coordinate.

  :math:`\bar{x}` and :math:`\sigma` are the coordinate-wise mean and population standard
  deviation of the honest rows; ``z=None`` takes :func:`alie_default_z` with ``n = h + f``.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree).
    f: number of Byzantine rows (static).
    key: unused (deterministic attack).
    z: the shift in standard deviations, or None for Baruch et al.'s default.
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.

  References:
    Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
    Learning", NeurIPS 2019.
  """
  del key, axis_name
  h, f = _check_counts("alie", honest, f)
  if z is not None:
    checks.check_real("alie", "z", z)
  if f == 0:
    return _repeat(jax.tree.map(lambda leaf: leaf[0], honest), 0, honest)
  if z is None:
    z = alie_default_z(h + f, f)
  honest32 = _compute(honest)
  mean32 = _honest_mean(honest32, h)
  return _alie_rows(honest32, mean32, _honest_std(honest32, mean32, h), z, f, honest)


def mimic(honest: PyTree, f: int, key: Optional[jax.Array] = None, *, idx: int = 0,
          axis_name=None) -> PyTree:
  r"""Mimic: every Byzantine row is a copy of honest row ``idx``, over-weighting one worker
  (harmful under heterogeneous data).

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree).
    f: number of Byzantine rows (static).
    key: unused (deterministic attack).
    idx: which honest row to copy (static, ``0 <= idx < h``).
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows in ``honest``'s structure and dtypes.

  References:
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022.
  """
  del key, axis_name
  h, f = _check_counts("mimic", honest, f)
  idx = checks.check_int("mimic", "idx", idx)
  checks.require("mimic", 0 <= idx < h, "0 <= idx < h", idx=idx, h=h)
  return _repeat(jax.tree.map(lambda leaf: leaf[idx], honest), f, honest)


def _constant_rows(name: str, honest: PyTree, f, value: float) -> PyTree:
  _, f = _check_counts(name, honest, f)
  return jax.tree.map(lambda leaf: jnp.full((f,) + leaf.shape[1:], value, leaf.dtype), honest)


def nan(honest: PyTree, f: int, key: Optional[jax.Array] = None, *, axis_name=None) -> PyTree:
  """Rows of NaN (a crashed or corrupted worker). Robust rules must ignore them.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree); only shapes and dtypes are used.
    f: number of Byzantine rows (static).
    key: unused.
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows of NaN in ``honest``'s structure and dtypes.
  """
  del key, axis_name
  return _constant_rows("nan", honest, f, jnp.nan)


def inf(honest: PyTree, f: int, key: Optional[jax.Array] = None, *, axis_name=None) -> PyTree:
  """Rows of ``+inf`` (an overflowed worker). Robust rules must ignore them.

  Args:
    honest: honest rows ``[h, ...]`` (or a pytree); only shapes and dtypes are used.
    f: number of Byzantine rows (static).
    key: unused.
    axis_name: accepted for the uniform attack signature.

  Returns:
    ``[f, ...]`` rows of ``+inf`` in ``honest``'s structure and dtypes.
  """
  del key, axis_name
  return _constant_rows("inf", honest, f, jnp.inf)


# ---------------------------------------------------------------------------------------------
# Adaptive attacks: the factor that does the most damage to a given rule.


def _damage(rule: Callable, rule_kwargs: dict, honest: PyTree, byzantine: PyTree,
            mean32: PyTree, axis_name) -> jax.Array:
  r""":math:`|\mathrm{rule}(\text{honest} \cup \text{byzantine}) - \bar{x}|` (Gram-free:
  squared differences summed per leaf, ``psum``-ed over the coordinate shards)."""
  stacked = jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], 0),
                         honest, byzantine)
  kwargs = dict(rule_kwargs)
  if axis_name is not None:
    kwargs["axis_name"] = axis_name
  aggregate = rule(stacked, **kwargs)
  sq = sum(jnp.sum(jnp.square(tree_lib.to_compute(a) - m))
           for a, m in zip(jax.tree.leaves(aggregate), jax.tree.leaves(mean32)))
  if axis_name is not None:
    sq = jax.lax.psum(sq, axis_name)
  damage = jnp.sqrt(sq)
  # A rule that breaks (NaN) is not a damage the search should chase.
  return jnp.where(jnp.isnan(damage), -jnp.inf, damage)


def search_factor(objective: Callable[[jax.Array], jax.Array], lower: float, upper: float, *,
                  num_points: int = 11, num_rounds: int = 3) -> tuple[jax.Array, jax.Array]:
  r"""Maximises a scalar function of one factor on ``[lower, upper]`` by a zooming grid.

  Round 1 evaluates ``num_points`` evenly spaced factors; each later round evaluates
  ``num_points`` factors on one grid step either side of the best factor so far (clipped to
  the range), so the resolution shrinks by ``(num_points - 1) / 2`` per round. Robust to
  non-unimodal objectives (unlike golden-section search); the best factor ever evaluated is
  returned (ties: the first found). Jit-able: one ``lax.fori_loop`` over rounds, one
  ``lax.map`` over a round's factors (the objective is traced once).

  Args:
    objective: ``objective(factor) -> scalar`` (NaN counts as ``-inf``).
    lower: smallest factor.
    upper: largest factor.
    num_points: factors per round (static, ``>= 2``).
    num_rounds: rounds (static, ``>= 1``); ``num_points * num_rounds`` evaluations in all.

  Returns:
    ``(best_factor, best_objective)``.
  """
  checks.require("search_factor", num_points >= 2 and num_rounds >= 1,
                 "num_points >= 2 and num_rounds >= 1", num_points=num_points,
                 num_rounds=num_rounds)
  lower = jnp.float32(lower)
  upper = jnp.float32(upper)

  def evaluate(factor):
    value = jnp.asarray(objective(factor), jnp.float32)
    return jnp.where(jnp.isnan(value), -jnp.inf, value)

  def one_round(_, carry):
    lo, hi, best_factor, best_value = carry
    factors = jnp.linspace(lo, hi, num_points)
    values = jax.lax.map(evaluate, factors)
    k = jnp.argmax(values)
    better = values[k] > best_value
    best_factor = jnp.where(better, factors[k], best_factor)
    best_value = jnp.where(better, values[k], best_value)
    step = (hi - lo) / (num_points - 1)
    return (jnp.maximum(lower, best_factor - step), jnp.minimum(upper, best_factor + step),
            best_factor, best_value)

  start = (lower, upper, lower, jnp.float32(-jnp.inf))
  _, _, best_factor, best_value = jax.lax.fori_loop(0, num_rounds, one_round, start)
  return best_factor, best_value


def _takes_argument(fn: Callable, name: str) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  parameter = parameters.get(name)
  return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                      parameter.KEYWORD_ONLY)


def _optimal_attack(name: str, rows_fn, rule: Callable, search_range, num_points: int,
                    num_rounds: int, rule_hparams: dict):
  lower, upper = search_range
  checks.require(name, lower <= upper, "search_range = (lower, upper) with lower <= upper",
                 search_range=search_range)
  rule_name = getattr(rule, "__name__", repr(rule))

  def attack(honest: PyTree, f: int, key: Optional[jax.Array] = None, *, axis_name=None):
    del key
    h, f = _check_counts(name, honest, f)
    rule_kwargs = dict(rule_hparams)
    # The attacker is omniscient: a rule's f, unless given, is the number of Byzantine rows.
    if "f" not in rule_kwargs and _takes_argument(rule, "f"):
      rule_kwargs["f"] = f
    honest32 = _compute(honest)
    mean32 = _honest_mean(honest32, h)
    make_rows = rows_fn(honest32, mean32, h, f, honest)
    if f == 0:
      return make_rows(jnp.float32(lower))
    damage = lambda factor: _damage(rule, rule_kwargs, honest, make_rows(factor), mean32,
                                    axis_name)
    factor, _ = search_factor(damage, lower, upper, num_points=num_points,
                              num_rounds=num_rounds)
    return make_rows(factor)

  attack.__name__ = f"{name}_{rule_name}"
  attack.__doc__ = f"{name} against {rule_name} (see flagjax.attacks.{name})."
  return attack


def optimal_alie(rule: Callable, *, search_range: tuple[float, float] = (0.0, 10.0),
                 num_points: int = 11, num_rounds: int = 3, **rule_hparams):
  r"""ALIE with the shift ``z`` that maximises the damage to ``rule``.

  The returned attack sends ``f`` rows :math:`\bar{x} + z^\star \sigma` (see :func:`alie`) with

  .. math:: z^\star = \arg\max_{z \in \text{search\_range}}
            \left|\mathrm{rule}(\text{honest} \cup \{\bar{x} + z\sigma\}^{f})
            - \bar{x}\right|,

  found by :func:`search_factor` (a zooming grid: ``num_points * num_rounds`` rule
  evaluations per call; jit-able). The honest rows come first and the Byzantine rows last,
  as in :mod:`flagjax.sim`. On coordinate shards (``axis_name`` set) the rule runs on the
  shards and the damage is ``psum``-ed, so every shard picks the same ``z``.

  Args:
    rule: the attacked aggregation rule, ``rule(x, **rule_hparams)``; when it takes an ``f``
      that ``rule_hparams`` does not give, it gets the attack's ``f``.
    search_range: ``(lower, upper)`` for ``z``.
    num_points: grid points per round (static).
    num_rounds: zoom rounds (static).
    **rule_hparams: the rule's hyperparameters.

  Returns:
    ``attack(honest, f, key=None, *, axis_name=None) -> [f, ...]`` rows.

  References:
    Baruch et al., NeurIPS 2019; Allouah et al., "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity", AISTATS 2023 (the optimised factor).
  """
  def rows_fn(honest32, mean32, h, f, like):
    std32 = _honest_std(honest32, mean32, h)
    return lambda z: _alie_rows(honest32, mean32, std32, z, f, like)
  return _optimal_attack("optimal_alie", rows_fn, rule, search_range, num_points, num_rounds,
                         rule_hparams)


def optimal_ipm(rule: Callable, *, search_range: tuple[float, float] = (0.0, 10.0),
                num_points: int = 11, num_rounds: int = 3, **rule_hparams):
  r"""IPM with the factor ``eps`` that maximises the damage to ``rule``.

  The returned attack sends ``f`` rows :math:`-\epsilon^\star \bar{x}` with
  :math:`\epsilon^\star` maximising
  :math:`|\mathrm{rule}(\text{honest} \cup \{-\epsilon\bar{x}\}^{f}) - \bar{x}|` over
  ``search_range``; the search, sharding and arguments are as in :func:`optimal_alie`.

  Args:
    rule: the attacked aggregation rule.
    search_range: ``(lower, upper)`` for ``eps``.
    num_points: grid points per round (static).
    num_rounds: zoom rounds (static).
    **rule_hparams: the rule's hyperparameters.

  Returns:
    ``attack(honest, f, key=None, *, axis_name=None) -> [f, ...]`` rows.

  References:
    Xie, Koyejo, Gupta, UAI 2019; Allouah et al., AISTATS 2023.
  """
  def rows_fn(honest32, mean32, h, f, like):
    del honest32, h
    return lambda eps: _repeat(jax.tree.map(lambda m: -eps * m, mean32), f, like)
  return _optimal_attack("optimal_ipm", rows_fn, rule, search_range, num_points, num_rounds,
                         rule_hparams)


# ---------------------------------------------------------------------------------------------
# Lossy links: coordinates of a worker's own update lost in transit.


def _check_fraction(name: str, drop_fraction) -> None:
  if isinstance(drop_fraction, numbers.Real):
    checks.require(name, 0.0 <= drop_fraction <= 1.0, "0 <= drop_fraction <= 1",
                   drop_fraction=drop_fraction)


def lossy_link(update: PyTree, key: jax.Array, drop_fraction: float) -> PyTree:
  r"""One update sent over a lossy link: each coordinate is lost (arrives as 0) independently
  with probability ``drop_fraction``; the rest arrive intact (no rescaling: a lossy network,
  not dropout).

  Args:
    update: one worker's update (array or pytree), any shape.
    key: a ``jax.random`` key (split per leaf).
    drop_fraction: probability that a coordinate is lost, in ``[0, 1]``.

  Returns:
    The update with the lost coordinates zeroed, same structure and dtypes.

  References:
    Almasi et al., ICLR 2024 (workers behind lossy links).
  """
  _check_fraction("lossy_link", drop_fraction)
  leaves, treedef = jax.tree.flatten(update)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [jnp.where(jax.random.bernoulli(k, 1.0 - drop_fraction, jnp.shape(leaf)), leaf,
                   jnp.zeros((), jnp.result_type(leaf)))
         for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


def lossy(drop_fraction: float, *, workers: Optional[Sequence[int]] = None):
  r"""Lossy links for stacked updates: :func:`lossy_link` on each worker's row.

  The result has the signature of a pre-aggregator that needs a key,
  ``transform(x, key, *, axis_name=None) -> x`` (``[n, ...]`` to ``[n, ...]``), so it
  composes in front of any rule, e.g.
  ``optax.chain(flagjax.preaggregate(attacks.lossy(0.1)), flagjax.aggregate(rule), sgd)``.
  Row ``i`` uses ``fold_in(key, i)``; on a coordinate shard (``axis_name`` set) the shard
  index is folded in too, so shards lose independent coordinates (same distribution as
  unsharded, a different draw).

  Args:
    drop_fraction: probability that a coordinate is lost, in ``[0, 1]``.
    workers: static indices of the rows behind lossy links; None for every row.

  Returns:
    ``transform(x, key, *, axis_name=None)``.

  References:
    Almasi et al., ICLR 2024.
  """
  _check_fraction("lossy", drop_fraction)

  def transform(x: PyTree, key: jax.Array, *, axis_name=None) -> PyTree:
    n = tree_lib.num_workers("lossy", x)
    rows = range(n) if workers is None else tuple(workers)
    for i in rows:
      checks.require("lossy", isinstance(i, int) and 0 <= i < n, "worker indices in [0, n)",
                     worker=i, n=n)
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    lost = {i: lossy_link(jax.tree.map(lambda leaf: leaf[i], x), jax.random.fold_in(key, i),
                          drop_fraction) for i in rows}

    def leaf_fn(leaf, *lost_rows):
      by_row = dict(zip(lost, lost_rows))
      return jnp.stack([by_row.get(i, leaf[i]) for i in range(n)])
    return jax.tree.map(leaf_fn, x, *lost.values())
  transform.__name__ = "lossy"
  return transform


# ---------------------------------------------------------------------------------------------
# Data attacks: factories of ``data_attack(batch, key) -> batch``.


_BATCH_KEYS = (("x", "y"), ("image", "label"))


def _split_batch(name: str, batch):
  """``(x, y, rebuild)`` for a dict (``x``/``y`` or ``image``/``label``) or an ``(x, y)``."""
  if isinstance(batch, Mapping):
    for x_key, y_key in _BATCH_KEYS:
      if x_key in batch and y_key in batch:
        def rebuild(x, y, x_key=x_key, y_key=y_key):
          out = dict(batch)
          out[x_key], out[y_key] = x, y
          return type(batch)(out) if type(batch) is not dict else out
        return batch[x_key], batch[y_key], rebuild
    raise ValueError(f"{name} needs a batch dict with keys ('x', 'y') or ('image', 'label'), "
                     f"got keys {sorted(batch)}")
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0], batch[1], lambda x, y: type(batch)((x, y))
  raise ValueError(f"{name} needs a batch (x, y) or a dict with 'x'/'y' or 'image'/'label', "
                   f"got {type(batch).__name__}")


def _on_images(name: str, image_fn, image_shape):
  """``data_attack`` applying ``image_fn(images [b, H, W, C], key)`` to the batch's x."""
  def data_attack(batch, key):
    x, y, rebuild = _split_batch(name, batch)
    b = x.shape[0]
    if image_shape is not None:
      images = x.reshape((b,) + tuple(image_shape))
    else:
      images = x
    checks.require(name, images.ndim in (3, 4),
                   "images [batch, H, W] or [batch, H, W, C] (or image_shape=)",
                   shape=tuple(x.shape))
    squeeze = images.ndim == 3
    if squeeze:
      images = images[..., None]
    out = image_fn(images, key)
    if squeeze:
      out = out[..., 0]
    return rebuild(out.reshape(x.shape).astype(x.dtype), y)
  return data_attack


def label_flip(num_classes: int):
  r"""Label flipping: every label ``y`` becomes ``num_classes - 1 - y``.

  Args:
    num_classes: number of classes (static, ``>= 1``).

  Returns:
    ``data_attack(batch, key) -> batch`` (``key`` unused).

  References:
    Allen-Zhu et al., ICLR 2021; Almasi et al., ICLR 2024.
  """
  checks.require("label_flip", isinstance(num_classes, int) and num_classes >= 1,
                 "num_classes >= 1", num_classes=num_classes)

  def data_attack(batch, key=None):
    del key
    x, y, rebuild = _split_batch("label_flip", batch)
    return rebuild(x, (num_classes - 1 - y).astype(y.dtype))
  return data_attack


def augment_gaussian(sigma: float = 0.1):
  r"""Gaussian-noise augmentation: ``x -> x + sigma * N(0, 1)`` on every input feature.

  Args:
    sigma: noise standard deviation.

  Returns:
    ``data_attack(batch, key) -> batch``.

  References:
    Almasi et al., ICLR 2024 (workers on augmented data).
  """
  def data_attack(batch, key):
    x, y, rebuild = _split_batch("augment_gaussian", batch)
    noise = jax.random.normal(key, x.shape, tree_lib.compute_dtype(x.dtype))
    return rebuild((x + sigma * noise).astype(x.dtype), y)
  return data_attack


@functools.lru_cache(maxsize=None)
def cat_map_source(size: int, num_iterations: int) -> np.ndarray:
  r"""For Arnold's cat map on ``size x size`` pixels, the source pixel of each target pixel.

  One iteration moves pixel :math:`(i, j)` (row, column) to
  :math:`((2i + j) \bmod N, (i + j) \bmod N)`; ``out.flat[t] = image.flat[source[t]]`` after
  ``num_iterations`` iterations.

  Args:
    size: ``N``, the image side.
    num_iterations: how many times the map is applied (``>= 0``).

  Returns:
    ``[N * N]`` int32 flat source indices.
  """
  i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  source = np.arange(size * size).reshape(size, size)
  for _ in range(num_iterations):
    moved = np.empty_like(source)
    moved[(2 * i + j) % size, (i + j) % size] = source
    source = moved
  return source.reshape(-1).astype(np.int32)


def augment_cat_map(num_iterations: int = 1, *, image_shape: Optional[Sequence[int]] = None):
  r"""Arnold's cat map on square images: pixel :math:`(i, j)` moves to
  :math:`((2i + j) \bmod N, (i + j) \bmod N)`, ``num_iterations`` times (a measure-preserving
  chaotic shuffle: the image's pixel values are kept, their arrangement scrambled; the map is
  periodic, so some iteration counts give the image back).

  Args:
    num_iterations: how many times to apply the map (static, ``>= 0``).
    image_shape: ``(H, W)`` or ``(H, W, C)`` when the batch's ``x`` holds flat features.

  Returns:
    ``data_attack(batch, key) -> batch`` (``key`` unused).

  References:
    Arnold, Avez, "Ergodic Problems of Classical Mechanics", 1968; Almasi et al., ICLR 2024.
  """
  checks.require("augment_cat_map", isinstance(num_iterations, int) and num_iterations >= 0,
                 "num_iterations >= 0", num_iterations=num_iterations)

  def image_fn(images, key):
    del key
    b, height, width = images.shape[:3]
    checks.require("augment_cat_map", height == width, "square images", H=height, W=width)
    source = jnp.asarray(cat_map_source(height, num_iterations))
    flat = images.reshape((b, height * width) + images.shape[3:])
    return jnp.take(flat, source, axis=1).reshape(images.shape)
  return _on_images("augment_cat_map", image_fn, image_shape)


def lotka_volterra_source(height: int, width: int, *, time: float, alpha: float, beta: float,
                          gamma: float, delta: float, spread: float,
                          num_steps: int) -> np.ndarray:
  r"""Source coordinates (fractional row, column) of each pixel under the Lotka-Volterra flow.

  Columns are prey :math:`u`, rows predators :math:`v`, both mapped onto
  ``[(1 - spread) c, (1 + spread) c]`` around the equilibrium
  :math:`c = (\gamma/\delta, \alpha/\beta)` of

  .. math:: \dot u = \alpha u - \beta u v, \qquad \dot v = \delta u v - \gamma v.

  Each target pixel's source is the point the flow carries onto it in ``time``: the ODE
  integrated backwards by ``num_steps`` RK4 steps (float64, numpy, at trace time).

  Returns:
    ``[2, H, W]`` source (row, column) pixel coordinates (may fall outside the image).
  """
  u_eq, v_eq = gamma / delta, alpha / beta
  rows, cols = np.meshgrid(np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width),
                           indexing="ij")
  u = u_eq * (1 + spread * cols)
  v = v_eq * (1 + spread * rows)

  def field(u, v):
    return alpha * u - beta * u * v, delta * u * v - gamma * v

  dt = -time / num_steps
  for _ in range(num_steps):
    k1 = field(u, v)
    k2 = field(u + 0.5 * dt * k1[0], v + 0.5 * dt * k1[1])
    k3 = field(u + 0.5 * dt * k2[0], v + 0.5 * dt * k2[1])
    k4 = field(u + dt * k3[0], v + dt * k3[1])
    u = u + dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
    v = v + dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
  source_cols = (u / u_eq - 1) / spread
  source_rows = (v / v_eq - 1) / spread
  return np.stack([(source_rows + 1) * (height - 1) / 2, (source_cols + 1) * (width - 1) / 2])


def augment_lotka_volterra(time: float = 0.5, *, alpha: float = 1.0, beta: float = 1.0,
                           gamma: float = 1.0, delta: float = 1.0, spread: float = 0.5,
                           num_steps: int = 16,
                           image_shape: Optional[Sequence[int]] = None):
  r"""Images warped by the Lotka-Volterra flow: each pixel is carried for ``time`` along

  .. math:: \dot u = \alpha u - \beta u v, \qquad \dot v = \delta u v - \gamma v

  with the image's columns as prey ``u`` and rows as predators ``v`` around the equilibrium
  (see :func:`lotka_volterra_source`): a smooth, invertible, non-rigid swirl about the image
  centre (closed orbits; a rotation near the centre, shearing further out). Pixels are
  sampled bilinearly; sources outside the image take the nearest edge pixel.

  Args:
    time: flow time (``0``: identity; orbits near the centre close after ``2 pi``).
    alpha, beta, gamma, delta: the Lotka-Volterra coefficients (positive).
    spread: half-width of the image's domain relative to the equilibrium, in ``(0, 1)``.
    num_steps: RK4 steps of the backward integration (static).
    image_shape: ``(H, W)`` or ``(H, W, C)`` when the batch's ``x`` holds flat features.

  Returns:
    ``data_attack(batch, key) -> batch`` (``key`` unused).

  References:
    Lotka, "Elements of Physical Biology", 1925; Volterra, 1926; Almasi et al., ICLR 2024.
  """
  checks.require("augment_lotka_volterra", 0 < spread < 1 and num_steps >= 1,
                 "0 < spread < 1 and num_steps >= 1", spread=spread, num_steps=num_steps)
  checks.require("augment_lotka_volterra", min(alpha, beta, gamma, delta) > 0,
                 "positive alpha, beta, gamma, delta", alpha=alpha, beta=beta, gamma=gamma,
                 delta=delta)

  def image_fn(images, key):
    del key
    b, height, width = images.shape[:3]
    checks.require("augment_lotka_volterra", height >= 2 and width >= 2, "H >= 2 and W >= 2",
                   H=height, W=width)
    source = lotka_volterra_source(height, width, time=time, alpha=alpha, beta=beta,
                                   gamma=gamma, delta=delta, spread=spread,
                                   num_steps=num_steps)
    row = np.clip(source[0], 0, height - 1)
    col = np.clip(source[1], 0, width - 1)
    r0 = np.minimum(np.floor(row).astype(np.int32), height - 2)
    c0 = np.minimum(np.floor(col).astype(np.int32), width - 2)
    wr, wc = row - r0, col - c0
    dtype = tree_lib.compute_dtype(images.dtype)
    flat = images.reshape((b, height * width) + images.shape[3:]).astype(dtype)
    out = 0
    for dr, dc, weight in ((0, 0, (1 - wr) * (1 - wc)), (0, 1, (1 - wr) * wc),
                           (1, 0, wr * (1 - wc)), (1, 1, wr * wc)):
      index = jnp.asarray(((r0 + dr) * width + (c0 + dc)).reshape(-1))
      w = jnp.asarray(weight.reshape((1, -1) + (1,) * (images.ndim - 3)), dtype)
      out = out + w * jnp.take(flat, index, axis=1)
    return out.reshape(images.shape)
  return _on_images("augment_lotka_volterra", image_fn, image_shape)


def augmented(*, sigma: float = 0.1, num_iterations: int = 1, time: float = 0.5,
              image_shape: Optional[Sequence[int]] = None):
  r"""The paper's workers on augmented data: each batch gets one of Gaussian noise
  (:func:`augment_gaussian`), the Lotka-Volterra flow (:func:`augment_lotka_volterra`) or
  Arnold's cat map (:func:`augment_cat_map`), chosen uniformly at random from ``key``.

  Args:
    sigma: noise standard deviation of the Gaussian augmentation.
    num_iterations: cat-map iterations.
    time: Lotka-Volterra flow time.
    image_shape: ``(H, W)`` or ``(H, W, C)`` when the batch's ``x`` holds flat features.

  Returns:
    ``data_attack(batch, key) -> batch``.

  References:
    Almasi et al., ICLR 2024.
  """
  choices = (augment_gaussian(sigma),
             augment_lotka_volterra(time, image_shape=image_shape),
             augment_cat_map(num_iterations, image_shape=image_shape))

  def data_attack(batch, key):
    choice_key, noise_key = jax.random.split(key)
    which = jax.random.randint(choice_key, (), 0, len(choices))
    return jax.lax.switch(which, [functools.partial(c, key=noise_key) for c in choices],
                          batch)
  return data_attack
