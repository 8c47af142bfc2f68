r"""Exact search over the subsets of ``n - f`` workers: the machinery MDA and SMEA share.

A rule that picks "the ``n - f`` rows that look most alike" under some score (MDA: the
diameter; SMEA: the top eigenvalue of their covariance) enumerates all ``C(n, f)`` subsets.
Each subset is given by the ``f`` rows it removes and by the ``n - f`` it keeps; both tables
are built once per ``(n, f)`` in numpy, listed so that index order is the lexicographic order
of the kept sets, and the score is evaluated in chunks (``jax.lax.map`` with a batch size) so
memory stays bounded. The first minimum wins: ties go to the lowest lexicographic kept set.
Where a cheap lower bound of every subset's score is known, :func:`best_subset_by_bound`
scores the subsets of least bound first, then only those whose bound is still below the best
score: the same answer, after scoring only the subsets that could win.

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
from flagjax.core import tree as tree_lib

__all__ = [
    "MAX_SUBSETS",
    "best_subset",
    "best_subset_by_bound",
    "check_subset_search",
    "kept_sets",
    "pair_sums",
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
  return _row_mask(n, kept[jnp.argmin(scores)])


def pair_sums(values: jax.Array, n: int, f: int) -> jax.Array:
  r"""For every kept set ``S`` (in :func:`kept_sets` order), the sum of ``values`` over its
  pairs: ``out[s] = sum_{i < j in S} values[pair(i, j)]``.

  ``values`` is ``[n (n - 1) / 2, ...]``, its pairs in ``numpy.triu_indices(n, 1)`` order. One
  product with the subsets' 0/1 pair-membership matrix, built per chunk of subsets from the
  removed sets (``lax.map``; chunks of at most ``2**20`` matrix entries), so no
  ``[C(n, f), n - f, ...]`` gather and no constant of ``C(n, f) x n^2`` entries.

  Returns:
    ``[C(n, f), ...]``.
  """
  first, second = np.triu_indices(n, 1)
  removed = jnp.asarray(removed_sets(n, f)).astype(jnp.int32)
  num_subsets = removed.shape[0]
  flat = values.reshape(values.shape[0], -1)

  def subset_sums(removed_row):   # one subset; lax.map vmaps it over a chunk: one product
    member = jnp.ones((n,), values.dtype).at[removed_row].set(0)
    return jnp.matmul(member[first] * member[second], flat, precision=tree_lib.HIGHEST)

  batch = max(1, min(num_subsets, _CHUNK_ELEMENTS // max(1, len(first))))
  out = jax.lax.map(subset_sums, removed, batch_size=batch)
  return out.reshape((num_subsets,) + values.shape[1:])


def _row_mask(n: int, rows: jax.Array) -> jax.Array:
  """``[n]`` bool, True on ``rows`` (one kept set)."""
  return jnp.zeros((n,), bool).at[rows.astype(jnp.int32)].set(True)


def best_subset_by_bound(score: Callable[[jax.Array, jax.Array], jax.Array],
                         lower_bounds: jax.Array, n: int, f: int, *,
                         elements_per_subset: int, batched: bool = False) -> jax.Array:
  r""":func:`best_subset`'s answer, scoring only the subsets whose bound does not rule them out.

  ``lower_bounds[s]`` must satisfy :math:`\mathrm{bound}_s \le \mathrm{score}_s` for every
  subset ``s`` (in :func:`kept_sets` order; the caller lowers its bounds by the rounding of
  the two computations). A subset is a *candidate* while its bound is at most the best score
  so far; the search scores candidates in chunks and stops when none is left, so every subset
  left unscored scores strictly more than the best, and the minimum, ties to the lowest
  lexicographic kept set included, is the one :func:`best_subset` finds (the tie rule is
  applied across chunks, so the order in which they are scored does not matter). A NaN bound
  is a candidate until scored; NaN scores count as ``+inf``.

  The chunks (steps 2 and 3 are ``lax.while_loop`` s that stop once no candidate is left;
  under ``vmap``, once no member of the batch has one):

  1. the ``k = max(64, C(n, f) / 8)`` subsets of least bound (``lax.top_k``; no full sort),
     often all that is scored when the bounds are tight;
  2. at most once, the candidates left when there are at most ``k`` of them, so that a
     batch in which a few members need a few more subsets pays a chunk of ``k``, not the
     whole rest (where more are left, step 3 scores them all at once);
  3. the candidates still left, in chunks as large as memory allows (temporaries of at most
     ``2**20`` elements, like :func:`best_subset`): i.i.d. high-dimensional rows, whose
     subsets' scores all lie within a percent, need nearly every subset scored.

  Measured (SMEA, 15 digits-MLP workers, f = 5, under its optimal ALIE, 12 runs vmapped, 50
  steps): with one chunk of the whole rest after step 1, 34.1 s; with chunks of ``k`` after
  it, 23.9 s; this schedule, 25.8 s (both with a full sort of the bounds, 5.5 ms per call for
  12 x 3,003 bounds, against 1.9 ms for ``top_k``); with ``top_k`` and SMEA's bounds as one
  product, 16.9 s. Unvmapped on i.i.d. rows (n = 16, f = 4) step 2 is skipped, so the search
  costs no more than one chunk of the whole rest.

  Args:
    score: as in :func:`best_subset`.
    lower_bounds: ``[C(n, f)]``.
    n, f: as in :func:`best_subset`.
    elements_per_subset: as in :func:`best_subset` (bounds a chunk's memory).
    batched: ``score`` takes a chunk's index rows, ``[c, f]`` and ``[c, n - f]``, and returns
      its ``[c]`` scores (for a score that vectorises better by hand than under ``vmap``);
      by default it scores one subset and is ``vmap``-ped.

  Returns:
    ``[n]`` bool, True on the rows of :math:`S^\star`.
  """
  removed = jnp.asarray(removed_sets(n, f))
  kept = jnp.asarray(kept_sets(n, f))
  num_subsets = removed.shape[0]
  cap = max(1, _CHUNK_ELEMENTS // max(1, elements_per_subset))
  first_size = max(1, min(max(64, -(-num_subsets // 8)), num_subsets, cap))
  rest = num_subsets - first_size
  second_size = min(first_size, rest)
  rest_size = max(1, -(-rest // max(1, -(-rest // cap))))   # balanced, as large as memory allows
  bounds = jnp.where(jnp.isnan(lower_bounds), -jnp.inf, lower_bounds)
  dtype = jnp.result_type(lower_bounds.dtype, jnp.float32)
  no_index = jnp.int32(num_subsets)

  def score_chunk(index, state):
    """Scores the subsets ``index`` (``num_subsets``: an empty slot)."""
    best_score, best_index, scored = state
    usable = index < num_subsets
    index = jnp.minimum(index, num_subsets - 1)
    scores = (score if batched else jax.vmap(score))(removed[index], kept[index]).astype(dtype)
    scores = jnp.where(usable & ~jnp.isnan(scores), scores, jnp.inf)
    least = jnp.min(scores)
    least_index = jnp.min(jnp.where(usable & (scores == least), index, no_index))
    better = (least < best_score) | ((least == best_score) & (least_index < best_index))
    return (jnp.where(better, least, best_score), jnp.where(better, least_index, best_index),
            scored.at[index].max(usable))

  def candidates(state):
    best_score, _, scored = state
    return ~scored & (bounds <= best_score)

  def score_candidates(size):
    def body(carry):
      state, count = carry
      index = jnp.nonzero(candidates(state), size=size, fill_value=num_subsets)[0]
      return score_chunk(index.astype(jnp.int32), state), count + 1
    return body

  def search(max_chunks, size, state, only_if_it_finishes=False):
    if size < 1 or rest == 0:
      return state

    def go_on(carry):
      state, count = carry
      left = jnp.sum(candidates(state))
      fits = (left <= size) if only_if_it_finishes else True
      return (count < max_chunks) & (left > 0) & fits
    return jax.lax.while_loop(go_on, score_candidates(size), (state, jnp.int32(0)))[0]

  first = jax.lax.top_k(-bounds, first_size)[1].astype(jnp.int32)   # ties: the lower index
  state = score_chunk(first, (jnp.asarray(jnp.inf, dtype), no_index,
                              jnp.zeros((num_subsets,), bool)))
  state = search(1, second_size, state, only_if_it_finishes=True)
  state = search(num_subsets, rest_size, state)
  return _row_mask(n, kept[jnp.minimum(state[1], num_subsets - 1)])
