r"""Multi-host training with ``backend="shard_map"``: several processes, one simulation.

Each process is one "host": it joins the others with ``jax.distributed.initialize``, holds its
own share of the workers (``num_workers / num_processes``, the batch built with
``jax.make_array_from_process_local_data``) and passes its own, equal, host-local ``params``,
``opt_state`` and ``key`` to the same ``step``; the step turns them into global replicated
arrays and the coordinate-sharded aggregation's ``all_to_all``/``psum``/``all_gather`` cross
the hosts (gloo on CPU). Nothing else changes from one process.

Four configurations are trained for ``--steps`` steps (16 workers, the last 3 sending ALIE,
a linear regression), one of each kind of aggregator state:

* ``krum``: a Gram-space rule (one ``n x n`` ``psum``);
* ``trimmed_mean``: a coordinate-wise rule (sorting network on each coordinate shard);
* ``centered_clipping_momentum``: centered clipping around the last aggregate with worker
  momentum (state in natural layout, replicated);
* ``nnm_flag_adam``: ``aggregating.process(preaggregate(nnm), aggregate(flag), adam)``.

Run on one machine (spawns the processes on localhost, each with ``--local-devices`` CPU
devices, then one process with all the devices for comparison, and reports the largest
difference and the step times)::

    python -m experiments.multihost --launch 2

or one process per host yourself (the same command on every host, its own id)::

    python -m experiments.multihost --coordinator HOST0:PORT --num-processes 2 \
        --process-id 0 --out results/multihost

Each process writes ``process_<id>.npz`` (final params per configuration, the metrics, and the
median step time) atomically into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

from experiments import report

NUM_WORKERS, NUM_BYZANTINE, IN_DIM, OUT_DIM, PER_WORKER = 16, 3, 20, 5, 8
CONFIGS = ("krum", "trimmed_mean", "centered_clipping_momentum", "nnm_flag_adam")


def make_tx(name: str):
  """The optax transformation of configuration ``name``."""
  import optax
  from optax.experimental import aggregating

  import flagjax
  from flagjax import aggregators, preaggregators
  n, f = NUM_WORKERS, NUM_BYZANTINE
  if name == "krum":
    return optax.chain(flagjax.aggregate(aggregators.krum, f=f, num_workers=n), optax.sgd(0.1))
  if name == "trimmed_mean":
    return optax.chain(flagjax.aggregate(aggregators.trimmed_mean, f=f, num_workers=n),
                       optax.sgd(0.1))
  if name == "centered_clipping_momentum":
    return optax.chain(flagjax.aggregate(aggregators.centered_clipping, tau=1.0,
                                         worker_momentum=0.9, num_workers=n), optax.sgd(0.1))
  if name == "nnm_flag_adam":
    return aggregating.process(flagjax.preaggregate(preaggregators.nnm, f=f),
                               flagjax.aggregate(aggregators.flag, num_workers=n),
                               optax.adam(0.05))
  raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")


def loss_fn(params, batch):
  import jax.numpy as jnp
  prediction = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((prediction - batch["y"]) ** 2)


def global_batch(step: int) -> dict:
  """Every worker's batch of step ``step`` (numpy, the same on every host)."""
  rng = np.random.default_rng(1000 + step)
  truth = np.random.default_rng(0)
  w = truth.normal(size=(IN_DIM, OUT_DIM))
  x = rng.normal(size=(NUM_WORKERS, PER_WORKER, IN_DIM))
  y = x @ w + 0.1 * rng.normal(size=(NUM_WORKERS, PER_WORKER, OUT_DIM))
  return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def train(name: str, steps: int, *, backend: str = "shard_map") -> dict:
  """Trains configuration ``name``; ``{"params": flat final params, "losses", "step_s"}``.

  Each process passes host-local numpy params, ``tx.init`` state and a plain
  ``jax.random.key``; its rows of the batch come from
  ``jax.make_array_from_process_local_data`` (the workers it holds).
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import flagjax
  tx = make_tx(name)
  step = flagjax.sim.make_train_step(loss_fn, tx, num_workers=NUM_WORKERS,
                                     num_byzantine=NUM_BYZANTINE, attack=flagjax.attacks.alie,
                                     backend=backend)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("workers",))
  rows = NamedSharding(mesh, P("workers"))
  per_process = NUM_WORKERS // jax.process_count()
  mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  params = {"w": np.zeros((IN_DIM, OUT_DIM), np.float32), "b": np.zeros(OUT_DIM, np.float32)}
  opt_state = tx.init(params)
  losses, times = [], []
  for i in range(steps):
    local = {k: v[mine] for k, v in global_batch(i).items()}
    batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(rows, a), local)
    start = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
    losses.append(float(np.asarray(metrics["honest_loss"].addressable_data(0))))
  flat = np.concatenate([np.asarray(params[k].addressable_data(0)).ravel() for k in ("w", "b")])
  return {"params": flat, "losses": np.asarray(losses),
          "step_s": float(np.median(times[1:])) if steps > 1 else float("nan")}


def pmap_is_refused() -> bool:
  """Whether ``backend="pmap"`` across processes raises the documented ``ValueError``."""
  import flagjax
  try:
    flagjax.sim.make_train_step(loss_fn, make_tx("krum"), num_workers=NUM_WORKERS,
                                num_byzantine=NUM_BYZANTINE, backend="pmap")
  except ValueError as error:
    return "backend='shard_map' across hosts" in str(error)
  return False


def run_process(args) -> None:
  """One process: join, train every configuration, write ``process_<id>.npz``."""
  import jax
  if args.local_devices and jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", args.local_devices)
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  arrays = {"pmap_refused": np.asarray(pmap_is_refused() if args.num_processes > 1 else True),
            "num_devices": np.asarray(len(jax.devices()))}
  for name in args.configs:
    result = train(name, args.steps)
    for key, value in result.items():
      arrays[f"{name}/{key}"] = np.asarray(value)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  report.atomic_write_bytes(os.path.join(args.out, f"process_{args.process_id}.npz"),
                            buffer.getvalue())


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def launch(num_processes: int, local_devices: int, out: str, steps: int,
           configs: Sequence[str], timeout: float = 600.0) -> list[dict]:
  """Runs ``num_processes`` local processes (and returns each one's arrays)."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices set per process
  command = [sys.executable, "-m", "experiments.multihost", "--num-processes",
             str(num_processes), "--coordinator", f"127.0.0.1:{port}", "--local-devices",
             str(local_devices), "--steps", str(steps), "--out", out,
             "--configs", ",".join(configs)]
  processes = [subprocess.Popen(command + ["--process-id", str(i)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(num_processes)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=timeout)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for i, (process, output) in enumerate(zip(processes, outputs)):
    if process.returncode != 0:
      raise RuntimeError(f"process {i} of {num_processes} failed ({process.returncode}):\n"
                         f"{output[-4000:]}")
  return [dict(np.load(os.path.join(out, f"process_{i}.npz"))) for i in range(num_processes)]


def parse_args(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(
      prog="python -m experiments.multihost", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--launch", type=int, default=0, metavar="P",
                      help="spawn P local processes (and one reference process with all "
                           "the devices) and compare them; the rest is set for you")
  parser.add_argument("--process-id", type=int, default=0, help="this process's id")
  parser.add_argument("--num-processes", type=report.positive_int,
                      default=1, help="processes in all")
  parser.add_argument("--coordinator", default="127.0.0.1:12355",
                      help="host:port of process 0's coordinator")
  parser.add_argument("--local-devices", type=report.positive_int, default=4,
                      help="CPU devices per process (ignored on GPU/TPU)")
  parser.add_argument("--steps", type=report.positive_int,
                      default=5, help="training steps per configuration")
  parser.add_argument("--configs", default=",".join(CONFIGS),
                      help=f"comma-separated, from {', '.join(CONFIGS)}")
  parser.add_argument("--out", default="results/multihost", help="output directory")
  args = parser.parse_args(argv)
  args.configs = [c for c in args.configs.split(",") if c]
  for name in args.configs:
    if name not in CONFIGS:
      parser.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if not args.launch:
    run_process(args)
    return 0
  hosts = launch(args.launch, args.local_devices, os.path.join(args.out, "hosts"), args.steps,
                 args.configs)
  single = launch(1, args.launch * args.local_devices, os.path.join(args.out, "single"),
                  args.steps, args.configs)[0]
  report = {}
  for name in args.configs:
    key = f"{name}/params"
    report[name] = {
        "processes_bitwise_equal": all(np.array_equal(h[key], hosts[0][key]) for h in hosts),
        "max_abs_difference_vs_one_process": float(np.max(np.abs(hosts[0][key] - single[key]))),
        "step_s_multi_process": float(hosts[0][f"{name}/step_s"]),
        "step_s_one_process": float(single[f"{name}/step_s"]),
    }
  report["pmap_refused_across_processes"] = bool(hosts[0]["pmap_refused"])
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
