r"""Does every rule give the CPU's answer on an accelerator? flagjax on two backends.

For one input ``x [n, d]`` (float32: ``n - f`` Gaussian rows, one of them duplicated, ``f - 1``
rows 100x away and one NaN row), every flagjax rule of :mod:`experiments.bench_aggregators`
runs jitted on the accelerator (JAX's default backend) and on the CPU, and the table gives

* ``max |acc - cpu| / max |cpu|``: the rules compute the same float32 arithmetic in a
  different order, so this should be a few float32 epsilons times the condition of the rule
  (a rule whose choice is decided by a near-tie may legitimately choose differently);
* the accelerator's time against one pass ``ones @ x`` there (medians of interleaved calls,
  as in the benchmark).

It also measures what a product at JAX's *default* precision would have cost in accuracy on
this backend: the mean as ``ones @ x / n`` at the default precision and at ``HIGHEST``,
against a float64 mean. On recent NVIDIA GPUs the default is TF32 (10 mantissa bits) and on
TPUs bfloat16 passes (8 bits), so every product in flagjax asks for ``HIGHEST``
(``tests/test_precision.py`` checks this on the traced programs; the CPU ignores the setting,
so only an accelerator shows the difference).

Usage::

    python -m experiments.backend_check --n 32 --d 1e6,1e7 --out results/backend

Writes ``backend.json`` and ``backend.md`` atomically into ``--out``. Without an accelerator
both sides are the CPU and the table only checks the script.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_aggregators
from experiments import report


def nasty_rows(n: int, d: int, f: int, seed: int = 0) -> np.ndarray:
  """``n - f`` Gaussian rows (row 1 a copy of row 0), ``f - 1`` rows 100x away and one NaN
  (with ``f >= 1``; ``f = 0``: Gaussian rows only)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  if n > 1:
    x[1] = x[0]
  if f >= 1:
    x[n - f:n - 1] = 100 * rng.normal(size=(f - 1, d))
    x[n - 1, ::7] = np.nan
  return x


def default_precision_error(x: np.ndarray, device) -> dict:
  """Relative error of the mean of the finite rows as a product at the default precision and at
  HIGHEST, on ``device``, against float64."""
  finite = np.all(np.isfinite(x), axis=1)
  rows = x[finite]
  exact = rows.astype(np.float64).mean(0)
  ones = np.full((rows.shape[0],), 1.0 / rows.shape[0], np.float32)
  on = jax.device_put((ones, rows), device)
  errors = {}
  for name, precision in (("default", None), ("highest", jax.lax.Precision.HIGHEST)):
    mean = jax.jit(lambda w, r, p=precision: jnp.matmul(w, r, precision=p))(*on)
    errors[name] = float(np.max(np.abs(np.asarray(mean, np.float64) - exact))
                         / np.max(np.abs(exact)))
  return errors


def compare(n: int, d: int, reps: int, rules: Optional[Sequence[str]] = None,
            verbose: bool = True) -> dict:
  """One input of ``[n, d]``, every (chosen) rule on the default backend and on the CPU."""
  accelerator = jax.devices()[0]
  cpu = jax.devices("cpu")[0]
  f = n // 4
  x = nasty_rows(n, d, f)
  x_acc, x_cpu = jax.device_put(x, accelerator), jax.device_put(x, cpu)
  one_pass = jax.jit(lambda x: jnp.matmul(jnp.ones((x.shape[0],), x.dtype), x,
                                          precision=jax.lax.Precision.HIGHEST))
  sync_call = bench_aggregators._sync_call  # noqa: SLF001 - the benchmark's own timer
  rows = []
  for rule in bench_aggregators.RULES:
    if (rules and rule.name not in rules) or rule.donate:
      continue                       # a donated row is the same function as its plain row
    rule_f = bench_aggregators._rule_f(rule, n)  # noqa: SLF001 - the benchmark's own bound
    fn = jax.jit(rule.flagjax(n, rule_f))
    try:
      on_cpu = np.asarray(fn(x_cpu), np.float64)
      on_acc = np.asarray(fn(x_acc), np.float64)
    except ValueError as error:      # a bound this input breaks (e.g. SMEA's subset limit)
      rows.append({"rule": rule.name, "f": rule_f, "error": str(error)})
      continue
    scale = np.nanmax(np.abs(on_cpu)) if np.any(np.isfinite(on_cpu)) else 1.0
    same_nan = bool(np.array_equal(np.isnan(on_cpu), np.isnan(on_acc)))
    diff = np.where(np.isnan(on_cpu) & np.isnan(on_acc), 0, np.abs(on_acc - on_cpu))
    times = {"rule": [], "one_pass": []}
    for _ in range(reps):            # interleaved, so load that comes and goes hits both
      times["one_pass"].append(sync_call(one_pass, x_acc))
      times["rule"].append(sync_call(fn, x_acc))
    rule_s, pass_s = float(np.median(times["rule"])), float(np.median(times["one_pass"]))
    rows.append({"rule": rule.name, "f": rule_f, "relative_difference": float(np.max(diff) / scale),
                 "same_nan": same_nan, "seconds": rule_s, "one_pass_seconds": pass_s,
                 "x_one_pass": rule_s / pass_s})
    if verbose:
      print(f"{rule.name:32s} diff {rows[-1]['relative_difference']:.2e}  "
            f"{rule_s * 1e3:9.3f} ms  {rule_s / pass_s:6.2f}x one pass", flush=True)
  return {"n": n, "d": d, "f": f, "accelerator": str(accelerator.device_kind),
          "platform": accelerator.platform, "jax": jax.__version__,
          "default_precision_error": default_precision_error(x, accelerator), "rules": rows}


def markdown(result: dict) -> str:
  errors = result["default_precision_error"]
  lines = [f"# flagjax on {result['accelerator']} ({result['platform']}) against the CPU",
           "",
           f"n = {result['n']}, d = {result['d']:g}, f = {result['f']}, float32, jax "
           f"{result['jax']}. The mean of the finite rows as one product: relative error "
           f"{errors['default']:.1e} at JAX's default precision, {errors['highest']:.1e} at "
           "HIGHEST (against float64).",
           "",
           "| rule | max abs difference / max abs (CPU) | NaN where the CPU has NaN | ms "
           "| x one pass |",
           "|---|---:|:---:|---:|---:|"]
  for row in result["rules"]:
    if "error" in row:
      lines.append(f"| {row['rule']} | refused: {row['error'][:80]} | | | |")
      continue
    lines.append(f"| {row['rule']} | {row['relative_difference']:.1e} | "
                 f"{'yes' if row['same_nan'] else 'NO'} | {row['seconds'] * 1e3:.3f} | "
                 f"{row['x_one_pass']:.2f} |")
  return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.backend_check", description=__doc__,
      formatter_class=bench_aggregators.HelpFormatter)
  parser.add_argument("--n", type=report.positive_int,
                      default=32, help="workers (rows); f = n // 4")
  parser.add_argument("--d", type=report.positive_sizes, default=[10**6],
                      help="comma-separated numbers of coordinates (1e6 notation accepted); one "
                      "table per d")
  parser.add_argument("--reps", type=report.positive_int, default=11, help="timed calls per rule")
  parser.add_argument("--rules", type=lambda t: bench_aggregators.parse_names(
      t, bench_aggregators.RULE_NAMES, "rules"), default=None,
                      help="comma-separated rules (default: every rule of the benchmark; its "
                      "donated rows are the same functions and are skipped)")
  parser.add_argument("--out", default=os.path.join("results", "backend"), help="output folder")
  parser.add_argument("--quiet", action="store_true", help="no line per rule")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for d in args.d:
    results.append(compare(args.n, d, args.reps, args.rules, verbose=not args.quiet))
    report.atomic_write_json(os.path.join(args.out, "backend.json"), results)
    report.atomic_write_text(os.path.join(args.out, "backend.md"),
                             "\n".join(markdown(r) for r in results))
  if not args.quiet:
    print(json.dumps([r["default_precision_error"] for r in results]))
  return results


if __name__ == "__main__":
  main()
