"""Federated settings of the simulator against hand-written loops of plain JAX / numpy.

Local training (FedAvg deltas), client sampling, a declared f that differs from the true one,
auxiliary outputs and per-worker keys, each on every backend; and the bad inputs the step and
the aggregator refuse.
"""

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
from flagjax import sim
from tests.test_sim import BACKENDS
from tests.test_sim import IN_DIM
from tests.test_sim import OUT_DIM
from tests.test_sim import linear_loss
from tests.test_sim import regression_batch
from tests.test_sim import true_regression_params
from tests.test_sim import zero_params


def flat(params):
  return np.concatenate([np.asarray(params["w"]).ravel(), np.asarray(params["b"])])


def unflat(vector):
  return {"w": jnp.asarray(vector[:IN_DIM * OUT_DIM].reshape(IN_DIM, OUT_DIM)),
          "b": jnp.asarray(vector[IN_DIM * OUT_DIM:])}


plain_grad = jax.jit(jax.grad(linear_loss))  # plain JAX, jitted: the oracle loops run eagerly


def linear_grad(params, batch):
  """Plain JAX: the gradient of the loss on one batch, flattened."""
  return flat(plain_grad(params, batch))


def np_trimmed_mean(rows, f):
  ordered = np.sort(rows, axis=0)
  return ordered[f:rows.shape[0] - f].mean(0)


def run_backends(loss_fn, tx, batches, backends=BACKENDS, **kwargs):
  """``{backend: (params, opt_state, metrics)}`` after the given steps from zero params."""
  results = {}
  for backend in backends:
    step = sim.make_train_step(loss_fn, tx, backend=backend, **kwargs)
    params, opt_state = zero_params(), tx.init(zero_params())
    for i, batch in enumerate(batches):
      params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    results[backend] = (params, opt_state, metrics)
  return results


class LocalStepsTest(chex.TestCase):
  """FedAvg: each worker sends ``params - local_params`` after k local SGD steps."""

  def test_matches_a_plain_loop_on_every_backend(self):
    n, f, k, local_lr, server_lr, steps = 8, 2, 3, 0.05, 0.7, 2
    true = true_regression_params(7)
    # Leaves [n, k, per_micro_batch, ...]: one micro-batch per local step.
    batches = []
    for i in range(steps):
      flat_batch = regression_batch(50 + i, n * k, 4, true, noise=0.2)
      batches.append({key: v.reshape((n, k) + v.shape[1:]) for key, v in flat_batch.items()})
    tx = optax.chain(flagjax.aggregate(aggregators.trimmed_mean, f=f), optax.sgd(server_lr))
    results = run_backends(linear_loss, tx, batches, num_workers=n, num_byzantine=f,
                           attack=attacks.sign_flip, local_steps=k, local_optimizer=local_lr)

    params = zero_params()
    for batch in batches:
      first_losses = [float(jax.jit(linear_loss)(params, {key: v[i, 0] for key, v in batch.items()}))
                      for i in range(n - f)]
      deltas = []
      for i in range(n):
        local = params
        for j in range(k):
          micro = {key: v[i, j] for key, v in batch.items()}
          local = jax.tree.map(lambda p, g: p - local_lr * g, local,
                               plain_grad(local, micro))
        deltas.append(flat(params) - flat(local))
      rows = np.stack(deltas).astype(np.float64)
      rows[n - f:] = -rows[:n - f].mean(0)  # sign flip of the honest deltas' mean
      params = unflat((flat(params) - server_lr * np_trimmed_mean(rows, f)).astype(np.float32))
    for backend in BACKENDS:
      chex.assert_trees_all_close(results[backend][0], params, rtol=1e-4, atol=1e-5)
      # The loss reported is the honest workers' first local step's, at the incoming params.
      np.testing.assert_allclose(results[backend][2]["honest_loss"], np.mean(first_losses),
                                 rtol=1e-5)

  def test_one_local_sgd_step_of_rate_one_is_the_gradient(self):
    # One local step (k = 1) of SGD at rate 1: the delta is the gradient, so the run equals
    # the plain gradient step (up to rounding of p - (p - g)).
    n, f = 8, 1
    batch = regression_batch(60, n, 4, true_regression_params(8))
    micro = {key: v[:, None] for key, v in batch.items()}
    tx = optax.chain(flagjax.aggregate(aggregators.mean), optax.sgd(0.1))
    plain = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f)
    local = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f,
                                local_optimizer=optax.sgd(1.0))
    params, state = zero_params(), tx.init(zero_params())
    chex.assert_trees_all_close(local(params, state, micro, jax.random.key(0))[0],
                                plain(params, state, batch, jax.random.key(0))[0],
                                rtol=1e-5, atol=1e-6)

  def test_batch_without_the_local_axis_is_refused(self):
    n = 8
    tx = optax.chain(flagjax.aggregate(aggregators.mean), optax.sgd(0.1))
    step = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=1,
                               local_steps=3)
    batch = regression_batch(61, n, 4, true_regression_params())  # [n, 4, ...]: 4 != 3
    with self.assertRaisesRegex(ValueError, r"\[num_workers, local_steps=3, \.\.\.\]"):
      step(zero_params(), tx.init(zero_params()), batch, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "local_steps >= 1"):
      sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=1, local_steps=0)
    with self.assertRaisesRegex(ValueError, "local_optimizer as an optax"):
      sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=1, local_steps=2,
                          local_optimizer="sgd")


class ClientSamplingTest(chex.TestCase):

  def test_sampled_rows_match_a_plain_loop_on_every_backend(self):
    n, f, m, lr = 8, 2, 5, 0.3
    true = true_regression_params(9)
    batches = [regression_batch(70 + i, n, 4, true, noise=0.1) for i in range(3)]
    tx = optax.chain(flagjax.aggregate(aggregators.mean, num_workers=m), optax.sgd(lr))
    results = run_backends(linear_loss, tx, batches, num_workers=n, num_byzantine=f,
                           attack=attacks.sign_flip, clients_per_round=m)
    params = zero_params()
    for i, batch in enumerate(batches):
      rows = np.stack([linear_grad(params, {key: v[w] for key, v in batch.items()})
                       for w in range(n)]).astype(np.float64)
      rows[n - f:] = -rows[:n - f].mean(0)  # the attack sees every honest worker
      clients = np.sort(np.asarray(
          jax.random.permutation(sim.split_step_key(jax.random.key(i)).clients, n))[:m])
      params = unflat((flat(params) - lr * rows[clients].mean(0)).astype(np.float32))
    for backend in BACKENDS:
      got, _, metrics = results[backend]
      chex.assert_trees_all_close(got, params, rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(metrics["clients"], clients)
      chex.assert_shape(metrics["coefficients"], (m,))

  def test_rounds_hold_a_varying_number_of_byzantine_workers(self):
    n, f, m = 8, 3, 4
    counts, seen = set(), set()
    for i in range(40):
      key = sim.split_step_key(jax.random.key(i)).clients
      clients = np.sort(np.asarray(jax.random.permutation(key, n))[:m])
      self.assertLen(set(clients.tolist()), m)
      counts.add(int(np.sum(clients >= n - f)))
      seen.update(clients.tolist())
    self.assertEqual(seen, set(range(n)))  # every worker, Byzantine ones too, is sampled
    self.assertGreater(len(counts), 2)     # 0..3 Byzantine rows in a round
    self.assertTrue(counts <= set(range(0, min(f, m) + 1)))

  def test_bounds(self):
    tx = optax.chain(flagjax.aggregate(aggregators.mean), optax.sgd(0.1))
    for m in (0, 9):
      with self.assertRaisesRegex(ValueError, "1 <= clients_per_round <= num_workers"):
        sim.make_train_step(linear_loss, tx, num_workers=8, num_byzantine=1,
                            clients_per_round=m)


class DeclaredByzantineTest(chex.TestCase):

  def test_rule_built_without_f_takes_the_declared_count(self):
    # One Byzantine worker, a defender who declares three: trimming 3 per side.
    n, f, declared, lr = 8, 1, 3, 0.5
    batch = regression_batch(80, n, 4, true_regression_params(10), noise=0.3)
    pre_and_rule = aggregating.process(
        flagjax.preaggregate(preaggregators.nnm),
        flagjax.aggregate(aggregators.trimmed_mean), optax.sgd(lr))
    results = run_backends(linear_loss, pre_and_rule, [batch], num_workers=n,
                           num_byzantine=f, attack=attacks.sign_flip,
                           declared_byzantine=declared)
    rows = np.stack([linear_grad(zero_params(), {key: v[w] for key, v in batch.items()})
                     for w in range(n)]).astype(np.float64)
    rows[n - f:] = -rows[:n - f].mean(0)
    # NNM with the declared f: each row becomes the mean of its n - f nearest rows.
    distances = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    mixed = np.stack([rows[np.argsort(distances[i], kind="stable")[:n - declared]].mean(0)
                      for i in range(n)])
    expected = -lr * np_trimmed_mean(mixed, declared)
    for backend in BACKENDS:
      np.testing.assert_allclose(flat(results[backend][0]), expected, rtol=1e-4, atol=1e-6)

  def test_missing_and_contradicting_f_are_refused(self):
    n = 8
    batch = regression_batch(81, n, 4, true_regression_params())
    params = zero_params()
    without_f = optax.chain(flagjax.aggregate(aggregators.krum), optax.sgd(0.1))
    step = sim.make_train_step(linear_loss, without_f, num_workers=n, num_byzantine=1)
    with self.assertRaisesRegex(ValueError, r"aggregate\(krum\) needs f"):
      step(params, without_f.init(params), batch, jax.random.key(0))
    with_f = optax.chain(flagjax.aggregate(aggregators.krum, f=1), optax.sgd(0.1))
    step = sim.make_train_step(linear_loss, with_f, num_workers=n, num_byzantine=1,
                               declared_byzantine=2)
    with self.assertRaisesRegex(ValueError, r"built with f=1 but declared_byzantine=2"):
      step(params, with_f.init(params), batch, jax.random.key(0))


def dropout_loss(params, batch, rng):
  """Linear regression with dropout on the inputs; aux: the kept fraction and the loss."""
  keep = jax.random.bernoulli(rng, 0.7, batch["x"].shape)
  x = jnp.where(keep, batch["x"] / 0.7, 0.0)
  loss = jnp.mean((x @ params["w"] + params["b"] - batch["y"]) ** 2)
  return loss, {"kept": jnp.mean(keep.astype(jnp.float32)), "loss": loss}


class AuxAndRngTest(chex.TestCase):

  def test_per_worker_keys_and_aux_match_a_plain_loop_on_both_layouts(self):
    # (pmap runs the same per-device program as shard_map; each key-drawing step compiles
    # for ~2 s on 2 cores, so this one checks vmap and shard_map.)
    n, f, lr = 8, 2, 0.2
    batch = regression_batch(90, n, 6, true_regression_params(11), noise=0.1)
    tx = optax.chain(flagjax.aggregate(aggregators.median), optax.sgd(lr))
    results = run_backends(dropout_loss, tx, [batch], backends=("vmap", "shard_map"),
                           num_workers=n, num_byzantine=f, attack=attacks.alie, has_aux=True,
                           has_rng=True)
    rngs = jax.random.split(sim.split_step_key(jax.random.key(0)).workers, n)
    # Plain JAX: every worker's gradient with its own key (vmap of grad, one compilation).
    grads, aux = jax.jit(jax.vmap(jax.grad(dropout_loss, has_aux=True), in_axes=(None, 0, 0)))(
        zero_params(), batch, rngs)
    rows = np.concatenate([np.asarray(grads["w"]).reshape(n, -1), np.asarray(grads["b"])],
                          1).astype(np.float64)
    kept = np.asarray(aux["kept"])
    vmap_params, _, vmap_metrics = results["vmap"]
    np.testing.assert_allclose(vmap_metrics["aux"]["kept"], kept, rtol=1e-6)
    chex.assert_shape(vmap_metrics["aux"]["loss"], (n,))
    self.assertGreater(len(set(kept)), 1)  # the workers' keys differ
    params_b, _, metrics = results["shard_map"]
    chex.assert_trees_all_close(params_b, vmap_params, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(metrics["aux"], vmap_metrics["aux"], rtol=1e-5)
    # The aggregate is the coordinate-wise median of the honest rows and ALIE's rows.
    honest = rows[:n - f]
    byzantine = np.asarray(jax.tree.leaves(attacks.alie(jnp.asarray(honest, jnp.float32), f,
                                                        None))[0], np.float64)
    expected = -lr * np.median(np.concatenate([honest, byzantine]), axis=0)
    np.testing.assert_allclose(flat(vmap_params), expected, rtol=1e-4, atol=1e-6)


class BadInputTest(chex.TestCase):

  def test_a_tx_without_aggregator_is_refused(self):
    step = sim.make_train_step(linear_loss, optax.sgd(0.1), num_workers=8, num_byzantine=1)
    batch = regression_batch(0, 8, 2, true_regression_params())
    with self.assertRaisesRegex(ValueError, r"tx returned an update of shape \(8, 3\) for a "
                                r"parameter of shape \(3,\)"):
      step(zero_params(), optax.sgd(0.1).init(zero_params()), batch, jax.random.key(0))

  def test_updates_that_do_not_fit_params_are_refused(self):
    tx = flagjax.aggregate(aggregators.mean)
    params = jnp.zeros(3)
    with self.assertRaisesRegex(ValueError, r"update leaf of shape \[5, 4\] for a parameter of "
                                r"shape \[3\]"):
      tx.update(jnp.ones((5, 4)), tx.init(params), params)
    with self.assertRaisesRegex(ValueError, r"update leaf of shape \[3\] for a parameter of "
                                r"shape \[3\]"):
      tx.update(jnp.ones(3), tx.init(params), params)
    with self.assertRaisesRegex(ValueError, "tree structure"):
      tx.update({"a": jnp.ones((5, 3))}, tx.init(params), params)

  def test_unknown_hyperparameters_are_refused_when_built(self):
    with self.assertRaisesRegex(ValueError, r"unknown hyperparameter\(s\) ff"):
      flagjax.aggregate(aggregators.krum, ff=1)
    with self.assertRaisesRegex(ValueError, r"unknown hyperparameter\(s\) f; flag takes"):
      flagjax.aggregate(aggregators.flag, f=1)

  @parameterized.parameters(
      (aggregators.krum, {"f": 1}, None), (aggregators.trimmed_mean, {"f": 1}, 8),
      (aggregators.flag, {}, None), (aggregators.flag, {}, 8),
      (aggregators.centered_clipping, {}, 8))
  def test_state_shapes_are_fixed_by_init_and_hold_no_nan(self, rule, hparams, num_workers):
    tx = optax.chain(flagjax.aggregate(rule, num_workers=num_workers, **hparams),
                     optax.sgd(0.1))
    params = zero_params()
    state = tx.init(params)
    rows = jax.tree.map(lambda p: jnp.ones((8,) + p.shape) * jnp.arange(8.0).reshape(
        (8,) + (1,) * p.ndim), params)
    _, new_state = jax.eval_shape(tx.update, rows, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    for leaf in jax.tree.leaves(state):
      self.assertFalse(np.any(np.isnan(np.asarray(leaf))))
    # ...so lax.scan can carry it over steps.
    def body(carry, _):
      p, s = carry
      updates, s = tx.update(rows, s, p)
      return (optax.apply_updates(p, updates), s), None
    (_, final), _ = jax.lax.scan(body, (params, state), None, length=2)
    for leaf in jax.tree.leaves(final):
      self.assertTrue(np.all(np.isfinite(np.asarray(leaf))))


class CompilesOnceTest(chex.TestCase):

  def test_step_without_num_workers_compiles_once(self):
    # The aggregator's state no longer changes shape at the first update ([0] -> [n]).
    tx = optax.chain(flagjax.aggregate(aggregators.krum, f=1), optax.sgd(0.1))
    step = sim.make_train_step(linear_loss, tx, num_workers=8, num_byzantine=1)
    params, state = zero_params(), tx.init(zero_params())
    for i in range(3):
      params, state, _ = step(params, state, regression_batch(i, 8, 2, true_regression_params()),
                              jax.random.key(i))
    self.assertEqual(step._cache_size(), 1)


class CoordinateShardingTest(chex.TestCase):
  """The public sharded calling convention in one's own shard_map, through process()."""

  def test_own_shard_map_equals_the_stacked_update(self):
    n, f = 8, 1
    rows = np.random.default_rng(3).normal(size=(n, IN_DIM * OUT_DIM + OUT_DIM))
    stacked = jax.vmap(unflat)(jnp.asarray(rows, jnp.float32))
    params = zero_params()
    tx = aggregating.process(flagjax.preaggregate(preaggregators.nnm, f=f),
                             flagjax.aggregate(aggregators.krum, f=f), optax.sgd(0.5))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("workers",))

    def device_update(local_rows, state, params):
      shards = sim.to_coordinate_shards(local_rows, 8, "workers")
      return tx.update(shards, state, params, **sim.coordinate_sharding(params, 8, "workers"))

    update = jax.jit(jax.shard_map(device_update, mesh=mesh,
                                   in_specs=(P("workers"), P(), P()), out_specs=(P(), P())))
    sharded, _ = update(stacked, tx.init(params), params)
    expected, _ = jax.jit(tx.update)(stacked, tx.init(params), params)
    chex.assert_trees_all_close(sharded, expected, rtol=1e-5, atol=1e-6)


class PlainJitShardingTest(chex.TestCase):

  def test_vmap_step_on_a_batch_sharded_over_workers_matches(self):
    # The plain-jit route: the vmap backend's step on a batch placed over the devices along
    # the worker axis; XLA partitions it, the numbers match the unsharded batch.
    n, f = 8, 1
    batch = regression_batch(95, n, 4, true_regression_params(12))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("workers",))
    sharded = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("workers")))
    tx = optax.chain(flagjax.aggregate(aggregators.krum, f=f, num_workers=n), optax.sgd(0.1))
    step = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f,
                               attack=attacks.sign_flip)
    params, state = zero_params(), tx.init(zero_params())
    chex.assert_trees_all_close(step(params, state, sharded, jax.random.key(0))[0],
                                step(params, state, batch, jax.random.key(0))[0],
                                rtol=1e-6, atol=1e-7)


def running_mean_loss(params, state, batch):
  """A BatchNorm-like model: inputs centred by a running mean kept in the model state."""
  batch_mean = jnp.mean(batch["x"], axis=0)
  new_state = {"mean": 0.9 * state["mean"] + 0.1 * batch_mean}
  x = batch["x"] - new_state["mean"]
  loss = jnp.mean((x @ params["w"] + params["b"] - batch["y"]) ** 2)
  return loss, new_state


class ModelStateTest(chex.TestCase):
  """Model state carried per worker, never aggregated, on every backend and in local steps."""

  def test_per_worker_state_matches_a_plain_loop_on_every_backend(self):
    n, f, lr, steps = 8, 2, 0.1, 2
    true = true_regression_params(13)
    batches = [regression_batch(100 + i, n, 4, true, noise=0.1) for i in range(steps)]
    # The Byzantine workers' inputs are far off: their running means must stay theirs.
    for batch in batches:
      batch["x"][n - f:] += 50.0
    tx = optax.chain(flagjax.aggregate(aggregators.trimmed_mean, f=f), optax.sgd(lr))
    state0 = {"mean": jnp.zeros((n, IN_DIM))}
    results = {}
    for backend in BACKENDS:
      step = sim.make_train_step(running_mean_loss, tx, num_workers=n, num_byzantine=f,
                                 attack=attacks.sign_flip, backend=backend, has_state=True)
      params, opt_state, state = zero_params(), tx.init(zero_params()), state0
      for i, batch in enumerate(batches):
        params, opt_state, _, state = step(params, opt_state, batch, jax.random.key(i), state)
      results[backend] = (params, state)

    grad_fn = jax.jit(jax.grad(running_mean_loss, has_aux=True))
    params, states = zero_params(), [np.zeros(IN_DIM) for _ in range(n)]
    for batch in batches:
      rows = []
      for w in range(n):
        worker = {key: v[w] for key, v in batch.items()}
        grad, new = grad_fn(params, {"mean": jnp.asarray(states[w], jnp.float32)}, worker)
        rows.append(flat(grad))
        states[w] = np.asarray(new["mean"])
      rows = np.stack(rows).astype(np.float64)
      rows[n - f:] = -rows[:n - f].mean(0)
      params = unflat((flat(params) - lr * np_trimmed_mean(rows, f)).astype(np.float32))
    for backend in BACKENDS:
      got_params, got_state = results[backend]
      chex.assert_trees_all_close(got_params, params, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got_state["mean"], np.stack(states), rtol=1e-5, atol=1e-6)
    # Honest workers' statistics never saw the Byzantine inputs.
    self.assertLess(float(np.abs(results["vmap"][1]["mean"][:n - f]).max()), 5.0)

  def test_state_threads_through_local_steps_and_shapes_are_checked(self):
    n, f, k, lr = 4, 1, 3, 0.05
    flat_batch = regression_batch(110, n * k, 4, true_regression_params(14))
    batch = {key: v.reshape((n, k) + v.shape[1:]) for key, v in flat_batch.items()}
    tx = optax.chain(flagjax.aggregate(aggregators.mean), optax.sgd(1.0))
    step = sim.make_train_step(running_mean_loss, tx, num_workers=n, num_byzantine=f,
                               local_steps=k, local_optimizer=lr, has_state=True)
    state0 = {"mean": jnp.zeros((n, IN_DIM))}
    params, _, _, state = step(zero_params(), tx.init(zero_params()), batch,
                               jax.random.key(0), state0)
    grad_fn = jax.jit(jax.grad(running_mean_loss, has_aux=True))
    deltas, means = [], []
    for w in range(n):
      local, worker_state = zero_params(), {"mean": jnp.zeros(IN_DIM)}
      for j in range(k):
        grad, worker_state = grad_fn(local, worker_state, {key: v[w, j] for key, v in
                                                           batch.items()})
        local = jax.tree.map(lambda p, g: p - lr * g, local, grad)
      deltas.append(-flat(local))
      means.append(np.asarray(worker_state["mean"]))
    np.testing.assert_allclose(flat(params), -np.mean(deltas, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["mean"], np.stack(means), rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "model_state leaves with leading axis"):
      step(zero_params(), tx.init(zero_params()), batch, jax.random.key(0),
           {"mean": jnp.zeros((n + 1, IN_DIM))})
    with self.assertRaisesRegex(ValueError, "server_batch with has_state"):
      sim.make_train_step(running_mean_loss, tx, num_workers=n, num_byzantine=f,
                          has_state=True, server_batch={key: v[0] for key, v in batch.items()})
