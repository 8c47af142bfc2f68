r"""Covariance eigenproblems in Gram space: CAF, SMEA and DnC share this.

For rows :math:`x_i` with weights :math:`w_i \ge 0`, :math:`\sum_i w_i = 1`, the weighted
mean is :math:`\mu_w = \sum_i w_i x_i` and the weighted covariance
:math:`\Sigma_w = \sum_i w_i (x_i - \mu_w)(x_i - \mu_w)^\top` (``d x d``). With
:math:`P = I - \mathbf{1} w^\top` the centred rows are :math:`Z = P X`, their Gram
:math:`G = P K P^\top`, and

.. math:: \Sigma_w = Z^\top W Z \quad\text{has the nonzero eigenvalues of}\quad
          M = W^{1/2} G W^{1/2} \;(n \times n).

If :math:`M a = \lambda a` with :math:`|a| = 1`, then :math:`v = Z^\top W^{1/2} a /
\sqrt{\lambda}` is a unit eigenvector of :math:`\Sigma_w` for :math:`\lambda`, and every
row's projection is :math:`(x_i - \mu_w)^\top v = (G W^{1/2} a)_i / \sqrt{\lambda}`. So the
top eigenpair, and the projections the filters score rows by, are exact ``n x n`` work from
``K``: nothing of size ``d`` is formed, and the result is deterministic (ByzFL estimates ``v``
with one power step from a random vector).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "TopEigenpair",
    "centered_gram",
    "top_eigenpair",
    "top_eigenvalue",
]


class TopEigenpair(NamedTuple):
  """The top eigenpair of a weighted covariance, in Gram space.

  Attributes:
    value: :math:`\\lambda_{\\max}(\\Sigma_w)` (``>= 0``).
    projections: ``[n]``, :math:`(x_i - \\mu_w)^\\top v` for every row (weighted or not);
      zero when :math:`\\lambda_{\\max} = 0` (every weighted row at the mean).
  """
  value: jax.Array
  projections: jax.Array


def centered_gram(K: jax.Array, weights: jax.Array) -> jax.Array:
  r""":math:`G = P K P^\top`, :math:`P = I - \mathbf{1} w^\top`: the Gram of :math:`x_i - \mu_w`.

  Written as :math:`G_{ij} = K_{ij} - (Kw)_i - (Kw)_j + w^\top K w`, symmetric by
  construction. ``K`` should be finite (zero the rows of non-finite workers first).
  """
  Kw = K @ weights
  return K - Kw[:, None] - Kw[None, :] + weights @ Kw


def top_eigenpair(K: jax.Array, weights: jax.Array) -> TopEigenpair:
  r"""The top eigenpair of the ``weights``-weighted covariance of the rows behind ``K``.

  Args:
    K: ``[n, n]`` Gram of the rows (any common reference: the covariance is translation
      invariant), finite.
    weights: ``[n]``, non-negative, summing to one.

  Returns:
    :class:`TopEigenpair`.
  """
  G = centered_gram(K, weights)
  root = jnp.sqrt(jnp.maximum(weights, 0))
  M = root[:, None] * G * root[None, :]
  values, vectors = jnp.linalg.eigh(M)
  value = jnp.maximum(values[-1], 0)
  a = vectors[:, -1]
  positive = value > 0
  projections = (G @ (root * a)) / jnp.sqrt(jnp.where(positive, value, 1))
  return TopEigenpair(value, jnp.where(positive, projections, 0))


def top_eigenvalue(K: jax.Array, weights: jax.Array) -> jax.Array:
  r""":math:`\lambda_{\max}` of the weighted covariance alone (``eigvalsh``, no vectors)."""
  G = centered_gram(K, weights)
  root = jnp.sqrt(jnp.maximum(weights, 0))
  return jnp.maximum(jnp.linalg.eigvalsh(root[:, None] * G * root[None, :])[-1], 0)
