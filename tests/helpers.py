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


# One mechanism per distinct path through MultiHeadAttention / DecoderLM (KV cache, ring buffer,
# step_exact options, recurrent states, learned feature maps, learned transform parameters, memory
# states, positional): the per-name model-level tests run these in CI and the rest with -m slow
# (every name's transform-level decoding is the conformance suite's, in CI).
MODEL_LEVEL_CI = frozenset({"softmax", "sliding_window", "sigmoid", "linear", "hedgehog", "aaren", "flow",
                            "positional", "titans", "ttt_linear", "deltanet", "s2", "routing"})


def ci_subset(names):
    """``names`` as pytest params, those outside :data:`MODEL_LEVEL_CI` that are transform names
    marked slow."""
    import pytest

    import zoo.attention as za
    return [n if n in MODEL_LEVEL_CI or n not in za.names() else pytest.param(n, marks=pytest.mark.slow)
            for n in names]


def rand(key: int, *shape, dtype=np.float32, scale: float = 1.0):
    return (np.random.default_rng(key).standard_normal(shape) * scale).astype(dtype)


def assert_registered_decodes_as_it_trains(tr, q, k, v, *, prompt: int, what: str = "", **opts) -> None:
    """For a registry entry ``tr``: the causal parallel form equals its reference and
    ``init_state`` + ``prefill(q[:, :prompt])`` + ``step`` for the rest (float32, 1e-5 abs + rel)."""
    import jax.numpy as jnp

    tol = dict(atol=1e-5, rtol=1e-5)
    y = jax.jit(lambda q, k, v: tr(q, k, v, causal=True, **opts))(q, k, v)
    assert float(jnp.abs(y).max()) > 0
    ref = jax.jit(lambda q, k, v: tr.reference(q, k, v, causal=True, **opts))(q, k, v)
    assert_close(ref, y, **tol, what=f"{what} reference {opts}")
    b, t, h, d = q.shape
    st = tr.init_state(b, h, d, v.shape[-1], kv_heads=k.shape[2], max_len=t, **opts)
    y1, st = jax.jit(lambda s, q, k, v: tr.prefill(s, q, k, v, **opts))(st, q[:, :prompt], k[:, :prompt], v[:, :prompt])
    step = jax.jit(lambda s, q, k, v: tr.step(s, q, k, v, **opts))
    ys = [y1]
    for i in range(prompt, t):
        y_t, st = step(st, q[:, i], k[:, i], v[:, i])
        ys.append(y_t[:, None])
    assert_close(jnp.concatenate(ys, axis=1), y, **tol, what=f"{what} prefill + step {opts}")
