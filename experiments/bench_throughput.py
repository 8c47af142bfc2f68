r"""The cost of robustness: simulated training steps per second, each rule against averaging.

The digits MLP (scikit-learn's 8x8 digits, one hidden layer of 64) is trained by
``--workers`` simulated workers (default 16, the last ``f = workers // 4`` Byzantine, sending
their honest gradients so that every rule aggregates the same kind of input) with
``flagjax.sim.make_train_step`` on each backend:

* ``vmap``: every worker on one device;
* ``pmap`` / ``shard_map``: the workers spread over 8 simulated CPU devices (set below,
  before JAX starts), the aggregation coordinate-sharded (one ``n x n`` ``psum`` for the
  Gram-space rules).

For each backend and rule, ``--steps`` steps are run back to back (the compiled step, new
batches drawn beforehand) and timed, ``--reps`` times, interleaved with the same number of
steps of plain averaging (``mean``); the reported ratio is the median rule time over the median
averaging time, i.e. how many times slower than averaging a robust step is (1 = free).

Outputs, written atomically into ``--out`` (default ``results/bench``): ``throughput.json``,
``throughput.md`` (steps per second and ratios) and ``throughput.png`` (the ratios, one group
of bars per rule, one bar per backend).

Examples::

    python -m experiments.bench_throughput
    python -m experiments.bench_throughput --backends vmap --rules median,flag --steps 50
"""

from __future__ import annotations

import jax

# The sharded backends need several devices: 8 simulated CPU devices, set before any JAX
# operation. (When this module is imported by a process that already started JAX, e.g. the
# test suite, which sets 8 devices itself, the setting cannot change any more.)
try:
  jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
  pass

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import flagjax  # noqa: E402
from flagjax import aggregators  # noqa: E402
from experiments import bench_aggregators  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import models  # noqa: E402
from experiments import report  # noqa: E402

BACKENDS = ("vmap", "pmap", "shard_map")


@dataclasses.dataclass(frozen=True)
class StepRule:
  """A rule as the simulator uses it: the function and its hyperparameters given ``f``."""
  name: str
  fn: Callable
  hparams: Callable[[int, int], dict] = lambda n, f: {}


STEP_RULES = (
    StepRule("mean", aggregators.mean),
    StepRule("median", aggregators.median),
    StepRule("trimmed_mean", aggregators.trimmed_mean, lambda n, f: {"f": f}),
    StepRule("meamed", aggregators.meamed, lambda n, f: {"f": f}),
    StepRule("phocas", aggregators.phocas, lambda n, f: {"f": f}),
    StepRule("krum", aggregators.krum, lambda n, f: {"f": f}),
    StepRule("multi_krum", aggregators.multi_krum, lambda n, f: {"f": f}),
    StepRule("bulyan", aggregators.bulyan, lambda n, f: {"f": min(f, (n - 3) // 4)}),
    StepRule("geometric_median", aggregators.geometric_median),
    StepRule("centered_clipping", aggregators.centered_clipping),
    StepRule("mda", aggregators.mda, lambda n, f: {"f": f}),
    StepRule("monna", aggregators.monna, lambda n, f: {"f": f}),
    StepRule("flag", aggregators.flag),
    StepRule("flag(lam=8)", aggregators.flag, lambda n, f: {"lam": 8.0}),
)
RULE_NAMES = tuple(rule.name for rule in STEP_RULES)


def make_problem(num_workers: int, batch_size: int, num_batches: int, seed: int):
  """The digits MLP's ``loss_fn``, initial params, and ``num_batches`` worker batches."""
  dataset = data_lib.load_digits()
  model = models.create("mlp", dataset.image_shape, dataset.num_classes, seed)
  apply, params = models.functional(model)
  loss_fn = models.make_loss_fn(apply)
  shards = data_lib.iid_partition(len(dataset.train_labels), num_workers, seed)
  shards = data_lib.WorkerShards(jnp.asarray(shards.indices), jnp.asarray(shards.sizes))
  images = jnp.asarray(dataset.train_images)
  labels = jnp.asarray(dataset.train_labels)
  keys = jax.random.split(jax.random.key(seed), num_batches)
  batches = [data_lib.sample_batches(k, shards, images, labels, batch_size) for k in keys]
  return loss_fn, params, batches


def time_steps(step, params, opt_state, batches, keys) -> float:
  """Seconds for ``len(keys)`` consecutive steps (cycling through ``batches``)."""
  start = time.perf_counter()
  for i, key in enumerate(keys):
    params, opt_state, _ = step(params, opt_state, batches[i % len(batches)], key)
  jax.block_until_ready(params)
  return time.perf_counter() - start


def bench_backend(backend: str, rules: Sequence[StepRule], problem, args, progress=None):
  """Times every rule's step on one backend, interleaved with averaging; returns records."""
  loss_fn, params, batches = problem
  n, f = args.workers, args.workers // 4
  keys = list(jax.random.split(jax.random.key(args.seed + 1), args.steps))

  def build(rule: StepRule):
    tx = optax.chain(flagjax.aggregate(rule.fn, **rule.hparams(n, f)),
                     optax.sgd(args.learning_rate))
    step = flagjax.sim.make_train_step(loss_fn, tx, num_workers=n, num_byzantine=f,
                                       backend=backend)
    opt_state = tx.init(params)
    time_steps(step, params, opt_state, batches, keys[:2])  # compiles
    return step, opt_state

  baseline = build(STEP_RULES[0])
  records = []
  for rule in rules:
    record = {"backend": backend, "rule": rule.name, "workers": n, "f": f,
              "steps": args.steps}
    try:
      step, opt_state = baseline if rule is STEP_RULES[0] else build(rule)
    except Exception as error:  # noqa: BLE001 - a rule's bound: reported, never fatal
      record["status"] = f"n/a ({type(error).__name__}: {str(error)[:160]})"
      records.append(record)
      if progress is not None:
        progress.update(1)
      continue
    rule_times, mean_times = [], []
    for _ in range(args.reps):
      mean_times.append(time_steps(baseline[0], params, baseline[1], batches, keys))
      rule_times.append(time_steps(step, params, opt_state, batches, keys))
    rule_s, mean_s = float(np.median(rule_times)), float(np.median(mean_times))
    record.update({
        "steps_per_second": args.steps / rule_s,
        "mean_steps_per_second": args.steps / mean_s,
        "ratio_to_mean": rule_s / mean_s,
    })
    records.append(record)
    if progress is not None:
      progress.update(1)
  return records


def markdown(results: dict) -> str:
  backends = list(dict.fromkeys(r["backend"] for r in results["records"]))
  rules = list(dict.fromkeys(r["rule"] for r in results["records"]))
  by_key = {(r["backend"], r["rule"]): r for r in results["records"]}
  lines = [f"# Simulated training throughput ({results['machine']['summary']})", "",
           f"Digits MLP, {results['args']['workers']} workers (f = "
           f"{results['args']['workers'] // 4}), {results['args']['steps']} steps per timing; "
           "steps per second, and time per step as a multiple of plain averaging on the same "
           "backend (1.00x = robustness is free).", "",
           "| rule | " + " | ".join(f"{b} steps/s | {b} x mean" for b in backends) + " |",
           "|---|" + "---:|---:|" * len(backends)]
  for rule in rules:
    cells = []
    for backend in backends:
      r = by_key.get((backend, rule), {})
      if "ratio_to_mean" in r:
        cells += [f"{r['steps_per_second']:.0f}", f"{r['ratio_to_mean']:.2f}x"]
      else:
        cells += [r.get("status", "—").split(" (")[0], "—"]
    lines.append(f"| {rule} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  backends = list(dict.fromkeys(r["backend"] for r in results["records"]))
  rules = list(dict.fromkeys(r["rule"] for r in results["records"]))
  by_key = {(r["backend"], r["rule"]): r for r in results["records"]}
  width = 0.8 / max(len(backends), 1)
  fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(rules) + 2), 4.2))
  for k, backend in enumerate(backends):
    values = [by_key.get((backend, rule), {}).get("ratio_to_mean", np.nan) for rule in rules]
    ax.bar(np.arange(len(rules)) + (k - (len(backends) - 1) / 2) * width, values, width,
           label=backend)
  ax.axhline(1.0, color="black", lw=1)
  ax.axhline(2.0, color="gray", lw=1, ls="--", label="2x averaging")
  ax.set_xticks(np.arange(len(rules)), rules, rotation=35, ha="right")
  ax.set_ylabel("time per step / averaging's")
  ax.set_title(f"Cost of robustness: digits MLP, {results['args']['workers']} workers — "
               f"{results['machine']['summary']}", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  report.save_figure(fig, path, tight=False)
  plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_throughput",
                                   description=__doc__,
                                   formatter_class=bench_aggregators.HelpFormatter)
  parser.add_argument("--rules", type=lambda t: bench_aggregators.parse_names(t, RULE_NAMES, "rules"),
                      default=",".join(RULE_NAMES), help="comma-separated rules")
  parser.add_argument("--backends", type=lambda t: bench_aggregators.parse_names(t, BACKENDS,
                                                                            "backends"),
                      default=",".join(BACKENDS), help="comma-separated backends")
  parser.add_argument("--workers", type=report.positive_int,
                      default=16, help="simulated workers (n)")
  parser.add_argument("--batch-size", type=report.positive_int,
                      default=32, help="examples per worker")
  parser.add_argument("--steps", type=report.positive_int, default=100, help="steps per timing")
  parser.add_argument("--reps", type=report.positive_int,
                      default=5, help="timings per rule and backend")
  parser.add_argument("--learning-rate", type=float, default=0.05, help="SGD step size")
  parser.add_argument("--seed", type=int, default=0, help="seed (model, batches)")
  parser.add_argument("--out", default=os.path.join("results", "bench"), help="output folder")
  parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
  parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the throughput benchmark; returns the results dict also written as JSON."""
  args = parse_args(argv)
  rules = [rule for rule in STEP_RULES if rule.name in args.rules]
  problem = make_problem(args.workers, args.batch_size, num_batches=8, seed=args.seed)
  try:
    from tqdm import tqdm
    progress = tqdm(total=len(rules) * len(args.backends), disable=args.quiet, desc="steps",
                    unit="rule")
  except ImportError:
    progress = None
  records = []
  for backend in args.backends:
    try:
      records += bench_backend(backend, rules, problem, args, progress)
    except Exception as error:  # noqa: BLE001 - e.g. averaging itself fails on this backend
      records += [{"backend": backend, "rule": rule.name,
                   "status": f"n/a ({type(error).__name__}: {str(error)[:160]})"}
                  for rule in rules]
  if progress is not None:
    progress.close()
  results = {"machine": bench_aggregators.machine_summary(),
             "devices": len(jax.devices()),
             "args": vars(args), "records": records}
  os.makedirs(args.out, exist_ok=True)
  report.atomic_write_text(os.path.join(args.out, "throughput.json"),
                                json.dumps(results, indent=1))
  table = markdown(results)
  report.atomic_write_text(os.path.join(args.out, "throughput.md"), table)
  if not args.no_plot and any("ratio_to_mean" in r for r in records):
    plot(results, os.path.join(args.out, "throughput.png"))
  if not args.quiet:
    print(table, file=sys.stdout)
  return results


if __name__ == "__main__":
  main()
