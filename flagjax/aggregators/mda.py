r"""Minimum-diameter averaging (MDA): exact search over all subsets of n - f rows.

The diameter of a subset ``S`` is :math:`\max_{i,j \in S} D_{ij}`. Every subset of size
``n - f`` is the complement of a removed set ``R`` of size ``f``, and at most
:math:`f (n-1)` pairs touch ``R``; so the diameter of ``S`` is the largest distance among the
top :math:`L = f (n-1) + 1` pairs (by distance) that avoid ``R``. Each subset then costs
``O(f n)`` instead of ``O(n^2)``; the search itself (chunks of subsets, the tie rule, the
limit ``C(n, f) <= 100000``) is :mod:`flagjax.core.subsets`, shared with SMEA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import subsets
from flagjax.core import tree as tree_lib

__all__ = [
    "mda",
    "mda_coefficients",
]


def _check(n: int, f: int) -> None:
  subsets.check_subset_search("mda", n, f)


@gram_lib.solved_once
@gram_lib.translation_invariant
def mda_coefficients(K: jax.Array, f: int) -> jax.Array:
  r"""Coefficients of MDA: :math:`1/(n-f)` on the ``n - f`` rows of least diameter.

  .. math:: S^\star = \arg\min_{|S| = n - f} \max_{i, j \in S} D_{ij}, \qquad
            c_i = \frac{[i \in S^\star]}{n - f}

  (ties: the lowest lexicographic ``S``). Non-finite workers are at ``+inf`` distance
  (:func:`flagjax.core.gram.sq_distances`), so with at most ``f`` of them ``S^\star`` avoids
  them. Needs ``n > 2f`` and ``C(n, f) <= MAX_SUBSETS`` (100000).

  Args:
    K: Gram matrix ``[n, n]`` from :func:`flagjax.core.gram.gram`.
    f: number of Byzantine workers tolerated (static).

  Returns:
    Coefficients ``[n]`` (all NaN when more than ``f`` rows are non-finite).

  References:
    El-Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient Stochastic
    Gradient Descent", ICLR 2021. Rousseeuw, "Multivariate estimation with high breakdown
    point", 1985 (the minimum volume ellipsoid idea).
  """
  f = checks.check_num_byzantine("mda", f)
  n = K.shape[0]
  _check(n, f)
  dtype = K.dtype
  if f == 0:
    return jnp.full((n,), 1.0 / n, dtype)
  D = gram_lib.sq_distances(K)
  first, second = np.triu_indices(n, k=1)
  num_top = min(f * (n - 1) + 1, first.size)
  top_dist, top_pair = jax.lax.top_k(D[first, second], num_top)
  top_first = jnp.asarray(first)[top_pair]
  top_second = jnp.asarray(second)[top_pair]
  workers = jnp.arange(n)

  def diameter(removed, kept):
    del kept
    kept_mask = jnp.all(workers[None, :] != removed[:, None].astype(workers.dtype), axis=0)
    avoids = kept_mask[top_first] & kept_mask[top_second]
    return jnp.max(jnp.where(avoids, top_dist, -1))

  best = subsets.best_subset(diameter, n, f, elements_per_subset=max(f * n, num_top))
  return gram_lib.nan_beyond_bound(best.astype(dtype) / (n - f), K, f)


@gram_lib.rotation_equivariant
def mda(x, f: int, *, axis_name=None):
  r"""Minimum-diameter averaging: the mean of the ``n - f`` rows of least diameter.

  .. math:: \mathrm{MDA}(x) = \frac{1}{n-f} \sum_{i \in S^\star} x_i, \qquad
            S^\star = \arg\min_{|S| = n-f} \max_{i,j \in S} |x_i - x_j|

  Exact search over all ``C(n, f)`` subsets (ties: the lowest lexicographic subset), in Gram
  space (see :func:`mda_coefficients`). Needs ``n > 2f`` (``n >= 2f + 1``, the bound under
  which MDA is robust) and refuses searches over more than ``C(n, f) = 100000`` subsets with
  ``mda needs C(n, f) <= 100000 subsets, got n=.., f=..``. Rows holding NaN/Inf are at
  infinite distance: with at most ``f`` of them the result is finite. Cost beyond the two
  passes: ``O(C(n, f) f n)`` (about 15 ms at the limit, n=40, f=4, on a 2-core CPU).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards: the Gram is
      ``psum``-ed over it, the subset search runs on one device and is shared
      (:func:`flagjax.core.gram.solve_once`), and the result is this shard of the unsharded
      answer.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    El-Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient Stochastic
    Gradient Descent", ICLR 2021; Allouah et al., "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity", AISTATS 2023.
  """
  f = checks.check_num_byzantine("mda", f)
  _check(tree_lib.num_workers("mda", x), f)
  return gram_lib.combine_by_gram(x, lambda K: mda_coefficients(K, f), axis_name=axis_name,
                                  centered=True,
                                  once=gram_lib.wants_solve_once(mda_coefficients))
