"""The non-robust baseline: the plain mean of the workers' updates."""

from __future__ import annotations

import jax.numpy as jnp

from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

__all__ = [
    "mean",
]


@gram_lib.rotation_equivariant
def mean(x, *, axis_name=None):
  r"""Coordinate-wise mean :math:`\frac{1}{n} \sum_i x_i` (the non-robust baseline).

  The only rule that may propagate NaN/Inf rows: one Byzantine worker moves it arbitrarily far.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    axis_name: accepted for a uniform signature; the mean needs no reduction over coordinates.

  Returns:
    The mean, shaped like one worker's update, in the input dtype.
  """
  del axis_name
  n = tree_lib.num_workers("mean", x)
  return gram_lib.combine(jnp.full((n,), 1.0 / n), x)
