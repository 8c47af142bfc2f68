r"""Which order-statistics method for which n? The crossover behind ``flagjax.core.sorting``.

The coordinate-wise median of a float32 ``[n, d]`` input, four ways, each timed against one
pass ``ones @ x`` interleaved with it (medians of ``--reps`` calls; compilation timed apart):

* ``network``: the unrolled, pruned Batcher network (``flagjax.core.sorting.order_statistics``
  on the ``n`` rows; skipped above ``--network-max-n``, where XLA's compilation of the
  unrolled program runs for minutes);
* ``bitonic``: the staged bitonic network on column blocks
  (``flagjax.core.sorting.sorted_statistic`` above its crossover);
* ``sort``: ``jnp.median`` (XLA's sort along axis 0);
* ``top_k``: ``jax.lax.top_k`` of the transposed input for the ``n // 2 + 1`` largest.

``flagjax.core.sorting.NETWORK_MAX_WORKERS`` is the largest n at which ``network`` was the
fastest of these on a 2-core CPU; ``flagjax.aggregators.median`` takes it up to there and
``bitonic`` above. Outputs (atomic writes) in ``--out``: ``sorting.json``, ``sorting.md``.

Example::

    python -m experiments.bench_sorting --n 32,64,128,256,1024 --d 1e5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_aggregators
from experiments import report
from flagjax.core import sorting


def _median(network_max_workers):
  """The median through ``sorting.sorted_statistic`` with its crossover moved."""
  def median(x):
    return sorting.sorted_statistic(x, sorting.median_of_sorted,
                                    sorting.median_positions(x.shape[0]),
                                    network_max_workers=network_max_workers)
  return median


def _top_k_median(x):
  n = x.shape[0]
  largest = jax.lax.top_k(x.T, n // 2 + 1)[0]
  return largest[:, -1] if n % 2 else 0.5 * largest[:, -1] + 0.5 * largest[:, -2]


METHODS = {"network": _median(10**9), "bitonic": _median(0),
           "sort": lambda x: jnp.median(x, axis=0), "top_k": _top_k_median}


def bench(n: int, d: int, reps: int, network_max_n: int) -> dict:
  x = jax.random.normal(jax.random.key(n), (n, d), jnp.float32)
  expected = np.median(np.asarray(x), axis=0)
  ones = jnp.ones((n,), jnp.float32)
  calls = {"one_pass": jax.jit(lambda v: ones @ v)}
  compile_s = {}
  for name, fn in METHODS.items():
    if name == "network" and n > network_max_n:
      continue
    start = time.perf_counter()
    calls[name] = jax.jit(fn).lower(x).compile()
    compile_s[name] = time.perf_counter() - start
    np.testing.assert_allclose(calls[name](x), expected, rtol=1e-6, atol=1e-6)
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[name].append(time.perf_counter() - start)
  one = float(np.median(times["one_pass"]))
  record = {"n": n, "d": d, "one_pass_ms": one * 1e3, "methods": {}}
  for name in METHODS:
    if name in compile_s:
      ms = float(np.median(times[name])) * 1e3
      record["methods"][name] = {"ms": ms, "ratio_to_one_pass": ms / 1e3 / one,
                                 "compile_s": compile_s[name]}
  record["fastest"] = min(record["methods"], key=lambda m: record["methods"][m]["ms"])
  return record


def markdown(results: dict) -> str:
  lines = [f"# Coordinate-wise median: which method for which n "
           f"({results['machine']['summary']})", "",
           f"float32, d = {results['d']:,}; each method's median time over one pass `ones @ x` "
           f"interleaved with it (compilation in brackets). flagjax uses the unrolled network "
           f"up to n = {sorting.NETWORK_MAX_WORKERS} and the staged bitonic network above.", "",
           "| n | " + " | ".join(METHODS) + " | fastest |",
           "|---:|" + "---:|" * len(METHODS) + "---|"]
  for record in results["cells"]:
    cells = []
    for name in METHODS:
      m = record["methods"].get(name)
      cells.append(f"{m['ratio_to_one_pass']:.3g}x ({m['compile_s']:.1f} s)" if m else
                   "not compiled")
    lines.append(f"| {record['n']} | " + " | ".join(cells) + f" | {record['fastest']} |")
  return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_sorting",
                                   description=__doc__,
                                   formatter_class=bench_aggregators.HelpFormatter)
  parser.add_argument("--n", type=report.positive_sizes, default="32,64,128,256,1024",
                      help="comma-separated numbers of workers")
  parser.add_argument("--d", type=report.positive_int,
                      default=100_000, help="number of coordinates")
  parser.add_argument("--reps", type=report.positive_int, default=5, help="timed calls per method")
  parser.add_argument("--network-max-n", type=report.positive_int,
                      default=sorting.NETWORK_MAX_WORKERS,
                      help="largest n for which the unrolled network is compiled")
  parser.add_argument("--out", default=os.path.join("results", "bench"),
                      help="output folder")
  parser.add_argument("--quiet", action="store_true", help="no table on stdout")
  args = parser.parse_args(argv)
  d = int(args.d)
  results = {"machine": bench_aggregators.machine_summary(), "d": d,
             "cells": [bench(n, d, args.reps, args.network_max_n) for n in args.n]}
  os.makedirs(args.out, exist_ok=True)
  report.atomic_write_text(os.path.join(args.out, "sorting.json"),
                               json.dumps(results, indent=1))
  table = markdown(results)
  report.atomic_write_text(os.path.join(args.out, "sorting.md"), table)
  if not args.quiet:
    print(table)
  return results


if __name__ == "__main__":
  main()
