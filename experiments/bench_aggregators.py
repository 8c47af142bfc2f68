r"""How fast is each aggregation rule? flagjax against ByzFL, the d-space Flag and one pass.

For every ``n`` (workers) and ``d`` (coordinates) of the grid, one random float32 input
``x`` of shape ``[n, d]`` is timed through:

* every flagjax rule (jitted, compiled before timing), with ``f = n // 4`` Byzantine workers
  tolerated unless the rule's bound needs fewer (Bulyan: ``f = (n - 3) // 4``);
* the same rule in ByzFL (the EPFL library, PyTorch on the CPU), where ByzFL has it;
* the Flag Aggregator in d-space (``experiments.flag_dspace``: an SVD of the ``d x n`` term
  matrix per IRLS step, structured like the authors' released code; with ``lam > 0`` it is a
  d-space form of flagjax's objective, not of the released pair term), for the ``flag`` rows;
* the one-pass bound ``ones @ x`` (in JAX, and ``torch.ones(n) @ x`` for ByzFL's side).

The grid (``--grid``, or ``--n``/``--d`` directly): ``default`` (n in {16, 32, 64}, d in {1e5,
1e6, 1e7}; with ByzFL on 2 cores, 105 of its 234 rule timings took 59 minutes, so about two
hours); ``small-models`` (n in {16, 32}, d in {1e5, 1e6}: small models, where per-call
overheads and the extra passes of a rule weigh most against ByzFL); ``many-workers``
(n in {128, 256, 1024}, d = 1e5, f = n/4: cross-device federated rounds; ByzFL's Python
loops are too slow there, so pass ``--libraries flagjax``; SMEA keeps f = n/4 above n = 64 and
reports its refusal); ``memory`` (n = 32, d = 1e7, with ``--memory``: XLA's memory plan of
every rule, from compilation alone).

Timings are robust to a busy machine: every JAX function is compiled ahead of time (ByzFL
is called once to warm up); then, rule by rule, the JAX calls (one pass, the flagjax rule, the
d-space Flag) are made *interleaved*, ``--reps`` times, followed by the torch calls (torch's
one pass, ByzFL's rule), interleaved likewise, and the medians are reported. The "x one pass"
ratio divides the rule's median by the median of the one-pass calls interleaved with it, so
load that comes and goes affects both alike. Slow calls take fewer repetitions when the first
one costs more than ``--budget`` seconds / ``--reps`` (at least one; the JSON records how
many).

Outputs, written atomically (a temporary file, then a rename) into ``--out``
(default ``results/bench``): ``aggregators.json`` (every measurement), ``aggregators.md``
(one markdown table per ``(n, d)``) and ``aggregators.png`` (time against ``d``, log-log,
one panel per ``n``, one line per rule and library).

Rule hyperparameters are flagjax's defaults, except ``flag``, which runs exactly
``--flag-iters`` (default 20) IRLS steps (``tol=0``) like the d-space form it is compared with. ByzFL runs
with its own defaults (geometric median: 3 Weiszfeld steps; centered clipping: 1 step,
``tau=100``), fewer iterations than flagjax's defaults: the comparison favours ByzFL there.
ByzFL's ``MDA`` enumerates all ``C(n, f)`` subsets in Python and is skipped above
``--byzfl-max-subsets``. Pre-aggregators return ``[n, d]``: flagjax allocates a new output
(writing ``n x d`` fresh floats costs several passes on a CPU), while ByzFL's ``ARC``
overwrites the clipped rows of its input in place (it gets its own copy of the input here).
The ``(donated)`` rows jit flagjax's rule with ``donate_argnums=0``, so XLA may write the
output into the input's buffer, as a training step that no longer needs the raw updates can;
each of their calls gets a fresh copy of the input, made before the clock starts.
``centered_clipping(num_iters=1)`` is ByzFL's default (one step, ``tau=100``) on both sides.

ByzFL is optional (``pip install -e ".[bench]"`` in an environment with a CPU torch, or the
steps in the README). Only its aggregator modules are loaded: its package ``__init__`` imports
its training framework and with it torchvision, which a CPU-only environment may not have.

Examples::

    python -m experiments.bench_aggregators                      # the full grid
    python -m experiments.bench_aggregators --grid small-models  # n 16, 32; d 1e5, 1e6
    python -m experiments.bench_aggregators --grid many-workers --libraries flagjax
    python -m experiments.bench_aggregators --n 32 --d 1e6       # one cell
    python -m experiments.bench_aggregators --n 32 --d 2e6 --libraries flagjax
    python -m experiments.bench_aggregators --rules median,krum,flag --reps 5
    python -m experiments.bench_aggregators --merge run1/aggregators.json run2/aggregators.json
    python -m experiments.bench_aggregators --memory --grid memory   # XLA's memory plan
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from flagjax import aggregators
from flagjax import preaggregators

LIBRARIES = ("flagjax", "byzfl", "dspace")
DEFAULT_N = (16, 32, 64)
DEFAULT_D = (100_000, 1_000_000, 10_000_000)
# Named (n, d) grids: the full one, small models against ByzFL, many workers (cross-device
# federated rounds), and the size of the memory report.
GRIDS = {
    "default": (DEFAULT_N, DEFAULT_D),
    "small-models": ((16, 32), (100_000, 1_000_000)),
    "many-workers": ((128, 256, 1024), (100_000,)),
    "memory": ((32,), (10_000_000,)),
}
FLAG_MAX_ITERS = 20
BYZFL_INSTALL = ('pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu '
                 '&& pip install --no-deps byzfl  (or: pip install -e ".[bench]")')


# --------------------------------------------------------------------------------------------
# The rules: how to call each one in flagjax, ByzFL and d-space.


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of the table.

  Attributes:
    name: the row label (and the ``--rules`` name).
    family: ``"coordinate-wise"``, ``"Gram space"`` or ``"pre-aggregator"``.
    flagjax: ``(n, f) -> fn(x)``, the flagjax call with its static arguments bound.
    byzfl: ``(module, n, f) -> fn(tensor)`` for ByzFL's equivalent, or None when it has none.
    dspace: ``(module, n) -> fn(x)`` for the d-space Flag, or None.
    max_f: ``n -> the largest f`` the rule accepts, when below ``n // 4``.
    dspace_pairs: whether the d-space form holds the ``d x n^2`` pair directions (lam > 0).
    byzfl_memory: ``(n, f) ->`` how many inputs' worth of memory ByzFL's version holds beyond
      the common estimate (NNM gathers ``[n, n - f, d]``).
    fixed_iters: whether ``flagjax`` and ``dspace`` take a ``max_iters`` keyword (the flag
      rows run exactly ``--flag-iters`` IRLS steps on both sides).
    donate: whether flagjax's call donates its input (``jax.jit(..., donate_argnums=0)``):
      each timed call gets a fresh copy, made before the clock starts.
  """
  name: str
  family: str
  flagjax: Callable[[int, int], Callable]
  byzfl: Optional[Callable[[Any, int, int], Callable]] = None
  dspace: Optional[Callable[[Any, int], Callable]] = None
  max_f: Optional[Callable[[int], int]] = None
  dspace_pairs: bool = False
  byzfl_memory: Callable[[int, int], int] = lambda n, f: 0
  fixed_iters: bool = False
  donate: bool = False


def flag_rank(n: int) -> int:
  """The flag rule's default rank ``ceil((n + 1) / 2)``, passed to the d-space form too."""
  return -(-(n + 1) // 2)


def _byzfl_fresh(cls_name: str, **kwargs):
  """A ByzFL aggregator built anew per call: some (centered clipping) keep state inside."""
  def build(module, n, f):
    del n, f
    return lambda x: getattr(module, cls_name)(**kwargs)(x)
  return build


def _byzfl_with_f(cls_name: str):
  def build(module, n, f):
    del n
    aggregator = getattr(module, cls_name)(f=f)
    return aggregator
  return build


def _byzfl_mda(module, n, f):
  return module.MDA(f=f)


def _byzfl_clipping(module, n, f):
  del n, f
  return module.Clipping(c=CLIP_THRESHOLD)


# The static clipping threshold of the clip rows (ByzFL's default).
CLIP_THRESHOLD = 2.0


def _flag(lam: float):
  def build(n, f, max_iters=FLAG_MAX_ITERS):
    del n, f
    return lambda x: aggregators.flag(x, lam=lam, max_iters=max_iters, tol=0.0, scale="rank")
  return build


def _dspace_flag(lam: float):
  def build(module, n, max_iters=FLAG_MAX_ITERS):
    return lambda x: module.flag_dspace(x, rank=flag_rank(n), lam=lam, max_iters=max_iters)
  return build


# The randomised rules' key in the benchmark (their cost does not depend on it).
_BENCH_KEY = jax.random.key(0)


# Above this many workers SMEA keeps f = n // 4 (and so shows its refusal): its largest
# searchable f there (2 at n = 128-446) means C(n, 2) eigenproblems of n - 2 rows, minutes.
SMEA_MAX_REDUCED_N = 64


def _largest_searchable_f(n: int) -> int:
  """The largest f whose exact subset search (SMEA, MDA) stays within its stated limit
  (up to ``SMEA_MAX_REDUCED_N`` workers; above, ``n // 4``)."""
  from flagjax.core import subsets
  if n > SMEA_MAX_REDUCED_N:
    return n // 4
  return max(f for f in range(n) if f == 0 or (n > 2 * f and
                                                math.comb(n, f) <= subsets.MAX_SUBSETS))


RULES = (
    Rule("mean", "Gram space", lambda n, f: aggregators.mean,
         byzfl=_byzfl_fresh("Average")),
    Rule("median", "coordinate-wise", lambda n, f: aggregators.median,
         byzfl=_byzfl_fresh("Median")),
    Rule("trimmed_mean", "coordinate-wise",
         lambda n, f: lambda x: aggregators.trimmed_mean(x, f), byzfl=_byzfl_with_f("TrMean")),
    Rule("meamed", "coordinate-wise", lambda n, f: lambda x: aggregators.meamed(x, f),
         byzfl=_byzfl_with_f("Meamed")),
    Rule("phocas", "coordinate-wise", lambda n, f: lambda x: aggregators.phocas(x, f)),
    Rule("krum", "Gram space", lambda n, f: lambda x: aggregators.krum(x, f),
         byzfl=_byzfl_with_f("Krum")),
    Rule("multi_krum", "Gram space", lambda n, f: lambda x: aggregators.multi_krum(x, f),
         byzfl=_byzfl_with_f("MultiKrum")),
    Rule("bulyan", "Gram space + coordinate-wise",
         lambda n, f: lambda x: aggregators.bulyan(x, f), max_f=lambda n: (n - 3) // 4),
    Rule("geometric_median", "Gram space", lambda n, f: aggregators.geometric_median,
         byzfl=_byzfl_fresh("GeometricMedian")),
    Rule("centered_clipping", "Gram space", lambda n, f: aggregators.centered_clipping,
         byzfl=_byzfl_fresh("CenteredClipping")),
    Rule("centered_clipping(num_iters=1)", "distances to the centre",
         lambda n, f: lambda x: aggregators.centered_clipping(x, tau=100.0, num_iters=1),
         byzfl=_byzfl_fresh("CenteredClipping")),
    Rule("mda", "Gram space", lambda n, f: lambda x: aggregators.mda(x, f), byzfl=_byzfl_mda),
    Rule("monna", "Gram space", lambda n, f: lambda x: aggregators.monna(x, f),
         byzfl=_byzfl_with_f("MoNNA")),
    Rule("nnm", "pre-aggregator", lambda n, f: lambda x: preaggregators.nnm(x, f),
         byzfl=_byzfl_with_f("NNM"), byzfl_memory=lambda n, f: n - f),
    Rule("arc", "pre-aggregator", lambda n, f: lambda x: preaggregators.arc(x, f),
         byzfl=_byzfl_with_f("ARC")),
    Rule("arc (donated)", "pre-aggregator", lambda n, f: lambda x: preaggregators.arc(x, f),
         byzfl=_byzfl_with_f("ARC"), donate=True),
    Rule("clip", "pre-aggregator",
         lambda n, f: lambda x: preaggregators.clip(x, CLIP_THRESHOLD), byzfl=_byzfl_clipping),
    Rule("clip (donated)", "pre-aggregator",
         lambda n, f: lambda x: preaggregators.clip(x, CLIP_THRESHOLD), byzfl=_byzfl_clipping,
         donate=True),
    Rule("caf", "Gram space", lambda n, f: lambda x: aggregators.caf(x, f),
         byzfl=_byzfl_with_f("CAF")),
    Rule("smea", "Gram space", lambda n, f: lambda x: aggregators.smea(x, f),
         byzfl=_byzfl_with_f("SMEA"), max_f=_largest_searchable_f),
    Rule("dnc", "sampled Gram", lambda n, f: lambda x: aggregators.dnc(x, f, _BENCH_KEY)),
    Rule("signguard", "sampled signs", lambda n, f: lambda x: aggregators.signguard(
        x, _BENCH_KEY)),
    Rule("clipped_clustering", "Gram space", lambda n, f: aggregators.clipped_clustering),
    Rule("fltrust", "norms + one product", lambda n, f: lambda x: aggregators.fltrust(x, x[0])),
    Rule("flag", "Gram space", _flag(0.0), dspace=_dspace_flag(0.0), fixed_iters=True),
    Rule("flag(lam=8)", "Gram space", _flag(8.0), dspace=_dspace_flag(8.0), dspace_pairs=True,
         fixed_iters=True),
)
RULE_NAMES = tuple(rule.name for rule in RULES)


def _rule_f(rule: Rule, n: int) -> int:
  """``f = n // 4``, or less where the rule's bound needs it."""
  return n // 4 if rule.max_f is None else max(0, min(n // 4, rule.max_f(n)))


def _rule_iters(rule: Rule, args) -> dict:
  """``{"max_iters": --flag-iters}`` for the rules run for a fixed number of steps."""
  return {"max_iters": args.flag_iters} if rule.fixed_iters else {}


# --------------------------------------------------------------------------------------------
# Optional libraries.


def load_byzfl():
  """ByzFL's aggregators and pre-aggregators as one namespace, or ``(None, why not)``.

  ``import byzfl`` runs its package ``__init__``, which imports its federated-training
  framework and benchmark (torchvision). When that fails, a bare package object stands in
  for ``byzfl`` so that only ``byzfl.aggregators`` (and the ``byzfl.utils`` it needs: numpy,
  scipy, torch) is executed.
  """
  try:
    import torch  # noqa: F401
  except ImportError:
    return None, f"torch is not installed; to compare with ByzFL: {BYZFL_INSTALL}"
  try:
    module = importlib.import_module("byzfl.aggregators")
  except ImportError:
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
      return None, f"byzfl is not installed; to compare with it: {BYZFL_INSTALL}"
    for name in [m for m in sys.modules if m == "byzfl" or m.startswith("byzfl.")]:
      del sys.modules[name]  # the half-imported package from the failed attempt
    package = types.ModuleType("byzfl")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["byzfl"] = package
    try:
      module = importlib.import_module("byzfl.aggregators")
    except ImportError as error:
      return None, f"byzfl's aggregators could not be loaded ({error})"
  return module, None


def load_dspace():
  """``experiments.flag_dspace`` (the d-space Flag reference), or ``(None, why not)``."""
  try:
    return importlib.import_module("experiments.flag_dspace"), None
  except ImportError as error:
    return None, f"experiments.flag_dspace is not available ({error})"


def byzfl_version() -> Optional[str]:
  try:
    from importlib import metadata
    return metadata.version("byzfl")
  except Exception:  # noqa: BLE001 - only for the record
    return None


# --------------------------------------------------------------------------------------------
# Timing.


def _sync_call(fn: Callable, x) -> float:
  """Seconds for one call, waiting for JAX's asynchronous dispatch to finish."""
  start = time.perf_counter()
  jax.block_until_ready(fn(x))
  return time.perf_counter() - start


@dataclasses.dataclass
class Timed:
  """A callable under measurement: its input, its times, and why it is not measured."""
  fn: Optional[Callable]
  x: Any
  fresh: bool = False
  reps: int = 1
  times: list = dataclasses.field(default_factory=list)
  reason: Optional[str] = None

  def _fail(self, error: Exception) -> None:
    self.fn, self.reason = None, f"n/a ({type(error).__name__}: {str(error)[:160]})"

  def warm_up(self) -> None:
    """Compiles a jitted function ahead of time (no call); other callables are called once.

    A failure (a rule's bound, a library's limit) marks the entry n/a.
    """
    if self.fn is None:
      return
    try:
      if hasattr(self.fn, "lower"):
        self.fn = self.fn.lower(self.x).compile()
      else:
        _sync_call(self.fn, self.x)
    except Exception as error:  # noqa: BLE001 - reported in the table, never fatal
      self._fail(error)

  def time_call(self, rep: int, reps: int, budget: float) -> None:
    """Times call number ``rep``; the first one decides how many fit in ``budget`` seconds."""
    if self.fn is None or rep >= self.reps and rep > 0:
      return
    try:
      # A donating call consumes its input: it gets a copy, made before the clock starts.
      x = jax.block_until_ready(jnp.array(self.x, copy=True)) if self.fresh else self.x
      self.times.append(_sync_call(self.fn, x))
    except Exception as error:  # noqa: BLE001 - reported in the table, never fatal
      self._fail(error)
      return
    if rep == 0:
      self.reps = max(1, min(reps, int(budget / max(self.times[0], 1e-9))))

  def median_ms(self) -> Optional[float]:
    return float(np.median(self.times)) * 1e3 if self.times else None


def measure_rule(groups: Sequence[dict], reps: int, budget: float) -> None:
  """Times each group of ``{label: Timed}`` (one library's calls), interleaved within it.

  Within a group the calls alternate rep by rep, so that load that comes and goes hits the
  rule and its one-pass reference alike; groups run one after the other, so that one
  library's idle worker threads (which spin for a while after a call) do not slow the other.
  """
  for group in groups:
    for entry in group.values():
      entry.warm_up()
    for rep in range(reps):
      for entry in group.values():
        entry.time_call(rep, reps, budget)


# --------------------------------------------------------------------------------------------
# One cell of the grid.


def available_bytes() -> Optional[int]:
  """MemAvailable from /proc/meminfo (Linux), else None (no memory guard)."""
  try:
    with open("/proc/meminfo") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def bench_cell(n: int, d: int, rules: Sequence[Rule], libraries: dict, args,
               progress=None, fits: Optional[dict] = None) -> dict:
  """Times every rule at one ``(n, d)``; returns the cell's JSON record.

  ``fits`` says, per reference library, whether its memory estimate fits (default: yes).
  """
  fits = {"byzfl": True, "dspace": True, "bytes": math.inf} if fits is None else fits
  rng = np.random.default_rng(args.seed)
  x_np = rng.standard_normal((n, d), dtype=np.float32)
  x = jnp.asarray(x_np)
  ones = jnp.ones((n,), jnp.float32)
  one_pass = jax.jit(lambda v: ones @ v)
  if libraries.get("byzfl") is not None:
    import torch
    # Its own copy: ByzFL's ARC clips rows of its input in place, and jnp.asarray may share
    # x_np's memory, so a shared buffer would let one library's calls change the other's input.
    x_torch = torch.from_numpy(x_np.copy())
    torch_ones = torch.ones(n)
  default_f = n // 4
  records = []
  for rule in rules:
    f, iters = _rule_f(rule, n), _rule_iters(rule, args)
    timed = {"one_pass": Timed(one_pass, x),
             "flagjax": Timed(jax.jit(rule.flagjax(n, f, **iters),
                                      donate_argnums=(0,) if rule.donate else ()), x,
                              fresh=rule.donate)}
    torch_timed = {}
    reference_reasons = {}
    if "byzfl" in args.libraries and rule.byzfl is not None:
      module = libraries.get("byzfl")
      if module is None:
        reference_reasons["byzfl"] = "n/a (byzfl not loaded)"
      elif not fits["byzfl"]:
        reference_reasons["byzfl"] = "skipped (memory)"
      elif rule.byzfl_memory(n, f) * n * d * 4 > fits["bytes"]:
        reference_reasons["byzfl"] = (f"skipped (memory: ByzFL's {rule.name} holds "
                                      f"{rule.byzfl_memory(n, f)}x the input)")
      elif rule.name in ("mda", "smea") and math.comb(n, f) > args.byzfl_max_subsets:
        reference_reasons["byzfl"] = (f"skipped (C({n},{f}) = {math.comb(n, f):.2e} subsets "
                                      f"> --byzfl-max-subsets)")
      else:
        torch_timed["torch_one_pass"] = Timed(lambda v: torch_ones @ v, x_torch)
        torch_timed["byzfl"] = Timed(rule.byzfl(module, n, f), x_torch)
    if "dspace" in args.libraries and rule.dspace is not None:
      module = libraries.get("dspace")
      if module is None:
        reference_reasons["dspace"] = "n/a (experiments.flag_dspace not loaded)"
      elif not fits["dspace"]:
        reference_reasons["dspace"] = "skipped (memory)"
      elif d > args.dspace_max_d or (rule.dspace_pairs and n * (n - 1) // 2 * d * 4 >
                                     args.dspace_max_bytes):
        reference_reasons["dspace"] = "skipped (beyond --dspace-max-d / --dspace-max-bytes)"
      else:
        timed["dspace"] = Timed(jax.jit(rule.dspace(module, n, **iters)), x)
    measure_rule([timed, torch_timed], args.reps, args.budget)
    record = {"rule": rule.name, "family": rule.family, "n": n, "d": d, "f": f, **iters}
    for label, entry in {**timed, **torch_timed}.items():
      record[f"{label}_ms"] = entry.median_ms()
      record[f"{label}_reps"] = len(entry.times)
      if entry.reason:
        record[f"{label}_status"] = entry.reason
    for label, reason in reference_reasons.items():
      record[f"{label}_ms"] = None
      record[f"{label}_status"] = reason
    flagjax_ms, one_ms = record.get("flagjax_ms"), record.get("one_pass_ms")
    record["ratio_to_one_pass"] = (flagjax_ms / one_ms) if flagjax_ms and one_ms else None
    for label in ("byzfl", "dspace"):
      other = record.get(f"{label}_ms")
      record[f"{label}_over_flagjax"] = (other / flagjax_ms) if other and flagjax_ms else None
    torch_ms, byzfl_ms = record.get("torch_one_pass_ms"), record.get("byzfl_ms")
    record["byzfl_ratio_to_torch_one_pass"] = (byzfl_ms / torch_ms) if byzfl_ms and torch_ms \
        else None
    records.append(record)
    if progress is not None:
      progress.update(1)
  del x, x_np
  return {"n": n, "d": d, "f": default_f, "rules": records}


# --------------------------------------------------------------------------------------------
# Memory: XLA's plan for each rule, from compilation alone.


def memory_cell(n: int, d: int, rules: Sequence[Rule], args, progress=None) -> dict:
  """XLA's memory plan (``compile().memory_analysis()``) of every rule at one ``(n, d)``.

  Nothing runs and no input is allocated: each rule is lowered for a float32
  ``ShapeDtypeStruct((n, d))``. Temporaries are reported in bytes, as a multiple of the input,
  and in units of ``n^2 + d`` floats (what a Gram-space rule needs beyond its input and
  output: ``K``, and one row-sized accumulator).
  """
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  default_f = n // 4
  records = []
  for rule in rules:
    f, iters = _rule_f(rule, n), _rule_iters(rule, args)
    record = {"rule": rule.name, "n": n, "d": d, "f": f}
    try:
      fn = jax.jit(rule.flagjax(n, f, **iters), donate_argnums=(0,) if rule.donate else ())
      analysis = fn.lower(spec).compile().memory_analysis()
      temp = int(analysis.temp_size_in_bytes)
      record.update(temp_bytes=temp, argument_bytes=int(analysis.argument_size_in_bytes),
                    output_bytes=int(analysis.output_size_in_bytes),
                    alias_bytes=int(getattr(analysis, "alias_size_in_bytes", 0)),
                    temp_over_input=temp / (4 * n * d),
                    temp_over_n2_plus_d=temp / (4 * (n * n + d)))
    except Exception as error:  # noqa: BLE001 - reported in the table, never fatal
      record["status"] = f"n/a ({type(error).__name__}: {str(error)[:160]})"
    records.append(record)
    if progress is not None:
      progress.update(1)
  return {"n": n, "d": d, "f": default_f, "rules": records}


def memory_markdown(results: dict) -> str:
  """One table per ``(n, d)``: temporaries, output and aliasing for every rule."""
  lines = [f"# Memory plan ({results['machine']['summary']})", "",
           "XLA's `compile().memory_analysis()` of each jitted rule for a float32 `[n, d]` "
           "input (nothing runs). `temp` is the scratch XLA plans beyond the input and the "
           "output; `x input` divides it by the input's bytes, `x (n²+d)` by `4 (n² + d)`.",
           ""]
  for cell in results["cells"]:
    lines += [f"## n = {cell['n']}, d = {cell['d']:,}: input "
              f"{4 * cell['n'] * cell['d'] / 2**20:,.0f} MiB", "",
              "| rule | temp MiB | x input | x (n²+d) | output MiB | aliased MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in cell["rules"]:
      if "temp_bytes" not in r:
        lines.append(f"| {r['rule']} | {r.get('status', 'n/a')} | | | | |")
        continue
      lines.append(f"| {r['rule']} | {r['temp_bytes'] / 2**20:,.1f} | "
                   f"{r['temp_over_input']:.3g} | {r['temp_over_n2_plus_d']:.3g} | "
                   f"{r['output_bytes'] / 2**20:,.1f} | {r['alias_bytes'] / 2**20:,.1f} |")
    lines.append("")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Outputs.


def _fmt_ms(value: Optional[float]) -> str:
  if value is None:
    return "n/a"
  return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _fmt_ratio(value: Optional[float]) -> str:
  if value is None:
    return "—"
  return f"{value:.3g}x" if value < 100 else f"{value:.0f}x"


def _status(record: dict, label: str) -> str:
  status = record.get(f"{label}_status")
  if record.get(f"{label}_ms") is not None:
    return _fmt_ms(record[f"{label}_ms"])
  if status:
    return status.split(" (")[0] if len(status) > 40 else status
  return "—"


def markdown(results: dict) -> str:
  """One markdown table per ``(n, d)``: ms and ratios for every rule and library."""
  lines = [f"# Aggregation speed ({results['machine']['summary']})", ""]
  lines.append("Medians of interleaved calls; `x one pass` is flagjax's time over `ones @ x` "
               "measured alongside; `ByzFL / flagjax` and `d-space / flagjax` are speed-ups. "
               "float32.")
  lines.append("")
  for cell in results["cells"]:
    one = [r["one_pass_ms"] for r in cell["rules"] if r.get("one_pass_ms")]
    torch_one = [r["torch_one_pass_ms"] for r in cell["rules"] if r.get("torch_one_pass_ms")]
    head = (f"## n = {cell['n']}, d = {cell['d']:,}, f = {cell['f']}: one pass "
            f"{_fmt_ms(float(np.median(one)) if one else None)} ms (JAX)")
    if torch_one:
      head += f", {_fmt_ms(float(np.median(torch_one)))} ms (torch)"
    lines += [head, "",
              "| rule | flagjax ms | x one pass | ByzFL ms | ByzFL / flagjax | d-space ms | "
              "d-space / flagjax |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in cell["rules"]:
      name = r["rule"] + (f" (f={r['f']})" if r["f"] != cell["f"] else "")
      name += f" ({r['max_iters']} iters)" if "max_iters" in r else ""
      lines.append(
          f"| {name} | {_status(r, 'flagjax')} | {_fmt_ratio(r.get('ratio_to_one_pass'))} | "
          f"{_status(r, 'byzfl')} | {_fmt_ratio(r.get('byzfl_over_flagjax'))} | "
          f"{_status(r, 'dspace')} | {_fmt_ratio(r.get('dspace_over_flagjax'))} |")
    notes = [f"{r['rule']} ({label}): {r[f'{label}_status']}" for r in cell["rules"]
             for label in ("flagjax", "byzfl", "dspace")
             if r.get(f"{label}_status") and len(r[f"{label}_status"]) > 40]
    if notes:
      lines += ["", "Not measured: " + "; ".join(notes) + "."]
    lines.append("")
  return "\n".join(lines)


def plot_axes(cells: Sequence[dict]) -> tuple[str, str]:
  """``(x, panel)``: what the plot's x axis and its panels vary.

  Time against ``d``, one panel per ``n``, unless the grid has a single ``d`` and several
  ``n`` (the many-workers grid): then time against ``n``, one panel per ``d``.
  """
  ds = {cell["d"] for cell in cells}
  ns = {cell["n"] for cell in cells}
  return ("n", "d") if len(ds) == 1 and len(ns) > 1 else ("d", "n")


def plot(results: dict, path: str) -> None:
  """Time against d (or n, see :func:`plot_axes`), log-log: one panel per n (or d); solid
  flagjax, dashed ByzFL, dotted d-space."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  across, panel = plot_axes(results["cells"])
  panels = sorted({cell[panel] for cell in results["cells"]})
  names = [name for name in RULE_NAMES
           if any(r["rule"] == name for c in results["cells"] for r in c["rules"])]
  # 40 colours (tab20, then tab20b): every rule its own, the default rules number 26.
  palette = [plt.get_cmap("tab20")(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
  palette += [plt.get_cmap("tab20b")(i) for i in range(20)]
  colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False,
                           sharey=True)
  styles = (("flagjax_ms", "-", "o", "flagjax"), ("byzfl_ms", "--", "s", "ByzFL"),
            ("dspace_ms", ":", "^", "d-space"))
  for ax, value in zip(axes[0], panels):
    cells = sorted((c for c in results["cells"] if c[panel] == value), key=lambda c: c[across])
    xs = [c[across] for c in cells]
    one = [np.median([r["one_pass_ms"] for r in c["rules"] if r.get("one_pass_ms")] or [np.nan])
           for c in cells]
    ax.plot(xs, one, color="black", lw=2.5)
    for name in names:
      for key, style, marker, library in styles:
        points = [(c[across], r[key]) for c in cells for r in c["rules"]
                  if r["rule"] == name and r.get(key)]
        if points:
          px, py = zip(*points)
          ax.plot(px, py, style, marker=marker, ms=4, color=colors[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    if across == "n":
      ax.set_xticks(xs, [str(x) for x in xs])
      ax.minorticks_off()
    ax.set_xlabel("d (coordinates)" if across == "d" else "n (workers)")
    ax.set_title(f"n = {value} workers, float32" if panel == "n"
                 else f"d = {value:,} coordinates, float32")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("time per call (ms)")
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color="black", lw=2.5, label="one pass (ones @ x, JAX)")]
  handles += [Line2D([], [], color="gray", ls=style, marker=marker, label=library)
              for _, style, marker, library in styles]
  handles += [Line2D([], [], color=colors[name], lw=3, label=name) for name in names]
  fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
  fig.suptitle(f"Aggregation time against {across} — {results['machine']['summary']}")
  fig.tight_layout()
  report.save_figure(fig, path)
  plt.close(fig)


def machine_summary() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cores = os.cpu_count()
  return {"cpu": cpu, "cores": cores, "jax": jax.__version__, "platform": platform.platform(),
          "summary": f"{cores}-core {cpu}, jax {jax.__version__}"}


# --------------------------------------------------------------------------------------------
# Command line.


def parse_names(text: str, allowed: Sequence[str], what: str) -> list[str]:
  names = [v.strip() for v in text.split(",") if v.strip()]
  unknown = [v for v in names if v not in allowed]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
  return names


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as is, and every option's default."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.bench_aggregators",
      description=__doc__, formatter_class=HelpFormatter)
  parser.add_argument("--grid", choices=sorted(GRIDS), default="default",
                      help="the (n, d) grid: " + "; ".join(
                          f"{name}: n in {{{','.join(map(str, n))}}}, d in "
                          f"{{{','.join(f'{v:.0e}' for v in d)}}}"
                          for name, (n, d) in sorted(GRIDS.items())))
  parser.add_argument("--n", type=report.positive_sizes, default=None,
                      help="comma-separated numbers of workers (overrides --grid's)")
  parser.add_argument("--d", type=report.positive_sizes, default=None,
                      help="comma-separated numbers of coordinates (1e6 notation accepted; "
                      "overrides --grid's)")
  parser.add_argument("--rules", type=lambda t: parse_names(t, RULE_NAMES, "rules"),
                      default=",".join(RULE_NAMES), help="comma-separated rules")
  parser.add_argument("--libraries", type=lambda t: parse_names(t, LIBRARIES, "libraries"),
                      default=",".join(LIBRARIES),
                      help="what to time besides the one-pass bound: flagjax, byzfl, dspace")
  parser.add_argument("--reps", type=report.positive_int,
                      default=7, help="timed calls per measurement")
  parser.add_argument("--budget", type=float, default=20.0,
                      help="seconds of timed calls per slow measurement (fewer reps above it)")
  parser.add_argument("--byzfl-max-subsets", type=float, default=2e5,
                      help="skip ByzFL's MDA (a Python loop over C(n, f) subsets) above this")
  parser.add_argument("--dspace-max-d", type=float, default=1e7,
                      help="largest d for the d-space Flag")
  parser.add_argument("--dspace-max-bytes", type=float, default=5e8,
                      help="largest d x n^2 pair matrix (bytes) for the d-space Flag with lam > 0")
  parser.add_argument("--max-memory-fraction", type=float, default=0.6,
                      help="skip a cell whose estimated memory exceeds this share of the "
                      "available memory")
  parser.add_argument("--flag-iters", type=report.positive_int, default=FLAG_MAX_ITERS,
                      help="IRLS steps of the flag rows, in flagjax and d-space alike (tol=0)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
  parser.add_argument("--out", default=os.path.join("results", "bench"),
                      help="output folder")
  parser.add_argument("--merge", nargs="+", metavar="JSON",
                      help="measure nothing: combine earlier runs' aggregators.json files "
                      "(median per entry) into --out")
  parser.add_argument("--memory", action="store_true",
                      help="time nothing: report XLA's memory plan of every rule per (n, d) "
                      "into memory.json / memory.md (compilation only, no input allocated)")
  parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
  parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  args = parser.parse_args(argv)
  grid_n, grid_d = GRIDS[args.grid]
  args.n = list(grid_n) if args.n is None else args.n
  args.d = list(grid_d) if args.d is None else args.d
  return args


def merge_runs(runs: Sequence[dict]) -> dict:
  """Several runs' results as one: per rule and ``(n, d)``, the median of each number.

  Every run's ratios are medians of calls interleaved within that run, so the merged ratio is
  the median of the runs' ratios (not a ratio of merged times).
  """
  merged = json.loads(json.dumps(runs[0]))
  merged["merged_runs"] = len(runs)
  for cell in merged["cells"]:
    for record in cell["rules"]:
      same = [r for run in runs for c in run["cells"] if (c["n"], c["d"]) == (cell["n"], cell["d"])
              for r in c["rules"] if r["rule"] == record["rule"]]
      for key, value in record.items():
        if key in ("n", "d", "f") or not isinstance(value, (int, float)) or value is None:
          continue
        values = [r[key] for r in same if isinstance(r.get(key), (int, float))]
        record[key] = float(np.median(values)) if not key.endswith("_reps") else int(sum(values))
  return merged


def write_outputs(results: dict, out: str, make_plot: bool = True) -> str:
  """Writes ``aggregators.json``, ``.md`` and ``.png`` into ``out``; returns the markdown."""
  os.makedirs(out, exist_ok=True)
  report.atomic_write_text(os.path.join(out, "aggregators.json"), json.dumps(results, indent=1))
  table = markdown(results)
  report.atomic_write_text(os.path.join(out, "aggregators.md"), table)
  if make_plot and results["cells"]:
    plot(results, os.path.join(out, "aggregators.png"))
  return table


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the benchmark; returns the results dict that is also written as JSON."""
  args = parse_args(argv)
  if args.merge:
    runs = []
    for path in args.merge:
      with open(path) as handle:
        runs.append(json.load(handle))
    results = merge_runs(runs)
    table = write_outputs(results, args.out, not args.no_plot)
    if not args.quiet:
      print(table)
    return results
  rules = [rule for rule in RULES if rule.name in args.rules]
  if args.memory:
    cells = [memory_cell(n, d, rules, args) for n in args.n for d in args.d]
    results = {"machine": machine_summary(), "cells": cells}
    os.makedirs(args.out, exist_ok=True)
    report.atomic_write_text(os.path.join(args.out, "memory.json"), json.dumps(results, indent=1))
    table = memory_markdown(results)
    report.atomic_write_text(os.path.join(args.out, "memory.md"), table)
    if not args.quiet:
      print(table)
    return results
  libraries, notes = {}, {}
  if "byzfl" in args.libraries:
    libraries["byzfl"], notes["byzfl"] = load_byzfl()
  if "dspace" in args.libraries:
    libraries["dspace"], notes["dspace"] = load_dspace()
  for library, note in notes.items():
    if note and not args.quiet:
      print(f"[bench] {library}: {note}", file=sys.stderr)

  try:
    from tqdm import tqdm
    progress = tqdm(total=len(args.n) * len(args.d) * len(rules), disable=args.quiet,
                    desc="bench", unit="rule")
  except ImportError:
    progress = None
  available = available_bytes()
  cells, skipped = [], []
  for n in args.n:
    for d in args.d:
      # Estimated peaks, in multiples of the input: numpy + JAX copies and a rule's output
      # (3); ByzFL's own copy of the input, its sorts' values, int64 indices and copies (6);
      # the d-space SVD holds the d x n term matrix, U and LAPACK's workspace (4).
      limit = args.max_memory_fraction * available if available is not None else math.inf
      input_bytes = n * d * 4
      if 3 * input_bytes > limit:
        skipped.append({"n": n, "d": d, "reason": f"needs ~{3 * input_bytes / 2**30:.1f} GiB, "
                        f"{available / 2**30:.1f} GiB available"})
        if progress is not None:
          progress.update(len(rules))
        continue
      fits = {"byzfl": 9 * input_bytes <= limit, "dspace": 7 * input_bytes <= limit,
              "bytes": limit}
      cells.append(bench_cell(n, d, rules, libraries, args, progress, fits))
  if progress is not None:
    progress.close()

  results = {
      "machine": machine_summary(),
      "byzfl_version": byzfl_version() if libraries.get("byzfl") is not None else None,
      "notes": {k: v for k, v in notes.items() if v},
      "args": {k: v for k, v in vars(args).items()},
      "cells": cells,
      "skipped_cells": skipped,
  }
  table = write_outputs(results, args.out, not args.no_plot)
  if not args.quiet:
    print(table)
  return results


if __name__ == "__main__":
  main()
