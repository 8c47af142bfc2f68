r"""Deterministic clustering of the ``n`` workers, in ``n x n`` work: SignGuard's mean shift and
Clipped Clustering's agglomerative split. Both take an ``active`` mask (rows holding NaN/Inf
are left out and belong to no cluster) and return the mask of the largest cluster.

Written as fixed-shape ``lax`` loops, so they run under ``jit`` and ``vmap`` and give the
same answer on every device (the peers call scikit-learn on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flagjax.core import safe_math
from flagjax.core import tree as tree_lib

__all__ = [
    "largest_agglomerative_group",
    "largest_mean_shift_cluster",
    "mean_shift_bandwidth",
]

# scikit-learn's MeanShift defaults: at most 300 shifts, stopping when a seed moves by at most
# 1e-3 bandwidths.
_MAX_SHIFTS = 300
_STOP_FRACTION = 1e-3


def _pairwise_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  return safe_math.sqrt(jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1))


def mean_shift_bandwidth(points: jax.Array, active: jax.Array, quantile: float) -> jax.Array:
  r"""scikit-learn's ``estimate_bandwidth(quantile=...)`` over the active points.

  With :math:`m` active points and :math:`k = \max(1, \lfloor q m \rfloor)`: the mean over
  points of the distance to the ``k``-th nearest active point, the point itself counted first.
  """
  m = jnp.sum(active)
  k = jnp.maximum(jnp.floor(quantile * m).astype(jnp.int32), 1)
  distances = _pairwise_distances(points, points)
  distances = jnp.where(active[None, :], distances, jnp.inf)
  ordered = jnp.sort(distances, axis=1)
  kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, (points.shape[0], 1)), axis=1)[:, 0]
  return jnp.sum(jnp.where(active, kth, 0)) / jnp.maximum(m, 1)


def largest_mean_shift_cluster(points: jax.Array, active: jax.Array, *,
                               quantile: float = 0.3) -> jax.Array:
  r"""Mean shift with a flat kernel (scikit-learn's ``MeanShift``); the largest cluster.

  Bandwidth :math:`h` from :func:`mean_shift_bandwidth` with ``quantile``. Every active point seeds a mode
  search :math:`z \leftarrow \mathrm{mean}\{p : |p - z| \le h\}` until it moves by at most
  :math:`10^{-3} h` (at most 300 shifts). Modes are ranked by how many points lie within
  :math:`h` (ties: the lower seed), and a mode within :math:`h` of a better-ranked kept mode
  is dropped. Each active point joins its nearest kept mode (ties: the better-ranked) if that
  mode is within :math:`h` (``cluster_all=False``: a point near no mode is an orphan and joins
  no cluster); the largest cluster wins (ties: the better-ranked mode). All seeds are the
  points themselves (scikit-learn's ``bin_seeding`` is a speed-up that coarsens the seeds).

  Args:
    points: ``[n, k]`` features.
    active: ``[n]`` bool, the points to cluster.

  Returns:
    ``[n]`` bool, the members of the largest cluster (all False when no point is active).
  """
  n = points.shape[0]
  points = jnp.where(active[:, None], points, 0)
  h = mean_shift_bandwidth(points, active, quantile)
  stop = _STOP_FRACTION * h

  def within(centres):
    return (_pairwise_distances(centres, points) <= h) & active[None, :]

  def shift(centres):
    member = within(centres).astype(points.dtype)
    count = jnp.sum(member, axis=1, keepdims=True)
    means = jnp.matmul(member, points, precision=tree_lib.HIGHEST) / jnp.maximum(count, 1)
    return jnp.where(count > 0, means, centres)

  def keep_going(carry):
    _, moving, iteration = carry
    return jnp.any(moving) & (iteration < _MAX_SHIFTS)

  def body(carry):
    centres, moving, iteration = carry
    new = shift(centres)
    moved = safe_math.sqrt(jnp.sum(jnp.square(new - centres), axis=1))
    centres = jnp.where(moving[:, None], new, centres)
    return centres, moving & (moved > stop), iteration + 1

  centres, _, _ = jax.lax.while_loop(keep_going, body, (points, active, 0))
  intensity = jnp.where(active, jnp.sum(within(centres), axis=1), -1)
  order = jnp.argsort(-intensity, stable=True)
  centres, seeded = centres[order], active[order]
  close = _pairwise_distances(centres, centres) <= h

  def suppress(i, kept):
    drop = close[i] & kept[i] & (jnp.arange(n) > i)
    return kept & ~drop

  kept = jax.lax.fori_loop(0, n, suppress, seeded)
  to_mode = jnp.where(kept[None, :], _pairwise_distances(points, centres), jnp.inf)
  label = jnp.argmin(to_mode, axis=1)
  member = active & (jnp.min(to_mode, axis=1) <= h)
  sizes = jnp.sum((label[:, None] == jnp.arange(n)[None, :]) & member[:, None], axis=0)
  return member & (label == jnp.argmax(sizes))


def largest_agglomerative_group(distances: jax.Array, active: jax.Array) -> jax.Array:
  r"""Average-linkage agglomerative clustering into two groups; the larger group.

  Starting from singletons of the active rows, the two groups of least average pairwise
  distance merge (ties: the lowest pair of group indices), the merged distances by the
  Lance-Williams rule :math:`d(k, i \cup j) = (|i| d(k, i) + |j| d(k, j)) / (|i| + |j|)`,
  until two groups remain (scikit-learn's ``AgglomerativeClustering(n_clusters=2,
  linkage="average")``). The larger group wins; equal sizes: the group holding the lowest
  active row. One active row: that row.

  Args:
    distances: ``[n, n]`` symmetric, finite on active pairs.
    active: ``[n]`` bool.

  Returns:
    ``[n]`` bool, the members of the larger group.
  """
  n = distances.shape[0]
  if n < 2:
    return active
  index = jnp.arange(n)
  never = jnp.full((n,), jnp.inf, distances.dtype)

  def merge(_, carry):
    # linkage: symmetric, +inf on the diagonal and wherever a group is inactive or merged
    # away, so the least entry in row-major order is the least pair i < j (ties: lowest i,
    # then lowest j) with no mask to rebuild; each merge rewrites two rows and columns only.
    linkage, sizes, groups, label = carry
    # The first row holding the least entry, then its first column: row-major order, but a
    # plain row-wise minimum instead of an index-carrying reduction over all n^2 entries.
    i = jnp.argmin(jnp.min(linkage, axis=1))
    j = jnp.argmin(linkage[i])
    go = groups > 2
    si, sj = sizes[i], sizes[j]
    # Times the reciprocal, written out: XLA rewrites a division by a scalar that way, and
    # ties between merged linkages depend on that rounding.
    row = (si * linkage[i] + sj * linkage[j]) * (1 / jnp.where(go, si + sj, 1))
    row = jnp.where((index == i) | (index == j), jnp.inf, row)
    row_i = jnp.where(go, row, linkage[i])
    row_j = jnp.where(go, never, linkage[j])
    linkage = linkage.at[i, :].set(row_i).at[:, i].set(row_i)
    linkage = linkage.at[j, :].set(row_j).at[:, j].set(row_j)
    sizes = jnp.where(go, sizes.at[i].add(sj).at[j].set(0), sizes)
    label = jnp.where(go & (label == j), i, label)
    return linkage, sizes, groups - go.astype(groups.dtype), label

  both = active[:, None] & active[None, :] & (index[:, None] != index[None, :])
  linkage = jnp.where(both, distances, jnp.inf)
  init = (linkage, active.astype(distances.dtype), jnp.sum(active), index)
  _, sizes, _, label = jax.lax.fori_loop(0, n - 2, merge, init)
  alive = sizes > 0
  # Alive groups are labelled by their lowest member, so argmax's first maximum is the group
  # holding the lowest active row when the sizes tie.
  winner = jnp.argmax(jnp.where(alive, sizes, -1))
  return active & (label == winner)
