r"""The Flag Aggregator as the authors' released code computes it, deviations and all.

A reference port of ``aggregators/flag.py`` and ``irls_flag`` / ``flag_mean_iteration`` in
``aggregators/center_algorithms_torch.py`` of hamidralmasi/FlagAggregator (the code behind
Almasi et al., ICLR 2024), so that a user can reproduce the paper's numbers with the rule they
came from and see what converging to the flag median (:func:`flagjax.aggregators.flag`)
changes. In d-space, like :mod:`experiments.flag_dspace`: for comparisons on small models,
not for speed.

Where the released code deviates from the paper (and from :func:`flagjax.aggregators.flag`):

1. **One IRLS step from a random start** (``n_its = 1``): ``Y_0`` is the Q factor of a
   ``d x r`` matrix of ``U[-0.5, 0.5)`` entries drawn after ``torch.manual_seed(1)`` on
   *every call* (so the start is the same matrix every step, and the caller's global torch
   generator is reset). The output is essentially a weighted flag mean, not the flag median:
   its objective lies 25-40% above the converged one. Here the start is drawn from
   ``jax.random.key(seed)`` (the same every call, as there; not the same numbers as torch's).
2. **Accept or keep the start**: the step is kept only if it lowers the tracked objective
   ``sum_i sqrt(max(0, 1 - |Y^T u_i|^2))``, which **omits the pair term**; otherwise the random
   start itself is returned.
3. **Pair vectors unnormalised**: ``v_ij = u_i - u_j`` (length up to 2), sine
   ``|1 - |Y^T v_ij|^2|`` (an absolute value, since ``|Y^T v_ij|^2`` may exceed 1).
4. **The regularizer's weight multiplies the vector**: each pair vector is scaled by
   ``(sin^2 + eps)^{-1/4} * lam / (p (p - 1))`` before the SVD, so ``lam`` enters the scatter
   squared (``lam^2 / (p (p-1))^2``, about ``lam^2 / 44100`` per pair at p = 15), and pairs
   are counted in both orders (``i != j``).
5. **Output** ``(1/r) sum_i Y Y^T u_i`` with the *requested* ``r`` (``r_col``), never capped at
   the numerical rank; :func:`flagjax.aggregators.flag` with ``scale="rank"`` divides by ``r``
   capped at the numerical rank of the ``u_i`` (15 rows of rank 3: norm 2.90 from flagjax
   against 1.09 from the released form, which divides by the requested 8 instead of 3).
6. **No NaN/Inf handling**: a non-finite row makes the output non-finite.

Rows are normalised as ``torch.nn.functional.normalize`` does: ``x / max(|x|, 1e-12)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["flag_released"]

_HI = jax.lax.Precision.HIGHEST


def _flatten(x):
  leaves, treedef = jax.tree.flatten(x)
  n = leaves[0].shape[0]
  flat = jnp.concatenate([leaf.reshape(n, -1).astype(jnp.float32) for leaf in leaves], axis=1)
  return flat, leaves, treedef


def _unflatten(vector, leaves, treedef):
  out, start = [], 0
  for leaf in leaves:
    size = int(leaf[0].size)
    out.append(vector[start:start + size].reshape(leaf.shape[1:]).astype(leaf.dtype))
    start += size
  return jax.tree.unflatten(treedef, out)


def released_start(d: int, rank: int, seed: int = 1) -> jax.Array:
  """``Y_0``: the Q factor of a ``d x r`` matrix of ``U[-0.5, 0.5)`` entries (seeded)."""
  raw = jax.random.uniform(jax.random.key(seed), (d, rank), jnp.float32) - 0.5
  return jnp.linalg.qr(raw)[0]


def _tracked_objective(units: jax.Array, Y: jax.Array) -> jax.Array:
  """The released code's ``calc_error_1_2(..., 'sine')``: no pair term."""
  ratios = jnp.sum(jnp.square(jnp.matmul(units, Y, precision=_HI)), axis=1)
  return jnp.sum(jnp.sqrt(jnp.maximum(1 - ratios, 0)))


def flag_released(x, *, rank: Optional[int] = None, lam: float = 0.0, seed: int = 1,
                  eps: float = 1e-7, start: Optional[jax.Array] = None, axis_name=None):
  r"""The released code's Flag Aggregator step (module docstring: its deviations, point by point).

  .. math:: a_i = (|1 - |Y_0^\top u_i|^2| + \epsilon)^{-1/4}, \quad
     a_{ij} = (|1 - |Y_0^\top v_{ij}|^2| + \epsilon)^{-1/4} \frac{\lambda}{p(p-1)}, \quad
     Y_1 = \mathrm{top}_r\,\mathrm{left\ singular\ vectors}
     [a_i u_i, \ a_{ij} v_{ij}]_{i,\ i \ne j},

  ``Y = Y_1`` if it lowers the tracked objective, else ``Y_0``; output
  :math:`\frac{1}{r} \sum_i Y Y^\top u_i`.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them (flattened into one vector
      per worker: a reference port).
    rank: ``r`` (``r_col``); the paper's ``ceil((n + 1) / 2)`` when None.
    lam: the pair regularizer's ``lambda_``.
    seed: the start's seed (the released code uses 1 on every call).
    eps: the weights' ``eps`` (``1e-7`` there).
    start: a ``d x r`` orthonormal start to use instead of the seeded one (for tests).
    axis_name: not supported (the start is a dense ``d x r`` draw); must be None.

  Returns:
    The aggregate, shaped like one worker's update.

  References:
    Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and
    Augmented Losses using Convex Optimization", ICLR 2024, and its released code.
  """
  if axis_name is not None:
    raise ValueError("flag_released needs the whole update (axis_name=None): its start is a "
                     "dense d x r draw")
  flat, leaves, treedef = _flatten(x)
  n, d = flat.shape
  r = n // 2 + 1 if rank is None else int(rank)
  if r < 1:
    raise ValueError(f"flag_released needs rank >= 1, got rank={r}")
  units = flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
  Y0 = released_start(d, r, seed) if start is None else jnp.asarray(start, jnp.float32)
  projections = jnp.matmul(units, Y0, precision=_HI)                    # [n, r]
  weights = (jnp.abs(1 - jnp.sum(projections ** 2, axis=1)) + eps) ** -0.25
  columns = [weights[:, None] * units]
  if lam > 0:
    first, second = zip(*[(i, j) for i in range(n) for j in range(n) if i != j])
    first, second = jnp.asarray(first), jnp.asarray(second)
    pair_vectors = units[first] - units[second]                         # [p (p-1), d]
    pair_projections = projections[first] - projections[second]
    pair_weights = ((jnp.abs(1 - jnp.sum(pair_projections ** 2, axis=1)) + eps) ** -0.25
                    * lam / (n * (n - 1)))
    columns.append(pair_weights[:, None] * pair_vectors)
  weighted = jnp.concatenate(columns, axis=0)                          # [m, d]
  # Left singular vectors of the d x m matrix = right singular vectors of its transpose.
  Y1 = jnp.linalg.svd(weighted, full_matrices=False)[2][:r].T          # [d, r]
  start_objective = _tracked_objective(units, Y0)
  # Their loop runs only while the start's objective exceeds 1e-10, and keeps the step only
  # if it lowers that objective.
  keep_step = (start_objective > 1e-10) & (start_objective - _tracked_objective(units, Y1) > 0)
  Y = jnp.where(keep_step, Y1, Y0)
  aggregate = jnp.matmul(Y, jnp.sum(jnp.matmul(units, Y, precision=_HI), axis=0),
                         precision=_HI) / r
  return _unflatten(aggregate, leaves, treedef)
