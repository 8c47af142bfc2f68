"""Robust aggregation rules: ``[n, ...]`` worker updates (or a pytree of them) in, one out.

Gram-space rules (coefficients from ``K = X X^T``): :func:`mean`, :func:`krum`,
:func:`multi_krum`, :func:`geometric_median`, :func:`centered_clipping`, :func:`mda`,
:func:`monna`, :func:`flag`; :func:`normalized_mean` (flag's scale without the
subspace); the spectral filters :func:`caf` and :func:`smea`; :func:`clipped_clustering` and
:func:`fltrust` (with the server's update as an extra row). Coordinate-wise rules (order
statistics over the worker axis): :func:`median`, :func:`trimmed_mean`, :func:`meamed`,
:func:`phocas`; :func:`bulyan` uses both. Sampling rules (a random coordinate subset, then
``n x n`` work): :func:`dnc`, :func:`signguard`.
"""

from flagjax.aggregators.caf import caf
from flagjax.aggregators.centered_clipping import centered_clipping
from flagjax.aggregators.clipped_clustering import clipped_clustering
from flagjax.aggregators.coordinatewise import meamed
from flagjax.aggregators.coordinatewise import median
from flagjax.aggregators.coordinatewise import phocas
from flagjax.aggregators.coordinatewise import trimmed_mean
from flagjax.aggregators.dnc import dnc
from flagjax.aggregators.flag import FlagResult
from flagjax.aggregators.flag import flag
from flagjax.aggregators.flag import flag_solve
from flagjax.aggregators.fltrust import fltrust
from flagjax.aggregators.geometric_median import geometric_median
from flagjax.aggregators.krum import bulyan
from flagjax.aggregators.krum import krum
from flagjax.aggregators.krum import multi_krum
from flagjax.aggregators.mda import mda
from flagjax.aggregators.mean import mean
from flagjax.aggregators.monna import monna
from flagjax.aggregators.normalized_mean import normalized_mean
from flagjax.aggregators.signguard import signguard
from flagjax.aggregators.smea import smea

__all__ = [
    "FlagResult",
    "bulyan",
    "caf",
    "centered_clipping",
    "clipped_clustering",
    "dnc",
    "flag",
    "flag_solve",
    "fltrust",
    "geometric_median",
    "krum",
    "mda",
    "meamed",
    "mean",
    "median",
    "monna",
    "multi_krum",
    "normalized_mean",
    "phocas",
    "signguard",
    "smea",
    "trimmed_mean",
]
