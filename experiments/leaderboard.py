"""The robustness leaderboard: every rule against its worst attack, per f and heterogeneity.

For each rule, each number of Byzantine workers ``f`` and each heterogeneity level, a cell is
the **worst** final test accuracy over a set of attacks (mean over seeds; the spread is that
attack's std over seeds), and names the attack that achieved it. ``--help`` is the manual.

Fast because it is a grid: all runs of one (rule, f) group share one compiled program, a
``jax.vmap`` over runs of a ``lax.scan`` over steps (:func:`experiments.train.scan_steps`,
the same training as ``experiments.train``): every heterogeneity level, every seed and every
gradient attack, plain or adaptive (:func:`switchable_attack`: a ``lax.switch`` on an
attack index, the program called once per attack). Compiling a training program (~2 s on 2
cores) costs ~40 runs of 200 steps, so the more runs share one, the fewer seconds per run.
Attacks that change more than the Byzantine rows (data attacks, lossy links) keep a program
of their own per (rule, f). Each finished run is written atomically as a cell of the sweep's
store (``<out>/cells/<key>.json``, the key of :func:`experiments.sweep.cell_key`, so the
leaderboard and ``experiments.sweep`` name a run alike); a killed run restarts where it
stopped and never loses or duplicates a run. ``--jobs`` processes (default: the cores, up to
2), each pinned to its own share of the cores, share the groups
(:func:`run_board_in_processes`), with the same runs and results: the default grid, 10,080
runs, takes ~26 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shlex
import sys
import time
from typing import Callable, Optional, Sequence

from experiments import data as data_lib
from experiments import report
from experiments import specs
from experiments import sweep
from experiments import train
from experiments.specs import RuleUnavailable, UsageError

# The worst case over these (DESIGN.md, "experiments, worst-case evaluation").
DEFAULT_ATTACKS = ("sign_flip", "ipm", "alie", "optimal_alie", "optimal_ipm", "min_max",
                   "min_sum", "fang", "label_flip", "gaussian")
# Every rule of flagjax.aggregators, plus flag's released output scale: flag (scale="norm"),
# flag:scale=rank and normalized_mean separate the subspace from the normalisation.
DEFAULT_RULES = ("mean", "median", "trimmed_mean", "meamed", "phocas", "krum", "multi_krum",
                 "bulyan", "geometric_median", "centered_clipping", "mda", "monna", "flag",
                 "flag:scale=rank", "normalized_mean", "caf", "smea", "dnc", "signguard",
                 "clipped_clustering", "fltrust")
DEFAULT_FS = (1, 3, 5, 7)
DEFAULT_ALPHAS = (None, 1.0, 0.3, 0.1)   # None: IID
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 200


def _available_cores() -> list:
  """The cores this process may run on (its affinity where the OS tells it)."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


DEFAULT_JOBS = min(2, len(_available_cores()))

# The main job: the setting that separates the rules (15 workers, 6 Byzantine, Dirichlet 0.3
# non-IID shards), a few rules and attacks, in about half a minute on 2 cores.
QUICK = dict(rules=("mean", "median", "krum", "geometric_median", "centered_clipping", "flag",
                    "normalized_mean"),
             fs=(6,), alphas=(0.3,), attacks=("sign_flip", "alie", "min_max"), seeds=(0, 1, 2),
             steps=100)


def alpha_label(alpha: Optional[float]) -> str:
  return "IID" if alpha is None else f"Dir({alpha:g})"


class Board:
  """The grid: rules x f x heterogeneity x attacks x seeds on top of a base config."""

  def __init__(self, base: train.Config, rules: Sequence[str], fs: Sequence[int],
               alphas: Sequence[Optional[float]], attacks: Sequence[str],
               seeds: Sequence[int]):
    self.base = base
    self.rules, self.fs, self.alphas = list(rules), list(fs), list(alphas)
    self.attacks, self.seeds = list(attacks), list(seeds)
    self.labels = [specs.parse_spec(r, "rule").label for r in self.rules]
    self.attack_labels = [specs.parse_spec(a, "attack").label for a in self.attacks]

  def run_config(self, rule: str, f: int, attack: str, alpha, seed: int) -> train.Config:
    return self.base.replace(rules=(rule,), num_byzantine=f, attack=attack, alpha=alpha,
                             seeds=(seed,))

  def attack_families(self) -> list[tuple]:
    """The attacks in groups that share a program: every switchable one together (first),
    then each other attack alone."""
    switchable = tuple(a for a in self.attacks if switchable_attack(a))
    return ([switchable] if switchable else []) + [(a,) for a in self.attacks
                                                   if not switchable_attack(a)]

  def groups(self):
    """``(rule, f, attacks)`` groups in running order; each holds
    ``attacks x alphas x seeds`` runs and compiles one program."""
    return itertools.product(self.rules, self.fs, self.attack_families())

  def runs(self, rule: str, f: int, attacks: Sequence[str]):
    """``[(alpha, seed, key, config)]`` of one group (the config names the run's attack)."""
    out = []
    for attack in attacks:
      for alpha in self.alphas:
        for seed in self.seeds:
          config = self.run_config(rule, f, attack, alpha, seed)
          out.append((alpha, seed, sweep.cell_key(config), config))
    return out

  def __len__(self):
    return (len(self.rules) * len(self.fs) * len(self.attacks) * len(self.alphas)
            * len(self.seeds))


def _stack(trees):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def switchable_attack(attack: str) -> bool:
  """Whether runs under ``attack`` can share a program with other such attacks: a gradient
  attack, plain or adaptive (``optimal_alie`` / ``optimal_ipm``), which only replaces the
  Byzantine rows (same shapes for every attack)."""
  return specs.parse_spec(attack, "attack").name in (specs.GRADIENT_ATTACKS
                                                      + specs.ADAPTIVE_ATTACKS)


def _switched_attack(plans: Sequence[specs.AttackPlan], index) -> Callable:
  """``attack(honest, f, key)`` that runs ``plans[index].attack``.

  ``index`` is the same for every run of a batch (it is not vmapped), so the switch stays a
  real branch: each step runs one attack, and the program holds one training loop whatever
  the number of attacks (a vmapped index would run every attack for every run)."""
  import jax

  def attack(honest, f, key, **kwargs):
    branches = [lambda h, k, fn=plan.attack: fn(h, f, k, **kwargs) for plan in plans]
    return jax.lax.switch(index, branches, honest, key)
  return attack


# XLA's CPU backend at optimisation level 1 compiles a training program ~1.3-2.6x faster
# than at its default (fang's: 5.4 s -> 2.0 s) and runs it as fast (measured on the
# leaderboard's digits runs, 2 cores); compilation is most of a short run's cost.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def batched_runner(config: train.Config, prepared: train.Prepared, rule_text: str,
                   attacks: Optional[Sequence[str]] = None) -> Callable:
  """``run(configs) -> [(final accuracy, mean honest loss)]`` for runs that differ only in
  ``seed``, ``alpha`` and, among ``attacks`` (switchable ones, see :func:`switchable_attack`),
  ``attack``: one compiled program, a ``vmap`` over runs of a ``scan`` over steps, called
  once per attack with that attack's runs (a ``lax.switch`` picks the attack).

  Each run draws the same keys and takes the same steps as ``experiments.train`` would for
  its config alone.

  Raises:
    RuleUnavailable: the rule's bound on f is broken.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  attacks = tuple(attacks or (config.attack,))
  compiled = train.build_step(config.replace(attack=attacks[0]), prepared, rule_text)
  if len(attacks) > 1:
    rule = specs.parse_spec(rule_text, "rule")
    plans = [train.make_attack_plan(config.replace(attack=a), prepared, rule) for a in attacks]

  def one_run(params, opt_state, key, shards, attack_index, images, labels):
    step = compiled.step
    if len(attacks) > 1:
      plan = specs.AttackPlan(_switched_attack(plans, attack_index), None)
      step = train.build_step(config, prepared, rule_text, plan=plan).step
    params, _, loss, _ = train.scan_steps(step, config, params, opt_state, key, 0,
                                          config.steps, shards, images, labels)
    return prepared.accuracy(params), loss

  batched = jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, 0, None, None, None)),
                    compiler_options=_COMPILER_OPTIONS)

  def run(configs: Sequence[train.Config]) -> list:
    server = specs.takes_server_update(compiled.spec)
    results = [None] * len(configs)
    for index, attack in enumerate(attacks):
      chosen = [i for i, c in enumerate(configs) if c.attack == attack]
      if not chosen:
        continue
      states = [train.initial_state(configs[i], prepared, compiled.tx, configs[i].seeds[0],
                                    server=server) for i in chosen]
      params, opt_state, shards, keys = (_stack(part) for part in zip(*states))
      accuracy, loss = batched(params, opt_state, keys, shards, jnp.int32(index),
                               prepared.train_images, prepared.train_labels)
      for i, pair in zip(chosen, zip(np.asarray(accuracy).tolist(),
                                     np.asarray(loss).tolist())):
        results[i] = pair
    return results
  return run


def _record(key: str, rule_label: str, f: int, attack_label: str, alpha, seed,
            config: train.Config) -> dict:
  return {"key": key, "setting": f"{attack_label}, f = {f}, {alpha_label(alpha)}",
          "rule": rule_label, "attack": attack_label, "f": f, "alpha": alpha, "seed": seed,
          "config": config.results_key()}


def _eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_board(board: Board, out_dir: str, command: str, *, progress: bool = True,
              log=print, jobs: int = 1, claims: Optional[str] = None) -> dict:
  """Runs the missing runs group by group, each finished run written as it completes.

  ``jobs > 1``: :func:`run_board_in_processes`. ``claims``: this process is one of several
  sharing the work (:func:`_work`): it runs only the groups it claims first in that folder
  and writes no summary.
  """
  if jobs > 1:
    return run_board_in_processes(board, out_dir, command, jobs, progress=progress, log=log)
  parent = os.getppid()
  cells = sweep.cells_dir(out_dir)
  os.makedirs(cells, exist_ok=True)
  done = sweep.load_done(out_dir)
  total = len(board)
  already = sum(1 for group in board.groups() for *_, key, _ in board.runs(*group)
                if key in done)
  if already and claims is None:
    log(f"resuming: {already} of {total} runs already done in {cells}")
  bar = train.progress_bar(total - already, progress and claims is None, unit="run")
  if progress and claims is None:
    log = lambda line, _write=bar.write: _write(line, file=sys.stdout)
  prepared = train.prepare(board.base)
  start, computed, finished = time.perf_counter(), 0, already
  timing = {"runs": 0, "seconds": 0.0}

  try:
    for rule, f, attacks in board.groups():
      runs = board.runs(rule, f, attacks)
      todo = [run for run in runs if run[2] not in done]
      if claims is not None and os.getppid() != parent:
        break   # orphaned (the parent was killed): stop before the next group
      if not todo or (claims is not None and not _claim(claims, rule, f, attacks)):
        continue
      rule_label = specs.parse_spec(rule, "rule").label
      todo_attacks = tuple(a for a in attacks if any(c.attack == a for *_, c in todo))
      group_label = ", ".join(specs.parse_spec(a, "attack").label for a in todo_attacks)
      tic = time.perf_counter()
      try:
        group_config = todo[0][3]
        for attack in todo_attacks:
          train.validate(group_config.replace(attack=attack), allow_unavailable=True)
        results = batched_runner(group_config, prepared, rule, todo_attacks)(
            [c for *_, c in todo])
        reason = None
      except RuleUnavailable as error:
        results, reason = None, str(error)
      seconds = time.perf_counter() - tic
      for i, (alpha, seed, key, config) in enumerate(todo):
        attack_label = specs.parse_spec(config.attack, "attack").label
        record = _record(key, rule_label, f, attack_label, alpha, seed, config)
        if results is None:
          record.update(status="n/a", reason=reason)
        else:
          accuracy, loss = results[i]
          record.update(status="ok", final_accuracy=accuracy,
                        honest_loss=None if not math.isfinite(loss) else loss,
                        diverged=not math.isfinite(loss), batched_runs=len(todo),
                        seconds_per_run=seconds / len(todo))
        report.atomic_write_json(os.path.join(cells, f"{key}.json"), record)
        done[key] = record
      if results is not None:
        timing["runs"] += len(todo)
        timing["seconds"] += seconds
      computed += len(todo)
      finished += len(todo)
      bar.update(len(todo))
      elapsed = time.perf_counter() - start
      eta = elapsed / computed * (total - finished)
      result = "n/a" if results is None else f"{len(todo)} runs in {seconds:.1f} s"
      if claims is not None:   # the parent process counts and estimates
        log(f"{rule_label} | f = {f} | {group_label}: {result}")
      else:
        log(f"[{finished}/{total}] {rule_label} | f = {f} | {group_label}: {result} "
            f"(elapsed {_eta(elapsed)}, ETA {_eta(eta)})")
  finally:
    bar.close()
  if claims is not None:
    return {}
  return write_outputs(out_dir, board, done, command, timing)


def _claim(claims: str, rule: str, f: int, attacks: Sequence[str]) -> bool:
  """Whether this process takes the group: the first to create its claim file does."""
  import hashlib
  name = hashlib.sha256(repr((rule, f, tuple(attacks))).encode()).hexdigest()[:20]
  try:
    os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def _cores_of(index: int, jobs: int) -> Optional[list]:
  """The cores process ``index`` of ``jobs`` is pinned to: the available cores split into
  ``jobs`` disjoint, near-equal sets; ``None`` (not pinned) with fewer cores than processes
  or where the OS cannot pin a process."""
  cores = _available_cores()
  if not hasattr(os, "sched_setaffinity") or jobs < 2 or len(cores) < jobs:
    return None
  return cores[index * len(cores) // jobs:(index + 1) * len(cores) // jobs]


def _work(board: Board, out_dir: str, claims: str, cores: Optional[list] = None) -> None:
  """One of :func:`run_board_in_processes`' processes (started fresh: its own JAX), pinned
  to ``cores`` before JAX starts its CPU backend, which sizes its thread pool by them."""
  if cores is not None:
    os.sched_setaffinity(0, cores)
  run_board(board, out_dir, "", progress=False, claims=claims,
            log=lambda line: print(line, flush=True))


def run_board_in_processes(board: Board, out_dir: str, command: str, jobs: int, *,
                           progress: bool = True, log=print) -> dict:
  """:func:`run_board` with ``jobs`` processes sharing the groups, then the summary.

  Each process takes the next group no process has claimed (a claim file created
  exclusively), so the groups are shared as they come, whatever each costs. Each process is
  pinned to its own share of the cores (:func:`_cores_of`), so that XLA sizes its thread pool
  to them: a group's time mostly runs on one core (compilation, the ``n x n`` eigensolves and
  sorting networks of small rules; mean and CAF at f = 5 took 14.0 and 32.3 s on one core
  against 12.7 and 30.1 s on two), and two unpinned processes, each with a two-thread pool
  on the same two cores, ran each group ~1.5-2x slower (25.1 and 45.6 s side by side; pinned,
  14.0 and 33.2 s). The runs and their results are those of ``jobs = 1`` (the thread count
  does not change XLA's CPU results: the 240 runs of that slice were identical bit for bit
  in one process, in two, and on one core); each process writes its runs into the same
  store as they finish, so a killed run resumes as usual (a process whose parent was killed
  stops before its next group).
  """
  import multiprocessing
  import shutil
  # Downloaded here, once: each process would try on its own and fail with a traceback.
  data_lib.fetch_files(board.base.dataset, board.base.data_dir or None,
                       download=not board.base.offline)
  cells = sweep.cells_dir(out_dir)
  os.makedirs(cells, exist_ok=True)
  keys = {key for group in board.groups() for *_, key, _ in board.runs(*group)}
  already = sum(1 for key in sweep.load_done(out_dir) if key in keys)

  def count_done() -> int:
    # A run's file appears only when it is complete (written, then renamed): counting names
    # is enough for the progress, without parsing thousands of files every second.
    return len(keys & {name[:-5] for name in os.listdir(cells) if name.endswith(".json")})

  if already:
    log(f"resuming: {already} of {len(board)} runs already done in {cells}")
  claims = os.path.join(out_dir, "claims")
  shutil.rmtree(claims, ignore_errors=True)   # a killed run's claims are stale
  os.makedirs(claims)
  context = multiprocessing.get_context("spawn")
  workers = [context.Process(target=_work, args=(board, out_dir, claims, _cores_of(i, jobs)),
                             daemon=True)
             for i in range(jobs)]
  start = time.perf_counter()
  for worker in workers:
    worker.start()
  bar = train.progress_bar(len(board) - already, progress, unit="run")
  finished, last_report = already, start
  try:
    while any(worker.is_alive() for worker in workers):
      time.sleep(1.0)
      now_done = count_done()
      bar.update(now_done - finished)
      finished = now_done
      elapsed = time.perf_counter() - start
      if not progress and elapsed - (last_report - start) >= 60 and finished > already:
        last_report = time.perf_counter()
        eta = elapsed / (finished - already) * (len(board) - finished)
        log(f"[{finished}/{len(board)}] (elapsed {_eta(elapsed)}, ETA {_eta(eta)})")
  finally:
    bar.close()
    for worker in workers:
      worker.join()
    shutil.rmtree(claims, ignore_errors=True)
  failed = [worker.exitcode for worker in workers if worker.exitcode != 0]
  if failed:
    raise RuntimeError(f"{len(failed)} of {jobs} leaderboard processes failed (exit codes "
                       f"{failed}); the runs they finished are kept, rerun to resume")
  done = sweep.load_done(out_dir)
  computed = sum(1 for key in keys if key in done) - already
  seconds = time.perf_counter() - start
  log(f"{computed} runs in {seconds:.1f} s with {jobs} processes")
  return write_outputs(out_dir, board, done, command,
                       {"runs": computed, "seconds": seconds, "jobs": jobs})


def summarize(board: Board, done: dict) -> dict:
  """Per rule, f and heterogeneity: the worst attack's mean accuracy over seeds (or n/a)."""
  cells = []
  for rule, label in zip(board.rules, board.labels):
    for f in board.fs:
      for alpha in board.alphas:
        per_attack, reason = {}, None
        for attack, attack_label in zip(board.attacks, board.attack_labels):
          records = [done.get(sweep.cell_key(board.run_config(rule, f, attack, alpha, seed)))
                     for seed in board.seeds]
          records = [r for r in records if r is not None]
          if any(r["status"] == "n/a" for r in records):
            reason = next(r["reason"] for r in records if r["status"] == "n/a")
            continue
          values = [r["final_accuracy"] for r in records if r["status"] == "ok"]
          if values:
            per_attack[attack_label] = report.summarize(values)
        cell = {"rule": label, "f": f, "alpha": alpha, "attacks": per_attack}
        if reason is not None:
          cell.update(status="n/a", reason=reason)
        elif not per_attack:
          cell.update(status="pending")
        else:
          worst = min(per_attack, key=lambda a: per_attack[a]["mean"])
          complete = len(per_attack) == len(board.attacks) and all(
              s["n"] == len(board.seeds) for s in per_attack.values())
          cell.update(status="ok" if complete else "partial", worst_attack=worst,
                      worst=per_attack[worst])
        cells.append(cell)
  return {"rules": board.labels, "fs": board.fs, "alphas": board.alphas,
          "attacks": board.attack_labels, "seeds": board.seeds, "cells": cells}


def _cell(summary: dict, rule: str, f: int, alpha) -> dict:
  return next(c for c in summary["cells"]
              if c["rule"] == rule and c["f"] == f and c["alpha"] == alpha)


def markdown(summary: dict, command: str, timing: Optional[dict] = None) -> str:
  """One table per f: rows rules, columns heterogeneity, cells ``worst ± std (attack)``."""
  lines = [f"Worst-case final test accuracy over the attacks {', '.join(summary['attacks'])} "
           f"(mean ± std over seeds {', '.join(map(str, summary['seeds']))} of the attack "
           f"with the lowest mean, named in each cell).", ""]
  notes: list[str] = []
  header = ["rule"] + [alpha_label(a) for a in summary["alphas"]]
  for f in summary["fs"]:
    rows = []
    for rule in summary["rules"]:
      row = [rule]
      for alpha in summary["alphas"]:
        cell = _cell(summary, rule, f, alpha)
        if cell["status"] == "n/a":
          row.append(report.footnote(notes, cell["reason"]))
        elif cell["status"] == "pending":
          row.append("…")
        else:
          text = f"{report.format_accuracy(cell['worst'], digits=2)} ({cell['worst_attack']})"
          row.append(text + (" (partial)" if cell["status"] == "partial" else ""))
      rows.append(row)
    lines += [f"**f = {f}**", "", report.markdown_table(header, rows), ""]
  lines += [f"[{i + 1}] n/a: {note}." for i, note in enumerate(notes)]
  if len(summary["fs"]) == 1 and len(summary["alphas"]) == 1:
    # One cell per rule: show every attack, so the worst case can be read against the rest.
    f, alpha = summary["fs"][0], summary["alphas"][0]
    rows = []
    for rule in summary["rules"]:
      cell = _cell(summary, rule, f, alpha)
      rows.append([rule] + [report.format_accuracy(cell["attacks"].get(a), digits=2)
                            for a in summary["attacks"]])
    lines += ["", f"Every attack (f = {f}, {alpha_label(alpha)}):", "",
              report.markdown_table(["rule"] + list(summary["attacks"]), rows)]
  if timing and timing.get("runs"):
    processes = f", {timing['jobs']} processes" if timing.get("jobs", 1) > 1 else ""
    lines += ["", f"Computed here: {timing['runs']} runs in {timing['seconds']:.0f} s "
                  f"({timing['seconds'] / timing['runs']:.2f} s per run, batched{processes})."]
  lines += ["", "Produced by:", "", f"    {command}", ""]
  return "\n".join(lines)


def write_outputs(out_dir: str, board: Board, done: dict, command: str,
                  timing: Optional[dict] = None) -> dict:
  """``leaderboard.json``, ``table.md``, a heatmap per rule and the best-rule heatmap; when
  the board mixes rules that trust a server's root set (FLTrust's ``server_update``) with
  rules that do not, also ``best-rule-without-root-data.png``, the best of the latter."""
  import numpy as np
  summary = summarize(board, done)
  summary["command"] = command
  report.atomic_write_json(os.path.join(out_dir, "leaderboard.json"), summary)
  report.atomic_write_text(os.path.join(out_dir, "table.md"),
                           markdown(summary, command, timing))
  cols = [alpha_label(a) for a in board.alphas]
  rows = [f"f = {f}" for f in board.fs]
  worst = {}
  for rule in board.labels:
    values = np.full((len(board.fs), len(board.alphas)), np.nan)
    for i, f in enumerate(board.fs):
      for j, alpha in enumerate(board.alphas):
        cell = _cell(summary, rule, f, alpha)
        if cell["status"] in ("ok", "partial"):
          values[i, j] = cell["worst"]["mean"]
    worst[rule] = values
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in rule)
    report.plot_heatmap(os.path.join(out_dir, f"heatmap-{safe}.png"), values, rows, cols,
                        title=f"{rule}: worst-case test accuracy")
  trusting = {label for rule, label in zip(board.rules, board.labels)
              if specs.takes_server_update(specs.parse_spec(rule, "rule"))}
  charts = [("best-rule.png", board.labels, "best rule per cell (worst case over attacks)")]
  if trusting and len(trusting) < len(board.labels):
    charts.append(("best-rule-without-root-data.png",
                   [label for label in board.labels if label not in trusting],
                   "best rule per cell without a server root set (worst case over attacks)"))
  for name, labels, title in charts:
    best, texts = _best_per_cell({label: worst[label] for label in labels})
    report.plot_heatmap(os.path.join(out_dir, name), best, rows, cols, title=title,
                        texts=texts)
  return summary


def _best_per_cell(worst: dict):
  """The highest worst-case accuracy per cell over ``worst`` (``{rule: [fs, alphas]}``, NaN
  where n/a; ties: the first rule), and the ``"rule\nvalue"`` texts of the cells."""
  import numpy as np
  shape = next(iter(worst.values())).shape
  best = np.full(shape, np.nan)
  texts = np.full(shape, "n/a", dtype=object)
  for rule, values in worst.items():
    better = values > np.where(np.isnan(best), -np.inf, best)
    best = np.where(better, values, best)
    texts[better] = [f"{rule}\n{v:.2f}" for v in values[better]]
  return best, texts


# ---------------------------------------------------------------------------------------------
# The speed-up of batching, measured against today's experiments.sweep on the same runs.


def measure_speedup(board: Board, out_dir: str, log=print) -> dict:
  """Seconds per run: the first group batched, and the same runs through
  ``experiments.sweep.run_sweep`` (one run at a time, one compilation per rule and setting),
  in this process, into fresh folders under ``out_dir``, after one untimed warm-up run."""
  import shutil
  rule, f, attacks = next(iter(board.groups()))
  one = Board(board.base, [rule], [f], board.alphas, list(attacks), board.seeds)
  folders = {name: os.path.join(out_dir, f"speedup-{name}")
             for name in ("warm-up", "batched", "sweep")}
  for folder in folders.values():
    shutil.rmtree(folder, ignore_errors=True)
  # One untimed run first, so that neither side pays the process's one-time costs (loading
  # the data, compiling the model's initialisation and the eager helpers both sides share).
  warm_up = Board(board.base, [rule], [f], board.alphas[:1], [attacks[0]], board.seeds[:1])
  run_board(warm_up, folders["warm-up"], "speed-up (warm-up)", progress=False,
            log=lambda _: None)
  tic = time.perf_counter()
  run_board(one, folders["batched"], "speed-up (batched)", progress=False, log=lambda _: None)
  batched = (time.perf_counter() - tic) / len(one)
  settings = [(f"{attack}, {alpha_label(a)}",
               board.base.replace(num_byzantine=f, attack=attack, alpha=a))
              for attack in attacks for a in board.alphas]
  grid = sweep.Grid(settings, [rule], board.seeds)
  tic = time.perf_counter()
  sweep.run_sweep(grid, folders["sweep"], "speed-up (sweep)", progress=False,
                  log=lambda _: None)
  sequential = (time.perf_counter() - tic) / len(grid)
  result = {"rule": rule, "f": f, "attacks": list(attacks), "runs": len(one),
            "steps": board.base.steps, "batched_seconds_per_run": batched,
            "sweep_seconds_per_run": sequential, "speedup": sequential / batched}
  report.atomic_write_json(os.path.join(out_dir, "speedup.json"), result)
  log(f"speed-up: {len(one)} runs of {rule} | f = {f} | {', '.join(attacks)}, "
      f"{board.base.steps} steps: "
      f"{batched:.2f} s per run batched, {sequential:.2f} s per run through experiments.sweep "
      f"({sequential / batched:.1f}x)")
  return result


# ---------------------------------------------------------------------------------------------
# Command line.

DESCRIPTION = """\
The robustness leaderboard: which rule survives its worst attack? For every rule, every
number of Byzantine workers f (--f) and every heterogeneity level (--alphas: IID, or a
Dirichlet label split with that alpha; smaller is more heterogeneous), each run trains the
digits MLP with n = --num-workers workers, the last f of them Byzantine and running one attack
of --attacks. A cell of the leaderboard is the worst final test accuracy over the attacks
(mean over --seeds of the attack whose mean is lowest; that attack is named in the cell).
A rule whose bound on f is broken (e.g. krum needs n >= 2f + 3) shows n/a with the bound.

Outputs in --out: cells/<key>.json (one per run, written atomically), leaderboard.json,
table.md, heatmap-<rule>.png (f x heterogeneity), best-rule.png and, when the rules include
one that trusts a server root set (fltrust), best-rule-without-root-data.png. The runs of one rule
and f share one compiled program (vmap over runs, scan over steps): every heterogeneity
level, seed and gradient attack (the optimal ones included); data attacks and lossy links
get a program each. --jobs processes (default: the cores, up to 2), each on its own cores,
share those programs, each run computed once and exactly as with one process (the default
grid: ~26 minutes on 2 cores). The leaderboard resumes: run the
same command again after a crash or Ctrl-C and only the missing runs are computed; --fresh
starts over.
"""

EPILOG = """\
examples:
  python -m experiments.leaderboard --quick              # the main job, ~30 s
  python -m experiments.leaderboard                      # the default grid, ~26 min
  python -m experiments.leaderboard --rules flag median --f 3 5 --attacks alie min_max
  python -m experiments.leaderboard --quick --measure-speedup   # batched vs experiments.sweep
  python -m experiments.leaderboard --jobs 1             # one process

Rule and attack specs are written as in experiments.train --help (e.g. flag:scale=rank,
min_max:perturbation=sign). Defaults: every rule of flagjax.aggregators plus flag:scale=rank,
f in 1 3 5 7, alphas iid 1.0 0.3 0.1, the attacks sign_flip ipm alie optimal_alie
optimal_ipm min_max min_sum fang label_flip gaussian, seeds 0 1 2, 200 steps.
"""


def _alpha(text: str) -> Optional[float]:
  if text.lower() == "iid":
    return None
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected 'iid' or a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.leaderboard", description=DESCRIPTION, epilog=EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rules", nargs="+", metavar="SPEC", help="rules (default: all)")
  parser.add_argument("--f", nargs="+", type=int, metavar="F", dest="fs",
                      help="numbers of Byzantine workers (default: 1 3 5 7)")
  parser.add_argument("--alphas", nargs="+", type=_alpha, metavar="ALPHA",
                      help="heterogeneity: iid or Dirichlet alphas (default: iid 1.0 0.3 0.1)")
  parser.add_argument("--attacks", nargs="+", metavar="SPEC",
                      help="the attacks the worst case is taken over (default: the ten above)")
  parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="default: 0 1 2")
  parser.add_argument("--steps", type=int, help=f"training steps per run (default: "
                      f"{DEFAULT_STEPS})")
  parser.add_argument("--num-workers", type=int, default=15, help="n (default: 15)")
  parser.add_argument("--dataset", default="digits", choices=train.data_lib.DATASETS,
                      help="the data (default: digits, scikit-learn's, no download)")
  parser.add_argument("--data-dir", metavar="DIR",
                      help="download cache for mnist / cifar10 (default: $FLAGJAX_DATA or "
                           "~/.cache/flagjax); fetched once, before the runs start")
  parser.add_argument("--offline", action="store_true",
                      help="never download; fail with a message when a dataset file is missing")
  parser.add_argument("--batch-size", type=int, default=train.Config.batch_size,
                      help=f"examples per worker and step (default: {train.Config.batch_size})")
  parser.add_argument("--lr", type=float, default=train.Config.lr,
                      help=f"SGD learning rate (default: {train.Config.lr})")
  parser.add_argument("--quick", action="store_true",
                      help="the main job's small grid: 7 rules, f = 6, Dirichlet 0.3, the "
                           "attacks sign_flip alie min_max, 3 seeds, 100 steps (about half a "
                           "minute on 2 cores); other options override it")
  parser.add_argument("--out", help="output folder (default: results/leaderboard or "
                                    "results/leaderboard-quick)")
  parser.add_argument("--fresh", action="store_true", help="delete finished runs in --out first")
  parser.add_argument("--measure-speedup", action="store_true",
                      help="also time the first group's runs batched and through "
                           "experiments.sweep (one at a time), and report the ratio")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                      help="processes sharing the (rule, f) groups, each on its own share "
                           "of the cores, same results (default: "
                           f"{DEFAULT_JOBS}, the cores here up to 2: on 2 cores two processes "
                           "run a grid ~1.5-2x faster, a group's time mostly using one core)")
  return parser


def board_from_args(args: argparse.Namespace) -> Board:
  quick = QUICK if args.quick else {}
  pick = lambda name, default: tuple(getattr(args, name) or quick.get(name, default))
  steps = args.steps if args.steps is not None else quick.get("steps", DEFAULT_STEPS)
  base = train.Config(dataset=args.dataset, num_workers=args.num_workers, steps=steps,
                      eval_every=steps, lr=args.lr, batch_size=args.batch_size,
                      data_dir=args.data_dir, offline=args.offline)
  board = Board(base, pick("rules", DEFAULT_RULES), pick("fs", DEFAULT_FS),
                pick("alphas", DEFAULT_ALPHAS), pick("attacks", DEFAULT_ATTACKS),
                pick("seeds", DEFAULT_SEEDS))
  for rule in board.rules:
    specs.rule_function(specs.parse_spec(rule, "rule"))
  for f in board.fs:
    # attack="none": the board's own attacks are checked next, not the Config default's.
    train.validate(base.replace(num_byzantine=f, rules=tuple(board.rules), attack="none"),
                   allow_unavailable=True)
    for attack in board.attacks:
      specs.check_attack_values(specs.parse_spec(attack, "attack"), base.num_workers, f)
  for alpha in board.alphas:
    train.validate(base.replace(alpha=alpha, num_byzantine=0), allow_unavailable=True)
  return board


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)

  def body() -> int:
    if args.jobs < 1:
      raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    board = board_from_args(args)
    out_dir = args.out or os.path.join("results",
                                       "leaderboard-quick" if args.quick else "leaderboard")
    if args.fresh:
      import shutil
      shutil.rmtree(sweep.cells_dir(out_dir), ignore_errors=True)
    command = "python -m experiments.leaderboard" + ("" if not argv else " " + shlex.join(argv))
    print(f"leaderboard: {len(board.rules)} rules x {len(board.fs)} f x {len(board.alphas)} "
          f"heterogeneity x {len(board.attacks)} attacks x {len(board.seeds)} seeds = "
          f"{len(board)} runs -> {out_dir}", flush=True)
    summary = run_board(board, out_dir, command, progress=not args.no_progress,
                        log=lambda line: print(line, flush=True), jobs=args.jobs)
    print()
    print(markdown(summary, command))
    if args.measure_speedup:
      measure_speedup(board, out_dir, log=lambda line: print(line, flush=True))
    print(f"wrote {os.path.join(out_dir, 'table.md')}, leaderboard.json and heatmaps")
    return 0
  return report.run_command(body, (UsageError, train.data_lib.DataError))


if __name__ == "__main__":
  sys.exit(main())
