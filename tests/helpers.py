"""Helpers shared by the tests: fixture loading and closeness assertions."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


def fixture(name: str) -> dict[str, np.ndarray]:
    """Loads ``../shared/fixtures/NAME.npz`` or skips the test with the reason."""
    path = FIXTURES / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"fixture {path} not found: ../shared/fixtures is absent on this machine")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def f32(*xs):
    out = tuple(np.asarray(x, np.float32) for x in xs)
    return out if len(out) > 1 else out[0]


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a useful message."""
    a = np.asarray(jax.device_get(actual), np.float64)
    e = np.asarray(jax.device_get(expected), np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: max abs err {err.max():.3g} (at {worst}: {a[worst]:.6g} vs {e[worst]:.6g}), "
        f"atol={atol}, rtol={rtol}"
    )


def tree_assert_close(actual, expected, *, atol: float, rtol: float = 0.0, what: str = "") -> None:
    la, ta = jax.tree_util.tree_flatten(actual)
    le, te = jax.tree_util.tree_flatten(expected)
    assert ta == te, f"{what}: tree structures differ: {ta} vs {te}"
    for i, (a, e) in enumerate(zip(la, le)):
        assert_close(a, e, atol=atol, rtol=rtol, what=f"{what}[{i}]")


def rand(key: int, *shape, dtype=np.float32, scale: float = 1.0):
    return (np.random.default_rng(key).standard_normal(shape) * scale).astype(dtype)
