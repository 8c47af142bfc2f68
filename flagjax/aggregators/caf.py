r"""CAF, the Covariance-bound Agnostic Filter (Allouah, Guerraoui & Stephan, ICML 2025).

A spectral filter: rows far out along the top eigenvector of the weighted covariance lose
weight, one step at a time, and the weighted mean with the smallest top eigenvalue seen is
returned. Every eigenproblem is solved exactly in Gram space (:mod:`flagjax.core.spectral`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import spectral
from flagjax.core import tree as tree_lib

__all__ = [
    "caf",
    "caf_coefficients",
]


def _check(n: int, f: int, max_iters) -> Optional[int]:
  checks.require("caf", n > 2 * f, "n > 2*f", n=n, f=f)
  if max_iters is not None:
    max_iters = checks.check_int("caf", "max_iters", max_iters, minimum=1)
  return max_iters


@gram_lib.solved_once
@gram_lib.translation_invariant
def caf_coefficients(K: jax.Array, f: int, *, max_iters: Optional[int] = None) -> jax.Array:
  r"""Coefficients of CAF: the weights :math:`c / \sum c` of the returned weighted mean.

  Weights start at :math:`c_i = 1` (0 for rows holding NaN/Inf, certainly Byzantine). While
  :math:`\sum_i c_i > n - 2f`:

  .. math:: \mu_c = \frac{\sum_i c_i x_i}{\sum_i c_i}, \quad
            (\lambda, v) = \text{top eigenpair of }
            \frac{1}{\sum c}\sum_i c_i (x_i - \mu_c)(x_i - \mu_c)^\top, \quad
            \tau_i = ((x_i - \mu_c)^\top v)^2, \quad
            c_i \leftarrow c_i \Big(1 - \frac{\tau_i}{\max_{j: c_j > 0} \tau_j}\Big)

  and the :math:`\mu_c` of smallest :math:`\lambda` seen is returned (ties: the earliest).
  Each step zeroes at least one weighted row, so at most ``2f`` steps run; ``max_iters``
  caps them lower. The maximum is over the rows still weighted (the paper's filter; ByzFL
  takes it over every row, so a zero-weight outlier far away stalls its loop). When the
  weighted rows all sit at their mean (:math:`\lambda = 0`) nothing is left to filter and
  the loop stops. ``f = 0``: the mean (the loop never runs).

  Args:
    K: Gram matrix ``[n, n]`` (centred, :func:`flagjax.core.gram.gram`).
    f: number of Byzantine workers tolerated (static), ``n > 2f``.
    max_iters: at most this many filter steps (static); None: ``2f``, enough to finish.

  Returns:
    Coefficients ``[n]`` summing to one (all NaN when more than ``f`` rows are non-finite).
  """
  f = checks.check_num_byzantine("caf", f)
  n = K.shape[0]
  max_iters = _check(n, f, max_iters)
  num_steps = 2 * f if max_iters is None else min(max_iters, 2 * f)
  K, finite = gram_lib.clean_gram(K)
  dtype = K.dtype
  weights = finite.astype(dtype)
  first = weights / jnp.maximum(jnp.sum(weights), 1)

  def step(_, carry):
    c, best, best_value, running = carry
    total = jnp.sum(c)
    running = running & (total > n - 2 * f)
    w = c / jnp.where(total > 0, total, 1)
    top = spectral.top_eigenpair(K, w)
    better = running & (top.value < best_value)
    best = jnp.where(better, w, best)
    best_value = jnp.where(better, top.value, best_value)
    tau = jnp.square(top.projections)
    tau_max = jnp.max(jnp.where(c > 0, tau, 0))
    running = running & (tau_max > 0)
    shrunk = c * (1 - tau / jnp.where(tau_max > 0, tau_max, 1))
    # The rows at the maximum are zeroed exactly: XLA may divide by multiplying with the
    # reciprocal, and a weight left at 1e-18 would keep a far outlier in the next maximum.
    shrunk = jnp.where((c > 0) & (tau < tau_max), jnp.maximum(shrunk, 0), 0)
    c = jnp.where(running, shrunk, c)
    return c, best, best_value, running

  init = (weights, first, jnp.asarray(jnp.inf, dtype), jnp.asarray(True))
  _, best, _, _ = jax.lax.fori_loop(0, num_steps, step, init)
  return jnp.where(jnp.sum(~finite) > f, jnp.nan, best)


@gram_lib.rotation_equivariant
def caf(x, f: int, *, max_iters: Optional[int] = None, axis_name=None):
  r"""Covariance-bound Agnostic Filter: a weighted mean filtered along top eigenvectors.

  Downweights rows by their squared projection on the top eigenvector of the weighted
  covariance, until the weights sum to ``n - 2f``, and returns the weighted mean of smallest
  top eigenvalue seen (see :func:`caf_coefficients` for the exact loop). Exact and
  deterministic: each eigenpair is the ``n x n`` eigenproblem of the weighted, centred Gram
  (:mod:`flagjax.core.spectral`; from 128 workers on, certified Lanczos instead of a full
  ``eigh``: the top eigenvalue within ``16 n eps`` of the exact one), where ByzFL (0.0.11)
  runs one power step from a random vector, so its output changes from call to call. Costs
  one pass for ``K``, at most ``2f`` ``n x n`` top eigenpairs, one pass to combine; on
  coordinate shards one ``psum``.

  Needs ``n > 2f``. Rows holding NaN/Inf (or whose squared norm overflows) start with weight
  0; with at most ``f`` of them the result is finite.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    max_iters: cap on the filter steps (static; default ``2f``, which always finishes).
    axis_name: when set, ``x`` holds a coordinate shard and ``K`` is ``psum``-ed over it; the
      ``n x n`` solve runs on one device and is shared (:func:`flagjax.core.gram.solve_once`).

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Allouah, Guerraoui, Stephan, "Towards Trustworthy Federated Learning with Untrusted
    Participants", ICML 2025 (Algorithm CAF); Diakonikolas et al., "Robust Estimators in
    High Dimensions without the Computational Intractability", FOCS 2016 (the filter).
  """
  f = checks.check_num_byzantine("caf", f)
  _check(tree_lib.num_workers("caf", x), f, max_iters)
  return gram_lib.combine_by_gram(x, lambda K: caf_coefficients(K, f, max_iters=max_iters),
                                  axis_name=axis_name, centered=True,
                                  once=gram_lib.wants_solve_once(caf_coefficients))
