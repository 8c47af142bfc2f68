"""The benchmarks in a tiny configuration, so that they cannot rot: structure, not speed."""

import importlib
import json
import math
import os

import numpy as np
import pytest

from experiments import bench_aggregators
from experiments import bench_throughput
from experiments import report


def _positive_finite(value):
  return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_aggregators_tiny(tmp_path):
  rules = ["mean", "median", "trimmed_mean", "krum", "flag"]
  results = bench_aggregators.main([
      "--n", "8", "--d", "1000,3000", "--rules", ",".join(rules), "--reps", "2",
      "--libraries", "flagjax,byzfl,dspace", "--flag-iters", "3", "--out", str(tmp_path),
      "--quiet"])

  for name in ("aggregators.json", "aggregators.md", "aggregators.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # atomic writes
  with open(tmp_path / "aggregators.json") as handle:
    assert json.load(handle)["cells"] == json.loads(json.dumps(results["cells"]))

  assert [(c["n"], c["d"], c["f"]) for c in results["cells"]] == [(8, 1000, 2), (8, 3000, 2)]
  for cell in results["cells"]:
    assert [r["rule"] for r in cell["rules"]] == rules
    for record in cell["rules"]:
      assert _positive_finite(record["one_pass_ms"])
      assert record["one_pass_reps"] == 2
      assert _positive_finite(record["flagjax_ms"]), record
      assert _positive_finite(record["ratio_to_one_pass"])
      for library in ("byzfl", "dspace"):
        if record.get(f"{library}_ms") is not None:
          assert _positive_finite(record[f"{library}_over_flagjax"])
  by_rule = {r["rule"]: r for r in results["cells"][0]["rules"]}
  assert "dspace_ms" not in by_rule["median"]  # d-space only for the flag rows
  assert _positive_finite(by_rule["flag"]["dspace_ms"])
  assert by_rule["flag"]["max_iters"] == 3 and "max_iters" not in by_rule["krum"]
  if results["byzfl_version"] is None:  # CI: no torch, ByzFL reported as unavailable
    assert "byzfl" in results["notes"]
  else:
    assert _positive_finite(by_rule["median"]["byzfl_ms"])

  table = (tmp_path / "aggregators.md").read_text()
  assert "## n = 8, d = 1,000, f = 2" in table
  assert table.count("| median |") == 2
  assert table.count("| flag (3 iters) |") == 2


def test_bench_aggregators_help_and_bad_names(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench_aggregators.main(["--help"])
  assert exit_info.value.code == 0
  assert "--rules" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    bench_aggregators.main(["--rules", "no_such_rule"])


@pytest.mark.parametrize("module, option, value", [
    ("bench_aggregators", "--n", "0"), ("bench_aggregators", "--d", "1e6,-5"),
    ("bench_aggregators", "--d", "1.5"), ("backend_check", "--n", "0"),
    ("bench_sorting", "--n", "32,0"), ("bench_sorting", "--d", "0"),
    ("bench_throughput", "--workers", "0"), ("bench_throughput", "--steps", "x"),
    ("flag_convergence", "--problems", "0"), ("multihost", "--steps", "0"),
])
def test_sizes_below_one_are_usage_errors(capsys, module, option, value):
  # They used to fail mid-run: max() of an empty sequence, negative dimensions, a split into
  # zero sections.
  main = importlib.import_module(f"experiments.{module}").main
  with pytest.raises(SystemExit) as exit_info:
    main([option, value, "--out", "unused"])
  assert exit_info.value.code == 2
  assert "expected an integer >= 1" in capsys.readouterr().err
  assert report.positive_sizes("1e6, 32") == [10**6, 32]


@pytest.mark.parametrize("value", ["-3", "1", "x"])
def test_flag_convergence_training_steps_is_zero_or_at_least_two(capsys, value):
  # '-3' was accepted and printed an empty table header; '1' crashed on max() of the empty
  # warm-start list (the first step has no previous step to start from).
  from experiments import flag_convergence
  with pytest.raises(SystemExit) as exit_info:
    flag_convergence.main(["--training-steps", value])
  assert exit_info.value.code == 2
  assert "expected 0 or an integer >= 2" in capsys.readouterr().err


def test_bench_throughput_tiny(tmp_path):
  results = bench_throughput.main([
      "--rules", "median", "--backends", "vmap,shard_map", "--steps", "2",
      "--reps", "1", "--out", str(tmp_path), "--quiet"])
  assert os.path.getsize(tmp_path / "throughput.json") > 0
  assert os.path.getsize(tmp_path / "throughput.md") > 0
  # (the plain-averaging reference is timed beside every rule, listed or not)
  assert [(r["backend"], r["rule"]) for r in results["records"]] == [
      ("vmap", "median"), ("shard_map", "median")]
  for record in results["records"]:
    assert "status" not in record, record
    assert _positive_finite(record["ratio_to_mean"])
    assert _positive_finite(record["steps_per_second"])
    assert _positive_finite(record["mean_steps_per_second"])
  assert os.path.getsize(tmp_path / "throughput.png") > 0
  table = (tmp_path / "throughput.md").read_text()
  assert "| median |" in table and "shard_map x mean" in table


def test_bench_aggregators_reports_unmeasured_rules(tmp_path):
  """A rule past its bound is "n/a" with the rule's own error, not a crash."""
  # n = 24, f = 6: MDA's exact search would visit C(24, 6) = 134596 > 1e5 subsets.
  results = bench_aggregators.main([
      "--n", "24", "--d", "200", "--rules", "median,mda", "--reps", "1", "--libraries",
      "flagjax", "--out", str(tmp_path), "--quiet", "--no-plot"])
  median, mda = results["cells"][0]["rules"]
  assert _positive_finite(median["flagjax_ms"])
  assert mda["flagjax_ms"] is None and mda["ratio_to_one_pass"] is None
  assert mda["flagjax_status"].startswith("n/a (ValueError: mda needs C(n, f) <= 100000")
  assert "| mda | n/a |" in (tmp_path / "aggregators.md").read_text()


def test_merge_runs_takes_medians():
  def run(ms, ratio, status=None):
    record = {"rule": "krum", "n": 8, "d": 100, "f": 2, "flagjax_ms": ms, "flagjax_reps": 3,
              "ratio_to_one_pass": ratio, "byzfl_ms": None}
    if status:
      record["byzfl_status"] = status
    return {"machine": {"summary": "test"}, "cells": [{"n": 8, "d": 100, "f": 2,
                                                      "rules": [record]}]}
  merged = bench_aggregators.merge_runs([run(1.0, 2.0, "n/a (x)"), run(5.0, 3.0), run(2.0, 9.0)])
  record = merged["cells"][0]["rules"][0]
  assert (record["flagjax_ms"], record["ratio_to_one_pass"]) == (2.0, 3.0)
  assert record["flagjax_reps"] == 9 and record["byzfl_ms"] is None
  assert (record["n"], record["f"], merged["merged_runs"]) == (8, 2, 3)
  assert "| krum | 2 | 3x |" in bench_aggregators.markdown(merged)


def test_bench_aggregators_many_workers_donated_and_memory(tmp_path):
  # Beyond the unrolled network (n = 130), the one-pass paths and donated inputs, in a tiny
  # configuration; then --memory, which only compiles.
  rules = ["median", "centered_clipping(num_iters=1)", "monna", "arc (donated)",
           "clip (donated)", "smea"]
  results = bench_aggregators.main([
      "--n", "130", "--d", "300", "--rules", ",".join(rules), "--reps", "2",
      "--libraries", "flagjax", "--out", str(tmp_path / "time"), "--quiet", "--no-plot"])
  by_rule = {r["rule"]: r for r in results["cells"][0]["rules"]}
  for name in rules[:-1]:
    assert _positive_finite(by_rule[name]["flagjax_ms"]), by_rule[name]
    assert by_rule[name]["flagjax_reps"] == 2   # a donated input is copied afresh per call
  # SMEA keeps f = n // 4 there and says why it refuses.
  assert by_rule["smea"]["f"] == 32 and "C(n, f) <= 100000" in by_rule["smea"]["flagjax_status"]

  memory = bench_aggregators.main([
      "--memory", "--n", "8", "--d", "5000", "--rules", "mean,krum,arc,arc (donated)",
      "--out", str(tmp_path / "memory"), "--quiet"])
  records = {r["rule"]: r for r in memory["cells"][0]["rules"]}
  input_bytes = 4 * 8 * 5000
  for name, record in records.items():
    assert record["argument_bytes"] == input_bytes, name
    assert record["temp_bytes"] >= 0
  assert records["mean"]["output_bytes"] == 4 * 5000
  assert records["arc"]["output_bytes"] == input_bytes
  assert records["arc (donated)"]["alias_bytes"] == input_bytes   # written in place
  assert "| krum |" in (tmp_path / "memory" / "memory.md").read_text()


def test_bench_sorting_tiny(tmp_path):
  from experiments import bench_sorting
  results = bench_sorting.main(["--n", "5,9", "--d", "300", "--reps", "2", "--network-max-n",
                                "8", "--out", str(tmp_path), "--quiet"])
  small, large = results["cells"]
  assert set(small["methods"]) == {"network", "bitonic", "sort", "top_k"}
  assert set(large["methods"]) == {"bitonic", "sort", "top_k"}   # beyond --network-max-n
  for cell in results["cells"]:
    assert cell["fastest"] in cell["methods"]
    for method in cell["methods"].values():
      assert _positive_finite(method["ratio_to_one_pass"])
  assert "| 9 |" in (tmp_path / "sorting.md").read_text()


def test_plot_runs_along_the_axis_the_grid_varies(tmp_path):
  def cells(pairs):
    return [{"n": n, "d": d, "f": 1, "rules": [
        {"rule": "mean", "one_pass_ms": 1.0 * n, "flagjax_ms": 1.1 * n}]} for n, d in pairs]
  # The many-workers grid (one d, several n) is plotted against n; any grid with several d
  # values, or a single cell, against d.
  assert bench_aggregators.plot_axes(cells([(128, 10**5), (256, 10**5)])) == ("n", "d")
  assert bench_aggregators.plot_axes(cells([(16, 10**5), (16, 10**6)])) == ("d", "n")
  assert bench_aggregators.plot_axes(cells([(16, 10**5), (32, 10**6)])) == ("d", "n")
  assert bench_aggregators.plot_axes(cells([(16, 10**5)])) == ("d", "n")
  path = tmp_path / "many.png"
  bench_aggregators.plot({"machine": {"summary": "test"},
                          "cells": cells([(128, 10**5), (256, 10**5)])}, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backend_check_tiny(tmp_path):
  """Without an accelerator both sides are the CPU: the same compiled program on the same
  input gives the same bits, so every rule's difference is exactly 0 and NaN matches NaN. The
  input holds the nasty rows (a duplicate, rows 100x away, a NaN row)."""
  from experiments import backend_check
  x = backend_check.nasty_rows(8, 40, 2)
  assert np.array_equal(x[0], x[1]) and np.isnan(x[7]).any() and np.abs(x[6]).max() > 50
  assert np.isfinite(backend_check.nasty_rows(3, 5, 0)).all()      # f = n // 4 = 0
  rules = ["mean", "krum", "caf", "signguard", "arc", "arc (donated)"]
  results = backend_check.main(["--n", "8", "--d", "64,80", "--reps", "2", "--rules",
                                ",".join(rules), "--out", str(tmp_path), "--quiet"])
  assert [r["d"] for r in results] == [64, 80]
  for result in results:
    # In the benchmark's order; the donated row is the same function as "arc" and is skipped.
    assert sorted(row["rule"] for row in result["rules"]) == sorted(rules[:-1])
    for row in result["rules"]:
      assert row["relative_difference"] == 0 and row["same_nan"], row
      assert _positive_finite(row["x_one_pass"])
    errors = result["default_precision_error"]
    assert 0 <= errors["highest"] < 1e-6 and errors["default"] == errors["highest"]  # CPU
  with open(tmp_path / "backend.json") as handle:
    assert json.load(handle) == json.loads(json.dumps(results))
  assert (tmp_path / "backend.md").read_text().count(" | yes | ") == 2 * (len(rules) - 1)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
