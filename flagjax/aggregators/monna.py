r"""MoNNA: the mean of the n - f rows nearest to a trusted reference row, in Gram space."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

__all__ = [
    "monna",
    "monna_coefficients",
]


def _check(n: int, f: int, idx) -> int:
  checks.require("monna", n > 2 * f, "n > 2*f", n=n, f=f)
  try:
    idx = operator.index(idx)
  except TypeError:
    raise ValueError(f"monna needs idx as a static Python int, got {idx!r}") from None
  checks.require("monna", 0 <= idx < n, "0 <= idx < n", n=n, idx=idx)
  return idx


@gram_lib.translation_invariant
def monna_coefficients(K: jax.Array, f: int, idx: int = 0) -> jax.Array:
  r"""Coefficients of MoNNA: :math:`1/(n-f)` on the ``n - f`` rows nearest to the reference.

  The reference is row ``idx`` (the server's trusted worker). If that row is non-finite (so
  it is Byzantine after all), the lowest-index finite row stands in, so that the rule keeps
  the contract "finite when at most ``f`` rows are non-finite". The reference itself is always
  included; distance ties go to the lowest index. Non-finite rows are at ``+inf`` distance, so
  with at most ``f`` of them none is chosen.

  Args:
    K: Gram matrix ``[n, n]`` from :func:`flagjax.core.gram.gram`.
    f: number of Byzantine workers tolerated (static); needs ``n > 2f``.
    idx: the reference row (static, ``0 <= idx < n``).

  Returns:
    Coefficients ``[n]`` (all NaN when more than ``f`` rows are non-finite).

  References:
    Allouah et al., "Fixing by Mixing: A Recipe for Optimal Byzantine ML under
    Heterogeneity", AISTATS 2023; Farhadkhani et al., "Robust Collaborative Learning with
    Linear Gradient Overhead", ICML 2023 (MoNNA).
  """
  f = checks.check_num_byzantine("monna", f)
  n = K.shape[0]
  idx = _check(n, f, idx)
  finite = gram_lib.finite_rows(K)
  reference = jnp.where(finite[idx], idx, jnp.argmax(finite))
  D = gram_lib.sq_distances(K)[reference]
  D = jnp.where(jnp.arange(n) == reference, -1, D)
  chosen = gram_lib.nearest_mask(D[None, :], n - f)[0]
  return gram_lib.nan_beyond_bound(chosen.astype(K.dtype) / (n - f), K, f)


def monna(x, f: int, idx: int = 0, *, axis_name=None):
  r"""MoNNA: the mean of the ``n - f`` rows nearest to row ``idx`` (itself included).

  .. math:: \mathrm{MoNNA}(x) = \frac{1}{n-f} \sum_{j \in N_{n-f}(x_{idx})} x_j

  where :math:`N_{n-f}(x_{idx})` holds the ``n - f`` rows nearest to :math:`x_{idx}`
  (ties: lowest index). Row ``idx`` is trusted (in the paper, the server's own honest
  worker); needs ``n > 2f``. A non-finite reference row is replaced by the lowest-index
  finite row (a deviation from the paper, which assumes ``idx`` honest). Computed in Gram
  space (see :func:`monna_coefficients`).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    idx: the reference row (static).
    axis_name: set inside ``shard_map``/``pmap`` over coordinate shards: the Gram is
      ``psum``-ed over it and the result is this shard of the unsharded answer.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Allouah et al., AISTATS 2023; Farhadkhani et al., ICML 2023.
  """
  f = checks.check_num_byzantine("monna", f)
  idx = _check(tree_lib.num_workers("monna", x), f, idx)
  return gram_lib.combine_by_gram(x, lambda K: monna_coefficients(K, f, idx),
                                  axis_name=axis_name, centered=True)
