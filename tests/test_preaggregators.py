"""Pre-aggregators (NNM, bucketing, clipping, ARC) against numpy oracles, and composed rules."""

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from flagjax import aggregators
from flagjax import preaggregators
from tests import helpers
from tests.helpers import finite_mask
from tests.helpers import np_sq_distances


# ----------------------------------------------------------------------------- numpy oracles


def np_nnm(x, f):
  """Row i -> mean of its n-f nearest rows (itself first, ties to the lowest index)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  D = np_sq_distances(x)
  np.fill_diagonal(D, -1)
  out = np.empty_like(x)
  for i in range(n):
    out[i] = x[np.argsort(D[i], kind="stable")[:n - f]].mean(0)
    if not finite_mask(x[i:i + 1])[0]:
      out[i] = np.nan
  return out


def np_bucketing(x, s, perm):
  x = np.asarray(x, np.float64)[np.asarray(perm)]
  return np.stack([x[b:b + s].mean(0) for b in range(0, x.shape[0], s)])


def np_clip_to(x, threshold):
  """x_i * min(1, threshold / |x_i|); non-finite rows unchanged."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  for i, row in enumerate(x):
    norm = np.linalg.norm(row)
    if np.isfinite(norm) and norm > threshold:
      out[i] = row * threshold / norm
  return out


def np_arc(x, f):
  n = x.shape[0]
  k = math.floor(2 * (f / n) * (n - f))
  norms = np.linalg.norm(np.asarray(x, np.float64), axis=1)
  norms = np.where(np.isfinite(norms), norms, np.inf)
  return np_clip_to(x, np.sort(norms)[::-1][k])


def _arc_scale(x, f, axis_name=None):
  """ARC's per-row scale, computed directly (for the whole-array reference)."""
  from flagjax.core import gram as gram_lib
  n = jax.tree.leaves(x)[0].shape[0]
  norms = gram_lib.row_norms(x, axis_name=axis_name)
  ranked = jnp.where(jnp.isfinite(norms), norms, jnp.inf)
  threshold = jnp.sort(ranked)[::-1][(2 * f * (n - f)) // n]
  return gram_lib.clip_scale(norms, threshold)


def random_rotation(seed, d):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def assert_rows_close(actual, expected, rtol=1e-5, atol=1e-5, err_msg=""):
  """Finite where expected is finite, non-finite where expected is not."""
  actual = np.asarray(actual, np.float64)
  bad = ~finite_mask(expected)
  np.testing.assert_array_equal(~finite_mask(actual), bad, err_msg=err_msg)
  np.testing.assert_allclose(actual[~bad], expected[~bad], rtol=rtol, atol=atol,
                             err_msg=err_msg)


# ------------------------------------------------------------------- shared compiled maps

N, D, F, S, C = 9, 8, 3, 4, 2.0
KEY = jax.random.key(0)
NNM = jax.jit(preaggregators.nnm, static_argnames=("f",))
BUCKETING = jax.jit(preaggregators.bucketing, static_argnames=("s",))
CLIP = jax.jit(preaggregators.clip)
ARC = jax.jit(preaggregators.arc, static_argnames=("f",))


def permutation(key, n):
  """The bucketing permutation: the definition draws it as jax.random.permutation(key, n)."""
  return np.asarray(jax.random.permutation(key, n))


STANDARD = {
    "nnm": (lambda x: NNM(x, f=F), lambda x: np_nnm(x, F)),
    "bucketing": (lambda x: BUCKETING(x, s=S, key=KEY),
                  lambda x: np_bucketing(x, S, permutation(KEY, x.shape[0]))),
    "clip": (lambda x: CLIP(x, C), lambda x: np_clip_to(x, C)),
    "arc": (lambda x: ARC(x, f=F), lambda x: np_arc(x, F)),
}


def standard_rows(seed, dtype=np.float32):
  x = helpers.random_rows(seed, N, D, dtype)
  x[1] *= 4.0   # an outlier, so that neighbours and clipping are not trivial
  return x


def run_rows_sharded(fn, x):
  """Like ``helpers.run_coordinate_sharded`` for maps ``[n, d] -> [n', d]`` (rows kept)."""
  sharded = jax.shard_map(lambda xs: fn(xs, axis_name="coords"),
                          mesh=helpers.coordinate_mesh(), in_specs=P(None, "coords"),
                          out_specs=P(None, "coords"))
  return jax.jit(sharded)(x)


# ------------------------------------------------------------------------------- unit tests

class PreaggregatorsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_against_numpy(self):
    x = standard_rows(0)
    perm = permutation(KEY, N)
    out = self.variant(preaggregators.nnm, static_argnums=1)(x, F)
    chex.assert_shape(out, (N, D))
    np.testing.assert_allclose(out, np_nnm(x, F), rtol=1e-5, atol=1e-6)
    out = self.variant(preaggregators.bucketing, static_argnums=1)(x, S, KEY)
    chex.assert_shape(out, (3, D))
    np.testing.assert_allclose(out, np_bucketing(x, S, perm), rtol=1e-5, atol=1e-6)
    out = self.variant(preaggregators.clip)(x, C)
    np.testing.assert_allclose(out, np_clip_to(x, C), rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(np.linalg.norm(out, axis=1) <= C * (1 + 1e-6)))
    out = self.variant(preaggregators.arc, static_argnums=1)(x, F)
    np.testing.assert_allclose(out, np_arc(x, F), rtol=1e-5, atol=1e-6)

  def test_edge_cases(self):
    x = standard_rows(1)
    perm = permutation(KEY, N)
    np.testing.assert_allclose(BUCKETING(x, s=1, key=KEY), x[perm])
    np.testing.assert_allclose(BUCKETING(x, s=N, key=KEY), x.mean(0, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    # 9 rows in buckets of 4: sizes 4, 4, 1 (the last bucket is smaller).
    last = BUCKETING(x, s=S, key=KEY)[-1]
    np.testing.assert_allclose(last, x[perm[-1]], rtol=1e-6)
    other = BUCKETING(x, s=S, key=jax.random.key(1))
    self.assertFalse(np.allclose(other, BUCKETING(x, s=S, key=KEY)))
    np.testing.assert_allclose(NNM(x, f=0), np.broadcast_to(x.mean(0), (N, D)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ARC(x, f=0), x)   # k = 0: nothing is clipped
    np.testing.assert_allclose(CLIP(x, 1e9), x)
    np.testing.assert_allclose(CLIP(x, 0.0), np.zeros_like(x))
    np.testing.assert_allclose(CLIP(np.zeros_like(x), C), np.zeros_like(x))

  def test_pytree_equals_concatenated_leaves(self):
    tree = {"w": helpers.random_rows(40, N, 12).reshape(N, 3, 4),
            "b": helpers.random_rows(41, N, 2)}
    tree["w"][0] += 5.0
    flat = np.concatenate([tree["w"].reshape(N, -1), tree["b"]], axis=1)
    for name, (fn, oracle) in STANDARD.items():
      out = fn(tree)
      rows = out["b"].shape[0]
      chex.assert_shape([out["w"], out["b"]], [(rows, 3, 4), (rows, 2)])
      got = np.concatenate([np.reshape(out["w"], (rows, -1)), out["b"]], axis=1)
      np.testing.assert_allclose(got, oracle(flat), rtol=1e-5, atol=1e-5, err_msg=name)

  def test_vmap_over_batch(self):
    x = np.stack([standard_rows(50 + b) for b in range(3)])
    keys = jax.random.split(KEY, 3)
    np.testing.assert_allclose(
        jax.vmap(lambda b, k: BUCKETING(b, s=S, key=k))(x, keys),
        np.stack([np_bucketing(b, S, permutation(k, N)) for b, k in zip(x, keys)]),
        rtol=1e-5, atol=1e-6)
    for name in ("nnm", "clip", "arc"):
      fn, oracle = STANDARD[name]
      np.testing.assert_allclose(jax.vmap(fn)(x), np.stack([oracle(b) for b in x]),
                                 rtol=1e-5, atol=1e-5, err_msg=name)

  def test_bfloat16_and_float64(self):
    x = standard_rows(60)
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    for name, (fn, oracle) in STANDARD.items():
      out = fn(jnp.asarray(x, jnp.bfloat16))
      self.assertEqual(out.dtype, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(out, np.float32), oracle(xb), rtol=2e-2,
                                 atol=2e-2, err_msg=name)
    with jax.enable_x64(True):
      x64 = standard_rows(61, np.float64)
      for name, (fn, oracle) in STANDARD.items():
        out = fn(x64)
        self.assertEqual(out.dtype, jnp.float64)
        np.testing.assert_allclose(out, oracle(x64), rtol=1e-10, atol=1e-12, err_msg=name)

  def test_bounds(self):
    x = helpers.random_rows(0, 6, 3)
    with self.assertRaisesRegex(ValueError, r"nnm needs n > 2\*f, got n=6, f=3"):
      preaggregators.nnm(x, 3)
    with self.assertRaisesRegex(ValueError, r"arc needs n > 2\*f, got n=6, f=3"):
      preaggregators.arc(x, 3)
    with self.assertRaisesRegex(ValueError, "arc needs f >= 0"):
      preaggregators.arc(x, -1)
    with self.assertRaisesRegex(ValueError, r"bucketing needs s >= 1, got s=0"):
      preaggregators.bucketing(x, 0, KEY)
    with self.assertRaisesRegex(ValueError, "bucketing needs s as a static Python int"):
      preaggregators.bucketing(x, 2.5, KEY)
    with self.assertRaisesRegex(ValueError, r"clip needs c >= 0, got c=-1.0"):
      preaggregators.clip(x, -1.0)

  def test_nonfinite_rows_stay_non_finite_and_do_not_spread(self):
    bad_rows = [0, 4, 8]
    x = standard_rows(70)
    bad = helpers.poison(x, rows=bad_rows)
    expected = {"nnm": np_nnm(bad, F), "clip": np_clip_to(bad, C), "arc": np_arc(bad, F)}
    for name in ("nnm", "clip", "arc"):
      out = np.asarray(STANDARD[name][0](bad))
      # Exactly the poisoned rows are non-finite; every other row matches the oracle.
      np.testing.assert_array_equal(~finite_mask(out), np.isin(np.arange(N), bad_rows),
                                    err_msg=name)
      assert_rows_close(out, expected[name], err_msg=name)
    # NNM: a finite row's n - f = 6 nearest rows are exactly the 6 honest ones.
    honest = np.delete(x, bad_rows, axis=0)
    out = np.asarray(NNM(bad, f=F))
    np.testing.assert_allclose(np.delete(out, bad_rows, axis=0),
                               np.broadcast_to(honest.mean(0), honest.shape),
                               rtol=1e-5, atol=1e-6)
    # ARC clips to an honest norm: the poisoned rows count as the largest.
    k = math.floor(2 * (F / N) * (N - F))
    threshold = np.sort(np.linalg.norm(honest, axis=1))[::-1][k - len(bad_rows)]
    out = np.asarray(ARC(bad, f=F))
    np.testing.assert_allclose(np.delete(out, bad_rows, axis=0),
                               np_clip_to(honest, threshold), rtol=1e-5, atol=1e-6)
    # Bucketing: a bucket is non-finite exactly when it holds a poisoned row.
    perm = permutation(KEY, N)
    out = np.asarray(BUCKETING(bad, s=S, key=KEY))
    holds_bad = [np.isin(perm[b:b + S], bad_rows).any() for b in range(0, N, S)]
    np.testing.assert_array_equal(~finite_mask(out), holds_bad)
    assert_rows_close(out, np_bucketing(bad, S, perm))

  def test_equivariances(self):
    with jax.enable_x64(True):
      x = standard_rows(80, np.float64)
      perm = np.random.default_rng(81).permutation(N)
      Q = random_rotation(82, D)
      for name in ("nnm", "clip", "arc"):
        fn = STANDARD[name][0]
        out = np.asarray(fn(x))
        # Permutation equivariance: permuting the workers permutes the output rows.
        np.testing.assert_allclose(fn(x[perm]), out[perm], rtol=1e-10, atol=1e-12,
                                   err_msg=name)
        # Rotation equivariance: only the Gram / norms are used.
        np.testing.assert_allclose(fn(x @ Q), out @ Q, rtol=1e-10, atol=1e-12, err_msg=name)
      # NNM is also translation equivariant.
      shift = 3.0 * helpers.random_rows(83, 1, D, np.float64)
      np.testing.assert_allclose(NNM(x + shift, f=F), np_nnm(x, F) + shift, rtol=1e-10)
      # Bucketing with s | n keeps the mean of the rows.
      np.testing.assert_allclose(BUCKETING(x, s=3, key=KEY).mean(0), x.mean(0), rtol=1e-10)

  def test_coordinate_sharded_matches_unsharded(self):
    x = standard_rows(90)
    bad = helpers.poison(x, rows=[2])

    def all_maps(t, axis_name=None):
      return {"nnm": preaggregators.nnm(t, F, axis_name=axis_name),
              "bucketing": preaggregators.bucketing(t, S, KEY, axis_name=axis_name),
              "clip": preaggregators.clip(t, C, axis_name=axis_name),
              "arc": preaggregators.arc(t, F, axis_name=axis_name)}
    for rows in (x, bad):
      sharded = run_rows_sharded(all_maps, rows)
      for name, (fn, _) in STANDARD.items():
        np.testing.assert_allclose(sharded[name], fn(rows), rtol=1e-5, atol=1e-5,
                                   err_msg=name)

  def test_arc_rewrites_only_its_clipped_rows_bit_for_bit(self):
    # Large leaves take the in-place row path (preaggregators._rescale_rows): its output must
    # be the whole-array multiply's bit for bit, on nasty rows, in every way it is called.
    n, f = 9, 3                                  # k = 4 of 9 rows clipped
    d = preaggregators.ROW_UPDATE_MIN_SIZE        # the smallest leaf that takes the row path
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=(n, 1))).astype(np.float32)
    x[2] = x[3]                                  # a duplicated row: tied norms
    x[4, : d // 2] = 1e30                         # huge finite values (the norm is finite)
    x[5] = 0.0                                   # a zero row
    x[6, 7] = np.nan                             # a Byzantine NaN row
    tree = {"big": x, "small": x[:, :16].copy()}  # a small leaf takes the fused multiply

    def whole(t, axis_name=None):  # the reference: every row multiplied by its scale
      return preaggregators._scale_rows(t, _arc_scale(t, f, axis_name))

    def arc(t, axis_name=None):
      return preaggregators.arc(t, f, axis_name=axis_name)

    expected = jax.tree.map(np.asarray, jax.jit(whole)(tree))
    self.assertFalse(np.array_equal(expected["big"][4], x[4]))  # row 4 is clipped
    barrier = lambda t: jax.tree.map(lambda v: jax.lax.optimization_barrier(v * 1), t)
    stacked = jax.tree.map(lambda v: np.stack([v, v[::-1]]), tree)
    cases = {
        "jit": (jax.jit(arc)(tree), expected),
        "donated": (jax.jit(arc, donate_argnums=0)(jax.tree.map(jnp.array, tree)), expected),
        "inside a jit": (jax.jit(lambda t: arc(barrier(t)))(tree), expected),
        "vmap": (jax.jit(jax.vmap(arc))(stacked), jax.jit(jax.vmap(whole))(stacked)),
        # Sharded, the psum-ed norms round differently: the reference is sharded too.
        "sharded": (run_rows_sharded(arc, x), run_rows_sharded(whole, x)),
    }
    for case, (got, want) in cases.items():
      for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf),
                                      err_msg=case)
    # And the reference is ARC: the numpy oracle (float64) on the two leaves side by side.
    oracle = np_arc(np.concatenate([x, tree["small"]], axis=1), f)
    assert_rows_close(expected["big"], oracle[:, :d], rtol=1e-5, atol=1e-6)
    assert_rows_close(expected["small"], oracle[:, d:], rtol=1e-5, atol=1e-6)

  def test_composition_with_rules(self):
    x = standard_rows(100)
    bad = helpers.poison(x, rows=[3, 7])
    f = 2
    cases = {
        "trimmed_mean(nnm)": (
            lambda x: aggregators.trimmed_mean(preaggregators.nnm(x, f), f),
            lambda x: np.sort(np_nnm(x, f), axis=0)[f:N - f].mean(0)),
        "median(bucketing)": (
            lambda x: aggregators.median(preaggregators.bucketing(x, 2, KEY)),
            lambda x: np.median(np_bucketing(x, 2, permutation(KEY, N)), axis=0)),
        "geometric_median(arc)": (
            lambda x: aggregators.geometric_median(preaggregators.arc(x, f), max_iters=30,
                                                   tol=0.0), None),
        "mda(clip)": (lambda x: aggregators.mda(preaggregators.clip(x, C), f), None),
        "monna(nnm)": (lambda x: aggregators.monna(preaggregators.nnm(x, f), f), None),
    }
    for name, (fn, oracle) in cases.items():
      fn = jax.jit(fn)
      clean = np.asarray(fn(x))
      chex.assert_shape(clean, (D,))
      if oracle is not None:
        np.testing.assert_allclose(clean, oracle(x), rtol=1e-5, atol=1e-5, err_msg=name)
      out = np.asarray(fn(bad))
      self.assertTrue(np.all(np.isfinite(out)), name)
      if oracle is not None and name != "median(bucketing)":
        np.testing.assert_allclose(out, oracle(np.where(np.isfinite(bad), bad, np.nan)),
                                   rtol=1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------- property tests

# Every n is a new compilation of every rule: 6 cases keep this within the suite's budget.
@hypothesis.settings(max_examples=6)
@hypothesis.given(n=st.integers(3, 40), seed=st.integers(0, 2**16), data=st.data())
def test_property_against_oracles(n, seed, data):
  f = data.draw(st.integers(0, (n - 1) // 2))
  s = data.draw(st.integers(1, n))
  x = helpers.random_rows(seed, n, D) * np.float32(1 + seed % 3)
  key = jax.random.key(seed)
  np.testing.assert_allclose(NNM(x, f=f), np_nnm(x, f), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ARC(x, f=f), np_arc(x, f), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(CLIP(x, C), np_clip_to(x, C), rtol=1e-5, atol=1e-5)
  buckets = BUCKETING(x, s=s, key=key)
  chex.assert_shape(buckets, (math.ceil(n / s), D))
  np.testing.assert_allclose(buckets, np_bucketing(x, s, permutation(key, n)),
                             rtol=1e-5, atol=1e-5)
  # f poisoned rows (same shapes: no new compilation): exactly they stay non-finite.
  bad = helpers.poison(x, rows=range(n - f, n))
  for fn in (lambda x: NNM(x, f=f), lambda x: ARC(x, f=f)):
    out = np.asarray(fn(bad))
    np.testing.assert_array_equal(~finite_mask(out), np.arange(n) >= n - f)
  assert_rows_close(NNM(bad, f=f), np_nnm(bad, f))
  assert_rows_close(ARC(bad, f=f), np_arc(bad, f))
  # Composition: a robust rule after NNM stays finite.
  assert np.all(np.isfinite(aggregators.trimmed_mean(NNM(bad, f=f), f)))
