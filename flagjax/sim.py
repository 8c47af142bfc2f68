r"""The worker simulator: one training step of ``n`` workers, ``f`` of them Byzantine.

:func:`make_train_step` builds ``step(params, opt_state, batch, key)`` for a loss, an optax
transformation whose first stage aggregates stacked worker updates (``flagjax.aggregate``,
chained or inside ``optax.experimental.aggregating.process``), an optional gradient attack and
an optional data attack. The last ``num_byzantine`` workers are Byzantine.

One step:

1. ``data_attack(worker_batch, key_i)`` rewrites the Byzantine workers' batches (one key per
   worker, split from the step key, the same on every backend);
2. every worker takes ``jax.value_and_grad(loss_fn)(params, worker_batch)`` (a ``vmap`` over
   the workers a device holds);
3. on the sharded backends each gradient leaf is flattened, zero-padded to a multiple of the
   device count and exchanged with one ``all_to_all``, so that each device holds *every*
   worker's values for *its* slice of the coordinates, ``[n, s]`` with ``s = ceil(d / P)``;
4. ``attack(honest_rows, f, key)`` replaces the last ``f`` rows (on the shards in the sharded
   backends, with ``axis_name=`` for adaptive attacks); a worker with both a data and a
   gradient attack sends the gradient attack's rows;
5. ``tx.update(stacked, opt_state, params, key=..., [axis_name=, gather=, scatter=],
   [server_update=])`` (the last with ``server_batch``: the server's gradient on it): the
   aggregator runs the rule on the shards (Gram-space rules ``psum`` one ``n x n`` Gram,
   coordinate-wise rules need nothing) and ``gather`` s the aggregate back, replicated;
6. ``optax.apply_updates``.

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

Running across hosts (``"shard_map"``): call ``jax.distributed.initialize()`` on every host
(coordinator address, process count and id from the environment or as arguments) before any
other JAX call; ``jax.devices()`` then lists the devices of all hosts, and
``make_train_step(..., backend="shard_map")`` builds its mesh over all of them. Each host
builds the global batch from the workers it holds, e.g.
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("workers")), local_batch)``
with the mesh ``jax.sharding.Mesh(np.array(jax.devices()), ("workers",))``, and passes the
same replicated ``params``, ``opt_state`` and ``key`` on every host; every host runs the same
``step``. The ``all_to_all``/``psum``/``all_gather`` then cross hosts; nothing else changes.
(``jax.pmap`` across hosts instead takes host-local arrays; prefer ``"shard_map"``.)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from flagjax.core import checks

__all__ = [
    "StepKeys",
    "make_train_step",
    "split_step_key",
]

PyTree = Any

BACKENDS = ("vmap", "pmap", "shard_map")
WORKER_AXIS = "workers"
_NAME = "make_train_step"


class StepKeys(NamedTuple):
  """The per-step keys: data attack (split per worker), gradient attack, aggregation."""
  data: jax.Array
  attack: jax.Array
  aggregate: jax.Array


def split_step_key(key: jax.Array) -> StepKeys:
  """Splits a step's key into the :class:`StepKeys` every backend uses identically."""
  return StepKeys(*jax.random.split(key, 3))


def _static_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{_NAME} needs {name} as a static Python int, got {value!r}")
  return int(value)


def _leaf_size(leaf) -> int:
  return int(np.prod(leaf.shape, dtype=np.int64))


def _shard_size(size: int, num_devices: int) -> int:
  """Coordinates per device: ``ceil(size / num_devices)`` (the leaf is zero-padded)."""
  return -(-size // num_devices)


def _check_batch(batch: PyTree, num_workers: int) -> None:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f"{_NAME} needs a batch with at least one array, got {batch!r}")
  leading = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if leading != {num_workers}:
    raise ValueError(f"{_NAME} needs every batch leaf to have leading axis "
                     f"num_workers={num_workers}, got leading sizes {sorted(leading, key=str)}")


def _worker_losses_and_grads(loss_fn, params, batch):
  """``(losses [w], grads [w, *params])`` of the workers in ``batch`` (leading axis w)."""
  return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)


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


def _metrics(honest_loss, updates, opt_state, num_workers) -> dict:
  """The step's metrics; see :func:`make_train_step`."""
  coefficients = _find_in_state(opt_state, "coefficients")
  if coefficients is None:
    coefficients = jnp.full((num_workers,), jnp.nan, jnp.float32)
  aggregate_norm = _find_in_state(opt_state, "aggregate_norm")
  if aggregate_norm is None:
    aggregate_norm = jnp.asarray(jnp.nan, jnp.float32)
  return {
      "honest_loss": honest_loss,
      "aggregate_norm": jnp.asarray(aggregate_norm, jnp.float32),
      "update_norm": _global_norm(updates),
      "coefficients": coefficients,
  }


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


def _replicating(jitted_step, mesh):
  """``jitted_step`` with params, optimizer state and key first placed replicated on ``mesh``.

  The step returns them replicated on ``mesh``; placing the first call's inputs the same way
  gives every call the same input types, so the step compiles once, not twice.
  """
  replicated = jax.sharding.NamedSharding(mesh, P())

  def step(params, opt_state, batch, key):
    params, opt_state, key = jax.device_put((params, opt_state, key), replicated)
    return jitted_step(params, opt_state, batch, key)
  return step


# ---------------------------------------------------------------------------------------------


def make_train_step(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                    tx: optax.GradientTransformation,
                    *,
                    num_workers: int,
                    num_byzantine: int,
                    attack: Optional[Callable] = None,
                    data_attack: Optional[Callable] = None,
                    backend: str = "vmap",
                    devices: Optional[Sequence[jax.Device]] = None,
                    server_batch: Optional[PyTree] = None):
  r"""Builds one training step of ``num_workers`` workers, the last ``num_byzantine`` of them
  Byzantine, aggregated by ``tx`` (the order of one step is in the module docstring).

  Args:
    loss_fn: ``loss_fn(params, worker_batch) -> scalar loss`` for one worker's batch (a batch
      leaf ``[num_workers, ...]`` without its leading axis). A plain scalar: return auxiliary
      values through a separate evaluation.
    tx: an optax transformation whose first stage aggregates stacked worker updates, e.g.
      ``optax.chain(flagjax.aggregate(rule, ...), optax.sgd(0.1))``. Its ``update`` is called
      with the extra keyword arguments ``key`` (always) and, on the sharded backends,
      ``axis_name``, ``gather`` and ``scatter`` (the protocol of :func:`flagjax.aggregate`);
      a transformation that takes no extra arguments must be wrapped in
      ``optax.with_extra_args_support``. ``opt_state = tx.init(params)`` for every backend.
    num_workers: ``n``, the leading axis of ``batch`` (static).
    num_byzantine: ``f``, the number of Byzantine workers (the last ``f``), ``0 <= f < n``.
    attack: ``attack(honest_rows, f, key, **kw) -> [f, ...]`` rows that replace the Byzantine
      workers' gradients (e.g. ``functools.partial(flagjax.attacks.ipm, eps=0.1)``); called
      with ``axis_name=`` on the sharded backends. None: Byzantine workers send the gradient
      of their (possibly attacked) data.
    data_attack: ``data_attack(worker_batch, key) -> worker_batch`` applied to the Byzantine
      workers' batches before their gradients are taken (ignored when ``attack`` is set: the
      gradient attack's rows are sent).
    backend: ``"vmap"`` (one device), ``"pmap"`` or ``"shard_map"`` (workers spread over
      ``devices``, ``num_workers / len(devices)`` per device, coordinate-sharded aggregation).
    devices: the devices of the sharded backends; default ``jax.devices()`` (all hosts').
      ``num_workers`` must be a multiple of their number.
    server_batch: a batch the server holds (FLTrust's clean root data, one worker's batch
      layout, no leading worker axis), or None. When given, each step computes the server's
      update ``g0 = grad loss_fn(params, server_batch)`` at the incoming params and passes it
      to ``tx.update`` as ``server_update=`` (in params layout on every backend; a
      :func:`flagjax.aggregate` of a rule taking ``server_update`` forwards it, sharded).
      The batch is a constant of the compiled step.

  Returns:
    ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``, jitted (the
    sharded backends first place ``params``, ``opt_state`` and ``key`` replicated on the mesh,
    so the step compiles once); it may itself be called under ``jax.jit`` or ``lax.scan``.
    ``batch`` is a pytree with leading axis ``num_workers``, ``key`` a ``jax.random`` key.
    ``metrics`` holds ``honest_loss`` (the mean loss of the honest workers at the incoming
    params), ``coefficients`` (the aggregator's per-worker coefficients read from the new
    optimizer state, ``[n]``; NaN for rules that are not Gram-space or when no state field
    ``coefficients`` exists), ``aggregate_norm`` (the norm of the aggregate when the
    aggregator state records a field ``aggregate_norm``, else NaN) and ``update_norm`` (the
    global norm of the update applied to the params).

  Raises:
    ValueError: unknown backend; ``num_byzantine`` not in ``[0, num_workers)``;
      ``num_workers`` not a multiple of the device count (sharded backends); a batch whose
      leading axis is not ``num_workers`` (when traced).

  Example:
    >>> import functools, jax, jax.numpy as jnp, optax, flagjax
    >>> tx = optax.chain(flagjax.aggregate(flagjax.aggregators.trimmed_mean, f=2),
    ...                  optax.sgd(0.1))  # doctest: +SKIP
    >>> step = flagjax.sim.make_train_step(
    ...     lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2), tx, num_workers=8,
    ...     num_byzantine=2, attack=flagjax.attacks.sign_flip)  # doctest: +SKIP
    >>> params, opt_state, metrics = step(params, tx.init(params), batch, key)  # doctest: +SKIP
  """
  if backend not in BACKENDS:
    raise ValueError(f"{_NAME} needs backend in {BACKENDS}, got backend={backend!r}")
  n = _static_int("num_workers", num_workers)
  f = _static_int("num_byzantine", num_byzantine)
  checks.require(_NAME, n >= 1, "num_workers >= 1", num_workers=n)
  checks.require(_NAME, f >= 0, "num_byzantine >= 0", num_byzantine=f)
  checks.require(_NAME, f < n, "num_byzantine < num_workers", num_workers=n,
                 num_byzantine=f)
  num_honest = n - f
  use_data_attack = data_attack is not None and attack is None and f > 0
  use_attack = attack is not None and f > 0

  def server_args(params) -> dict:
    """``{"server_update": g0}`` when the server holds a batch, else nothing."""
    if server_batch is None:
      return {}
    return {"server_update": jax.grad(loss_fn)(params, server_batch)}

  if backend == "vmap":
    def vmap_step(params, opt_state, batch, key):
      _check_batch(batch, n)
      keys = split_step_key(key)
      if use_attack:
        # The Byzantine workers' own gradients would be discarded: take only the honest ones.
        losses, grads = _worker_losses_and_grads(loss_fn, params, _take_rows(batch, 0, num_honest))
        byzantine = attack(grads, f, keys.attack)
        stacked = _stack_rows(grads, byzantine)
      else:
        if use_data_attack:
          worker_keys = jax.random.split(keys.data, n)[num_honest:]
          attacked = jax.vmap(data_attack)(_take_rows(batch, num_honest, n), worker_keys)
          batch = _stack_rows(_take_rows(batch, 0, num_honest), attacked)
        losses, stacked = _worker_losses_and_grads(loss_fn, params, batch)
      honest_loss = jnp.mean(losses[:num_honest].astype(jnp.float32))
      updates, opt_state = tx.update(stacked, opt_state, params, key=keys.aggregate,
                                     **server_args(params))
      params = optax.apply_updates(params, updates)
      return params, opt_state, _metrics(honest_loss, updates, opt_state, n)
    return jax.jit(vmap_step)

  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  checks.require(_NAME, n % num_devices == 0,
                 "num_workers to be a multiple of the number of devices",
                 num_workers=n, num_devices=num_devices)
  workers_per_device = n // num_devices

  def device_step(params, opt_state, local_batch, key):
    """One device: its ``workers_per_device`` workers, then its coordinate shard."""
    axis = WORKER_AXIS
    device = jax.lax.axis_index(axis)
    worker_ids = device * workers_per_device + jnp.arange(workers_per_device)
    keys = split_step_key(key)
    if use_data_attack:
      worker_keys = jax.lax.dynamic_slice_in_dim(
          jax.random.split(keys.data, n), device * workers_per_device, workers_per_device)
      attacked = jax.vmap(data_attack)(local_batch, worker_keys)
      local_batch = _select_workers(worker_ids >= num_honest, attacked, local_batch)
    # Replicated params would make grad psum the cotangents over devices; as varying values
    # each device differentiates its own workers' losses only.
    varying_params = jax.lax.pcast(params, axis, to="varying")
    losses, grads = _worker_losses_and_grads(loss_fn, varying_params, local_batch)
    honest = (worker_ids < num_honest).astype(jnp.float32)
    honest_loss = jax.lax.psum(jnp.sum(honest * losses.astype(jnp.float32)), axis) / num_honest

    shards = _to_coordinate_shards(grads, num_devices, axis)  # leaves [n, s]
    if use_attack:
      honest_rows = _take_rows(shards, 0, num_honest)
      byzantine = attack(honest_rows, f, jax.random.fold_in(keys.attack, device),
                         axis_name=axis)
      byzantine = _zero_padding(byzantine, params, num_devices, axis)
      shards = _stack_rows(honest_rows, byzantine)
    updates, opt_state = tx.update(
        shards, opt_state, params, key=keys.aggregate, axis_name=_StaticAxisName(axis),
        gather=_StaticFunction(_make_gather(params, num_devices, axis)),
        scatter=_StaticFunction(_make_scatter(params, num_devices, axis)),
        **server_args(params))
    params = optax.apply_updates(params, updates)
    return params, opt_state, _metrics(honest_loss, updates, opt_state, n)

  if backend == "shard_map":
    mesh = jax.sharding.Mesh(np.array(devices), (WORKER_AXIS,))
    sharded = jax.shard_map(device_step, mesh=mesh,
                            in_specs=(P(), P(), P(WORKER_AXIS), P()),
                            out_specs=(P(), P(), P()))

    def shard_map_step(params, opt_state, batch, key):
      _check_batch(batch, n)
      return sharded(params, opt_state, batch, key)
    return _replicating(jax.jit(shard_map_step), mesh)

  mapped = jax.pmap(device_step, axis_name=WORKER_AXIS, in_axes=(None, None, 0, None),
                    out_axes=None, devices=devices)

  def pmap_step(params, opt_state, batch, key):
    _check_batch(batch, n)
    per_device = jax.tree.map(
        lambda leaf: leaf.reshape((num_devices, workers_per_device) + leaf.shape[1:]), batch)
    return mapped(params, opt_state, per_device, key)
  return _replicating(jax.jit(pmap_step), jax.sharding.Mesh(np.array(devices), (WORKER_AXIS,)))
