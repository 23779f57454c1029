"""The conformance suite: every registered mechanism x each of its CPU implementations
(interpret-mode kernels: forward and gradients here, the rest in tests/kernels/).

Everything here is derived from the registry record (``zoo.attention.get(name)``): a new
mechanism gets all of it by registering. Checked per case, in float32 unless stated:

- every form equals ``Transform.reference``: outputs (causal, and non-causal unless causal-only,
  with grouped-query k/v where supported) and gradients w.r.t. q, k, v and every floating array
  option of ``example_options`` (gates, sinks, learnable feature maps);
- decoding: ``init_state`` + ``prefill`` (a prompt ending mid-chunk) + ``step`` equals the causal
  parallel form, and the state after prefill(all) equals the state after stepping every token;
- causality: changing token t changes no output before t;
- bf16 inputs give bf16 outputs, finite and close to the float32 reference;
- jit / vmap / grad through ``jax.checkpoint`` give the same numbers;
- bad inputs raise ValueError naming the argument (integer q, rank-5 q, length 0, an unknown
  option, ``causal=False`` for a causal-only mechanism), NumPy integer options are accepted.

Tolerances (float32): outputs and states ``atol=2e-5, rtol=2e-4``; gradients ``atol=1e-4,
rtol=1e-3`` (sums over the sequence); bf16 vs float32 reference ``atol=rtol=6e-2``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import MODEL_LEVEL_CI, assert_close, rand, tree_assert_close

B, T, H, D, E = 2, 7, 2, 4, 5  # E != D catches value/key dim mix-ups; T = 7 is ragged for chunks of 3
PROMPT = 4  # prefill length (mid-chunk for chunk_size 3)
OUT = dict(atol=2e-5, rtol=2e-4)
GRAD = dict(atol=1e-4, rtol=1e-3)


def _cases() -> list:
    cases = []
    for name in za.names():
        t = za.get(name)
        impls = [None]
        if t.impl_family:
            impls = [n for n, i in za.implementations(t.impl_family).items() if "cpu" in i.platforms or i.interpret]
        cases += [pytest.param(name, impl, id=name if impl is None else f"{name}-{impl}") for impl in impls]
    return cases


CASES = _cases()
# Interpret-mode kernels (impls that run on CPU only through the Pallas interpreter) take only the
# forward and gradient checks here: the interpreter is slow, and tests/kernels/ has each kernel's
# own suite (dtypes, meshes, lowering for the hardware).
XLA_CASES = [c for c in CASES if not (c.values[1] is not None
                                      and za.implementations(za.get(c.values[0]).impl_family)[c.values[1]].interpret)]
# Decoding, causality, bf16, jit/vmap/remat: every name with -m slow; in CI one name per distinct
# path (CI time); forward and gradients: every name in CI.
LIGHT_CASES = [c if c.values[0] in MODEL_LEVEL_CI else pytest.param(*c.values, id=c.id, marks=pytest.mark.slow)
               for c in XLA_CASES]


def _setup(name: str, impl: str | None, *, gqa: bool = True):
    t = za.get(name)
    hk = H // 2 if (gqa and t.gqa) else H
    q, k, v = rand(1, B, T, H, D), rand(2, B, T, hk, D), rand(3, B, T, hk, E)
    opts = dict(t.example_options(H, D)) if t.example_options else {}
    if impl is not None:
        opts["impl"] = impl
    return t, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), opts, hk


def _is_kernel(t, impl) -> bool:
    return impl is not None and za.implementations(t.impl_family)[impl].interpret


def _float_options(opts: dict) -> dict:
    """The options that are floating point arrays (or pytrees of them): differentiable inputs."""
    def is_float_tree(x):
        leaves = jax.tree_util.tree_leaves(x)
        return bool(leaves) and all(hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) for a in leaves)
    return {k: x for k, x in opts.items() if is_float_tree(x)}


@pytest.mark.parametrize("name,impl", CASES)
def test_forward_equals_reference(name, impl):
    t, q, k, v, opts, _ = _setup(name, impl)
    modes = [True] if t.causal_only else [True, False]
    for causal in modes:
        o = dict(opts)
        if not causal:
            o = {k_: x for k_, x in o.items() if k_ not in ("decay", "window")}  # causal-only options
        y = jax.jit(lambda q, k, v, o=o, c=causal: t(q, k, v, causal=c, **o))(q, k, v)
        assert y.shape == (B, T, H, E) and y.dtype == v.dtype
        ref = jax.jit(lambda q, k, v, o=o, c=causal: t.reference(q, k, v, causal=c, **o))(q, k, v)
        assert_close(y, ref, **OUT, what=f"{name} causal={causal}")


@pytest.mark.parametrize("name,impl", CASES)
def test_gradients_equal_reference(name, impl):
    t, q, k, v, opts, _ = _setup(name, impl)
    # Kernels do not differentiate their gates (documented): only q, k, v for them.
    diff = {} if _is_kernel(t, impl) else _float_options(opts)
    rest = {k_: x for k_, x in opts.items() if k_ not in diff}
    if diff and "learn_decay" in t.option_names:
        rest["learn_decay"] = True  # decay rates are constants unless learning them is asked for
    w = jnp.asarray(rand(4, B, T, H, E))

    def loss(form):
        return lambda q, k, v, d: jnp.sum(w * form(q, k, v, causal=True, **rest, **d))

    g = jax.jit(jax.grad(loss(t), argnums=(0, 1, 2, 3)))(q, k, v, diff)
    g_ref = jax.jit(jax.grad(loss(t.reference), argnums=(0, 1, 2, 3)))(q, k, v, diff)
    tree_assert_close(g, g_ref, **GRAD, what=f"{name} grads (q, k, v, {', '.join(diff)})")


@pytest.mark.parametrize("name,impl", LIGHT_CASES)
def test_prefill_then_step_equals_parallel(name, impl):
    t, q, k, v, opts, hk = _setup(name, impl)
    if not t.decodes:
        pytest.skip(f"{name} has no decoding form")
    y = jax.jit(lambda q, k, v: t(q, k, v, causal=True, **opts))(q, k, v)
    s0 = t.init_state(B, H, D, E, kv_heads=hk, max_len=T, dtype=jnp.float32, **opts)
    prefill = jax.jit(lambda s, q, k, v: t.prefill(s, q, k, v, **opts))
    step = jax.jit(lambda s, q, k, v: t.step(s, q, k, v, **opts))
    y_p, st = prefill(s0, q[:, :PROMPT], k[:, :PROMPT], v[:, :PROMPT])
    ys = [y_p]
    for i in range(PROMPT, T):
        y_t, st = step(st, q[:, i], k[:, i], v[:, i])
        assert y_t.shape == (B, H, E)
        ys.append(y_t[:, None])
    assert_close(jnp.concatenate(ys, axis=1), y, **OUT, what=f"{name} prefill + step vs parallel")
    _, st_all = prefill(s0, q, k, v)
    tree_assert_close(st_all, st, **OUT, what=f"{name} state after prefill(all) vs stepping")


@pytest.mark.parametrize("name,impl", LIGHT_CASES)
def test_causality(name, impl):
    t, q, k, v, opts, _ = _setup(name, impl)
    f = jax.jit(lambda q, k, v: t(q, k, v, causal=True, **opts))
    y = f(q, k, v)
    c = 3
    y2 = f(q.at[:, c].add(1.0), k.at[:, c].add(-2.0), v.at[:, c].add(3.0))
    assert_close(y2[:, :c], y[:, :c], atol=1e-6, what=f"{name}: outputs before the changed token")
    assert float(jnp.max(jnp.abs(y2[:, c:] - y[:, c:]))) > 1e-4, "the change reaches later outputs"


@pytest.mark.parametrize("name,impl", LIGHT_CASES)
def test_bfloat16(name, impl):
    t, q, k, v, opts, _ = _setup(name, impl)
    bf = lambda x: x.astype(jnp.bfloat16)
    y = jax.jit(lambda q, k, v: t(q, k, v, causal=True, **opts))(bf(q), bf(k), bf(v))
    assert y.dtype == jnp.bfloat16
    ref = jax.jit(lambda q, k, v: t.reference(q, k, v, causal=True, **opts))(
        *(bf(x).astype(jnp.float32) for x in (q, k, v)))
    assert_close(y.astype(jnp.float32), ref, atol=6e-2, rtol=6e-2, what=f"{name} bf16")


@pytest.mark.parametrize("name,impl", LIGHT_CASES)
def test_jit_vmap_remat(name, impl):
    t, q, k, v, opts, _ = _setup(name, impl)
    f = lambda q, k, v: t(q, k, v, causal=True, **opts)
    y = jax.jit(f)(q, k, v)
    ref = jax.jit(lambda q, k, v: t.reference(q, k, v, causal=True, **opts))(q, k, v)
    assert_close(y, ref, **OUT, what="jit")
    yv = jax.jit(jax.vmap(lambda a, b, c: f(a[None], b[None], c[None])[0]))(q, k, v)
    assert_close(yv, y, **OUT, what="vmap over the batch")
    loss = lambda q: jnp.sum(f(q, k, v) ** 2)
    g_remat = jax.jit(jax.grad(jax.checkpoint(loss)))(q)
    assert_close(g_remat, jax.jit(jax.grad(loss))(q), **GRAD, what="grad through remat")


@pytest.mark.parametrize("name", za.names())
def test_bad_inputs(name):
    t, q, k, v, opts, _ = _setup(name, None)
    call = lambda q, k, v, **o: t(q, k, v, causal=True, **{**opts, **o})
    with pytest.raises(ValueError, match=r"\bq\b.*floating"):
        call(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match=r"\bv\b.*floating"):
        call(q, k, v.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"\bq\b"):
        call(q[..., None], k, v)  # rank 5 (some mechanisms accept a shared rank-2/3 q)
    with pytest.raises(ValueError, match="length"):
        call(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="no_such_option"):
        t.bind(no_such_option=1)
    if t.causal_only:
        with pytest.raises(ValueError, match="causal"):
            t(q, k, v, **opts)  # causal defaults to False for every transform
    for opt in ("chunk_size", "window"):
        if opt in opts:  # NumPy integers are integers
            assert_close(call(q, k, v, **{opt: np.int64(opts[opt])}), call(q, k, v), atol=0, what=opt)


@pytest.mark.parametrize("name", [n for n in za.names() if za.get(n).decodes])
def test_step_rejects_bad_tokens(name):
    t, q, k, v, opts, hk = _setup(name, None)
    st = t.init_state(B, H, D, E, kv_heads=hk, max_len=T, **opts)
    with pytest.raises(ValueError, match=r"q_t"):
        t.step(st, q[:, 0].astype(jnp.int32), k[:, 0], v[:, 0], **opts)
    with pytest.raises(ValueError, match=r"k_t"):
        t.step(st, q[:, 0], k[:, :2], v[:, 0], **opts)


def test_registry_records():
    """The capabilities are stated, not guessed: spot checks against the papers' definitions."""
    assert za.get("aaren").causal_only and za.get("titans").causal_only and za.get("sliding_window").causal_only
    assert not za.get("softmax").causal_only and not za.get("linear").causal_only
    assert not za.get("titans").linear_in_v and za.get("softmax").linear_in_v
    assert za.get("softmax").cache == "kv" and za.get("linear").cache == "recurrent"
    assert "bias" in za.get("sigmoid").step_exact
    for name in za.names():  # defaults are valid options of the parallel form
        t = za.get(name)
        t.check_options(t.defaults)
        assert t.reference_fn is not None, f"{name} has no reference"
    assert math.isfinite(len(CASES)) and len(CASES) >= len(za.names())
