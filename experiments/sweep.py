r"""A grid of rules x settings (attacks x numbers of Byzantine workers, or a preset's rows).

``python -m experiments.sweep --attacks alie sign_flip --num-byzantine 1 3 5`` trains every
rule in every setting for every seed and writes, in ``--out``:

* ``cells/<key>.json``: one file per (setting, rule, seed), written atomically when the cell
  finishes (or is found ``n/a``: its rule's bound on f is broken). ``key`` is a hash of the
  cell's full configuration, so a cell is done exactly once however often the sweep is
  restarted, and changing an option starts fresh cells without touching the old ones;
* ``table.md``: rows = settings, columns = rules, final test accuracy (mean ± std over seeds),
  ``n/a`` with the reason as a footnote, and the command that produced it;
* ``results.json``: the same, machine-readable; ``heatmap.png``: the table as a heatmap.

Killed at any point, the same command resumes where it stopped: finished cells are read back,
never recomputed, and the table is rebuilt from the cell files. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
from typing import Optional, Sequence

from experiments import presets as presets_lib
from experiments import report
from experiments import specs
from experiments import train
from experiments.specs import RuleUnavailable, UsageError


def cell_key(config: train.Config) -> str:
  """A stable name for one cell (:func:`experiments.train.config_key`, so a cell and the
  same single run of ``experiments.train`` share their name)."""
  return train.config_key(config)


class Grid:
  """The sweep's cells: ``settings x rules x seeds``, in running order."""

  def __init__(self, settings: list, rules: Sequence[str], seeds: Sequence[int]):
    self.settings = settings              # [(label, Config)]
    self.rules = list(rules)              # rule specs (text)
    self.seeds = list(seeds)
    self.labels = [specs.parse_spec(r, "rule").label for r in self.rules]

  def cell_config(self, config: train.Config, rule: str, seed: int) -> train.Config:
    return config.replace(rules=(rule,), seeds=(seed,))

  def cells(self):
    """``(setting index, rule index, seed, key, cell config)`` in running order."""
    for s, (_, config) in enumerate(self.settings):
      for r, rule in enumerate(self.rules):
        for seed in self.seeds:
          cell = self.cell_config(config, rule, seed)
          yield s, r, seed, cell_key(cell), cell

  def __len__(self):
    return len(self.settings) * len(self.rules) * len(self.seeds)


def cells_dir(out_dir: str) -> str:
  return os.path.join(out_dir, "cells")


def is_cell_record(record, key: str) -> bool:
  """Whether ``record`` (parsed JSON of ``cells/<key>.json``) is a finished cell's result."""
  if not isinstance(record, dict) or record.get("key") != key:
    return False
  if record.get("status") == "n/a":
    return isinstance(record.get("reason"), str)
  accuracy = record.get("final_accuracy")
  return (record.get("status") == "ok" and isinstance(accuracy, (int, float))
          and not isinstance(accuracy, bool) and isinstance(record.get("seed"), int))


def load_done(out_dir: str, warn=None) -> dict:
  """``{key: cell record}`` of the finished cells in ``out_dir``.

  A file that does not parse as a finished cell (truncated, not JSON, JSON of another shape,
  or another cell's record) is left out, so its cell is recomputed, with a warning naming the
  file through ``warn`` (stderr by default).
  """
  if warn is None:
    warn = lambda line: print(line, file=sys.stderr, flush=True)
  done = {}
  folder = cells_dir(out_dir)
  if not os.path.isdir(folder):
    return done
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".json") or name.startswith("."):
      continue
    path = os.path.join(folder, name)
    key = name[:-len(".json")]
    try:
      record = report.read_json(path)
    except (OSError, ValueError) as error:
      warn(f"warning: {path} is not a readable cell result ({type(error).__name__}); "
           f"its cell will be recomputed")
      continue
    if not is_cell_record(record, key):
      warn(f"warning: {path} does not hold a finished cell result; its cell will be "
           f"recomputed")
      continue
    done[key] = record
  return done


def summarize_grid(grid: Grid, done: dict) -> dict:
  """The table's content: per setting and rule, the finished seeds' summary or n/a."""
  rows = []
  for s, (label, config) in enumerate(grid.settings):
    row = {"setting": label, "config": config.results_key(), "rules": {}}
    for r, rule in enumerate(grid.rules):
      records = [done.get(cell_key(grid.cell_config(config, rule, seed))) for seed in grid.seeds]
      records = [rec for rec in records if rec is not None]
      unavailable = [rec for rec in records if rec["status"] == "n/a"]
      finished = [rec for rec in records if rec["status"] == "ok"]
      if unavailable:
        row["rules"][grid.labels[r]] = {"status": "n/a", "reason": unavailable[0]["reason"]}
      elif finished:
        row["rules"][grid.labels[r]] = {
            "status": "ok" if len(finished) == len(grid.seeds) else "partial",
            "final_accuracy": report.summarize([rec["final_accuracy"] for rec in finished]),
            "seeds": [rec["seed"] for rec in finished]}
      else:
        row["rules"][grid.labels[r]] = {"status": "pending"}
    rows.append(row)
  return {"rules": grid.labels, "seeds": grid.seeds, "rows": rows}


def markdown(summary: dict, command: str) -> str:
  """``table.md``: rows = settings, columns = rules; n/a reasons as footnotes."""
  notes: list[str] = []
  table_rows = []
  for row in summary["rows"]:
    cells = [row["setting"]]
    for label in summary["rules"]:
      entry = row["rules"][label]
      if entry["status"] == "n/a":
        cells.append(report.footnote(notes, entry["reason"]))
      elif entry["status"] == "pending":
        cells.append("…")
      else:
        text = report.format_accuracy(entry["final_accuracy"], digits=2)
        if entry["status"] == "partial":
          text += f" ({len(entry['seeds'])}/{len(summary['seeds'])} seeds)"
        cells.append(text)
    table_rows.append(cells)
  seeds = len(summary["seeds"])
  lines = [f"Final test accuracy, mean ± std over {seeds} seed{'s' if seeds > 1 else ''} "
           f"({', '.join(map(str, summary['seeds']))}).", "",
           report.markdown_table(["setting"] + list(summary["rules"]), table_rows)]
  if notes:
    lines += [""] + [f"[{i + 1}] n/a: {note}." for i, note in enumerate(notes)]
  lines += ["", "Produced by:", "", f"    {command}", ""]
  return "\n".join(lines)


def write_summary(out_dir: str, grid: Grid, done: dict, command: str,
                  heatmap: bool = True) -> dict:
  summary = summarize_grid(grid, done)
  summary["command"] = command
  report.atomic_write_json(os.path.join(out_dir, "results.json"), summary)
  report.atomic_write_text(os.path.join(out_dir, "table.md"), markdown(summary, command))
  if heatmap:
    import numpy as np
    values = np.full((len(grid.settings), len(grid.labels)), np.nan)
    for i, row in enumerate(summary["rows"]):
      for j, label in enumerate(grid.labels):
        entry = row["rules"][label]
        if entry["status"] in ("ok", "partial"):
          values[i, j] = entry["final_accuracy"]["mean"]
    report.plot_heatmap(os.path.join(out_dir, "heatmap.png"), values,
                        [row["setting"] for row in summary["rows"]], grid.labels,
                        title=f"final test accuracy (mean over {len(grid.seeds)} seeds)")
  return summary


def run_sweep(grid: Grid, out_dir: str, command: str, *, progress: bool = True,
              log=print) -> dict:
  """Runs the grid's unfinished cells, writing each one as it finishes; returns the summary."""
  os.makedirs(cells_dir(out_dir), exist_ok=True)
  done = load_done(out_dir)
  keys = {key for *_, key, _ in grid.cells()}
  already = len(keys & done.keys())
  if already:
    log(f"resuming: {already} of {len(grid)} cells already done in {cells_dir(out_dir)}")
  todo = [cell for cell in grid.cells() if cell[3] not in done]
  bar = train.progress_bar(len(todo), progress, unit="cell")
  if progress:  # print above the bar, not through it
    log = lambda line, _write=bar.write: _write(line, file=sys.stdout)
  finished = already
  try:
    for s, group in itertools.groupby(todo, key=lambda cell: cell[0]):
      label, setting_config = grid.settings[s]
      train.validate(setting_config.replace(rules=tuple(grid.rules)), allow_unavailable=True)
      train.request_cpu_devices(setting_config)
      prepared = train.prepare(setting_config)
      for r, rule_cells in itertools.groupby(group, key=lambda cell: cell[1]):
        rule_label = grid.labels[r]
        try:
          runner = train.build_runner(setting_config, prepared, grid.rules[r])
          reason = None
        except RuleUnavailable as error:
          runner, reason = None, str(error)
        for _, _, seed, key, cell_config in rule_cells:
          bar.set_postfix_str(f"{label} | {rule_label} | seed {seed}")
          record = {"key": key, "setting": label, "rule": rule_label, "seed": seed,
                    "config": cell_config.results_key()}
          if runner is None:
            record.update(status="n/a", reason=reason)
          else:
            run = runner.run(seed)
            record.update(status="ok", final_accuracy=run["final_accuracy"], run=run)
          report.atomic_write_json(os.path.join(cells_dir(out_dir), f"{key}.json"), record)
          done[key] = record
          finished += 1
          bar.update(1)
          result = "n/a" if runner is None else f"{record['final_accuracy']:.3f}"
          log(f"cell {finished}/{len(grid)} done: {label} | {rule_label} | seed {seed}: "
              f"{result}")
          write_summary(out_dir, grid, done, command, heatmap=False)
      write_summary(out_dir, grid, done, command, heatmap=False)
  finally:
    bar.close()
  return write_summary(out_dir, grid, done, command)


# ---------------------------------------------------------------------------------------------
# Command line.

DESCRIPTION = """\
Sweep robust rules over settings: every rule x every setting x every seed, with the same
training as experiments.train. Settings are either the grid --attacks x --num-byzantine (on
top of the other options), or a preset's rows (--preset). Results go to --out as one JSON file
per finished cell, a markdown table, a JSON summary and a heatmap. The sweep is resumable:
run the same command again after a crash or Ctrl-C and only the missing cells are computed.
"""

EPILOG = """\
examples:
  python -m experiments.sweep --attacks alie sign_flip ipm --num-byzantine 1 3 5 --seeds 0
  python -m experiments.sweep --preset readme            # the README results table
  python -m experiments.sweep --preset tolerance         # the paper's f = 1, 2, 3 at n = 15
  python -m experiments.sweep --preset lam               # flag's lam = 0, 4, 8, 16
  python -m experiments.sweep --list-presets

Every experiments.train option (--dataset, --model, --rules, --steps, --lr, --alpha, ...)
applies to all settings; rule and attack specs are written as in experiments.train --help.
"""


def build_parser() -> argparse.ArgumentParser:
  parser = train.build_parser()
  parser.prog = "python -m experiments.sweep"
  parser.description = DESCRIPTION
  parser.epilog = EPILOG
  g = parser.add_argument_group("grid")
  g.add_argument("--attacks", nargs="+", metavar="SPEC",
                 help="attacks, one setting each (times --num-byzantine); default: --attack")
  # --num-byzantine takes several values here; --fresh means the sweep's cells.
  for action in parser._actions:
    if "--fresh" in action.option_strings:
      action.help = ("delete the finished cells in --out and recompute everything (e.g. after "
                     "changing the code); by default a sweep resumes")
    if "--num-byzantine" in action.option_strings:
      action.nargs = "+"
      action.help = "numbers of Byzantine workers, one setting each (default: 6)"
    if "--name" in action.option_strings:  # the sweep's files have fixed names in --out
      action.help = argparse.SUPPRESS
    if "--out" in action.option_strings:
      action.help = "output folder (default: results/sweep or results/sweep-<preset>)"
  return parser


def grid_from_args(args: argparse.Namespace) -> tuple[Grid, str]:
  """The grid and the default output folder name (``sweep`` or ``sweep-<preset>``)."""
  num_byzantine = getattr(args, "num_byzantine", None)
  attacks = getattr(args, "attacks", None)
  preset = presets_lib.preset_or_none(getattr(args, "preset", None))
  overrides = {k: getattr(args, k) for k in train.CONFIG_OPTIONS
               if hasattr(args, k) and k != "num_byzantine"}
  for key in ("rules", "seeds"):
    if key in overrides:
      overrides[key] = tuple(overrides[key])
  name = "sweep" if preset is None else f"sweep-{preset.name}"
  if preset is not None and attacks is None and num_byzantine is None:
    settings = [(label, config.replace(**overrides)) for label, config in train.preset_configs(preset)]
  else:
    if preset is not None and len(preset.settings) > 1:
      raise UsageError(f"preset {preset.name} has its own rows; drop --attacks / "
                       f"--num-byzantine or use a one-setting preset")
    base = train.preset_configs(preset)[0][1] if preset is not None else train.Config()
    base = base.replace(**overrides)
    attacks = attacks or [base.attack]
    num_byzantine = num_byzantine or [base.num_byzantine]
    settings = [(f"{specs.parse_spec(a, 'attack').label}, f = {f}",
                 base.replace(attack=a, num_byzantine=f))
                for a in attacks for f in num_byzantine]
  rules = settings[0][1].rules
  seeds = settings[0][1].seeds
  return Grid(settings, rules, seeds), name


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if getattr(args, "list_presets", False):
    print(presets_lib.describe_all())
    return 0

  def body() -> int:
    grid, name = grid_from_args(args)
    for label, config in grid.settings:
      train.validate(config, allow_unavailable=True)
    out_dir = getattr(args, "out", os.path.join("results", name))
    if getattr(args, "fresh", False) and os.path.isdir(cells_dir(out_dir)):
      import shutil
      shutil.rmtree(cells_dir(out_dir))
    command = "python -m experiments.sweep" + ("" if not argv else " " + shlex.join(argv))
    print(f"sweep: {len(grid.settings)} settings x {len(grid.rules)} rules x "
          f"{len(grid.seeds)} seeds = {len(grid)} cells -> {out_dir}", flush=True)
    summary = run_sweep(grid, out_dir, command,
                        progress=not getattr(args, "no_progress", False),
                        log=lambda line: print(line, flush=True))
    print()
    print(markdown(summary, command))
    print(f"wrote {os.path.join(out_dir, 'table.md')}, results.json and heatmap.png")
    return 0
  return report.run_command(body, (UsageError, train.data_lib.DataError,
                                  presets_lib.PresetError))


if __name__ == "__main__":
  sys.exit(main())
