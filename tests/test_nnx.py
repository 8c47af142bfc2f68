"""Flax NNX models with flagjax, the two documented routes (README, "Flax NNX"):

1. the simulator: ``nnx.split`` the model into ``graphdef`` and ``params`` once, write the loss
   on ``params`` with ``nnx.merge`` inside, and pass a per-worker dropout key (``has_rng``);
2. ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` with a ``tx`` that starts with
   ``flagjax.aggregate``, updated with stacked per-worker gradients (``nnx.vmap`` of
   ``nnx.grad``).

Both give the same step as a hand-written loop. A model with
BatchNorm keeps its statistics per worker (``has_state``).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import flagjax
from flagjax import aggregators
from flagjax import attacks
from flagjax import sim

N, F, PER_WORKER = 8, 2, 16


class DropoutCNN(nnx.Module):
  """A small CNN for 8x8 digits with dropout (so each worker needs its own key)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.dropout = nnx.Dropout(0.25)
    self.head = nnx.Linear(4 * 4 * 4, 10, rngs=rngs)

  def __call__(self, images, rngs=None):
    x = nnx.max_pool(jax.nn.relu(self.conv(images)), window_shape=(2, 2), strides=(2, 2))
    x = self.dropout(x, rngs=rngs, deterministic=rngs is None)
    return self.head(x.reshape(x.shape[0], -1))


def digits_batches(steps):
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(labels), size=(N, PER_WORKER))
    yield {"image": images[idx], "label": labels[idx]}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class SimulatorRouteTest(chex.TestCase):

  def test_nnx_cnn_with_dropout_trains_and_matches_a_plain_step(self):
    model = DropoutCNN(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, batch, rng):
      logits = nnx.merge(graphdef, params)(batch["image"], rngs=rng)
      return cross_entropy(logits, batch["label"])

    lr = 0.5
    tx = optax.chain(flagjax.aggregate(aggregators.trimmed_mean, f=F, num_workers=N),
                     optax.sgd(lr))
    batches = list(digits_batches(40))
    # (The backends' agreement with per-worker keys is tests/test_federated.py's.)
    step = sim.make_train_step(loss_fn, tx, num_workers=N, num_byzantine=F,
                               attack=attacks.sign_flip, has_rng=True)

    # One step by hand: every worker's grad with its own dropout key, sign flip, trimmed mean.
    batch = batches[0]
    rngs = jax.random.split(sim.split_step_key(jax.random.key(0)).workers, N)
    grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0)))(params, batch, rngs)
    flat = np.concatenate([np.asarray(g).reshape(N, -1) for g in jax.tree.leaves(grads)], 1)
    flat[N - F:] = -flat[:N - F].mean(0)
    expected = np.sort(flat, axis=0)[F:N - F].mean(0)
    p1, _, _ = step(params, tx.init(params), batch, jax.random.key(0))
    moved = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel()
                            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1))])
    np.testing.assert_allclose(moved / lr, expected, rtol=1e-4, atol=1e-6)

    # Training helps: the honest loss falls over 40 steps under the attack.
    p, s, losses = params, tx.init(params), []
    for i, batch in enumerate(batches):
      p, s, metrics = step(p, s, batch, jax.random.key(i))
      losses.append(float(metrics["honest_loss"]))
    self.assertLess(np.mean(losses[-5:]), 0.8 * np.mean(losses[:5]))
    # The trained params go back into the model with nnx.update.
    nnx.update(model, p)
    chex.assert_trees_all_close(nnx.state(model, nnx.Param), p)


class OptimizerRouteTest(chex.TestCase):

  def test_nnx_optimizer_with_stacked_gradients(self):
    model = DropoutCNN(rngs=nnx.Rngs(1))
    # A copy: the split state shares its Variables with the model, which the update mutates.
    params0 = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    tx = optax.chain(flagjax.aggregate(aggregators.median), optax.sgd(0.2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    batch = next(digits_batches(1))

    def loss(model, batch):
      return cross_entropy(model(batch["image"]), batch["label"])

    @nnx.jit
    def train_step(model, optimizer, batch):
      stacked = nnx.vmap(nnx.grad(loss), in_axes=(None, 0))(model, batch)  # [n, ...] leaves
      optimizer.update(model, stacked)

    train_step(model, optimizer, batch)
    # The same step by hand: per-worker grads (no dropout without rngs), coordinate median.
    graphdef = nnx.graphdef(model)
    grads = jax.vmap(jax.grad(lambda p, b: loss(nnx.merge(graphdef, p), b)),
                     in_axes=(None, 0))(params0, batch)
    expected = jax.tree.map(lambda p, g: p - 0.2 * np.median(np.asarray(g), axis=0),
                            params0, grads)
    chex.assert_trees_all_close(nnx.state(model, nnx.Param), expected, rtol=1e-5, atol=1e-6)


class BatchNormCNN(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(8 * 8 * 4, 10, rngs=rngs)

  def __call__(self, images):
    x = jax.nn.relu(self.norm(self.conv(images)))
    return self.head(x.reshape(x.shape[0], -1))


class BatchStatsTest(chex.TestCase):

  def test_batch_statistics_are_carried_per_worker(self):
    model = BatchNormCNN(rngs=nnx.Rngs(2))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params, stats, batch):
      model = nnx.merge(graphdef, params, stats, copy=True)
      loss = cross_entropy(model(batch["image"]), batch["label"])
      return loss, nnx.state(model, nnx.BatchStat)

    lr = 0.2
    tx = optax.chain(flagjax.aggregate(aggregators.median), optax.sgd(lr))
    step = sim.make_train_step(loss_fn, tx, num_workers=N, num_byzantine=F,
                               attack=attacks.sign_flip, has_state=True)
    per_worker = jax.tree.map(lambda a: jnp.broadcast_to(a, (N,) + a.shape), stats)
    p, s, worker_stats = params, tx.init(params), per_worker
    batches = list(digits_batches(2))
    for i, batch in enumerate(batches):
      p, s, _, worker_stats = step(p, s, batch, jax.random.key(i), worker_stats)

    # By hand: each worker's grads and statistics from its own batches, the median step.
    grad_fn = jax.jit(jax.vmap(jax.grad(loss_fn, has_aux=True), in_axes=(None, 0, 0)))
    q, expected_stats = params, per_worker
    for batch in batches:
      grads, expected_stats = grad_fn(q, expected_stats, batch)
      honest_mean = jax.tree.map(lambda g: g[:N - F].mean(0), grads)
      grads = jax.tree.map(lambda g, m: g.at[N - F:].set(-m), grads, honest_mean)
      q = jax.tree.map(lambda w, g: w - lr * np.median(np.asarray(g), axis=0), q, grads)
    chex.assert_trees_all_close(p, q, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(worker_stats, expected_stats, rtol=1e-5, atol=1e-6)
    # Workers saw different batches: their running means differ.
    mean = np.asarray(jax.tree.leaves(worker_stats)[0])
    self.assertGreater(float(np.abs(mean[0] - mean[1]).max()), 1e-4)
