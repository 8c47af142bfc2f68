r"""DnC, Divide and Conquer (Shejwalkar & Houmansadr, NDSS 2021, Section V / Algorithm 3).

Each iteration looks at a random subset of the coordinates, centres the rows' subsampled
values, scores each row by its squared projection on their top right singular vector and
marks the ``filter_fraction * f`` highest scores; the rows never marked are averaged. The
singular vector comes from the ``n x n`` Gram of the subsample (:mod:`flagjax.core.spectral`),
the subsample is stratified (:mod:`flagjax.core.sampling`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import sampling
from flagjax.core import spectral
from flagjax.core import tree as tree_lib

__all__ = [
    "dnc",
    "dnc_scores",
]


def dnc_scores(K: jax.Array, usable: jax.Array) -> jax.Array:
  r"""DnC's outlier scores from the Gram ``K`` of the subsampled rows.

  .. math:: s_i = \big((x_i - \mu)^\top v\big)^2, \qquad \mu = \mathrm{mean}_{j}\, x_j,
            \quad v = \text{top right singular vector of } [x_j - \mu]_j

  over the ``usable`` rows; the others score ``+inf``. In Gram space :math:`s_i = \lambda
  a_i^2` for the top eigenpair :math:`(\lambda, a)` of the centred Gram.
  """
  count = jnp.sum(usable)
  weights = usable.astype(K.dtype) / jnp.maximum(count, 1)
  K = jnp.where(usable[:, None] & usable[None, :], K, 0)
  scores = jnp.square(spectral.top_eigenpair(K, weights).projections)
  return jnp.where(usable, scores, jnp.inf)


def _centred_gram(samples: list, axis_name) -> jax.Array:
  r"""The Gram of the subsampled rows relative to their row of median norm ``r``.

  The scores are a centred covariance, the same for any common ``r`` in exact arithmetic;
  from the plain Gram :math:`x_i^\top x_j` they lose every digit once the rows share a
  component much larger than their spread (measured: honest rows at 1e4 + 1e-3 noise, two
  Byzantine rows 1.0 away, d = 40: the plain Gram kept both Byzantine rows, the centred one
  removes them). ``r`` is picked from the ``psum``-ed squared norms (:func:`gram.median_index`),
  so every shard subtracts the same row and the sharded Gram is the unsharded one.
  """
  sq = sum(jnp.sum(jnp.square(values), axis=1) for values in samples)
  if axis_name is not None:
    sq = jax.lax.psum(sq, axis_name)
  reference = gram_lib.median_index(sq)
  K = 0
  for values in samples:
    centred = values - values[reference][None, :]
    K = K + jnp.matmul(centred, centred.T, precision=tree_lib.HIGHEST)
  return K if axis_name is None else jax.lax.psum(K, axis_name)


def _check(n: int, f: int, num_iters, subsample_size, filter_fraction) -> tuple[int, int, int]:
  checks.require("dnc", n > 2 * f, "n > 2*f", n=n, f=f)
  num_iters = checks.check_int("dnc", "num_iters", num_iters, minimum=1)
  subsample_size = checks.check_int("dnc", "subsample_size", subsample_size, minimum=1)
  checks.check_real("dnc", "filter_fraction", filter_fraction, minimum=0.0)
  num_removed = math.floor(float(filter_fraction) * f)
  checks.require("dnc", num_removed < n, "filter_fraction * f < n", n=n, f=f,
                 filter_fraction=filter_fraction)
  return num_iters, subsample_size, num_removed


def dnc(x, f: int, key, *, num_iters: int = 5, subsample_size: int = 10_000,
        filter_fraction: float = 1.0, axis_name=None):
  r"""Divide and Conquer: the mean of the rows no random-subspace outlier test flagged.

  For ``t = 1..num_iters``, with a fresh subset :math:`S_t` of ``subsample_size`` coordinates
  (every coordinate when ``d`` is smaller): score the rows by :func:`dnc_scores` on
  :math:`x_{i, S_t}` and keep the :math:`n - \lfloor \text{filter\_fraction} \cdot f \rfloor`
  of least score (ties: the lower index). The output is the mean of the rows kept in every
  iteration. If that intersection is empty (possible only when
  ``num_iters * filter_fraction * f >= n``), the last iteration's kept rows are averaged.

  Choices where the paper is silent: the subset is stratified (one coordinate uniformly from
  each of ``subsample_size`` equal blocks, :mod:`flagjax.core.sampling`), not a uniform
  subset; each coordinate has the same chance, no permutation of all ``d`` coordinates is
  needed. Rows holding NaN/Inf anywhere (one matrix-vector pass finds them) are never kept,
  and rows whose subsample overflows the Gram score ``+inf``; more than ``f`` non-finite rows
  give NaN.

  The subsample's Gram is centred on its row of median norm (the scores are translation
  invariant; centring keeps their digits under a large common component).

  Costs one pass to find non-finite rows, ``num_iters`` gathers of ``n x subsample_size`` values,
  ``num_iters`` ``n x n`` eigenproblems and one pass to combine (one iteration when
  ``subsample_size >= d``: every subset is then all coordinates, the same each time, and so
  is every iteration's outcome). On coordinate shards each
  device gathers its part of the same subset and the subsample Grams are ``psum``-ed.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static), ``n > 2f``.
    key: a ``jax.random`` key (the same on every shard).
    num_iters: number of random subsets (static).
    subsample_size: coordinates per subset (static).
    filter_fraction: ``c`` of the paper: ``floor(c f)`` rows are flagged per iteration.
    axis_name: when set, ``x`` holds a coordinate shard.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks
    and Defenses for Federated Learning", NDSS 2021.
  """
  f = checks.check_num_byzantine("dnc", f)
  n = tree_lib.num_workers("dnc", x)
  num_iters, subsample_size, num_removed = _check(n, f, num_iters, subsample_size,
                                                  filter_fraction)
  checks.check_key("dnc", key)
  finite = ~gram_lib.nonfinite_rows(x, axis_name=axis_name)
  kept_always = finite
  kept = finite
  if subsample_size >= sampling.num_coordinates(x, axis_name):
    # Every iteration reads every coordinate (the key is not used): the iterations are
    # identical, so one gives the same kept rows, bit for bit.
    num_iters = 1
  for iteration_key in jax.random.split(key, num_iters):
    samples = [sample.values for sample in sampling.sample_coordinates(
        x, iteration_key, subsample_size, axis_name=axis_name)]
    K = gram_lib.symmetrize(_centred_gram(samples, axis_name))
    scores = dnc_scores(K, finite & gram_lib.finite_rows(K))
    kept = gram_lib.nearest_mask(scores[None, :], n - num_removed)[0] & finite
    kept_always = kept_always & kept
  chosen = jnp.where(jnp.any(kept_always), kept_always, kept)
  coefficients = chosen / jnp.maximum(jnp.sum(chosen), 1)
  coefficients = jnp.where(jnp.sum(~finite) > f, jnp.nan, coefficients)
  return gram_lib.combine(coefficients, x)
