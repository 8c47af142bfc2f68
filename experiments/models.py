"""Classifiers for the experiments (flax NNX), and their pure-function form for the simulator.

* ``mlp``: flatten, ``hidden`` ReLU layers, linear head. The default on digits (8x8 inputs).
* ``cnn``: two 3x3 conv + ReLU + 2x2 max-pool stages, a ReLU dense layer, a linear head.
* ``resnet18``: the CIFAR variant of He et al. (3x3 stem, no max-pool, four stages of two
  basic blocks, 64-128-256-512 channels) with GroupNorm in place of BatchNorm: batch
  statistics would be per-worker mutable state that Byzantine workers could poison and that a
  pure ``loss_fn(params, batch)`` cannot carry, and GroupNorm is the usual choice in
  federated and Byzantine-robust training (Hsieh et al., 2020).

The simulator differentiates a pure ``loss_fn(params, batch)``. :func:`functional` splits an
NNX module into its graph definition and its parameters (a plain nested dict of arrays, which
every rule and optax handle as a pytree) and returns ``apply(params, images) -> logits`` that
merges them back inside the traced function.

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
  Wu and He, "Group Normalization", ECCV 2018.
  Hsieh et al., "The Non-IID Data Quagmire of Decentralized Machine Learning", ICML 2020.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

MODELS = ("mlp", "cnn", "resnet18")


class MLP(nnx.Module):
  """Flatten, ReLU hidden layers, linear head."""

  def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,), *,
               rngs: nnx.Rngs):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, classes]
    x = images.reshape(images.shape[0], -1)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.head(x)


class SmallCNN(nnx.Module):
  """Two conv stages (3x3 conv, ReLU, 2x2 max-pool), a ReLU dense layer, a linear head."""

  def __init__(self, image_shape: Sequence[int], num_classes: int,
               channels: Sequence[int] = (16, 32), hidden: int = 64, *, rngs: nnx.Rngs):
    height, width, in_channels = image_shape
    self.convs = nnx.List([
        nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        for a, b in zip([in_channels, *channels], channels)])
    for _ in channels:
      height, width = height // 2, width // 2
    self.dense = nnx.Linear(height * width * channels[-1], hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for conv in self.convs:
      x = nnx.max_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
    x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(x)


def _group_norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=min(32, channels), rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with GroupNorm and a (projected when needed) shortcut."""

  def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, channels, (3, 3), strides=stride, padding="SAME",
                          use_bias=False, rngs=rngs)
    self.norm1 = _group_norm(channels, rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), padding="SAME", use_bias=False,
                          rngs=rngs)
    self.norm2 = _group_norm(channels, rngs)
    if stride != 1 or in_channels != channels:
      self.shortcut_conv = nnx.Conv(in_channels, channels, (1, 1), strides=stride,
                                    use_bias=False, rngs=rngs)
      self.shortcut_norm = _group_norm(channels, rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    shortcut = x if self.shortcut_conv is None else self.shortcut_norm(self.shortcut_conv(x))
    return jax.nn.relu(y + shortcut)


class ResNet18(nnx.Module):
  """ResNet-18, CIFAR variant, GroupNorm (see the module docstring)."""

  def __init__(self, in_channels: int, num_classes: int,
               widths: Sequence[int] = (64, 128, 256, 512), *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(in_channels, widths[0], (3, 3), padding="SAME", use_bias=False,
                         rngs=rngs)
    self.stem_norm = _group_norm(widths[0], rngs)
    blocks = []
    channels = widths[0]
    for stage, width in enumerate(widths):
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(BasicBlock(channels, width, stride, rngs=rngs))
        channels = width
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem_norm(self.stem(images)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def create(name: str, image_shape: Sequence[int], num_classes: int, seed: int) -> nnx.Module:
  """A freshly initialised model of :data:`MODELS` for ``image_shape = (H, W, C)`` inputs."""
  rngs = nnx.Rngs(seed)
  height, width, channels = image_shape
  if name == "mlp":
    return MLP(height * width * channels, num_classes, rngs=rngs)
  if name == "cnn":
    return SmallCNN(image_shape, num_classes, rngs=rngs)
  if name == "resnet18":
    return ResNet18(channels, num_classes, rngs=rngs)
  raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


def functional(model: nnx.Module) -> tuple[Callable, dict]:
  """Splits an NNX model into ``apply(params, images) -> logits`` and its ``params`` dict.

  ``params`` is a plain nested dict of arrays (``nnx.to_pure_dict`` of the ``nnx.Param``
  state); anything else the module holds is frozen into ``apply``.
  """
  graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)

  def apply(params: dict, images: jax.Array) -> jax.Array:
    state = jax.tree.map(lambda v: v, param_state)  # a fresh State to fill, not the template
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)(images)
  return apply, nnx.to_pure_dict(param_state)


def make_loss_fn(apply: Callable) -> Callable:
  """``loss_fn(params, batch)``: mean softmax cross-entropy of ``batch = {image, label}``."""
  def loss_fn(params, batch):
    logits = apply(params, batch["image"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
  return loss_fn


def make_accuracy_fn(apply: Callable, images, labels, chunk: int = 1000) -> Callable:
  """``accuracy(params) -> scalar`` on a fixed (test) set, evaluated in chunks under jit."""
  num = images.shape[0]
  starts = list(range(0, num, chunk))

  @jax.jit
  def accuracy(params):
    correct = 0
    for start in starts:
      logits = apply(params, images[start:start + chunk])
      correct += jnp.sum(jnp.argmax(logits, -1) == labels[start:start + chunk])
    return correct / num
  return accuracy


def num_parameters(params) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
