"""Trace-time argument checks shared by every rule.

Every check runs in Python while the function is traced (``n`` and ``f`` are static), and
raises a ``ValueError`` that names the rule and the bound, e.g.
``krum needs n >= 2*f + 3, got n=6, f=2``.
"""

from __future__ import annotations


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
