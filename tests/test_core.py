"""The shared cores against numpy: the Gram-space core, the sorting network, the eigenvalue.

Every rule is built on these, so they are checked directly, on the shapes that take each
code path: one small block, the chunked scan with a remainder, several tiles of workers,
pytrees, an extra row, non-finite rows, and coordinate shards.
"""

import itertools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from flagjax.core import gram as gram_lib
from flagjax.core import sorting
from flagjax.core import spectral
from flagjax.core import tree as tree_lib
from tests import helpers

# d values for every path of the Gram: one block, exactly two chunks, chunks plus a remainder.
GRAM_DS = (37, 2 * gram_lib.GRAM_CHUNK, 2 * gram_lib.GRAM_CHUNK + 11)


class GramTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(n=(3, 40), d=GRAM_DS)
  def test_gram_matches_numpy(self, n, d):
    x = helpers.random_rows(n * 7 + d, n, d)
    K = self.variant(gram_lib.gram)(jnp.asarray(x))
    x64 = x.astype(np.float64)
    chex.assert_shape(K, (n, n))
    np.testing.assert_allclose(K, x64 @ x64.T, rtol=2e-5, atol=2e-4 * np.sqrt(d))
    np.testing.assert_array_equal(K, K.T)  # symmetric by construction, not just close

  @parameterized.parameters(*GRAM_DS)
  def test_pytree_is_the_sum_of_leaf_grams_and_extra_is_row_n(self, d):
    n = 5
    tree = {"a": helpers.random_rows(1, n, d).reshape(n, d, 1),
            "b": helpers.random_rows(2, n, 6)}
    extra = {"a": helpers.random_rows(3, 1, d).reshape(d, 1), "b": helpers.random_rows(4, 1, 6)[0]}
    flat = np.concatenate([tree["a"].reshape(n, -1), tree["b"]], 1).astype(np.float64)
    flat_extra = np.concatenate([extra["a"].ravel(), extra["b"]]).astype(np.float64)
    stacked = np.concatenate([flat, flat_extra[None]], 0)
    K = jax.jit(lambda t, e: gram_lib.gram(t, extra=e))(tree, extra)
    chex.assert_shape(K, (n + 1, n + 1))
    np.testing.assert_allclose(K, stacked @ stacked.T, rtol=2e-5, atol=1e-3)

  def test_distances_norms_and_non_finite_rows(self):
    x = helpers.poison(helpers.random_rows(5, 6, 30), rows=[4])
    K = gram_lib.gram(jnp.asarray(x))
    finite = np.array([True] * 4 + [False, True])
    np.testing.assert_array_equal(gram_lib.finite_rows(K), finite)
    D = np.asarray(gram_lib.sq_distances(K))
    x64 = x.astype(np.float64)
    for i, j in itertools.product(range(6), repeat=2):
      if i == j:
        self.assertEqual(D[i, j], 0)
      elif finite[i] and finite[j]:
        np.testing.assert_allclose(D[i, j], np.sum((x64[i] - x64[j]) ** 2), rtol=1e-4)
      else:
        self.assertEqual(D[i, j], np.inf)
    cleaned, mask = gram_lib.clean_gram(K)
    np.testing.assert_array_equal(mask, finite)
    self.assertTrue(np.all(np.isfinite(cleaned)))
    np.testing.assert_allclose(gram_lib.norms(K)[finite], np.linalg.norm(x64[finite], axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(gram_lib.sq_norms(jnp.asarray(x))[finite],
                               np.diag(np.asarray(K))[finite], rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(5, gram_lib.COMBINE_MATVEC_MIN_ROWS + 1)
  def test_combine_is_nan_safe_where_the_coefficient_is_zero(self, n):
    # Below COMBINE_MATVEC_MIN_ROWS the masked sum; from it on the product c @ x, with the
    # masked sum taken when the product is not finite.
    x = helpers.poison(helpers.random_rows(6, n, 40), rows=[1, 3])
    c = np.random.default_rng(7).random(n).astype(np.float32)
    c[[1, 3]] = 0.0
    out = self.variant(gram_lib.combine)(jnp.asarray(c), jnp.asarray(x))
    np.testing.assert_allclose(out, c @ np.where(np.isfinite(x), x, 0), rtol=1e-5, atol=1e-5)
    # Finite rows: the product path, the same values.
    clean = helpers.random_rows(8, n, 40)
    np.testing.assert_allclose(self.variant(gram_lib.combine)(jnp.asarray(c), clean),
                               c.astype(np.float64) @ clean, rtol=1e-5, atol=1e-5)
    # A non-zero coefficient on a poisoned row poisons the result (no silent repair).
    self.assertFalse(np.all(np.isfinite(gram_lib.combine(jnp.ones(n), jnp.asarray(x)))))

  def test_combine_of_many_rows_masks_in_a_loop(self):
    # Beyond FOLD_UNROLL_MAX_ROWS the masked sum is a loop over the rows: same values, an
    # Inf used where its coefficient is not zero, and a program whose size does not grow
    # with n (the unrolled sum's did).
    n = tree_lib.FOLD_UNROLL_MAX_ROWS + 44
    x = helpers.poison(helpers.random_rows(9, n, 5000), rows=[1, 3, 250])
    x[7, 4321] = np.inf
    c = np.random.default_rng(9).random(n).astype(np.float32)
    c[[1, 3, 250]] = 0.0
    out = np.asarray(jax.jit(gram_lib.combine)(jnp.asarray(c), jnp.asarray(x)))
    expected = c.astype(np.float64) @ np.where(np.isfinite(x), x, 0)
    expected[4321] = np.inf
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    def size(rows):   # equations, those of the cond's branches included
      def count(jaxpr):
        return sum(1 + sum(count(sub.jaxpr) for sub in e.params.get("branches", ()))
                   for e in jaxpr.eqns)
      return count(jax.make_jaxpr(gram_lib.combine)(jnp.ones(rows),
                                                    jnp.ones((rows, 3000), dtype)).jaxpr)
    dtype = jnp.float32
    self.assertEqual(size(n), size(2 * n))
    # bfloat16 rows are cast one by one (no float32 copy), in a loop beyond
    # FOLD_UNROLL_MAX_ROWS: the same values as numpy on the rounded rows, a size fixed in n.
    low = jnp.asarray(x, jnp.bfloat16)
    out = np.asarray(jax.jit(gram_lib.combine)(jnp.asarray(c), low), np.float32)
    rounded = np.asarray(low, np.float32)
    expected = c.astype(np.float64) @ np.where(np.isfinite(rounded), rounded, 0)
    expected[4321] = np.inf
    np.testing.assert_allclose(out, expected, rtol=1e-2, atol=1e-2)
    dtype = jnp.bfloat16
    self.assertEqual(size(n), size(2 * n))

  def test_combine_many_poisons_only_rows_that_use_a_non_finite_worker(self):
    x = helpers.poison(helpers.random_rows(7, 4, 12), rows=[2])
    C = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0.5, 0, 0, 0.5]], np.float32)
    finite = gram_lib.finite_rows(gram_lib.gram(jnp.asarray(x)))
    out = np.asarray(gram_lib.combine_many(jnp.asarray(C), jnp.asarray(x), finite))
    chex.assert_shape(out, (3, 12))
    np.testing.assert_allclose(out[[0, 2]], C[[0, 2]] @ np.where(np.isfinite(x), x, 0),
                               rtol=1e-6)
    self.assertTrue(np.all(np.isnan(out[1])))

  @parameterized.parameters(37, 2 * gram_lib.GRAM_CHUNK + 11)
  def test_centred_gram_keeps_distances_under_an_offset_and_a_huge_row(self, d):
    # Rows at 1000 + 0.01 noise (a common offset 1e5x their spread), a duplicated row and a
    # Byzantine row of 1e18 (its squared norm overflows float32). The centring reference must
    # be an honest row: then every honest distance survives; the plain Gram loses them all
    # (|x|^2 eps ~ 2e3 at d = 32779 against distances ~7), which this test also checks.
    rng = np.random.default_rng(d)
    x = (1000 + 0.01 * rng.normal(size=(9, d))).astype(np.float32)
    x[5] = x[4]
    x[2] = 1e19
    honest = np.array([i for i in range(9) if i != 2])
    exact = helpers.np_sq_distances(x[honest])
    pytree = {"a": jnp.asarray(x[:, :20]), "b": jnp.asarray(x[:, 20:])}
    for centered, tree in ((True, jnp.asarray(x)), (True, pytree), (False, jnp.asarray(x))):
      K = np.asarray(gram_lib.gram(tree, centered=centered))
      D = np.asarray(gram_lib.sq_distances(jnp.asarray(K)))[np.ix_(honest, honest)]
      self.assertFalse(np.isfinite(K[2, 2]))
      error = np.abs(D - exact).max() / np.abs(exact).max()
      if centered:
        self.assertLess(error, 1e-3)
      elif d > 1000:
        self.assertGreater(error, 1e-1)

  def test_central_row_matches_numpy(self):
    # Integer rows with duplicates (tied medians: the lowest index wins) and non-finite rows.
    rng = np.random.default_rng(11)
    for n in (1, 2, 5, 8, 13):
      x = rng.integers(-3, 4, size=(n, 6)).astype(np.float32)
      if n > 2:
        x[1] = x[0]
        x[n - 1, 2] = np.nan
      if n > 4:
        x[2, 0] = np.inf
      x64 = x.astype(np.float64)
      with np.errstate(invalid="ignore"):
        D = ((x64[:, None] - x64[None]) ** 2).sum(-1)
      D[~np.isfinite(D)] = np.inf
      np.fill_diagonal(D, 0)
      expected = int(np.argmin(np.sort(D, axis=1)[:, n // 2]))
      self.assertEqual(int(gram_lib.central_row(jnp.asarray(x))), expected, f"n={n}")

  def test_reference_in_bulk(self):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(9, 50))
    cases = {"an honest row": (x[4], True), "the mean": (x.mean(0), True),
             "10 spreads away": (x[4] + 10 * np.sqrt(2 * 50) * np.eye(50)[0], False)}
    for name, (r, expected) in cases.items():
      K = jnp.asarray((x - r) @ (x - r).T)
      self.assertEqual(bool(gram_lib._reference_in_bulk(K, 9)), expected, name)
    self.assertTrue(bool(gram_lib._reference_in_bulk(jnp.zeros((9, 9)), 9)))   # all equal
    # One non-finite row (not the reference) leaves the others' verdict; a reference that
    # held a NaN makes every entry NaN, and a huge one overflows them: both rejected.
    one_bad = np.asarray((x - x[4]) @ (x - x[4]).T)
    one_bad[7, :] = one_bad[:, 7] = np.nan
    self.assertTrue(bool(gram_lib._reference_in_bulk(jnp.asarray(one_bad), 9)))
    self.assertFalse(bool(gram_lib._reference_in_bulk(jnp.full((9, 9), jnp.nan), 9)))
    self.assertFalse(bool(gram_lib._reference_in_bulk(jnp.full((9, 9), jnp.inf), 9)))

  def test_sampled_reference_and_its_check(self):
    # Multi-chunk leaves take their reference from the first chunk (central_row). Honest rows
    # at 1000 + 0.01 noise (an offset 1e5x their spread; the plain Gram loses every distance),
    # row 3 exactly at the centre in the first chunk. Benign: row 3 is the reference. Then row
    # 3 made a Byzantine row that is central in the first chunk but 1e10 (or 1e30, or NaN)
    # beyond it: the check must reject it and the full-norm median row (honest) be used; with
    # the check disabled the honest distances are lost, so the check is what keeps them.
    d = 2 * gram_lib.GRAM_CHUNK + 11
    rng = np.random.default_rng(13)
    centre = 1000 + 0.01 * rng.normal(size=d)
    x = (centre + 0.01 * rng.normal(size=(9, d))).astype(np.float32)
    x[3] = centre.astype(np.float32)
    gram = jax.jit(lambda rows: gram_lib.gram(rows, centered=True))

    def honest_error(K, honest):
      D = np.asarray(gram_lib.sq_distances(K))[np.ix_(honest, honest)]
      exact = helpers.np_sq_distances(x[honest])
      return np.abs(D - exact).max() / np.abs(exact).max()

    K = gram(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(K, (x64 - x64[3]) @ (x64 - x64[3]).T, rtol=1e-4, atol=2e-4)
    self.assertLess(honest_error(K, np.arange(9)), 1e-3)
    batch = [x]
    honest = np.array([i for i in range(9) if i != 3])
    for value in (1e10, 1e30, np.nan):
      y = x.copy()
      y[3, gram_lib.GRAM_CHUNK:] = value
      K = gram(y)
      self.assertLess(honest_error(K, honest), 1e-3, f"beyond the first chunk: {value}")
      # The same rows as a pytree: a small leaf (full-norm reference) beside the sampled one.
      tree = {"small": jnp.asarray(y[:, :7]), "wide": jnp.asarray(y[:, 7:])}
      K_tree = jax.jit(lambda t: gram_lib.gram(t, centered=True))(tree)
      self.assertLess(honest_error(K_tree, honest), 1e-3, f"pytree, {value}")
      # Row 3 itself: finite at 1e10 (|x|^2 ~ 1e24), non-finite when it overflows or is NaN.
      self.assertEqual(bool(np.isfinite(np.asarray(K)[3, 3])), value == 1e10)
      with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gram_lib, "_reference_in_bulk", lambda K, n: jnp.asarray(True))
        unchecked = jax.jit(lambda rows: gram_lib.gram(rows, centered=True))(y)
        if value == 1e10:
          self.assertGreater(honest_error(unchecked, honest), 1e-1)
        else:
          self.assertFalse(np.all(np.isfinite(np.asarray(unchecked)[np.ix_(honest, honest)])))
      batch.append(y)
    # Under vmap the rejected inputs take the fallback and the accepted one does not (K itself
    # may differ: the median-norm ranking of near-equal norms rounds differently in a batch).
    batched = jax.jit(jax.vmap(lambda rows: gram_lib.gram(rows, centered=True)))(np.stack(batch))
    np.testing.assert_allclose(batched[0], (x64 - x64[3]) @ (x64 - x64[3]).T, rtol=1e-4,
                               atol=2e-4)
    for got in batched[1:]:
      self.assertLess(honest_error(got, honest), 1e-3)
    # On 8 coordinate shards each device samples its own first chunk (a composite reference):
    # K differs from the unsharded one, the distances do not.
    wide = np.concatenate([x] * 8, axis=1)
    sharded = jax.jit(jax.shard_map(
        lambda xs: gram_lib.gram(xs, axis_name="coords", centered=True),
        mesh=helpers.coordinate_mesh(), in_specs=jax.sharding.PartitionSpec(None, "coords"),
        out_specs=jax.sharding.PartitionSpec()))(wide)
    D = np.asarray(gram_lib.sq_distances(sharded))
    exact = helpers.np_sq_distances(wide)
    self.assertLess(np.abs(D - exact).max() / np.abs(exact).max(), 1e-3)

  def test_sharded_gram_is_the_psum_of_shard_grams(self):
    x = helpers.random_rows(8, 6, 8 * 40)
    mesh = helpers.coordinate_mesh()
    sharded = jax.jit(jax.shard_map(
        lambda xs: gram_lib.gram(xs, axis_name="coords"), mesh=mesh,
        in_specs=jax.sharding.PartitionSpec(None, "coords"),
        out_specs=jax.sharding.PartitionSpec()))(x)
    np.testing.assert_allclose(sharded, gram_lib.gram(jnp.asarray(x)), rtol=1e-5, atol=1e-4)


  def test_solve_once_runs_on_one_device_and_shares_its_result_exactly(self):
    K = jnp.asarray(helpers.random_rows(13, 5, 5))
    calls = []

    def solve(K):
      jax.debug.callback(lambda: calls.append(1))
      v = jnp.sum(K, axis=1) / 3
      # NaN, -0.0 and odd rounding must all arrive bit for bit, as must ints, bools and
      # 2-byte types.
      return {"v": v.at[1].set(jnp.nan).at[2].set(-0.0), "count": jnp.sum(K > 0).astype(jnp.int32),
              "flag": v > 0, "wide": jnp.outer(v, v), "half": v.astype(jnp.bfloat16),
              "small": (-v * 100).astype(jnp.int16)}

    def sharded(wrap):
      return jax.jit(jax.shard_map(
          lambda K: wrap(K), mesh=helpers.coordinate_mesh(),
          in_specs=jax.sharding.PartitionSpec(), out_specs=jax.sharding.PartitionSpec()))(K)

    expected = solve(K)
    jax.effects_barrier()
    calls.clear()
    once = sharded(lambda K: gram_lib.solve_once(solve, K, axis_name="coords"))
    jax.effects_barrier()
    self.assertEqual(len(calls), 1)
    calls.clear()
    everywhere = sharded(solve)
    jax.effects_barrier()
    self.assertEqual(len(calls), helpers.NUM_DEVICES)
    for got in (once, everywhere):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, expected)
      self.assertTrue(np.signbit(got["v"][2]))
      self.assertEqual(jax.tree.map(lambda a: a.dtype, got),
                       jax.tree.map(lambda a: a.dtype, expected))
    # The whole result crosses devices in one psum.
    jaxpr = jax.make_jaxpr(jax.shard_map(
        lambda K: gram_lib.solve_once(solve, K, axis_name="coords"),
        mesh=helpers.coordinate_mesh(), in_specs=jax.sharding.PartitionSpec(),
        out_specs=jax.sharding.PartitionSpec()))(K)
    self.assertEqual(str(jaxpr).count("psum"), 1)
    # Unsharded, it is the solve itself.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 gram_lib.solve_once(solve, K), expected)

  def test_row_norms_and_nonfinite_rows_without_the_gram(self):
    x = helpers.random_rows(9, 6, 40)
    x[1] = 1e30                                   # finite: its norm overflows a plain sum
    x[2, 3] = np.nan
    x[3, 5] = np.inf
    x[4, 0], x[4, 1] = np.inf, -np.inf            # sums to NaN
    norms = np.asarray(gram_lib.row_norms(x))
    np.testing.assert_allclose(norms[[0, 5]], np.linalg.norm(x[[0, 5]], axis=1), rtol=1e-6)
    np.testing.assert_allclose(norms[1], 1e30 * np.sqrt(40), rtol=1e-6)
    self.assertFalse(np.isfinite(norms[2:5]).any())
    np.testing.assert_array_equal(gram_lib.nonfinite_rows(x), ~np.isfinite(x).all(1))
    tree = {"a": x[:, :8], "b": x[:, 8:].reshape(6, 4, 8)}
    np.testing.assert_array_equal(gram_lib.nonfinite_rows(tree), ~np.isfinite(x).all(1))
    np.testing.assert_allclose(gram_lib.row_norms(tree), norms, rtol=1e-6)
    # Without any overflow the scaled pass never runs, and vmap (both branches) agrees.
    clean = helpers.random_rows(10, 6, 40)
    batched = jax.vmap(gram_lib.row_norms)(np.stack([clean, x]))
    np.testing.assert_allclose(batched[0], np.linalg.norm(clean, axis=1), rtol=1e-6)
    np.testing.assert_allclose(batched[1, :2], norms[:2], rtol=1e-6)


def _symmetric_cases(m, rng):
  """Nasty symmetric ``[m, m]`` matrices: indefinite, low rank, zero, repeated and negative
  eigenvalues, a duplicated row, a zero off-diagonal (already tridiagonal), huge and tiny
  entries."""
  a = rng.normal(size=(m, m))
  low = rng.normal(size=(m, 2))
  tied = low @ low.T
  tied[-1] = tied[0]
  tied[:, -1] = tied[:, 0]
  tied[-1, -1] = tied[0, 0]
  return {"indefinite": a + a.T, "low rank": low @ low.T, "zero": np.zeros((m, m)),
          "identity": np.eye(m), "ones": np.ones((m, m)), "negative": -np.eye(m) - 1.0,
          "duplicated row": tied, "diagonal": np.diag(rng.normal(size=m)),
          "tridiagonal": np.diag(np.full(m, 2.0)) - np.eye(m, k=1) - np.eye(m, k=-1),
          "huge": (a + a.T) * 1e37, "tiny": (a + a.T) * 1e-33}


class SpectralTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(m=(1, 2, 3, 8, 13), dtype=("float32", "float64"))
  def test_largest_eigenvalue_matches_numpy(self, m, dtype):
    # Backward stability: |computed - exact| <= c m eps max|A|, with c = 4 (numpy's float64
    # eigvalsh as the reference; LAPACK's own float32 syevd errs by ~1-2 of these units).
    rng = np.random.default_rng(m)
    eps = np.finfo(dtype).eps
    with jax.enable_x64(dtype == "float64"):
      largest = self.variant(spectral.largest_eigenvalue)
      for name, matrix in _symmetric_cases(m, rng).items():
        matrix = matrix.astype(dtype)
        got = np.asarray(largest(jnp.asarray(matrix)))
        chex.assert_shape(got, ())
        self.assertEqual(got.dtype, np.dtype(dtype))
        exact = np.linalg.eigvalsh(matrix.astype(np.float64))[-1]
        bound = 4 * m * eps * np.abs(matrix.astype(np.float64)).max()
        self.assertLessEqual(abs(float(got) - exact), bound, f"{name}, m={m}")

  def test_vmap_over_many_matrices(self):
    rng = np.random.default_rng(5)
    b = rng.normal(size=(300, 12, 20)).astype(np.float32)
    matrices = b @ b.transpose(0, 2, 1)
    got = jax.jit(jax.vmap(spectral.largest_eigenvalue))(matrices)
    exact = np.linalg.eigvalsh(matrices.astype(np.float64))[:, -1]
    np.testing.assert_allclose(got, exact, rtol=1e-5)

  @parameterized.parameters(2, 5, 12)
  def test_a_stack_is_solved_matrix_by_matrix(self, m):
    # Every nasty case in one stack [2, k, m, m]: each matrix is scaled on its own (1e37 and
    # 1e-33 side by side), and the stack agrees with numpy per matrix, as one matrix does.
    rng = np.random.default_rng(m)
    cases = _symmetric_cases(m, rng)
    stack = np.stack(list(cases.values()) * 2).astype(np.float32).reshape(2, -1, m, m)
    got = np.asarray(jax.jit(spectral.largest_eigenvalue)(jnp.asarray(stack)))
    chex.assert_shape(got, stack.shape[:2])
    exact = np.linalg.eigvalsh(stack.astype(np.float64))[..., -1]
    bound = 4 * m * np.finfo(np.float32).eps * np.abs(stack.astype(np.float64)).max((-2, -1))
    for name, error, limit in zip(list(cases) * 2, np.abs(got - exact).ravel(), bound.ravel()):
      self.assertLessEqual(error, limit, name)

  def test_stacks_under_vmap_and_in_pieces(self):
    # vmap joins the mapped axis to the stack (a custom batching rule), and a long stack is
    # solved in overlapping pieces: neither may change a value. Reference: each matrix alone.
    rng = np.random.default_rng(11)
    b = rng.normal(size=(3, 13, 6, 9)).astype(np.float32)
    grams = np.einsum("akid,akjd->aijk", b, b)                   # [3, m, m, 13] batch-last
    weights = rng.uniform(0.5, 1.5, size=(3, 6)).astype(np.float32)
    weights /= weights.sum(1, keepdims=True)
    # Jitted (each jit made inside the piece loop traces with that piece size): op by op,
    # the while loops compiled operation by operation cost ~40 s.
    one = jax.jit(lambda g, w: spectral.top_eigenvalues_trailing(g[:, :, None], w)[0])
    expected = np.array([[one(grams[a, :, :, k], weights[0]) for k in range(13)]
                         for a in range(3)])
    own = np.array([[one(grams[a, :, :, k], weights[a]) for k in range(13)] for a in range(3)])
    for piece in (8192, 5):   # one piece; pieces of 5, 5, 3 (the last overlapping)
      with mock.patch.object(spectral, "_STACK_PIECE", piece):
        shared = jax.jit(jax.vmap(spectral.top_eigenvalues_trailing, (0, None)))(
            grams, weights[0])
        np.testing.assert_allclose(shared, expected, rtol=1e-6)
        batched = jax.jit(jax.vmap(spectral.top_eigenvalues_trailing))(grams, weights)
        np.testing.assert_allclose(batched, own, rtol=1e-6)
        nested = jax.jit(jax.vmap(jax.vmap(spectral.top_eigenvalues_trailing, (0, None)),
                                  (0, None)))(grams[:, None], weights[0])
        np.testing.assert_allclose(nested[:, 0], expected, rtol=1e-6)
        matrices = np.moveaxis(grams, -1, 1)                    # [3, 13, m, m]
        largest = jax.jit(jax.vmap(jax.vmap(spectral.largest_eigenvalue)))(matrices)
        np.testing.assert_allclose(largest, np.linalg.eigvalsh(matrices.astype(np.float64))
                                   [..., -1], rtol=1e-5)
    # No derivative (a stop_gradient), not an error, through the custom batching rule.
    grad = jax.grad(lambda g: spectral.top_eigenvalues_trailing(g, weights[0]).sum())(grams[0])
    np.testing.assert_array_equal(grad, 0)

  def test_top_eigenvalues_of_a_trailing_stack(self):
    # Batch-last Grams [m, m, b] with shared weights: the top eigenvalue of each weighted
    # covariance, against numpy's d-space covariance in float64 (ties and a duplicated row,
    # n > d, a constant column, rows far from the origin).
    rng = np.random.default_rng(3)
    m, d = 7, 5
    rows = rng.normal(size=(6, m, d))
    rows[1, -1] = rows[1, 0]                       # a duplicated row
    rows[2, :, 2] = 4.0                            # a constant column
    rows[3] += 1e3                                 # far from the origin
    rows[4] = np.round(rows[4])                    # ties
    rows[5] = 0.0                                  # every row at the mean
    weights = rng.uniform(0.5, 1.5, size=m)
    weights /= weights.sum()
    grams = np.einsum("bid,bjd->ijb", rows, rows)
    got = np.asarray(spectral.top_eigenvalues_trailing(jnp.asarray(grams, jnp.float32),
                                                       jnp.asarray(weights, jnp.float32)))
    chex.assert_shape(got, (6,))
    for b, x in enumerate(rows):
      centred = x - weights @ x
      exact = np.linalg.eigvalsh(centred.T @ (weights[:, None] * centred))[-1]
      scale = np.abs(grams[:, :, b]).max()
      self.assertLessEqual(abs(got[b] - exact), 64 * m * np.finfo(np.float32).eps * scale, b)
    np.testing.assert_allclose(spectral.top_eigenvalue(jnp.asarray(np.moveaxis(grams, -1, 0)),
                                                       jnp.asarray(weights)), got, rtol=1e-6)


def _psd_cases(m, rng):
  """Symmetric PSD matrices with the structures a covariance Gram can have."""
  wide = rng.normal(size=(m, 3 * m))
  narrow = rng.normal(size=(m, 4))                       # rank 4 (n > d)
  spike = rng.normal(size=m)
  duplicated = rng.normal(size=(m, 2 * m))
  duplicated[1] = duplicated[0]
  return {"wishart (clustered top)": wide @ wide.T / (3 * m),
          "separated top": wide @ wide.T / (3 * m) + 4 * np.outer(spike, spike) / m,
          "rank 4": narrow @ narrow.T, "duplicated row": duplicated @ duplicated.T,
          "identity (all tied)": np.eye(m), "zero": np.zeros((m, m)),
          "huge": wide @ wide.T * 1e33, "tiny": wide @ wide.T * 1e-33}


class CertifiedTopEigenpairTest(parameterized.TestCase):
  """Lanczos + a Cholesky certificate against numpy's float64 eigh: the value within the
  certificate's slack (16 m eps max|M|) plus rounding, the vector a unit vector whose
  Rayleigh quotient is as large, and the top eigenvector itself where the top is separated."""

  def check(self, top, matrix, name):
    dtype = matrix.dtype
    m = matrix.shape[0]
    value, vector = (np.asarray(v) for v in top(jnp.asarray(matrix)))
    chex.assert_shape(vector, (m,))
    self.assertEqual(value.dtype, dtype)
    exact_values, exact_vectors = np.linalg.eigh(matrix.astype(np.float64))
    scale = np.abs(matrix.astype(np.float64)).max()
    bound = 32 * m * np.finfo(dtype).eps * scale
    self.assertLessEqual(abs(float(value) - exact_values[-1]), bound, name)
    v = vector.astype(np.float64)
    self.assertAlmostEqual(float(v @ v), 1.0, delta=1e-4, msg=name)
    rayleigh = v @ matrix.astype(np.float64) @ v
    self.assertGreaterEqual(rayleigh, exact_values[-1] - 2 * bound, name)
    gap = exact_values[-1] - exact_values[-2]
    if gap > 0.05 * exact_values[-1]:
      self.assertGreater(abs(v @ exact_vectors[:, -1]), 1 - 1e-4, name)

  @chex.variants(with_jit=True)
  @parameterized.product(m=(5, 40, 130), dtype=("float32", "float64"))
  def test_matches_numpy(self, m, dtype):
    rng = np.random.default_rng(m)
    with jax.enable_x64(dtype == "float64"):
      top = self.variant(spectral.certified_top_eigenpair)
      for name, matrix in _psd_cases(m, rng).items():
        self.check(top, matrix.astype(dtype), f"{name}, m={m}, {dtype}")

  @parameterized.parameters("float32", "float64")
  def test_certificate_holds_without_the_fallback(self, dtype):
    # With the eigh fallback poisoned, the usual matrices still come out right: Lanczos and
    # its certificate alone answered them (the fallback is not what the tests above measure).
    rng = np.random.default_rng(3)
    with jax.enable_x64(dtype == "float64"), pytest.MonkeyPatch.context() as patch:
      patch.setattr(spectral, "_eigh_top", lambda M: (jnp.full((), jnp.nan, M.dtype),
                                                      jnp.full(M.shape[:1], jnp.nan, M.dtype)))
      top = jax.jit(spectral.certified_top_eigenpair)
      for name, matrix in _psd_cases(spectral.LANCZOS_MIN_ROWS, rng).items():
        self.check(top, matrix.astype(dtype), f"{name}, {dtype}")

  def test_falls_back_to_eigh_when_lanczos_misses_the_top(self):
    # One Lanczos step gives the start's Rayleigh quotient, below the top: the certificate
    # must fail and the exact eigh answer come back, also for some matrices of a vmapped batch.
    rng = np.random.default_rng(0)
    m = 30
    cases = _psd_cases(m, rng)
    batch = np.stack([cases["separated top"], cases["rank 4"], cases["zero"]]).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(spectral, "_LANCZOS_MAX_STEPS", 1)
      patch.setattr(spectral, "_LANCZOS_CHECK_EVERY", 1)
      top = jax.jit(spectral.certified_top_eigenpair)
      for name, matrix in zip(("separated top", "rank 4", "zero"), batch):
        self.check(top, matrix, name)
      values, _ = jax.jit(jax.vmap(spectral.certified_top_eigenpair))(jnp.asarray(batch))
      exact = np.linalg.eigvalsh(batch.astype(np.float64))[:, -1]
      np.testing.assert_allclose(values, exact, rtol=1e-5, atol=1e-6)

  def test_start_orthogonal_to_the_top_eigenvector(self):
    # The top eigenvector is orthogonal to the fixed start, so the Krylov space holds it only
    # through rounding: either Lanczos finds it that way or the certificate sends it to eigh.
    m = 64
    rng = np.random.default_rng(1)
    start = np.asarray(spectral._lanczos_start(m, jnp.float32), np.float64)
    v = rng.normal(size=m)
    v -= (v @ start) * start
    v /= np.linalg.norm(v)
    rest = rng.normal(size=(m, m))
    projector = np.eye(m) - np.outer(v, v)
    matrix = 10 * np.outer(v, v) + projector @ (rest @ rest.T / m) @ projector
    self.check(jax.jit(spectral.certified_top_eigenpair), matrix.astype(np.float32), "orthogonal")

  def test_top_eigenpair_switches_at_the_threshold(self):
    # Through top_eigenpair (the weighted, centred covariance in Gram space) both sides of
    # LANCZOS_MIN_ROWS agree with numpy's d-space covariance.
    for n in (spectral.LANCZOS_MIN_ROWS - 1, spectral.LANCZOS_MIN_ROWS + 3):
      rng = np.random.default_rng(n)
      x = rng.normal(size=(n, 12)) + 5.0
      x[: n // 5] += 6 * rng.normal(size=12)
      weights = rng.uniform(0.5, 1.5, size=n)
      weights /= weights.sum()
      with jax.enable_x64(True):
        top = jax.jit(spectral.top_eigenpair)(jnp.asarray(x @ x.T), jnp.asarray(weights))
      z = x - weights @ x
      values, vectors = np.linalg.eigh((weights[:, None] * z).T @ z)
      np.testing.assert_allclose(float(top.value), values[-1], rtol=1e-10)
      exact = z @ vectors[:, -1]
      np.testing.assert_allclose(np.abs(np.asarray(top.projections)), np.abs(exact),
                                 rtol=1e-7, atol=1e-8)


class SortingTest(parameterized.TestCase):

  @parameterized.parameters(*range(1, 41))
  def test_network_sorts_every_zero_one_input(self, n):
    # The 0-1 principle: a comparator network sorts everything iff it sorts every 0-1 input.
    # All 2^n inputs for small n; 4096 random ones (plus the sorted and reversed) beyond.
    rng = np.random.default_rng(n)
    if n <= 12:
      inputs = np.array(list(itertools.product((0, 1), repeat=n)), np.int8)
    else:
      inputs = (rng.random((4096, n)) < rng.random((4096, 1))).astype(np.int8)
    values = inputs.T.copy()
    for a, b in sorting.batcher_comparators(n):
      low, high = np.minimum(values[a], values[b]), np.maximum(values[a], values[b])
      values[a], values[b] = low, high
    np.testing.assert_array_equal(values.T, np.sort(inputs, axis=1))

  @parameterized.parameters(*itertools.product((2, 7, 16, 33), ((0,), "median", "all")))
  def test_order_statistics_match_numpy_sort_with_nan_as_inf(self, n, which):
    x = helpers.random_rows(n, n, 50)
    x[0, :5] = np.nan
    x[-1, 5:10] = -np.inf
    positions = {"median": sorting.median_positions(n), "all": tuple(range(n))}.get(which, which)
    out = jax.jit(lambda v: sorting.order_statistics(list(v), positions))(jnp.asarray(x))
    expected = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
    for k, p in enumerate(positions):
      np.testing.assert_array_equal(out[k], expected[p])

  def test_pruned_network_keeps_only_what_the_positions_need(self):
    full = sorting.batcher_comparators(32)
    pruned = sorting.pruned_comparators(32, sorting.median_positions(32))
    self.assertLess(len(pruned), len(full))
    self.assertTrue(set(pruned) <= set(full))

  def test_mean_closest_to(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 64)).astype(np.float32)
    center = rng.normal(size=64).astype(np.float32)
    ordered = sorting.order_statistics(list(jnp.asarray(x)))
    out = sorting.mean_closest_to(ordered, jnp.asarray(center), 6)
    nearest = np.argsort(np.abs(x - center), axis=0, kind="stable")[:6]
    expected = np.take_along_axis(x, nearest, 0).mean(0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  pytest.main([__file__])
