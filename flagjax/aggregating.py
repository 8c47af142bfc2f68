r"""The optax side: robust rules as ``optax.experimental.aggregating.Aggregator`` s.

:func:`aggregate` wraps any rule of :mod:`flagjax.aggregators` into optax's type for
"per-worker updates in, one update out", so it composes like any optax transformation::

    tx = optax.chain(flagjax.aggregate(flagjax.aggregators.flag, rank=8), optax.sgd(0.1))
    tx = aggregating.process(flagjax.preaggregate(flagjax.preaggregators.nnm, f=2),
                             flagjax.aggregate(flagjax.aggregators.krum, f=2),
                             optax.adam(1e-3))

Per-worker transforms (stacked ``[n, ...]`` in, stacked ``[n', ...]`` out) go in front of the
aggregator, in ``optax.chain`` or in the ``pre`` slot of ``aggregating.process``:
:func:`preaggregate` (any pre-aggregator of :mod:`flagjax.preaggregators`, or
:func:`flagjax.attacks.lossy`) and :func:`worker_momentum`.

Stateful aggregation keeps its state in the optax state (:class:`AggregateState`), never in a
Python object: centered clipping around the previous aggregate, and worker momentum
(``aggregate(rule, worker_momentum=beta, num_workers=n)``).

Calling convention of every ``update`` here (shared with :mod:`flagjax.sim`):
``update(updates, state, params=None, *, axis_name=None, gather=None, scatter=None, key=None)``.

* ``axis_name=None``: each leaf of ``updates`` is ``[n, *leaf_shape]``; the aggregate is
  shaped like ``params``.
* ``axis_name`` set (inside ``shard_map``/``pmap``): each leaf is ``[n, s]``, this device's
  coordinate shard of the flattened, zero-padded leaf. The rule runs on the shards
  (Gram-space rules ``psum`` one ``n x n`` Gram) and ``gather(tree of [..., s]) -> params
  layout`` returns the full aggregate, replicated. State is kept in the natural (params)
  layout; ``scatter(params layout) -> tree of [..., s]`` takes this device's slice.
* ``key``: a ``jax.random`` key for transforms that need one (bucketing, lossy links); it
  must be the same on every device.
* ``declared_byzantine``: the ``f`` told to a rule or pre-aggregator built without one (a
  static int; :func:`flagjax.sim.make_train_step` passes its ``declared_byzantine`` when
  given). An ``f`` given when building must agree with it (else ``ValueError``).
* ``params``: when given, each update leaf is checked against its parameter (``[n,
  *param_shape]``, or ``[n, s]`` shards), with a ``ValueError`` naming both shapes.

Unknown extra keyword arguments are ignored (so the sim's extras pass through ``optax.chain``).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from flagjax.aggregators.mean import mean as _mean_rule
from flagjax.core import checks
from flagjax.core import gram as gram_lib
from flagjax.core import tree as tree_lib

__all__ = [
    "AggregateState",
    "WorkerMomentumState",
    "aggregate",
    "check_hyperparameters",
    "coefficients_function",
    "preaggregate",
    "row_coefficients_function",
    "worker_momentum",
]

PyTree = tree_lib.PyTree


class AggregateState(NamedTuple):
  """State of :func:`aggregate`.

  Attributes:
    coefficients: ``[n]`` float32 per-worker coefficients of the last aggregate
      (``aggregate = sum_i c_i x_i`` over the rows the rule received; zeros after ``init``)
      when the rule is Gram-space and ``num_workers=n`` was given. Otherwise ``[0]``, always:
      the state's shapes are fixed by ``init`` (one compilation, ``lax.scan``-able) and hold
      no NaN placeholders (a multi-host ``device_put`` checks that every process passes the
      same state, and NaN != NaN).
    aggregate_norm: ``[]`` float32 norm of the last aggregate (0 before the first update).
    previous_aggregate: for a rule with a ``center`` argument (centered clipping) not given
      one: the last aggregate, shaped like params (zeros at ``init``), the next centre.
      None otherwise.
    worker_momentum: with ``worker_momentum=beta``: the workers' momenta ``[n, *params]``
      (natural layout, also when sharded). None otherwise.
  """
  coefficients: jax.Array
  aggregate_norm: jax.Array
  previous_aggregate: Optional[PyTree] = None
  worker_momentum: Optional[PyTree] = None


class WorkerMomentumState(NamedTuple):
  """State of :func:`worker_momentum`: the momenta ``[n, *params]`` (natural layout)."""
  momentum: PyTree


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _name(fn: Callable) -> str:
  return getattr(fn, "__name__", None) or type(fn).__name__


def _parameters(fn: Callable) -> dict:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


def _takes(fn: Callable, name: str) -> bool:
  parameter = _parameters(fn).get(name)
  return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                      parameter.KEYWORD_ONLY)


def check_hyperparameters(name: str, fn: Callable, hparams: dict,
                          reserved: tuple = ("axis_name",)) -> None:
  """Refuses, when the transform is built, a hyperparameter ``fn`` does not take.

  ``aggregate(krum, ff=1)`` or ``aggregate(flag, f=1)`` would otherwise build without a word
  and fail (or, for a rule taking ``**kwargs``, be ignored) only at the first update. A given
  ``f`` is checked for its domain at once too.
  """
  parameters = _parameters(fn)
  if not parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
    return
  accepted = {k for k, p in parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  accepted -= {next(iter(parameters))}  # the stacked updates themselves
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    options = sorted(accepted - set(reserved))
    raise ValueError(f"{name} got unknown hyperparameter(s) {', '.join(unknown)}; "
                     f"{_name(fn)} takes {', '.join(options) if options else 'none'}")
  if "f" in hparams:
    checks.check_num_byzantine(_name(fn), hparams["f"])


def _check_sharding(name: str, axis_name, gather, scatter, need_scatter: bool) -> None:
  if axis_name is None:
    return
  if gather is None or (need_scatter and scatter is None):
    raise ValueError(f"{name} needs gather= and scatter= with axis_name= (coordinate shards "
                     f"in, the aggregate in params layout out); see flagjax.aggregate")


def _zeros_per_worker(params: PyTree, num_workers: int) -> PyTree:
  return jax.tree.map(lambda p: jnp.zeros((num_workers,) + jnp.shape(p), jnp.result_type(p)),
                      params)


def _check_num_workers(name: str, option: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} needs {option} as a static Python int >= 1, got {value!r}")
  return value


def _check_beta(name: str, option: str, beta) -> float:
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"{name} needs 0 <= {option} < 1, got {option}={beta}")
  return beta


def _momentum_step(momentum: PyTree, updates: PyTree, beta: float, *, axis_name, gather,
                   scatter) -> tuple[PyTree, PyTree]:
  r"""``m_i <- beta m_i + (1 - beta) g_i`` for every row; ``(rows to use, new momentum)``.

  ``momentum`` is in natural layout ``[n, *params]``; with ``axis_name`` the rows are shards
  ``[n, s]``, so the momentum's shard is taken with ``scatter`` and the new momentum gathered
  back. The arithmetic runs in the momentum's dtype (the params').
  """
  previous = momentum if axis_name is None else scatter(momentum)
  rows = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g.astype(m.dtype),
                      previous, updates)
  new_momentum = rows if axis_name is None else gather(rows)
  return rows, new_momentum


# ---------------------------------------------------------------------------------------------
# Coefficients: the Gram-space path (K once, coefficients, one combination).


def coefficients_function(rule: Callable) -> Optional[Callable]:
  """The ``<rule>_coefficients(K, ...)`` function of a Gram-space rule, or None.

  Found by name in the rule's module (the convention of :mod:`flagjax.aggregators`), so a
  user's rule gets coefficient reporting by following it.
  """
  return _companion(rule, "coefficients")


def row_coefficients_function(rule: Callable) -> Optional[Callable]:
  """The ``<rule>_row_coefficients(x, ..., axis_name=None)`` function of a rule, or None.

  A rule whose coefficients need less than the whole Gram (MoNNA: the distances to one row;
  one step of centered clipping: the distances to the centre) computes them from the rows in
  one pass; found by name like :func:`coefficients_function`, and preferred to it.
  """
  return _companion(rule, "row_coefficients")


def _companion(rule: Callable, suffix: str) -> Optional[Callable]:
  """The callable ``<rule name>_<suffix>`` in the rule's module, or None."""
  name = getattr(rule, "__name__", None)
  module = sys.modules.get(getattr(rule, "__module__", None) or "")
  if name is None or module is None:
    return None
  candidate = getattr(module, f"{name}_{suffix}", None)
  return candidate if callable(candidate) else None


def _binds(fn: Callable, *args, **kwargs) -> bool:
  try:
    inspect.signature(fn).bind(*args, **kwargs)
  except (TypeError, ValueError):
    return False
  return True


def _told_f(name: str, hparams: dict, takes_f: bool, extra_args: dict) -> dict:
  """``{"f": declared}`` for a rule built without ``f`` (``takes_f``), else ``{}``.

  ``declared`` is the update call's ``declared_byzantine=``; it is refused when missing for
  such a rule, and when it contradicts the ``f`` the rule was built with.
  """
  declared = extra_args.get("declared_byzantine")
  if declared is not None and "f" in hparams and int(declared) != hparams["f"]:
    raise ValueError(f"{name} was built with f={hparams['f']} but declared_byzantine="
                     f"{int(declared)} was passed; build it without f to take the declared "
                     f"count")
  if not takes_f:
    return {}
  if declared is None:
    raise ValueError(f"{name} needs f: give it when building (f=...) or pass "
                     f"declared_byzantine= to update (flagjax.sim.make_train_step does)")
  return {"f": int(declared)}


def _reports_coefficients(rule: Callable, hparams: dict, *, takes_f: bool,
                          wants_server: bool) -> bool:
  """Whether :func:`_apply_rule` will take the Gram path (and so report coefficients).

  Decided when the aggregator is built, from the same binding test with the arguments that
  only arrive at update time (``f``, ``key``, ``server_update``) stood in for.
  """
  if rule is _mean_rule:
    return True
  kwargs = {k: v for k, v in hparams.items() if k != "center"}
  if takes_f:
    kwargs["f"] = 0
  if wants_server:
    kwargs["server_update"] = None
  if _takes(rule, "key") and "key" not in kwargs:
    kwargs["key"] = None
  row_fn = row_coefficients_function(rule)
  if row_fn is not None and _binds(row_fn, None, axis_name=None, **kwargs):
    return True
  coefficients_fn = coefficients_function(rule)
  return coefficients_fn is not None and _binds(coefficients_fn, None, **kwargs)


def _shape_of(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _apply_rule(rule: Callable, rows: PyTree, hparams: dict, *, axis_name, key,
                has_center: bool, center) -> tuple[PyTree, jax.Array]:
  """``(aggregate (or its shard), coefficients [n] float32)`` of ``rule`` on ``rows``.

  Rules with a row-coefficients function (:func:`row_coefficients_function`) compute
  ``c = <rule>_row_coefficients(rows, **hparams)`` and ``sum_i c_i x_i``. Gram-space rules
  with a coefficients function run as ``K`` once (``psum``-ed over ``axis_name``),
  ``c = coefficients(K, **hparams)``, ``sum_i c_i x_i``. Either way it is the same work as
  the rule, with ``c`` kept for reporting. Any other rule is called as is (coefficients NaN).
  """
  n = tree_lib.num_workers(_name(rule), rows)
  kwargs = dict(hparams)
  if key is not None and _takes(rule, "key") and "key" not in kwargs:
    kwargs["key"] = key
  if has_center:
    kwargs["center"] = center

  if rule is _mean_rule:
    coefficients = jnp.full((n,), 1.0 / n, jnp.float32)
    return gram_lib.combine(coefficients, rows), coefficients

  row_fn = row_coefficients_function(rule)
  if row_fn is not None and _binds(row_fn, None, axis_name=axis_name, **kwargs):
    coefficients = row_fn(rows, axis_name=axis_name, **kwargs)
    if has_center and center is not None:
      aggregate = gram_lib.combine(coefficients, rows, extra=center)
    else:
      aggregate = gram_lib.combine(coefficients[:n], rows)
    return aggregate, coefficients[:n].astype(jnp.float32)

  coefficients_fn = coefficients_function(rule)
  coefficient_kwargs = {k: v for k, v in kwargs.items() if k != "center"}
  if coefficients_fn is None or not _binds(coefficients_fn, None, **coefficient_kwargs):
    aggregate = rule(rows, **kwargs) if axis_name is None else rule(
        rows, axis_name=axis_name, **kwargs)
    return aggregate, jnp.full((n,), jnp.nan, jnp.float32)

  # The rule's own trace-time checks (bounds on n and f, hyperparameters): shapes only.
  jax.eval_shape(lambda r, c: rule(r, **{**kwargs, **({"center": c} if has_center else {})}),
                 _shape_of(rows), _shape_of(center) if has_center else None)
  centered = gram_lib.wants_centered(coefficients_fn)
  if not has_center:
    K = gram_lib.gram(rows, axis_name=axis_name, centered=centered)
    solve = functools.partial(coefficients_fn, **coefficient_kwargs)
    if gram_lib.wants_solve_once(coefficients_fn):
      coefficients = gram_lib.solve_once(solve, K, axis_name=axis_name)
    else:
      coefficients = solve(K)
    return gram_lib.combine(coefficients, rows), coefficients.astype(jnp.float32)
  # A rule with a centre (centered clipping): the centre is row n of K; its coefficient is
  # the last one. Without a centre, the origin is that row (no pass over zeros).
  if center is None:
    K = gram_lib.gram(rows, axis_name=axis_name, centered=centered, origin=True)
    coefficients = coefficients_fn(K, **coefficient_kwargs)
    aggregate = gram_lib.combine(coefficients[:n], rows)
  else:
    K = gram_lib.gram(rows, axis_name=axis_name, extra=center, centered=centered)
    coefficients = coefficients_fn(K, **coefficient_kwargs)
    aggregate = gram_lib.combine(coefficients, rows, extra=center)
  return aggregate, coefficients[:n].astype(jnp.float32)


def _global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(tree_lib.to_compute(leaf).astype(jnp.float32)))
                      for leaf in jax.tree.leaves(tree)))


_PREVIOUS = object()  # sentinel: "centre = the previous aggregate, kept in the state"


# ---------------------------------------------------------------------------------------------
# Public transforms.


def aggregate(rule: Callable, *, worker_momentum: Optional[float] = None,
              num_workers: Optional[int] = None, **hparams) -> aggregating.Aggregator:
  r"""A robust rule as an optax ``Aggregator``: stacked worker updates in, one update out.

  ``update(updates, state, params=None, *, axis_name=None, gather=None, scatter=None,
  key=None)`` follows the module's calling convention: ``updates`` holds ``n`` rows (leaves
  ``[n, *leaf_shape]``, or coordinate shards ``[n, s]`` with ``axis_name``), the result is
  ``rule(updates, **hparams)`` shaped like params (gathered and replicated when sharded).

  * Gram-space rules (those with a ``<rule>_coefficients(K, ...)`` function, and ``mean``)
    built with ``num_workers=n`` form ``K`` once and report their per-worker coefficients in
    ``AggregateState.coefficients`` at no extra cost; other rules, and any rule built without
    ``num_workers``, keep the ``[0]`` placeholder (see :class:`AggregateState`).
  * A rule with a ``center`` argument (centered clipping) not given one in ``hparams`` is
    stateful: the centre is the previous aggregate, kept in
    ``AggregateState.previous_aggregate`` (zeros at ``init``),

    .. math:: v_t = \mathrm{CC}(x^{(t)}; \text{center} = v_{t-1}), \qquad v_{-1} = 0.

  * ``worker_momentum=beta``: each row's momentum
    :math:`m_i \leftarrow \beta m_i + (1 - \beta) g_i` (zeros at ``init``, no bias
    correction) is kept in ``AggregateState.worker_momentum`` ``[n, *params]`` and the rule
    aggregates the momenta instead of the raw rows. Needs ``num_workers``. When sharded, the
    momenta stay in natural layout (replicated: ``n x d`` per device, gathered every step).
    A row that is ever non-finite keeps a non-finite momentum (that worker stays Byzantine).
    The momentum acts on the rows this aggregator receives: to take it *before* a
    pre-aggregator (e.g. bucketing, as Karimireddy et al. 2022 do), put
    :func:`worker_momentum` in front of :func:`preaggregate` instead.

  * A rule with a ``server_update`` argument (FLTrust) not given one in ``hparams`` takes
    the ``server_update=`` passed to ``update`` (in params layout; its shard is taken with
    ``scatter`` when sharded). :func:`flagjax.sim.make_train_step` passes it when built
    with ``server_batch=``.

  * A rule taking ``f`` built without it gets ``f`` from the update's ``declared_byzantine=``
    (what :func:`flagjax.sim.make_train_step` passes: the defender's declared count).

  Hyperparameters the rule does not take are refused here, when building; bounds are checked
  when ``update`` is traced, with the rule's own ``ValueError``. The state's shapes are fixed
  by ``init`` (see :class:`AggregateState`).

  Args:
    rule: any rule ``rule(x, **hparams, axis_name=None)`` of :mod:`flagjax.aggregators` (or
      one following its conventions).
    worker_momentum: ``beta`` in ``[0, 1)``, or None for no worker momentum.
    num_workers: ``n``, the number of rows the aggregator receives (static). Needed with
      ``worker_momentum``; otherwise optional, and when given the state has its final shape
      from ``init`` (what ``lax.scan`` over steps needs) and ``n`` is checked at ``update``.
    **hparams: the rule's hyperparameters (e.g. ``f=2``, ``rank=8``).

  Returns:
    An ``optax.experimental.aggregating.Aggregator`` with :class:`AggregateState`.

  Example:
    >>> import jax.numpy as jnp, optax, flagjax
    >>> krum = flagjax.aggregate(flagjax.aggregators.krum, f=1, num_workers=5)
    >>> tx = optax.chain(krum, optax.sgd(1.0))
    >>> params = jnp.zeros(2)
    >>> grads = jnp.array([[1.0, 1.0], [1.1, 1.0], [0.9, 1.1], [1.0, 1.05], [99.0, 99.0]])
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(updates, state[0].coefficients)
    [-1. -1.] [1. 0. 0. 0. 0.]

  References:
    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021 (centered clipping around the last aggregate; worker momentum).
  """
  rule_name = _name(rule)
  name = f"aggregate({rule_name})"
  if worker_momentum is not None:
    _check_beta(name, "worker_momentum", worker_momentum)
    if num_workers is None:
      raise ValueError(f"{name} needs num_workers=n with worker_momentum (the state holds one "
                       f"momentum per worker)")
  if num_workers is not None:
    num_workers = _check_num_workers(name, "num_workers", num_workers)
  hparams = dict(hparams)
  for reserved in ("axis_name", "gather", "scatter"):
    if reserved in hparams:
      raise ValueError(f"{name} gets {reserved} at update time, not as a hyperparameter")
  check_hyperparameters(name, rule, hparams)
  has_center = _takes(rule, "center")
  fixed_center = hparams.pop("center", _PREVIOUS) if has_center else _PREVIOUS
  keeps_center = has_center and fixed_center is _PREVIOUS
  # A rule that takes the server's update (FLTrust) gets it at update time, unless fixed here.
  wants_server = _takes(rule, "server_update") and "server_update" not in hparams

  # A rule built without f (and taking one) is told f at update time: declared_byzantine=.
  takes_f = _takes(rule, "f") and "f" not in hparams
  records = num_workers is not None and _reports_coefficients(
      rule, hparams, takes_f=takes_f, wants_server=wants_server)

  def init_fn(params):
    return AggregateState(
        coefficients=jnp.zeros((num_workers if records else 0,), jnp.float32),
        aggregate_norm=jnp.zeros((), jnp.float32),
        previous_aggregate=(jax.tree.map(jnp.zeros_like, params) if keeps_center else None),
        worker_momentum=(_zeros_per_worker(params, num_workers)
                         if worker_momentum is not None else None))

  def update_fn(updates, state, params=None, *, axis_name=None, gather=None, scatter=None,
                key=None, **extra_args):
    sharded = axis_name is not None
    _check_sharding(name, axis_name, gather, scatter,
                    need_scatter=worker_momentum is not None or has_center or wants_server)
    n = tree_lib.num_workers(rule_name, updates)
    if num_workers is not None and n != num_workers:
      raise ValueError(f"{name} was built with num_workers={num_workers}, got n={n} rows")
    if params is not None:
      tree_lib.check_rows_match_params(name, updates, params, sharded=sharded)
    rows, new_momentum = updates, None
    if worker_momentum is not None:
      rows, new_momentum = _momentum_step(state.worker_momentum, updates, worker_momentum,
                                          axis_name=axis_name, gather=gather, scatter=scatter)
    center = None
    if keeps_center:
      center = state.previous_aggregate
    elif has_center:
      center = fixed_center
    if center is not None and sharded:
      center = scatter(center)
    rule_hparams = {**hparams, **_told_f(name, hparams, takes_f, extra_args)}
    if wants_server:
      server_update = extra_args.get("server_update")
      if server_update is None:
        raise ValueError(f"{name} needs server_update= at update time (the server's own "
                         f"update, e.g. flagjax.sim.make_train_step(..., server_batch=...))")
      rule_hparams["server_update"] = scatter(server_update) if sharded else server_update
    result, coefficients = _apply_rule(rule, rows, rule_hparams, axis_name=axis_name, key=key,
                                       has_center=has_center, center=center)
    full = gather(result) if sharded else result
    new_state = AggregateState(
        coefficients=coefficients if records else state.coefficients,
        aggregate_norm=_global_norm(full),
        previous_aggregate=(jax.tree.map(lambda old, new: new.astype(old.dtype),
                                         state.previous_aggregate, full)
                            if keeps_center else None),
        worker_momentum=new_momentum)
    return full, new_state

  return aggregating.Aggregator(init_fn, update_fn)


def preaggregate(preaggregator: Callable, **hparams) -> optax.GradientTransformationExtraArgs:
  r"""A pre-aggregator as a per-worker transform: stacked ``[n, ...]`` in, ``[n', ...]`` out.

  For the ``pre`` slot of ``optax.experimental.aggregating.process`` or in front of
  :func:`aggregate` in ``optax.chain``. Calls
  ``preaggregator(updates, **hparams, axis_name=axis_name)`` (``axis_name`` only when set);
  a pre-aggregator with a ``key`` argument (bucketing, :func:`flagjax.attacks.lossy`) gets the
  ``key`` passed to ``update``, which must then be given (the same on every device, so the
  shards agree). Stateless (``optax.EmptyState``).

  Args:
    preaggregator: e.g. ``flagjax.preaggregators.nnm`` / ``bucketing`` / ``clip`` / ``arc``.
    **hparams: its hyperparameters (``f=2``, ``s=2``, ``c=1.0``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax, flagjax
    >>> from optax.experimental import aggregating
    >>> tx = aggregating.process(
    ...     flagjax.preaggregate(flagjax.preaggregators.nnm, f=1),
    ...     flagjax.aggregate(flagjax.aggregators.trimmed_mean, f=1), optax.adam(1e-3))
  """
  name = f"preaggregate({_name(preaggregator)})"
  check_hyperparameters(name, preaggregator, hparams)
  needs_key = _takes(preaggregator, "key") and "key" not in hparams
  takes_f = _takes(preaggregator, "f") and "f" not in hparams

  def update_fn(updates, state, params=None, *, axis_name=None, key=None, **extra_args):
    del params
    kwargs = {**hparams, **_told_f(name, hparams, takes_f, extra_args)}
    if needs_key:
      if key is None:
        raise ValueError(f"{name} needs a jax.random key: pass key= to update")
      kwargs["key"] = key
    if axis_name is not None:
      kwargs["axis_name"] = axis_name
    return preaggregator(updates, **kwargs), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def worker_momentum(beta: float = 0.9, *,
                    num_workers: int) -> optax.GradientTransformationExtraArgs:
  r"""Per-worker momentum as a per-worker transform: row ``i`` becomes its momentum

  .. math:: m_i \leftarrow \beta m_i + (1 - \beta) g_i, \qquad m_i = 0 \text{ at init}

  (Karimireddy et al. 2021: aggregating the workers' momenta instead of their raw gradients
  averages out the noise that lets Byzantine rows hide). Same arithmetic as
  ``aggregate(rule, worker_momentum=beta, num_workers=n)``; as its own transform it can go
  before a pre-aggregator, e.g. ``chain(worker_momentum(0.9, num_workers=n),
  preaggregate(bucketing, s=2))`` in the ``pre`` slot. Sharded (``axis_name`` with
  ``gather``/``scatter``): the momenta are kept in natural layout ``[n, *params]``.

  Args:
    beta: momentum in ``[0, 1)``.
    num_workers: ``n``, rows per update (static).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`WorkerMomentumState`.

  References:
    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021.
  """
  _check_beta("worker_momentum", "beta", beta)
  num_workers = _check_num_workers("worker_momentum", "num_workers", num_workers)

  def init_fn(params):
    return WorkerMomentumState(_zeros_per_worker(params, num_workers))

  def update_fn(updates, state, params=None, *, axis_name=None, gather=None, scatter=None,
                **extra_args):
    del params, extra_args
    _check_sharding("worker_momentum", axis_name, gather, scatter, need_scatter=True)
    n = tree_lib.num_workers("worker_momentum", updates)
    if n != num_workers:
      raise ValueError(f"worker_momentum was built with num_workers={num_workers}, "
                       f"got n={n} rows")
    rows, momentum = _momentum_step(state.momentum, updates, beta, axis_name=axis_name,
                                    gather=gather, scatter=scatter)
    return rows, WorkerMomentumState(momentum)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
