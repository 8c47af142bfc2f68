"""Test set-up: 8 simulated CPU devices, before any JAX operation runs."""

import os

# Belt and braces for older jaxlibs; the config option below is the jax 0.10 way.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import hypothesis  # noqa: E402

# Every new shape is a new XLA compilation: keep property tests to a modest number of cases.
hypothesis.settings.register_profile(
    "flagjax", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large])
hypothesis.settings.load_profile("flagjax")
