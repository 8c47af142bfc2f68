"""flagjax.aggregate and the per-worker transforms under optax, against numpy training loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P
from optax.experimental import aggregating

import flagjax
from flagjax import aggregators
from flagjax import attacks
from flagjax import preaggregators
from tests import helpers

KEY = jax.random.key(0)
N = 7
SHAPES = {"b": (7,), "w": (3, 5)}  # 22 coordinates; neither leaf divides into 8 shards
AXIS = "coords"


# ---------------------------------------------------------------------------------------------
# numpy oracles from DESIGN.md (rows are flat vectors: the pytree's leaves concatenated).


def np_mean(x):
  return x.mean(0)


def np_trimmed_mean(x, f):
  return np.sort(x, axis=0)[f:len(x) - f].mean(0)


def np_krum(x, f):
  n = len(x)
  scores = []
  for i in range(n):
    d = sorted(np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i)
    scores.append(sum(d[:n - f - 2]))
  return x[int(np.argmin(scores))]


def np_centered_clipping(x, center, tau, num_iters):
  v = center.copy()
  for _ in range(num_iters):
    diff = x - v
    norms = np.linalg.norm(diff, axis=1)
    scale = np.minimum(1.0, tau / np.maximum(norms, 1e-30))
    v = v + (diff * scale[:, None]).mean(0)
  return v


def np_nnm(x, f):
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  return np.stack([x[np.argsort(d[i], kind="stable")[:len(x) - f]].mean(0)
                   for i in range(len(x))])


NP_RULES = {
    "mean": (aggregators.mean, {}, np_mean),
    "trimmed_mean": (aggregators.trimmed_mean, {"f": 2}, lambda x: np_trimmed_mean(x, 2)),
    "krum": (aggregators.krum, {"f": 2}, lambda x: np_krum(x, 2)),
}


# ---------------------------------------------------------------------------------------------
# The workers: quadratic losses 0.5 |params - target_i|^2, so g_i = params - target_i.


def targets(seed=0):
  rng = np.random.default_rng(seed)
  t = rng.normal(size=(N, 22)).astype(np.float32)
  t[-1] += 20.0  # one far-off worker
  return t


def flat(tree):
  return np.concatenate([np.asarray(tree[k]).reshape(-1) for k in sorted(SHAPES)])


def unflat(vector):
  out, start = {}, 0
  for k in sorted(SHAPES):
    size = int(np.prod(SHAPES[k]))
    out[k] = np.asarray(vector[start:start + size], np.float32).reshape(SHAPES[k])
    start += size
  return out


def stacked_grads(params, t):
  """Worker gradients ``[N, *leaf]`` per leaf (a pytree shaped like params, stacked)."""
  rows = flat(params)[None] - t
  return jax.tree.map(lambda *r: np.stack(r), *[unflat(r) for r in rows])


def run_natural(tx, t, steps, params=None, **extra):
  params = unflat(np.zeros(22)) if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(stacked_grads(params, t), state, params, **extra)
    params = optax.apply_updates(params, updates)
  return params, state


# ---------------------------------------------------------------------------------------------
# A small coordinate-sharded harness: what flagjax.sim does across devices.


def _num_devices():
  return helpers.NUM_DEVICES


def _shard_size(size):
  return -(-size // _num_devices())


def to_padded_rows(tree):
  """Leaves ``[n, *shape]`` -> ``[n, 8 * s]`` flattened, zero-padded (split 8 ways later)."""
  def leaf_fn(leaf):
    n, size = leaf.shape[0], int(np.prod(leaf.shape[1:]))
    padded = np.zeros((n, _num_devices() * _shard_size(size)), leaf.dtype)
    padded[:, :size] = leaf.reshape(n, size)
    return padded
  return jax.tree.map(leaf_fn, tree)


def make_gather_scatter(params):
  def gather(shards):
    def leaf_fn(shard, p):
      full = jax.lax.all_gather(shard, AXIS, axis=shard.ndim - 1, tiled=True, to="invarying")
      return full[..., :p.size].reshape(full.shape[:-1] + p.shape)
    return jax.tree.map(leaf_fn, shards, params)

  def scatter(tree):
    def leaf_fn(leaf, p):
      lead = leaf.shape[:leaf.ndim - p.ndim]
      s = _shard_size(p.size)
      flat_leaf = leaf.reshape(lead + (p.size,))
      flat_leaf = jnp.pad(flat_leaf, [(0, 0)] * len(lead) + [(0, _num_devices() * s - p.size)])
      return jax.lax.dynamic_slice_in_dim(flat_leaf, jax.lax.axis_index(AXIS) * s, s,
                                          axis=flat_leaf.ndim - 1)
    return jax.tree.map(leaf_fn, tree, params)
  return gather, scatter


def run_sharded(tx, t, steps):
  params = unflat(np.zeros(22))
  state = tx.init(params)
  mesh = helpers.coordinate_mesh()

  def device_update(rows, state, params):
    gather, scatter = make_gather_scatter(params)
    return tx.update(rows, state, params, axis_name=AXIS, gather=gather, scatter=scatter,
                     key=KEY)

  update = jax.jit(jax.shard_map(device_update, mesh=mesh,
                                 in_specs=(P(None, AXIS), P(), P()), out_specs=(P(), P())))
  for _ in range(steps):
    updates, state = update(to_padded_rows(stacked_grads(params, t)), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


class AggregateTest(chex.TestCase):

  @parameterized.parameters(*NP_RULES)
  def test_chain_sgd_several_steps_matches_numpy(self, name):
    rule, hparams, oracle = NP_RULES[name]
    t, lr, steps = targets(), 0.3, 4
    params, state = run_natural(optax.chain(flagjax.aggregate(rule, num_workers=N, **hparams),
                                            optax.sgd(lr)), t, steps)
    p = np.zeros(22)
    for _ in range(steps):
      grads = p[None] - t
      aggregate = oracle(grads)
      p = p - lr * aggregate
    np.testing.assert_allclose(flat(params), p, rtol=1e-5, atol=1e-5)
    agg_state = state[0]
    self.assertIsInstance(agg_state, flagjax.AggregateState)
    np.testing.assert_allclose(agg_state.aggregate_norm, np.linalg.norm(aggregate), rtol=1e-5)
    coefficients = np.asarray(agg_state.coefficients)
    if name == "trimmed_mean":  # not Gram-space: nothing to report, and no NaN placeholder
      chex.assert_shape(coefficients, (0,))
    else:
      chex.assert_shape(coefficients, (N,))
      np.testing.assert_allclose(coefficients @ grads, aggregate, rtol=1e-5, atol=1e-5)
      if name == "mean":
        np.testing.assert_allclose(coefficients, np.full(N, 1 / N), rtol=1e-6)
      else:
        self.assertEqual(sorted(coefficients.tolist()), [0.0] * (N - 1) + [1.0])

  def test_gram_space_coefficients_reconstruct_the_aggregate(self):
    grads = stacked_grads(unflat(np.zeros(22)), targets(1))
    for rule, hparams in ((aggregators.geometric_median, {}), (aggregators.flag, {"rank": 3}),
                          (aggregators.multi_krum, {"f": 2}), (aggregators.monna, {"f": 2})):
      tx = flagjax.aggregate(rule, num_workers=N, **hparams)
      state = tx.init(unflat(np.zeros(22)))
      out, state, direct = jax.jit(lambda g, s: (*tx.update(g, s), rule(g, **hparams)))(
          grads, state)
      chex.assert_trees_all_close(out, direct, rtol=1e-5, atol=1e-5)
      c = np.asarray(state.coefficients)
      self.assertTrue(np.all(np.isfinite(c)), msg=rule.__name__)
      np.testing.assert_allclose(c @ (-targets(1)), flat(out), rtol=1e-4, atol=1e-4)

  def test_process_pre_nnm_then_adam(self):
    t, lr, steps, f = targets(2), 0.05, 3, 1
    tx = aggregating.process(flagjax.preaggregate(preaggregators.nnm, f=f),
                             flagjax.aggregate(aggregators.trimmed_mean, f=f),
                             optax.adam(lr))
    self.assertIsInstance(tx, aggregating.Aggregator)
    params, _ = run_natural(tx, t, steps)
    p, m, v = np.zeros(22), np.zeros(22), np.zeros(22)
    for step in range(1, steps + 1):
      g = np_trimmed_mean(np_nnm(p[None] - t, f), f)
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * g ** 2
      p = p - lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    np.testing.assert_allclose(flat(params), p, rtol=1e-4, atol=1e-5)

  # One step takes the one-pass path (distances to the centre), two the Gram path.
  @parameterized.parameters(1, 2)
  def test_centered_clipping_keeps_the_previous_aggregate(self, num_iters):
    t, lr, steps, tau = targets(3), 0.5, 3, 1.0
    tx = optax.chain(flagjax.aggregate(aggregators.centered_clipping, tau=tau,
                                       num_iters=num_iters, num_workers=N),
                     optax.sgd(lr))
    params = unflat(np.zeros(22))
    state = tx.init(params)
    np.testing.assert_array_equal(flat(state[0].previous_aggregate), np.zeros(22))
    update = jax.jit(tx.update)
    p, center = np.zeros(22), np.zeros(22)
    for _ in range(steps):
      grads = stacked_grads(params, t)
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      g = p[None] - t
      expected = np_centered_clipping(g, center, tau, num_iters)
      # The state's centre is exactly this step's aggregate; the coefficients rebuild it from
      # the rows and the previous centre.
      np.testing.assert_allclose(flat(state[0].previous_aggregate), expected, rtol=1e-5,
                                 atol=1e-5)
      np.testing.assert_allclose(-flat(updates) / lr, expected, rtol=1e-5, atol=1e-5)
      c = np.asarray(state[0].coefficients)
      chex.assert_shape(c, (N,))
      residual = expected - c @ g
      # What the rows do not explain is a multiple of the previous centre.
      if np.linalg.norm(center) > 0:
        scale = residual @ center / (center @ center)
        np.testing.assert_allclose(residual, scale * center, atol=1e-4)
      else:
        np.testing.assert_allclose(residual, 0, atol=1e-5)
      p, center = p - lr * expected, expected
    np.testing.assert_allclose(flat(params), p, rtol=1e-5, atol=1e-5)

  def test_fixed_center_is_stateless(self):
    center = unflat(np.full(22, 0.5))
    tx = flagjax.aggregate(aggregators.centered_clipping, center=center, tau=1.0)
    state = tx.init(unflat(np.zeros(22)))
    self.assertIsNone(state.previous_aggregate)
    grads = stacked_grads(unflat(np.zeros(22)), targets(4))
    out, _ = tx.update(grads, state)
    np.testing.assert_allclose(flat(out), np_centered_clipping(-targets(4), np.full(22, 0.5),
                                                               1.0, 3), rtol=1e-5, atol=1e-5)

  def test_worker_momentum_matches_numpy_loop(self):
    t, lr, steps, beta = targets(5), 0.2, 4, 0.8
    tx = optax.chain(flagjax.aggregate(aggregators.trimmed_mean, f=2, worker_momentum=beta,
                                       num_workers=N), optax.sgd(lr))
    params, state = run_natural(tx, t, steps)
    p, m = np.zeros(22), np.zeros((N, 22))
    for _ in range(steps):
      m = beta * m + (1 - beta) * (p[None] - t)
      p = p - lr * np_trimmed_mean(m, 2)
    np.testing.assert_allclose(flat(params), p, rtol=1e-5, atol=1e-5)
    momentum = state[0].worker_momentum
    chex.assert_shape(momentum["w"], (N, 3, 5))
    np.testing.assert_allclose(np.concatenate([momentum["b"], momentum["w"].reshape(N, 15)], 1),
                               m, rtol=1e-5, atol=1e-5)

  def test_worker_momentum_before_bucketing_in_the_pre_slot(self):
    t, lr, steps, beta = targets(6)[:6], 0.2, 3, 0.5
    pre = optax.chain(flagjax.worker_momentum(beta, num_workers=6),
                      flagjax.preaggregate(preaggregators.bucketing, s=2))
    tx = aggregating.process(pre, flagjax.aggregate(aggregators.mean, num_workers=3),
                             optax.sgd(lr))
    params = unflat(np.zeros(22))
    state = tx.init(params)
    update = jax.jit(tx.update)
    p, m = np.zeros(22), np.zeros((6, 22))
    for step in range(steps):
      updates, state = update(stacked_grads(params, t), state, params, key=jax.random.key(step))
      params = optax.apply_updates(params, updates)
      self.assertEqual(state[1].coefficients.shape, (3,))  # three buckets reached the mean
      m = beta * m + (1 - beta) * (p[None] - t)
      p = p - lr * m.mean(0)  # buckets of equal size: their mean is the momenta's mean
    np.testing.assert_allclose(flat(params), p, rtol=1e-5, atol=1e-5)

  def test_preaggregate_passes_the_key(self):
    grads = stacked_grads(unflat(np.zeros(22)), targets(7))
    lossy = flagjax.preaggregate(attacks.lossy(0.5))
    tx = optax.chain(lossy, flagjax.aggregate(aggregators.mean))
    state = tx.init(unflat(np.zeros(22)))
    out, _ = jax.jit(tx.update)(grads, state, key=KEY)
    dropped = attacks.lossy(0.5)(grads, KEY)
    chex.assert_trees_all_close(out, aggregators.mean(dropped), rtol=1e-6)
    with self.assertRaisesRegex(ValueError, r"preaggregate\(lossy\) needs a jax.random key"):
      tx.update(grads, state)

  def test_scan_with_num_workers_keeps_the_state_shape(self):
    t = targets(8)
    tx = optax.chain(flagjax.aggregate(aggregators.krum, f=2, num_workers=N), optax.sgd(0.1))
    params = unflat(np.zeros(22))
    state0 = tx.init(params)

    target_rows = stacked_grads(unflat(np.zeros(22)), -t)  # leaves [N, *shape] of the t_i

    def body(carry, _):
      params, state = carry
      grads = jax.tree.map(lambda p, tt: p[None] - tt, params, target_rows)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=3))((params, state0))
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    p = np.zeros(22)
    for _ in range(3):
      p = p - 0.1 * np_krum(p[None] - t, 2)
    np.testing.assert_allclose(flat(params), p, rtol=1e-5, atol=1e-5)

  def test_errors(self):
    grads = stacked_grads(unflat(np.zeros(22)), targets(9))
    params = unflat(np.zeros(22))
    with self.assertRaisesRegex(ValueError, r"aggregate\(mean\) needs num_workers=n with "
                                            r"worker_momentum"):
      flagjax.aggregate(aggregators.mean, worker_momentum=0.9)
    with self.assertRaisesRegex(ValueError, r"needs 0 <= worker_momentum < 1"):
      flagjax.aggregate(aggregators.mean, worker_momentum=1.0, num_workers=N)
    with self.assertRaisesRegex(ValueError, "built with num_workers=5, got n=7"):
      tx = flagjax.aggregate(aggregators.mean, num_workers=5)
      tx.update(grads, tx.init(params))
    # The rule's own bound, raised when update is traced (krum: n >= 2f + 3).
    tx = flagjax.aggregate(aggregators.krum, f=3)
    with self.assertRaisesRegex(ValueError, r"krum needs n >= 2\*f \+ 3, got n=7, f=3"):
      jax.jit(tx.update)(grads, tx.init(params))
    with self.assertRaisesRegex(ValueError, "needs gather= and scatter= with axis_name="):
      tx = flagjax.aggregate(aggregators.mean)
      tx.update(grads, tx.init(params), axis_name=AXIS)
    with self.assertRaisesRegex(ValueError, "gets axis_name at update time"):
      flagjax.aggregate(aggregators.mean, axis_name=AXIS)
    with self.assertRaisesRegex(ValueError, "worker_momentum needs num_workers"):
      flagjax.worker_momentum(0.9, num_workers=0)

  @parameterized.named_parameters(
      ("mean", aggregators.mean, {}),
      ("trimmed_mean", aggregators.trimmed_mean, {"f": 2}),
      ("krum", aggregators.krum, {"f": 2}),
      ("centered_clipping", aggregators.centered_clipping, {"tau": 1.0, "num_iters": 2}),
      # Solved on one device and shared (gram_lib.solve_once).
      ("mda", aggregators.mda, {"f": 2}),
      ("momentum", aggregators.trimmed_mean, {"f": 2, "worker_momentum": 0.5,
                                              "num_workers": N}),
  )
  def test_sharded_equals_natural(self, rule, hparams):
    t, steps = targets(10), 3
    tx = optax.chain(flagjax.aggregate(rule, **hparams), optax.sgd(0.3))
    natural_params, natural_state = run_natural(tx, t, steps)
    sharded_params, sharded_state = run_sharded(tx, t, steps)
    chex.assert_trees_all_close(sharded_params, natural_params, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(sharded_state, natural_state, rtol=1e-4, atol=1e-5)
