"""Trace-time argument checks shared by every rule.

Every check runs in Python while the function is traced (``n`` and ``f`` are static), and
raises a ``ValueError`` that names the rule and the bound, e.g.
``krum needs n >= 2*f + 3, got n=6, f=2``.
"""

from __future__ import annotations

import functools

import jax

__all__ = [
    "NotDifferentiableError",
    "check_int",
    "check_key",
    "check_num_byzantine",
    "check_real",
    "refuse_derivative",
    "require",
]


def check_num_byzantine(rule: str, f) -> int:
  """Checks that ``f`` is a static non-negative Python int and returns it."""
  if isinstance(f, bool) or not isinstance(f, int):
    try:
      import operator
      f = operator.index(f)
    except TypeError:
      raise ValueError(
          f"{rule} needs f (the number of Byzantine workers) as a static Python int, "
          f"got {f!r}") from None
  if f < 0:
    raise ValueError(f"{rule} needs f >= 0, got f={f}")
  return f


def require(rule: str, condition: bool, bound: str, **values) -> None:
  """Raises ``ValueError("{rule} needs {bound}, got k=v, ...")`` unless ``condition``."""
  if not condition:
    got = ", ".join(f"{k}={v}" for k, v in values.items())
    raise ValueError(f"{rule} needs {bound}, got {got}")


def _concrete_scalar(value):
  """``value`` as a Python float if it is known at trace time, else None (a tracer)."""
  import jax
  import numpy as np
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if array.ndim != 0 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f"expected a real scalar, got {value!r}")
  if np.iscomplexobj(array):
    raise ValueError(f"expected a real scalar, got {value!r}")
  return float(array)


def check_real(rule: str, name: str, value, *, minimum=None, maximum=None,
               open_minimum: bool = False, open_maximum: bool = False) -> None:
  """Checks a real hyperparameter against its bounds when its value is known at trace time.

  Python numbers, numpy scalars and concrete (non-traced) 0-d arrays are checked; a traced
  value (a hyperparameter swept under ``vmap``) cannot be, and is left to the rule. Raises
  ``ValueError("{rule} needs {bound}, got name=value")``.
  """
  try:
    number = _concrete_scalar(value)
  except ValueError:
    raise ValueError(f"{rule} needs {name} as a real scalar, got {name}={value!r}") from None
  if number is None:
    return
  if number != number:  # NaN
    raise ValueError(f"{rule} needs {name} to be a number, got {name}=nan")
  if minimum is not None:
    ok = number > minimum if open_minimum else number >= minimum
    require(rule, ok, f"{name} {'>' if open_minimum else '>='} {minimum}", **{name: value})
  if maximum is not None:
    ok = number < maximum if open_maximum else number <= maximum
    require(rule, ok, f"{name} {'<' if open_maximum else '<='} {maximum}", **{name: value})


def check_int(rule: str, name: str, value, *, minimum: int = 0, static: bool = True):
  """Checks an integer hyperparameter (``>= minimum``); returns it as a Python int.

  With ``static=False`` a traced integer is accepted unchecked (e.g. ``max_iters`` of a
  ``while_loop``). Floats are refused even when whole (``2.0``): a count is an int.
  """
  import jax
  import numpy as np
  if not static and isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) or (
      hasattr(value, "dtype") and np.ndim(value) == 0
      and np.issubdtype(np.asarray(value).dtype, np.integer))):
    kind = "a static Python int" if static else "an int"
    raise ValueError(f"{rule} needs {name} as {kind}, got {name}={value!r}")
  value = int(value)
  require(rule, value >= minimum, f"{name} >= {minimum}", **{name: value})
  return value


def check_key(rule: str, key) -> None:
  """Checks that ``key`` is a ``jax.random`` key: a typed key array (``jax.random.key``) or a
  legacy ``uint32[2]`` one (``jax.random.PRNGKey``)."""
  import jax
  import jax.numpy as jnp
  if key is None:
    raise ValueError(f"{rule} needs a jax.random key (key=jax.random.key(seed)), got None")
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return
  if dtype == jnp.uint32 and jnp.shape(key)[-1:] == (2,):
    return
  raise ValueError(f"{rule} needs a jax.random key (jax.random.key(seed) or PRNGKey), got "
                   f"{type(key).__name__} of dtype {dtype} and shape {jnp.shape(key)}")


class NotDifferentiableError(ValueError):
  """A derivative was asked of a rule that does not define one (:func:`refuse_derivative`)."""


def refuse_derivative(rule: str, reason: str, value):
  """``value`` unchanged; a derivative through it (``jax.grad``, ``jax.jvp``) raises
  :class:`NotDifferentiableError` naming ``rule`` and ``reason`` when traced, instead of the
  NaN or meaningless numbers the rule's internals would give. A tangent that is
  identically zero (``jax.lax.stop_gradient``, or differentiating with respect to
  something the value does not depend on) passes: JAX skips the rule then."""
  return _refused(rule, reason, value)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _refused(rule, reason, value):
  return value


@_refused.defjvp
def _refused_jvp(rule, reason, primals, tangents):
  raise NotDifferentiableError(
      f"{rule} is not differentiable: {reason}. Wrap its input in jax.lax.stop_gradient to "
      f"treat it as data.")
