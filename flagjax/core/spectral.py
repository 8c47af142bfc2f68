r"""Covariance eigenproblems in Gram space: CAF, SMEA and DnC share this.

For rows :math:`x_i` with weights :math:`w_i \ge 0`, :math:`\sum_i w_i = 1`, the weighted
mean is :math:`\mu_w = \sum_i w_i x_i` and the weighted covariance
:math:`\Sigma_w = \sum_i w_i (x_i - \mu_w)(x_i - \mu_w)^\top` (``d x d``). With
:math:`P = I - \mathbf{1} w^\top` the centred rows are :math:`Z = P X`, their Gram
:math:`G = P K P^\top`, and

.. math:: \Sigma_w = Z^\top W Z \quad\text{has the nonzero eigenvalues of}\quad
          M = W^{1/2} G W^{1/2} \;(n \times n).

If :math:`M a = \lambda a` with :math:`|a| = 1`, then :math:`v = Z^\top W^{1/2} a /
\sqrt{\lambda}` is a unit eigenvector of :math:`\Sigma_w` for :math:`\lambda`, and every
row's projection is :math:`(x_i - \mu_w)^\top v = (G W^{1/2} a)_i / \sqrt{\lambda}`. So the
top eigenpair, and the projections the filters score rows by, are exact ``n x n`` work from
``K``: nothing of size ``d`` is formed, and the result is deterministic (ByzFL estimates ``v``
with one power step from a random vector). Below :data:`LANCZOS_MIN_ROWS` rows the ``n x n``
top pair is LAPACK's ``eigh``; from there on it is Lanczos with a Cholesky certificate
(:func:`certified_top_eigenpair`: the value within ``16 n eps`` of the exact one, or the full
``eigh`` when the certificate fails), 3-5x faster at n = 256-1024.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flagjax.core import safe_math
from flagjax.core import tree as tree_lib

__all__ = [
    "LANCZOS_MIN_ROWS",
    "TopEigenpair",
    "centered_gram",
    "certified_top_eigenpair",
    "largest_eigenvalue",
    "symmetric_top_eigenpair",
    "top_eigenpair",
    "top_eigenvalue",
    "top_eigenvalues_trailing",
]

# From this many rows on, symmetric_top_eigenpair runs certified Lanczos instead of a full
# LAPACK eigh (measured crossover: see certified_top_eigenpair).
LANCZOS_MIN_ROWS = 128
# Lanczos steps at most, and how often the Ritz pair is checked for convergence.
_LANCZOS_MAX_STEPS = 64
_LANCZOS_CHECK_EVERY = 16
# The certificate's slack in units of n * eps * lambda (see certified_top_eigenpair).
_CERTIFICATE_SLACK = 16
# Matrices per piece of a stacked top-eigenvalue solve (top_eigenvalues_trailing): each step
# of the solve streams the whole piece, so it should stay in cache. Measured per 10 x 10
# matrix (2-core CPU): 1.4 us at 1,024, 0.8 us at 4,096-8,192, 2.5 us at 36,036.
_STACK_PIECE = 8192


class TopEigenpair(NamedTuple):
  """The top eigenpair of a weighted covariance, in Gram space.

  Attributes:
    value: :math:`\\lambda_{\\max}(\\Sigma_w)` (``>= 0``).
    projections: ``[n]``, :math:`(x_i - \\mu_w)^\\top v` for every row (weighted or not);
      zero when :math:`\\lambda_{\\max} = 0` (every weighted row at the mean).
  """
  value: jax.Array
  projections: jax.Array


def centered_gram(K: jax.Array, weights: jax.Array) -> jax.Array:
  r""":math:`G = P K P^\top`, :math:`P = I - \mathbf{1} w^\top`: the Gram of :math:`x_i - \mu_w`.

  Written as :math:`G_{ij} = K_{ij} - (Kw)_i - (Kw)_j + w^\top K w`, symmetric by
  construction. ``K`` should be finite (zero the rows of non-finite workers first). ``K`` is
  one Gram ``[n, n]`` or a stack of symmetric Grams laid out batch-last, ``[n, n, count]``,
  all sharing ``weights``: there :math:`(Kw)_i = \sum_j w_j K_{ji}` is one matrix-vector
  product over the flattened stack, not a reduction over its middle axis (XLA's CPU
  reductions there are ~4x slower).
  """
  if K.ndim == 2:
    Kw = jnp.matmul(K, weights, precision=tree_lib.HIGHEST)
    return K - Kw[:, None] - Kw[None, :] + jnp.dot(weights, Kw, precision=tree_lib.HIGHEST)
  n = K.shape[0]
  Kw = jnp.matmul(weights, K.reshape(n, -1),
                  precision=tree_lib.HIGHEST).reshape(n, -1)       # [n, count]
  return K - Kw[:, None] - Kw[None, :] + jnp.sum(Kw * weights[:, None], 0)


def _lanczos_start(n: int, dtype) -> jax.Array:
  """A fixed start vector with no exact zero and no structure (uniform on ``[0.5, 1.5)`` times a
  sign from a fixed key): independent of the input, so the result is deterministic. Not
  ``1`` or ``sqrt(w)``: the weighted covariance maps ``sqrt(w)`` to zero."""
  key = jax.random.key(0x5EC7)
  magnitude = jax.random.uniform(key, (n,), dtype, 0.5, 1.5)
  sign = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (n,)), 1, -1)
  vector = magnitude * sign.astype(dtype)
  return vector / jnp.linalg.norm(vector)


def _lanczos_ritz(M: jax.Array, start: jax.Array, max_steps: int, check_every: int,
                  tolerance: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""The top Ritz pair of ``M`` on a Krylov basis from ``start`` (Lanczos, Golub & Van Loan
  4th ed. §10.1, with full reorthogonalisation).

  The basis ``q_0 .. q_{m-1}`` is orthonormalised twice against all earlier vectors ("twice is
  enough"), and the Ritz pair comes from the projected matrix ``Q M Q^T`` itself (not the
  three-term recurrence's tridiagonal). At a breakdown (the next vector is rounding: the
  basis spans an invariant subspace) the basis ends there; if that subspace misses the top
  eigenvalue, the certificate of :func:`certified_top_eigenpair` catches it. Every
  ``check_every`` steps the top Ritz pair's residual ``|M a - theta a|`` is compared with
  ``tolerance``; the loop stops there or after ``max_steps``.
  """
  n = M.shape[0]
  dtype = M.dtype
  basis = jnp.zeros((max_steps, n), dtype).at[0].set(start)
  images = jnp.zeros((max_steps, n), dtype)            # M q_j

  def ritz(basis, images):
    projected = jnp.matmul(basis, images.T, precision=tree_lib.HIGHEST)  # Q M Q^T
    # Rows of Q not (yet) filled are 0; their -1 keeps them below every Ritz value of the
    # PSD M (all >= 0 up to rounding), so the top Ritz vector is never made of them.
    unused = jnp.all(basis == 0, axis=1)
    projected = 0.5 * (projected + projected.T) - jnp.diag(unused.astype(dtype))
    values, vectors = jnp.linalg.eigh(projected)
    coefficients = vectors[:, -1]
    vector = jnp.matmul(coefficients, basis, precision=tree_lib.HIGHEST)
    residual = jnp.linalg.norm(jnp.matmul(coefficients, images, precision=tree_lib.HIGHEST)
                               - values[-1] * vector)
    return values[-1], vector, residual

  def extend(j, carry):
    basis, images = carry
    image = jnp.matmul(M, basis[j], precision=tree_lib.HIGHEST)
    w = image
    for _ in range(2):
      coefficients = jnp.matmul(basis, w, precision=tree_lib.HIGHEST)
      w = w - jnp.matmul(basis.T, coefficients, precision=tree_lib.HIGHEST)
    norm = jnp.linalg.norm(w)
    # Breakdown: what is left is rounding (the basis spans an invariant subspace). Normalised,
    # it would be a direction no longer orthogonal to the basis; a zero vector ends the basis.
    fresh = norm > n * jnp.finfo(dtype).eps * jnp.linalg.norm(image)
    following = jnp.where(fresh, w / jnp.where(fresh, norm, 1), 0)
    basis = jnp.where(j + 1 < max_steps, basis.at[jnp.minimum(j + 1, max_steps - 1)].set(
        following), basis)
    return basis, images.at[j].set(image)

  def block(state):
    steps, basis, images, _, _, _ = state
    basis, images = jax.lax.fori_loop(steps, steps + check_every, extend, (basis, images))
    value, vector, residual = ritz(basis, images)
    return steps + check_every, basis, images, residual <= tolerance, value, vector

  def keep_going(state):
    steps, _, _, converged, _, _ = state
    return (steps < max_steps) & ~converged

  # The loop runs at least once (max_steps >= check_every >= 1), so the Ritz pair carried
  # out is the last one computed.
  *_, value, vector = jax.lax.while_loop(
      keep_going, block, (jnp.zeros((), jnp.int32), basis, images, jnp.asarray(False),
                          jnp.zeros((), dtype), start))
  return value, vector / jnp.linalg.norm(vector)


def _eigh_top(M: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The top eigenpair from LAPACK's full ``eigh`` (the value clamped at 0)."""
  values, vectors = jnp.linalg.eigh(M)
  return jnp.maximum(values[-1], 0), vectors[:, -1]


def certified_top_eigenpair(M: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""The largest eigenvalue of a symmetric PSD ``M`` and a unit vector for it, without a full
  eigensolver when a cheap certificate holds.

  1. Lanczos with full reorthogonalisation (:func:`_lanczos_ritz`, at most 64 steps, from a
     fixed start vector) gives a Ritz pair :math:`(\theta, a)`; :math:`\theta \le
     \lambda_{\max}` (a Rayleigh quotient).
  2. Certificate: ``M`` is scaled by a power of two to entries below 1 (exact; no norm
     overflows), and the Cholesky factorisation of :math:`(\theta + \delta) I - M`,
     :math:`\delta = 16\, n\, \epsilon \max(\theta, |M|_{\max}/2)`, is computed. It
     exists (is finite) only if that matrix is positive definite up to Cholesky's backward
     error (~``n eps |M|``), i.e. only if :math:`\lambda_{\max} \le \theta + \delta` up
     to that rounding. Then :math:`(\theta, a)` is returned: the value within ~``16 n eps``
     (relative) of the exact one (LAPACK's own is within a few ``n eps``), the vector with a
     Rayleigh quotient as large. Where the top eigenvalue is separated by more than that,
     ``a`` is its eigenvector to the residual over the gap; inside a cluster narrower than
     ``delta`` it is some unit vector of the cluster (the exact eigenvector is then itself
     ill-determined, and ``eigh``'s choice within it is rounding).
  3. Otherwise (Lanczos has not reached the top: a start nearly orthogonal to it, or slow
     convergence) the full ``eigh`` runs. It sits in a ``while_loop`` that runs at most once,
     so under ``vmap`` it runs only when some matrix of the batch needs it (a ``cond``
     would become a ``select`` and run it always).

  Measured (2-core CPU, float32, CAF's covariances at d = 1e5): one call at n = 1024
  ~25 ms against ~80-140 ms for ``eigh``; below ~128 rows ``eigh`` is as fast or faster
  (:data:`LANCZOS_MIN_ROWS`).

  Args:
    M: ``[m, m]`` symmetric positive semi-definite, finite.

  Returns:
    ``(value, vector)``: the top eigenvalue (``>= 0``) and a unit vector.
  """
  m = M.shape[0]
  dtype = M.dtype
  max_steps = min(m, _LANCZOS_MAX_STEPS)
  check_every = min(max_steps, _LANCZOS_CHECK_EVERY)
  max_steps = -(-max_steps // check_every) * check_every
  # Scaled by a power of two (exact) to |entries| < 1: no norm of a Krylov vector overflows.
  _, exponent = jnp.frexp(jnp.max(jnp.abs(M)))
  power = jnp.ldexp(jnp.ones((), dtype), exponent)
  scaled = M / power
  slack = _CERTIFICATE_SLACK * m * jnp.finfo(dtype).eps
  theta, vector = _lanczos_ritz(scaled, _lanczos_start(m, dtype), max_steps, check_every,
                                slack)
  theta = jnp.maximum(theta, 0)
  # theta is below lambda_max and |scaled| < 1, so slack * max(theta, 1/2) >= slack * theta.
  bound = theta + slack * jnp.maximum(theta, 0.5)
  factor = jnp.linalg.cholesky(bound * jnp.eye(m, dtype=dtype) - scaled)
  certified = jnp.all(jnp.isfinite(factor))

  def exact(state):
    return *_eigh_top(scaled), jnp.asarray(True)

  value, vector, _ = jax.lax.while_loop(lambda state: ~state[2], exact,
                                        (theta, vector, certified))
  return value * power, vector


@jax.custom_jvp
def symmetric_top_eigenpair(M: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""``(lambda_max, unit eigenvector)`` of a symmetric PSD ``[m, m]`` matrix: LAPACK's ``eigh``
  below :data:`LANCZOS_MIN_ROWS` rows, :func:`certified_top_eigenpair` from there on.

  Differentiable (both modes, either path) by first-order perturbation theory of the top pair
  alone (Golub & Van Loan, 4th ed., §8.1.2): :math:`d\lambda = a^\top dM\, a` and
  :math:`da = (\lambda I - M)^+ dM\, a`, the pseudo-inverse over the eigenvalues separated from
  :math:`\lambda` by more than ``8 m eps |M|`` (a top eigenvalue inside a cluster has no
  derivative of its vector; that part is 0). ``jnp.linalg.eigh``'s own derivative divides by
  every pair of eigenvalues, so the repeated zeros of a rank-deficient covariance (n > d,
  duplicated rows, rows of weight 0) made it NaN although the top pair is differentiable.
  """
  if M.shape[0] >= LANCZOS_MIN_ROWS:
    return certified_top_eigenpair(M)
  return _eigh_top(M)


@symmetric_top_eigenpair.defjvp
def _symmetric_top_eigenpair_jvp(primals, tangents):
  r""":math:`d\lambda = a^\top dM\, a`; :math:`da = B^{-1} (I - a a^\top) dM\, a` with
  :math:`B = \lambda I - M + \lambda a a^\top`, which is :math:`(\lambda I - M)^+` on the
  complement of ``a`` (``B a = \lambda a``, ``B v_k = (\lambda - \lambda_k) v_k``), and 0
  when another eigenvalue lies within the separation of the top.

  A solve rather than the sum over ``eigh``'s eigenvectors: the same first derivative, and
  differentiable again (Hessian-vector products), where ``eigh``'s own derivative inside this
  rule was NaN at the repeated zeros. The eigenvalues only decide the separation (a
  piecewise-constant choice, under ``stop_gradient``).
  """
  (M,), (dM,) = primals, tangents
  value, vector = symmetric_top_eigenpair(M)
  values = jnp.linalg.eigvalsh(jax.lax.stop_gradient(M))   # ascending
  m = M.shape[0]
  separation = 8 * m * jnp.finfo(M.dtype).eps * jnp.max(jnp.abs(values))
  runner_up = values[-2] if m > 1 else jnp.asarray(-jnp.inf, M.dtype)
  simple = (value > 0) & (jax.lax.stop_gradient(value) - runner_up > separation)
  dM = 0.5 * (dM + dM.T)
  dM_a = jnp.matmul(dM, vector, precision=tree_lib.HIGHEST)
  d_value = jnp.where(value > 0, jnp.dot(vector, dM_a, precision=tree_lib.HIGHEST), 0)
  identity = jnp.eye(m, dtype=M.dtype)
  # B is only formed where it is invertible (else the identity, whose solve is discarded):
  # a NaN in the branch not taken would come back as 0 * NaN in reverse mode.
  B = jnp.where(simple, value * identity - M + value * jnp.outer(vector, vector), identity)
  off_top = dM_a - vector * jnp.dot(vector, dM_a, precision=tree_lib.HIGHEST)
  d_vector = jnp.where(simple, jnp.linalg.solve(B, off_top), 0)
  return (value, vector), (d_value, d_vector)


def top_eigenpair(K: jax.Array, weights: jax.Array) -> TopEigenpair:
  r"""The top eigenpair of the ``weights``-weighted covariance of the rows behind ``K``.

  The ``n x n`` eigenproblem is LAPACK's ``eigh`` up to :data:`LANCZOS_MIN_ROWS` rows and
  certified Lanczos beyond (:func:`symmetric_top_eigenpair`).

  Args:
    K: ``[n, n]`` Gram of the rows (any common reference: the covariance is translation
      invariant), finite.
    weights: ``[n]``, non-negative, summing to one.

  Returns:
    :class:`TopEigenpair`.
  """
  G = centered_gram(K, weights)
  root = safe_math.sqrt(jnp.maximum(weights, 0))
  M = root[:, None] * G * root[None, :]
  value, a = symmetric_top_eigenpair(M)
  positive = value > 0
  projections = (jnp.matmul(G, root * a, precision=tree_lib.HIGHEST)
                 / jnp.sqrt(jnp.where(positive, value, 1)))
  return TopEigenpair(value, jnp.where(positive, projections, 0))


def _tridiagonalize(A: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Householder tridiagonalisation of symmetric ``[m, m, *batch]`` matrices (Golub & Van
  Loan, *Matrix Computations*, 4th ed., Algorithm 8.3.1): the diagonals ``[m, *batch]`` and
  the squared off-diagonals ``[m - 1, *batch]`` of :math:`T = Q^\top A Q`.

  Step ``k`` reflects the trailing block (rows and columns ``> k``) with
  :math:`H = I - \beta v v^\top`, :math:`v = x + \operatorname{sign}(x_0)|x| e_1` (``x`` the
  column ``k`` below row ``k``), which leaves :math:`-\operatorname{sign}(x_0)|x|` on the
  off-diagonal: only its square :math:`|x|^2` is kept (the Sturm count reads only squares).
  The steps are one ``fori_loop`` over the whole ``m x m`` matrices, the finished rows and
  columns masked out (``v`` and ``w`` are zero there, so they are never written again), so
  the program holds one step whatever ``m``. Unrolled on blocks that shrink each step, every
  step compiled its own kernels: SMEA at n = 32 (m = 28) took 20 s to compile, ~75% of it
  here, against ~1.4 s for this loop (2-core CPU), which does ~3x the arithmetic of the
  shrinking blocks yet runs within ~15% of them (1,820 matrices of 12 x 12: 1.33 against
  1.19 ms; 35,960 of 28 x 28: 1.54 against 1.34 s), the work being memory traffic. The
  matrices of a batch are stacked along the *trailing* axes, so every step is one
  elementwise or reduction kernel over the whole batch, contiguous in memory.
  """
  m, batch = A.shape[0], A.shape[2:]
  if m == 1:
    return A[0], jnp.zeros((0,) + batch, A.dtype)
  row = jnp.arange(m).reshape((m,) + (1,) * len(batch))

  def step(k, carry):
    A, off_squared = carry
    below = row > k
    x = jnp.where(below, jax.lax.dynamic_index_in_dim(A, k, axis=1, keepdims=False), 0)
    norm_sq = jnp.sum(x * x, 0)
    first = row == k + 1
    sign = jnp.where(jnp.sum(jnp.where(first, x, 0), 0) >= 0, 1, -1).astype(A.dtype)
    v = x + jnp.where(first, sign * jnp.sqrt(norm_sq), 0)
    v_sq = jnp.sum(v * v, 0)
    beta = jnp.where(v_sq > 0, 2 / jnp.where(v_sq > 0, v_sq, 1), 0)   # x = 0: H = I
    p = jnp.where(below, beta * jnp.sum(A * v[None], 1), 0)
    w = p - (0.5 * beta * jnp.sum(v * p, 0)) * v
    A = A - (v[:, None] * w[None] + w[:, None] * v[None])
    return A, jax.lax.dynamic_update_index_in_dim(off_squared, norm_sq, k, 0)

  A, off_squared = jax.lax.fori_loop(
      0, m - 2, step, (A, jnp.zeros((m - 1,) + batch, A.dtype)))
  diagonal = jnp.stack([A[i, i] for i in range(m)])
  return diagonal, off_squared.at[m - 2].set(A[m - 2, m - 1] * A[m - 2, m - 1])


def largest_eigenvalue(A: jax.Array) -> jax.Array:
  r""":math:`\lambda_{\max}` of a symmetric ``[m, m]`` matrix, or of each of a stack
  ``[..., m, m]``, without an eigensolver call.

  Householder tridiagonalisation (:func:`_tridiagonalize`), then bisection on the Sturm count
  of the tridiagonal :math:`T` (Golub & Van Loan, 4th ed., §8.4.1; LAPACK's ``?stebz``):
  the pivots :math:`q_0 = d_0 - x`, :math:`q_i = (d_i - x) - e_{i-1}^2 / q_{i-1}` are all
  negative exactly when every eigenvalue lies below ``x``. The bracket starts at
  :math:`[\max_i d_i, \max_i (d_i + |e_{i-1}| + |e_i|)]` (the largest diagonal entry and
  Gershgorin's bound) and is halved ``nmant + log2(m) + 3`` times, past the dtype's precision.
  Both steps are backward stable, so the result is within a few ``m eps |A|`` of the exact
  value, like LAPACK's ``?syevd``; each matrix is first scaled by a power of two (exact) so
  that squares of entries near the dtype's maximum do not overflow.

  Why not ``jnp.linalg.eigvalsh``: on CPU every matrix is one LAPACK call with its fixed
  overhead; this is a few dozen vectorised operations over the whole stack, worked on with
  its matrices along the trailing axes (``vmap`` over matrices joins the mapped axis to the
  stack, see :func:`_stack_solver`). 1,820 matrices of 12 x 12 (SMEA's search at n = 16,
  f = 4), 2-core CPU: 3.0-3.4 ms as a stack or ``vmap``-ped, against 4.1 ms for this solver
  written per matrix and ``vmap``-ped (the batch leading), and 9-14 ms with ``eigvalsh``.
  Deterministic; no vectors.

  Args:
    A: ``[..., m, m]`` symmetric, finite (both triangles are read).

  Returns:
    The largest eigenvalue of each matrix, ``[...]`` in ``A``'s dtype, without a derivative
    (``stop_gradient``: it feeds discrete choices, such as SMEA's subset; the bisection had
    no meaningful one).
  """
  m, batch = A.shape[-1], A.shape[:-2]
  stack = jnp.moveaxis(A.reshape((-1, m, m)), 0, -1)   # [m, m, count]: one trailing batch axis
  stack = jax.lax.stop_gradient(stack)   # reverse mode cannot pass the custom batching rule
  return _largest_of_stack(stack, jnp.zeros((m,), A.dtype)).reshape(batch)


def _stack_solver(centred: bool):
  """``solve(A [m, m, count], weights [m]) -> [count]``: the top eigenvalue of every matrix
  of a stack laid out batch-last (``centred``: of the weighted covariance of every Gram, see
  :func:`top_eigenvalues_trailing`; else ``weights`` is unused).

  In pieces of at most :data:`_STACK_PIECE` matrices (a ``fori_loop``; the last piece
  overlaps the one before rather than padding the stack), since each step of the solve
  streams its whole piece. Under ``vmap`` the mapped axis joins the stack (one bigger stack,
  still one trailing axis): XLA's CPU reductions over the middle axis of the ``[1, m, m, c]``
  arrays a plain ``vmap`` would give run ~4x slower than over ``[m, m, c]``.
  """

  def piece_values(A, weights):
    if not centred:
      return _largest_eigenvalue_trailing(A)
    root = jnp.sqrt(jnp.maximum(weights, 0))[:, None]
    G = centered_gram(A, weights)
    return jnp.maximum(_largest_eigenvalue_trailing(root[:, None] * G * root[None, :]), 0)

  def in_pieces(A, weights):
    count = A.shape[2]
    if count <= _STACK_PIECE:
      return piece_values(A, weights)
    pieces = -(-count // _STACK_PIECE)
    size = -(-count // pieces)

    def piece(i, values):
      start = jnp.minimum(i * size, count - size)
      part = jax.lax.dynamic_slice_in_dim(A, start, size, axis=2)
      return jax.lax.dynamic_update_slice_in_dim(values, piece_values(part, weights), start, 0)
    return jax.lax.fori_loop(0, pieces, piece, jnp.zeros((count,), A.dtype))

  solve = jax.custom_batching.custom_vmap(in_pieces)

  @solve.def_vmap
  def _(axis_size, in_batched, A, weights):
    A_batched, weights_batched = in_batched
    if weights_batched:   # every stack its own weights: the plain batching rule
      if not A_batched:
        A = jnp.broadcast_to(A, (axis_size,) + A.shape)
      return jax.vmap(in_pieces)(A, weights), True
    if not A_batched:
      return solve(A, weights), False
    m, count = A.shape[1], A.shape[3]
    merged = jnp.moveaxis(A, 0, -1).reshape(m, m, count * axis_size)
    return solve(merged, weights).reshape(count, axis_size).T, True
  return solve


def _largest_eigenvalue_trailing(A: jax.Array) -> jax.Array:
  """:func:`largest_eigenvalue` of a stack ``[m, m, count]`` laid out batch-last."""
  m = A.shape[0]
  dtype = A.dtype
  _, exponent = jnp.frexp(jnp.max(jnp.abs(A), (0, 1)))   # |A| < 2**exponent (0 for A = 0)
  scale = jnp.ldexp(jnp.ones((), dtype), exponent)
  d, e2 = _tridiagonalize(A / scale)
  if m == 1:
    return d[0] * scale
  e = jnp.sqrt(e2)
  zero = jnp.zeros((1,) + e.shape[1:], dtype)
  radius = jnp.concatenate([zero, e]) + jnp.concatenate([e, zero])
  lo, hi = jnp.max(d, 0), jnp.max(d + radius, 0)
  # LAPACK's pivmin: the smallest pivot magnitude allowed in the Sturm recurrence.
  pivot_floor = jnp.finfo(dtype).tiny * jnp.maximum(1, jnp.max(e2, 0))

  def all_below(x):
    q = d[0] - x
    below = q < 0
    for i in range(1, m):
      q = jnp.where(jnp.abs(q) < pivot_floor, -pivot_floor, q)
      q = (d[i] - x) - e2[i - 1] / q
      below = below & (q < 0)
    return below

  def halve(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    above = all_below(mid)   # every eigenvalue < mid
    return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

  steps = jnp.finfo(dtype).nmant + int(math.ceil(math.log2(m))) + 3
  lo, hi = jax.lax.fori_loop(0, steps, halve, (lo, hi))
  return hi * scale


def top_eigenvalue(K: jax.Array, weights: jax.Array) -> jax.Array:
  r""":math:`\lambda_{\max}` of the weighted covariance alone (:func:`largest_eigenvalue`:
  no eigensolver call, no vectors), for one symmetric Gram ``[m, m]`` or a stack
  ``[..., m, m]`` (solved together, see :func:`largest_eigenvalue`)."""
  return top_eigenvalues_trailing(jnp.moveaxis(K, (-2, -1), (0, 1)), weights)


def top_eigenvalues_trailing(K: jax.Array, weights: jax.Array) -> jax.Array:
  r""":func:`top_eigenvalue` of a stack of Grams laid out batch-last, ``[m, m, *batch]``
  (``K[:, :, b]`` one symmetric Gram; all share ``weights [m]``): the layout the solver works
  in, so a caller that gathers its stack this way saves a transposition (SMEA's 1,820 Grams
  of 12 x 12: ~0.6 ms of ~3 ms)."""
  m, batch = K.shape[0], K.shape[2:]
  stack = jax.lax.stop_gradient(K.reshape(m, m, -1))   # (as in largest_eigenvalue)
  return _top_of_stack(stack, jax.lax.stop_gradient(weights)).reshape(batch)


_largest_of_stack = _stack_solver(centred=False)
_top_of_stack = _stack_solver(centred=True)
