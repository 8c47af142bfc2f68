r"""SMEA, Smallest Maximum Eigenvalue Averaging (Allouah et al., ICML 2023).

The mean of the ``n - f`` rows whose empirical covariance has the least top eigenvalue: an
exact search over all ``C(n, f)`` subsets (:mod:`flagjax.core.subsets`, shared with MDA and
its limit), each subset's eigenvalue from its ``(n - f) x (n - f)`` centred Gram
(:mod:`flagjax.core.spectral`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import spectral
from flagjax.core import subsets
from flagjax.core import tree as tree_lib

__all__ = [
    "smea",
    "smea_coefficients",
]


@gram_lib.translation_invariant
def smea_coefficients(K: jax.Array, f: int) -> jax.Array:
  r"""Coefficients of SMEA: :math:`1/(n-f)` on the rows of :math:`S^\star`.

  .. math:: S^\star = \arg\min_{|S| = n - f} \lambda_{\max}\Big(\frac{1}{|S|}\sum_{i \in S}
            (x_i - \mu_S)(x_i - \mu_S)^\top\Big), \qquad \mu_S = \frac{1}{|S|}\sum_{i\in S} x_i

  (ties: the lowest lexicographic ``S``). A subset holding a non-finite row scores ``+inf``,
  so with at most ``f`` of them :math:`S^\star` avoids them. Needs ``n > 2f`` and
  ``C(n, f) <= 100000`` (the limit of :mod:`flagjax.core.subsets`).

  Args:
    K: Gram matrix ``[n, n]`` (centred, :func:`flagjax.core.gram.gram`).
    f: number of Byzantine workers tolerated (static).

  Returns:
    Coefficients ``[n]`` (all NaN when more than ``f`` rows are non-finite).
  """
  f = checks.check_num_byzantine("smea", f)
  n = K.shape[0]
  subsets.check_subset_search("smea", n, f)
  dtype = K.dtype
  if f == 0:
    return jnp.full((n,), 1.0 / n, dtype)
  K, finite = gram_lib.clean_gram(K)
  size = n - f
  uniform = jnp.full((size,), 1.0 / size, dtype)

  def eigenvalue(removed, kept):
    del removed
    kept = kept.astype(jnp.int32)
    value = spectral.top_eigenvalue(K[kept][:, kept], uniform)
    return jnp.where(jnp.all(finite[kept]), value, jnp.inf)

  best = subsets.best_subset(eigenvalue, n, f, elements_per_subset=3 * size * size)
  coefficients = best.astype(dtype) / size
  return jnp.where(jnp.sum(~finite) > f, jnp.nan, coefficients)


def smea(x, f: int, *, axis_name=None):
  r"""Smallest Maximum Eigenvalue Averaging: the mean of the ``n - f`` rows of least spread.

  The spread of a subset is the top eigenvalue of its empirical covariance (see
  :func:`smea_coefficients`). Exact search over all ``C(n, f)`` subsets, each an
  ``(n - f) x (n - f)`` symmetric eigenvalue problem on the subset's centred Gram, so the
  answer is exact and deterministic (ByzFL 0.0.11 estimates each eigenvalue with one power
  step from a random vector: a noisy score, a subset that changes from call to call). Costs
  one pass for ``K``, ``C(n, f)`` small ``eigvalsh``, one pass to combine. Needs ``n > 2f``
  and refuses searches over more than ``C(n, f) = 100000`` subsets, like
  :func:`flagjax.aggregators.mda`.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: when set, ``x`` holds a coordinate shard and ``K`` is ``psum``-ed over it.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Allouah, Guerraoui, Gupta, Pinot, Stephan, "On the Privacy-Robustness-Utility Trilemma in
    Distributed Learning", ICML 2023.
  """
  f = checks.check_num_byzantine("smea", f)
  subsets.check_subset_search("smea", tree_lib.num_workers("smea", x), f)
  return gram_lib.combine_by_gram(x, lambda K: smea_coefficients(K, f), axis_name=axis_name,
                                  centered=True)
