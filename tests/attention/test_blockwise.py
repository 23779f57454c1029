"""Blockwise (flash) forms of the softmax family vs the quadratic references.

Shapes are small and ragged on purpose: T = 13 with blocks of 4 queries and 8 keys (neither
divides T), grouped-query heads (4 q heads on 2 kv heads), value dim != head dim.

Tolerances (float32): outputs ``atol=rtol=1e-5``; gradients ``atol=rtol=1e-4`` (sums over the
sequence; LSSAR's power 15 amplifies rounding of its weights); bf16 inputs vs the float32
reference on the same (rounded) inputs ``atol=rtol=3e-2``.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, rand, tree_assert_close
from zoo.attention import blockwise as bw

sm = sys.modules["zoo.attention.softmax"]  # the module (zoo.attention.softmax is the function)

B, T, H, HK, D, E = 2, 13, 4, 2, 8, 6
BS = bw.BlockSizes(block_q=4, block_k=8)
OUT = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-4, rtol=1e-4)


def _qkv(tq=T, tk=T, seed=0):
    return (jnp.asarray(rand(seed, B, tq, H, D)), jnp.asarray(rand(seed + 1, B, tk, HK, D)),
            jnp.asarray(rand(seed + 2, B, tk, HK, E)))


def _positional_bias(qp, kp):  # a fixed function of positions: [heads, n, m]
    return jnp.stack([jnp.cos(0.3 * h * (qp[:, None] - kp[None, :])) for h in range(H)])


_SEG = np.array([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4], np.int32)
_KPAD = np.ones((B, 1, 1, T), bool)
_KPAD[1, ..., 6:] = False
_ROWS = np.ones((B, 1, T, T), bool)
_ROWS[0, :, 2, :] = False  # a query that sees nothing

# (id, family function, reference, options, differentiable options); the options are combined
# so that few compilations cover every one (CI time).
CASES = [
    ("noncausal-biasfn-keypad-emptyrow", za.softmax, za.softmax_naive,
     {"bias_fn": _positional_bias, "mask": _KPAD & _ROWS}, {}),
    ("causal-sink-logn-alibi", za.softmax, za.softmax_naive, {"causal": True, "logn_train_length": 4},
     {"sink_logit": jnp.linspace(-1.0, 2.0, H), "alibi_slopes": za.alibi_slopes(H)}),
    ("window2-logn_sqrt-segments", za.softmax, za.softmax_naive,
     {"causal": True, "window": 2, "logn_train_length": 4, "logn_kind": "sqrt", "segment_ids": _SEG}, {}),
    ("window5-sink", za.softmax, za.softmax_naive, {"causal": True, "window": 5}, {"sink_logit": jnp.zeros(H)}),
    ("window20", za.softmax, za.softmax_naive, {"causal": True, "window": 20}, {}),
    ("sigmoid-window-keypad", za.sigmoid, za.sigmoid_naive, {"causal": True, "window": 3, "mask": _KPAD}, {}),
    ("lssa-segments", za.softplus, za.softplus_naive, {"causal": True, "segment_ids": _SEG}, {}),
    ("lssar-noncausal-keypad", za.softplus, za.softplus_naive, {"reweight": True, "mask": _KPAD}, {}),
]


@pytest.mark.parametrize("fn,ref,opts,diff", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_blockwise_equals_reference(fn, ref, opts, diff):
    q, k, v = _qkv()
    w = jnp.asarray(rand(9, B, T, H, E))

    def run(form, **extra):
        def loss(q, k, v, d):
            y = form(q, k, v, **opts, **d, **extra)
            return jnp.sum(w * y), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, diff)

    (_, y), g = run(fn, impl="blockwise", block_sizes=BS)
    (_, y_ref), g_ref = run(ref)
    assert_close(y, y_ref, **OUT, what="output")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((y, g)))
    m = opts.get("mask")
    if m is not None and m.shape[2] == T and not m[0, 0, 2].any():  # a row that sees nothing: 0, no grad
        assert float(jnp.max(jnp.abs(y[0, 2]))) == 0.0 and float(jnp.max(jnp.abs(g[0][0, 2]))) == 0.0
    tree_assert_close(g, g_ref, **GRAD, what=f"grads (q, k, v, {', '.join(diff)})")


@pytest.mark.parametrize("causal", [False, True])
def test_cross_lengths(causal):
    """q_length != k_length: non-causal, and causal top-left aligned (``causal_mask``)."""
    for tq, tk in ((9, 13), (13, 6)):
        q, k, v = _qkv(tq=tq, tk=tk)
        y = jax.jit(lambda q, k, v: bw.attention(q, k, v, causal=causal, block_sizes=BS))(q, k, v)
        mask = jnp.asarray(sm.causal_mask(tq, tk)) if causal else None
        assert_close(y, jax.jit(lambda q, k, v, m=mask: za.softmax_naive(q, k, v, mask=m))(q, k, v), **OUT)


def test_bfloat16():
    q, k, v = _qkv()
    bf = lambda x: x.astype(jnp.bfloat16)
    y = jax.jit(lambda q, k, v: za.softmax(q, k, v, causal=True, window=5, impl="blockwise", block_sizes=BS))(
        bf(q), bf(k), bf(v))
    assert y.dtype == jnp.bfloat16
    ref = za.softmax_naive(*(bf(x).astype(jnp.float32) for x in (q, k, v)), causal=True, window=5)
    assert_close(y.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


def test_window_visits_only_its_blocks():
    """A window of w visits ceil((w + block_q - 1) / block_k) key blocks per query block, a
    static count (not all blocks, not the causal prefix)."""
    spec = dict(variant="softmax", causal=True, num_global=0, global_window=None, bq=64, bk=128, qpar=1,
                tq=4096, tk=4096, heads=1, kv_heads=1, explicit_kpos=False, mask_shape=None, has_seg=False,
                bias_fn=None, eps=0.0, power=1.0)
    s = bw._Spec(window=256, **spec)
    start, count = bw._k_range(s, 2048, 4096)
    assert count == math.ceil((256 + 64 - 1) / 128) == 3 and int(start) == 2048 - 255
    start, count = bw._q_range(s, 1024, 4096)
    assert count == math.ceil((128 + 256 - 1) / 64) and int(start) == 1024
    _, count = bw._k_range(bw._Spec(window=None, **spec), 2048, 4096)
    assert int(count) == 2048 // 128 + 1  # causal: the blocks up to the diagonal


def test_auto_dispatch_and_library_refusals():
    short = jax.ShapeDtypeStruct((1, 64, 4, 64), jnp.float32)
    long = jax.ShapeDtypeStruct((1, 4096, 4, 64), jnp.float32)
    assert sm.resolve_impl("auto", short, short, causal=True) == ("xla" if za.registry.platform() == "cpu" else
                                                                  sm.resolve_impl("auto", short, short, causal=True))
    if za.registry.platform() == "cpu":
        assert sm.resolve_impl("auto", long, long, causal=True) == "blockwise"
        assert sm.resolve_impl("xla", long, long, causal=True) == "xla"  # explicit: allowed
    facts = dict(variant="softmax", dtype=jnp.dtype(jnp.bfloat16), head_dim=64, q_length=4096, k_length=4096)
    assert sm._cudnn_supports(**facts) is None
    assert "sink_logit" in sm._cudnn_supports(**facts, sink_logit=jnp.zeros(4))
    assert "float32" in sm._cudnn_supports(**{**facts, "dtype": jnp.dtype(jnp.float32)})
    assert "sigmoid" in sm._cudnn_supports(**{**facts, "variant": "sigmoid"})
    assert sm._splash_supports(**{**facts, "head_dim": 128}, causal=True, window=256) is None
    assert "logn" in sm._splash_supports(**{**facts, "head_dim": 128}, logn_train_length=4)
    assert "bias" in sm._blockwise_supports(bias=jnp.zeros((1, 1, 4, 4)))


def test_bad_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_q"):
        bw.BlockSizes(block_q=0)
    with pytest.raises(ValueError, match="block_k"):
        bw.BlockSizes(block_k=-4)
    with pytest.raises(ValueError, match="window"):
        za.softmax(q, k, v, causal=True, window=0, impl="blockwise")
    with pytest.raises(ValueError, match="mask"):
        za.softmax(q, k, v, mask=np.ones((B, H, T, T + 1), bool), impl="blockwise")
    with pytest.raises(ValueError, match="segment_ids"):
        za.softmax(q, k, v, segment_ids=np.zeros((B, T + 1), np.int32), impl="blockwise")
    with pytest.raises(ValueError, match="block_sizes"):
        za.softmax(q, k, v, impl="blockwise", block_sizes=(4, 8))
    with pytest.raises(ValueError, match="impl"):
        za.softmax(q, k, v, impl="no_such_impl")


def test_sliding_window_cache_holds_window_keys():
    t = za.get("sliding_window")
    st = t.init_state(B, H, D, E, kv_heads=HK, max_len=100_000, window=4)
    assert st.k.shape == (B, 4, HK, D) and st.v.shape == (B, 4, HK, E)  # O(window), not O(max_len)


@pytest.mark.parametrize("opts", [
    {"window": 4, "num_sink_tokens": 1, "sink_logit": jnp.linspace(-1.0, 1.0, H), "logn_train_length": 3,
     "alibi_slopes": za.alibi_slopes(H)},
    {"window": 5, "variant": "softplus", "reweight": True},
], ids=["softmax-window-streaming-sink-logn-alibi", "lssar-window"])
def test_chunked_prefill_equals_quadratic_prefill(opts):
    """Blockwise prefill on a KV cache (two prompts: the second meets a full ring) equals the
    quadratic prefill, and the cache afterwards is the same."""
    q, k, v = _qkv(tq=15, tk=15)
    window = opts.get("window")
    cap = 10 if window is None else window + opts.get("num_sink_tokens", 0)
    outs = {}
    for impl in ("xla", "blockwise"):
        cache = sm.init_cache(B, HK, D, cap, E)
        f = jax.jit(lambda c, q, k, v, impl=impl: sm.prefill(c, q, k, v, impl=impl, block_sizes=BS, **opts))
        y1, cache = f(cache, q[:, :9], k[:, :9], v[:, :9])
        y2, cache = f(cache, q[:, 9:], k[:, 9:], v[:, 9:])
        outs[impl] = (jnp.concatenate([y1, y2], 1), cache)
    assert_close(outs["blockwise"][0], outs["xla"][0], **OUT, what="prefill output")
    tree_assert_close(outs["blockwise"][1], outs["xla"][1], atol=0, what="cache")
