r"""The Gram-space core: every rotation-invariant rule is "coefficients from K".

A Gram-space rule outputs a linear combination :math:`\sum_i c_i x_i` whose coefficients
depend only on the Gram matrix :math:`K = X X^\top` (``n x n``). It runs as

1. one pass over the input to form ``K`` (:func:`gram`, summed over pytree leaves, never
   concatenating them, and ``psum``-ed over ``axis_name`` when the coordinates are sharded);
2. small ``n x n`` work for the coefficients (distances :func:`sq_distances`, norms
   :func:`norms`, finiteness :func:`finite_rows`);
3. one pass to form :math:`c^\top X` (:func:`combine` / :func:`combine_many`).

Because only ``K`` crosses workers, the same rule runs coordinate-sharded across devices with a
single ``n x n`` ``psum``: each device combines its own shard with the shared coefficients.
Where step 2 is costly (eigenproblems, subset searches: marked :func:`solved_once`), one
device solves and a second, ``n``-sized ``psum`` shares the coefficients (:func:`solve_once`).

Speed notes (2-core CPU, n=32, d=2e6, float32; ratios to one pass ``ones @ x``): ``x @ x.T``
on ``[n, d]`` costs ~13-18x; the Gram accumulated over column chunks of 16k (each transposed
to ``[L, n]`` in cache and contracted over ``L``, see :func:`_block_gram`) ~5.5x; centred
on a reference row (``centered=True``) at the same cost, the reference sampled from the first
chunk (n = 32, d = 1e6: 21.7 ms against 28-30 ms with a full row-norm pass). The combination
as an unrolled, fused sum of ``where(c_i != 0, c_i x_i, 0)`` is ~1.1x and never lets a
NaN/Inf row with ``c_i = 0`` leak.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flagjax.core import safe_math
from flagjax.core import tree as tree_lib

__all__ = [
    "COMBINE_MATVEC_MIN_ROWS",
    "SAMPLED_REFERENCE_MAX_RATIO",
    "central_row",
    "clean_gram",
    "clip_scale",
    "combine",
    "combine_by_gram",
    "combine_many",
    "finite_rows",
    "gram",
    "is_rotation_equivariant",
    "median_index",
    "median_norm_row",
    "nan_beyond_bound",
    "nearest_mask",
    "nonfinite_rows",
    "norms",
    "products_with",
    "rotation_equivariant",
    "row_norms",
    "select",
    "solve_once",
    "solved_once",
    "sq_distances",
    "sq_distances_to",
    "sq_norms",
    "symmetrize",
    "too_many_nonfinite",
    "translation_invariant",
    "wants_centered",
    "wants_solve_once",
]

PyTree = tree_lib.PyTree

# Columns per Gram chunk: a [16k, 32] float32 block (2 MiB) stays in a core's L2.
GRAM_CHUNK = 16384
# Workers per tile of the chunk product (see _block_gram).
GRAM_TILE = 32


def _block_gram(block: jax.Array) -> jax.Array:
  """``block @ block.T`` of one chunk ``[m, L]``, laid out the way the CPU runs it fastest.

  The chunk is transposed to ``[L, m]`` in memory and contracted over its leading axis; the
  optimization barrier keeps XLA from folding the transpose back into the dot's dimension
  numbers. XLA's CPU kernel runs the ``[m, L]`` form on one core and the ``[L, m]`` form on
  all of them, but the latter loses its parallelism beyond ~32 columns (n=64: 14x one pass),
  so more workers are cut into tiles of at most :data:`GRAM_TILE` columns, and only the tiles
  on and above the diagonal are multiplied (the Gram is symmetric). Measured on an idle
  2-core Xeon, d=2e6, ratios to one pass ``ones @ x`` (chunked ``[m, L]`` form in brackets):
  n=16 4.6x (6.9x), n=32 5.5x (8.9x), n=33 6.6x (9.2x), n=64 7.7x (11.6x). With the other
  core busy the ``[m, L]`` form is ~1.2x faster instead: it never used the second core.
  """
  m = block.shape[0]
  transposed = jax.lax.optimization_barrier(block.T)
  num_tiles = -(-m // GRAM_TILE)
  bounds = [round(k * m / num_tiles) for k in range(num_tiles + 1)]
  tiles = [transposed[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]

  def product(a, b):
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                               precision=tree_lib.HIGHEST)

  upper = {(i, j): product(tiles[i], tiles[j])
           for i in range(num_tiles) for j in range(i, num_tiles)}
  return jnp.block([[upper[i, j] if i <= j else upper[j, i].T for j in range(num_tiles)]
                    for i in range(num_tiles)])


def median_norm_row(block: jax.Array) -> jax.Array:
  """The centring reference of a block ``[n, L]``: the index of its row of median norm.

  Ranked by their squared norms over the block (non-finite ones last), the row at position
  ``(n - 1) // 2`` is taken. While fewer than half the rows are Byzantine it is either an
  honest row or a row whose norm lies between two honest rows' norms: it never overflows
  the products, and a Byzantine worker cannot move it outside the honest norms (the worst it
  can do is make centring gain nothing, i.e. the precision of the uncentred Gram within a
  factor ~4, while its own distances grow as large as that loss).
  """
  if block.shape[0] == 1:
    return jnp.zeros((), jnp.int32)
  return median_index(jnp.sum(jnp.square(block), axis=1))


def median_index(sq_norms: jax.Array) -> jax.Array:
  """The index of the row of median squared norm, from the ``[n]`` squared norms: position
  ``(n - 1) // 2`` in increasing order, NaN ranked as ``+inf`` (last), ties to the lower
  index. ``n x n`` compares, no sort call. :func:`median_norm_row` of a block is this of its
  row sums of squares; on coordinate shards, this of the ``psum``-ed sums picks one row on
  every shard."""
  n = sq_norms.shape[0]
  sq = jnp.where(jnp.isnan(sq_norms), jnp.inf, sq_norms)
  index = jnp.arange(n)
  ranks = jnp.sum((sq[None, :] < sq[:, None])
                  | ((sq[None, :] == sq[:, None]) & (index[None, :] < index[:, None])), axis=1)
  return jnp.argmax(ranks == (n - 1) // 2).astype(jnp.int32)


# A reference chosen from a leaf's first chunk (see gram) is kept when the median of the
# rows' squared distances to it is at most this many times the median over rows of each
# row's median squared distance to the others; else the full-norm reference is used.
SAMPLED_REFERENCE_MAX_RATIO = 16.0


def central_row(block: jax.Array) -> jax.Array:
  """The index of the row of a block ``[n, L]`` whose median squared distance to the rows is
  least (ties: the lowest index): a row in the bulk. The distances come from the block's
  Gram centred on its :func:`median_norm_row` (uncentred, rows sharing a large offset would
  lose them); rows holding NaN/Inf are infinitely far, never chosen while a finite row is
  left."""
  n = block.shape[0]
  if n == 1:
    return jnp.zeros((), jnp.int32)
  block = block - block[median_norm_row(block)][None, :]
  D = sq_distances(symmetrize(_block_gram(block)))
  # Position n // 2 of each sorted row (its own 0 at position 0): the median over the others.
  return jnp.argmin(jnp.sort(D, axis=1)[:, n // 2]).astype(jnp.int32)


def _leaf_gram(leaf: jax.Array, extra: Optional[jax.Array], dtype, centered: bool,
               origin: bool, sampled_reference: bool = False
               ) -> tuple[jax.Array, bool, Optional[jax.Array]]:
  """Gram of one leaf's rows ``[n, D]`` (plus an optional extra row ``[D]``), whether its
  reference was sampled, and the reference's row index (``None`` when not ``centered``).

  Accumulated over column chunks of :data:`GRAM_CHUNK` (a ``lax.scan``), so that each chunk
  product works on a block that stays in cache. With ``centered``, every row (the extra row
  and the origin too) is taken relative to one reference row ``r`` of the leaf, subtracted
  while the chunk is in cache: :func:`median_norm_row` of the leaf's ``n`` rows (of the one
  block when there is a single chunk), or, with ``sampled_reference`` and at least two
  chunks, :func:`central_row` of the first chunk (the check that makes it safe is in
  :func:`gram`). The full row norms cost a single-threaded reduction over the whole input,
  ~2x one pass (n = 32, d = 1e6: 6.9 ms against 3.2 ms for ``ones @ x``); the first chunk's
  Gram costs ~1/60 of the Gram.

  The reference row is copied out once and each chunk gets its slice as a scan input: sliced
  from the input inside the chunk's fusion, the dynamic-slice-minus-broadcast loop ran
  unvectorised (n = 32, d = 1e6: the centred Gram took 28-30 ms against 21 ms for the plain
  one; with the slice as a scan input the subtraction is free, 21.7 ms).
  """
  n = leaf.shape[0]
  rows = leaf.reshape(n, -1)
  if extra is not None:
    extra = extra.reshape(1, -1)
  size = rows.shape[1]
  num_chunks = size // GRAM_CHUNK
  sampled = centered and sampled_reference and num_chunks >= 2
  reference = index = None
  if sampled:
    index = central_row(rows[:, :GRAM_CHUNK].astype(dtype))
  elif centered:
    index = median_norm_row(rows.astype(dtype))
  if index is not None:
    reference = rows[index].astype(dtype)

  def chunk_gram(start, length, reference_part, product=_block_gram):
    block = jax.lax.dynamic_slice_in_dim(rows, start, length, axis=1).astype(dtype)
    parts = [block]
    if extra is not None:
      parts.append(jax.lax.dynamic_slice_in_dim(extra, start, length, axis=1).astype(dtype))
    if origin:
      parts.append(jnp.zeros((1, length), dtype))
    block = jnp.concatenate(parts, 0) if len(parts) > 1 else block
    if reference_part is not None:
      block = block - reference_part[None, :]
    return product(block)

  if num_chunks < 2:
    # One small block (under 2 chunks, ~1 MiB at n=16) is already in cache: there the plain
    # product skips the transpose copy and is ~1.5-2x faster (n=16, d=4810: 73 us vs 166 us).
    return chunk_gram(0, size, reference, lambda block: jnp.matmul(
        block, block.T, precision=tree_lib.HIGHEST)), False, index
  if reference is None:
    step = lambda acc, index: (acc + chunk_gram(index * GRAM_CHUNK, GRAM_CHUNK, None), None)
    first, inputs = chunk_gram(0, GRAM_CHUNK, None), jnp.arange(1, num_chunks)
  else:
    references = reference[:num_chunks * GRAM_CHUNK].reshape(num_chunks, GRAM_CHUNK)
    step = lambda acc, chunk: (acc + chunk_gram(chunk[0] * GRAM_CHUNK, GRAM_CHUNK, chunk[1]),
                               None)
    first = chunk_gram(0, GRAM_CHUNK, references[0])
    inputs = (jnp.arange(1, num_chunks), references[1:])
  # The first chunk's Gram starts the sum (not zeros): it has the rows' type, which inside
  # shard_map is "varying" over the mesh axis, as the scan carry must be.
  total, _ = jax.lax.scan(step, first, inputs)
  start = num_chunks * GRAM_CHUNK
  if start < size:
    total = total + chunk_gram(start, size - start,
                               None if reference is None else reference[start:])
  return total, sampled, index


def _reference_in_bulk(K: jax.Array, n: int) -> jax.Array:
  r"""Whether the reference behind a centred Gram lies in the bulk of its first ``n`` rows.

  With :math:`D_i = K_{ii} = |x_i - r|^2` and :math:`m_i` the median over ``j != i`` of
  :math:`|x_i - x_j|^2` (non-finite values as ``+inf``): true when
  :math:`\mathrm{median}_i D_i \le 16\, \mathrm{median}_i m_i`. If fewer than half the rows
  are Byzantine and ``r`` lies at a distance :math:`\Delta` from all the honest rows while
  their pairwise distances are at most ``s``, the left side is at least
  :math:`(\Delta - s)^2` and the right at most :math:`16 s^2` plus the rounding of ``K``
  (:math:`\sim 4 \epsilon \Delta^2` per entry), so it holds only for :math:`\Delta \lesssim
  5s`: centring on ``r`` then keeps the distances' precision within a small factor of
  centring on an honest row. A median distance to ``r`` that overflows or is NaN (``r``
  huge or non-finite) fails it.
  """
  K = K[:n, :n]
  diagonal = jnp.diagonal(K)
  diagonal = jnp.where(jnp.isnan(diagonal), jnp.inf, diagonal)
  median_to_reference = jnp.sort(diagonal)[(n - 1) // 2]
  if n == 1:
    return jnp.isfinite(median_to_reference)
  D = sq_distances(K)
  median_between = jnp.sort(jnp.sort(D, axis=1)[:, n // 2])[(n - 1) // 2]
  return jnp.isfinite(median_to_reference) & (
      median_to_reference <= SAMPLED_REFERENCE_MAX_RATIO * median_between)


def symmetrize(K: jax.Array) -> jax.Array:
  """``K`` with its lower triangle replaced by the mirror of the upper one: exactly symmetric.

  A blocked matrix product need not round ``K_ij`` and ``K_ji`` alike (seen: ``|K - K^T|``
  up to 1.8e-4 at n=40, d=32768 on an AMD EPYC), and distances, Krum scores and ``eigh``
  would then depend on the triangle read. Mirroring makes every consumer see one value.
  """
  upper = jnp.triu(jnp.ones(K.shape, bool))
  return jnp.where(upper, K, K.T)


def gram(x: PyTree, *, axis_name=None, extra: Optional[PyTree] = None,
         centered: bool = False, origin: bool = False) -> jax.Array:
  r"""Gram matrix :math:`K_{ij} = \langle x_i - r, x_j - r\rangle` of stacked worker updates.

  ``r = 0`` by default (the plain Gram ``X X^T``). With ``centered=True``, ``r`` is a robust
  reference row, one per leaf, so rows that share a component much larger than their spread
  (model weights, large-batch gradients, a common offset) keep their distances. A leaf of at
  least two chunks (``2 x`` :data:`GRAM_CHUNK` coordinates) takes the :func:`central_row` of
  its first chunk, checked after the pass by :func:`_reference_in_bulk` on the leaf's Gram
  (the reference must lie in the bulk of the rows); a smaller leaf, or one whose sampled
  reference fails the check (a row that looks central in the first chunk and is far away, huge
  or non-finite beyond it), takes :func:`median_norm_row`, the row of median norm, found by
  one row-norm pass (~2x one pass at d = 1e6: the single-threaded reduction the sampled
  reference saves; a failed check costs that pass and a second Gram). From the plain Gram,
  :math:`|x_i - x_j|^2 = K_{ii} + K_{jj} - 2K_{ij}` loses every digit of the difference once
  :math:`|x|^2 \epsilon` exceeds it. Distances, and anything affine (combinations whose
  coefficients sum to one), are the same for any ``r`` in exact arithmetic, so every
  translation-invariant rule reads the centred Gram. ``K`` is exactly symmetric on every
  path (:func:`symmetrize`).

  Args:
    x: an array ``[n, ...]`` or a pytree whose leaves share the leading ``n``.
    axis_name: when set, ``x`` holds a coordinate shard and ``K`` is ``psum``-ed over it.
    extra: optional pytree shaped like one worker's update (no leading axis), appended as
      row ``n`` (centered clipping uses it for its centre).
    centered: take the rows relative to the per-leaf reference ``r`` (above). On coordinate
      shards each device picks its own (a composite ``r``: still one common translation), and
      the check reads the ``psum``-ed Gram, so every device takes the same branch.
    origin: append the zero vector as the last row (after ``extra``); with ``centered`` it
      becomes ``-r``, so a rule can use the origin as a point (centered clipping's zero
      centre) without a pass over zeros.

  Returns:
    ``K`` of shape ``[n, n]`` (one more row and column for each of ``extra`` and
    ``origin``) in the widest compute dtype of the leaves (float32, or float64 for float64
    input). Rows holding NaN/Inf, or finite rows whose squared norm overflows, give
    non-finite diagonal entries; see :func:`finite_rows`.
  """
  if extra is not None and len(jax.tree.leaves(extra)) != len(jax.tree.leaves(x)):
    raise ValueError("gram needs `extra` to have the structure of one worker's update")
  return _gram(axis_name, centered, origin, x, extra)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _gram(axis_name, centered: bool, origin: bool, x: PyTree, extra: Optional[PyTree]):
  """:func:`gram` (its derivative: :func:`_gram_jvp`)."""
  return _gram_and_references(x, extra, axis_name, centered, origin)[0]


def _gram_and_references(x: PyTree, extra: Optional[PyTree], axis_name, centered: bool,
                         origin: bool) -> tuple[jax.Array, list]:
  """``(K, the reference row index of each leaf (None when not centred))``."""
  dtype = tree_lib.result_dtype(x)
  leaves = jax.tree.leaves(x)
  extras = [None] * len(leaves) if extra is None else jax.tree.leaves(extra)
  n = tree_lib.num_workers("gram", x) if leaves else 0
  parts = [_leaf_gram(leaf, e, dtype, centered, origin, sampled_reference=True)
           for leaf, e in zip(leaves, extras)]
  grams = [K for K, _, _ in parts]
  indices = [index for _, _, index in parts]
  sampled = [i for i, (_, was_sampled, _) in enumerate(parts) if was_sampled]
  if not sampled:
    return symmetrize(_psum(sum(grams), axis_name)), indices
  # Each sampled reference must lie in the bulk of its leaf's rows (_reference_in_bulk, on
  # the leaf's own Gram); otherwise the Gram is formed again with the full-norm references,
  # under a while_loop that runs at most once (under vmap, only when some input of the batch
  # needs it; a cond would become a select and always run it). One psum of the leaf Grams
  # serves both the check and the total.
  leaf_grams = _psum(jnp.stack(grams), axis_name)
  accepted = jnp.all(jax.vmap(lambda K: _reference_in_bulk(K, n))(
      leaf_grams[jnp.asarray(sampled)]))
  total = sum(leaf_grams[i] for i in range(len(grams)))

  def full_norm_references(state):
    # The rows are read through the carried factor 1 (exact), so that XLA's loop-invariant
    # code motion cannot hoist this pass out of the loop and run it on every call.
    _, _, one, _ = state
    redone = [_leaf_gram(leaf * one.astype(leaf.dtype), e, dtype, centered, origin)
              if i in sampled else (K, False, index)
              for i, (leaf, e, K, index) in enumerate(zip(leaves, extras, grams, indices))]
    return (_psum(sum(K for K, _, _ in redone), axis_name), jnp.asarray(True), one,
            [redone[i][2] for i in sampled])

  total, _, _, chosen = jax.lax.while_loop(
      lambda state: ~state[1], full_norm_references,
      (total, accepted, jnp.ones((), dtype), [indices[i] for i in sampled]))
  for i, index in zip(sampled, chosen):
    indices[i] = index
  return symmetrize(total), indices


def _float_tangent(tangent: jax.Array, primal: jax.Array, dtype) -> jax.Array:
  """``tangent`` in ``dtype``; zeros for an integer primal (whose tangent is ``float0``)."""
  if tangent.dtype == jax.dtypes.float0:
    return jnp.zeros(primal.shape, dtype)
  return tangent.astype(dtype)


@_gram.defjvp
def _gram_jvp(axis_name, centered, origin, primals, tangents):
  r""":math:`dK = dX_c X_c^\top + X_c\, dX_c^\top`, with :math:`X_c` the rows (and the
  extra and origin rows) less the reference row each leaf's Gram was centred on.

  Written out rather than left to JAX: the Gram's sampled-reference check is a
  ``while_loop``, through which reverse mode does not go (every leaf of at least two
  :data:`GRAM_CHUNK` s), and in the transpose :math:`\bar X = (\bar K + \bar K^\top) X_c`
  a row of NaN/Inf (a Byzantine worker) met its zero cotangent and made every row's gradient
  NaN; here the rows that are non-finite in ``K`` are zeroed in :math:`X_c`. Reverse mode
  costs one copy of the rows (:math:`X_c`) and one ``[n, n] @ [n, D]`` product. Measured
  (n = 16, D = 1e6, 2-core CPU, ratios to one pass ``ones @ x``): the Gram's gradient
  34-42x, JAX's own for the plain ``X X^T`` 25-33x, writing an ``[n, D]`` array alone ~12x;
  geometric median, centered clipping and CAF's gradients 31-35x (their forward 5-11x).
  """
  x, extra = primals
  dx, dextra = tangents
  K, indices = _gram_and_references(x, extra, axis_name, centered, origin)
  finite = finite_rows(K)
  dtype = K.dtype
  leaves, tangent_leaves = jax.tree.leaves(x), jax.tree.leaves(dx)
  extras = [None] * len(leaves) if extra is None else jax.tree.leaves(extra)
  tangent_extras = [None] * len(leaves) if extra is None else jax.tree.leaves(dextra)

  dK = jnp.zeros_like(K)
  for leaf, tangent, e, de, index in zip(leaves, tangent_leaves, extras, tangent_extras,
                                         indices):
    rows = leaf.reshape(leaf.shape[0], -1).astype(dtype)
    parts = [rows] + ([] if e is None else [e.reshape(1, -1).astype(dtype)])
    parts += [jnp.zeros((1, rows.shape[1]), dtype)] if origin else []
    stacked = jnp.concatenate(parts, 0) if len(parts) > 1 else rows
    if index is not None:
      stacked = stacked - rows[index][None, :]
    centred = jnp.where(finite[:, None], stacked, 0)   # the one copy: X_c, cleaned
    # M_ij = <x_i - r, dx_j> over the stacked rows j (the origin's tangent is 0). The
    # reference's own motion is taken on the n x n side, H_ij = M_ij - M_{i r}: a sum over
    # rows of the [n, D] cotangent (what broadcasting dr gives in reverse mode) is ~30x one
    # pass on a CPU.
    columns = [jnp.matmul(centred, _float_tangent(tangent, leaf, dtype).reshape(rows.shape).T,
                          precision=tree_lib.HIGHEST)]
    if e is not None:
      columns.append(jnp.matmul(centred, _float_tangent(de, e, dtype).reshape(-1),
                                precision=tree_lib.HIGHEST)[:, None])
    if origin:
      columns.append(jnp.zeros((centred.shape[0], 1), dtype))
    half = jnp.concatenate(columns, 1) if len(columns) > 1 else columns[0]
    if index is not None:
      half = half - half[:, index][:, None]
    dK = dK + half + half.T
  return K, symmetrize(_psum(dK, axis_name))


def _psum(value, axis_name):
  return value if axis_name is None else jax.lax.psum(value, axis_name)


def finite_rows(K: jax.Array) -> jax.Array:
  """Which workers are finite: ``K_ii`` is NaN/Inf exactly when row i holds NaN/Inf."""
  return jnp.isfinite(jnp.diagonal(K))


def too_many_nonfinite(K: jax.Array, f: int) -> jax.Array:
  """Whether more than ``f`` rows are non-finite: the rule's bound is broken.

  Every rule with an ``f`` then returns NaN (the honest signal that its guarantee is gone),
  not a finite value that looks like an aggregate.
  """
  return jnp.sum(~finite_rows(K)) > f


def nan_beyond_bound(coefficients: jax.Array, K: jax.Array, f: int) -> jax.Array:
  """``coefficients``, all NaN when more than ``f`` rows of ``K`` are non-finite."""
  return jnp.where(too_many_nonfinite(K, f), jnp.nan, coefficients)


def clean_gram(K: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(K with the rows and columns of non-finite workers zeroed, finite mask)``."""
  finite = finite_rows(K)
  both = finite[:, None] & finite[None, :]
  return jnp.where(both, K, 0), finite


def norms(K: jax.Array) -> jax.Array:
  """Row norms :math:`|x_i| = \\sqrt{K_{ii}}` (NaN/Inf for non-finite rows)."""
  return safe_math.sqrt(jnp.maximum(jnp.diagonal(K), 0))


def sq_distances(K: jax.Array) -> jax.Array:
  r"""Squared distances :math:`D_{ij} = (K_{ii} - K_{ij}) + (K_{jj} - K_{ij})` from the Gram.

  Written as two differences, not ``K_ii + K_jj - 2 K_ij``: for finite rows near the float
  maximum the sum overflows to ``inf`` and ``inf - inf`` is NaN (and ``maximum(NaN, 0)`` is
  NaN or 0 depending on the backend). An overflowing distance is ``+inf``; NaN never comes
  out. Clamped at 0 against rounding; ``D_ii = 0`` exactly. A non-finite worker is infinitely
  far from every other worker (its row and column are ``+inf`` off the diagonal), so no
  distance-based rule ever selects it while honest neighbours remain.
  """
  diag = jnp.diagonal(K)
  D = (diag[:, None] - K) + (diag[None, :] - K)
  D = jnp.where(jnp.isnan(D), jnp.inf, jnp.maximum(D, 0))
  finite = finite_rows(K)
  both = finite[:, None] & finite[None, :]
  D = jnp.where(both, D, jnp.inf)
  return jnp.where(jnp.eye(K.shape[0], dtype=bool), 0, D)


def translation_invariant(coefficients_fn):
  """Marks a ``<rule>_coefficients(K, ...)`` function as reading the centred Gram.

  Its coefficients depend on ``K`` only through distances (and sum to one), so it gets
  ``gram(x, centered=True)`` wherever the Gram is formed for it (the rule itself and
  :func:`flagjax.aggregate`).
  """
  coefficients_fn.centered_gram = True
  return coefficients_fn


def wants_centered(coefficients_fn) -> bool:
  """Whether ``coefficients_fn`` was marked by :func:`translation_invariant`."""
  return bool(getattr(coefficients_fn, "centered_gram", False))


def rotation_equivariant(rule):
  """Marks an aggregation rule as rotation-equivariant: ``rule(x Q) = rule(x) Q`` for every
  orthogonal ``Q`` (applied to each row), its output depending on the rows only through their
  inner products (and on scalar hyperparameters).

  The optimal attacks (:func:`flagjax.attacks.optimal_alie`) then evaluate such a rule on
  the rows' coordinates in an orthonormal basis of the span of the honest rows, their mean
  and the attack's two directions (``h + 3`` numbers per row for ``h`` honest rows)
  instead of on the ``d``-dimensional rows. Coordinate-wise rules, and rules that sample
  coordinates, must not be marked (a test checks every marked rule against random rotations).
  """
  rule.rotation_equivariant = True
  return rule


def is_rotation_equivariant(rule) -> bool:
  """Whether ``rule`` (or the function a ``functools.partial`` wraps) was marked by
  :func:`rotation_equivariant`."""
  while isinstance(rule, functools.partial):
    rule = rule.func
  return bool(getattr(rule, "rotation_equivariant", False))


# From this many rows on, :func:`combine` is a matrix-vector product (see there).
COMBINE_MATVEC_MIN_ROWS = 64


def _masked_sum(c: jax.Array, leaf: jax.Array, extra: Optional[jax.Array],
                dtype) -> jax.Array:
  """``sum_i where(c_i != 0, c_i x_i, 0)`` (plus ``c_n extra``), row by row in ``dtype``
  (each row cast alone: no copy of a low-precision input), one fused pass; a loop beyond
  :data:`flagjax.core.tree.FOLD_UNROLL_MAX_ROWS` rows (same values)."""
  # where(), not c_i * x_i: a Byzantine NaN/Inf row with c_i = 0 must contribute 0.
  term = lambda row, i: jnp.where(c[i] != 0, c[i] * row.astype(dtype), 0)
  total = tree_lib.fold_rows(leaf, jnp.zeros(leaf.shape[1:], dtype),
                             lambda total, row, i: total + term(row, i))
  if extra is not None:
    total = total + term(extra, leaf.shape[0])
  return total


@jax.custom_jvp
def _leaf_combine(coefficients: jax.Array, leaf: jax.Array,
                  extra: Optional[jax.Array]) -> jax.Array:
  dtype = tree_lib.compute_dtype(leaf.dtype)
  c = coefficients.astype(dtype)
  n = leaf.shape[0]
  if extra is None and leaf.dtype == dtype and n >= COMBINE_MATVEC_MIN_ROWS:
    flat = leaf.reshape(n, -1)
    product = jnp.matmul(c, flat, precision=tree_lib.HIGHEST)
    # A finite product proves that no NaN/Inf row met a zero coefficient (0 * NaN = NaN);
    # otherwise the masked sum is taken instead.
    total = jax.lax.cond(jnp.all(jnp.isfinite(product)), lambda: product,
                         lambda: _masked_sum(c, flat, None, dtype))
    return total.reshape(leaf.shape[1:]).astype(tree_lib.output_dtype(leaf.dtype))
  total = _masked_sum(c, leaf, extra, dtype)
  return total.astype(tree_lib.output_dtype(leaf.dtype))


@_leaf_combine.defjvp
def _leaf_combine_jvp(primals, tangents):
  r""":math:`\sum_i dc_i x_i + c_i\, dx_i`, with the non-finite entries of the rows read as 0
  in the first sum.

  Reverse mode gives :math:`\bar c_i = \langle x_i, \bar z\rangle`, NaN for a Byzantine
  NaN row; its coefficient is 0 and constant, yet the rules' own derivatives multiply that
  cotangent by zeros (a normalising sum, a linear solve) and ``0 * NaN`` spread NaN to every
  row. Finite rows are read as they are, so the derivative of a finite input is exact.
  """
  coefficients, leaf, extra = primals
  dcoefficients, dleaf, dextra = tangents
  total = _leaf_combine(coefficients, leaf, extra)
  dtype = tree_lib.compute_dtype(leaf.dtype)
  rows = leaf.reshape(leaf.shape[0], -1).astype(dtype)
  drows = _float_tangent(dleaf, leaf, dtype).reshape(rows.shape)
  if extra is not None:
    rows = jnp.concatenate([rows, extra.reshape(1, -1).astype(dtype)], 0)
    drows = jnp.concatenate([drows, _float_tangent(dextra, extra, dtype).reshape(1, -1)], 0)
  rows = jnp.where(jnp.isfinite(rows), rows, 0)
  tangent = (jnp.matmul(_float_tangent(dcoefficients, coefficients, dtype), rows,
                        precision=tree_lib.HIGHEST)
             + jnp.matmul(coefficients.astype(dtype), drows, precision=tree_lib.HIGHEST))
  return total, tangent.reshape(leaf.shape[1:]).astype(total.dtype)


def combine(coefficients: jax.Array, x: PyTree, *, extra: Optional[PyTree] = None) -> PyTree:
  r"""The combination :math:`\sum_i c_i x_i` (plus ``c_n * extra``), in ``x``'s structure.

  One fused pass over the input. Rows with ``c_i == 0`` contribute exactly nothing, even when
  they hold NaN/Inf. Works on a coordinate shard as is (coefficients are shared).

  Up to :data:`COMBINE_MATVEC_MIN_ROWS` rows (and for float16/bfloat16 leaves, whose rows are
  cast one by one, and with ``extra``) it is a fused sum of ``where(c_i != 0, c_i x_i, 0)``
  (~1x one pass ``ones @ x`` at n <= 32; unrolled up to
  :data:`flagjax.core.tree.FOLD_UNROLL_MAX_ROWS` rows, a ``fori_loop`` beyond). With more
  rows that sum is ~3x one pass (n = 128, d = 1e5), so it is the product ``c @ x`` (1x),
  kept when it is finite; a non-finite product (a NaN/Inf row, perhaps under a zero
  coefficient) takes the masked sum under ``lax.cond`` (under ``vmap`` both run).

  Args:
    coefficients: ``[n]`` (``[n + 1]`` with ``extra``).
    x: stacked updates ``[n, ...]`` or a pytree of them.
    extra: optional pytree shaped like one worker's update.

  Returns:
    A pytree like ``x`` without the leading axis, each leaf in its input dtype.
  """
  if extra is None:
    return jax.tree.map(lambda leaf: _leaf_combine(coefficients, leaf, None), x)
  return jax.tree.map(lambda leaf, e: _leaf_combine(coefficients, leaf, e), x, extra)


def combine_many(coefficients: jax.Array, x: PyTree, finite: jax.Array) -> PyTree:
  r"""Several combinations at once: output row m is :math:`\sum_i C_{mi} x_i`.

  Used by the pre-aggregators that map ``n`` rows to ``n'`` rows (NNM). Non-finite input
  rows are zeroed before the product, so they contribute nothing where ``C_{mi} = 0``; a
  non-zero coefficient on a non-finite row makes that output row NaN (it stays Byzantine).
  Taken over column chunks of :data:`GRAM_CHUNK` (zeroed and multiplied while in cache, the
  products written into the output in place), so no cleaned copy of the input is made:
  XLA's memory plan holds the input, the output and ``O(n L)`` temporaries.

  Args:
    coefficients: ``[m, n]``.
    x: stacked updates ``[n, ...]`` or a pytree of them.
    finite: ``[n]`` bool, which rows are finite over the whole update (from
      :func:`finite_rows` of the ``psum``-ed Gram, so that a coordinate shard agrees with
      the unsharded answer).

  Returns:
    A pytree like ``x`` with leading axis ``m``.
  """
  def leaf_fn(leaf):
    dtype = tree_lib.compute_dtype(leaf.dtype)
    out_dtype = tree_lib.output_dtype(leaf.dtype)
    n = leaf.shape[0]
    flat = leaf.reshape(n, -1)
    c = coefficients.astype(dtype)
    poisoned = jnp.any((c != 0) & ~finite[None, :], axis=1)

    def chunk(block):
      block = jnp.where(finite[:, None], block.astype(dtype), 0)
      product = jnp.matmul(c, block, precision=tree_lib.HIGHEST)
      return jnp.where(poisoned[:, None], jnp.nan, product).astype(out_dtype)

    out = tree_lib.map_column_blocks(flat, GRAM_CHUNK, chunk)
    return out.reshape((c.shape[0],) + leaf.shape[1:])
  return jax.tree.map(leaf_fn, x)


def select(index: jax.Array, x: PyTree, valid: Optional[jax.Array] = None) -> PyTree:
  """Row ``index`` of every leaf: the combination with one-hot coefficients, reading one row.

  For rules whose output is one worker's update (Krum): ``combine(one_hot(index), x)`` gives
  the same values but reads all ``n`` rows; this reads ``1/n`` of the input. Works on a
  coordinate shard as is. Where ``valid`` (a bool scalar) is False the result is NaN.
  """
  def leaf_fn(leaf):
    row = jax.lax.dynamic_index_in_dim(leaf, index, 0, keepdims=False)
    if valid is None:
      return row.astype(tree_lib.output_dtype(row.dtype))
    return jnp.where(valid, row.astype(tree_lib.output_dtype(row.dtype)), jnp.nan)
  return jax.tree.map(leaf_fn, x)


def combine_by_gram(x: PyTree, coefficients_fn, *, axis_name=None,
                    centered: bool = False, once: bool = False) -> PyTree:
  """The whole Gram-space pattern: ``K = gram(x)``, ``c = coefficients_fn(K)``, ``c^T X``.

  ``centered``: form the centred Gram (for translation-invariant rules, whose coefficients
  sum to one, so the combination of the raw rows is the same point). ``once``: with
  ``axis_name``, solve on one device and share ``c`` (:func:`solve_once`), for the rules
  whose ``n x n`` solve is marked :func:`solved_once`.
  """
  K = gram(x, axis_name=axis_name, centered=centered)
  if once:
    return combine(solve_once(coefficients_fn, K, axis_name=axis_name), x)
  return combine(coefficients_fn(K), x)


def solved_once(coefficients_fn):
  """Marks a ``<rule>_coefficients(K, ...)`` function whose ``n x n`` solve costs more than a
  collective: sharded, it runs on one device and its result is shared (:func:`solve_once`).

  Marked: the eigenproblem and subset-search rules (flag, CAF, SMEA, MDA: 0.12-3.8 ms per
  solve at n = 16 on a 2-core CPU). Not marked: the rules whose solve is a few sorts or
  ``n x n`` passes (Krum, geometric median, ...: 3-25 us), where the extra ``psum`` costs more
  than the solves it saves (measured in ``experiments.bench_throughput``, shard_map backend).
  """
  coefficients_fn.solved_once = True
  return coefficients_fn


def wants_solve_once(coefficients_fn) -> bool:
  """Whether ``coefficients_fn`` was marked by :func:`solved_once`."""
  return bool(getattr(coefficients_fn, "solved_once", False))


def _to_words(leaf: jax.Array) -> jax.Array:
  """A leaf's bits as a flat int32 vector (booleans as 0/1; 1- and 2-byte types widened)."""
  dtype = jnp.dtype(leaf.dtype)
  if dtype == jnp.bool_:
    return leaf.astype(jnp.int32).ravel()
  if dtype.itemsize < 4:
    unsigned = jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{8 * dtype.itemsize}"))
    return unsigned.astype(jnp.int32).ravel()
  return jax.lax.bitcast_convert_type(leaf, jnp.int32).ravel()  # 8 bytes: two words each


def _from_words(words: jax.Array, shape: jax.ShapeDtypeStruct) -> jax.Array:
  """The inverse of :func:`_to_words` for a leaf of ``shape``."""
  dtype = jnp.dtype(shape.dtype)
  if dtype == jnp.bool_:
    return words.reshape(shape.shape) != 0
  if dtype.itemsize < 4:
    unsigned = words.astype(jnp.dtype(f"uint{8 * dtype.itemsize}")).reshape(shape.shape)
    return jax.lax.bitcast_convert_type(unsigned, dtype)
  words = words.reshape(shape.shape + ((dtype.itemsize // 4,) if dtype.itemsize > 4 else ()))
  return jax.lax.bitcast_convert_type(words, dtype)


def _num_words(shape: jax.ShapeDtypeStruct) -> int:
  return max(1, jnp.dtype(shape.dtype).itemsize // 4) * int(np.prod(shape.shape, dtype=int))


def solve_once(solve, K: PyTree, *, axis_name=None) -> PyTree:
  """``solve(K)`` for a ``K`` replicated over ``axis_name``, computed on one device only.

  Inside ``shard_map``/``pmap`` every device holds the same ``psum``-ed ``K`` and would run
  the same ``n x n`` solve. Here the axis' first device solves (``lax.cond`` on
  ``axis_index``), the others give zeros, and one ``psum`` shares the result. The result
  travels as its bits (every leaf bit-cast to int32 words, all in one vector: one collective
  whatever the pytree), and an integer ``w + 0`` is ``w``: every device gets the replicated
  solve's result bit for bit, NaN payloads and ``-0.0`` included. On real devices it costs the
  same time (the others wait at the ``psum`` instead of computing) plus one small collective;
  where the devices share cores (simulated CPU devices, one host running many) it saves the
  other devices' work: the digits-MLP flag step on 8 simulated devices and 2 cores drops from
  ~1.8-1.9x to ~1.3x plain averaging. Without ``axis_name``, ``solve(K)``. Under ``vmap`` (a
  batched predicate) ``cond`` runs both branches: correct, no saving.

  Args:
    solve: ``K -> pytree of arrays``, a pure function.
    K: its input (any pytree), the same on every device of ``axis_name``.
    axis_name: the mapped axis (or axes) the caller runs under, or None.

  Returns:
    ``solve(K)``, on every device.

  Differentiable: the bits carry no derivative, so a JVP (and reverse mode through it) runs
  ``jax.jvp(solve)`` on every device instead, its tangent beside this function's primal. The
  primal stays the shared one, so differentiating changes no value; the price is that the
  first device solves twice when a derivative is asked for.
  """
  if axis_name is None:
    return solve(K)
  return _solve_on_first(solve, axis_name, K)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _solve_on_first(solve, axis_name, K):
  """:func:`solve_once` under ``axis_name``: the first device solves, one ``psum`` shares it."""
  shapes = jax.eval_shape(solve, K)
  leaves, treedef = jax.tree.flatten(shapes)
  if not leaves:
    return shapes
  sizes = [_num_words(leaf) for leaf in leaves]

  def on_first(K):
    return jnp.concatenate([_to_words(jnp.asarray(v)) for v in jax.tree.leaves(solve(K))])

  def elsewhere(K):
    del K
    return jnp.zeros((sum(sizes),), jnp.int32)

  first = jax.lax.axis_index(axis_name) == 0
  words = jax.lax.psum(jax.lax.cond(first, on_first, elsewhere, K), axis_name)
  offsets = np.cumsum([0] + sizes)
  return jax.tree.unflatten(treedef, [
      _from_words(words[start:stop], leaf)
      for leaf, start, stop in zip(leaves, offsets[:-1], offsets[1:])])


@_solve_on_first.defjvp
def _solve_on_first_jvp(solve, axis_name, primals, tangents):
  # Before: the int32 words had a zero derivative, so the sharded gradient of CAF silently
  # left out how its weights move with the rows (0.1 off the unsharded one).
  (K,), (dK,) = primals, tangents
  _, d_solution = jax.jvp(solve, (K,), (dK,))
  return _solve_on_first(solve, axis_name, K), d_solution


# Power-of-two scale of the overflow-safe second sum in :func:`row_norms` (exact scaling).
_NORM_SCALE_EXPONENT = {"float32": 70, "float64": 600}


def row_norms(x: PyTree, *, axis_name=None) -> jax.Array:
  r"""Row norms :math:`|x_i|` without forming ``K``, finite for every finite row.

  One pass for the row-wise sums of squares (summed over leaves, ``psum``-ed over
  ``axis_name``). Only where one of them overflows (a finite Byzantine row of 1e20 in
  float32) a second pass sums the squares of the rows scaled by an exact power of two
  (:math:`2^{-70}` in float32, :math:`2^{-600}` in float64), under ``lax.cond``: so a finite
  row always has a finite norm (up to the largest float), only rows holding NaN/Inf get a
  non-finite one, and the common case costs one pass (two fused reductions cost ~3x as much
  as one on a 2-core CPU). Under ``vmap`` the ``cond`` runs both branches.

  Args:
    x: an array ``[n, ...]`` or a pytree whose leaves share the leading ``n``.
    axis_name: when set, ``x`` holds a coordinate shard and the sums are ``psum``-ed.

  Returns:
    ``[n]`` in the widest compute dtype of the leaves.
  """
  dtype = tree_lib.result_dtype(x)
  exponent = _NORM_SCALE_EXPONENT["float64" if dtype == jnp.float64 else "float32"]
  (plain,) = _sums_of_squares(x, (1.0,), axis_name)
  # A row holding Inf sums to +inf like a finite row that overflows; the scaled sum tells them
  # apart. ``plain`` is already psum-ed, so every shard takes the same branch.
  overflow = jnp.isposinf(plain)
  rescue = jnp.any(overflow)

  def scaled_norms(_):
    (scaled,) = _sums_of_squares(x, (2.0 ** -exponent,), axis_name)
    return safe_math.sqrt(scaled) * jnp.asarray(2.0 ** exponent, dtype)

  big = jax.lax.cond(rescue, scaled_norms, lambda _: jnp.full_like(plain, jnp.inf), None)
  return jnp.where(jnp.isfinite(plain), safe_math.sqrt(plain), jnp.where(overflow, big, plain))


def nonfinite_rows(x: PyTree, *, axis_name=None) -> jax.Array:
  r"""Which rows hold NaN/Inf: ``[n]`` bool, from one matrix-vector product per leaf.

  :math:`\sum_k 2^{-e} x_{ik}` (``e`` = 70 in float32, 600 in float64, so no finite row
  overflows it) is NaN/Inf exactly when row ``i`` holds NaN/Inf (an Inf plus a -Inf is NaN).
  A matrix-vector product runs at the speed of one pass, ~2.5x faster than a row reduction
  on a 2-core CPU. ``psum``-ed over ``axis_name``.
  """
  dtype = tree_lib.result_dtype(x)
  exponent = _NORM_SCALE_EXPONENT["float64" if dtype == jnp.float64 else "float32"]
  total = 0
  for leaf in jax.tree.leaves(x):
    flat = leaf.reshape(leaf.shape[0], -1)
    compute = tree_lib.compute_dtype(flat.dtype)
    weights = jnp.full((flat.shape[1],), 2.0 ** -exponent, compute)
    total = total + jnp.matmul(flat.astype(compute), weights,
                               precision=tree_lib.HIGHEST).astype(dtype)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return ~jnp.isfinite(total)


def clip_scale(row_norms: jax.Array, threshold: jax.Array) -> jax.Array:
  """``min(1, threshold / |x_i|)``: the scale that clips each row to norm ``threshold``; 1 for
  zero and non-finite rows (they pass through unchanged). Shared by ``clip``, ``arc``,
  SignGuard and Clipped Clustering.

  ``row_norms`` from :func:`row_norms`: finite for every finite row, so
  a finite row of 1e20 (whose squared norm overflows float32) is clipped like any other.
  """
  over = jnp.isfinite(row_norms) & (row_norms > threshold)
  return jnp.where(over, threshold / jnp.where(over, row_norms, 1), 1)


@jax.custom_jvp
def _row_sums_of_squares(rows: jax.Array) -> jax.Array:
  r"""``sum(rows**2, axis=1)`` of ``[n, L]``, whose derivative leaves out the non-finite rows.

  The derivative :math:`2 x_i \cdot dx_i` is taken with the rows whose sum is NaN/Inf
  zeroed: in reverse mode a rule that leaves such a row out sends it a zero cotangent, and
  ``0 * NaN`` would make that row's gradient NaN (a Byzantine row's gradient is 0: it has no
  effect on the output). A finite row whose sum overflows gets derivative 0 here; the rules
  reach it through the rescaled sum (:func:`row_norms`).
  """
  return jnp.sum(jnp.square(rows), axis=1)


@_row_sums_of_squares.defjvp
def _row_sums_of_squares_jvp(primals, tangents):
  (rows,), (drows,) = primals, tangents
  sums = _row_sums_of_squares(rows)
  rows = jnp.where(jnp.isfinite(sums)[:, None], rows, 0)
  return sums, 2 * jnp.sum(rows * drows, axis=1)


@jax.custom_jvp
def _row_products(rows: jax.Array, vector: jax.Array) -> jax.Array:
  """``rows @ vector`` (``[n, L] @ [L]``), whose derivative leaves out the non-finite rows
  (as :func:`_row_sums_of_squares`: ``dX v + X dv`` with the rows whose product is NaN/Inf
  zeroed in ``X``, so the vector's gradient stays finite)."""
  return jnp.matmul(rows, vector, precision=tree_lib.HIGHEST)


@_row_products.defjvp
def _row_products_jvp(primals, tangents):
  (rows, vector), (drows, dvector) = primals, tangents
  products = _row_products(rows, vector)
  rows = jnp.where(jnp.isfinite(products)[:, None], rows, 0)
  return products, (jnp.matmul(drows, vector, precision=tree_lib.HIGHEST)
                    + jnp.matmul(rows, dvector, precision=tree_lib.HIGHEST))


def products_with(x: PyTree, vector: PyTree, *, axis_name=None) -> jax.Array:
  r"""Inner products :math:`\langle x_i, v\rangle` of every row with one vector: one
  matrix-vector product per leaf, each in the leaf's compute dtype, summed over leaves and
  ``psum``-ed over ``axis_name``.

  Args:
    x: an array ``[n, ...]`` or a pytree whose leaves share the leading ``n``.
    vector: a pytree shaped like one worker's update (this shard of it with ``axis_name``).
    axis_name: when set, ``x`` and ``vector`` hold a coordinate shard.

  Returns:
    ``[n]`` in the widest compute dtype of the leaves; NaN/Inf for rows holding NaN/Inf. The
    derivative is finite for the finite rows and the vector whatever the other rows hold.
  """
  dtype = tree_lib.result_dtype(x)
  total = 0
  for leaf, v in zip(jax.tree.leaves(x), jax.tree.leaves(vector)):
    compute = tree_lib.compute_dtype(leaf.dtype)
    total = total + _row_products(leaf.reshape(leaf.shape[0], -1).astype(compute),
                                  v.reshape(-1).astype(compute)).astype(dtype)
  return _psum(total, axis_name)


def _sums_of_squares(x: PyTree, scales, axis_name) -> tuple:
  """For each scale ``s``, the row sums of ``(s x)^2`` over all leaves (one fused pass),
  ``psum``-ed over ``axis_name``."""
  dtype = tree_lib.result_dtype(x)
  totals = [0] * len(scales)
  for leaf in jax.tree.leaves(x):
    flat = leaf.reshape(leaf.shape[0], -1).astype(dtype)
    for k, scale in enumerate(scales):
      scaled = flat if scale == 1.0 else flat * jnp.asarray(scale, dtype)
      totals[k] = totals[k] + _row_sums_of_squares(scaled)
  if axis_name is not None:
    totals = jax.lax.psum(tuple(totals), axis_name)
  return tuple(totals)


def sq_norms(x: PyTree, *, axis_name=None) -> jax.Array:
  r"""Squared row norms :math:`|x_i|^2` (the diagonal of ``K``) without forming ``K``.

  One pass (a row-wise sum of squares per leaf, summed over leaves and ``psum``-ed over
  ``axis_name``), ~1x a pass versus ~4-9x for the whole Gram. NaN/Inf for rows holding
  NaN/Inf, and ``+inf`` for finite rows whose squared norm overflows; use :func:`row_norms`
  where a finite row must get a finite norm (clipping).

  Args:
    x: an array ``[n, ...]`` or a pytree whose leaves share the leading ``n``.
    axis_name: when set, ``x`` holds a coordinate shard and the result is ``psum``-ed.

  Returns:
    ``[n]`` in the widest compute dtype of the leaves.
  """
  return _sums_of_squares(x, (1.0,), axis_name)[0]


def sq_distances_to(x: PyTree, point: PyTree, *, axis_name=None) -> jax.Array:
  r"""Squared distances :math:`|x_i - p|^2` of every row to one point, without forming ``K``.

  For rules that need the ``n`` distances to a single point (MoNNA's reference row, centered
  clipping's centre), not all ``n^2``: one fused pass of ``sum((x_i - p)^2)`` per leaf, summed
  over leaves and ``psum``-ed over ``axis_name``. Differences are taken before squaring, so
  rows sharing a large common component keep every digit of their distance (no
  :math:`|x_i|^2 - 2 x_i \cdot p + |p|^2` cancellation). Measured on a 2-core CPU (float32,
  ratios to one pass ``ones @ x``): 2.3-2.9x at d=1e5, ~4-4.5x at d=1e6 (XLA's CPU row
  reductions run on one core, ``ones @ x`` on both); the centred Gram costs 4.6-9x.

  Args:
    x: an array ``[n, ...]`` or a pytree whose leaves share the leading ``n``.
    point: a pytree shaped like one worker's update (no leading axis); with ``axis_name``,
      this shard of it.
    axis_name: when set, ``x`` and ``point`` hold a coordinate shard and the sums are
      ``psum``-ed.

  Returns:
    ``[n]`` in the widest compute dtype of the leaves: NaN/Inf where row ``i`` or the point
    holds NaN/Inf, ``+inf`` where a finite distance overflows.
  """
  dtype = tree_lib.result_dtype(x)
  leaves = jax.tree.leaves(x)
  points = jax.tree.leaves(point)
  if len(points) != len(leaves):
    raise ValueError("sq_distances_to needs `point` to have the structure of one worker's "
                     "update")
  total = 0
  for leaf, p in zip(leaves, points):
    flat = leaf.reshape(leaf.shape[0], -1).astype(dtype)
    total = total + _row_sums_of_squares(flat - p.reshape(1, -1).astype(dtype))
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total


def nearest_mask(D: jax.Array, size: int) -> jax.Array:
  """For each row of distances ``D [m, n]``, which ``size`` columns are nearest.

  Ties go to the lowest column index (stable sort). To always include a row's own column,
  set it below every distance first (e.g. to ``-1``). Used by MoNNA and NNM.

  Returns:
    ``[m, n]`` bool with ``size`` True per row.
  """
  order = jnp.argsort(D, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return ranks < size
