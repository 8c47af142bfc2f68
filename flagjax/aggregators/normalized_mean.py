"""The normalised mean: every row rescaled to the median norm, then averaged (flag's output
scale without its subspace, the baseline that tells the two apart)."""

from __future__ import annotations

import jax.numpy as jnp

from flagjax.core import gram as gram_lib
from flagjax.core import sorting
from flagjax.core import tree as tree_lib

__all__ = [
    "normalized_mean",
]


@gram_lib.rotation_equivariant
def normalized_mean(x, *, axis_name=None):
  r"""Mean of the rows rescaled to the median norm:
  :math:`\frac{1}{k} \sum_{i \in \text{kept}} \frac{m}{|x_i|} x_i`, with
  :math:`m = \mathrm{median}_{i \in \text{kept}} |x_i|`.

  Kept rows are the finite, non-zero ones (as in :func:`flagjax.aggregators.flag`); the others
  contribute nothing. This is ``flag(x, scale="norm")`` with the subspace projection
  :math:`Y Y^\top` replaced by the identity, so comparing the two separates what the flag
  subspace buys from what normalisation alone does. No ``f``: one worker moves the output by
  at most ``m / k`` (its row has the median norm after rescaling), however large it is.

  Costs one pass for the row norms (overflow-safe, :func:`flagjax.core.gram.row_norms`) and
  one to combine; on a coordinate shard the norms are ``psum``-ed over ``axis_name``.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    axis_name: when set, ``x`` holds a coordinate shard.

  Returns:
    The aggregate, shaped like one worker's update; NaN when no row is finite, zero when
    every finite row is zero.
  """
  tree_lib.num_workers("normalized_mean", x)
  norms = gram_lib.row_norms(x, axis_name=axis_name)
  finite = jnp.isfinite(norms)
  kept = finite & (norms > 0)
  count = jnp.sum(kept)
  median = sorting.masked_median(norms, kept)
  safe = jnp.where(kept, norms, 1)
  coefficients = jnp.where(kept, median / safe / jnp.maximum(count, 1), 0)
  # No finite row at all: NaN says there is nothing to aggregate.
  coefficients = jnp.where(jnp.any(finite), coefficients, jnp.nan)
  return gram_lib.combine(coefficients, x)
