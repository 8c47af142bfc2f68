"""The worker simulator: numpy oracle of one step, backend agreement, robust training, layout.

Backends are compared on deterministic attacks (ALIE, IPM): a random gradient attack draws
per coordinate shard on the sharded backends (see the ``flagjax.sim`` docstring).
"""

import functools
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from optax.experimental import aggregating

import flagjax
from flagjax import aggregators
from flagjax import attacks
from flagjax import sim
from flagjax.core import gram as gram_lib

BACKENDS = ("vmap", "pmap", "shard_map")
IN_DIM, OUT_DIM = 5, 3  # w has 15 coordinates, b 3: both need zero-padding on 8 devices.


def linear_loss(params, batch):
  prediction = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((prediction - batch["y"]) ** 2)


def regression_batch(seed, num_workers, per_worker, true_params, noise=0.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_workers, per_worker, IN_DIM)).astype(np.float32)
  y = x @ true_params["w"] + true_params["b"]
  y = y + noise * rng.normal(size=y.shape)
  return {"x": x, "y": y.astype(np.float32)}


def true_regression_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(IN_DIM, OUT_DIM)).astype(np.float32),
          "b": rng.normal(size=(OUT_DIM,)).astype(np.float32)}


def zero_params():
  return {"w": jnp.zeros((IN_DIM, OUT_DIM)), "b": jnp.zeros((OUT_DIM,))}


def np_linear_grads(params, batch):
  """Per-worker (loss, dL/dw, dL/db) of the mean squared error, by hand."""
  x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
  residual = x @ params["w"] + params["b"] - y  # [n, m, out]
  scale = 2.0 / (x.shape[1] * y.shape[2])
  loss = np.mean(residual ** 2, axis=(1, 2))
  return loss, scale * np.einsum("nmi,nmo->nio", x, residual), scale * residual.sum(1)


def run_on_every_backend(tx, n, f, batches, backends=BACKENDS, **step_kwargs):
  """``{backend: (params, opt_state, metrics)}`` after the same steps from zero params."""
  params0 = zero_params()
  results = {}
  for backend in backends:
    step = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f,
                               backend=backend, **step_kwargs)
    results[backend] = run_steps(step, params0, tx.init(params0), batches)
  return results


def run_steps(step, params, opt_state, batches, seed=0):
  metrics = None
  for i, batch in enumerate(batches):
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(seed + i))
  return params, opt_state, metrics


RULES = {
    # name: (rule, hyperparameters given n and f)
    "median": (aggregators.median, lambda n, f: {}),
    "trimmed_mean": (aggregators.trimmed_mean, lambda n, f: {"f": f}),
    "krum": (aggregators.krum, lambda n, f: {"f": f}),
    "geometric_median": (aggregators.geometric_median, lambda n, f: {}),
    "flag": (aggregators.flag, lambda n, f: {}),
    "bulyan": (aggregators.bulyan, lambda n, f: {"f": f}),
}


class OneStepOracleTest(chex.TestCase):
  """One step of the vmap backend against a numpy oracle of the DESIGN's step."""

  @parameterized.parameters(None, "sign_flip")
  def test_mean_sgd_step_matches_numpy(self, attack_name):
    n, f, lr = 6, 2, 0.1
    true = true_regression_params(1)
    batch = regression_batch(2, n, 4, true, noise=0.5)
    params = jax.tree.map(lambda a: 0.1 * np.ones_like(a), true)
    attack = None if attack_name is None else attacks.sign_flip
    tx = optax.chain(flagjax.aggregate(aggregators.mean, num_workers=n), optax.sgd(lr))
    step = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f,
                               attack=attack)
    new, _, metrics = step(params, tx.init(params), batch, jax.random.key(0))

    loss, gw, gb = np_linear_grads(params, batch)
    if attack_name == "sign_flip":
      gw[n - f:], gb[n - f:] = -gw[:n - f].mean(0), -gb[:n - f].mean(0)
    expected = {"w": params["w"] - lr * gw.mean(0), "b": params["b"] - lr * gb.mean(0)}
    chex.assert_trees_all_close(new, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["honest_loss"], loss[:n - f].mean(), rtol=1e-5)
    update_norm = np.sqrt(sum(np.sum((np.asarray(new[k]) - params[k]) ** 2) for k in new))
    np.testing.assert_allclose(metrics["update_norm"], update_norm, rtol=1e-4)
    np.testing.assert_allclose(metrics["aggregate_norm"], update_norm / lr, rtol=1e-4)
    np.testing.assert_allclose(metrics["coefficients"], np.full(n, 1 / n), rtol=1e-6)

  def test_data_attack_reaches_only_byzantine_workers(self):
    n, f, lr = 4, 1, 1.0
    true = true_regression_params(3)
    batch = regression_batch(4, n, 3, true)
    params = jax.tree.map(np.zeros_like, true)
    negate_labels = lambda b, key: {"x": b["x"], "y": -b["y"]}
    tx = optax.chain(flagjax.aggregate(aggregators.mean), optax.sgd(lr))
    step = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f,
                               data_attack=negate_labels)
    new, _, metrics = step(params, tx.init(params), batch, jax.random.key(0))
    attacked = {"x": batch["x"], "y": batch["y"].copy()}
    attacked["y"][n - f:] *= -1
    loss, gw, gb = np_linear_grads(params, attacked)
    chex.assert_trees_all_close(new, {"w": -lr * gw.mean(0), "b": -lr * gb.mean(0)},
                                rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["honest_loss"], loss[:n - f].mean(), rtol=1e-5)


class BackendAgreementTest(chex.TestCase):
  """The three backends give the same params after 3 steps under a deterministic attack."""

  @parameterized.named_parameters(
      (f"{rule}_{n}_workers", rule, n, f, attack_name)
      for rule in RULES for n, f, attack_name in ((16, 3, "alie"), (8, 1, "min_max"))
      # 8 workers with min_max (a psum-ed Gram inside the attack): a Gram-space rule.
      if n == 16 or rule == "krum")
  def test_backends_agree(self, rule, n, f, attack_name):
    rule_fn, hparams = RULES[rule]
    # min_max needs the Gram of the honest shards psum-ed: the sharded backends pass axis_name.
    attack = {"alie": attacks.alie, "min_max": attacks.min_max}[attack_name]
    true = true_regression_params(5)
    batches = [regression_batch(10 + i, n, 4, true, noise=0.3) for i in range(3)]
    # num_workers: the state has its final shape from init, so each backend compiles once.
    tx = optax.chain(flagjax.aggregate(rule_fn, num_workers=n, **hparams(n, f)),
                     optax.sgd(0.05))
    # pmap runs shard_map's per-device program: checked on one rule of each family.
    backends = BACKENDS if rule in ("median", "krum", "flag") else ("vmap", "shard_map")
    results = run_on_every_backend(tx, n, f, batches, backends=backends, attack=attack)
    params_vmap, _, metrics_vmap = results["vmap"]
    # The backends differ only in the summation order of K (and of nothing else for the
    # coordinate-wise rules). Flag's IRLS weights 1 / sqrt(sin^2 + eps) amplify that rounding:
    # in float32 flag itself moves ~1e-3 relative when its input's coordinates are permuted.
    atol = 2e-4 if rule == "flag" else 2e-5
    # The same ~1e-3 relative to the largest coefficient (~0.1) for flag's coefficients.
    coefficient_atol = 1e-4 if rule == "flag" else 1e-5
    if rule == "krum":  # a Gram-space rule reports its coefficients: one worker picked
      coefficients = np.asarray(metrics_vmap["coefficients"])
      self.assertEqual(np.count_nonzero(coefficients), 1)
      self.assertEqual(float(coefficients.sum()), 1.0)
    # The attack did something: params moved off zero and differ from the clean mean's step.
    self.assertGreater(float(jnp.abs(params_vmap["w"]).max()), 1e-3)
    for backend in backends[1:]:
      params, opt_state, metrics = results[backend]
      chex.assert_trees_all_close(params, params_vmap, rtol=2e-4, atol=atol)
      np.testing.assert_allclose(metrics["honest_loss"], metrics_vmap["honest_loss"],
                                 rtol=1e-4)
      np.testing.assert_allclose(metrics["coefficients"], metrics_vmap["coefficients"],
                                 rtol=1e-3, atol=coefficient_atol)

  def test_random_data_attack_and_adam_state_agree(self):
    # Data-attack keys are split per worker identically on every backend, so even a random
    # data attack agrees; adam's state comes back in natural layout everywhere.
    n, f = 8, 2
    def noisy_labels(batch, key):
      return {"x": batch["x"], "y": batch["y"] + 3.0 * jax.random.normal(key, batch["y"].shape)}
    true = true_regression_params(6)
    batches = [regression_batch(20 + i, n, 4, true) for i in range(3)]
    tx = aggregating.process(optax.with_extra_args_support(optax.identity()),
                             flagjax.aggregate(aggregators.trimmed_mean, f=f, num_workers=n),
                             optax.adam(0.05))
    results = run_on_every_backend(tx, n, f, batches, data_attack=noisy_labels)
    for backend in ("pmap", "shard_map"):
      chex.assert_trees_all_close(results[backend][:2], results["vmap"][:2],
                                  rtol=2e-4, atol=2e-5)


class ServerBatchTest(chex.TestCase):
  """FLTrust with the server's root batch: its gradient is the trust anchor every step."""

  def test_one_step_matches_numpy_and_backends_agree(self):
    n, f, lr = 8, 2, 0.1
    true = true_regression_params(3)
    batches = [regression_batch(30 + i, n, 4, true, noise=0.2) for i in range(2)]
    server = {k: v[0] for k, v in regression_batch(40, 1, 6, true).items()}
    tx = optax.chain(flagjax.aggregate(aggregators.fltrust, num_workers=n), optax.sgd(lr))
    results = run_on_every_backend(tx, n, f, batches[:1], attack=attacks.sign_flip,
                                   server_batch=server)
    # numpy: worker gradients at zero params, the last f replaced by -mean(honest).
    def np_grads(batch):
      x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
      residual = -y                                   # prediction 0 at zero params
      per_worker = x.shape[-2]
      gw = 2 * np.einsum("...ki,...kj->...ij", x, residual) / (per_worker * OUT_DIM)
      gb = 2 * residual.mean(-2) / OUT_DIM
      return np.concatenate([gw.reshape(gw.shape[:-2] + (-1,)), gb], -1)
    rows = np_grads(batches[0])
    rows[n - f:] = -rows[:n - f].mean(0)
    g0 = np_grads(server)
    trust = np.maximum(rows @ g0 / np.linalg.norm(rows, axis=1) / np.linalg.norm(g0), 0)
    update = (trust * np.linalg.norm(g0) / np.linalg.norm(rows, axis=1)) @ rows / trust.sum()
    expected = -lr * update
    params, _, metrics = results["vmap"]
    got = np.concatenate([np.asarray(params["w"]).ravel(), np.asarray(params["b"])])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    for backend in ("pmap", "shard_map"):
      chex.assert_trees_all_close(results[backend][0], params, rtol=2e-4, atol=2e-6)
    # The sign-flipped workers point against g0: no trust, so the step ignores them.
    clean = (trust[:n - f] * np.linalg.norm(g0) / np.linalg.norm(rows[:n - f], axis=1)
             ) @ rows[:n - f] / trust[:n - f].sum()
    np.testing.assert_allclose(update, clean, rtol=1e-6)
    self.assertTrue(np.all(trust[n - f:] == 0))

  def test_missing_server_update_is_a_clear_error(self):
    tx = flagjax.aggregate(aggregators.fltrust)
    with self.assertRaisesRegex(ValueError, "needs server_update= at update time"):
      tx.update(jnp.ones((4, 3)), tx.init(jnp.zeros(3)))


class RobustTrainingTest(chex.TestCase):
  """12 workers, 4 Byzantine: a robust rule learns the true weights, the mean does not."""

  def _train(self, rule, attack, backend="vmap", num_steps=30):
    n, f = 12, 4
    true = true_regression_params(7)
    tx = optax.chain(rule, optax.sgd(1.0))
    step = sim.make_train_step(linear_loss, tx, num_workers=n, num_byzantine=f,
                               attack=attack, backend=backend, devices=jax.devices()[:4])
    params = zero_params()
    opt_state = tx.init(params)
    for i in range(num_steps):
      batch = regression_batch(100 + i, n, 8, true, noise=0.05)
      params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    error = max(float(np.abs(params[k] - true[k]).max()) for k in true)
    return error, metrics

  @parameterized.parameters(
      ("trimmed_mean", "ipm", "vmap"), ("trimmed_mean", "sign_flip", "shard_map"),
      ("flag", "ipm", "vmap"), ("flag", "sign_flip", "vmap"))
  def test_robust_rule_recovers_true_weights(self, rule_name, attack_name, backend):
    rule = {"trimmed_mean": flagjax.aggregate(aggregators.trimmed_mean, f=4, num_workers=12),
            "flag": flagjax.aggregate(aggregators.flag, num_workers=12)}[rule_name]
    attack = {"ipm": functools.partial(attacks.ipm, eps=4.0),
              "sign_flip": attacks.sign_flip}[attack_name]
    error, metrics = self._train(rule, attack, backend)
    self.assertLess(error, 0.1)  # the noise floor of trimmed/flag estimates is ~0.03
    self.assertLess(float(metrics["honest_loss"]), 0.01)

  def test_mean_fails_under_ipm(self):
    # 8 honest g and 4 copies of -4 g average to -g/3: the mean ascends the loss.
    error, metrics = self._train(flagjax.aggregate(aggregators.mean, num_workers=12),
                                 functools.partial(attacks.ipm, eps=4.0))
    self.assertFalse(error < 1.0)  # also when it diverged to inf/NaN
    self.assertFalse(float(metrics["honest_loss"]) < 1.0)


class LayoutState(NamedTuple):
  padding_mass: jax.Array


def recording_aggregator(rule, seen):
  """An Aggregator (the protocol of ``flagjax.aggregate``) that records, at trace time, the
  shapes its rule receives, and keeps in its state the mass in the padding coordinates."""
  def init(params):
    del params
    return LayoutState(padding_mass=jnp.zeros(()))

  def update(updates, state, params=None, *, axis_name=None, gather=None, scatter=None,
             key=None):
    del state, key
    seen.append(jax.tree.map(jnp.shape, updates))
    if axis_name is None:
      return rule(updates), LayoutState(jnp.zeros(()))
    # Padding mass: zero the real coordinates through scatter(ones) and look at the rest.
    real = scatter(jax.tree.map(jnp.ones_like, params))
    mass = sum(jnp.sum(jnp.where(r == 1, 0, jnp.abs(u)))
               for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(real)))
    return gather(rule(updates)), LayoutState(jax.lax.psum(mass, axis_name))
  return aggregating.Aggregator(init, update)


def compiled_step(step, *args):
  """The step compiled for ``args``: (executable, ``[rows, cols]`` f32 shapes in its HLO)."""
  compiled = jax.jit(step).lower(*args).compile()
  shapes = {tuple(int(v) for v in m.split(","))
            for m in re.findall(r"f32\[(\d+,\d+)\]", compiled.as_text())}
  return compiled, shapes


class LayoutTest(chex.TestCase):
  """No device holds every worker's full gradient: the rule sees ``[n, s]``, ``s = d / 8``."""

  N, F, D = 16, 3, 4099  # "w" has 4099 coordinates: 513 per device after padding to 4104.

  def _setup(self, rule, backend, attack):
    seen = []
    tx = optax.chain(recording_aggregator(rule, seen), optax.sgd(0.1))
    loss_fn = lambda p, b: jnp.sum((p["w"] * b) ** 2) + jnp.sum(p["b"] * b[:3])
    params = {"w": jnp.ones((self.D,)), "b": jnp.ones((3,))}
    batch = np.random.default_rng(0).normal(size=(self.N, self.D)).astype(np.float32)
    step = sim.make_train_step(loss_fn, tx, num_workers=self.N, num_byzantine=self.F,
                               attack=attack, backend=backend)
    args = (params, tx.init(params), batch, jax.random.key(0))
    compiled, shapes = compiled_step(step, *args)
    return seen, compiled(*args), shapes, params, batch

  @parameterized.parameters("shard_map", "pmap")
  def test_no_device_holds_every_full_gradient(self, backend):
    n, f, d = self.N, self.F, self.D
    gaussian_attack = lambda honest, f, key, axis_name=None: jax.tree.map(
        lambda h: jax.random.normal(key, (f,) + h.shape[1:]), honest)
    seen, (new, state, _), shapes, params, batch = self._setup(
        aggregators.median, backend, gaussian_attack)
    self.assertEqual(seen, [{"w": (n, 513), "b": (n, 1)}])
    # The per-device program: local gradients [2, d], shards [n, 513]; nothing [n, >513].
    self.assertIn((n // 8, d), shapes)
    self.assertIn((n, 513), shapes)
    self.assertEqual([s for s in shapes if s[0] > n // 8 and s[1] > 513], [])
    chex.assert_shape(new["w"], (d,))
    # Random Byzantine rows wrote into the padding; the sim zeroed it before the rule.
    self.assertEqual(float(optax.tree.get(state, "padding_mass")), 0.0)
    # With 13 honest rows of 16 the median stays inside the honest gradients' range.
    honest = 2 * batch[:n - f] ** 2  # dloss/dw at w = 1
    aggregate = (params["w"] - new["w"]) / 0.1
    self.assertTrue(np.all(aggregate >= honest.min(0) - 1e-4))
    self.assertTrue(np.all(aggregate <= honest.max(0) + 1e-4))

  def test_gram_rule_on_shards_longer_than_a_gram_chunk(self):
    # Each device's shard spans several Gram chunks, so the core accumulates K in a scan whose
    # carry is varying over the mesh axis inside shard_map.
    n, f, d = 8, 1, 8 * 2 * gram_lib.GRAM_CHUNK + 5
    tx = optax.chain(flagjax.aggregate(aggregators.krum, f=f), optax.sgd(1e-3))
    loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    batch = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    params = jnp.ones((d,))
    new = {}
    for backend in ("vmap", "shard_map"):
      step = sim.make_train_step(loss_fn, tx, num_workers=n, num_byzantine=f,
                                 attack=attacks.sign_flip, backend=backend)
      new[backend] = step(params, tx.init(params), batch, jax.random.key(0))[0]
    # Krum picks one honest worker's gradient 2 w b^2: compare against every honest row.
    grads = 2 * batch[:n - f] ** 2
    picked = [i for i in range(n - f) if np.allclose(new["vmap"], 1 - 1e-3 * grads[i])]
    self.assertLen(picked, 1)
    chex.assert_trees_all_close(new["shard_map"], new["vmap"], rtol=1e-6, atol=1e-6)

  def test_vmap_rule_sees_full_rows(self):
    # The contrast that shows the check above can fail: one device holds [n, d].
    seen, _, shapes, _, _ = self._setup(aggregators.mean, "vmap", attacks.sign_flip)
    self.assertEqual(seen, [{"w": (self.N, self.D), "b": (self.N, 3)}])
    self.assertIn((self.N, self.D), shapes)


class ErrorsTest(chex.TestCase):

  def _make(self, **kw):
    args = dict(num_workers=8, num_byzantine=2, backend="vmap")
    args.update(kw)
    return sim.make_train_step(linear_loss, optax.sgd(0.1), **args)

  def test_invalid_worker_counts(self):
    with self.assertRaisesRegex(
        ValueError, r"make_train_step needs num_byzantine < num_workers, "
        r"got num_workers=4, num_byzantine=4"):
      self._make(num_workers=4, num_byzantine=4)
    with self.assertRaisesRegex(ValueError, r"make_train_step needs num_byzantine >= 0"):
      self._make(num_byzantine=-1)
    with self.assertRaisesRegex(ValueError, r"make_train_step needs num_workers >= 1"):
      self._make(num_workers=0, num_byzantine=0)
    with self.assertRaisesRegex(ValueError, "num_workers as a static Python int"):
      self._make(num_workers=8.0)

  @parameterized.parameters("pmap", "shard_map")
  def test_workers_not_divisible_by_devices(self, backend):
    with self.assertRaisesRegex(
        ValueError, r"make_train_step needs num_workers to be a multiple of the number of "
        r"devices, got num_workers=12, num_devices=8"):
      self._make(num_workers=12, backend=backend)

  def test_unknown_backend(self):
    with self.assertRaisesRegex(ValueError, r"make_train_step needs backend in .*'pmap'.*"
                                r"got backend='tpu_pod'"):
      self._make(backend="tpu_pod")

  def test_batch_leading_axis_must_be_num_workers(self):
    tx = optax.chain(flagjax.aggregate(aggregators.mean), optax.sgd(0.1))
    step = sim.make_train_step(linear_loss, tx, num_workers=8, num_byzantine=2)
    params = zero_params()
    with self.assertRaisesRegex(ValueError, "leading axis num_workers=8, got leading sizes"):
      step(params, tx.init(params), regression_batch(0, 6, 2, true_regression_params()),
           jax.random.key(0))
