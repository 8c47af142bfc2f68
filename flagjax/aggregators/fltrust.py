r"""FLTrust (Cao, Fang, Liu & Gong, NDSS 2021): trust from the server's own update.

The server computes an update ``g0`` on a small clean root dataset; each worker is trusted in
proportion to its positive cosine with ``g0`` and rescaled to ``|g0|``. A combination of the
rows whose coefficients need only the row norms and the products with ``g0`` (the last row
of the Gram with ``g0`` appended): one pass for the norms, one matrix-vector product, one
pass to combine; on coordinate shards the norms and products are ``psum``-ed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

__all__ = [
    "fltrust",
    "trust_coefficients",
]


def trust_coefficients(norms: jax.Array, dots: jax.Array, server_norm: jax.Array) -> jax.Array:
  r"""FLTrust's coefficients from the row norms :math:`|x_i|`, the products
  :math:`\langle x_i, g_0 \rangle / |g_0|` and :math:`|g_0|`:

  .. math:: t_i = \mathrm{relu}(\cos(x_i, g_0)), \qquad
            c_i = \frac{t_i}{\sum_j t_j} \frac{|g_0|}{|x_i|}

  (all zero when every trust is 0, and for rows holding NaN/Inf or of zero norm; all NaN when
  ``g0`` itself is not finite). Returns ``[n]``.
  """
  usable = jnp.isfinite(norms) & jnp.isfinite(dots) & (norms > 0)
  safe = jnp.where(usable, norms, 1)
  trust = jnp.where(usable & (server_norm > 0), jnp.maximum(dots / safe, 0), 0)
  total = jnp.sum(trust)
  coefficients = jnp.where(total > 0, trust / jnp.where(total > 0, total, 1), 0)
  coefficients = coefficients * server_norm / safe
  return jnp.where(jnp.isfinite(server_norm), coefficients, jnp.nan)


@gram_lib.rotation_equivariant
def fltrust(x, server_update, *, axis_name=None):
  r"""FLTrust: workers weighted by their positive cosine with the server's update, each
  rescaled to its norm.

  .. math:: \mathrm{FLTrust}(x) = \frac{1}{\sum_i t_i}\sum_i t_i \frac{|g_0|}{|x_i|} x_i,
            \qquad t_i = \mathrm{relu}\Big(\frac{\langle x_i, g_0\rangle}{|x_i| |g_0|}\Big)

  and zero when every :math:`t_i = 0` (the paper's formula; FLPoison falls back to uniform
  trust there, which hands the step to the workers the server just distrusted). No ``f``:
  rows holding NaN/Inf and zero rows get no trust; a huge finite row (1e30 in float32) has a
  finite norm (:func:`flagjax.core.gram.row_norms`) and is rescaled to ``|g0|`` like any other.
  In :func:`flagjax.sim.make_train_step`, ``server_batch=`` computes ``g0`` on the server's
  batch each step and passes it here.

  Args:
    x: stacked worker updates ``[n, ...]`` or a pytree of them.
    server_update: ``g0``, shaped like one worker's update (this shard of it when
      ``axis_name`` is set).
    axis_name: when set, ``x`` and ``server_update`` hold a coordinate shard and the Gram is
      ``psum``-ed over it.

  Returns:
    The aggregate, shaped like one worker's update, in the input dtype.

  References:
    Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
    Bootstrapping", NDSS 2021 (Algorithm 1).
  """
  n = tree_lib.num_workers("fltrust", x)
  if jax.tree.structure(server_update) != jax.tree.structure(x):
    raise ValueError("fltrust needs server_update with the structure of one worker's update")
  for leaf, g in zip(jax.tree.leaves(x), jax.tree.leaves(server_update)):
    if jnp.shape(g) != leaf.shape[1:]:
      raise ValueError(f"fltrust needs server_update shaped like one worker's update "
                       f"{leaf.shape[1:]}, got {jnp.shape(g)} (n={n})")
  norms = gram_lib.row_norms(x, axis_name=axis_name)
  server = jax.tree.map(lambda g: jnp.expand_dims(g, 0), server_update)
  server_norm = gram_lib.row_norms(server, axis_name=axis_name)[0]
  scale = jnp.where(server_norm > 0, 1 / server_norm, 0)
  # g0 / |g0| in each worker leaf's compute dtype, as before products_with existed.
  units = jax.tree.map(lambda leaf, g: g.astype(tree_lib.compute_dtype(leaf.dtype))
                       * scale.astype(tree_lib.compute_dtype(leaf.dtype)), x, server_update)
  dots = gram_lib.products_with(x, units, axis_name=axis_name).astype(norms.dtype)
  return gram_lib.combine(trust_coefficients(norms, dots, server_norm), x)
