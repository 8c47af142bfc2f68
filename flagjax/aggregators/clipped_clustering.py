r"""Clipped Clustering (Li, Ngai & Voigt, IEEE Transactions on Big Data 2023; Blades' rule).

Rows are clipped to the median norm, split in two by agglomerative clustering on their cosine
distances, and the larger group is averaged. Cosines come from the Gram matrix and clipping
scales rows, so this is a Gram-space rule: one pass for ``K``, ``n x n`` clustering, one pass
to combine.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import clustering
from flagjax.core import gram as gram_lib
from flagjax.core import sorting
from flagjax.core import tree as tree_lib

__all__ = [
    "clipped_clustering",
    "clipped_clustering_coefficients",
]


def clipped_clustering_coefficients(K: jax.Array, *, tau: Optional[float] = None) -> jax.Array:
  r"""Coefficients of Clipped Clustering:
  :math:`c_i = [i \in G] \min(1, \tau / |x_i|) / |G|`.

  :math:`\tau` is ``tau`` or the median norm of the finite rows; :math:`G` is the larger of
  the two groups of average-linkage agglomerative clustering on the cosine distances
  :math:`1 - \cos(x_i, x_j)` of the finite rows
  (:func:`flagjax.core.clustering.largest_agglomerative_group`; equal sizes: the group of
  the lowest row). A zero row has cosine 0 with every row (distance 1).

  Args:
    K: plain Gram matrix ``[n, n]`` (:func:`flagjax.core.gram.gram`, not centred: cosines
      are about the origin).
    tau: the clipping norm, or None for the median norm.

  Returns:
    Coefficients ``[n]``; all NaN when no row is finite.
  """
  K, finite = gram_lib.clean_gram(K)
  norms = gram_lib.norms(K)
  threshold = sorting.masked_median(norms, finite) if tau is None else jnp.asarray(tau, K.dtype)
  safe = jnp.where(norms > 0, norms, 1)
  cosine = jnp.where((norms[:, None] > 0) & (norms[None, :] > 0),
                     K / safe[:, None] / safe[None, :], 0)
  group = clustering.largest_agglomerative_group(1 - jnp.clip(cosine, -1, 1), finite)
  scale = gram_lib.clip_scale(norms, threshold)
  coefficients = jnp.where(group, scale, 0) / jnp.maximum(jnp.sum(group), 1)
  return jnp.where(jnp.any(finite), coefficients, jnp.nan)


@gram_lib.rotation_equivariant
def clipped_clustering(x, *, tau: Optional[float] = None, axis_name=None):
  r"""Clipped Clustering: the mean of the larger cosine cluster, rows clipped to a norm.

  .. math:: \mathrm{CC}(x) = \frac{1}{|G|}\sum_{i \in G} x_i \min\Big(1, \frac{\tau}{|x_i|}\Big)

  with :math:`G` the larger of two average-linkage clusters on cosine distance (see
  :func:`clipped_clustering_coefficients`). No ``f``: any number of rows holding NaN/Inf (or
  whose squared norm overflows the Gram) are left out of every step.

  Choices where the paper is silent or a peer differs: ``tau=None`` clips to the median norm
  of *this* call's rows (Blades clips to the median of every norm seen since the start, a
  state this pure function does not keep; pass ``tau`` for a fixed norm); the clustering is
  deterministic, written as an ``n x n`` ``lax`` loop, with ties to the lowest indices
  (Blades calls scikit-learn's ``AgglomerativeClustering`` on the host).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    tau: the clipping norm (``> 0``), or None for the median norm.
    axis_name: when set, ``x`` holds a coordinate shard and ``K`` is ``psum``-ed over it.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Li, Ngai, Voigt, "An Experimental Study of Byzantine-Robust Aggregation Schemes in
    Federated Learning", IEEE Transactions on Big Data, 2023.
  """
  tree_lib.num_workers("clipped_clustering", x)
  if tau is not None:
    checks.check_real("clipped_clustering", "tau", tau, minimum=0.0, open_minimum=True)
  return gram_lib.combine_by_gram(
      x, lambda K: clipped_clustering_coefficients(K, tau=tau), axis_name=axis_name)
