"""Results on disk: atomic writes, text tables, accuracy curves and heatmaps (matplotlib, Agg).

Every file is written to a temporary file in its own folder and then ``os.replace`` d onto its
name, so a reader (or a resumed sweep) sees either the old file or the new one, never half a
file, even when the process is killed mid-write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Callable, Iterable, Optional, Sequence

import numpy as np


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1 (``1e6`` notation accepted)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
  if not (math.isfinite(value) and value == int(value) and value >= 1):
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return int(value)


def positive_sizes(text: str) -> list[int]:
  """An argparse type: comma-separated integers >= 1 (``1e6`` notation accepted)."""
  sizes = [positive_int(v.strip()) for v in text.split(",") if v.strip()]
  if not sizes:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
  return sizes


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file in the same folder, fsync, replace)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as stream:
      stream.write(data)
      stream.flush()
      os.fsync(stream.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str):
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def write_error_line(error: OSError) -> str:
  """The one line a command prints for an unwritable or full output folder (no traceback)."""
  where = f" ({error.filename})" if getattr(error, "filename", None) else ""
  return f"error: cannot write the results{where}: {error.strerror or error}"


def run_command(body: Callable[[], int], usage_errors: tuple) -> int:
  """The exit code of a command line's ``body``: its own, 2 with one ``error:`` line for a
  usage error (``usage_errors``), 1 with one line for an unwritable output folder."""
  try:
    return body()
  except usage_errors as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except OSError as error:
    print(write_error_line(error), file=sys.stderr)
    return 1


def accuracy_curves(rules: dict) -> dict:
  """``{label: (steps, [seeds, evaluations] accuracies)}`` of the finished rules of a
  train result's ``rules`` (the input of :func:`plot_curves`)."""
  return {label: (r["runs"][0]["steps"], np.array([run["test_accuracy"] for run in r["runs"]]))
          for label, r in rules.items() if r.get("status") == "ok"}


def summarize(values: Sequence[float]) -> dict:
  """``{"mean", "std", "min", "max", "n"}`` of per-seed values (population std)."""
  values = np.asarray(values, dtype=np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}


def format_accuracy(summary: Optional[dict], digits: int = 3) -> str:
  """``0.912 ± 0.010`` (or ``0.912`` for one seed)."""
  if summary is None:
    return "n/a"
  if summary["n"] > 1:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
  return f"{summary['mean']:.{digits}f}"


def footnote(notes: list, reason: str) -> str:
  """``"n/a [k]"`` for ``reason``, numbering each distinct reason once (appended to
  ``notes``, which a table prints below itself as ``[k] n/a: reason.``)."""
  if reason not in notes:
    notes.append(reason)
  return f"n/a [{notes.index(reason) + 1}]"


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A plain aligned table for the terminal."""
  rows = [list(map(str, r)) for r in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
            for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  rows = [list(map(str, r)) for r in rows]
  out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str, *, dpi: int = 110, tight: bool = True) -> None:
  """Saves ``fig`` as a PNG at ``path`` atomically (``tight``: cropped to its contents)."""
  import io
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
  atomic_write_bytes(path, buffer.getvalue())


def plot_curves(path: str, curves: dict, *, title: str, chance: Optional[float] = None,
                dpi: int = 110) -> None:
  """Test accuracy against step, one line per rule (mean over seeds, min-max band).

  Args:
    path: the PNG to write.
    curves: ``{label: (steps [T], accuracy [seeds, T])}``.
    title: the figure title (the setting).
    chance: a dotted line at chance accuracy.
    dpi: resolution.
    texts: optional ``[rows, cols]`` strings written in the cells instead of the values.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.0, 4.2))
  colors = plt.get_cmap("tab10")
  others = 0
  for label, (steps, accuracy) in curves.items():
    accuracy = np.atleast_2d(np.asarray(accuracy, dtype=np.float64))
    mean = accuracy.mean(0)
    is_flag = label.split("(")[0] == "flag" and len(curves) > 1
    if is_flag:  # the subject of the study stands out
      color, width, style = "black", 2.4, "-"
    else:
      color, width, style = colors(others % 10), 1.4, "-" if others < 10 else "--"
      others += 1
    ax.plot(steps, mean, style, color=color, lw=width, label=label)
    if accuracy.shape[0] > 1:
      ax.fill_between(steps, accuracy.min(0), accuracy.max(0), color=color, alpha=0.12, lw=0)
  if chance is not None:
    ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
  ax.set_xlabel("step")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  save_figure(fig, path, dpi=dpi)
  plt.close(fig)


def plot_heatmap(path: str, values: np.ndarray, row_labels: Sequence[str],
                 col_labels: Sequence[str], *, title: str, dpi: int = 110,
                 texts: Optional[np.ndarray] = None) -> None:
  """Final accuracy per (setting, rule); NaN cells (n/a or not run yet) are grey.

  Args:
    path: the PNG to write.
    values: ``[rows, cols]`` accuracies in [0, 1], NaN where missing.
    row_labels: the settings.
    col_labels: the rules.
    title: the figure title.
    dpi: resolution.
    texts: optional ``[rows, cols]`` strings written in the cells instead of the values.
  """
  plt = _pyplot()
  values = np.asarray(values, dtype=np.float64)
  rows, cols = values.shape
  # A cell is as wide as its longest line of text (~0.075 in per character at font size 8).
  longest = max((len(line) for row in (texts if texts is not None else []) for text in row
                 for line in str(text).splitlines()), default=0)
  width = max(0.95, 0.075 * longest + 0.2)
  fig, ax = plt.subplots(figsize=(1.0 + width * cols, 0.9 + 0.5 * rows))
  cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
  ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
  for r in range(rows):
    for c in range(cols):
      v = values[r, c]
      text = "n/a" if math.isnan(v) else f"{v:.2f}"
      if texts is not None:
        text = str(texts[r][c])
      ax.text(c, r, text, ha="center", va="center", fontsize=8,
              color="black" if math.isnan(v) or v > 0.6 else "white")
  ax.set_xticks(range(cols), col_labels, rotation=35, ha="right", fontsize=8)
  ax.set_yticks(range(rows), row_labels, fontsize=8)
  ax.set_title(title, fontsize=10)
  save_figure(fig, path, dpi=dpi)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line: re-plot and compare saved results.

DESCRIPTION = """\
Re-plot and compare saved results without retraining. Each RESULTS file is the JSON that
experiments.train writes (results/<name>.json) or a sweep's results.json. The command prints
one table (rows: rules; columns: one per file or sweep setting; cells: final test accuracy,
mean +- std over seeds), writes it as markdown, and plots it as a heatmap. With one train
file, it also re-plots that file's accuracy curves.
"""

EPILOG = """\
examples:
  python -m experiments.report results/digits-mlp-alie-f6.json
  python -m experiments.report results/a.json results/b.json --compare --out results/compare
  python -m experiments.report results/sweep/results.json --compare
"""


def _columns_of(path: str, record) -> list:
  """``[(column label, {rule: summary or None})]`` of one results file."""
  stem = os.path.splitext(os.path.basename(path))[0]
  if isinstance(record, dict) and isinstance(record.get("rules"), dict):  # experiments.train
    cells = {}
    for label, result in record["rules"].items():
      ok = isinstance(result, dict) and result.get("status") == "ok"
      cells[label] = result.get("final_accuracy") if ok else None
    return [(record.get("setting") or stem, cells)]
  if isinstance(record, dict) and isinstance(record.get("rows"), list):  # a sweep's summary
    columns = []
    for row in record["rows"]:
      cells = {}
      for label, result in row.get("rules", {}).items():
        ok = isinstance(result, dict) and result.get("status") in ("ok", "partial")
        cells[label] = result.get("final_accuracy") if ok else None
      columns.append((f"{stem}: {row.get('setting', '?')}", cells))
    return columns
  raise ValueError(f"{path} is neither an experiments.train result nor a sweep's results.json")


def compare(paths: Sequence[str]) -> tuple[list[str], list[list[str]], np.ndarray, list, list]:
  """``(header, rows, values, rule labels, column labels)`` comparing the given files."""
  columns = []
  for path in paths:
    columns.extend(_columns_of(path, read_json(path)))
  rules = []
  for _, cells in columns:
    rules.extend(label for label in cells if label not in rules)
  values = np.full((len(rules), len(columns)), np.nan)
  rows = []
  for r, rule in enumerate(rules):
    row = [rule]
    for c, (_, cells) in enumerate(columns):
      summary = cells.get(rule)
      row.append(format_accuracy(summary) if summary else "n/a")
      if summary:
        values[r, c] = summary["mean"]
    rows.append(row)
  header = ["rule"] + [label for label, _ in columns]
  return header, rows, values, rules, [label for label, _ in columns]


def build_parser():
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m experiments.report", description=DESCRIPTION, epilog=EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("results", nargs="+", metavar="RESULTS",
                      help="JSON files written by experiments.train or experiments.sweep")
  parser.add_argument("--compare", action="store_true",
                      help="write the comparison table (markdown) and heatmap to --out")
  parser.add_argument("--out", default=os.path.join("results", "compare"), metavar="DIR",
                      help="output folder for --compare (default: results/compare)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  import sys
  args = build_parser().parse_args(argv)
  try:
    header, rows, values, rules, columns = compare(args.results)
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(text_table(header, rows))
  written = []
  if len(args.results) == 1:
    record = read_json(args.results[0])
    if isinstance(record, dict) and isinstance(record.get("rules"), dict):
      curves = accuracy_curves(record["rules"])
      png = os.path.splitext(args.results[0])[0] + ".png"
      try:
        plot_curves(png, curves, title=record.get("setting", ""), chance=0.1)
        written.append(png)
      except OSError as error:
        print(f"error: cannot write {png}: {error.strerror or error}", file=sys.stderr)
        return 1
  if args.compare:
    try:
      table = os.path.join(args.out, "compare.md")
      atomic_write_text(table, markdown_table(header, rows) + "\n\nFrom: "
                        + ", ".join(f"`{p}`" for p in args.results) + "\n")
      png = os.path.join(args.out, "compare.png")
      plot_heatmap(png, values, rules, columns, title="final test accuracy")
      written += [table, png]
    except OSError as error:
      print(f"error: cannot write the comparison: {error.strerror or error}", file=sys.stderr)
      return 1
  if written:
    print("wrote " + ", ".join(written))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
