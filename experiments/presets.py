"""The paper's settings, and this project's README table, as named presets.

A preset is plain data: a set of option changes (on top of ``experiments.train``'s defaults)
and, for a study with several rows, a list of settings, each a further set of changes
(:meth:`Preset.rows`); ``experiments.train`` reads it (this module imports nothing of the
runners). A one-setting
preset runs with ``python -m experiments.train --preset NAME``; every preset runs with
``python -m experiments.sweep --preset NAME`` (rows = settings, columns = rules). Options given
on the command line override the preset.

The paper (Almasi et al., ICLR 2024) trained ResNet-18 on CIFAR-10 (and a CNN on MNIST) with
SGD (lr 0.2, momentum 0.9, weight decay 5e-4, batch 128 per worker) and ``random`` (uniform)
Byzantine gradients, with the flag rank r = 8 at n = 15 (r = 4 at n = 7, 16 at n = 30, 32 at
n = 60: about (n + 1) / 2, the rule's default). The CPU-sized presets keep each study's shape
(who is Byzantine, how many, which rules) on the digits dataset; ``cifar10-resnet18`` is the
paper's own configuration, for users with an accelerator.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

PAPER_RULES = ("flag", "bulyan", "krum", "median", "meamed", "phocas", "trimmed_mean", "mean")


class PresetError(Exception):
  """An unknown preset, or a many-setting preset given to ``experiments.train``."""


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of a study: a label and its option changes."""
  label: str
  changes: dict


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named study: shared option changes and its settings (rows)."""
  name: str
  description: str
  changes: dict
  settings: tuple = ()

  def rows(self) -> list:
    """``[(label, changes)]``, one per setting, each with the preset's changes under the
    setting's (one row labelled by the preset when it has no settings). Plain data:
    :func:`experiments.train.preset_configs` turns the rows into configs."""
    if not self.settings:
      return [(self.name, dict(self.changes))]
    return [(s.label, {**self.changes, **s.changes}) for s in self.settings]


# Options shared by the CPU-sized studies (IID unless a row says otherwise).
_DIGITS_IID = {"dataset": "digits", "model": "mlp", "alpha": None}

PRESETS = {p.name: p for p in [
    Preset("default",
           "the default comparison: digits, 15 workers, Dirichlet(0.3) non-IID data, 6 ALIE "
           "workers, the nine rules, 3 seeds (the setting that separates the rules)",
           {}),
    Preset("readme",
           "the README results table: digits, 15 workers, IID unless stated, the nine rules, "
           "3 seeds, one row per attack",
           dict(_DIGITS_IID),
           (Setting("no attack (f = 0)", {"attack": "none", "num_byzantine": 0}),
            Setting("uniform random gradients (f = 3)", {"attack": "uniform",
                                                        "num_byzantine": 3}),
            Setting("Gaussian sigma = 100 (f = 3)", {"attack": "gaussian:sigma=100",
                                                    "num_byzantine": 3}),
            Setting("sign flip (f = 5)", {"attack": "sign_flip", "num_byzantine": 5}),
            Setting("IPM eps = 0.1 (f = 6)", {"attack": "ipm:eps=0.1", "num_byzantine": 6}),
            Setting("ALIE (f = 6, Dirichlet alpha = 0.3)", {"attack": "alie", "num_byzantine": 6,
                                                            "alpha": 0.3}),
            Setting("label flip (f = 5)", {"attack": "label_flip", "num_byzantine": 5}))),
    Preset("tolerance",
           "the paper's tolerance study: f = 1, 2, 3 of n = 15 workers sending uniform random "
           "gradients, the paper's rules",
           dict(_DIGITS_IID, attack="uniform", num_workers=15, rules=PAPER_RULES),
           tuple(Setting(f"uniform (f = {f})", {"num_byzantine": f}) for f in (1, 2, 3))),
    Preset("lam",
           "the paper's regularisation study: flag with lam = 0, 4, 8, 16 at n = 7, f = 1 "
           "(uniform random gradients)",
           dict(_DIGITS_IID, attack="uniform", num_workers=7, num_byzantine=1,
                rules=tuple(f"flag:lam={lam}" for lam in (0, 4, 8, 16)))),
    Preset("scaling",
           "the paper's scalability study: n = 15, 30, 60 workers, 20% of them sending uniform "
           "random gradients",
           dict(_DIGITS_IID, attack="uniform"),
           tuple(Setting(f"n = {n}, f = {n // 5}", {"num_workers": n, "num_byzantine": n // 5})
                 for n in (15, 30, 60))),
    Preset("augmented",
           "the paper's augmented-data study: 5 of 15 workers train on augmented (distorted) "
           "images, the rest on clean data, no gradient attack",
           dict(_DIGITS_IID, attack="augmented", num_workers=15, num_byzantine=5,
                rules=PAPER_RULES)),
    Preset("uniform",
           "uniform random gradients U[0, 1) from 3 of 15 workers (the paper's 'random' "
           "workers)",
           dict(_DIGITS_IID, attack="uniform", num_workers=15, num_byzantine=3)),
    Preset("lossy",
           "lossy links: 3 of 15 workers' gradients arrive with 10% of the coordinates lost "
           "(the paper's 'drop' workers)",
           dict(_DIGITS_IID, attack="lossy:drop_fraction=0.1", num_workers=15, num_byzantine=3)),
    Preset("cifar10-resnet18",
           "the paper's main configuration, for accelerators: CIFAR-10, ResNet-18, 15 workers, "
           "3 uniform random, SGD lr 0.2 momentum 0.9 weight decay 5e-4, batch 128, 1050 steps",
           dict(dataset="cifar10", model="resnet18", alpha=None, attack="uniform",
                num_workers=15, num_byzantine=3, batch_size=128, optimizer="sgd", lr=0.2,
                momentum=0.9, weight_decay=5e-4, steps=1050, eval_every=50,
                rules=PAPER_RULES)),
    Preset("mnist-cnn",
           "MNIST with the small CNN: 15 workers, 3 uniform random, the paper's optimizer",
           dict(dataset="mnist", model="cnn", alpha=None, attack="uniform", num_workers=15,
                num_byzantine=3, batch_size=64, lr=0.05, momentum=0.9, steps=600,
                eval_every=50, rules=PAPER_RULES)),
]}


def get(name: str) -> Preset:
  if name not in PRESETS:
    raise PresetError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)} "
                      f"(see --list-presets)")
  return PRESETS[name]


def describe_all() -> str:
  lines = []
  for preset in PRESETS.values():
    rows = f" [{len(preset.settings)} settings: use experiments.sweep]" if preset.settings \
        else ""
    lines.append(f"{preset.name}{rows}\n    {preset.description}")
  return "\n".join(lines)


def preset_or_none(name: Optional[str]) -> Optional[Preset]:
  return get(name) if name else None
