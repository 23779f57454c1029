"""zoo: a JAX/Flax model zoo of attention mechanisms."""

__version__ = "0.1.0"
