"""The documentation's code runs and says what it prints: every docstring example in flagjax
(doctest) and the README's usage example, with the claim beside it."""

import contextlib
import doctest
import importlib
import io
import os
import pkgutil
import re

import flagjax

MODULES = sorted(module.name for module in pkgutil.walk_packages(flagjax.__path__, "flagjax."))
README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def test_every_module_is_found():
  # The walk reaches the subpackages (a vacuous list would pass the doctest test below).
  for name in ("flagjax.aggregating", "flagjax.sim", "flagjax.aggregators.flag",
               "flagjax.attacks.gradient", "flagjax.core.gram"):
    assert name in MODULES


def test_docstring_examples():
  examples, failures = 0, []
  for name in MODULES:
    module = importlib.import_module(name)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
      result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    examples += result.attempted
    if result.failed:
      failures.append(f"{name}:\n{output.getvalue()}")
  assert not failures, "\n".join(failures)
  assert examples >= 10  # aggregate, preaggregate and make_train_step's examples at least


def _readme_usage_example() -> str:
  with open(README, encoding="utf-8") as stream:
    text = stream.read()
  usage = text[text.index("## Use"):]
  return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def _run(code: str) -> str:
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    exec(compile(code, README, "exec"), {})  # noqa: S102 - the README's own code
  return output.getvalue()


def test_readme_usage_example_and_its_claim():
  # "print(jnp.linalg.norm(params - true_w))  # < 1e-4; aggregators.mean diverges"
  code = _readme_usage_example()
  assert "flagjax.aggregators.flag" in code and "# < 1e-4; aggregators.mean diverges" in code
  assert float(_run(code)) < 1e-4
  diverged = float(_run(code.replace("flagjax.aggregators.flag", "flagjax.aggregators.mean")))
  assert not diverged < 1e3  # large, or inf/NaN

