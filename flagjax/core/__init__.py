"""Shared numerical cores of flagjax.

Two families of robust rules rest on two cores, each written once:

* :mod:`flagjax.core.gram` -- the Gram matrix ``K = X X^T`` of the stacked worker updates
  (summed per pytree leaf, ``psum``-ed over ``axis_name``), distances derived from it, and the
  NaN-safe combination ``sum_i c_i x_i`` back into the input's structure.
* :mod:`flagjax.core.sorting` -- order statistics per coordinate over the (small, static)
  worker axis by a pruned Batcher odd-even merge network of ``minimum``/``maximum``.

Around them, each written once for the rules that share it: :mod:`flagjax.core.spectral`
(covariance eigenproblems in Gram space: CAF, SMEA, DnC), :mod:`flagjax.core.subsets` (the
exact search over subsets of ``n - f`` rows: MDA, SMEA), :mod:`flagjax.core.sampling`
(stratified random coordinate subsets, equal on shards: DnC, SignGuard) and
:mod:`flagjax.core.clustering` (mean shift and agglomerative clustering of the ``n`` rows:
SignGuard, Clipped Clustering).

:mod:`flagjax.core.tree` holds the pytree and dtype conventions, :mod:`flagjax.core.checks`
the trace-time bound checks and :mod:`flagjax.core.safe_math` the square root with a finite
derivative at 0 that every norm is taken with. No core imports a rule.
"""

from flagjax.core import (checks, clustering, gram, safe_math, sampling, sorting, spectral,
                          subsets, tree)

__all__ = ["checks", "clustering", "gram", "safe_math", "sampling", "sorting", "spectral",
           "subsets", "tree"]
