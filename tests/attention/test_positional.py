"""Positional attention: weights from positional encodings only, values from the input."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, fixture, rand

# ``zoo.attention.positional`` is also the name of the function exported by the package.
P = importlib.import_module("zoo.attention.positional")

B, L, H, PD, DQK, E = 2, 7, 2, 5, 3, 4
TOL = 1e-6  # float32 vs float32 / float64 references; weights and outputs are O(1)


def _params(seed=0):
    return (rand(seed, L, PD), rand(seed + 1, H, PD, DQK), rand(seed + 2, H, DQK, scale=0.1),
            rand(seed + 3, H, PD, DQK), rand(seed + 4, H, DQK, scale=0.1))


def _numpy_weights(p, w_q, b_q, w_k, b_k, causal=False):
    """Independent float64 formula: softmax((P Wq_h + bq_h)(P Wk_h + bk_h)^T / sqrt(qk_dim))."""
    p, w_q, b_q, w_k, b_k = (np.asarray(x, np.float64) for x in (p, w_q, b_q, w_k, b_k))
    out = []
    for h in range(w_q.shape[0]):
        s = (p @ w_q[h] + b_q[h]) @ (p @ w_k[h] + b_k[h]).T / np.sqrt(w_q.shape[-1])
        if causal:
            s = np.where(np.tril(np.ones_like(s)) > 0, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        out.append(e / e.sum(-1, keepdims=True))
    return np.stack(out)


@pytest.mark.parametrize("causal", [False, True])
def test_weights_equal_numpy(causal):
    prm = _params()
    a = P.positional_weights(*prm, causal=causal)
    assert a.shape == (H, L, L) and a.dtype == jnp.float32
    assert_close(a, _numpy_weights(*prm, causal=causal), atol=TOL, what="weights")
    assert_close(a.sum(-1), np.ones((H, L)), atol=TOL, what="rows sum to 1")
    if causal:
        assert np.all(np.asarray(a)[:, np.triu_indices(L, 1)[0], np.triu_indices(L, 1)[1]] == 0)


def test_no_bias_and_scale():
    p, wq, _, wk, _ = _params(seed=5)
    zero = np.zeros((H, DQK), np.float32)
    # Scaling p by c (no biases) scales the logits by c^2: c^2 / sqrt(qk_dim) = 0.5.
    ref = _numpy_weights(p * np.sqrt(0.5 * np.sqrt(DQK)), wq, zero, wk, zero)
    assert_close(P.positional_weights(p, wq, None, wk, None, scale=0.5), ref, atol=TOL, what="scale")


def test_identity_encoding():
    np.testing.assert_array_equal(P.identity_encoding(4), np.eye(4))
    np.testing.assert_array_equal(P.identity_encoding(4, 5), np.eye(4, 5))
    # One-hot encodings and identity kernels: A_h = softmax(I / sqrt(d)).
    eye = np.stack([np.eye(5)] * H).astype(np.float32)
    a = P.positional_weights(P.identity_encoding(5), eye, None, eye, None)
    diag, off = np.exp(1 / np.sqrt(5)), 1.0
    assert_close(a[0], (np.eye(5) * (diag - off) + off) / (diag + 4 * off), atol=TOL, what="one-hot")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_transform_equals_naive_and_apply(causal, shared):
    p, wq, bq, wk, bk = _params(seed=7)
    q, k = P.positional_qk(p, wq, bq, wk, bk)
    v = rand(8, B, L, 1, E)  # one value head shared by both query heads (grouped)
    if not shared:
        q = jnp.stack([q, q * 0.5])
        k = jnp.stack([k, -k])
    out = P.positional(q, k, v, causal=causal)
    assert_close(out, P.positional_naive(q, k, v, causal=causal), atol=TOL, what="vs naive")
    if shared:
        a = _numpy_weights(p, wq, bq, wk, bk, causal)
        ref = np.einsum("hij,bjhe->bihe", a, np.repeat(np.asarray(v, np.float64), H, axis=2))
        assert_close(out, ref, atol=TOL, what="vs numpy")
        assert_close(P.positional_apply(P.positional_weights(p, wq, bq, wk, bk, causal=causal), v),
                     ref, atol=TOL, what="apply")


def test_different_query_and_key_lengths():
    p, wq, bq, wk, bk = _params(seed=9)
    q, _ = P.positional_qk(p[:4], wq, bq, wk, bk)
    _, k = P.positional_qk(p, wq, bq, wk, bk)
    v = rand(10, B, L, H, E)
    assert_close(P.positional(q, k, v), P.positional_naive(q, k, v), atol=TOL, what="Lq != Lk")


def test_weights_independent_of_inputs():
    """The map v -> y is linear with the same matrix A for every input and batch element."""
    prm = _params(seed=11)
    a = P.positional_weights(*prm)
    q, k = P.positional_qk(*prm)
    f = lambda v: P.positional(q, k, v)
    v1, v2 = rand(12, B, L, H, E), rand(13, B, L, H, E, scale=10.0)
    j1 = jax.jacobian(f)(v1)  # [B, L, H, E, B, L, H, E]
    j2 = jax.jacobian(f)(v2)
    np.testing.assert_allclose(np.asarray(j1), np.asarray(j2), atol=1e-7)
    expected = np.einsum("hij,bc,hg,ef->bihecjgf", np.asarray(a), np.eye(B), np.eye(H), np.eye(E))
    assert_close(j1, expected, atol=TOL, what="jacobian = A (x) I")
    perm = np.array([1, 0])
    assert_close(f(v1[perm]), np.asarray(f(v1))[perm], atol=TOL, what="batch permutation")


def test_layer_affine_in_x():
    """attn(X) = concat_h(A_h X W_V[h] + b_V) W_O + b_O is affine in X (identity 9)."""
    p, wq, bq, wk, bk = _params(seed=14)
    wv, bv, wo, bo = rand(15, 6, H * E), rand(16, H * E), rand(17, H * E, 6), rand(18, 6)
    a = P.positional_weights(p, wq, bq, wk, bk)

    def layer(x):
        v = (x @ wv + bv).reshape(x.shape[0], L, H, E)
        return P.positional_apply(a, v).reshape(x.shape[0], L, H * E) @ wo + bo

    x1, x2 = rand(19, B, L, 6), rand(20, B, L, 6)
    for t in (0.3, 2.0):
        assert_close(layer(t * x1 + (1 - t) * x2), t * layer(x1) + (1 - t) * layer(x2),
                     atol=1e-5, what=f"affine t={t}")


def test_gradients_match_naive():
    prm = _params(seed=21)
    v = rand(22, B, L, H, E)
    w = rand(23, B, L, H, E)

    def fast(p, wq, bq, wk, bk, v):
        return jnp.sum(w * P.positional_apply(P.positional_weights(p, wq, bq, wk, bk, causal=True), v))

    def naive(p, wq, bq, wk, bk, v):
        q = jnp.einsum("lp,hpd->lhd", p, wq) + bq
        k = jnp.einsum("lp,hpd->lhd", p, wk) + bk
        return jnp.sum(w * P.positional_naive(q, k, v, causal=True))

    args = (*prm, v)
    g = jax.jit(jax.grad(fast, argnums=tuple(range(6))))(*args)
    g_ref = jax.grad(naive, argnums=tuple(range(6)))(*args)
    for name, a, r in zip(("p", "w_q", "b_q", "w_k", "b_k", "v"), g, g_ref):
        assert_close(a, r, atol=1e-5, rtol=1e-5, what=f"d{name}")


def test_jit_vmap():
    prm = _params(seed=24)
    q, k = P.positional_qk(*prm)
    v = rand(25, B, L, H, E)
    ref = P.positional_naive(q, k, v)
    assert_close(jax.jit(P.positional)(q, k, v), ref, atol=TOL, what="jit")
    vm = jax.vmap(lambda vb: P.positional(q, k, vb[None])[0])(v)
    assert_close(vm, ref, atol=TOL, what="vmap over batch")
    wts = jax.jit(P.positional_weights, static_argnames=("causal",))(*prm, causal=True)
    assert_close(wts, _numpy_weights(*prm, causal=True), atol=TOL, what="jit weights")


def test_bf16():
    prm = _params(seed=26)
    q, k = P.positional_qk(*prm)
    v = jnp.asarray(rand(27, B, L, H, E), jnp.bfloat16)
    out = P.positional(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v)
    assert out.dtype == jnp.bfloat16
    ref = P.positional_naive(q, k, v.astype(jnp.float32))
    assert_close(out.astype(jnp.float32), ref, atol=3e-2, rtol=2e-2, what="bf16")


def test_causal_step_equals_parallel():
    """Causal decoding is softmax attention over positional q/k (the registered step)."""
    prm = _params(seed=28)
    q, k = P.positional_qk(*prm)
    v = rand(29, B, L, H, E)
    tr = za.get("positional")
    cache = tr.init_state(B, H, DQK, E, max_len=L)
    ys = []
    for t in range(L):
        bc = lambda x, t=t: jnp.broadcast_to(x[t], (B, H, DQK))
        y, cache = tr.step(cache, bc(q), bc(k), v[:, t])
        ys.append(y)
    assert_close(jnp.stack(ys, 1), P.positional(q, k, v, causal=True), atol=TOL, what="step")


def test_fixture_layer():
    f = fixture("positional_attention_layer")
    g = lambda n: np.asarray(f[n], np.float32)
    h = int(f["num_heads"])
    # PyTorch Linear weights are [out, in]; our kernels are [in, out].
    prm = (g("p"), g("W_Q").transpose(0, 2, 1), g("b_Q"), g("W_K").transpose(0, 2, 1), g("b_K"))
    q, k = P.positional_qk(*prm)
    assert_close(jnp.moveaxis(q, 1, 0), f["q_pos"], atol=1e-5, what="q_pos")
    assert_close(jnp.moveaxis(k, 1, 0), f["k_pos"], atol=1e-5, what="k_pos")
    assert_close(P.positional_weights(*prm), f["attn_weights_derived"], atol=1e-5, what="weights")
    x = g("x")
    b, n, e = x.shape
    v = (x @ g("v_proj_weight").T + g("v_proj_bias")).reshape(b, n, h, e // h)
    head_out = P.positional_apply(P.positional_weights(*prm), v)
    assert_close(head_out, f["head_out"], atol=1e-5, what="head_out")
    assert_close(P.positional(q, k, v), f["head_out"], atol=1e-5, what="transform")
    out = head_out.reshape(b, n, e) @ g("o_proj_weight").T + g("o_proj_bias")
    assert_close(out, f["out"], atol=1e-5, what="layer out")


def test_fixture_block():
    f = fixture("positional_attention_block")
    g = lambda n: np.asarray(f[n], np.float32)
    h = int(f["num_heads"])
    # The block file stores the fused qk_proj: row h*2P + j is W_Q[h][j] (j < P), W_K[h][j-P].
    pd = int(f["pos_dim"])
    w = g("qk_proj_weight").reshape(h, 2 * pd, pd)
    bias = g("qk_proj_bias").reshape(h, 2 * pd)
    prm = (g("p"), w[:, :pd].transpose(0, 2, 1), bias[:, :pd], w[:, pd:].transpose(0, 2, 1), bias[:, pd:])
    x = g("x")
    b, n, e = x.shape
    v = (x @ g("v_proj_weight").T + g("v_proj_bias")).reshape(b, n, h, e // h)
    attn = P.positional_apply(P.positional_weights(*prm), v).reshape(b, n, e)
    attn = attn @ g("o_proj_weight").T + g("o_proj_bias")
    assert_close(attn, f["attn_out"], atol=1e-5, what="attn_out")
    hid = jax.nn.relu(jnp.concatenate([x, attn], -1) @ g("mlp0_weight").T + g("mlp0_bias"))
    assert_close(hid @ g("mlp2_weight").T + g("mlp2_bias"), f["out"], atol=1e-5, what="block out")


def test_registered():
    tr = za.get("positional")
    assert tr.fn is P.positional and tr.reference_fn is P.positional_naive
    q, k, v = rand(30, B, L, H, DQK), rand(31, B, L, H, DQK), rand(32, B, L, H, E)
    out = jax.jit(lambda q, k, v: tr(q, k, v, causal=True))(q, k, v)
    assert_close(out, P.positional_naive(q, k, v, causal=True), atol=TOL,
                 what="registry, per-batch q/k")


def test_bad_inputs():
    p, wq, bq, wk, bk = _params()
    with pytest.raises(ValueError, match=r"p must have rank 2"):
        P.positional_weights(p[None], wq, bq, wk, bk)
    with pytest.raises(ValueError, match=r"w_q must have rank 3"):
        P.positional_weights(p, wq[0], bq, wk, bk)
    with pytest.raises(ValueError, match=r"w_q must be \[heads, pos_dim, qk_dim\]"):
        P.positional_weights(p[:, :-1], wq, bq, wk, bk)
    with pytest.raises(ValueError, match=r"w_k must be"):
        P.positional_weights(p, wq, bq, wk[:, :, :-1], bk)
    with pytest.raises(ValueError, match=r"b_q must be \[heads, qk_dim\]"):
        P.positional_weights(p, wq, bq[0], wk, bk)
    with pytest.raises(ValueError, match=r"b_k must be"):
        P.positional_weights(p, wq, bq, wk, bk[:, :-1])
    a = P.positional_weights(p, wq, bq, wk, bk)
    v = rand(0, B, L, H, E)
    with pytest.raises(ValueError, match=r"weights must be"):
        P.positional_apply(a[:, :, :-1], v)
    with pytest.raises(ValueError, match=r"v must have rank 4"):
        P.positional_apply(a, v[0])
    with pytest.raises(ValueError, match=r"weights heads \(2\) must be a multiple of v heads \(3\)"):
        P.positional_apply(a, rand(0, B, L, 3, E))
    q, k = P.positional_qk(p, wq, bq, wk, bk)
    with pytest.raises(ValueError, match=r"k must have rank 3"):
        P.positional(q, k[None], v)
    with pytest.raises(ValueError, match=r"k must be \[7, 2, 3\]"):
        P.positional(q, k[:-1], v)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a multiple of v heads \(3\)"):
        P.positional(q, k, rand(0, B, L, 3, E))
    with pytest.raises(ValueError, match=r"causal attention needs q and k of the same length"):
        P.positional(q[:-1], k, v, causal=True)
    with pytest.raises(ValueError, match=r"q must have rank 4"):
        P.positional(q[0], k, v)
    with pytest.raises(ValueError, match=r"q batch size 3 != v batch size 2"):
        P.positional(jnp.stack([q] * 3), jnp.stack([k] * 3), v)
    with pytest.raises(ValueError, match=r"dim must be >= length"):
        P.identity_encoding(4, 3)
    with pytest.raises(ValueError, match=r"length must be a positive integer"):
        P.identity_encoding(0)
