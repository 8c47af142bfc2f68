r"""The worker simulator: one training step of ``n`` workers, ``f`` of them Byzantine.

:func:`make_train_step` builds ``step(params, opt_state, batch, key)`` for a loss, an optax
transformation whose first stage aggregates stacked worker updates (``flagjax.aggregate``,
chained or inside ``optax.experimental.aggregating.process``), an optional gradient attack and
an optional data attack. The last ``num_byzantine`` workers are Byzantine.

One step:

1. ``data_attack(worker_batch, key_i)`` rewrites the Byzantine workers' batches (one key per
   worker, split from the step key, the same on every backend);
2. every worker takes ``jax.value_and_grad(loss_fn)(params, worker_batch)`` (a ``vmap`` over
   the workers a device holds), or with local training (``local_steps``) runs ``k`` local
   optimizer steps and takes its model delta ``params - local_params``;
3. on the sharded backends each gradient leaf is flattened, zero-padded to a multiple of the
   device count and exchanged with one ``all_to_all``, so that each device holds *every*
   worker's values for *its* slice of the coordinates, ``[n, s]`` with ``s = ceil(d / P)``;
4. ``attack(honest_rows, f, key)`` replaces the last ``f`` rows (on the shards in the sharded
   backends, with ``axis_name=`` for adaptive attacks); a worker with both a data and a
   gradient attack sends the gradient attack's rows;
5. with ``clients_per_round=m``, the ``m`` sampled workers' rows are kept (in worker order);
6. ``tx.update(stacked, opt_state, params, key=..., [axis_name=, gather=, scatter=],
   [declared_byzantine=], [server_update=])`` (the last with ``server_batch``: the server's
   update on it): the
   aggregator runs the rule on the shards (Gram-space rules ``psum`` one ``n x n`` Gram,
   coordinate-wise rules need nothing) and ``gather`` s the aggregate back, replicated;
7. ``optax.apply_updates``.

Backends, which give the same parameters (up to float32 reduction order):

* ``"vmap"``: every worker on the default device; the rule sees leaves ``[n, *leaf_shape]``.
* ``"shard_map"``: ``jax.shard_map`` over a 1-D mesh ``("workers",)`` of ``devices``; the
  batch is split along workers (``num_workers / num_devices`` per device, several allowed),
  params and optimizer state are replicated and kept in their natural layout.
* ``"pmap"``: the same per-device program and collectives under ``jax.pmap`` (which jax 0.10
  builds on ``shard_map``).

No device ever holds every worker's full gradient in the sharded backends: a device holds its
own workers' gradients ``[n / P, d]``, then the coordinate shards ``[n, d / P]``, then the
replicated aggregate ``[d]``. (Anything a transformation keeps per worker in its state, such as
worker momentum, is replicated in natural layout and is outside this guarantee.)

Randomness: ``key`` is split into a data-attack key (then one per worker), a gradient-attack
key and an aggregation key (passed as ``key=`` to ``tx.update``, e.g. for bucketing; the same
on every device). On the sharded backends the gradient attack is called once per coordinate
shard with the attack key folded with the device index, so a random attack (``gaussian``,
``uniform``) draws independent noise per shard, i.e. *different* draws from the ``"vmap"``
backend. Deterministic attacks (``sign_flip``, ``ipm``, ``alie``, ``nan``, ...) agree across
backends; use them to compare backends.

Running across hosts (``"shard_map"``, tested with two processes in CI and runnable as
``python -m experiments.multihost --launch 2``): call ``jax.distributed.initialize()`` on every
host (coordinator address, process count and id from the environment or as arguments) before
any other JAX call; ``jax.devices()`` then lists the devices of all hosts, and
``make_train_step(..., backend="shard_map")`` builds its mesh over all of them. Each host
builds the global batch from the workers it holds, e.g.
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("workers")), local_batch)``
with the mesh ``jax.sharding.Mesh(np.array(jax.devices()), ("workers",))``, and passes its
own ``params``, ``opt_state = tx.init(params)`` and ``key = jax.random.key(seed)``, equal on
every host (host-local arrays are fine: the step places them replicated on the global mesh,
a typed key as its raw data; already-global replicated arrays pass as they are); every host
runs the same ``step``. The ``all_to_all``/``psum``/``all_gather`` then cross hosts; nothing
else changes. ``backend="pmap"`` across processes raises a ``ValueError``.

Your own ``shard_map``: :func:`to_coordinate_shards` and :func:`coordinate_sharding` are the
sharded calling convention of :func:`flagjax.aggregate` (see their docstrings).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from flagjax.core import checks

__all__ = [
    "StepKeys",
    "coordinate_sharding",
    "make_train_step",
    "split_step_key",
    "to_coordinate_shards",
]

PyTree = Any

BACKENDS = ("vmap", "pmap", "shard_map")
WORKER_AXIS = "workers"
_NAME = "make_train_step"


class StepKeys(NamedTuple):
  """The per-step keys, derived from the step key identically on every backend.

  Attributes:
    data: the data attack's (split into one key per worker).
    attack: the gradient attack's.
    aggregate: the aggregation's (``key=`` of ``tx.update``: bucketing, lossy links, DnC).
    workers: the loss's (``has_rng=True``): split into one key per worker; local step ``j``
      folds in ``j``; the server's batch uses ``fold_in(workers, n)``.
    clients: the round's client sample (``clients_per_round``).
  """
  data: jax.Array
  attack: jax.Array
  aggregate: jax.Array
  workers: jax.Array
  clients: jax.Array


def split_step_key(key: jax.Array) -> StepKeys:
  """Splits a step's key into the :class:`StepKeys` every backend uses identically.

  The first three are ``jax.random.split(key, 3)`` (as before the later two were added, so
  runs without them draw the same numbers); ``workers`` and ``clients`` fold in 3 and 4.
  """
  data, attack, aggregate = jax.random.split(key, 3)
  return StepKeys(data, attack, aggregate, jax.random.fold_in(key, 3),
                  jax.random.fold_in(key, 4))


def _static_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{_NAME} needs {name} as a static Python int, got {value!r}")
  return int(value)


def _leaf_size(leaf) -> int:
  return int(np.prod(leaf.shape, dtype=np.int64))


def _shard_size(size: int, num_devices: int) -> int:
  """Coordinates per device: ``ceil(size / num_devices)`` (the leaf is zero-padded)."""
  return -(-size // num_devices)


def _sizes_along(tree: PyTree, axis: int) -> list:
  """The distinct sizes of axis ``axis`` over the leaves (None for a leaf without it)."""
  sizes = {jnp.shape(leaf)[axis] if jnp.ndim(leaf) > axis else None
           for leaf in jax.tree.leaves(tree)}
  return sorted(sizes, key=str)


def _check_batch(batch: PyTree, num_workers: int) -> None:
  if not jax.tree.leaves(batch):
    raise ValueError(f"{_NAME} needs a batch with at least one array, got {batch!r}")
  leading = _sizes_along(batch, 0)
  if leading != [num_workers]:
    raise ValueError(f"{_NAME} needs every batch leaf to have leading axis "
                     f"num_workers={num_workers}, got leading sizes {leading}")


def _make_worker_update(loss_fn: Callable, *, has_aux: bool, has_rng: bool, has_state: bool,
                        local_steps: int, local_tx: Optional[optax.GradientTransformation]):
  """``worker_update(params, state, batch, rng) -> (loss, aux, update, state)``, one worker.

  Without local training the update is the gradient at ``params``. With it (``local_tx``),
  the worker runs ``local_steps`` steps of ``local_tx`` from ``params`` over the micro-batches
  (the worker batch's leading axis) and sends ``params - local_params``; the loss and aux are
  those of the first local step (at the incoming ``params``), the model state is threaded
  through the local steps. ``aux`` is ``()`` unless ``has_aux``; ``state`` is ``()`` unless
  ``has_state``.
  """
  def objective(params, state, batch, rng):
    args = (params, state, batch) if has_state else (params, batch)
    out = loss_fn(*args, rng) if has_rng else loss_fn(*args)
    loss_and_aux, new_state = out if has_state else (out, state)
    loss, aux = loss_and_aux if has_aux else (loss_and_aux, ())
    return loss, (aux, new_state)
  value_and_grad = jax.value_and_grad(objective, has_aux=True)

  if local_tx is None:
    def gradient(params, state, batch, rng):
      (loss, (aux, state)), grad = value_and_grad(params, state, batch, rng)
      return loss, aux, grad, state
    return gradient

  def local_delta(params, state, micro_batches, rng):
    def local_step(carry, inputs):
      local_params, local_state, model_state = carry
      index, micro_batch = inputs
      (loss, (aux, model_state)), grad = value_and_grad(
          local_params, model_state, micro_batch, jax.random.fold_in(rng, index))
      updates, local_state = local_tx.update(grad, local_state, local_params)
      return (optax.apply_updates(local_params, updates), local_state, model_state), (loss, aux)
    (local_params, _, state), (losses, auxes) = jax.lax.scan(
        local_step, (params, local_tx.init(params), state),
        (jnp.arange(local_steps), micro_batches))
    delta = jax.tree.map(lambda p, q: (p - q).astype(p.dtype), params, local_params)
    return losses[0], jax.tree.map(lambda a: a[0], auxes), delta, state
  return local_delta


def _workers(worker_update, params, states, batch, rngs):
  """``(losses [w], aux [w, ...], updates [w, *params], states [w, ...])`` of the workers."""
  return jax.vmap(worker_update, in_axes=(None, 0, 0, 0))(params, states, batch, rngs)


def _select_workers(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Per worker (leading axis), ``on_true`` where ``mask`` else ``on_false``."""
  def leaf_fn(a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(leaf_fn, on_true, on_false)


def _stack_rows(honest: PyTree, byzantine: PyTree) -> PyTree:
  """Per leaf, the honest rows followed by the Byzantine rows (the leading worker axis)."""
  return jax.tree.map(lambda h, b: jnp.concatenate([h, b.astype(h.dtype)], 0),
                      honest, byzantine)


def _take_rows(tree: PyTree, start: int, stop: int) -> PyTree:
  return jax.tree.map(lambda leaf: leaf[start:stop], tree)


def _find_in_state(opt_state: PyTree, name: str):
  """The (first) field ``name`` of any NamedTuple in the optimizer state, or None."""
  try:
    return optax.tree.get(opt_state, name, None)
  except KeyError:  # several aggregators: report the first one's
    return optax.tree_utils.tree_get_all_with_path(opt_state, name)[0][1]


def _global_norm(tree: PyTree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _metrics(honest_loss, updates, opt_state, num_rows: int) -> dict:
  """The step's metrics; see :func:`make_train_step`."""
  coefficients = _find_in_state(opt_state, "coefficients")
  if coefficients is None or coefficients.shape != (num_rows,):  # not recorded
    coefficients = jnp.full((num_rows,), jnp.nan, jnp.float32)
  aggregate_norm = _find_in_state(opt_state, "aggregate_norm")
  if aggregate_norm is None:
    aggregate_norm = jnp.asarray(jnp.nan, jnp.float32)
  return {
      "honest_loss": honest_loss,
      "aggregate_norm": jnp.asarray(aggregate_norm, jnp.float32),
      "update_norm": _global_norm(updates),
      "coefficients": coefficients,
  }


def _check_aggregated(updates: PyTree, params: PyTree) -> None:
  """Refuses a ``tx`` whose output is not shaped like params (no aggregator in front)."""
  update_leaves, update_tree = jax.tree.flatten(updates)
  param_leaves, param_tree = jax.tree.flatten(params)
  shapes = [(tuple(jnp.shape(u)), tuple(jnp.shape(p)))
            for u, p in zip(update_leaves, param_leaves)]
  if update_tree != param_tree or any(u != p for u, p in shapes):
    bad = next(((u, p) for u, p in shapes if u != p), (update_tree, param_tree))
    raise ValueError(f"{_NAME}: tx returned an update of shape {bad[0]} for a parameter of "
                     f"shape {bad[1]}; tx must reduce the stacked worker updates first "
                     f"(e.g. optax.chain(flagjax.aggregate(rule, ...), optax.sgd(lr)))")


# ---------------------------------------------------------------------------------------------
# Extra arguments that survive jax.lax.cond.
#
# optax's ``aggregating.process`` hands ``**extra_args`` to its postprocessor as *operands* of
# ``jax.lax.cond``, so every extra argument must be a pytree of arrays. The axis name (a str)
# and ``gather``/``scatter`` (functions) would be leaves and fail; wrapped as pytrees with no
# leaves (the value kept as static aux data) they pass through unchanged in meaning.


class _StaticAxisName(str):
  """A ``str`` axis name that is an empty pytree (equal to, and hashes as, the plain str)."""


jax.tree_util.register_pytree_node(
    _StaticAxisName, lambda name: ((), str(name)), lambda name, _: _StaticAxisName(name))


class _StaticInt(int):
  """An ``int`` (the declared ``f``) that is an empty pytree, so it stays a static int."""


jax.tree_util.register_pytree_node(
    _StaticInt, lambda value: ((), int(value)), lambda value, _: _StaticInt(value))


class _StaticFunction:
  """A callable that is an empty pytree (the wrapped function is static aux data)."""

  def __init__(self, fn: Callable):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


jax.tree_util.register_pytree_node(
    _StaticFunction, lambda wrapped: ((), wrapped.fn), lambda fn, _: _StaticFunction(fn))


# ---------------------------------------------------------------------------------------------
# Coordinate-sharded layout (the sharded backends, inside shard_map / pmap).


def _to_coordinate_shards(grads: PyTree, num_devices: int, axis_name) -> PyTree:
  """Local workers' gradients ``[w, *leaf]`` -> every worker's coordinate shard ``[n, s]``.

  Each leaf is flattened and zero-padded to ``num_devices * s`` coordinates; one tiled
  ``all_to_all`` sends coordinate block j to device j and stacks the received blocks in device
  order, which is the global worker order (device j holds workers ``j*w .. j*w + w - 1``).
  """
  def leaf_fn(leaf):
    w = leaf.shape[0]
    size = _leaf_size(leaf[0])
    flat = leaf.reshape(w, size)
    padded_size = num_devices * _shard_size(size, num_devices)
    if padded_size != size:
      flat = jnp.pad(flat, ((0, 0), (0, padded_size - size)))
    return jax.lax.all_to_all(flat, axis_name, split_axis=1, concat_axis=0, tiled=True)
  return jax.tree.map(leaf_fn, grads)


def _shard_offset(params_leaf, num_devices: int, axis_name):
  s = _shard_size(_leaf_size(params_leaf), num_devices)
  return s, jax.lax.axis_index(axis_name) * s


def _zero_padding(rows: PyTree, params: PyTree, num_devices: int, axis_name) -> PyTree:
  """Zeroes the padding coordinates of shards ``[m, s]`` (attacks may have written there)."""
  def leaf_fn(leaf, p):
    size = _leaf_size(p)
    if size % num_devices == 0:
      return leaf
    s, offset = _shard_offset(p, num_devices, axis_name)
    valid = offset + jnp.arange(s) < size
    return jnp.where(valid, leaf, 0)
  return jax.tree.map(leaf_fn, rows, params)


def _make_gather(params: PyTree, num_devices: int, axis_name) -> Callable[[PyTree], PyTree]:
  """``gather(tree of [..., s]) -> tree shaped like params (with the same leading dims)``.

  One ``all_gather`` per leaf, then the padding is cut and the leaf reshaped; the result is
  replicated (invariant over ``axis_name``).
  """
  def gather(shards: PyTree) -> PyTree:
    def leaf_fn(shard, p):
      full = jax.lax.all_gather(shard, axis_name, axis=shard.ndim - 1, tiled=True,
                                to="invarying")
      lead = full.shape[:-1]
      return full[..., :_leaf_size(p)].reshape(lead + p.shape)
    return jax.tree.map(leaf_fn, shards, params)
  return gather


def _make_scatter(params: PyTree, num_devices: int, axis_name) -> Callable[[PyTree], PyTree]:
  """``scatter(tree shaped like params) -> tree of [..., s]``: this device's coordinate slice.

  Leading dims beyond the parameter's shape (e.g. a worker axis) are kept.
  """
  def scatter(tree: PyTree) -> PyTree:
    def leaf_fn(leaf, p):
      size = _leaf_size(p)
      lead = leaf.shape[:leaf.ndim - p.ndim]
      flat = leaf.reshape(lead + (size,))
      s, offset = _shard_offset(p, num_devices, axis_name)
      if num_devices * s != size:
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, num_devices * s - size)])
      return jax.lax.dynamic_slice_in_dim(flat, offset, s, axis=flat.ndim - 1)
    return jax.tree.map(leaf_fn, tree, params)
  return scatter


def _is_typed_key(key) -> bool:
  return jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)


def _replicating(step_fn, mesh, has_state: bool = False):
  """``step_fn`` jitted, with params, optimizer state and key first placed replicated on
  ``mesh``.

  The step returns them replicated on ``mesh``; placing the first call's inputs the same way
  gives every call the same input types, so the step compiles once, not twice. Across hosts
  this is also what turns each host's own (equal) params, state and key into global arrays:
  a typed key cannot be ``device_put`` to devices of other processes, so its raw data travels
  and the key is rebuilt inside the jitted step.
  """
  replicated = jax.sharding.NamedSharding(mesh, P())

  @functools.partial(jax.jit, static_argnums=4)
  def jitted(params, opt_state, batch, key_data, key_impl, *model_state):
    key = key_data if key_impl is None else jax.random.wrap_key_data(key_data, impl=key_impl)
    return step_fn(params, opt_state, batch, key, *model_state)

  def step(params, opt_state, batch, key, *model_state):
    key_impl = jax.random.key_impl(key) if _is_typed_key(key) else None
    key_data = jax.random.key_data(key) if key_impl is not None else key
    params, opt_state, key_data = jax.device_put((params, opt_state, key_data), replicated)
    return jitted(params, opt_state, batch, key_data, key_impl, *model_state)

  if has_state:
    def stateful_step(params, opt_state, batch, key, model_state):
      return step(params, opt_state, batch, key, model_state)
    return stateful_step
  return step


def coordinate_sharding(params: PyTree, num_devices: int,
                        axis_name: str = WORKER_AXIS) -> dict:
  """The keyword arguments of ``tx.update`` for coordinate shards, for one's own shard_map.

  Inside ``jax.shard_map`` (or ``pmap``) over ``num_devices`` devices on ``axis_name``, with
  the rows already in coordinate shards (:func:`to_coordinate_shards`)::

      updates, opt_state = tx.update(shards, opt_state, params, key=key,
                                     **flagjax.sim.coordinate_sharding(params, P, "workers"))

  gives the aggregate in params layout, replicated. The returned ``axis_name``, ``gather``
  and ``scatter`` are wrapped as leafless pytrees, so they also pass through
  ``optax.experimental.aggregating.process`` (which hands extra arguments to
  ``jax.lax.cond``; a plain string there raises ``TypeError ... not a valid JAX type``).
  """
  return {"axis_name": _StaticAxisName(axis_name),
          "gather": _StaticFunction(_make_gather(params, num_devices, axis_name)),
          "scatter": _StaticFunction(_make_scatter(params, num_devices, axis_name))}


def to_coordinate_shards(updates: PyTree, num_devices: int,
                         axis_name: str = WORKER_AXIS) -> PyTree:
  """This device's workers' updates ``[w, *leaf]`` -> every worker's coordinate shard.

  Each leaf becomes ``[n, s]`` with ``n = w * num_devices`` (global worker order: device j
  holds workers ``j*w .. j*w + w - 1``) and ``s = ceil(size / num_devices)`` (zero-padded),
  by one ``all_to_all`` on ``axis_name``. Call inside ``shard_map``/``pmap``.
  """
  return _to_coordinate_shards(updates, num_devices, axis_name)


def _check_local_batch(batch: PyTree, local_steps: int) -> None:
  second = _sizes_along(batch, 1)
  if second != [local_steps]:
    raise ValueError(f"{_NAME} with local training needs every batch leaf shaped "
                     f"[num_workers, local_steps={local_steps}, ...] (one micro-batch per "
                     f"local step), got second axes {second}")


def _check_model_state(model_state: PyTree, num_workers: int) -> None:
  leading = _sizes_along(model_state, 0)
  if leading != [num_workers]:  # (also when the state has no array at all)
    raise ValueError(f"{_NAME} with has_state needs model_state leaves with leading axis "
                     f"num_workers={num_workers} (one state per worker), got leading sizes "
                     f"{leading}")


def _local_optimizer(local_steps: int, local_optimizer):
  """The workers' optax transformation, or None for plain gradients."""
  if local_optimizer is None and local_steps == 1:
    return None
  if local_optimizer is None:
    return optax.sgd(1.0)
  if isinstance(local_optimizer, (int, float)) and not isinstance(local_optimizer, bool):
    return optax.sgd(float(local_optimizer))
  if not isinstance(local_optimizer, optax.GradientTransformation):
    raise ValueError(f"{_NAME} needs local_optimizer as an optax GradientTransformation or a "
                     f"float (plain SGD's learning rate), got {local_optimizer!r}")
  return local_optimizer


# ---------------------------------------------------------------------------------------------


def make_train_step(loss_fn: Callable[..., Any],
                    tx: optax.GradientTransformation,
                    *,
                    num_workers: int,
                    num_byzantine: int,
                    attack: Optional[Callable] = None,
                    data_attack: Optional[Callable] = None,
                    backend: str = "vmap",
                    devices: Optional[Sequence[jax.Device]] = None,
                    server_batch: Optional[PyTree] = None,
                    local_steps: int = 1,
                    local_optimizer: Optional[Any] = None,
                    clients_per_round: Optional[int] = None,
                    declared_byzantine: Optional[int] = None,
                    has_aux: bool = False,
                    has_rng: bool = False,
                    has_state: bool = False):
  r"""Builds one training step of ``num_workers`` workers, the last ``num_byzantine`` of them
  Byzantine, aggregated by ``tx`` (the order of one step is in the module docstring).

  Args:
    loss_fn: ``loss_fn(params, worker_batch) -> loss`` for one worker's batch (a batch leaf
      ``[num_workers, ...]`` without its leading axis); ``loss_fn(params, worker_batch, rng)``
      with ``has_rng``; returning ``(loss, aux)`` with ``has_aux``.
    tx: an optax transformation whose first stage aggregates stacked worker updates, e.g.
      ``optax.chain(flagjax.aggregate(rule, ...), optax.sgd(0.1))``. Its ``update`` is called
      with the extra keyword arguments ``key`` (always), ``declared_byzantine`` (when given)
      and, on the sharded backends, ``axis_name``, ``gather`` and ``scatter`` (the protocol of
      :func:`flagjax.aggregate`); a transformation that takes no extra arguments must be
      wrapped in ``optax.with_extra_args_support``. ``opt_state = tx.init(params)`` for every
      backend. Its output must be shaped like params (checked, ``ValueError``).
    num_workers: ``n``, the leading axis of ``batch`` (static).
    num_byzantine: ``f``, the number of Byzantine workers (the last ``f``), ``0 <= f < n``.
    attack: ``attack(honest_rows, f, key, **kw) -> [f, ...]`` rows that replace the Byzantine
      workers' updates (e.g. ``functools.partial(flagjax.attacks.ipm, eps=0.1)``); called
      with ``axis_name=`` on the sharded backends. None: Byzantine workers send the update
      of their (possibly attacked) data.
    data_attack: ``data_attack(worker_batch, key) -> worker_batch`` applied to the Byzantine
      workers' batches before their updates are taken (ignored when ``attack`` is set: the
      gradient attack's rows are sent). With local training it gets the ``[k, ...]`` batch.
    backend: ``"vmap"`` (one device), ``"pmap"`` or ``"shard_map"`` (workers spread over
      ``devices``, ``num_workers / len(devices)`` per device, coordinate-sharded aggregation).
      Across hosts only ``"shard_map"`` (``"pmap"`` raises a ``ValueError``).
    devices: the devices of the sharded backends; default ``jax.devices()`` (all hosts').
      ``num_workers`` must be a multiple of their number.
    server_batch: a batch the server holds (FLTrust's clean root data, one worker's batch
      layout, no leading worker axis), or None. When given, each step computes the server's
      update on it exactly as a worker's (the gradient, or the local-training delta) at the
      incoming params and passes it to ``tx.update`` as ``server_update=`` (in params layout
      on every backend; a :func:`flagjax.aggregate` of a rule taking ``server_update``
      forwards it, sharded). The batch is a constant of the compiled step.
    local_steps: ``k``, FedAvg-style local training: each worker runs ``k`` steps of
      ``local_optimizer`` from the incoming params on ``k`` micro-batches (batch leaves
      ``[n, k, ...]``) and sends its model delta ``params - local_params`` as its update;
      Byzantine workers train the same, then the attack replaces their rows. ``1`` (default)
      without ``local_optimizer``: the update is the gradient, batch leaves ``[n, ...]``.
    local_optimizer: the workers' optax transformation (fresh state each round), or a float:
      plain SGD with that learning rate. None with ``local_steps > 1``: plain SGD with
      learning rate 1 (one local step then sends the gradient itself; scale with the server's
      ``tx``). Given with ``local_steps=1``, local training with one micro-batch ``[n, 1, ...]``.
    clients_per_round: ``m``, client sampling: each step samples ``m`` of the ``n`` workers
      without replacement (from the step key, the same on every backend) and the rule gets
      their ``m`` rows, in worker order. Byzantine workers are sampled like the others, so a
      round holds between ``max(0, m - (n - f))`` and ``min(f, m)`` of them. Every worker's
      update is still computed (the attack sees all honest updates, as an omniscient attacker;
      the cost is that of ``n`` workers). Build the aggregator for ``m`` rows.
    declared_byzantine: the ``f`` the rule is told (passed as ``declared_byzantine=`` to
      ``tx.update``; reaches rules and pre-aggregators built without ``f``), when it differs
      from the true ``num_byzantine`` (a defender who over- or under-estimates). None (the
      default): not passed, so the rules keep the ``f`` they were built with.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the step's metrics hold ``aux`` per worker
      (leading axis ``n``; with local training, the first local step's).
    has_rng: ``loss_fn`` takes a last argument, a per-worker key (dropout): the step key's
      ``workers`` key split per worker (:class:`StepKeys`), folded with the local step index
      in local training; the same on every backend.
    has_state: the model has mutable state (BatchNorm statistics):
      ``loss_fn(params, model_state, worker_batch[, rng]) -> (loss, new_model_state)`` (or
      ``((loss, aux), new_model_state)``), and the step becomes
      ``step(params, opt_state, batch, key, model_state) -> (params, opt_state, metrics,
      model_state)`` with ``model_state`` leaves ``[num_workers, ...]``: **carried per
      worker**, never aggregated. Averaging it would be a second, unprotected aggregation: one
      Byzantine worker's statistics (a huge running variance) would enter every honest
      worker's model, whatever the robust rule does to the gradients. Each worker's state
      evolves from its own batches only (sharded with the workers on the sharded backends);
      for evaluation take an honest worker's, or a robust aggregate of them. Not with
      ``server_batch`` (the server has no state of its own; ``ValueError``).

  Returns:
    ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``, jitted (the
    sharded backends first place ``params``, ``opt_state`` and ``key`` replicated on the mesh,
    so the step compiles once, and across hosts each host's equal copies become one global
    array); it may itself be called under ``jax.jit`` or ``lax.scan``. ``batch`` is a pytree
    with leading axis ``num_workers``, ``key`` a ``jax.random`` key. ``metrics`` holds
    ``honest_loss`` (the mean loss of the honest workers at the incoming params),
    ``coefficients`` (the aggregator's per-row coefficients read from the new optimizer
    state, ``[m]`` rows the rule got; NaN where the state records none: not a Gram-space
    rule, or ``flagjax.aggregate`` built without ``num_workers``), ``aggregate_norm`` (the
    norm of the aggregate when the aggregator state records a field ``aggregate_norm``, else
    NaN), ``update_norm`` (the global norm of the update applied to the params), ``aux``
    (with ``has_aux``) and ``clients`` (with ``clients_per_round``: the sampled worker
    indices ``[m]``, ascending).

  Raises:
    ValueError: unknown backend; ``num_byzantine`` not in ``[0, num_workers)``;
      ``clients_per_round`` not in ``[1, num_workers]``; ``local_steps < 1``;
      ``num_workers`` not a multiple of the device count (sharded backends); ``"pmap"``
      across processes; a batch whose leading axes are not ``num_workers`` (and
      ``local_steps``), or a ``tx`` that does not aggregate (when traced).

  Example:
    Linear regression on 8 workers, the last 2 sending the sign-flipped honest mean:

    >>> import jax, jax.numpy as jnp, optax, flagjax
    >>> tx = optax.chain(flagjax.aggregate(flagjax.aggregators.trimmed_mean, f=2),
    ...                  optax.sgd(0.1))
    >>> step = flagjax.sim.make_train_step(
    ...     lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2), tx, num_workers=8,
    ...     num_byzantine=2, attack=flagjax.attacks.sign_flip)
    >>> x = jax.random.normal(jax.random.key(0), (8, 32, 3))   # [workers, batch, features]
    >>> batch = {"x": x, "y": x @ jnp.array([1.0, -2.0, 0.5])}
    >>> params = jnp.zeros(3)
    >>> opt_state = tx.init(params)
    >>> for i in range(100):
    ...   params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    >>> print(jnp.round(params, 3), bool(metrics["honest_loss"] < 1e-6))
    [ 1.  -2.   0.5] True
  """
  if backend not in BACKENDS:
    raise ValueError(f"{_NAME} needs backend in {BACKENDS}, got backend={backend!r}")
  n = _static_int("num_workers", num_workers)
  f = _static_int("num_byzantine", num_byzantine)
  checks.require(_NAME, n >= 1, "num_workers >= 1", num_workers=n)
  checks.require(_NAME, f >= 0, "num_byzantine >= 0", num_byzantine=f)
  checks.require(_NAME, f < n, "num_byzantine < num_workers", num_workers=n,
                 num_byzantine=f)
  k = _static_int("local_steps", local_steps)
  checks.require(_NAME, k >= 1, "local_steps >= 1", local_steps=k)
  m = n if clients_per_round is None else _static_int("clients_per_round", clients_per_round)
  checks.require(_NAME, 1 <= m <= n, "1 <= clients_per_round <= num_workers",
                 clients_per_round=m, num_workers=n)
  declared = f if declared_byzantine is None else _static_int("declared_byzantine",
                                                              declared_byzantine)
  checks.require(_NAME, declared >= 0, "declared_byzantine >= 0", declared_byzantine=declared)
  local_tx = _local_optimizer(k, local_optimizer)
  if has_state and server_batch is not None:
    raise ValueError(f"{_NAME} does not take server_batch with has_state (the server holds "
                     f"no model state of its own)")
  worker_update = _make_worker_update(loss_fn, has_aux=bool(has_aux), has_rng=bool(has_rng),
                                      has_state=bool(has_state), local_steps=k,
                                      local_tx=local_tx)
  num_honest = n - f
  use_data_attack = data_attack is not None and attack is None and f > 0
  use_attack = attack is not None and f > 0
  sample_clients = m < n

  def check_batch(batch, model_state):
    _check_batch(batch, n)
    if local_tx is not None:
      _check_local_batch(batch, k)
    if has_state:
      _check_model_state(model_state, n)

  def sampled(keys):
    """The round's clients ``[m]``, ascending (all ``n`` when not sampling)."""
    return jnp.sort(jax.random.permutation(keys.clients, n)[:m])

  def update_args(params, keys) -> dict:
    """``key``, ``declared_byzantine`` and, with a server batch, ``server_update``."""
    args = {"key": keys.aggregate}
    if declared_byzantine is not None:  # (an aggregator without **kwargs keeps working)
      args["declared_byzantine"] = _StaticInt(declared)
    if server_batch is not None:
      args["server_update"] = worker_update(params, (), server_batch,
                                            jax.random.fold_in(keys.workers, n))[2]
    return args

  def finish(params, opt_state, rows, keys, honest_loss, aux, extra_update_args, model_state):
    """Client sampling, aggregation, the params' update and the metrics (every backend)."""
    metrics_extra = {}
    if sample_clients:
      clients = sampled(keys)
      rows = jax.tree.map(lambda leaf: jnp.take(leaf, clients, axis=0), rows)
      metrics_extra["clients"] = clients
    if has_aux:
      metrics_extra["aux"] = aux
    updates, opt_state = tx.update(rows, opt_state, params, **update_args(params, keys),
                                   **extra_update_args)
    _check_aggregated(updates, params)
    params = optax.apply_updates(params, updates)
    metrics = {**_metrics(honest_loss, updates, opt_state, m), **metrics_extra}
    if has_state:
      return params, opt_state, metrics, model_state
    return params, opt_state, metrics

  if backend == "vmap":
    def vmap_step(params, opt_state, batch, key, model_state=()):
      check_batch(batch, model_state)
      keys = split_step_key(key)
      rngs = jax.random.split(keys.workers, n)
      states = model_state  # () without has_state: a pytree without leaves
      if use_attack and not (has_aux or has_state):
        # The Byzantine workers' own updates would be discarded: take only the honest ones.
        losses, aux, updates, _ = _workers(worker_update, params, states[:num_honest],
                                           _take_rows(batch, 0, num_honest), rngs[:num_honest])
      else:
        if use_data_attack:
          worker_keys = jax.random.split(keys.data, n)[num_honest:]
          attacked = jax.vmap(data_attack)(_take_rows(batch, num_honest, n), worker_keys)
          batch = _stack_rows(_take_rows(batch, 0, num_honest), attacked)
        losses, aux, updates, states = _workers(worker_update, params, states, batch, rngs)
      if use_attack:
        honest_rows = _take_rows(updates, 0, num_honest)
        updates = _stack_rows(honest_rows, attack(honest_rows, f, keys.attack))
      honest_loss = jnp.mean(losses[:num_honest].astype(jnp.float32))
      return finish(params, opt_state, updates, keys, honest_loss, aux, {}, states)
    if has_state:
      return jax.jit(lambda params, opt_state, batch, key, model_state: vmap_step(
          params, opt_state, batch, key, model_state))
    return jax.jit(vmap_step)

  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  checks.require(_NAME, n % num_devices == 0,
                 "num_workers to be a multiple of the number of devices",
                 num_workers=n, num_devices=num_devices)
  if backend == "pmap" and jax.process_count() > 1:
    raise ValueError(f"{_NAME} backend='pmap' runs on one process's devices only, but "
                     f"{jax.process_count()} processes are running (jax.distributed): use "
                     f"backend='shard_map' across hosts")
  workers_per_device = n // num_devices

  def device_step(params, opt_state, local_batch, key, local_state=()):
    """One device: its ``workers_per_device`` workers, then its coordinate shard."""
    axis = WORKER_AXIS
    device = jax.lax.axis_index(axis)
    first = device * workers_per_device
    worker_ids = first + jnp.arange(workers_per_device)
    keys = split_step_key(key)
    if use_data_attack:
      worker_keys = jax.lax.dynamic_slice_in_dim(jax.random.split(keys.data, n), first,
                                                 workers_per_device)
      attacked = jax.vmap(data_attack)(local_batch, worker_keys)
      local_batch = _select_workers(worker_ids >= num_honest, attacked, local_batch)
    rngs = jax.lax.dynamic_slice_in_dim(jax.random.split(keys.workers, n), first,
                                        workers_per_device)
    # Replicated params would make grad psum the cotangents over devices; as varying values
    # each device differentiates its own workers' losses only.
    varying_params = jax.lax.pcast(params, axis, to="varying")
    losses, aux, local_updates, states = _workers(worker_update, varying_params, local_state,
                                                  local_batch, rngs)
    honest = (worker_ids < num_honest).astype(jnp.float32)
    honest_loss = jax.lax.psum(jnp.sum(honest * losses.astype(jnp.float32)), axis) / num_honest
    if has_aux:
      aux = jax.tree.map(
          lambda leaf: jax.lax.all_gather(leaf, axis, axis=0, tiled=True, to="invarying"), aux)

    shards = _to_coordinate_shards(local_updates, num_devices, axis)  # leaves [n, s]
    if use_attack:
      honest_rows = _take_rows(shards, 0, num_honest)
      byzantine = attack(honest_rows, f, jax.random.fold_in(keys.attack, device),
                         axis_name=axis)
      byzantine = _zero_padding(byzantine, params, num_devices, axis)
      shards = _stack_rows(honest_rows, byzantine)
    return finish(params, opt_state, shards, keys, honest_loss, aux,
                  coordinate_sharding(params, num_devices, axis), states)

  mesh = jax.sharding.Mesh(np.array(devices), (WORKER_AXIS,))
  if backend == "shard_map":
    state_specs = (P(WORKER_AXIS),) if has_state else ()
    sharded = jax.shard_map(device_step, mesh=mesh,
                            in_specs=(P(), P(), P(WORKER_AXIS), P()) + state_specs,
                            out_specs=(P(), P(), P()) + state_specs)

    def shard_map_step(params, opt_state, batch, key, *model_state):
      check_batch(batch, model_state[0] if has_state else ())
      return sharded(params, opt_state, batch, key, *model_state)
    return _replicating(shard_map_step, mesh, has_state)

  mapped = jax.pmap(device_step, axis_name=WORKER_AXIS,
                    in_axes=(None, None, 0, None) + ((0,) if has_state else ()),
                    out_axes=(None, None, None) + ((0,) if has_state else ()),
                    devices=devices)

  def per_device(tree):
    return jax.tree.map(
        lambda leaf: leaf.reshape((num_devices, workers_per_device) + leaf.shape[1:]), tree)

  def pmap_step(params, opt_state, batch, key, *model_state):
    check_batch(batch, model_state[0] if has_state else ())
    out = mapped(params, opt_state, per_device(batch), key, *map(per_device, model_state))
    if not has_state:
      return out
    params, opt_state, metrics, states = out
    return params, opt_state, metrics, jax.tree.map(
        lambda leaf: leaf.reshape((n,) + leaf.shape[2:]), states)
  return _replicating(pmap_step, mesh, has_state)
