r"""Coordinate-wise rules: order statistics per coordinate over the worker axis.

Every rule here reads a few sorted positions per coordinate from the shared sorting networks
(:mod:`flagjax.core.sorting`: unrolled up to 128 workers, staged bitonic above); none calls
XLA's sort along axis 0. They need no reduction over
coordinates, so with ``axis_name`` set (a coordinate shard inside ``shard_map``) the result is
the shard of the unsharded answer as is.

NaN is sorted as ``+inf``: with at most ``f`` non-finite workers, the values a rule averages
(the middle positions) are finite. Each coordinate is its own problem: where the averaged
positions of a coordinate reach a non-finite value (more non-finite values there than the rule
tolerates, or every worker non-finite), the output is NaN at that coordinate, never ``inf``.
Means are taken as sums of ``v / m`` clamped to the averaged values' range, so they neither
overflow nor leave that range by rounding.
"""

from __future__ import annotations

import jax

from flagjax.core import checks
from flagjax.core import sorting
from flagjax.core import tree as tree_lib

__all__ = [
    "meamed",
    "median",
    "phocas",
    "trimmed_mean",
]


def _per_leaf(fn, x, positions=None):
  """Applies ``fn(sorted values) -> value`` to each leaf over its worker axis
  (:func:`flagjax.core.sorting.sorted_statistic`; non-finite results become NaN)."""
  def leaf_fn(leaf):
    value = sorting.sorted_statistic(leaf, fn, positions)
    return sorting.nan_if_nonfinite(value).astype(tree_lib.output_dtype(leaf.dtype))
  return jax.tree.map(leaf_fn, x)


def median(x, *, axis_name=None):
  r"""Coordinate-wise median: per coordinate the middle value; even ``n`` averages the two.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    axis_name: accepted for a uniform signature (no cross-coordinate reduction is needed).

  Returns:
    The coordinate-wise median, shaped like one worker's update.

  References:
    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML 2018.
  """
  del axis_name
  n = tree_lib.num_workers("median", x)
  return _per_leaf(sorting.median_of_sorted, x, sorting.median_positions(n))


def trimmed_mean(x, f: int, *, axis_name=None):
  r"""Coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest, average the rest.

  .. math:: \mathrm{TM}(x)_k = \frac{1}{n - 2f} \sum_{p=f}^{n-f-1} x_{(p),k}

  where :math:`x_{(p),k}` is the p-th smallest value of coordinate k. Needs ``n > 2f``.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: accepted for a uniform signature.

  Returns:
    The trimmed mean, shaped like one worker's update.

  References:
    Yin et al., ICML 2018.
  """
  del axis_name
  f = checks.check_num_byzantine("trimmed_mean", f)
  n = tree_lib.num_workers("trimmed_mean", x)
  checks.require("trimmed_mean", n > 2 * f, "n > 2*f", n=n, f=f)
  return _per_leaf(sorting.mean_of_sorted, x, range(f, n - f))


def meamed(x, f: int, *, axis_name=None):
  r"""Mean around the median: per coordinate, the mean of the ``n - f`` values nearest the median.

  .. math:: \mathrm{MeaMed}(x)_k = \frac{1}{n - f} \sum_{i \in S_k} x_{i,k}, \qquad
     S_k = \text{the } n - f \text{ indices } i \text{ of least } |x_{i,k} - \mathrm{med}_k|

  where :math:`\mathrm{med}_k` is the coordinate-wise median (even ``n``: the mean of the two
  middle values). Needs ``n > 2f``: then the median and the chosen values are those of honest
  workers or lie between them, and NaN/Inf values (at most ``f``) are never averaged. Ties in
  distance are broken towards the lower value; repeated values count once per copy (only as
  many copies of a far value as are among the ``n - f`` nearest).

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: accepted for a uniform signature (no cross-coordinate reduction is needed).

  Returns:
    The MeaMed aggregate, shaped like one worker's update.

  References:
    Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, 2018.
  """
  del axis_name
  f = checks.check_num_byzantine("meamed", f)
  n = tree_lib.num_workers("meamed", x)
  checks.require("meamed", n > 2 * f, "n > 2*f", n=n, f=f)

  def fn(ordered):
    # The n - f nearest values form a window starting at sorted position 0..f, so every
    # position is needed: one full network.
    return sorting.mean_closest_to(ordered, sorting.median_of_sorted(ordered), n - f)
  return _per_leaf(fn, x)


def phocas(x, f: int, *, axis_name=None):
  r"""Phocas: per coordinate, the mean of the ``n - f`` values nearest the trimmed mean.

  .. math:: \mathrm{Phocas}(x)_k = \frac{1}{n - f} \sum_{i \in S_k} x_{i,k}, \qquad
     S_k = \text{the } n - f \text{ indices } i \text{ of least }
     |x_{i,k} - \mathrm{TM}_f(x)_k|

  with :math:`\mathrm{TM}_f` the coordinate-wise :func:`trimmed_mean`. Needs ``n > 2f``. The
  values are sorted once; the trimmed mean and the window are both read from that one network.
  Ties in distance are broken towards the lower sorted value.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    f: number of Byzantine workers tolerated (static).
    axis_name: accepted for a uniform signature (no cross-coordinate reduction is needed).

  Returns:
    The Phocas aggregate, shaped like one worker's update.

  References:
    Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, 2018.
  """
  del axis_name
  f = checks.check_num_byzantine("phocas", f)
  n = tree_lib.num_workers("phocas", x)
  checks.require("phocas", n > 2 * f, "n > 2*f", n=n, f=f)

  def fn(ordered):
    return sorting.mean_closest_to(ordered, sorting.mean_of_sorted(ordered[f:n - f]), n - f)
  return _per_leaf(fn, x)
