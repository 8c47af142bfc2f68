r"""The Flag Aggregator: IRLS on the flag-median objective, computed in Gram space.

The workers' normalised updates :math:`u_i = x_i / |x_i|` are summarised by an ``r``-dimensional
subspace ``Y`` (``d x r``, orthonormal columns) that minimises

.. math:: A(Y) = \sum_i \sqrt{1 - |Y^\top u_i|^2}
   + \lambda \operatorname*{mean}_{i<j} \sqrt{1 - |Y^\top d_{ij}|^2},
   \qquad d_{ij} = \frac{u_i - u_j}{|u_i - u_j|},

by iteratively reweighted least squares (IRLS): each step takes the top-``r`` eigenvectors of
:math:`S(w) = \sum_i w_i u_i u_i^\top + \frac{\lambda}{P} \sum_{i<j} w_{ij} d_{ij} d_{ij}^\top`
with :math:`w = 1/\sqrt{\sin^2 + \epsilon}` at the current ``Y``. The aggregate is the
projection of the workers onto ``Y`` (``scale`` says how it is scaled).

Why everything is ``n x n`` (a reader can check this in a few lines). Let ``U`` be the
``n x d`` matrix of normalised rows (rows left out are zero), ``G = U U^T = Q diag(g) Q^T``
its Gram matrix, ``g_+`` its eigenvalues above the rank threshold (the rest are set to 0) and
``U = Q g_+^{1/2} V^T`` the thin SVD (``V``: ``d x rho``, orthonormal). Define the
``n x n`` matrix ``R = g_+^{1/2} Q^T``; its column ``R e_i = V^T u_i`` is row ``i`` in the
orthonormal basis ``V`` (``G = R^T R``, no inverse needed). Every term vector is ``U^T a``
for a known ``a`` (``u_i``: ``a = e_i``; ``d_ij``: ``a = (e_i - e_j) / delta_ij`` with
``delta_ij^2 = 2 - 2 G_ij``), so

.. math:: S(w) = U^\top M(w) U = V (R M R^\top) V^\top, \qquad
   M(w) = \mathrm{diag}(w_i) + \frac{\lambda}{P} \sum_{i<j}
   \frac{w_{ij}}{\delta_{ij}^2} (e_i - e_j)(e_i - e_j)^\top,

``M`` being a diagonal plus a weighted graph Laplacian (``n x n``, O(n^2) to build). The top
eigenvectors of ``S`` are ``Y = V z`` with ``z`` the top eigenvectors of the ``n x n`` matrix
``H = R M R^T``. The IRLS weights need only coordinates in the eigenbasis ``E`` of ``H``
(``z`` = its top ``r`` columns): ``Y^T u_i = z^T R e_i =: p_i``, and the residual
``(I - Y Y^T) u_i`` has the other coordinates ``E_rest^T R e_i`` (plus the dropped directions),
so ``sin_i^2`` is their sum of squares and ``sin_ij^2`` that of their differences over
``delta_ij^2`` (O(n^3) per iteration, like the eigensolver). Finally
``V = U^T Q g_+^{-1/2}``, so the output
``Y Y^T U^T a = U^T B (P a)`` with ``B = Q g_+^{-1/2} z`` (``n x r``) and ``P = z^T R``: a
combination of the ``u_i``, hence of the ``x_i`` (divide by ``|x_i|``). The whole solve is one
pass over the input for ``K = X X^T`` (``G = D^{-1/2} K D^{-1/2}``), one ``n x n``
eigenproblem (plus O(n^3) work) per iteration, and one pass to combine: nothing of size ``d x r``, ``d x n`` or
``d x n^2`` is ever formed, so the pair regularizer costs nothing in ``d``.

Rank deficiency (duplicated rows, positive multiples, ``n > d``): eigenvalues of ``G`` below
the relative threshold (1e-10 in float64, 1e-5 otherwise) are dropped, ``r`` is capped at the
number kept. Shapes stay static: ``H``'s dropped rows and columns are exactly zero and are
shifted far below the spectrum so they are never among the top ``r``, and the columns of
``z`` beyond the numerical rank are zeroed (they span nothing). The sines and the objective
read the retained directions only: the dropped ones are rounding, so inputs the subspace fits
exactly report ``A = 0`` (to ~1e-7 in float32), not a floor of ~1e-3.

Near-duplicate rows. A pair enters the model through ``R (e_i - e_j)``, its difference in the
retained directions; ``H`` cannot see the part of ``u_i - u_j`` that lies in dropped ones.
Two rows ``delta`` apart (and nothing else along their difference) span an eigen-direction of
``G`` with eigenvalue about ``delta^2 / 2``, dropped once ``delta^2 / 2 < rtol * g_max``: with
``g_max <= k`` that is ``delta`` below ~5e-5 (float64, k = 15) or ~0.02 (float32). Such a pair
was kept by the distance threshold alone while its direction was invisible to ``H``: its sine
then measured a direction the IRLS could not fit (2.3e-3 relative error in the aggregate at
``delta = 3e-6``, float64). So the rule for pairs is the consistent one: a pair is kept when
``delta`` is above the absolute threshold (below) *and* the retained directions hold at least
99% of ``delta^2``; its direction is the resolved part normalised,
``d_ij = V R (e_i - e_j) / |R (e_i - e_j)|``, identical to ``(u_i - u_j) / delta`` whenever
nothing is dropped. The rule is data-dependent (not a fixed ``delta``): a pair whose
difference is shared by other rows stays resolvable much closer.

Precision: the ``n x n`` work runs in the dtype of ``K`` (float32 for float32/bfloat16 input,
float64 for float64 input), whatever ``jax_enable_x64`` says, so a result never depends on a
global flag; the float32 thresholds (docs/design.md) apply to float32. The sines are sums of
squares of residual coordinates, not ``1 - |Y^T u|^2``: the weights ``1/sqrt(sin^2 + eps)``
are largest where the fit is nearly exact, and there ``1 - |Y^T u|^2`` would be off by about
the float32 epsilon ~ ``eps`` (this alone moved float32 results ~1e-4 off the float64 ones;
now ~1e-5 in the IRLS transients, ~1e-6 once converged, the float32 eigensolvers' backward
error). The pair distance ``delta_ij^2 = 2 - 2 G_ij`` carries an absolute error of about the
machine epsilon, the reason pairs closer than 1e-3 (float32) / 1e-6 (float64) are left out
whatever the resolution test says.

Starts and stopping. IRLS never raises ``A`` but stops in local minima: from the flag mean
alone, converged objectives lie up to ~1% above better minima that other starts or an
independent Riemannian search on the Grassmannian find (``experiments/flag_convergence.py``
measures it). Since everything after the Gram pass is ``n x n``, ``num_starts = k`` runs
``k`` starts at the price of ``k`` times that small work: start 0 is the flag mean, start
``j`` boosts the row the flag mean fits ``j``-th worst to the weight of all rows together (a
start leaning towards a different group of rows); the starts run as one vmapped
``while_loop`` and the least ``A`` is kept, so more starts never raise ``A``. Measured: 8
starts lowered ``A`` below the single start on most problems (by up to 1.4%), but do not reach
the best known minimum everywhere (15 rows in d = 20: still 0.6% above it on one problem).
In a digits-MLP training step (16 workers, vmap), 8 starts cost ~5x the single-start step,
so the default stays one start. Each run stops when the relative decrease of ``A`` is at most
``tol`` or after ``max_iters`` updates; ``FlagResult.converged`` says which. On synthetic rows
8-12 updates suffice, but on a training run's own gradients (digits MLP, 16 workers) the IRLS
needed a median of 59 updates (up to 217): about half the workers end inside the subspace
and IRLS draws the last ones in geometrically, so the default cap of 20 returns a point on
the way (coefficients a median 10% from the converged ones); pass ``max_iters=250`` for the
minimum. A warm start from the previous step's weights was measured and rejected: it keeps
the previous step's rows inside and stops ~6% higher in ``A``
(``experiments/flag_convergence.py``).

References:
  Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and Augmented
  Losses using Convex Optimization", ICLR 2024. Mankovich et al., "The Flag Median and
  FlagIRLS", CVPR 2022.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import sorting
from flagjax.core import tree as tree_lib

__all__ = [
    "FlagGramSolution",
    "FlagResult",
    "default_rank",
    "flag",
    "flag_coefficients",
    "flag_solve",
    "flag_solve_gram",
]

SCALES = ("rank", "mean", "norm")

# Relative eigenvalue threshold of the normalised Gram and the least pair distance kept
# (docs/design.md), by the dtype of the n x n work.
_RANK_RTOL = {"float64": 1e-10, "float32": 1e-5}
_PAIR_MIN_DISTANCE = {"float64": 1e-6, "float32": 1e-3}
# A pair is kept only if the retained eigen-directions resolve at least this share of
# |u_i - u_j|^2 (module docstring, "Near-duplicate rows").
_PAIR_MIN_RESOLVED = 0.99

# IRLS starts run by default (see flag_solve, "num_starts"): the flag-mean start alone, as the
# design specifies (Y_0 = top_r S(1)); more starts are opt-in (module docstring).
DEFAULT_NUM_STARTS = 1
# IRLS updates at most, by default (see flag_solve, "max_iters").
DEFAULT_MAX_ITERS = 20
# Why flag refuses jax.grad / jax.jvp (core.checks.refuse_derivative): the iterates are
# eigenbases of n x n matrices whose repeated eigenvalues (the zeros of a rank-deficient
# Gram, the dropped directions, a degenerate top-r group) make LAPACK's eigenvector
# derivatives NaN, and the derivative of a capped iteration is not the fixed point's.
_NOT_DIFFERENTIABLE = ("its IRLS iterates are eigenbases with repeated eigenvalues (their "
                       "derivatives are undefined) and it stops on a data-dependent test")


class FlagResult(NamedTuple):
  """What :func:`flag_solve` returns.

  Attributes:
    aggregate: the Flag Aggregator's output, shaped like one worker's update, in the input
      dtype; ``aggregate == sum_i coefficients[i] * x_i``.
    coefficients: ``[n]``, how much each worker's update enters the aggregate (0 for rows
      left out: non-finite or zero).
    values: ``[n]``, each worker's reconstruction ratio ``|Y^T u_i|^2`` in ``[0, 1]``: how
      well the subspace represents it (1: inside, 0: orthogonal); 0 for rows left out.
    objective: ``A(Y)`` at the returned ``Y`` (scalar).
    num_iters: the number of IRLS updates made after the start (int32), for the start whose
      result is returned.
    converged: whether that IRLS run met its stopping rule (``tol``) before ``max_iters``
      (bool; always False with ``tol = 0``).
  """
  aggregate: tree_lib.PyTree
  coefficients: jax.Array
  values: jax.Array
  objective: jax.Array
  num_iters: jax.Array
  converged: jax.Array


class FlagGramSolution(NamedTuple):
  """The ``n x n`` part of the solve (:func:`flag_solve_gram`): everything but the aggregate."""
  coefficients: jax.Array  # [n]
  values: jax.Array  # [n]
  objective: jax.Array  # []
  num_iters: jax.Array  # [] int32
  converged: jax.Array  # [] bool


class _Problem(NamedTuple):
  """The fixed ``n x n`` data of one solve (row coordinates, pairs, masks)."""
  kept: jax.Array  # [n] bool: finite, non-zero rows
  row_norms: jax.Array  # [n] |x_i| (0 where not kept)
  coordinates: jax.Array  # [n, n] R = g_+^{1/2} Q^T: column i is u_i in the basis V
  eigvecs: jax.Array  # [n, n] Q
  inv_sqrt_eigvals: jax.Array  # [n] g_+^{-1/2} (0 where dropped)
  retained: jax.Array  # [n] bool: eigen-directions above the rank threshold
  rank: jax.Array  # [] int32: r capped at the numerical rank
  pairs: Optional[jax.Array]  # [n, n] bool, i < j: pairs with a direction d_ij; None when
  #                             lam is a static 0 (no pair terms at all)
  pair_sq_distances: Optional[jax.Array]  # [n, n] |R (e_i - e_j)|^2, the resolved
  #                                |u_i - u_j|^2 (1 where not a pair; None without pairs)
  pair_scale: jax.Array  # [] lam / P (0 when there are no pairs)


class _Fit(NamedTuple):
  """How a subspace ``Y`` fits the term vectors (all clipped to [0, 1])."""
  values: jax.Array  # [n] |Y^T u_i|^2 (0 where not kept)
  sines: jax.Array  # [n] sin^2 = |(I - Y Y^T) u_i|^2 (0 where not kept)
  pair_sines: Optional[jax.Array]  # [n, n] |(I - Y Y^T) d_ij|^2 (0 where not a pair;
  #                                    None without pairs)


class _IrlsState(NamedTuple):
  basis: jax.Array  # [n, n] eigenvectors of H, descending: Y = V basis[:, :rank]
  fit: _Fit
  objective: jax.Array  # []
  num_iters: jax.Array  # [] int32
  converged: jax.Array  # [] bool


def default_rank(n: int) -> int:
  """The paper's default subspace dimension ``ceil((n + 1) / 2)`` for ``n`` workers."""
  return n // 2 + 1


def _check_hparams(n: int, rank, lam, max_iters, tol, eps, scale) -> int:
  """Trace-time checks; returns the static number of subspace columns ``min(rank, n)``."""
  if rank is None:
    rank = default_rank(n)
  else:
    try:
      rank = operator.index(rank)
    except TypeError:
      raise ValueError(f"flag needs rank as a static Python int or None, got {rank!r}") from None
    checks.require("flag", rank >= 1, "rank >= 1", rank=rank)
  checks.require("flag", scale in SCALES, f"scale in {SCALES}", scale=repr(scale))
  # Hyperparameters may be traced (e.g. swept under vmap); check the ones given concretely.
  checks.check_real("flag", "lam", lam, minimum=0)
  checks.check_int("flag", "max_iters", max_iters, static=False)
  checks.check_real("flag", "tol", tol, minimum=0)
  checks.check_real("flag", "eps", eps, minimum=0, open_minimum=True)
  return min(rank, n)


def _dtype_key(dtype) -> str:
  return "float64" if jnp.dtype(dtype) == jnp.float64 else "float32"


def _is_zero(lam) -> bool:
  """Whether ``lam`` is known at trace time to be 0 (a traced ``lam`` keeps the pair terms)."""
  try:
    return float(lam) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


# Elements of the [batch, k, n] temporaries of _pairwise_sq_differences.
_PAIR_CHUNK_ELEMENTS = 1 << 22


def _pairwise_sq_differences(columns: jax.Array) -> jax.Array:
  """``[n, n]`` with entry ``(i, j)`` the sum over ``k`` of ``(c_ki - c_kj)^2``, ``c`` ``[k, n]``.

  Differences before squaring (no cancellation where two columns nearly agree). The
  ``[k, n, n]`` differences are formed in row batches (``lax.map``), so the temporaries stay
  within ~``2^22`` elements: at n = 1024 the whole tensor would be 4 GiB.
  """
  k, n = columns.shape
  if k * n * n <= _PAIR_CHUNK_ELEMENTS:
    return jnp.sum(jnp.square(columns[:, :, None] - columns[:, None, :]), axis=0)
  batch = max(1, _PAIR_CHUNK_ELEMENTS // (k * n))
  return jax.lax.map(lambda c: jnp.sum(jnp.square(c[:, None] - columns), axis=0), columns.T,
                     batch_size=batch)


def _problem(K: jax.Array, rank: int, lam) -> _Problem:
  """Normalised Gram, its eigen-decomposition, the numerical rank and the pairs."""
  n = K.shape[0]
  key = _dtype_key(K.dtype)
  K, finite = gram_lib.clean_gram(K)
  row_norms = gram_lib.norms(K)
  kept = finite & (row_norms > 0)
  inv_norms = jnp.where(kept, 1 / jnp.where(kept, row_norms, 1), 0)
  G = K * inv_norms[:, None] * inv_norms[None, :]
  eigvals, eigvecs = jnp.linalg.eigh(G)
  largest = jnp.max(eigvals)
  retained = (eigvals > _RANK_RTOL[key] * largest) & (eigvals > 0)
  safe = jnp.where(retained, eigvals, 1)
  coordinates = jnp.where(retained[:, None],
                          jnp.sqrt(jnp.maximum(eigvals, 0))[:, None] * eigvecs.T, 0)
  inv_sqrt_eigvals = jnp.where(retained, 1 / jnp.sqrt(safe), 0)

  problem = _Problem(
      kept=kept, row_norms=jnp.where(kept, row_norms, 0),
      coordinates=coordinates, eigvecs=eigvecs, inv_sqrt_eigvals=inv_sqrt_eigvals,
      retained=retained, rank=jnp.minimum(rank, jnp.sum(retained)).astype(jnp.int32),
      pairs=None, pair_sq_distances=None, pair_scale=jnp.zeros((), K.dtype))
  if _is_zero(lam):
    # No regularizer: no pairs, and none of the O(n^3) pair work below or in each step.
    return problem
  both = kept[:, None] & kept[None, :]
  sq_dist = jnp.maximum(2 - 2 * G, 0)
  # |R (e_i - e_j)|^2 as a sum of squared differences (no cancellation): the part of
  # u_i - u_j that the retained directions hold.
  resolved_sq = _pairwise_sq_differences(coordinates)
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  pairs = (both & upper & (sq_dist > _PAIR_MIN_DISTANCE[key] ** 2)
           & (resolved_sq >= _PAIR_MIN_RESOLVED * sq_dist))
  num_pairs = jnp.sum(pairs)
  pair_scale = jnp.where(num_pairs > 0, jnp.asarray(lam, K.dtype) / jnp.maximum(num_pairs, 1),
                         0)
  return problem._replace(pairs=pairs, pair_sq_distances=jnp.where(pairs, resolved_sq, 1),
                          pair_scale=pair_scale)


def _subspace_basis(problem: _Problem, weights: jax.Array, pair_weights: jax.Array
                    ) -> jax.Array:
  r"""All eigenvectors of ``H = R M(w) R^T``, descending: the top ``r`` give ``Y`` tops ``S(w)``.

  ``M(w) = diag(w) + L`` with ``L`` the Laplacian of the pair weights
  ``(lam / P) w_ij / delta_ij^2``: ``sum_ij a_ij (e_i - e_j)(e_i - e_j)^T`` over the pairs.
  """
  R = problem.coordinates
  if problem.pairs is None:
    H = jnp.matmul(R * weights[None, :], R.T, precision=tree_lib.HIGHEST)
  else:
    adjacency = problem.pair_scale * pair_weights / problem.pair_sq_distances
    adjacency = adjacency + adjacency.T
    laplacian = jnp.diag(jnp.sum(adjacency, axis=1)) - adjacency
    M = jnp.diag(weights) + laplacian
    RM = jnp.matmul(R, M, precision=tree_lib.HIGHEST)
    H = jnp.matmul(RM, R.T, precision=tree_lib.HIGHEST)
  # Dropped eigen-directions of G are exact zero rows/columns of H; shifting them below the
  # whole spectrum keeps them out of the top r whatever the rounding of the positive part.
  shift = jnp.trace(H) + 1
  H = H - jnp.diag(jnp.where(problem.retained, 0, shift))
  _, eigvecs = jnp.linalg.eigh(H)
  return eigvecs[:, ::-1]


def _flag_mean_basis(problem: _Problem) -> jax.Array:
  """:func:`_subspace_basis` at unit row weights without pairs, with no eigensolver.

  ``H(1) = R diag(kept) R^T = R R^T = diag(g_+)``: the coordinates ``R`` are already the
  eigenbasis of ``G``, so ``H``'s eigenvectors are the unit vectors, ordered as ``g``
  descending: ``eigh``'s ascending order reversed, as :func:`_subspace_basis` reverses
  ``eigh``'s. The retained directions (``g`` above a threshold) are the largest ``g``, so
  they come first and the dropped ones (``H``'s zero rows) last, where that function's shift
  puts them. One ``n x n`` ``eigh`` less per call.
  """
  n = problem.retained.shape[0]
  return jnp.eye(n, dtype=problem.coordinates.dtype)[:, ::-1]


def _fit(problem: _Problem, basis: jax.Array) -> _Fit:
  """Reconstruction ratios and sines of every term vector for ``Y = V basis[:, :rank]``.

  The sines come from the coordinates along the other retained eigenvectors, not as
  ``1 - |Y^T u|^2``: a sum of squares keeps its relative precision where the fit is nearly
  exact, which is exactly where the IRLS weights ``1/sqrt(sin^2 + eps)`` are large (in
  float32, ``1 - |Y^T u|^2`` is off by ~1e-7 ~ eps there). The dropped directions are left
  out: their coordinates are rounding (square roots of eigenvalues at the noise level), not
  fit error, and would put a floor of ~1e-3 (float32) under ``A`` of inputs it fits exactly.
  """
  n = basis.shape[0]
  coords = jnp.matmul(basis.T, problem.coordinates, precision=tree_lib.HIGHEST)  # [n, n]
  inside = (jnp.arange(n) < problem.rank)[:, None]
  outside = jnp.where(inside, 0, coords)  # (I - Y Y^T) u_i in an orthonormal basis
  values = jnp.sum(jnp.where(inside, coords, 0) ** 2, axis=0)
  sines = jnp.sum(outside ** 2, axis=0)
  if problem.pairs is None:
    pair_sines = None
  else:
    pair_sines = _pairwise_sq_differences(outside) / problem.pair_sq_distances
    pair_sines = jnp.where(problem.pairs, jnp.clip(pair_sines, 0, 1), 0)
  return _Fit(values=jnp.where(problem.kept, jnp.clip(values, 0, 1), 0),
              sines=jnp.where(problem.kept, jnp.clip(sines, 0, 1), 0),
              pair_sines=pair_sines)


def _objective(problem: _Problem, fit: _Fit) -> jax.Array:
  """``A(Y) = sum_i sin_i + lam * mean_{pairs} sin_ij`` over kept rows and pairs."""
  if fit.pair_sines is None:
    return jnp.sum(jnp.sqrt(fit.sines))
  return jnp.sum(jnp.sqrt(fit.sines)) + problem.pair_scale * jnp.sum(jnp.sqrt(fit.pair_sines))


def _unit_pair_weights(problem: _Problem):
  """Weight 1 on every pair (the flag mean's start), or None without pairs."""
  if problem.pairs is None:
    return None
  return problem.pairs.astype(problem.coordinates.dtype)


def _start_basis(problem: _Problem, weights: jax.Array) -> jax.Array:
  """The flag mean's basis: free without pairs (:func:`_flag_mean_basis`), else an ``eigh``.

  ``weights`` must be the unit weights on the kept rows (the flag mean's)."""
  if problem.pairs is None:
    return _flag_mean_basis(problem)
  return _subspace_basis(problem, weights, _unit_pair_weights(problem))


def _start_weights(problem: _Problem, num_starts: int) -> jax.Array:
  """``[num_starts, n]`` row weights of the IRLS starts ``top_r S(w)``.

  Start 0 is the flag mean (``w = 1`` on the kept rows). Start ``k >= 1`` boosts the row the
  flag mean fits ``k``-th worst (least reconstruction ratio; ties to the lower index) to the
  weight ``k_rows`` (the number of kept rows), so that its direction enters the start: the
  IRLS then descends from a subspace that leans towards a different group of rows. The starts
  depend on the rows' fit, not on their order (up to ties and rounding in that ranking), and
  need no key.
  """
  dtype = problem.coordinates.dtype
  base = problem.kept.astype(dtype)
  if num_starts == 1:
    return base[None]
  flag_mean = _start_basis(problem, base)
  ratios = jnp.where(problem.kept, _fit(problem, flag_mean).values, jnp.inf)
  order = jnp.argsort(ratios, stable=True)               # worst-fit kept rows first
  boost = jnp.sum(base)
  n = base.shape[0]
  starts = [base]
  for k in range(num_starts - 1):
    row = order[k % n]
    starts.append(jnp.where((jnp.arange(n) == row) & problem.kept, boost, base))
  return jnp.stack(starts)


def _irls(problem: _Problem, max_iters, tol, eps, start_weights: jax.Array,
          start_basis: Optional[jax.Array] = None) -> _IrlsState:
  """IRLS from ``top_r S(start_weights)`` (or from ``start_basis``, that start's eigenbasis
  when the caller has it), as a ``while_loop`` (jits and vmaps)."""
  dtype = problem.coordinates.dtype
  eps = jnp.asarray(eps, dtype)
  tol = jnp.asarray(tol, dtype)

  def state_at(basis, num_iters, converged):
    fit = _fit(problem, basis)
    return _IrlsState(basis, fit, _objective(problem, fit), num_iters, converged)

  start = start_basis
  if start is None:
    start = _subspace_basis(problem, start_weights, _unit_pair_weights(problem))
  initial = state_at(start, jnp.zeros((), jnp.int32), jnp.zeros((), bool))

  def keep_going(state):
    return (state.num_iters < max_iters) & ~state.converged

  def step(state):
    weights = jnp.where(problem.kept, jax.lax.rsqrt(state.fit.sines + eps), 0)
    pair_weights = None if problem.pairs is None else jnp.where(
        problem.pairs, jax.lax.rsqrt(state.fit.pair_sines + eps), 0)
    new = state_at(_subspace_basis(problem, weights, pair_weights), state.num_iters + 1,
                   state.converged)
    decrease = state.objective - new.objective
    # tol = 0 never stops early: A can rise by rounding, and "< 0" would then fire.
    converged = (tol > 0) & (decrease <= tol * jnp.abs(state.objective))
    return new._replace(converged=converged)

  return jax.lax.while_loop(keep_going, step, initial)


def _output_coefficients(problem: _Problem, basis: jax.Array, num_columns: int,
                         scale: str) -> jax.Array:
  """Coefficients ``c`` with ``sum_i c_i x_i`` the output for ``scale``."""
  dtype = basis.dtype
  directions = jnp.where(jnp.arange(num_columns) < problem.rank, basis[:, :num_columns], 0)
  kept = problem.kept.astype(dtype)
  num_kept = jnp.maximum(jnp.sum(kept), 1)
  if scale == "rank":
    weights_on_u = kept / jnp.maximum(problem.rank, 1).astype(dtype)
  elif scale == "mean":
    weights_on_u = kept * problem.row_norms / num_kept
  else:  # "norm"
    weights_on_u = kept * sorting.masked_median(problem.row_norms, problem.kept) / num_kept
  highest = tree_lib.HIGHEST
  projections = jnp.matmul(directions.T, problem.coordinates, precision=highest)  # P = z^T R
  on_basis = jnp.matmul(projections, weights_on_u, precision=highest)
  # B = Q g_+^{-1/2} z maps subspace coordinates back to coefficients on the u_i.
  on_subspace = problem.inv_sqrt_eigvals * jnp.matmul(directions, on_basis, precision=highest)
  on_u = jnp.matmul(problem.eigvecs, on_subspace, precision=highest)
  safe_norms = jnp.where(problem.kept, problem.row_norms, 1)
  return jnp.where(problem.kept, on_u / safe_norms, 0)


def flag_solve_gram(K: jax.Array, *, rank: Optional[int] = None, lam=0.0,
                    max_iters=DEFAULT_MAX_ITERS,
                    tol=1e-6, eps=1e-7, scale: str = "norm",
                    num_starts: int = DEFAULT_NUM_STARTS) -> FlagGramSolution:
  r"""The Flag Aggregator's ``n x n`` solve from the Gram matrix ``K = X X^T``.

  Everything :func:`flag_solve` returns except the aggregate (which is
  ``sum_i coefficients[i] * x_i``); see the module docstring for the derivation.

  Args:
    K: ``[n, n]`` Gram matrix (:func:`flagjax.core.gram.gram`); non-finite rows are left out.
    rank, lam, max_iters, tol, eps, scale: as in :func:`flag_solve`.

  Returns:
    A :class:`FlagGramSolution` ``(coefficients, values, objective, num_iters, converged)``.
  """
  n = K.shape[0]
  num_columns = _check_hparams(n, rank, lam, max_iters, tol, eps, scale)
  num_starts = checks.check_int("flag", "num_starts", num_starts, minimum=1)
  K = checks.refuse_derivative("flag", _NOT_DIFFERENTIABLE, K)
  problem = _problem(K, num_columns, lam)
  starts = _start_weights(problem, num_starts)
  if num_starts == 1:
    state = _irls(problem, max_iters, tol, eps, starts[0], _start_basis(problem, starts[0]))
  else:
    # The starts run batched (one vmapped while_loop: n x n eigenproblems in a batch); the
    # least objective wins (ties: the lowest start, the flag mean first).
    states = jax.vmap(lambda w: _irls(problem, max_iters, tol, eps, w))(starts)
    best = jnp.argmin(states.objective)
    state = jax.tree.map(lambda leaf: leaf[best], states)
  coefficients = _output_coefficients(problem, state.basis, num_columns, scale)
  # No finite row at all: nothing to aggregate, and NaN says so (all-zero finite rows give 0).
  coefficients = jnp.where(jnp.any(gram_lib.finite_rows(K)), coefficients, jnp.nan)
  return FlagGramSolution(
      coefficients=coefficients,
      values=state.fit.values, objective=state.objective, num_iters=state.num_iters,
      converged=state.converged)


@gram_lib.solved_once
def flag_coefficients(K: jax.Array, *, rank: Optional[int] = None, lam=0.0,
                      max_iters=DEFAULT_MAX_ITERS,
                      tol=1e-6, eps=1e-7, scale: str = "norm",
                      num_starts: int = DEFAULT_NUM_STARTS) -> jax.Array:
  r"""The Flag Aggregator's coefficients ``c`` (``[n]``) from the Gram matrix alone.

  ``flag(x) == sum_i c_i x_i`` with ``c = flag_coefficients(gram(x))``: ``n x n`` work only.

  Args:
    K: ``[n, n]`` Gram matrix (:func:`flagjax.core.gram.gram`).
    rank, lam, max_iters, tol, eps, scale: as in :func:`flag_solve`.

  Returns:
    ``[n]`` coefficients in ``K``'s dtype (0 for non-finite or zero rows).
  """
  return flag_solve_gram(K, rank=rank, lam=lam, max_iters=max_iters, tol=tol, eps=eps,
                         scale=scale, num_starts=num_starts).coefficients


def flag_solve(x, *, rank: Optional[int] = None, lam=0.0, max_iters=DEFAULT_MAX_ITERS,
               tol=1e-6, eps=1e-7,
               scale: str = "norm", num_starts: int = DEFAULT_NUM_STARTS,
               axis_name=None) -> FlagResult:
  r"""The Flag Aggregator with its diagnostics: subspace fit, coefficients, objective.

  With :math:`u_i = x_i / |x_i|` over the kept rows (finite, non-zero; ``k`` of them), IRLS
  from the flag-mean start ``Y_0 = top_r(S(1))`` iterates
  :math:`Y_{t+1} = \mathrm{top}_r\, S(w_t)`,

  .. math:: S(w) = \sum_i w_i u_i u_i^\top + \frac{\lambda}{P} \sum_{i<j} w_{ij}
     d_{ij} d_{ij}^\top, \qquad w = \frac{1}{\sqrt{\sin^2 + \epsilon}}, \quad
     \sin^2 = 1 - |Y_t^\top v|^2,

  decreasing :math:`A(Y) = \sum_i \sqrt{1 - |Y^\top u_i|^2} + \lambda\,
  \mathrm{mean}_{i<j} \sqrt{1 - |Y^\top d_{ij}|^2}`, until ``max_iters`` updates or a
  relative decrease of ``A`` of at most ``tol`` (``tol=0`` runs exactly ``max_iters``).
  Pairs: kept ``i < j`` with ``|u_i - u_j|`` above 1e-6 (float64) / 1e-3 (float32) whose
  difference the retained eigen-directions resolve (module docstring, "Near-duplicate rows"),
  :math:`d_{ij} = (u_i - u_j)/|u_i - u_j|`, ``P`` of them. The output, by ``scale``:

  * ``"norm"`` (the default): :math:`\frac{1}{k} \sum_i Y Y^\top u_i \cdot
    \mathrm{median}_i |x_i|`, the mean gradient's scale with bounded influence of any one
    worker, so ``flag`` is a drop-in for ``mean`` at one learning rate (the earlier default
    ``"rank"`` returns unit-norm-scale updates: ~16,000x the mean's for small gradients, a
    step-size change mixed into every comparison);
  * ``"rank"``: :math:`\frac{1}{r} \sum_i Y Y^\top u_i` (the authors' released code's form,
    with ``r`` capped at the numerical rank; the released code divides by the requested ``r``
    and stops after one IRLS step from a random start: ``experiments/flag_released.py`` is
    that form, with every deviation from the paper listed);
  * ``"mean"``: :math:`Y Y^\top \frac{1}{k} \sum_i x_i` (the paper's Algorithm 1).

  Computed in Gram space (module docstring): one pass for ``K`` (``psum``-ed over
  ``axis_name``), ``n x n`` eigenproblems, one pass to combine.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them (never concatenated).
    rank: subspace dimension ``r`` (static); ``ceil((n + 1) / 2)`` when None; capped at the
      numerical rank of the ``u_i`` (then the output uses the capped ``r``).
    lam: weight of the pairwise regularizer (``0`` turns it off).
    max_iters: most IRLS updates after the start (``0`` returns the best start). 20 by
      default: enough on i.i.d. rows in high dimension (6-12 updates measured), not always
      with few dimensions or the regularizer (``FlagResult.converged`` says; module
      docstring, "Starts and stopping").
    tol: stop when ``A_t - A_{t+1} <= tol * |A_t|``; ``0`` never stops early.
    eps: IRLS smoothing of the weights ``1 / sqrt(sin^2 + eps)``.
    scale: ``"norm"`` (default), ``"rank"`` or ``"mean"`` (static).
    num_starts: IRLS runs from this many starts (static, ``>= 1``), batched, the least ``A``
      kept (module docstring, "Starts and stopping"); ``1`` (the default) is the flag-mean
      start alone. ``k`` starts cost ``k`` times the ``n x n`` work.
    axis_name: when set, ``x`` is a coordinate shard: ``K`` is ``psum``-ed over it, the
      ``n x n`` solve runs on the axis' first device and its result is shared by a second,
      ``n``-sized ``psum`` (:func:`flagjax.core.gram.solve_once`), and the aggregate is the
      shard of the unsharded one.

  Returns:
    :class:`FlagResult` ``(aggregate, coefficients, values, objective, num_iters,
    converged)``.

  References:
    Almasi et al., "Flag Aggregator: Scalable Distributed Training under Failures and
    Augmented Losses using Convex Optimization", ICLR 2024 (Algorithm 1).
  """
  tree_lib.num_workers("flag", x)
  K = gram_lib.gram(x, axis_name=axis_name)
  solution = gram_lib.solve_once(
      functools.partial(flag_solve_gram, rank=rank, lam=lam, max_iters=max_iters, tol=tol,
                        eps=eps, scale=scale, num_starts=num_starts), K, axis_name=axis_name)
  return FlagResult(gram_lib.combine(solution.coefficients, x), *solution)


@gram_lib.rotation_equivariant
def flag(x, *, rank: Optional[int] = None, lam=0.0, max_iters=DEFAULT_MAX_ITERS,
         tol=1e-6, eps=1e-7,
         scale: str = "norm", num_starts: int = DEFAULT_NUM_STARTS, axis_name=None):
  r"""The Flag Aggregator: workers projected onto their IRLS flag-median subspace.

  ``flag(x, ...) == flag_solve(x, ...).aggregate``; see :func:`flag_solve` for the
  objective, the iteration, the three output scales and the arguments. Non-finite and zero
  rows are left out, however many there are (none kept: the aggregate is zero).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    rank, lam, max_iters, tol, eps, scale, axis_name: as in :func:`flag_solve`.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Almasi et al., ICLR 2024.
  """
  return flag_solve(x, rank=rank, lam=lam, max_iters=max_iters, tol=tol, eps=eps,
                    scale=scale, num_starts=num_starts, axis_name=axis_name).aggregate
