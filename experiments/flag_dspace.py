r"""The Flag Aggregator's objective computed in d-space, structured like the authors' code.

A reference port for benchmarks and tests, written from the math in ``docs/design.md`` (the
Flag Aggregator section). It follows the authors' released code in structure (an SVD of the
weighted term vectors per step) and equals it at ``lam = 0``; with ``lam > 0`` it is a d-space
form of *flagjax's* objective (unit pair directions weighted inside the weights), not of the
released code's pair term: every IRLS step forms the ``d x m`` matrix of weighted term vectors
(``m = n`` workers, plus the ``n (n - 1) / 2`` pair directions when ``lam > 0``) and takes
its thin SVD; the top-``r`` left singular vectors are the next ``Y`` (``d x r``). Each step
therefore costs O(d m^2) and holds ``d x m`` floats: with ``lam > 0`` that is ``d x n^2``
(about 160 GB at n = 60, d = 11.2M), which is what :func:`flagjax.aggregators.flag` avoids by
working in Gram space.

Deliberately plain: an array ``[n, ...]`` (trailing dims flattened), a fixed number of
iterations (no ``tol``), the ``"rank"`` output scale of the released code
(``(1/r) sum_i Y Y^T u_i``), and ``rank`` taken as given (not capped at the numerical rank:
with ``rank`` above it, the extra singular vectors have zero singular value, are orthogonal
to every ``u_i`` and change nothing in the output). Non-finite and zero rows are left out
through zero weights, like in flagjax.

    >>> import jax.numpy as jnp
    >>> from experiments.flag_dspace import flag_dspace
    >>> [round(float(v), 4) for v in flag_dspace(jnp.eye(3), rank=3, max_iters=2)]
    [0.3333, 0.3333, 0.3333]

References:
  Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and Augmented
  Losses using Convex Optimization", ICLR 2024; released code:
  https://github.com/hamidralmasi/FlagAggregator
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("rank", "lam", "max_iters"))
def flag_dspace(x: jax.Array, rank: int, lam: float = 0.0, max_iters: int = 20,
                eps: float = 1e-7) -> jax.Array:
  r"""Flag Aggregator by an SVD of the ``d x m`` term matrix each IRLS step.

  .. math:: Y_{t+1} = \text{top-}r \text{ left singular vectors of }
     \big[\sqrt{w_i}\, u_i \;\big|\; \sqrt{\lambda w_{ij} / P}\, d_{ij}\big], \qquad
     w = 1 / \sqrt{1 - |Y_t^\top v|^2 + \epsilon}

  from ``Y_0`` with all weights 1; output :math:`\frac{1}{r} \sum_i Y Y^\top u_i`.

  Args:
    x: stacked worker updates ``[n, ...]`` (an array; trailing dims are flattened).
    rank: subspace dimension ``r`` (static, ``1 <= r <= n``).
    lam: pair-regularizer weight (static); ``0`` leaves the pairs out of the matrix entirely.
    max_iters: IRLS steps after the start (static; always all of them).
    eps: weight smoothing.

  Returns:
    The aggregate, shaped like one worker's update, in ``x``'s dtype.
  """
  n = x.shape[0]
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  rows = x.reshape(n, -1).astype(dtype)
  finite = jnp.all(jnp.isfinite(rows), axis=1)
  rows = jnp.where(finite[:, None], rows, 0)
  norms = jnp.linalg.norm(rows, axis=1)
  kept = finite & (norms > 0)
  units = jnp.where(kept[:, None], rows / jnp.where(kept, norms, 1)[:, None], 0)  # [n, d]

  with_pairs = not (isinstance(lam, (int, float)) and lam == 0)
  if with_pairs:
    first, second = np.triu_indices(n, k=1)
    differences = units[first] - units[second]  # [P_all, d]: the d x n^2 of the paper
    distances = jnp.linalg.norm(differences, axis=1)
    threshold = 1e-6 if dtype == jnp.float64 else 1e-3
    valid = kept[first] & kept[second] & (distances > threshold)
    pair_directions = jnp.where(
        valid[:, None], differences / jnp.where(valid, distances, 1)[:, None], 0)
    pair_scale = lam / jnp.maximum(jnp.sum(valid), 1)

  def top_subspace(weights, pair_weights):
    columns = units * jnp.sqrt(weights)[:, None]
    if with_pairs:
      columns = jnp.concatenate(
          [columns, pair_directions * jnp.sqrt(pair_scale * pair_weights)[:, None]], 0)
    left, _, _ = jnp.linalg.svd(columns.T, full_matrices=False)  # [d, m]
    return left[:, :rank]

  def irls_weights(subspace):
    sines = 1 - jnp.sum(jnp.matmul(units, subspace) ** 2, axis=1)
    weights = jnp.where(kept, 1 / jnp.sqrt(jnp.maximum(sines, 0) + eps), 0)
    if not with_pairs:
      return weights, None
    pair_sines = 1 - jnp.sum(jnp.matmul(pair_directions, subspace) ** 2, axis=1)
    pair_weights = jnp.where(valid, 1 / jnp.sqrt(jnp.maximum(pair_sines, 0) + eps), 0)
    return weights, pair_weights

  subspace = top_subspace(kept.astype(dtype),
                          valid.astype(dtype) if with_pairs else None)
  subspace = jax.lax.fori_loop(0, max_iters,
                               lambda _, y: top_subspace(*irls_weights(y)), subspace)
  total = jnp.sum(units, axis=0)
  aggregate = jnp.matmul(subspace, jnp.matmul(subspace.T, total)) / rank
  return aggregate.reshape(x.shape[1:]).astype(x.dtype)
