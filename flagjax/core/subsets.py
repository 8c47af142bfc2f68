r"""Exact search over the subsets of ``n - f`` workers: the machinery MDA and SMEA share.

A rule that picks "the ``n - f`` rows that look most alike" under some score (MDA: the
diameter; SMEA: the top eigenvalue of their covariance) enumerates all ``C(n, f)`` subsets.
Each subset is given by the ``f`` rows it removes and by the ``n - f`` it keeps; both tables
are built once per ``(n, f)`` in numpy, listed so that index order is the lexicographic order
of the kept sets, and the score is evaluated in chunks (``jax.lax.map`` with a batch size) so
memory stays bounded. The first minimum wins: ties go to the lowest lexicographic kept set.

One stated limit for every such rule: ``C(n, f) <= MAX_SUBSETS`` (100000), refused beyond with
``<rule> needs C(n, f) <= 100000 subsets, got n=.., f=..``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flagjax.core import checks

__all__ = [
    "MAX_SUBSETS",
    "best_subset",
    "check_subset_search",
    "kept_sets",
    "removed_sets",
]

# The exact search enumerates C(n, f) subsets; beyond this it refuses with a ValueError.
MAX_SUBSETS = 100_000
# Elements of the per-chunk temporaries ([batch, elements per subset]): bounds memory per step.
_CHUNK_ELEMENTS = 1 << 20


def check_subset_search(rule: str, n: int, f: int) -> None:
  """``n > 2f`` (an honest majority) and ``C(n, f) <= MAX_SUBSETS``, as ``ValueError`` s."""
  checks.require(rule, n > 2 * f, "n > 2*f", n=n, f=f)
  checks.require(rule, math.comb(n, f) <= MAX_SUBSETS,
                 f"C(n, f) <= {MAX_SUBSETS} subsets", n=n, f=f)


def _index_dtype(n: int):
  return np.int16 if n < 2**15 else np.int32


@functools.lru_cache(maxsize=None)
def removed_sets(n: int, f: int) -> np.ndarray:
  """All removed sets ``[C(n, f), f]``, index order = lexicographic order of the kept sets.

  Kept sets ascend lexicographically exactly when their complements descend, so the removed
  sets are listed in reverse lexicographic order.
  """
  table = np.array(list(itertools.combinations(range(n), f)), _index_dtype(n)).reshape(-1, f)
  return table[::-1].copy()


@functools.lru_cache(maxsize=None)
def kept_sets(n: int, f: int) -> np.ndarray:
  """All kept sets ``[C(n, f), n - f]`` (ascending indices), in the order of
  :func:`removed_sets`."""
  table = np.array(list(itertools.combinations(range(n), n - f)), _index_dtype(n))
  return table.reshape(-1, n - f)


def best_subset(score: Callable[[jax.Array, jax.Array], jax.Array], n: int, f: int, *,
                elements_per_subset: int) -> jax.Array:
  r"""The kept set of least score, as an ``[n]`` bool mask.

  .. math:: S^\star = \arg\min_{|S| = n - f} \mathrm{score}(S)

  (ties: the lowest lexicographic ``S``). Call :func:`check_subset_search` first.

  Args:
    score: ``score(removed [f], kept [n - f]) -> scalar``, the two index rows of one subset
      (int16/int32); NaN scores are never chosen unless every score is NaN.
    n: number of workers (static).
    f: size of the removed sets (static, ``>= 1``).
    elements_per_subset: the size of one subset's temporaries, so that a chunk of subsets
      holds about ``2**20`` elements.

  Returns:
    ``[n]`` bool, True on the rows of :math:`S^\star`.
  """
  removed = jnp.asarray(removed_sets(n, f))
  kept = jnp.asarray(kept_sets(n, f))
  num_subsets = removed.shape[0]
  batch = max(1, min(num_subsets, _CHUNK_ELEMENTS // max(1, elements_per_subset)))
  scores = jax.lax.map(lambda pair: score(*pair), (removed, kept), batch_size=batch)
  scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
  best = kept[jnp.argmin(scores)]
  return jnp.zeros((n,), bool).at[best.astype(jnp.int32)].set(True)
