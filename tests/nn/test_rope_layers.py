"""RoPE scaling in the layers: zoo.nn.rope_frequencies / apply_rope (unchanged behaviour),
MultiHeadAttention(rope_scaling=...) (decode == forward at every length, dynamic NTK included;
logit scales; CLEX parameters) and DecoderLM(rope_scaling=...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.attention as za
import zoo.nn as zn
from tests.helpers import assert_close, rand
from zoo.attention import rope
from zoo.models import DecoderLM

E, H, D, B = 16, 2, 8, 2
TOL = dict(atol=2e-5, rtol=2e-5)
DYN = {"kind": "ntk", "factor": 2.0, "dynamic": True, "original_max_len": 3}


def mha(**kw) -> zn.MultiHeadAttention:
    return zn.MultiHeadAttention(H, E, head_dim=D, rope=True, rngs=nnx.Rngs(0), **kw)


def x_in(t: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, t, E), jnp.float32)


_fwd = nnx.jit(lambda m, x: m(x))
_step = nnx.jit(lambda m, xt, st, p: m.decode_step(xt, st, p))
_prefill = nnx.jit(lambda m, x, st, p: m.prefill(x, st, p))


def decode_from(m, x, prompt: int, max_len: int, *, per_row: bool = False) -> jax.Array:
    """Prefill ``x[:, :prompt]`` (when > 0), then one decode_step per remaining token."""
    st = m.init_state(x.shape[0], max_len)
    ys = []
    if prompt:
        y, st = _prefill(m, x[:, :prompt], st, jnp.int32(0))
        ys.append(y)
    for t in range(prompt, x.shape[1]):
        p = jnp.full((x.shape[0],), t, jnp.int32) if per_row else jnp.int32(t)
        y, st = _step(m, x[:, t], st, p)
        ys.append(y[:, None])
    return jnp.concatenate(ys, axis=1)


# ----------------------------------------------------------------------------- zoo.nn functions


def test_zoo_nn_rope_functions_unchanged():
    """zn.rope_frequencies / zn.apply_rope keep their signatures and numbers (the pre-scaling
    implementation, inlined here as the reference)."""
    d, theta = 12, 500.0
    want = theta ** (-np.arange(0, d, 2) / d)
    assert_close(zn.rope_frequencies(d, theta), want, atol=0, rtol=1e-6, what="frequencies")
    assert zn.rope_frequencies(8).dtype == jnp.float32

    def old(x, positions):  # the previous zoo.nn.layers.apply_rope, in numpy float64
        ang = np.asarray(positions, np.float64)[..., None] * want
        ang = ang[None] if ang.ndim == 2 else ang
        cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = rand(0, 2, 5, 3, d)
    for pos in (np.arange(5), np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])):
        assert_close(zn.apply_rope(jnp.asarray(x), pos, theta), old(x, pos), atol=1e-5, what=f"positions {pos.shape}")
    inv = rope.rope_frequencies(d, theta=theta, scaling={"kind": "linear", "factor": 2.0})[0]
    assert_close(zn.apply_rope(jnp.asarray(x), np.arange(5) * 2, inv_freq=inv), old(x, np.arange(5)), atol=1e-5,
                 what="inv_freq keyword (PI)")


# ----------------------------------------------------------------------------- MultiHeadAttention


def test_dynamic_ntk_decode_equals_forward_at_every_length():
    T = 6
    m = mha(rope_scaling=DYN)
    x = x_in(T)
    fwd = jnp.stack([_fwd(m, x[:, :n])[:, -1] for n in range(1, T + 1)], axis=1)  # forward of each prefix
    assert_close(decode_from(m, x, 0, T), fwd, **TOL, what="decode_step at every length")
    assert_close(decode_from(m, x, 0, T, per_row=True), fwd, **TOL, what="decode_step, position [batch]")
    dec = decode_from(m, x, 4, T)  # a prompt longer than original_max_len: prefill == forward of it
    assert_close(dec[:, :4], _fwd(m, x[:, :4]), **TOL, what="prefill == forward over the prompt")
    assert_close(dec[:, 4:], fwd[:, 4:], **TOL, what="decode after prefill")
    # the test can fail: the frequencies do follow the length, and differ from no scaling past L
    assert float(jnp.abs(_fwd(m, x)[:, 3] - _fwd(m, x[:, :4])[:, 3]).max()) > 1e-3
    plain = mha()
    assert float(jnp.abs(_fwd(m, x) - _fwd(plain, x)).max()) > 1e-3
    assert_close(_fwd(m, x[:, :3]), _fwd(plain, x[:, :3]), **TOL, what="no change up to original_max_len")


@pytest.mark.parametrize("scaling", [
    {"kind": "yarn", "factor": 4.0, "original_max_len": 4},
    {"kind": "entropy_abf", "original_max_len": 3},
    {"kind": "clex", "factor": 2.0, "time_dt": 0.25},
    {"kind": "giraffe", "factor": 2.0, "power": 0.5, "truncate": 8},
    {"kind": "linear", "factor": 3.0, "logn": "sqrt", "original_max_len": 4},
], ids=["yarn", "entropy_abf", "clex", "giraffe", "linear+sqrt-logn"])
def test_static_scalings_decode_equals_forward(scaling):
    T = 9
    m = mha(rope_scaling=scaling)
    if scaling["kind"] == "clex":  # a non-trivial ODE
        m.clex_down[...] = jnp.asarray(rand(5, *m.clex_down.shape, scale=0.3))
    x = x_in(T, seed=1)
    y = m(x)
    assert_close(decode_from(m, x, 4, T), y, **TOL, what="prefill + decode_step == forward")
    assert float(jnp.abs(y - mha()(x)).max()) > 1e-3, "the scaling must change the output"


def test_mha_yarn_equals_manual_attention():
    s = {"kind": "yarn", "factor": 4.0, "original_max_len": 4}
    m, x = mha(rope_scaling=s), x_in(7)
    inv, ls = rope.rope_frequencies(D, scaling=s)
    q = jnp.einsum("bte,ehd->bthd", x, m.q_proj[...])
    k = jnp.einsum("bte,ehd->bthd", x, m.k_proj[...])
    v = jnp.einsum("bte,ehd->bthd", x, m.v_proj[...])
    pos = jnp.arange(7)
    y = za.softmax_naive(rope.apply_rope(q, pos, inv) * ls, rope.apply_rope(k, pos, inv), v, causal=True)
    assert_close(m(x), jnp.einsum("bthd,hde->bte", y, m.o_proj[...]), **TOL, what="yarn MHA")


def test_mha_entropy_abf_equals_abf_plus_softmax_logn():
    """entropy_abf (q scaled by max(1, ln(m+1)/ln L)) == base 500000 + softmax(logn_train_length=L)."""
    m = mha(rope_scaling={"kind": "entropy_abf", "original_max_len": 3})
    ref = zn.MultiHeadAttention(H, E, head_dim=D, rope=500_000.0, transform_kwargs={"logn_train_length": 3},
                                rngs=nnx.Rngs(0))
    x = x_in(10, seed=2)
    assert_close(m(x), ref(x), **TOL, what="entropy_abf")


def test_clex_parameters_are_trainable():
    m = mha(rope_scaling={"kind": "clex", "factor": 2.0, "time_dt": 0.25})
    assert m.clex_up.shape == (D // 2, D) and m.clex_down.shape == (D, D // 2)
    assert float(jnp.abs(m.clex_down[...]).max()) == 0  # CLEX init: starts as NTK(alpha = 2t - 1)
    x = x_in(6)
    ntk = mha(rope_scaling={"kind": "ntk", "factor": 3.0})
    assert_close(_fwd(m, x), _fwd(ntk, x), **TOL, what="clex at init == ntk(3)")
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(m)
    assert float(jnp.abs(g.clex_down[...]).max()) > 0


def test_rope_scaling_errors():
    with pytest.raises(ValueError, match="rope_scaling needs rotary embeddings"):
        zn.MultiHeadAttention(H, E, rope_scaling={"kind": "linear", "factor": 2.0}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_scaling: scaling kind must be one of"):
        mha(rope_scaling={"kind": "ropey"})
    with pytest.raises(ValueError, match="rope_scaling: scaling factor must be"):
        mha(rope_scaling={"kind": "linear", "factor": 0})
    m = zn.MultiHeadAttention(H, E, head_dim=D, rope=True, transform="linear", rope_scaling=DYN, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dynamic=True decodes on a KV cache"):
        m.decode_step(x_in(1)[:, 0], m.init_state(B, 4), 0)


# ----------------------------------------------------------------------------- DecoderLM


def test_decoder_lm_rope_scaling():
    """Dynamic scaling: a one-layer LM decodes as its forward at every length. With more layers
    only up to ``original_max_len``: past it the forward recomputes every earlier hidden state
    with the new length's frequencies, the cache keeps the ones of their own step (documented)."""
    T = 5
    tokens = jax.random.randint(jax.random.key(3), (B, T), 0, 32)
    step = nnx.jit(lambda lm, t, st: lm.decode_step(t, st))
    fwd = nnx.jit(lambda lm, t: lm(t))
    for layers in (1, 2):
        lm = DecoderLM(32, E, layers, H, rope_scaling=DYN, rngs=nnx.Rngs(0))
        assert all(b.mixer.rope_scaling == rope.as_scaling(DYN) for b in lm.blocks)
        st = lm.init_state(B, T)
        for n in range(T):
            logits, st = step(lm, tokens[:, n], st)
            if layers == 2 and n + 1 not in (DYN["original_max_len"], T):
                continue
            want = fwd(lm, tokens[:, : n + 1])[:, -1]
            if layers == 1 or n + 1 <= DYN["original_max_len"]:
                assert_close(logits, want, **TOL, what=f"{layers}-layer LM decode == forward at length {n + 1}")
            else:
                assert float(jnp.abs(logits - want).max()) > 1e-4
    spec = DecoderLM(32, E, 1, H, mixers={"transform": "softmax", "rope_scaling": {"kind": "linear", "factor": 2.0}},
                     rngs=nnx.Rngs(0))
    assert spec.blocks[0].mixer.rope_scaling.kind == "linear"
    with pytest.raises(ValueError, match="rope_scaling needs rotary positions"):
        DecoderLM(32, E, 1, H, pos="learned", rope_scaling=DYN, rngs=nnx.Rngs(0))

