"""Lossy links: coordinates of a worker's own update lost in transit."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import tree as tree_lib

__all__ = ["lossy", "lossy_link"]

PyTree = tree_lib.PyTree


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
