r"""Exact search over the subsets of ``n - f`` workers: the machinery MDA and SMEA share.

A rule that picks "the ``n - f`` rows that look most alike" under some score (MDA: the
diameter; SMEA: the top eigenvalue of their covariance) enumerates all ``C(n, f)`` subsets.
Each subset is given by the ``f`` rows it removes and by the ``n - f`` it keeps; both tables
are built once per ``(n, f)`` in numpy, listed so that index order is the lexicographic order
of the kept sets, and the score is evaluated in chunks (``jax.lax.map`` with a batch size) so
memory stays bounded. The first minimum wins: ties go to the lowest lexicographic kept set.
Where a cheap lower bound of every subset's score is known, :func:`best_subset_by_bound`
scores the subsets in order of their bounds and stops once no bound is left below the best
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

__all__ = [
    "MAX_SUBSETS",
    "best_subset",
    "best_subset_by_bound",
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
  return _row_mask(n, kept[jnp.argmin(scores)])


def _row_mask(n: int, rows: jax.Array) -> jax.Array:
  """``[n]`` bool, True on ``rows`` (one kept set)."""
  return jnp.zeros((n,), bool).at[rows.astype(jnp.int32)].set(True)


def best_subset_by_bound(score: Callable[[jax.Array, jax.Array], jax.Array],
                         lower_bounds: jax.Array, n: int, f: int, *,
                         elements_per_subset: int, batched: bool = False) -> jax.Array:
  r""":func:`best_subset`'s answer, scoring only the subsets whose bound does not rule them out.

  ``lower_bounds[s]`` must satisfy :math:`\mathrm{bound}_s \le \mathrm{score}_s` for every
  subset ``s`` (in :func:`kept_sets` order; the caller lowers its bounds by the rounding of
  the two computations). The subsets are scored in chunks, in increasing order of their
  bounds (a ``lax.while_loop``), and the search stops when the next bound exceeds the best
  score so far: every subset left then scores strictly more
  than the best, so the minimum, ties to the lowest lexicographic kept set included, is the
  one :func:`best_subset` finds. A NaN bound is scored first; NaN scores count as ``+inf``.

  The first chunk holds ``max(64, C(n, f) / 8)`` subsets, and is often all that is scored
  when the bounds are tight; the rest, scored only when a bound leaves room (i.i.d.
  high-dimensional rows, whose subsets' scores all lie within a percent), go in chunks as
  large as memory allows (temporaries of at most ``2**20`` elements, like
  :func:`best_subset`).

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
  pieces = max(1, -(-rest // cap))
  size = max(1, -(-rest // pieces))     # balanced: as large as memory allows, little padding
  padded = first_size + -(-rest // size) * size
  bounds = jnp.where(jnp.isnan(lower_bounds), -jnp.inf, lower_bounds)
  order = jnp.argsort(bounds, stable=True).astype(jnp.int32)
  sorted_bounds = jnp.concatenate([bounds[order], jnp.full((padded - num_subsets + 1,),
                                                           jnp.inf, bounds.dtype)])
  order = jnp.concatenate([order, jnp.zeros((padded - num_subsets,), jnp.int32)])
  valid = jnp.arange(padded) < num_subsets
  dtype = jnp.result_type(lower_bounds.dtype, jnp.float32)
  no_index = jnp.int32(num_subsets)

  def score_chunk(state, chunk_size):
    start, best_score, best_index = state
    index = jax.lax.dynamic_slice_in_dim(order, start, chunk_size)
    scores = (score if batched else jax.vmap(score))(removed[index], kept[index]).astype(dtype)
    usable = jax.lax.dynamic_slice_in_dim(valid, start, chunk_size)
    scores = jnp.where(usable & ~jnp.isnan(scores), scores, jnp.inf)
    least = jnp.min(scores)
    least_index = jnp.min(jnp.where(usable & (scores == least), index, no_index))
    better = (least < best_score) | ((least == best_score) & (least_index < best_index))
    return (start + chunk_size, jnp.where(better, least, best_score),
            jnp.where(better, least_index, best_index))

  def more(state):
    start, best_score, _ = state
    return (start < padded) & (sorted_bounds[start] <= best_score)

  # The first chunk always; the rest only while a bound leaves room (under vmap: while any
  # member's does), in chunks as large as memory allows.
  state = score_chunk((jnp.int32(0), jnp.asarray(jnp.inf, dtype), no_index), first_size)
  _, _, best_index = jax.lax.while_loop(more, lambda st: score_chunk(st, size), state)
  return _row_mask(n, kept[jnp.minimum(best_index, num_subsets - 1)])
