"""Shared numerical cores of flagjax.

Two families of robust rules rest on two cores, each written once:

* :mod:`flagjax.core.gram` -- the Gram matrix ``K = X X^T`` of the stacked worker updates
  (summed per pytree leaf, ``psum``-ed over ``axis_name``), distances derived from it, and the
  NaN-safe combination ``sum_i c_i x_i`` back into the input's structure.
* :mod:`flagjax.core.sorting` -- order statistics per coordinate over the (small, static)
  worker axis by a pruned Batcher odd-even merge network of ``minimum``/``maximum``.

:mod:`flagjax.core.tree` holds the pytree and dtype conventions and :mod:`flagjax.core.checks`
the trace-time bound checks. No core imports a rule.
"""

from flagjax.core import checks, gram, sorting, tree

__all__ = ["checks", "gram", "sorting", "tree"]
