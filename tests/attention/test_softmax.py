"""Softmax family: reference parity, variants' identities, KV-cache decoding, fixtures.

Tolerances (float32): 2e-6 abs + 2e-6 rel for forms computing the same sums; fixtures (float64
oracle) 1e-5 abs + 1e-5 rel; gradients 1e-5 abs + 1e-4 rel.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, f32, fixture, rand, tree_assert_close

TOL = dict(atol=2e-6, rtol=2e-6)


def qkv(b=2, t=12, h=4, hk=2, d=8, e=8, seed=0, tk=None):
    tk = t if tk is None else tk
    return rand(seed, b, t, h, d), rand(seed + 1, b, tk, hk, d), rand(seed + 2, b, tk, hk, e)


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_matches_reference_and_jax_nn(causal):
    q, k, v = qkv()
    out = za.softmax(q, k, v, causal=causal)
    assert_close(out, za.softmax_naive(q, k, v, causal=causal), **TOL)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out, ref, **TOL, what="vs jax.nn.dot_product_attention")


def test_gradients_match_jax_nn():
    q, k, v = qkv()
    w = rand(7, 2, 12, 4, 8)
    f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    got = f(lambda q, k, v: za.softmax(q, k, v, causal=True))
    ref = f(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    tree_assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_window_matches_jax_nn_local_window():
    q, k, v = qkv(t=16)
    out = za.softmax(q, k, v, causal=True, window=4)
    # jax.nn's local_window_size=(left, right): `left` keys before the query plus itself.
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(3, 0))
    assert_close(out, ref, **TOL)
    assert_close(za.sliding_window(q, k, v, causal=True, window=4), out, atol=0)


def test_mask_and_fully_masked_rows():
    q, k, v = qkv(tk=7)
    mask = np.ones((2, 1, 12, 7), bool)
    mask[:, :, 3, :] = False  # a query that sees nothing
    mask[1, :, :, 5:] = False  # padding keys in batch 1
    out = za.softmax(q, k, v, mask=mask)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    ok = np.ones(12, bool)
    ok[3] = False
    assert_close(out[:, ok], ref[:, ok], **TOL)
    np.testing.assert_array_equal(np.asarray(out[:, 3]), 0.0)
    g = jax.grad(lambda q: jnp.sum(za.softmax(q, k, v, mask=mask)))(q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_sink_logit_identities():
    q, k, v = qkv()
    # s_h -> -inf recovers softmax; s_h = 0 ("off by one") leaves row sums below 1.
    plain = za.softmax(q, k, v, causal=True)
    assert_close(za.softmax(q, k, v, causal=True, sink_logit=np.full(4, -1e4, np.float32)), plain, **TOL)
    ones = np.ones((2, 12, 2, 1), np.float32)
    rows = za.softmax(q, k, ones, causal=True, sink_logit=np.zeros(4, np.float32))
    assert np.all(np.asarray(rows) < 1.0)
    # Explicit formula: a_ij = exp(l_ij) / (exp(s_h) + sum exp(l)).
    s = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    kr, vr = np.repeat(k, 2, 2), np.repeat(v, 2, 2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(8)
    logits = np.where(np.tril(np.ones((12, 12), bool)), logits, -np.inf)
    ex = np.exp(logits)
    a = ex / (np.exp(s)[None, :, None, None] + ex.sum(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", a, vr)
    assert_close(za.softmax(q, k, v, causal=True, sink_logit=s), ref, atol=1e-5, rtol=1e-5)


def test_logn_scaling():
    q, k, v = qkv(t=16)
    # Below the training length the factor is 1; beyond it logits scale by log n / log T.
    assert_close(za.softmax(q, k, v, causal=True, logn_train_length=16), za.softmax(q, k, v, causal=True), **TOL)
    out = za.softmax(q, k, v, causal=True, logn_train_length=4)
    n = np.arange(1, 17, dtype=np.float64)
    c = np.maximum(1.0, np.log(n) / np.log(4.0))
    ref = za.softmax_naive(q * c[None, :, None, None].astype(np.float32), k, v, causal=True)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sigmoid_identities():
    q, k, v = qkv(t=10, h=2, hk=2)
    # No competition: appending a duplicate (k, v) pair adds exactly sigmoid(l + b) v.
    b = -math.log(10)
    base = za.sigmoid(q, k, v, bias=b)
    k2 = np.concatenate([k, k[:, :1]], 1)
    v2 = np.concatenate([v, v[:, :1]], 1)
    dup = za.sigmoid(q, k2, v2, bias=b)
    l0 = np.einsum("bqhd,bhd->bqh", q, k[:, 0]) / math.sqrt(8)
    extra = jax.nn.sigmoid(l0 + b)[..., None] * v[:, 0][:, None]
    assert_close(dup, base + extra, atol=1e-5, rtol=1e-5)
    # With q = k = 0 and b = -log n every weight is 1/(n+1).
    z = np.zeros((1, 5, 1, 4), np.float32)
    ones = np.ones((1, 5, 1, 1), np.float32)
    assert_close(za.sigmoid(z, z, ones), np.full((1, 5, 1, 1), 5 / 6), atol=1e-6)
    assert_close(za.sigmoid(z, z, ones, causal=True), (np.arange(1, 6) / 6).reshape(1, 5, 1, 1), atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_sigmoid_fixtures(causal):
    fx = fixture(f"sigmoid_attention_{'causal' if causal else 'noncausal'}")
    q, k, v = f32(fx["q"], fx["k"], fx["v"])
    out = za.sigmoid(q, k, v, causal=causal, bias=float(fx["bias"]), scale=float(fx["scale"]))
    assert_close(out, fx["out"], atol=1e-5, rtol=1e-5)
    # The default bias is the fixture's -log(L).
    assert_close(za.sigmoid(q, k, v, causal=causal), out, atol=0)


def lssa_numpy(q, k, v, reweight, p=15.0, delta=1.0):
    """Independent float64 LSSA/LSSAR, written from the equations with direct powers."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    b, t, h, d = q.shape
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    out = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        n = i + 1
        s = np.einsum("bhd,bjhd->bhj", qn[:, i], kn[:, :n]) * np.log(d) * np.log(n)
        a = np.log1p(np.exp(s))
        a = a / (a.sum(-1, keepdims=True) + 1e-8)
        if reweight:
            dl = 0.0 if i < 3 else delta
            w = np.maximum(n * a - dl, 0.0) ** p
            # Normalised exactly (float64 holds 1e-300); a row with no positive entry is 0.
            tot = w.sum(-1, keepdims=True)
            a = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 0.0)
        out[:, i] = np.einsum("bhj,bjhe->bhe", a, v[:, :n])
    return out


@pytest.mark.parametrize("reweight", [False, True])
def test_softplus_matches_numpy(reweight):
    q, k, v = qkv(t=9, h=2, hk=2)
    out = za.softplus(q, k, v, causal=True, reweight=reweight)
    assert_close(out, lssa_numpy(q, k, v, reweight), atol=1e-5, rtol=1e-4)


def test_softplus_identities_and_long_rows_finite():
    q, k, v = qkv(t=9, h=2, hk=2)
    # p = 1 and delta = 0 reduce LSSAR to LSSA; row 1 has weight 1.
    assert_close(za.softplus(q, k, v, causal=True, reweight=True, power=1.0, delta=0.0),
                 za.softplus(q, k, v, causal=True), atol=1e-5)
    assert_close(za.softplus(q, k, v, causal=True)[:, 0], v[:, 0], atol=1e-6)
    # (n a - 1)^15 overflows float32 at n = 8192 unless computed in the log domain.
    t = 8192
    qq = rand(3, 1, t, 1, 4)
    kk = rand(4, 1, t, 1, 4)
    kk[:, 0] = qq[:, -1] * 10  # one strong key makes n a - 1 large
    vv = rand(5, 1, t, 1, 1)
    out = za.softplus(qq[:, -1:], kk, vv, causal=False, reweight=True)
    assert np.all(np.isfinite(np.asarray(out)))


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("variant", ["softmax", "sigmoid", "softplus"])
def test_step_equals_parallel(variant):
    q, k, v = qkv(t=10, h=4, hk=2)
    par = {
        "softmax": lambda: za.softmax(q, k, v, causal=True, sink_logit=np.full(4, 0.3, np.float32)),
        "sigmoid": lambda: za.sigmoid(q, k, v, causal=True),
        "softplus": lambda: za.softplus(q, k, v, causal=True, reweight=True),
    }[variant]()
    opts = {"softmax": {"sink_logit": np.full(4, 0.3, np.float32)}, "sigmoid": {"bias": -math.log(10)},
            "softplus": {"reweight": True}}[variant]
    cache = za.init_cache(2, 2, 8, capacity=16)
    step = jax.jit(lambda c, a, b, d: za.softmax_step(c, a, b, d, variant=variant, **opts))
    ys = []
    for t in range(10):
        y, cache = step(cache, q[:, t], k[:, t], v[:, t])
        ys.append(y)
    assert_close(jnp.stack(ys, 1), par, atol=1e-5, rtol=1e-5)


def test_prefill_then_step_and_window_ring():
    q, k, v = qkv(t=20, h=2, hk=2)
    win = 6
    par = za.softmax(q, k, v, causal=True, window=win)
    cache = za.softmax_init_state(2, 2, 8, kv_heads=2, max_len=20, window=win)
    assert cache.pos.shape == (win,)  # a ring buffer of the window
    y0, cache = za.softmax_prefill(cache, q[:, :9], k[:, :9], v[:, :9], window=win)
    assert_close(y0, par[:, :9], **TOL)  # one parallel call over a prompt longer than the ring
    ys = []
    for t in range(9, 20):
        y, cache = za.softmax_step(cache, q[:, t], k[:, t], v[:, t], window=win)
        ys.append(y)
    assert_close(jnp.stack(ys, 1), par[:, 9:], **TOL)


@pytest.mark.slow  # left out of CI (README test command); run with -m slow
def test_streaming_llm_sinks():
    q, k, v = qkv(t=20, h=2, hk=2)
    ns, cap = 2, 8
    cache = za.init_cache(2, 2, 8, capacity=cap)
    for t in range(20):
        y, cache = za.softmax_step(cache, q[:, t], k[:, t], v[:, t], num_sink_tokens=ns)
        # Visible: the first ns tokens plus the most recent cap - ns tokens.
        vis = np.zeros((1, 1, 1, t + 1), bool)
        vis[..., :ns] = True
        vis[..., max(ns, t + 1 - (cap - ns)):] = True
        ref = za.softmax(q[:, t:t + 1], k[:, : t + 1], v[:, : t + 1], mask=vis)
        assert_close(y, ref[:, 0], **TOL, what=f"t={t}")
    assert int(cache.length) == 20


def test_bf16_finite_and_close():
    q, k, v = qkv(t=64)
    ref = za.softmax(q, k, v, causal=True)
    out = za.softmax(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), causal=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


def test_vmap_jit():
    q, k, v = qkv()
    f = jax.jit(jax.vmap(lambda q, k, v: za.softmax(q[None], k[None], v[None], causal=True)[0]))
    assert_close(f(q, k, v), za.softmax(q, k, v, causal=True), **TOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0, "causal": True}, "window must be a positive integer"),
        ({"window": 3}, "window needs causal=True"),
        ({"mask": np.ones((3, 3), bool)}, "mask must broadcast"),
        ({"sink_logit": np.zeros(3)}, r"sink_logit must be a scalar or have shape \[4\]"),
        ({"logn_train_length": 1}, "logn_train_length"),
    ],
)
def test_bad_input(kwargs, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        za.softmax(q, k, v, **kwargs)


def test_registry():
    assert {"softmax", "sigmoid", "softplus", "linear", "based", "hedgehog", "nalaformer"} <= set(za.names())
    with pytest.raises(ValueError, match="valid names: .*softmax"):
        za.get("flashy")
    q, k, v = qkv()
    assert_close(za.get("softmax")(q, k, v, causal=True), za.softmax(q, k, v, causal=True), atol=0)
    assert za.get("based").defaults["feature_map"] == "taylor"
