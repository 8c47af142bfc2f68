"""Robust aggregation rules: ``[n, ...]`` worker updates (or a pytree of them) in, one out.

Gram-space rules (coefficients from ``K = X X^T``): :func:`mean`, :func:`krum`,
:func:`multi_krum`, :func:`geometric_median`, :func:`centered_clipping`, :func:`mda`,
:func:`monna`, :func:`flag`. Coordinate-wise rules (order statistics over the worker axis):
:func:`median`, :func:`trimmed_mean`, :func:`meamed`, :func:`phocas`; :func:`bulyan` uses both.
"""

from flagjax.aggregators.coordinatewise import median
from flagjax.aggregators.coordinatewise import trimmed_mean
from flagjax.aggregators.mean import mean

__all__ = [
    "mean",
    "median",
    "trimmed_mean",
]
