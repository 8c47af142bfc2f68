"""Gradient attacks that need no knowledge of the rule: noise, sign flip, IPM, ALIE, mimic,
NaN/Inf and scaled rows (see :mod:`flagjax.attacks` for the table)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from flagjax.attacks._shared import (alie_rows, check_counts, compute, honest_mean,
                                     honest_std, mean_direction_rows, repeat_row)
from flagjax.core import checks
from flagjax.core import tree as tree_lib

__all__ = ["alie", "alie_default_z", "gaussian", "inf", "ipm", "mimic", "nan", "scaled",
           "sign_flip", "uniform"]

PyTree = tree_lib.PyTree


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
  _, f = check_counts("gaussian", honest, f)
  checks.check_key("gaussian", key)
  checks.check_real("gaussian", "mu", mu)
  checks.check_real("gaussian", "sigma", sigma, minimum=0)
  leaves, treedef = jax.tree.flatten(honest)
  keys = jax.random.split(key, len(leaves))
  rows = [tree_lib.to_output(mu + sigma * jax.random.normal(
              k, (f,) + leaf.shape[1:], tree_lib.compute_dtype(leaf.dtype)), leaf.dtype)
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
  _, f = check_counts("uniform", honest, f)
  checks.check_key("uniform", key)
  checks.check_real("uniform", "minval", minval)
  checks.check_real("uniform", "maxval", maxval)
  if all(isinstance(v, (int, float)) for v in (minval, maxval)):
    checks.require("uniform", minval < maxval, "minval < maxval", minval=minval, maxval=maxval)
  leaves, treedef = jax.tree.flatten(honest)
  keys = jax.random.split(key, len(leaves))
  rows = [tree_lib.to_output(jax.random.uniform(
              k, (f,) + leaf.shape[1:], tree_lib.compute_dtype(leaf.dtype), minval, maxval),
              leaf.dtype)
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
  return mean_direction_rows("sign_flip", honest, f, -1.0)


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
  return mean_direction_rows("ipm", honest, f, -eps)


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
  return mean_direction_rows("scaled", honest, f, factor)


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
  h, f = check_counts("alie", honest, f)
  if z is not None:
    checks.check_real("alie", "z", z)
  if f == 0:
    return repeat_row(jax.tree.map(lambda leaf: leaf[0], honest), 0, honest)
  if z is None:
    z = alie_default_z(h + f, f)
  honest32 = compute(honest)
  mean32 = honest_mean(honest32, h)
  return alie_rows(honest32, mean32, honest_std(honest32, mean32, h), z, f, honest)


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
  h, f = check_counts("mimic", honest, f)
  idx = checks.check_int("mimic", "idx", idx)
  checks.require("mimic", 0 <= idx < h, "0 <= idx < h", idx=idx, h=h)
  return repeat_row(jax.tree.map(lambda leaf: leaf[idx], honest), f, honest)


def _constant_rows(name: str, honest: PyTree, f, value: float) -> PyTree:
  _, f = check_counts(name, honest, f)
  return jax.tree.map(lambda leaf: jnp.full((f,) + leaf.shape[1:], value,
                                               tree_lib.output_dtype(leaf.dtype)), honest)


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
