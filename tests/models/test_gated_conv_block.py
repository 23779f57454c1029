"""DecoderLM's zoology gated-convolution block (``gated_conv``): the block's equation against a
numpy reference, causality, decode == forward and prefill + decode == forward with the conv
state carried, greedy generation, parameter count, bad values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import assert_close
from zoo.models import DecoderLM, generate, param_count
from zoo.models.lm import GatedConv

V, D, L, H, T, B = 29, 16, 2, 2, 8, 2

fwd = nnx.jit(lambda m, x: m(x))
step_fn = nnx.jit(lambda m, tok, st: m.decode_step(tok, st))


def lm(mixers="based", gated_conv=3, **kw) -> DecoderLM:
    kw.setdefault("max_len", 32)
    kw.setdefault("mlp", None)
    return DecoderLM(V, D, L, H, mixers=mixers, gated_conv=gated_conv, rngs=nnx.Rngs(0), **kw)


def tokens(b: int = B, t: int = T, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)


def decode_all(model: DecoderLM, toks: jax.Array, state=None) -> jax.Array:
    st = model.init_state(toks.shape[0], toks.shape[1]) if state is None else state
    out = []
    for t in range(toks.shape[1]):
        logits, st = step_fn(model, toks[:, t], st)
        out.append(logits)
    return jnp.stack(out, axis=1)


def test_gated_conv_equation_matches_numpy_reference():
    """y = x + conv(h) * (h W + b), h = rmsnorm(x) * scale, conv causal depthwise with bias."""
    width = 3
    g = GatedConv(D, width, rngs=nnx.Rngs(3))
    # non-trivial bias, conv bias and norm scale so every term is exercised
    g.b[...] = jax.random.normal(jax.random.key(4), (D,))
    g.conv.bias[...] = jax.random.normal(jax.random.key(5), (D,))
    g.norm.scale[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(6), (D,))
    x = jax.random.normal(jax.random.key(7), (B, T, D))
    y = np.asarray(g(x))

    xn = np.asarray(x, np.float64)
    h = xn / np.sqrt(np.mean(xn**2, axis=-1, keepdims=True) + 1e-6) * np.asarray(g.norm.scale[...])
    k = np.asarray(g.conv.kernel[...], np.float64)  # [width, D], tap i multiplies h_{t-i}
    conv = np.zeros_like(h)
    for b in range(B):
        for c in range(D):
            conv[b, :, c] = np.convolve(h[b, :, c], k[:, c])[:T]  # full convolution, causal part
    conv += np.asarray(g.conv.bias[...])
    ref = xn + conv * (h @ np.asarray(g.w[...], np.float64) + np.asarray(g.b[...]))
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_forward_shape_and_causal():
    m = lm()
    x = tokens()
    out = fwd(m, x)
    assert out.shape == (B, T, V) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    x2 = x.at[:, 5].set((x[:, 5] + 1) % V)
    out2 = fwd(m, x2)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(out2[:, :5]))
    assert not np.allclose(np.asarray(out[:, 5:]), np.asarray(out2[:, 5:]))


def test_zero_width_is_no_block():
    m = lm(gated_conv=0)
    assert all(blk.gate is None for blk in m.blocks)
    assert "gate" not in m.init_state(B, T).layers[0]
    m3 = lm(gated_conv=3)
    assert m3.init_state(B, T).layers[0]["gate"].shape == (B, 2, D)


@pytest.mark.parametrize(
    "mixers, kw",
    [pytest.param("based", {}, marks=pytest.mark.slow),
     pytest.param("softmax", {"short_conv": 2, "mlp": "swiglu"}, marks=pytest.mark.slow), ("linear", {"gated_conv": 1}),
     (["softmax", "based"], {"gated_conv": 4, "pos": "learned"})],
    ids=["based", "softmax-shortconv-mlp", "linear-width1", "hybrid-width4-learned"],
)
def test_decode_and_prefill_match_forward(mixers, kw):
    m = lm(mixers, **kw)
    x = tokens()
    forward = fwd(m, x)
    decoded = decode_all(m, x)
    assert_close(decoded, forward, atol=1e-4, rtol=1e-4, what="decode vs forward")
    logits, st = m.prefill(x[:, :5], max_len=T)
    assert_close(logits, forward[:, :5], atol=1e-4, rtol=1e-4, what="prefill vs forward")
    rest = decode_all(m, x[:, 5:], state=st)
    assert_close(rest, forward[:, 5:], atol=1e-4, rtol=1e-4, what="prefill + decode vs forward")


def test_generate_matches_step_by_step_greedy():
    m = lm()
    prompt = tokens(t=5)
    out = np.asarray(generate(m, prompt, 4))
    st = m.init_state(B, 9)
    for t in range(5):
        logits, st = step_fn(m, prompt[:, t], st)
    ref = [np.asarray(prompt)]
    for _ in range(4):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        ref.append(np.asarray(tok)[:, None])
        logits, st = step_fn(m, tok, st)
    np.testing.assert_array_equal(out, np.concatenate(ref, axis=1))


def test_param_count():
    base = param_count(nnx.eval_shape(lambda: lm(gated_conv=0)))
    for g in (1, 3):
        n = param_count(nnx.eval_shape(lambda g=g: lm(gated_conv=g)))
        assert n - base == L * (D * D + (g + 3) * D)


@pytest.mark.slow  # CI time; run with -m slow
def test_gradients_reach_the_gate():
    m = lm()
    x = tokens()

    def loss(model):
        return jnp.mean(model(x) ** 2)

    grads = nnx.grad(loss)(m)
    for i in range(L):
        blk = grads.blocks[i]
        for leaf in (blk.gate.w, blk.gate.b, blk.gate.conv.kernel, blk.gate.conv.bias):
            a = np.asarray(leaf[...])
            assert np.isfinite(a).all() and np.abs(a).sum() > 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_bad_width_raises(bad):
    with pytest.raises(ValueError, match="gated_conv"):
        lm(gated_conv=bad)
    with pytest.raises(ValueError, match="gated_conv"):
        GatedConv(D, bad if bad != -1 else 0, rngs=nnx.Rngs(0))
