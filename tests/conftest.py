"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The tests' shapes are tiny, so their time is mostly XLA:CPU compilation: skip the backend's
# optimisation passes (about 17% faster on the suite's heavy files, the same numbers within the
# stated tolerances). Benchmarks and user runs never go through this file.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
