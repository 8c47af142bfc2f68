"""The paper's workers on augmented data: Gaussian noise, Arnold's cat map, the
Lotka-Volterra flow, and one of the three at random."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flagjax.attacks.data import on_images, split_batch, to_input_dtype
from flagjax.core import checks
from flagjax.core import tree as tree_lib

__all__ = ["augment_cat_map", "augment_gaussian", "augment_lotka_volterra", "augmented",
           "cat_map_source", "lotka_volterra_source"]

PyTree = tree_lib.PyTree


def augment_gaussian(sigma: float = 0.1):
  r"""Gaussian-noise augmentation: ``x -> x + sigma * N(0, 1)`` on every input feature.

  Integer inputs (e.g. uint8 images) come back rounded to the nearest level and clipped to
  their dtype's range; ``sigma`` is in the inputs' own units.

  Args:
    sigma: noise standard deviation.

  Returns:
    ``data_attack(batch, key) -> batch``.

  References:
    Almasi et al., ICLR 2024 (workers on augmented data).
  """
  def data_attack(batch, key):
    x, y, rebuild = split_batch("augment_gaussian", batch)
    noise = jax.random.normal(key, x.shape, tree_lib.compute_dtype(x.dtype))
    return rebuild(to_input_dtype(x + sigma * noise, x.dtype), y)
  return data_attack


@functools.lru_cache(maxsize=None)
def cat_map_source(size: int, num_iterations: int) -> np.ndarray:
  r"""For Arnold's cat map on ``size x size`` pixels, the source pixel of each target pixel.

  One iteration moves pixel :math:`(i, j)` (row, column) to
  :math:`((2i + j) \bmod N, (i + j) \bmod N)`; ``out.flat[t] = image.flat[source[t]]`` after
  ``num_iterations`` iterations.

  Args:
    size: ``N``, the image side.
    num_iterations: how many times the map is applied (``>= 0``).

  Returns:
    ``[N * N]`` int32 flat source indices.
  """
  i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  source = np.arange(size * size).reshape(size, size)
  for _ in range(num_iterations):
    moved = np.empty_like(source)
    moved[(2 * i + j) % size, (i + j) % size] = source
    source = moved
  return source.reshape(-1).astype(np.int32)


def augment_cat_map(num_iterations: int = 1, *, image_shape: Optional[Sequence[int]] = None):
  r"""Arnold's cat map on square images: pixel :math:`(i, j)` moves to
  :math:`((2i + j) \bmod N, (i + j) \bmod N)`, ``num_iterations`` times (a measure-preserving
  chaotic shuffle: the image's pixel values are kept, their arrangement scrambled; the map is
  periodic, so some iteration counts give the image back).

  Args:
    num_iterations: how many times to apply the map (static, ``>= 0``).
    image_shape: ``(H, W)`` or ``(H, W, C)`` when the batch's ``x`` holds flat features.

  Returns:
    ``data_attack(batch, key) -> batch`` (``key`` unused).

  References:
    Arnold, Avez, "Ergodic Problems of Classical Mechanics", 1968; Almasi et al., ICLR 2024.
  """
  checks.require("augment_cat_map", isinstance(num_iterations, int) and num_iterations >= 0,
                 "num_iterations >= 0", num_iterations=num_iterations)

  def image_fn(images, key):
    del key
    b, height, width = images.shape[:3]
    checks.require("augment_cat_map", height == width, "square images", H=height, W=width)
    source = jnp.asarray(cat_map_source(height, num_iterations))
    flat = images.reshape((b, height * width) + images.shape[3:])
    return jnp.take(flat, source, axis=1).reshape(images.shape)
  return on_images("augment_cat_map", image_fn, image_shape)


def lotka_volterra_source(height: int, width: int, *, time: float, alpha: float, beta: float,
                          gamma: float, delta: float, spread: float,
                          num_steps: int) -> np.ndarray:
  r"""Source coordinates (fractional row, column) of each pixel under the Lotka-Volterra flow.

  Columns are prey :math:`u`, rows predators :math:`v`, both mapped onto
  ``[(1 - spread) c, (1 + spread) c]`` around the equilibrium
  :math:`c = (\gamma/\delta, \alpha/\beta)` of

  .. math:: \dot u = \alpha u - \beta u v, \qquad \dot v = \delta u v - \gamma v.

  Each target pixel's source is the point the flow carries onto it in ``time``: the ODE
  integrated backwards by ``num_steps`` RK4 steps (float64, numpy, at trace time).

  Returns:
    ``[2, H, W]`` source (row, column) pixel coordinates (may fall outside the image).
  """
  u_eq, v_eq = gamma / delta, alpha / beta
  rows, cols = np.meshgrid(np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width),
                           indexing="ij")
  u = u_eq * (1 + spread * cols)
  v = v_eq * (1 + spread * rows)

  def field(u, v):
    return alpha * u - beta * u * v, delta * u * v - gamma * v

  dt = -time / num_steps
  for _ in range(num_steps):
    k1 = field(u, v)
    k2 = field(u + 0.5 * dt * k1[0], v + 0.5 * dt * k1[1])
    k3 = field(u + 0.5 * dt * k2[0], v + 0.5 * dt * k2[1])
    k4 = field(u + dt * k3[0], v + dt * k3[1])
    u = u + dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
    v = v + dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
  source_cols = (u / u_eq - 1) / spread
  source_rows = (v / v_eq - 1) / spread
  return np.stack([(source_rows + 1) * (height - 1) / 2, (source_cols + 1) * (width - 1) / 2])


def augment_lotka_volterra(time: float = 0.5, *, alpha: float = 1.0, beta: float = 1.0,
                           gamma: float = 1.0, delta: float = 1.0, spread: float = 0.5,
                           num_steps: int = 16,
                           image_shape: Optional[Sequence[int]] = None):
  r"""Images warped by the Lotka-Volterra flow: each pixel is carried for ``time`` along

  .. math:: \dot u = \alpha u - \beta u v, \qquad \dot v = \delta u v - \gamma v

  with the image's columns as prey ``u`` and rows as predators ``v`` around the equilibrium
  (see :func:`lotka_volterra_source`): a smooth, invertible, non-rigid swirl about the image
  centre (closed orbits; a rotation near the centre, shearing further out). Pixels are
  sampled bilinearly; sources outside the image take the nearest edge pixel.

  Args:
    time: flow time (``0``: identity; orbits near the centre close after ``2 pi``).
    alpha, beta, gamma, delta: the Lotka-Volterra coefficients (positive).
    spread: half-width of the image's domain relative to the equilibrium, in ``(0, 1)``.
    num_steps: RK4 steps of the backward integration (static).
    image_shape: ``(H, W)`` or ``(H, W, C)`` when the batch's ``x`` holds flat features.

  Returns:
    ``data_attack(batch, key) -> batch`` (``key`` unused).

  References:
    Lotka, "Elements of Physical Biology", 1925; Volterra, 1926; Almasi et al., ICLR 2024.
  """
  checks.require("augment_lotka_volterra", 0 < spread < 1 and num_steps >= 1,
                 "0 < spread < 1 and num_steps >= 1", spread=spread, num_steps=num_steps)
  checks.require("augment_lotka_volterra", min(alpha, beta, gamma, delta) > 0,
                 "positive alpha, beta, gamma, delta", alpha=alpha, beta=beta, gamma=gamma,
                 delta=delta)

  def image_fn(images, key):
    del key
    b, height, width = images.shape[:3]
    checks.require("augment_lotka_volterra", height >= 2 and width >= 2, "H >= 2 and W >= 2",
                   H=height, W=width)
    source = lotka_volterra_source(height, width, time=time, alpha=alpha, beta=beta,
                                   gamma=gamma, delta=delta, spread=spread,
                                   num_steps=num_steps)
    row = np.clip(source[0], 0, height - 1)
    col = np.clip(source[1], 0, width - 1)
    r0 = np.minimum(np.floor(row).astype(np.int32), height - 2)
    c0 = np.minimum(np.floor(col).astype(np.int32), width - 2)
    wr, wc = row - r0, col - c0
    dtype = tree_lib.compute_dtype(images.dtype)
    flat = images.reshape((b, height * width) + images.shape[3:]).astype(dtype)
    out = 0
    for dr, dc, weight in ((0, 0, (1 - wr) * (1 - wc)), (0, 1, (1 - wr) * wc),
                           (1, 0, wr * (1 - wc)), (1, 1, wr * wc)):
      index = jnp.asarray(((r0 + dr) * width + (c0 + dc)).reshape(-1))
      w = jnp.asarray(weight.reshape((1, -1) + (1,) * (images.ndim - 3)), dtype)
      out = out + w * jnp.take(flat, index, axis=1)
    return out.reshape(images.shape)
  return on_images("augment_lotka_volterra", image_fn, image_shape)


def augmented(*, sigma: float = 0.1, num_iterations: int = 1, time: float = 0.5,
              image_shape: Optional[Sequence[int]] = None):
  r"""The paper's workers on augmented data: each batch gets one of Gaussian noise
  (:func:`augment_gaussian`), the Lotka-Volterra flow (:func:`augment_lotka_volterra`) or
  Arnold's cat map (:func:`augment_cat_map`), chosen uniformly at random from ``key``.

  Args:
    sigma: noise standard deviation of the Gaussian augmentation.
    num_iterations: cat-map iterations.
    time: Lotka-Volterra flow time.
    image_shape: ``(H, W)`` or ``(H, W, C)`` when the batch's ``x`` holds flat features.

  Returns:
    ``data_attack(batch, key) -> batch``.

  References:
    Almasi et al., ICLR 2024.
  """
  choices = (augment_gaussian(sigma),
             augment_lotka_volterra(time, image_shape=image_shape),
             augment_cat_map(num_iterations, image_shape=image_shape))

  def data_attack(batch, key):
    choice_key, noise_key = jax.random.split(key)
    which = jax.random.randint(choice_key, (), 0, len(choices))
    return jax.lax.switch(which, [functools.partial(c, key=noise_key) for c in choices],
                          batch)
  return data_attack
