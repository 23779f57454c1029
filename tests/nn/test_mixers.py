"""The mixer contract for every mixer name zoo.nn registers (every transform name, i.e.
MultiHeadAttention, and every zoo.nn layer; zoo.models' own mixers are tested with the models):
prefill == stepping == forward (causal by default), integer inputs rejected;
MultiHeadAttention cross-attention in the four patterns of the CAB benchmark (causal /
non-causal x self / cross) against a direct computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.attention as za
import zoo.nn as zn
from tests.helpers import assert_close, ci_subset

E, H, B, T = 8, 2, 2, 7
# float32 tolerance of decoding against the forward: |err| <= ATOL + RTOL |y|. Outputs are O(1)
# except moneta's lp memory (O(100) here), whose errors are float32 rounding of those values
# (measured 3e-5 at |y| = 115, i.e. 2.6e-7 relative); every other mixer measured <= 1e-6.
TOL = dict(atol=2e-5, rtol=1e-5)


def _from_zoo_nn(name: str) -> bool:
    """Whether ``name`` is registered by zoo.nn (another test module may have imported zoo.models,
    which registers more)."""
    return name in za.names() or zn.get_mixer(name).__module__.startswith("zoo.nn.")


NAMES = [n for n in zn.mixer_names() if _from_zoo_nn(n)]
LAYERS = [n for n in zn.mixer_names("layer") if _from_zoo_nn(n)]


def x_in(t: int = T, e: int = E, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, t, e), jnp.float32)


def spec(name: str) -> dict:
    """The mixer ``name`` with the options a decode needs to equal the forward: the
    ``Transform.step_exact`` ones given explicitly (sigmoid's bias); grouped-query k/v heads for
    the transforms that support them."""
    kw = {}
    if name in za.names():
        t = za.get(name)
        if "bias" in t.step_exact:
            kw["bias"] = -math.log(T)
        ex = t.example_options(H, E // H) if t.example_options else {}
        kw.update({k: ex[k] for k in t.step_exact - {"bias"}})  # e.g. s2's group_size
        if t.gqa and name != "positional":  # positional's k needs q's heads (its record says gqa=True)
            kw["num_kv_heads"] = 1  # grouped-query: one k/v head for H query heads
    return {"module": name, **kw}


def build(name: str) -> nnx.Module:
    return zn.build_mixer(spec(name), E, rngs=nnx.Rngs(0), num_heads=H, rope=True)


@nnx.jit
def _forward(m, x):
    return m(x)


@nnx.jit(static_argnames="position")
def _prefill(m, x, state, position):
    return m.prefill(x, state, position)


@nnx.jit
def _step(m, x_t, state, position):
    return m.decode_step(x_t, state, position)


@pytest.mark.parametrize("name", ci_subset(NAMES))
def test_prefill_equals_stepping_equals_forward(name):
    """For every mixer name: the default call (causal) == T decode_steps == prefill, step, prefill
    continuing the state (positions 0..2, 3, 4..6)."""
    m = build(name)
    x = x_in()
    y = _forward(m, x)
    assert y.shape == (B, T, E)
    st0 = m.init_state(B, T)
    steps, st = [], st0
    for t in range(T):
        yt, st = _step(m, x[:, t], st, jnp.int32(t))
        steps.append(yt)
    assert_close(jnp.stack(steps, 1), y, **TOL, what=f"{name}: decode_step x T vs forward")
    y1, st = _prefill(m, x[:, :3], st0, 0)
    y2, st = _step(m, x[:, 3], st, jnp.int32(3))
    y3, st = _prefill(m, x[:, 4:], st, 4)
    assert_close(jnp.concatenate([y1, y2[:, None], y3], 1), y, **TOL, what=f"{name}: prefill, step, prefill")


@pytest.mark.parametrize("name", LAYERS)
def test_layer_mixers_reject_integer_inputs(name):
    m = build(name)
    xi = jnp.ones((B, T, E), jnp.int32)
    with pytest.raises(ValueError, match="x"):
        m(xi)
    with pytest.raises(ValueError, match="x"):
        m.prefill(xi, m.init_state(B, T), 0)
    with pytest.raises(ValueError, match="x"):
        m.decode_step(xi[:, 0], m.init_state(B, T), 0)


def test_moh_is_causal_by_default():
    """Defect 6: MoHAttention defaulted to causal=False, so its forward differed from its own
    decode_step. Now every mixer module is causal by default."""
    m = zn.MoHAttention(E, 4, num_shared=2, top_k=1, rope=True, rngs=nnx.Rngs(0))
    x = x_in()
    y = m(x)
    assert_close(y, m(x, causal=True), atol=0.0, what="default == causal=True")
    assert not np.allclose(np.asarray(y), np.asarray(m(x, causal=False)), atol=1e-3)
    st, steps = m.init_state(B, T), []
    for t in range(T):
        yt, st = _step(m, x[:, t], st, jnp.int32(t))
        steps.append(yt)
    assert_close(jnp.stack(steps, 1), y, **TOL, what="MoH default forward == decode")


# ----------------------------------------------------------------------------- cross-attention

S = 5  # context length of the non-causal cross pattern (!= T)
PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def _direct(m: zn.MultiHeadAttention, x, c, causal: bool, **options):
    """The pattern computed directly: explicit projections, the transform's naive reference
    (``Transform.reference``), explicit output projection."""
    t = za.get(m.transform_name)
    q = jnp.einsum("bte,ehd->bthd", x, m.q_proj[...])
    k = jnp.einsum("bte,ehd->bthd", c, m.k_proj[...])
    v = jnp.einsum("bte,ehd->bthd", c, m.v_proj[...])
    if m.learned_feature_map:
        options["feature_map_params"] = m.feature_map_params()
    options.update(m.learned_options())
    y = t.reference(q, k, v, causal=causal, **options)
    return jnp.einsum("bthd,hde->bte", y, m.o_proj[...])


@pytest.mark.parametrize("name", ci_subset(za.names()))
def test_cross_attention_patterns(name):
    """CAB's four patterns for every transform inside MultiHeadAttention: each either equals the
    direct computation or (causal-only transforms, non-causal patterns) raises a ValueError.
    Causal cross-attention aligns query i with context positions j <= i, so it needs a context
    of x's length for every transform (none defines a causal mask across lengths)."""
    t = za.get(name)
    kw = {"bias": -1.5} if "bias" in t.step_exact else {}
    m = zn.MultiHeadAttention(H, E, transform=name, transform_kwargs=kw, rngs=nnx.Rngs(1))
    x, c_same, c_other = x_in(6, seed=1), x_in(6, seed=2), x_in(S, seed=3)
    cases = {
        "noncausal_self": (None, x, False), "causal_self": (None, x, True),
        "noncausal_cross": (c_other, c_other, False), "causal_cross": (c_same, c_same, True),
    }
    for pattern in PATTERNS:
        context, kv_source, causal = cases[pattern]
        if t.causal_only and not causal:
            with pytest.raises(ValueError, match="causal"):
                m(x, context, causal=causal)
            continue
        got = m(x, context, causal=causal)
        assert_close(got, _direct(m, x, kv_source, causal, **kw), atol=1e-5, rtol=1e-5, what=f"{name} {pattern}")
    with pytest.raises(ValueError, match="context"):
        m(x, c_other, causal=True)  # causal cross with another length


def test_transform_init_params_become_trained_parameters():
    """TTT's initial inner model and LayerNorm (``Transform.init_params``) are parameters of
    MultiHeadAttention: passed to the transform, with gradients; given options win."""
    m = zn.MultiHeadAttention(H, E, transform="ttt_linear", rngs=nnx.Rngs(0))
    assert sorted(m.learned_options()) == ["biases", "ln_bias", "ln_weight", "weights"]
    assert m.learned_options()["weights"][0].shape == (H, E // H, E // H)
    x = x_in()
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
    g = grads.transform_params["weights_0"][...]
    assert float(jnp.max(jnp.abs(g))) > 0.0
    w = (jnp.zeros((H, E // H, E // H)),)
    given = zn.MultiHeadAttention(H, E, transform="ttt_linear", transform_kwargs={"weights": w}, rngs=nnx.Rngs(0))
    assert "weights" not in given.learned_options()
