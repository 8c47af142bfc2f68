"""Data attacks: factories of ``data_attack(batch, key) -> batch`` (label flipping), and the
batch helpers the augmentations share."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flagjax.core import checks
from flagjax.core import tree as tree_lib

__all__ = ["label_flip"]

PyTree = tree_lib.PyTree


_BATCH_KEYS = (("x", "y"), ("image", "label"))


def to_input_dtype(values: jax.Array, dtype) -> jax.Array:
  """Augmented inputs back in the batch's ``dtype``: floating point by a cast; integer inputs
  (e.g. uint8 images) rounded to the nearest level and clipped to the dtype's range, where a
  plain cast would truncate and wrap around (200 + 100 -> 44 in uint8)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    values = jnp.clip(jnp.round(values), info.min, info.max)
  elif dtype == jnp.bool_:
    values = values > 0.5
  return values.astype(dtype)


def split_batch(name: str, batch):
  """``(x, y, rebuild)`` for a dict (``x``/``y`` or ``image``/``label``) or an ``(x, y)``."""
  if isinstance(batch, Mapping):
    for x_key, y_key in _BATCH_KEYS:
      if x_key in batch and y_key in batch:
        def rebuild(x, y, x_key=x_key, y_key=y_key):
          out = dict(batch)
          out[x_key], out[y_key] = x, y
          return type(batch)(out) if type(batch) is not dict else out
        return batch[x_key], batch[y_key], rebuild
    raise ValueError(f"{name} needs a batch dict with keys ('x', 'y') or ('image', 'label'), "
                     f"got keys {sorted(batch)}")
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0], batch[1], lambda x, y: type(batch)((x, y))
  raise ValueError(f"{name} needs a batch (x, y) or a dict with 'x'/'y' or 'image'/'label', "
                   f"got {type(batch).__name__}")


def on_images(name: str, image_fn, image_shape):
  """``data_attack`` applying ``image_fn(images [b, H, W, C], key)`` to the batch's x."""
  def data_attack(batch, key):
    x, y, rebuild = split_batch(name, batch)
    b = x.shape[0]
    if image_shape is not None:
      images = x.reshape((b,) + tuple(image_shape))
    else:
      images = x
    checks.require(name, images.ndim in (3, 4),
                   "images [batch, H, W] or [batch, H, W, C] (or image_shape=)",
                   shape=tuple(x.shape))
    squeeze = images.ndim == 3
    if squeeze:
      images = images[..., None]
    out = image_fn(images, key)
    if squeeze:
      out = out[..., 0]
    return rebuild(to_input_dtype(out.reshape(x.shape), x.dtype), y)
  return data_attack


def label_flip(num_classes: int):
  r"""Label flipping: every label ``y`` becomes ``num_classes - 1 - y``.

  Args:
    num_classes: number of classes (static, ``>= 1``).

  Returns:
    ``data_attack(batch, key) -> batch`` (``key`` unused).

  References:
    Allen-Zhu et al., ICLR 2021; Almasi et al., ICLR 2024.
  """
  checks.require("label_flip", isinstance(num_classes, int) and num_classes >= 1,
                 "num_classes >= 1", num_classes=num_classes)

  def data_attack(batch, key=None):
    del key
    x, y, rebuild = split_batch("label_flip", batch)
    return rebuild(x, (num_classes - 1 - y).astype(y.dtype))
  return data_attack
