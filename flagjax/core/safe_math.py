"""Elementwise functions whose derivative is finite where the rules need it.

``jnp.sqrt`` has derivative :math:`1 / (2 \\sqrt{v}) = +\\infty` at :math:`v = 0`, and a
zero norm is common in robust aggregation (a worker that sends zeros, a row equal to the
centre, a constant coordinate's standard deviation). Reverse mode multiplies that infinity
by the zero cotangent of whatever ``jnp.where`` masked off, and ``0 * inf`` is NaN: one zero
norm turned the whole gradient of a rule into NaN, even where the norm only fed a branch that
was not taken. :func:`sqrt` gives the same values with derivative 0 at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sqrt"]


def sqrt(v: jax.Array) -> jax.Array:
  r""":math:`\sqrt{v}` (the same values as ``jnp.sqrt``, NaN and Inf included; ``-0.0`` gives
  ``0.0``), with derivative :math:`1 / (2\sqrt{v})` for :math:`v > 0` and 0 at :math:`v = 0`.

  The choice at 0 is the least-norm subgradient of what a square root of a sum of squares is
  used for here: a norm :math:`|x| = \sqrt{x^\top x}` at :math:`x = 0` has subgradients
  the unit ball, and :math:`d(x^\top x) = 2 x^\top dx = 0` there, so this gives 0 whatever the
  slope chosen at 0 for the outer function; a standard deviation at zero spread likewise.

  Written with two ``where`` s (``jnp.sqrt`` only ever sees positive numbers, or 1), not as a
  ``custom_jvp``: its derivative is then finite to every order by JAX's own rules. A
  ``custom_jvp`` version gave NaN Hessian-vector products inside a ``scan`` (CAF's loop): the
  second derivative there reached ``jnp.sqrt``'s infinite slope at 0.
  """
  v = jnp.asarray(v)
  positive = v > 0
  root = jnp.sqrt(jnp.where(positive, v, 1))
  # v == 0 gives 0; v < 0 and NaN give NaN, as jnp.sqrt does.
  return jnp.where(positive, root, jnp.where(v == 0, 0, jnp.nan).astype(root.dtype))
