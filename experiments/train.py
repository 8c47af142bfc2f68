r"""Robust distributed training of one rule, or a comparison of rules, under a Byzantine attack.

``python -m experiments.train`` (no options) runs the study's separating setting: scikit-learn's
digits, an MLP, 15 workers with Dirichlet(0.3) non-IID data, 6 of them sending ALIE
("a little is enough") gradients, and compares mean, median, trimmed mean, Krum, Multi-Krum,
Bulyan, geometric median, centered clipping and the Flag Aggregator over 3 seeds. It prints a
results table and writes ``results/<name>.json`` and ``results/<name>.png`` (test accuracy
against step, one line per rule). Run ``python -m experiments.train --help`` for the manual.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

from experiments import data as data_lib
from experiments import presets as presets_lib
from experiments import report
from experiments import specs
from experiments.specs import RuleUnavailable, UsageError

OPTIMIZERS = ("sgd", "adam")
BACKENDS = ("vmap", "pmap", "shard_map")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run's numbers (output options are not part of it)."""
  dataset: str = "digits"
  model: str = "mlp"
  rules: tuple = specs.DEFAULT_RULES
  attack: str = "alie"
  num_workers: int = 15
  num_byzantine: int = 6
  assumed_byzantine: Optional[int] = None
  alpha: Optional[float] = 0.3
  steps: int = 500
  batch_size: int = 32
  optimizer: str = "sgd"
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 0.0
  worker_momentum: Optional[float] = None
  seeds: tuple = (0, 1, 2)
  eval_every: int = 25
  backend: str = "vmap"
  devices: Optional[int] = None
  data_dir: Optional[str] = None
  offline: bool = False
  # FLTrust's root data: training examples the server holds, kept out of every worker's shard.
  server_examples: int = 100
  # Federated rounds: local SGD steps per round (1: plain gradients), and client sampling.
  local_steps: int = 1
  clients_per_round: Optional[int] = None

  @property
  def rows_per_round(self) -> int:
    """The rows the rule aggregates each step: ``clients_per_round`` or every worker."""
    return self.clients_per_round or self.num_workers

  @property
  def rule_f(self) -> int:
    """The f the rules are told (``--assumed-byzantine``, default the actual number)."""
    return self.num_byzantine if self.assumed_byzantine is None else self.assumed_byzantine

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["rules"] = list(self.rules)
    out["seeds"] = list(self.seeds)
    return out

  def results_key(self) -> dict:
    """The fields that change results (not where data is cached)."""
    out = self.to_json()
    out.pop("data_dir")
    out.pop("offline")
    if not any(specs.takes_server_update(specs.parse_spec(rule, "rule")) for rule in self.rules):
      out.pop("server_examples")  # only runs that give the server data depend on it
    # Options at their defaults are left out, so results of runs made before they existed
    # keep their keys (and are reused).
    for option, default in (("local_steps", 1), ("clients_per_round", None)):
      if out[option] == default:
        out.pop(option)
    return out


def describe_setting(config: Config) -> str:
  """A one-line description of the setting, for titles and tables."""
  data = "IID" if config.alpha is None else f"Dirichlet alpha={config.alpha:g}"
  attack = specs.parse_spec(config.attack, "attack").label
  return (f"{config.dataset}/{config.model}, n={config.num_workers}, f={config.num_byzantine} "
          f"{attack}, {data}")


def default_name(config: Config) -> str:
  alpha = "iid" if config.alpha is None else f"a{config.alpha:g}"
  attack = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.attack).strip("-")
  return f"{config.dataset}-{config.model}-{attack}-n{config.num_workers}-f{config.num_byzantine}-{alpha}"


def validate(config: Config, *, allow_unavailable: bool = False) -> None:
  """Checks the options that need no data or compilation; raises :class:`UsageError`.

  Unless ``allow_unavailable`` (a sweep, where such cells are n/a), it is an error when every
  rule's bound on f is broken.
  """
  from experiments import models
  if config.dataset not in data_lib.DATASETS:
    raise UsageError(f"unknown dataset {config.dataset!r}: choose from "
                     f"{', '.join(data_lib.DATASETS)}")
  if config.model not in models.MODELS:
    raise UsageError(f"unknown model {config.model!r}: choose from {', '.join(models.MODELS)}")
  if config.optimizer not in OPTIMIZERS:
    raise UsageError(f"unknown optimizer {config.optimizer!r}: choose from "
                     f"{', '.join(OPTIMIZERS)}")
  if config.backend not in BACKENDS:
    raise UsageError(f"unknown backend {config.backend!r}: choose from {', '.join(BACKENDS)}")
  n, f = config.num_workers, config.num_byzantine
  if n < 1:
    raise UsageError(f"--num-workers must be >= 1, got {n}")
  if not 0 <= f < n:
    raise UsageError(f"--num-byzantine must be in [0, num_workers), got {f} with "
                     f"--num-workers {n}")
  if not 0 <= config.rule_f < n:
    raise UsageError(f"--declared-f must be in [0, num_workers), got {config.rule_f}")
  if config.local_steps < 1:
    raise UsageError(f"--local-steps must be >= 1, got {config.local_steps}")
  if config.clients_per_round is not None and not 1 <= config.clients_per_round <= n:
    raise UsageError(f"--clients-per-round must be in [1, num_workers], got "
                     f"{config.clients_per_round} with --num-workers {n}")
  for name, value in (("--steps", config.steps), ("--batch-size", config.batch_size),
                      ("--eval-every", config.eval_every)):
    if value < 1:
      raise UsageError(f"{name} must be >= 1, got {value}")
  if not config.seeds:
    raise UsageError("--seeds needs at least one seed")
  if config.server_examples < 1:
    raise UsageError(f"--server-examples must be >= 1, got {config.server_examples}")
  if config.alpha is not None and not config.alpha > 0:
    raise UsageError(f"--alpha must be > 0 (or iid), got {config.alpha}")
  if not config.lr > 0:
    raise UsageError(f"--lr must be > 0, got {config.lr}")
  if not 0 <= config.momentum < 1:
    raise UsageError(f"--momentum must be in [0, 1), got {config.momentum}")
  if not config.weight_decay >= 0:
    raise UsageError(f"--weight-decay must be >= 0, got {config.weight_decay}")
  if config.worker_momentum is not None and not 0 <= config.worker_momentum < 1:
    raise UsageError(f"--worker-momentum must be in [0, 1), got {config.worker_momentum}")
  if not config.rules:
    raise UsageError("--rules needs at least one rule")
  reasons = []
  for text in config.rules:
    spec = specs.parse_spec(text, "rule")
    try:
      specs.check_rule(spec, n, config.rule_f)  # unknown rule / hyperparameter, bound on f
    except RuleUnavailable as reason:
      reasons.append(str(reason))
  if len(reasons) == len(config.rules) and not allow_unavailable:  # nothing would run: an error, not a table of n/a
    raise UsageError(f"{'; '.join(reasons)}: lower --num-byzantine / --assumed-byzantine or "
                     f"raise --num-workers")
  specs.check_attack_values(specs.parse_spec(config.attack, "attack"), n, f)


# ---------------------------------------------------------------------------------------------
# Training.


def preset_configs(preset: presets_lib.Preset, base: Optional[Config] = None) -> list:
  """``[(label, Config)]``: each row of ``preset`` applied on top of ``base`` (the defaults)."""
  base = base or Config()
  return [(label, base.replace(**changes)) for label, changes in preset.rows()]


def preset_config(preset: presets_lib.Preset, base: Optional[Config] = None) -> Config:
  """The config of a one-setting preset (``experiments.train --preset``); a study of several
  settings is a :class:`~experiments.presets.PresetError` that points to the sweep."""
  configs = preset_configs(preset, base)
  if len(configs) > 1:
    raise presets_lib.PresetError(
        f"preset {preset.name} is a study of {len(configs)} settings "
        f"({', '.join(label for label, _ in configs)}): run it with "
        f"python -m experiments.sweep --preset {preset.name}")
  return configs[0][1]


class Prepared(NamedTuple):
  """A setting's data and model functions, shared by every rule and seed."""
  dataset: data_lib.Dataset
  train_images: object
  train_labels: object
  apply: Callable
  loss_fn: Callable
  accuracy: Callable
  server_indices: object = None   # the server's root examples (np int array), see root_set
  server_batch: object = None      # {"image", "label"} of those examples


def prepare(config: Config) -> Prepared:
  """Loads the dataset and builds the model's loss and test-accuracy functions."""
  import jax.numpy as jnp
  from experiments import models
  dataset = data_lib.load_dataset(config.dataset, config.data_dir or None,
                                  download=not config.offline)
  apply, _ = models.functional(models.create(config.model, dataset.image_shape,
                                             dataset.num_classes, 0))
  accuracy = models.make_accuracy_fn(apply, jnp.asarray(dataset.test_images),
                                     jnp.asarray(dataset.test_labels))
  num_train = len(dataset.train_labels)
  if (any(specs.takes_server_update(specs.parse_spec(rule, "rule")) for rule in config.rules)
      and config.server_examples > num_train - config.num_workers):
    raise UsageError(f"--server-examples {config.server_examples} leaves the "
                     f"{config.num_workers} workers fewer than one example each of "
                     f"{config.dataset}'s {num_train}: use at most "
                     f"{num_train - config.num_workers}")
  server = data_lib.root_set(dataset.train_labels, config.server_examples)
  server_batch = {"image": jnp.asarray(dataset.train_images[server]),
                  "label": jnp.asarray(dataset.train_labels[server])}
  return Prepared(dataset, jnp.asarray(dataset.train_images),
                  jnp.asarray(dataset.train_labels), apply, models.make_loss_fn(apply),
                  accuracy, server, server_batch)


def make_optimizer(config: Config):
  """The optax optimizer of ``--optimizer``/``--lr``/``--momentum``/``--weight-decay``.

  Applied to the aggregate after the aggregation stage; with ``--local-steps`` > 1 it is the
  workers' local optimizer instead (:func:`server_optimizer`).
  """
  import optax
  stages = []
  if config.weight_decay:
    stages.append(optax.add_decayed_weights(config.weight_decay))
  if config.optimizer == "sgd":
    stages.append(optax.sgd(config.lr, momentum=config.momentum or None))
  else:
    stages.append(optax.adam(config.lr))
  return stages


def server_optimizer(config: Config):
  """The stages after the aggregator: :func:`make_optimizer`'s, or with local training
  (``--local-steps`` > 1) FedAvg's server step ``params - aggregate(deltas)`` (rate 1), the
  training options then acting on the workers' local steps."""
  import optax
  if config.local_steps > 1:
    return [optax.sgd(1.0)]
  return make_optimizer(config)


def local_optimizer(config: Config):
  """The workers' local optimizer with ``--local-steps`` > 1, else None (plain gradients)."""
  if config.local_steps == 1:
    return None
  import optax
  return optax.chain(*make_optimizer(config))


def _sharded_devices(config: Config):
  """The devices of the sharded backends: as many as divide ``n`` (at most ``--devices``)."""
  import jax
  devices = jax.devices()
  wanted = config.devices or len(devices)
  count = max(k for k in range(1, min(wanted, len(devices)) + 1) if config.num_workers % k == 0)
  if config.devices and count != config.devices:
    raise UsageError(f"--devices {config.devices}: {len(devices)} device(s) available and "
                     f"num_workers={config.num_workers} must be a multiple of the device count; "
                     f"pick a divisor of {config.num_workers}")
  return devices[:count]


def request_cpu_devices(config: Config) -> None:
  """Asks for simulated CPU devices for the sharded backends (before JAX starts its backends)."""
  if config.backend == "vmap":
    return
  import jax
  count = config.devices or max(k for k in range(1, 9) if config.num_workers % k == 0)
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except Exception:  # noqa: BLE001 - backends already started: use what exists
    pass


class RuleRunner(NamedTuple):
  """A compiled training loop for one rule in one setting: ``run(seed, on_progress)``."""
  label: str
  run: Callable
  text: str = ""  # the rule spec it was built from


class CompiledRule(NamedTuple):
  """One rule's training step in one setting (what a runner and the leaderboard share)."""
  spec: specs.Spec
  tx: object          # the optax chain (pre-stages, aggregator, optimizer)
  step: Callable      # flagjax.sim step(params, opt_state, batch, key)


def make_attack_plan(config: Config, prepared: Prepared,
                     rule: specs.Spec) -> specs.AttackPlan:
  """``config.attack`` built for the simulator (adaptive attacks aimed at ``rule``)."""
  return specs.make_attack(specs.parse_spec(config.attack, "attack"),
                           num_workers=config.num_workers, num_byzantine=config.num_byzantine,
                           num_classes=prepared.dataset.num_classes,
                           rule=specs.rule_function(rule),
                           rule_kwargs=specs.rule_kwargs(rule, config.rule_f))


def build_step(config: Config, prepared: Prepared, rule_text: str,
               plan: Optional[specs.AttackPlan] = None) -> CompiledRule:
  """The optax chain and simulator step of one rule under ``config``'s attack (or ``plan``,
  an attack the caller built).

  Raises:
    RuleUnavailable: the rule's bound on f is broken in this setting.
    UsageError: a bad rule or attack option.
  """
  import optax
  import flagjax

  rule = specs.parse_spec(rule_text, "rule")
  n, f, rule_f = config.num_workers, config.num_byzantine, config.rule_f
  rows = config.rows_per_round
  specs.check_rule(rule, rows, rule_f)
  if plan is None:
    plan = make_attack_plan(config, prepared, rule)
  tx = optax.chain(*plan.pre,
                   specs.make_aggregator(rule, rule_f, rows, config.worker_momentum),
                   *server_optimizer(config))
  devices = None if config.backend == "vmap" else _sharded_devices(config)
  server_batch = prepared.server_batch if specs.takes_server_update(rule) else None
  try:
    step = flagjax.sim.make_train_step(
        prepared.loss_fn, tx, num_workers=n, num_byzantine=f, attack=plan.attack,
        data_attack=plan.data_attack, backend=config.backend, devices=devices,
        server_batch=server_batch, local_steps=config.local_steps,
        local_optimizer=local_optimizer(config), clients_per_round=config.clients_per_round)
  except ValueError as error:
    raise UsageError(str(error).splitlines()[0]) from None
  return CompiledRule(rule, tx, step)


def scan_steps(step: Callable, config: Config, params, opt_state, key, first_step, length: int,
               shards, images, labels):
  """``length`` training steps as one ``lax.scan`` (batches drawn inside, traceable).

  Keys come from the step number (``fold_in(key, step)``), so how the steps are split into
  chunks (``--eval-every``) or batched over runs (the leaderboard) does not change a run.
  Returns ``(params, opt_state, mean honest loss, mean Byzantine weight)``; the weight is the
  Byzantine rows' share of a Gram-space rule's coefficients (NaN for the other rules). With
  ``--local-steps k`` each worker's batch is ``k`` micro-batches of ``--batch-size``.
  """
  import jax
  import jax.numpy as jnp
  n, f, k = config.num_workers, config.num_byzantine, config.local_steps

  def body(carry, step_number):
    params, opt_state = carry
    batch_key, step_key = jax.random.split(jax.random.fold_in(key, step_number))
    batch = data_lib.sample_batches(batch_key, shards, images, labels, config.batch_size * k)
    if k > 1:
      batch = jax.tree.map(lambda a: a.reshape((n, k, config.batch_size) + a.shape[2:]), batch)
    params, opt_state, metrics = step(params, opt_state, batch, step_key)
    coefficients = metrics["coefficients"]
    worker = metrics.get("clients", jnp.arange(n))  # the worker behind each aggregated row
    byzantine_weight = jnp.sum(jnp.where(worker >= n - f, coefficients, 0)) / jnp.sum(
        coefficients)
    return (params, opt_state), (metrics["honest_loss"], byzantine_weight)
  (params, opt_state), (losses, weights) = jax.lax.scan(
      body, (params, opt_state), first_step + jnp.arange(length))
  return params, opt_state, jnp.mean(losses), jnp.mean(weights)


def initial_state(config: Config, prepared: Prepared, tx, seed: int,
                  server: bool = False):
  """``(params, opt_state, shards, key)`` of run ``seed``: the model drawn from the seed, the
  data split from the seed and ``config.alpha`` (padded to a fixed width, so every split of
  a dataset has one shape). With ``server`` (a rule that takes the server's update), the
  server's root examples (``prepared.server_indices``) are kept out of every shard."""
  import jax
  import jax.numpy as jnp
  from experiments import models
  _, params = models.functional(models.create(
      config.model, prepared.dataset.image_shape, prepared.dataset.num_classes, seed))
  shards = data_lib.partition(prepared.dataset.train_labels, config.num_workers, config.alpha,
                              seed, width=len(prepared.dataset.train_labels),
                              exclude=prepared.server_indices if server else None)
  shards = data_lib.WorkerShards(jnp.asarray(shards.indices), jnp.asarray(shards.sizes))
  return params, tx.init(params), shards, jax.random.key(seed)


def build_runner(config: Config, prepared: Prepared, rule_text: str) -> RuleRunner:
  """Compiles (lazily) the training loop of one rule.

  Raises:
    RuleUnavailable: the rule's bound on f is broken in this setting.
    UsageError: a bad rule or attack option.
  """
  import jax
  import numpy as np

  rule, tx, step = build_step(config, prepared, rule_text)
  chunks = {}

  def chunk_fn(length: int):
    """``length`` steps as one jitted ``lax.scan`` (batches drawn inside)."""
    if length not in chunks:
      chunks[length] = jax.jit(
          lambda params, opt_state, key, first, shards, images, labels: scan_steps(
              step, config, params, opt_state, key, first, length, shards, images, labels))
    return chunks[length]

  def run(seed: int, on_progress: Optional[Callable[[int, float], None]] = None) -> dict:
    start = time.perf_counter()
    params, opt_state, shards, key = initial_state(config, prepared, tx, seed,
                                                   server=specs.takes_server_update(rule))
    # Entry k of every list belongs to steps[k]; the loss and weight at step 0 (no chunk run
    # yet) are None, so every list has one entry per evaluation.
    steps, accuracy, losses, weights = [0], [float(prepared.accuracy(params))], [None], [None]
    done = 0
    steady_seconds, steady_steps = 0.0, 0  # after the first chunk (which compiles)
    while done < config.steps:
      length = min(config.eval_every, config.steps - done)
      tic = time.perf_counter()
      params, opt_state, loss, weight = chunk_fn(length)(
          params, opt_state, key, done, shards, prepared.train_images, prepared.train_labels)
      acc = float(prepared.accuracy(params))
      if done > 0:
        steady_seconds += time.perf_counter() - tic
        steady_steps += length
      done += length
      steps.append(done)
      accuracy.append(acc)
      losses.append(float(loss))
      weights.append(float(weight))
      if on_progress is not None:
        on_progress(length, acc)
    seconds = time.perf_counter() - start
    per_step = steady_seconds / steady_steps if steady_steps else None
    return {"seed": seed, "steps": steps, "test_accuracy": accuracy, "honest_loss": losses,
            "byzantine_weight": [None if w is None or math.isnan(w) else w for w in weights],
            "final_accuracy": accuracy[-1], "seconds": seconds,
            "seconds_per_step": per_step,
            "diverged": bool(not np.isfinite(losses[-1]))}

  return RuleRunner(rule.label, run, rule_text)


def progress_bar(total: int, enabled: bool, unit: str = "step"):
  """A tqdm bar on stderr, shown only when stderr is a terminal (a log file or CI stays clean:
  the per-cell / per-run lines say the progress there)."""
  from tqdm import tqdm
  interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  return tqdm(total=total, disable=not (enabled and interactive) or total == 0, unit=unit,
              dynamic_ncols=True, file=sys.stderr, leave=False)


def config_key(config: Config) -> str:
  """A stable name for a configuration: a hash of everything that determines its result (the
  options and the flagjax version; after editing the code itself, start over with --fresh).
  The sweep names its cells by it too."""
  import hashlib
  import flagjax
  text = json.dumps({"config": config.results_key(), "flagjax": flagjax.__version__},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def run_key(config: Config, rule_text: str, seed: int) -> str:
  """The :func:`config_key` of one (rule, seed) run of ``config``."""
  return config_key(config.replace(rules=(rule_text,), seeds=(seed,)))


def _load_run(cache_dir: Optional[str], key: str) -> Optional[dict]:
  """A finished run saved under ``cache_dir`` (None if absent or not a finished run)."""
  if cache_dir is None:
    return None
  try:
    run = report.read_json(os.path.join(cache_dir, f"{key}.json"))
  except (OSError, ValueError):
    return None
  if isinstance(run, dict) and isinstance(run.get("final_accuracy"), (int, float)):
    return run
  return None


def run_comparison(config: Config, *, progress: bool = True,
                   log: Callable[[str], None] = print, cache_dir: Optional[str] = None) -> dict:
  """Trains every rule of ``config`` for every seed; returns the results (JSON-ready).

  With ``cache_dir``, every finished (rule, seed) run is written there atomically as
  ``<run_key>.json`` and read back instead of recomputed, so a killed run resumes.
  """
  validate(config)
  request_cpu_devices(config)
  prepared = prepare(config)
  results = {}
  runners = []
  for text in config.rules:
    try:
      runners.append(build_runner(config, prepared, text))
    except RuleUnavailable as reason:
      label = specs.parse_spec(text, "rule").label
      results[label] = {"status": "n/a", "reason": str(reason)}
      log(f"{label}: n/a in this setting ({reason})")
  if not runners:
    reasons = "; ".join(r["reason"] for r in results.values())
    raise UsageError(f"{reasons}: lower --num-byzantine / --assumed-byzantine or raise "
                     f"--num-workers")
  bar = progress_bar(len(runners) * len(config.seeds) * config.steps, progress)
  try:
    for runner in runners:
      runs = []
      for seed in config.seeds:
        bar.set_postfix_str(f"{runner.label} seed={seed}")
        def on_progress(length, acc, label=runner.label, seed=seed):
          bar.update(length)
          bar.set_postfix_str(f"{label} seed={seed} acc={acc:.3f}")
        key = run_key(config, runner.text, seed)
        run = _load_run(cache_dir, key)
        if run is not None:
          log(f"{runner.label} seed={seed}: reused {os.path.join(cache_dir, key + '.json')}")
          bar.update(config.steps)
        else:
          run = runner.run(seed, on_progress)
          if cache_dir is not None:
            report.atomic_write_json(os.path.join(cache_dir, f"{key}.json"), run)
        runs.append(run)
      final = [r["final_accuracy"] for r in runs]
      results[runner.label] = {"status": "ok", "final_accuracy": report.summarize(final),
                               "runs": runs}
  finally:
    bar.close()
  # Keep the order of --rules.
  order = [specs.parse_spec(t, "rule").label for t in config.rules]
  return {label: results[label] for label in order}


def results_table(rules: dict) -> tuple[list[str], list[list[str]], list[str]]:
  """``(header, rows, notes)`` of the terminal table; notes give the n/a reasons."""
  seeds = max((len(r["runs"]) for r in rules.values() if r["status"] == "ok"), default=1)
  header = ["rule", f"final test accuracy ({seeds} seed{'s' if seeds > 1 else ''})",
            "best", "ms/step"]
  rows, notes = [], []
  for label, result in rules.items():
    if result["status"] != "ok":
      rows.append([label, "n/a", "", ""])
      notes.append(f"{label}: n/a, {result['reason']}")
      continue
    best = max(max(r["test_accuracy"]) for r in result["runs"])
    per_step = [r["seconds_per_step"] for r in result["runs"] if r["seconds_per_step"]]
    ms = f"{1e3 * sum(per_step) / len(per_step):.1f}" if per_step else ""
    rows.append([label, report.format_accuracy(result["final_accuracy"]), f"{best:.3f}", ms])
  return header, rows, notes


def write_outputs(out_dir: str, name: str, config: Config, rules: dict, command: str,
                  chance: float) -> tuple[str, str]:
  """Writes ``<out>/<name>.json`` and ``<out>/<name>.png`` (atomically); returns the paths."""
  json_path = os.path.join(out_dir, f"{name}.json")
  png_path = os.path.join(out_dir, f"{name}.png")
  report.atomic_write_json(json_path, {
      "command": command, "setting": describe_setting(config), "config": config.to_json(),
      "rules": rules, "versions": _versions()})
  curves = report.accuracy_curves(rules)
  seeds = len(config.seeds)
  title = describe_setting(config) + (f" ({seeds} seeds: mean, min-max band)" if seeds > 1
                                      else f" (seed {config.seeds[0]})")
  report.plot_curves(png_path, curves, title=title, chance=chance)
  return json_path, png_path


def _cpu_model() -> str:
  import platform
  try:
    with open("/proc/cpuinfo") as info:
      for line in info:
        if line.lower().startswith(("model name", "hardware", "cpu model")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
  import subprocess
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict:
  """What a reader needs to judge a result from another machine: float rounding differs
  across CPUs, and a chaotic training run amplifies it (figures vary within the spreads)."""
  import platform
  import jax
  import jaxlib
  import optax
  import flax
  import flagjax
  return {"flagjax": flagjax.__version__, "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "optax": optax.__version__, "flax": flax.__version__,
          "backend": jax.default_backend(), "cpu": _cpu_model(), "machine": platform.machine(),
          "python": platform.python_version(), "git_commit": _git_commit()}


# ---------------------------------------------------------------------------------------------
# Command line.

DESCRIPTION = """\
Train a classifier with n simulated workers, f of them Byzantine, and compare robust
aggregation rules. Every rule sees the same data, model initialisation and attack (per seed).

Each step every worker draws a minibatch from its own shard of the training set and computes
its gradient; the last f workers are Byzantine: they send the --attack's rows instead (or, for
a data attack such as label_flip, the gradient of their poisoned batch). The rule aggregates
the n rows into one update, which the optimizer applies. Test accuracy is measured every
--eval-every steps.
"""

EPILOG = """\
rules (--rules, with optional hyperparameters as name:key=value,key=value):
  mean  median  trimmed_mean  meamed  phocas  krum  multi_krum[:m=]  bulyan
  geometric_median[:max_iters=,tol=,nu=]  centered_clipping[:tau=,num_iters=]
  mda  monna[:idx=]  flag[:rank=,lam=,max_iters=,tol=,eps=,scale=norm|rank|mean,num_starts=]
  normalized_mean          every row rescaled to the median norm, then averaged (flag without
                           its subspace)
  flag_released[:rank=,lam=,seed=]  (the authors' released code: one IRLS step from a seeded
  random start; experiments/flag_released.py lists how it deviates from the paper)
  Rules that take f get --assumed-byzantine (default: --num-byzantine). A rule whose bound on
  f is broken (e.g. bulyan needs n >= 4f + 3) is reported as n/a in a comparison; alone, it
  is an error.

attacks (--attack, with optional hyperparameters):
  none                     every worker is honest (f workers are still assumed by the rules)
  gaussian[:mu=,sigma=]    N(mu, sigma^2) rows          uniform     U[0, 1) rows (the paper's)
  sign_flip                -mean of the honest rows     ipm[:eps=]  -eps * mean (default 0.1)
  alie[:z=]                mean + z * std (Baruch et al.; z from n and f by default)
  mimic[:idx=]  nan  inf   scaled[:factor=] (factor * mean, default -10)
  optimal_alie  optimal_ipm   adaptive: the factor that hurts the chosen rule most
  min_max[:perturbation=]  mean + gamma * p, the largest gamma keeping every distance to an
  min_sum[:perturbation=]  honest row within the honest diameter (min_sum: the sum of squared
                           distances within the honest maximum); p = std (default), unit or
                           sign (Shejwalkar & Houmansadr, NDSS 2021)
  fang[:b=]                just beyond the honest extreme, against trimmed mean and median
                           (Fang et al., USENIX Security 2020)
  label_flip               data attack: labels y -> 9 - y on the Byzantine workers
  augmented[:sigma=,num_iterations=,time=]   data attack: the paper's workers on augmented
                           data (Gaussian noise, Lotka-Volterra flow or cat map per batch);
                           also augment_gaussian, augment_lotka_volterra, augment_cat_map
  lossy[:drop_fraction=]   lossy links: the f workers send their own gradients with a
                           fraction (default 0.1) of the coordinates lost (zeros)

examples:
  python -m experiments.train                                   # the default comparison
  python -m experiments.train --rules flag median --attack sign_flip --num-byzantine 5
  python -m experiments.train --rules flag:lam=8 --num-workers 7 --num-byzantine 1 \\
      --attack uniform --alpha iid
  python -m experiments.train --dataset mnist --model cnn --steps 1000 --seeds 0
  python -m experiments.train --preset cifar10-resnet18        # for accelerators
  python -m experiments.train --list-presets

outputs: <out>/<name>.json (config, per-seed curves, summary) and <out>/<name>.png.
Datasets mnist and cifar10 are downloaded on first use into --data-dir (default
$FLAGJAX_DATA or ~/.cache/flagjax); digits and synthetic need no network.
"""


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line that says what to do."""

  def error(self, message):
    self.exit(2, f"error: {message} (see --help)\n")


def _alpha(text: str) -> Optional[float]:
  if text.lower() in ("iid", "none", "inf"):
    return None
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number or 'iid', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
  d = Config()
  parser = _Parser(prog="python -m experiments.train", description=DESCRIPTION, epilog=EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   argument_default=argparse.SUPPRESS)
  g = parser.add_argument_group("setting")
  g.add_argument("--preset", metavar="NAME",
                 help="start from a named setting of the paper's study (see --list-presets); "
                      "options given explicitly override it")
  g.add_argument("--list-presets", action="store_true", help="list the presets and exit")
  g.add_argument("--dataset", metavar="NAME",
                 help=f"{' | '.join(data_lib.DATASETS)} (default: {d.dataset})")
  g.add_argument("--data-dir", metavar="DIR",
                 help="download cache for mnist / cifar10 (default: $FLAGJAX_DATA or "
                      "~/.cache/flagjax)")
  g.add_argument("--offline", action="store_true",
                 help="never download; fail with a message when a dataset file is missing")
  g.add_argument("--model", metavar="NAME",
                 help=f"mlp | cnn | resnet18 (default: {d.model})")
  g.add_argument("--alpha", type=_alpha, metavar="A",
                 help="Dirichlet concentration of the non-IID split over workers; 'iid' for an "
                      f"IID split (default: {d.alpha})")
  g = parser.add_argument_group("workers and attack")
  g.add_argument("--num-workers", "-n", type=int, metavar="N",
                 help=f"number of workers n (default: {d.num_workers})")
  g.add_argument("--num-byzantine", "-f", type=int, metavar="F",
                 help=f"number of Byzantine workers f, the last f (default: {d.num_byzantine})")
  g.add_argument("--declared-f", "--assumed-byzantine", type=int, metavar="F",
                 dest="assumed_byzantine",
                 help="the f the rules are told, when the defender over- or under-estimates "
                      "(default: --num-byzantine)")
  g.add_argument("--clients-per-round", type=int, metavar="M",
                 help="client sampling: each step the rule aggregates M of the n workers, "
                      "sampled without replacement (Byzantine ones like the others) "
                      "(default: all n)")
  g.add_argument("--attack", metavar="SPEC",
                 help=f"what the Byzantine workers do, see below (default: {d.attack})")
  g.add_argument("--rules", nargs="+", metavar="SPEC",
                 help=f"rules to compare (default: {' '.join(d.rules)})")
  g.add_argument("--server-examples", type=int, metavar="K",
                 help="training examples the server holds for rules that use its update "
                      "(fltrust), kept out of every worker's shard in those runs "
                      f"(default: {d.server_examples})")
  g = parser.add_argument_group("training")
  g.add_argument("--steps", type=int, help=f"training steps (default: {d.steps})")
  g.add_argument("--batch-size", type=int, metavar="B",
                 help=f"examples per worker per step (default: {d.batch_size})")
  g.add_argument("--optimizer", metavar="NAME",
                 help=f"sgd | adam, applied to the aggregate (default: {d.optimizer})")
  g.add_argument("--lr", type=float, help=f"learning rate (default: {d.lr})")
  g.add_argument("--momentum", type=float,
                 help=f"SGD momentum, 0 for none (default: {d.momentum})")
  g.add_argument("--weight-decay", type=float, metavar="WD",
                 help=f"decoupled weight decay added to the aggregate (default: {d.weight_decay})")
  g.add_argument("--worker-momentum", type=float, metavar="BETA",
                 help="aggregate each worker's momentum m_i <- beta m_i + (1 - beta) g_i "
                      "instead of its raw gradient (Karimireddy et al. 2021) (default: off)")
  g.add_argument("--local-steps", type=int, metavar="K",
                 help="federated rounds: each worker takes K local steps of --optimizer at "
                      "--lr on K batches and sends its model delta; the server adds the "
                      f"aggregated delta (FedAvg, rate 1) (default: {d.local_steps})")
  g.add_argument("--seeds", type=int, nargs="+", metavar="S",
                 help="seeds of model init, data split, batches and attack noise; results are "
                      f"averaged over them (default: {' '.join(map(str, d.seeds))})")
  g.add_argument("--eval-every", type=int, metavar="K",
                 help=f"steps between test-accuracy evaluations (default: {d.eval_every})")
  g.add_argument("--backend", metavar="NAME",
                 help="vmap (one device) | pmap | shard_map (workers spread over devices, "
                      f"coordinate-sharded aggregation) (default: {d.backend})")
  g.add_argument("--devices", type=int, metavar="K",
                 help="devices for pmap / shard_map, a divisor of n; on a CPU this many "
                      "devices are simulated (default: the largest divisor of n up to 8)")
  g = parser.add_argument_group("output")
  g.add_argument("--out", metavar="DIR", help="output folder (default: results)")
  g.add_argument("--name", help="file name stem (default: derived from the setting)")
  g.add_argument("--no-progress", action="store_true",
                 help="no progress bar (it is shown only when stderr is a terminal anyway)")
  g.add_argument("--fresh", action="store_true",
                 help="recompute every run (finished runs are otherwise reused from "
                      "<out>/<name>.runs/, so a killed or repeated command resumes)")
  return parser


CONFIG_OPTIONS = tuple(f.name for f in dataclasses.fields(Config))


def config_from_args(args: argparse.Namespace, base: Optional[Config] = None) -> Config:
  """``base`` (or the preset's, or the defaults) overridden by the options given explicitly."""
  config = base or Config()
  if getattr(args, "preset", None):
    config = preset_config(presets_lib.get(args.preset), config)
  changes = {k: getattr(args, k) for k in CONFIG_OPTIONS if hasattr(args, k)}
  for key in ("rules", "seeds"):
    if key in changes:
      changes[key] = tuple(changes[key])
  return config.replace(**changes)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if getattr(args, "list_presets", False):
    print(presets_lib.describe_all())
    return 0

  def body() -> int:
    config = config_from_args(args)
    validate(config)
    out_dir = getattr(args, "out", "results")
    name = getattr(args, "name", None) or default_name(config)
    command = "python -m experiments.train" + ("" if not argv else " " + shlex.join(argv))
    print(f"setting: {describe_setting(config)}; {config.steps} steps, batch {config.batch_size}"
          f"/worker, {config.optimizer} lr={config.lr:g}, seeds {list(config.seeds)}",
          flush=True)
    cache_dir = os.path.join(out_dir, f"{name}.runs")
    if getattr(args, "fresh", False) and os.path.isdir(cache_dir):
      import shutil
      shutil.rmtree(cache_dir)
    rules = run_comparison(config, progress=not getattr(args, "no_progress", False),
                           cache_dir=cache_dir)
    header, rows, notes = results_table(rules)
    print()
    print(report.text_table(header, rows))
    for note in notes:
      print(note)
    chance = 1.0 / 10  # every dataset here has 10 classes
    json_path, png_path = write_outputs(out_dir, name, config, rules, command, chance)
    print(f"\nwrote {json_path} and {png_path}")
    return 0
  return report.run_command(body, (UsageError, data_lib.DataError, presets_lib.PresetError))


if __name__ == "__main__":
  sys.exit(main())
