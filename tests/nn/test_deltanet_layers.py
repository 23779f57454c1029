"""DeltaNetLayer, GatedDeltaNetLayer (zoo.nn.deltanet), GLALayer (zoo.nn.gla), TTTLayer (zoo.nn.ttt): each equals
its equations computed
directly from its parameters (with the transform's naive reference), decoding (prefill + steps)
equals the forward, DecoderLM runs them as mixers (forward, gradient to every parameter, decode),
initialisation and logical axis names as documented, bad arguments rejected.

Tolerances (float32): ``atol=2e-5, rtol=1e-5`` between forms of one layer (the mixer suite's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.attention as za
import zoo.nn as zn
from tests.helpers import assert_close
from zoo.models import DecoderLM

E, H, B, T = 16, 2, 2, 9
TOL = dict(atol=2e-5, rtol=1e-5)
LAYERS = {"deltanet_layer": zn.DeltaNetLayer, "gated_deltanet_layer": zn.GatedDeltaNetLayer, "gla_layer": zn.GLALayer,
          "ttt_layer": zn.TTTLayer}


def x_in(t: int = T, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, t, E), jnp.float32)


def build(cls, **kw) -> zn.DeltaNetLayer:
    kw = {"expand_v": 1.5, "chunk_size": 4, **kw}
    if cls is zn.TTTLayer:
        kw.update(expand_v=1, depth=2, conv=3)  # TTT-MLP with convolutions: every piece exercised
    return cls(E, H, rngs=nnx.Rngs(0), **kw)


def direct(m: zn.DeltaNetLayer, x: jax.Array) -> jax.Array:
    """The module docstring's equations written out: projections, a causal conv as an explicit loop
    over taps, SiLU, l2 norm, sigmoid beta, the Mamba-2 style decay, the naive delta rule, RMS
    norm, SiLU gate, output projection."""
    p = lambda name: getattr(m, name)[...]
    gla = isinstance(m, (zn.GLALayer, zn.TTTLayer))  # no l2 norm; SiLU only after a convolution
    feats = {}
    for n in ("q", "k", "v"):
        y = jnp.einsum("bte,ehd->bthd", x, p(f"w{n}"))
        if m.conv_width:
            w = p(f"conv_{n}")
            y = jnp.stack([sum(w[i] * y[:, t - i] for i in range(w.shape[0]) if t - i >= 0)
                           for t in range(x.shape[1])], 1)
            y = jax.nn.silu(y)
        elif not gla:
            y = jax.nn.silu(y)
        if n != "v" and not gla:
            y = y / jnp.sqrt(jnp.sum(y * y, -1, keepdims=True) + 1e-6)
        feats[n] = y
    if isinstance(m, zn.TTTLayer):  # TTT: per-token rates, position scales, learned inner model and LN
        eta = jax.nn.sigmoid(jnp.einsum("bte,eh->bth", x, p("w_lr")) + p("b_lr")) / m.head_dim
        tau = jnp.maximum(1.0 / jnp.arange(1, m.chunk_size + 1) + p("token_offset"), 0.0)
        o = za.ttt_naive(feats["q"], feats["k"], feats["v"], eta=eta, token_scale=tau, depth=m.depth,
                         weights=(p("inner_w0"), p("inner_w1")), biases=(p("inner_b0"), p("inner_b1")),
                         ln_weight=p("ln_weight"), ln_bias=p("ln_bias"), chunk_size=m.chunk_size, causal=True)
    elif gla:  # GLA: per-channel gates logsigmoid(x W1 W2 + b) / 16, linear attention without normaliser
        z = jnp.einsum("btr,rhd->bthd", x @ p("w_gate1"), p("w_gate2")) + p("b_gate")
        o = za.linear_naive(feats["q"], feats["k"], feats["v"], causal=True, feature_map="identity",
                            normalize=False, decay=-jax.nn.log_sigmoid(z) / 16.0, scale=m.head_dim ** -0.5)
    else:
        beta = jax.nn.sigmoid(jnp.einsum("bte,eh->bth", x, p("w_beta")))
        rate = None
        if m.gated:
            rate = jnp.exp(p("A_log")) * jax.nn.softplus(jnp.einsum("bte,eh->bth", x, p("w_a")) + p("dt_bias"))
        o = za.deltanet_naive(feats["q"], feats["k"], feats["v"], beta=beta, decay=rate, scale=m.head_dim ** -0.5,
                              causal=True)
    o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-5) * m.out_norm.scale[...]
    o = o * jax.nn.silu(jnp.einsum("bte,ehd->bthd", x, p("wg")))
    return jnp.einsum("bthd,hde->bte", o, p("wo"))


@nnx.jit
def _forward(m, x):
    return m(x)


@nnx.jit
def _prefill(m, x, state):
    return m.prefill(x, state, 0)


@nnx.jit
def _step(m, x_t, state):
    return m.decode_step(x_t, state, 0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_equals_equations_and_decodes_as_it_trains(name):
    """(GLALayer / TTTLayer: the same layer body with their gates and transforms.)"""
    """forward == the equations (direct); T decode_steps == forward; prefill(4), step, prefill(rest)
    == forward."""
    m = build(LAYERS[name])
    x = x_in()
    y = _forward(m, x)
    assert y.shape == (B, T, E) and float(jnp.abs(y).mean()) > 1e-2
    assert_close(y, nnx.jit(direct)(m, x), **TOL, what=f"{name} vs equations")
    st, steps = m.init_state(B), []
    for t in range(T):
        y_t, st = _step(m, x[:, t], st)
        steps.append(y_t)
    assert_close(jnp.stack(steps, 1), y, **TOL, what=f"{name}: decode_step x T vs forward")
    y1, st = _prefill(m, x[:, :4], m.init_state(B))
    y2, st = _step(m, x[:, 4], st)
    y3, st = _prefill(m, x[:, 5:], st)
    assert_close(jnp.concatenate([y1, y2[:, None], y3], 1), y, **TOL, what=f"{name}: prefill, step, prefill")


def test_gated_initialisation_and_axes():
    """A ~ U(0, 16], softplus(dt_bias) = dt in [1e-3, 0.1] (Mamba-2 / Gated DeltaNet); the decay
    rate stays > 0; every parameter carries one logical axis name per dimension."""
    m = zn.GatedDeltaNetLayer(E, 8, head_dim=4, expand_v=2, rngs=nnx.Rngs(3))
    a = np.exp(np.asarray(m.A_log[...]))
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert np.all((a > 0) & (a <= 16)) and np.all((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7))
    assert float(jnp.min(m.gates(x_in())["decay"])) > 0
    names = lambda v: v.get_metadata()["out_sharding"]
    assert names(m.wq) == ("embed", "heads", "head_dim") and names(m.wo) == ("heads", "head_dim", "embed")
    assert names(m.w_beta) == ("embed", "heads") and names(m.A_log) == ("heads",)
    assert names(m.conv_v) == (None, "heads", "head_dim") and m.wv[...].shape == (E, 8, 8)
    for _, v in nnx.iter_graph(m):
        if isinstance(v, nnx.Param):
            assert len(names(v)) == v[...].ndim


@pytest.mark.parametrize(
    "name", [n if n == "deltanet_layer" else pytest.param(n, marks=pytest.mark.slow) for n in LAYERS])
def test_decoder_lm_forward_and_grad(name):
    """DecoderLM with the layer as mixer: forward finite, a gradient reaching every parameter of the
    layer (beta and decay projections included). (DecoderLM decode == forward for every layer mixer:
    tests/models/test_lm.py::test_decode_and_prefill_match_forward_every_module_mixer.)"""
    v, d = 29, 16
    model = DecoderLM(v, d, 2, H, mixers=[{"module": name, "chunk_size": 4}, "softmax"], max_len=16,
                      rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, v, dtype=jnp.int32)

    def loss(mdl):
        logits = mdl(toks)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    val, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(val))
    mixer_grads = grads["blocks"][0]["mixer"]
    for path, g in jax.tree_util.tree_leaves_with_path(mixer_grads):
        assert np.all(np.isfinite(np.asarray(g))), path
        assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_bad_arguments():
    m = build(zn.DeltaNetLayer)
    with pytest.raises(ValueError, match="causal"):
        m(x_in(), causal=False)
    with pytest.raises(ValueError, match="x_t"):
        m.decode_step(x_in()[:, :2], m.init_state(B))
    with pytest.raises(ValueError, match="expand_v"):
        zn.DeltaNetLayer(E, H, expand_v=1.3, rngs=nnx.Rngs(0))  # 8 * 1.3 is not an integer
    with pytest.raises(ValueError, match="num_heads"):
        zn.DeltaNetLayer(E, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chunk_size"):
        zn.GatedDeltaNetLayer(E, H, chunk_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conv"):
        zn.GatedDeltaNetLayer(E, H, conv=-1, rngs=nnx.Rngs(0))
    assert "deltanet_layer" in zn.mixer_names("layer") and "gated_deltanet_layer" in zn.mixer_names("layer")
    assert "gla_layer" in zn.mixer_names("layer") and "ttt_layer" in zn.mixer_names("layer")
    with pytest.raises(ValueError, match="depth"):
        zn.TTTLayer(E, H, depth=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        zn.GLALayer(E, H, gate_logit_normalizer=0, rngs=nnx.Rngs(0))
