r"""Does the Flag Aggregator reach its objective's minimum? Convergence and local minima.

For each problem family (n = 15 workers unless stated, float32), this script reports:

* how many IRLS updates ``flag_solve`` needs to meet its stopping rule (``tol = 1e-6``, with
  no cap), and the share of problems that converge within the default cap;
* the gap between flagjax's objective ``A`` and the best minimum found by an independent
  minimiser: Riemannian gradient descent on the Grassmannian from many random starts, in
  float64 (:func:`grassmann_minimum`), for one IRLS start and for ``num_starts = 8``.

The minimum lies in the span of the rows (components of ``Y`` outside it only lower every
``|Y^T u_i|``), so the reference optimises over ``r``-dimensional subspaces of that span, an
``m <= n`` dimensional space: restarts are cheap whatever ``d`` is.

A second table (``--training-steps``, default 40) takes the workers' gradients along a real
training run: the digits MLP, 16 workers, trained with ``flag`` itself. For each step it
reports the IRLS updates ``flag_solve`` needs (no cap), whether the default cap suffices, how
far the capped coefficients are from the converged ones, and what a warm start does: the IRLS
started from the previous step's converged weights instead of the flag mean (the option an
optax state could carry), its updates and its objective against the cold start's.

``python -m experiments.flag_convergence`` (about 80 s) prints both tables in markdown.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

import numpy as np

from experiments import report

__all__ = ["FAMILIES", "family_problem", "grassmann_minimum", "objective_in_span",
           "training_grams", "training_table", "main"]

# name -> (n, d, rank, lam, kind of Byzantine rows, count)
FAMILIES = {
    "iid d=20": (15, 20, 8, 0.0, None, 0),
    "iid d=1000": (15, 1000, 8, 0.0, None, 0),
    "3 uniform rows": (15, 1000, 8, 0.0, "uniform", 3),
    "lam=1": (15, 1000, 8, 1.0, None, 0),
    "lam=8, 3 uniform rows": (15, 1000, 8, 8.0, "uniform", 3),
    "lam=8, 3 large rows": (15, 1000, 8, 8.0, "large", 3),
    "n=7, r=2": (7, 1000, 2, 0.0, None, 0),
}


def family_problem(name: str, seed: int) -> tuple[np.ndarray, int, float]:
  """``(x [n, d] float32, rank, lam)`` of one problem of a family."""
  n, d, rank, lam, kind, count = FAMILIES[name]
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  if kind == "uniform":
    x[n - count:] = rng.uniform(size=(count, d))
  elif kind == "large":
    x[n - count:] = 100 * rng.normal(size=(count, d))
  return x.astype(np.float32), rank, lam


def _span_vectors(x: np.ndarray, lam: float):
  """Unit rows and unit pair directions in an orthonormal basis of the rows' span."""
  x = np.asarray(x, np.float64)
  units = x / np.linalg.norm(x, axis=1, keepdims=True)
  basis = np.linalg.svd(units.T, full_matrices=False)[0]
  a = units @ basis                                          # [n, m]
  pairs = []
  if lam > 0:
    n = len(a)
    for i in range(n):
      for j in range(i + 1, n):
        diff = a[i] - a[j]
        norm = np.linalg.norm(diff)
        if norm > 1e-6:
          pairs.append(diff / norm)
  return a, np.array(pairs).reshape(-1, a.shape[1])


def objective_in_span(Z: np.ndarray, a: np.ndarray, pairs: np.ndarray, lam: float,
                      smoothing: float = 0.0) -> float:
  """``A`` for the subspace spanned by the orthonormal columns of ``Z`` (span coordinates)."""
  sines = np.sqrt(np.maximum(1 - np.sum((a @ Z) ** 2, 1), 0) + smoothing)
  total = sines.sum()
  if lam > 0 and len(pairs):
    total += lam * np.mean(np.sqrt(np.maximum(1 - np.sum((pairs @ Z) ** 2, 1), 0)
                                   + smoothing))
  return float(total)


def _gradient(Z, a, pairs, lam, smoothing):
  def part(vectors, scale):
    projections = vectors @ Z                                # [k, r]
    sines = np.sqrt(np.maximum(1 - np.sum(projections ** 2, 1), 0) + smoothing)
    return -scale * (vectors.T @ (projections / sines[:, None]))
  grad = part(a, 1.0)
  if lam > 0 and len(pairs):
    grad += part(pairs, lam / len(pairs))
  return grad - Z @ (Z.T @ grad)                             # Riemannian gradient


def grassmann_minimum(x: np.ndarray, rank: int, lam: float, *, restarts: int = 60,
                      steps: int = 400, seed: int = 0) -> float:
  """The least ``A`` found by Riemannian gradient descent (Armijo steps, QR retraction) from
  ``restarts`` random subspaces of the rows' span, then polished without smoothing."""
  a, pairs = _span_vectors(x, lam)
  m = a.shape[1]
  rank = min(rank, m)
  rng = np.random.default_rng(seed)
  best = np.inf
  for _ in range(restarts):
    Z = np.linalg.qr(rng.normal(size=(m, rank)))[0]
    for smoothing in (1e-8, 0.0):
      value = objective_in_span(Z, a, pairs, lam, smoothing + 1e-14)
      step = 0.1
      for _ in range(steps):
        grad = _gradient(Z, a, pairs, lam, smoothing + 1e-14)
        norm = np.linalg.norm(grad)
        if norm < 1e-12:
          break
        while step > 1e-12:
          candidate = np.linalg.qr(Z - step * grad)[0]
          new = objective_in_span(candidate, a, pairs, lam, smoothing + 1e-14)
          if new <= value - 1e-4 * step * norm ** 2:
            Z, value = candidate, new
            step *= 2
            break
          step /= 2
        else:
          break
    best = min(best, objective_in_span(Z, a, pairs, lam))
  return best


def _measure(name: str, seeds: Sequence[int], cap: int, restarts: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flagjax import aggregators
  solve = jax.jit(aggregators.flag_solve, static_argnames=("rank", "max_iters", "num_starts"))
  updates, converged_at_cap, gaps_single, gaps_default = [], [], [], []
  for seed in seeds:
    x, rank, lam = family_problem(name, seed)
    uncapped = solve(jnp.asarray(x), rank=rank, lam=lam, max_iters=1000, num_starts=1)
    updates.append(int(uncapped.num_iters))
    capped = solve(jnp.asarray(x), rank=rank, lam=lam, max_iters=cap, num_starts=1)
    converged_at_cap.append(bool(capped.converged))
    best = grassmann_minimum(x, rank, lam, restarts=restarts, seed=seed)
    single = solve(jnp.asarray(x), rank=rank, lam=lam, max_iters=1000, num_starts=1)
    several = solve(jnp.asarray(x), rank=rank, lam=lam, max_iters=1000, num_starts=8)
    best = min(best, float(single.objective), float(several.objective))
    gaps_single.append((float(single.objective) - best) / best)
    gaps_default.append((float(several.objective) - best) / best)
  return {"updates": updates, "converged": converged_at_cap, "gap_single": gaps_single,
          "gap_default": gaps_default}


def training_grams(num_steps: int, *, num_workers: int = 16, batch_size: int = 32,
                   learning_rate: float = 0.1, seed: int = 0) -> list:
  """Gram matrices of the workers' gradients at ``num_steps`` consecutive steps of the digits
  MLP trained by plain SGD on ``flag``'s aggregate (all workers honest)."""
  import jax
  from experiments import bench_throughput
  from flagjax import aggregators
  from flagjax.core import gram as gram_lib
  loss_fn, params, batches = bench_throughput.make_problem(num_workers, batch_size, num_steps,
                                                           seed)
  grads_fn = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))
  aggregate = jax.jit(aggregators.flag)
  grams = []
  for batch in batches:
    grads = grads_fn(params, batch)
    grams.append(gram_lib.gram(grads))
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, aggregate(grads))
  return grams


def training_table(num_steps: int) -> list[str]:
  """Markdown rows: convergence of the default ``flag`` on real training gradients."""
  import inspect
  import jax
  import jax.numpy as jnp
  from flagjax import aggregators
  flag_lib = importlib.import_module("flagjax.aggregators.flag")
  cap = inspect.signature(aggregators.flag_solve).parameters["max_iters"].default
  solve = jax.jit(flag_lib.flag_solve_gram, static_argnames=("max_iters",))

  @jax.jit
  def warm(K, weights):
    problem = flag_lib._problem(K, flag_lib.default_rank(K.shape[0]), 0.0)
    state = flag_lib._irls(problem, 10_000, 1e-6, 1e-7, weights)
    new_weights = jnp.where(problem.kept, jax.lax.rsqrt(state.fit.sines + 1e-7), 0)
    return state.objective, state.num_iters, new_weights

  updates, within, distance, warm_updates, warm_gap = [], [], [], [], []
  previous = None
  for K in training_grams(num_steps):
    converged = solve(K, max_iters=10_000)
    capped = solve(K)
    updates.append(int(converged.num_iters))
    within.append(bool(capped.converged))
    c, c_cap = np.asarray(converged.coefficients), np.asarray(capped.coefficients)
    distance.append(float(np.linalg.norm(c_cap - c) / np.linalg.norm(c)))
    # The cold start's own converged weights, then the next step started from them.
    cold_objective, _, weights = warm(K, jnp.ones(K.shape[0], K.dtype))
    if previous is not None:
      objective, num_iters, _ = warm(K, previous)
      warm_updates.append(int(num_iters))
      warm_gap.append(float(objective - cold_objective) / float(cold_objective))
    previous = weights
  pct = lambda v, q: np.percentile(v, q)  # noqa: E731
  return [
      f"| IRLS updates to converge (median, 90th percentile, max) | {int(np.median(updates))}, "
      f"{int(pct(updates, 90))}, {max(updates)} |",
      f"| converged within the default cap ({cap}) | {sum(within)}/{len(within)} |",
      f"| capped coefficients' distance to the converged ones, relative (median, max) | "
      f"{np.median(distance):.1%}, {max(distance):.1%} |",
      f"| warm start from the previous step's weights: updates (median, max) | "
      f"{int(np.median(warm_updates))}, {max(warm_updates)} |",
      f"| warm start: objective above the cold start's (median, min, max) | "
      f"{np.median(warm_gap):.1%}, {min(warm_gap):.1%}, {max(warm_gap):.1%} |",
  ]


def _training_steps(text: str) -> int:
  """An argparse type: 0 (no training table) or an integer >= 2 (the warm-start rows compare
  each step with the previous one, so one step leaves them empty)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected 0 or an integer >= 2, got {text!r}") from None
  if value < 0 or value == 1:
    raise argparse.ArgumentTypeError(f"expected 0 or an integer >= 2, got {text!r}")
  return value


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.flag_convergence",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--problems", type=report.positive_int, default=5, help="problems per family")
  parser.add_argument("--restarts", type=report.positive_int, default=40,
                      help="random starts of the Grassmannian reference per problem")
  parser.add_argument("--training-steps", type=_training_steps, default=40,
                      help="steps of the digits-MLP run for the second table, at least 2 "
                           "(each step is compared with the one before it; 0: skip the table)")
  args = parser.parse_args(argv)
  import inspect
  from flagjax import aggregators
  cap = inspect.signature(aggregators.flag_solve).parameters["max_iters"].default
  print(f"| family | IRLS updates to converge (median, max) | converged within the default "
        f"cap ({cap}) | objective gap, 1 start (median, max) | gap, 8 starts |")
  print("|---|---|---|---|---|")
  for name in FAMILIES:
    m = _measure(name, range(args.problems), cap, args.restarts)
    print(f"| {name} | {int(np.median(m['updates']))}, {max(m['updates'])} | "
          f"{sum(m['converged'])}/{len(m['converged'])} | "
          f"{np.median(m['gap_single']):.2%}, {max(m['gap_single']):.2%} | "
          f"{np.median(m['gap_default']):.2%}, {max(m['gap_default']):.2%} |", flush=True)
  if args.training_steps:
    print(f"\nDigits MLP, 16 workers, gradients of {args.training_steps} consecutive steps of a "
          f"run trained with `flag` (float32, tol = 1e-6):\n")
    print("| measure | value |")
    print("|---|---|")
    for row in training_table(args.training_steps):
      print(row, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
