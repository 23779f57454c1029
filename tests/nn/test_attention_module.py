"""zoo.nn: MultiHeadAttention (options, decode == forward with every option, axes, errors, KV-cache
capacity), layers (ShortConv, RoPE, MLP, RMSNorm, Embed) and the mixer registry. Decode/prefill ==
forward for every transform name is in test_mixers.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.attention as za
import zoo.nn as zn
from tests.helpers import assert_close
from zoo.models import param_count
from zoo.nn.attention import Constant

E, H, T, B = 16, 4, 8, 2


def x_in(b: int = B, t: int = T, e: int = E, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, t, e), jnp.float32)


def decode(m, x: jax.Array, max_len: int | None = None) -> jax.Array:
    step = nnx.jit(lambda m, xt, st, p: m.decode_step(xt, st, p))
    st = m.init_state(x.shape[0], x.shape[1] if max_len is None else max_len)
    ys = []
    for t in range(x.shape[1]):
        y, st = step(m, x[:, t], st, jnp.int32(t))
        ys.append(y)
    return jnp.stack(ys, axis=1)


def mha(transform="softmax", **kw) -> zn.MultiHeadAttention:
    return zn.MultiHeadAttention(H, E, transform=transform, rngs=nnx.Rngs(0), **kw)


# ----------------------------------------------------------------------------- MultiHeadAttention


def test_shapes_dtypes_and_head_dim():
    m = mha(num_kv_heads=2, head_dim=6, rope=True)
    y = m(x_in())
    assert y.shape == (B, T, E) and y.dtype == jnp.float32
    assert m.q_proj.shape == (E, H, 6) and m.k_proj.shape == (E, 2, 6) and m.o_proj.shape == (H, 6, E)
    yb = mha(dtype=jnp.bfloat16)(x_in())
    assert yb.dtype == jnp.bfloat16
    assert_close(yb.astype(jnp.float32), mha()(x_in()), atol=5e-2, what="bf16 vs f32")


def test_all_options_decode_matches_forward_and_grads():
    m = mha(num_kv_heads=2, qk_norm=True, rope=500.0, output_gate=True, use_bias=True, sink=True,
            transform_kwargs={"window": 5})
    assert m.rope and m.rope_theta == 500.0
    x = x_in(t=10)
    y = nnx.jit(lambda m, x: m(x))(m, x)
    assert_close(decode(m, x), y, atol=1e-5, rtol=1e-5, what="decode vs forward (all options)")
    # ring-buffer KV cache of `window` slots
    assert m.init_state(B, 10).k.shape == (B, 5, 2, E // H)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(m)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in flat)


def test_transform_object_and_callable():
    x = x_in()
    ref = mha("softmax")(x)
    via_obj = mha(za.get("softmax"))(x)
    fn = lambda q, k, v, *, causal=False: za.softmax(q, k, v, causal=causal)
    m = mha(fn)
    assert m.transform_name == "<lambda>"
    assert_close(via_obj, ref, atol=1e-6, what="Transform object")
    assert_close(m(x), ref, atol=1e-6, what="callable")
    with pytest.raises(ValueError, match="no decoding form"):
        m.init_state(B, T)
    with pytest.raises(ValueError, match="no decoding form"):
        m.decode_step(x[:, 0], None, 0)
    with pytest.raises(ValueError, match="no decoding form"):
        m.prefill(x, None)


def test_non_causal_and_key_padding_mask():
    m = mha()
    x = x_in()
    full = m(x, causal=False)
    mask = jnp.arange(T)[None] < 5
    masked = m(x, causal=False, mask=jnp.broadcast_to(mask, (B, T)))
    assert_close(masked[:, :5], m(x[:, :5], causal=False), atol=1e-5, what="padding mask == truncation")
    assert not np.allclose(np.asarray(full[:, :5]), np.asarray(masked[:, :5]))
    with pytest.raises(ValueError, match="causal only"):
        mha("aaren")(x, causal=False)
    with pytest.raises(ValueError, match="mask"):
        mha("linear")(x, mask=mask)


def test_array_options_are_constants():
    decay = np.asarray([0.1, 0.2, 0.3, 0.4], np.float32)
    m = mha("linear", transform_kwargs={"decay": decay})
    assert isinstance(m.transform_arrays["decay"], Constant)
    assert param_count(m) == 4 * E * E  # constants are not parameters
    x = x_in()
    y = nnx.jit(lambda m, x: m(x))(m, x)
    assert_close(decode(m, x), y, atol=1e-4, what="decay decode")
    ref = mha("linear", transform_kwargs={"decay": jnp.zeros(4)})(x)
    assert not np.allclose(np.asarray(y), np.asarray(ref))


def test_hedgehog_feature_map_params():
    m = mha("hedgehog")
    assert m.learned_feature_map
    pq, pk = m.feature_map_params()
    init = za.feature_maps.hedgehog_init(None, E // H, heads=H)
    np.testing.assert_array_equal(np.asarray(pq["weight"]), np.asarray(init["weight"]))
    assert pk["bias"].shape == (H, E // H)
    tied = mha("linear", transform_kwargs={"feature_map": "hedgehog"}, tie_feature_map=True)
    assert isinstance(tied.feature_map_params(), dict)
    assert param_count(m) - param_count(tied) == H * (E // H) ** 2 + H * (E // H)
    # explicit params are passed through and not created
    given = mha("hedgehog", transform_kwargs={"feature_map_params": init})
    assert not given.learned_feature_map and given.feature_map_params() is None
    assert_close(given(x_in()), mha("hedgehog", tie_feature_map=True)(x_in()), atol=1e-6, what="given == created")
    # a plain map has none
    assert mha("based").feature_map_params() is None


def test_parameters_carry_logical_axes():
    m = mha(num_kv_heads=2, qk_norm=True, output_gate=True, use_bias=True, sink=True)
    m2 = mha("hedgehog")
    for mod in (m, m2):
        for _, v in nnx.iter_graph(mod):
            if isinstance(v, nnx.Param):
                names = v.get_metadata()["out_sharding"]
                assert len(names) == v[...].ndim
                assert all(n is None or n in zn.AXES for n in names)
    md = lambda v: v.get_metadata()["out_sharding"]
    assert md(m.gate_proj) == ("embed", "heads", "head_dim")
    assert md(m.k_bias) == ("kv_heads", "head_dim")
    assert md(m.sink_logit) == ("heads",)
    assert md(m.q_norm.scale) == ("head_dim",)


@pytest.mark.parametrize(
    "kw, arg",
    [
        ({"num_heads": 3}, "num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"transform": "nope"}, "transform"),
        ({"transform": 3}, "transform"),
        ({"transform": "linear", "sink": True}, "sink"),
        ({"head_dim": 5, "rope": True}, "rope"),
        ({"transform_kwargs": {"causal": True}}, "causal"),
        ({"transform_kwargs": {"mask": None}}, "mask"),
        ({"transform_kwargs": {"feature_map": "nope"}}, "feature_map"),
        ({"in_features": 0}, "in_features"),
        ({"qkv_features": 10}, "qkv_features"),
        ({"qkv_features": 32, "head_dim": 4}, "qkv_features"),
    ],
)
def test_bad_arguments(kw, arg):
    args = {"in_features": E, "num_heads": H, **kw}
    with pytest.raises(ValueError, match=arg):
        zn.MultiHeadAttention(args.pop("num_heads"), args.pop("in_features"), rngs=nnx.Rngs(0), **args)


@pytest.mark.parametrize("name, typo", [("softmax", "windw"), ("linear", "feature_mapp"), ("sigmoid", "bais")])
def test_transform_kwargs_typo_raises_at_construction(name, typo):
    """Defect 5: a misspelt option is a ValueError naming it when the module is built (not at the
    first call), through the constructor and through a mixer spec alike."""
    with pytest.raises(ValueError, match=f"transform_kwargs.*{typo}"):
        mha(name, transform_kwargs={typo: 1})
    with pytest.raises(ValueError, match=f"mixers\\[0\\].*{typo}"):
        zn.check_mixer_spec({"transform": name, typo: 1}, name="mixers[0]")
    with pytest.raises(ValueError, match=typo):
        zn.build_mixer({"transform": name, typo: 1}, E, rngs=nnx.Rngs(0), num_heads=H)


def test_flax_argument_order_and_features():
    """nnx.MultiHeadAttention's positional order: num_heads, in_features, qkv_features,
    out_features, num_kv_heads, in_kv_features."""
    m = zn.MultiHeadAttention(2, E, 12, 10, 1, 6, rngs=nnx.Rngs(0))
    assert (m.num_heads, m.in_features, m.head_dim, m.out_features, m.num_kv_heads, m.in_kv_features) == (
        2, E, 6, 10, 1, 6)
    assert m.q_proj.shape == (E, 2, 6) and m.k_proj.shape == (6, 1, 6) and m.o_proj.shape == (2, 6, 10)
    c = jax.random.normal(jax.random.key(3), (B, 5, 6))
    assert m(x_in(), c, causal=False).shape == (B, T, 10)
    with pytest.raises(ValueError, match="context"):
        m(x_in())  # in_kv_features != in_features: self-attention is impossible


def test_integer_and_empty_inputs_rejected():
    """Defect 3 at the module level: integer x is a ValueError naming it (never truncated); so is
    a length-0 sequence."""
    m = mha()
    st = m.init_state(B, T)
    for call, arg in ((lambda: m(jnp.ones((B, T, E), jnp.int32)), "x"),
                      (lambda: m.prefill(jnp.ones((B, T, E), jnp.int32), st), "x"),
                      (lambda: m.decode_step(jnp.ones((B, E), jnp.int32), st, 0), "x_t"),
                      (lambda: m(x_in(), jnp.ones((B, T, E), jnp.int32), causal=False), "context"),
                      (lambda: m(jnp.zeros((B, 0, E))), "length >= 1"),
                      (lambda: m.decode_step(x_in()[:, 0], st, 0.5), "position")):
        with pytest.raises(ValueError, match=arg):
            call()


def test_sigmoid_decoding_needs_explicit_bias():
    """Transform.step_exact: sigmoid's parallel bias defaults to -log(k_length), which a cache of
    another size cannot reproduce, so init_state asks for it instead of decoding differently."""
    with pytest.raises(ValueError, match="bias.*transform_kwargs"):
        mha("sigmoid").init_state(B, T)
    m = mha("sigmoid", transform_kwargs={"bias": -math.log(T)})
    x = x_in()
    assert_close(decode(m, x), m(x), atol=1e-5, what="sigmoid with explicit bias")


@pytest.mark.slow  # CI time; run with -m slow
def test_kv_cache_overflow_raises_for_full_attention():
    """Decoding past a full-attention KV cache would evict tokens silently (a ring buffer): it is a
    ValueError on concrete values; a sliding window evicts by design."""
    m = mha()
    x = x_in()
    with pytest.raises(ValueError, match="max_len=4"):
        m.prefill(x, m.init_state(B, 4))  # 8 tokens > 4 slots
    st = m.init_state(B, T)
    _, st = m.prefill(x[:, :6], st, 0)
    with pytest.raises(ValueError, match="max_len=8"):
        m.prefill(x[:, :3], st, 6)  # 6 + 3 > 8
    _, st = m.prefill(x[:, :2], st, 6)  # exactly full: fine
    with pytest.raises(ValueError, match="evict"):
        m.decode_step(x[:, 0], st, 8)
    with pytest.raises(ValueError, match="position"):
        m.decode_step(x[:, 0], m.init_state(B, T), 8)  # a position past max_len
    w = mha("sliding_window", transform_kwargs={"window": 3})
    st = w.init_state(B, T)
    y, st = w.prefill(x, st)
    y2, _ = w.decode_step(x[:, 0], st, 8)  # the ring buffer wraps: allowed
    assert y2.shape == (B, E)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match="x must be"):
        mha()(jnp.zeros((B, T, E + 1)))


# ----------------------------------------------------------------------------- layers


def test_short_conv_formula_and_decode():
    conv = zn.ShortConv(E, 3, use_bias=True, rngs=nnx.Rngs(1))
    conv.bias[...] = jnp.arange(E, dtype=jnp.float32) * 0.01
    x = x_in()
    y = conv(x)
    w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
    xn = np.asarray(x)
    ref = np.zeros_like(xn)
    for t in range(T):
        for i in range(3):
            if t - i >= 0:
                ref[:, t] += w[i] * xn[:, t - i]
    assert_close(y, ref + b, atol=1e-5, what="conv formula")
    st = conv.init_state(B)
    assert st.shape == (B, 2, E)
    outs = []
    for t in range(T):
        yt, st = conv.decode_step(x[:, t], st)
        outs.append(yt)
    assert_close(jnp.stack(outs, 1), y, atol=1e-5, what="conv decode")
    # prefill: one call, from the empty state or continuing one (the Block's short convolution)
    y1, st1 = conv.prefill(x[:, :3], conv.init_state(B))
    y2, st2 = conv.prefill(x[:, 3:], st1)
    assert_close(jnp.concatenate([y1, y2], 1), y, atol=1e-5, what="conv prefill in two calls")
    assert_close(st2, st, atol=0.0, what="prefill state == stepped state (the last width-1 inputs)")
    y1, _ = conv.prefill(x[:, :1], conv.init_state(B))  # shorter than the kernel
    assert_close(y1, y[:, :1], atol=1e-5, what="conv prefill of one token")
    with pytest.raises(ValueError, match="x must be"):
        conv.prefill(jnp.ones((B, T, E), jnp.int32), conv.init_state(B))
    assert zn.ShortConv(E, 1, rngs=nnx.Rngs(0)).init_state(B).shape == (B, 0, E)
    with pytest.raises(ValueError, match="width"):
        zn.ShortConv(E, 0, rngs=nnx.Rngs(0))


def test_rope_relative_and_norm_preserving():
    q = jax.random.normal(jax.random.key(0), (1, 1, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 2, 8))
    dot = lambda m, n: jnp.sum(zn.apply_rope(q, jnp.array([m])) * zn.apply_rope(k, jnp.array([n])), -1)
    assert_close(dot(5, 2), dot(13, 10), atol=1e-5, what="depends on m - n only")
    assert not np.allclose(np.asarray(dot(5, 2)), np.asarray(dot(5, 3)))
    x = x_in(t=6).reshape(B, 6, 2, 8)
    r = zn.apply_rope(x, jnp.arange(6))
    assert_close(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), atol=1e-5, what="norm")
    assert_close(zn.apply_rope(x, 0), x, atol=0, what="position 0 is identity")
    per_batch = zn.apply_rope(x, jnp.broadcast_to(jnp.arange(6), (B, 6)))
    assert_close(per_batch, r, atol=1e-6, what="[B, T] positions")
    assert_close(zn.apply_rope(x[:, 3:4], 3), r[:, 3:4], atol=1e-6, what="scalar position")
    assert zn.rope_frequencies(8).shape == (4,)
    with pytest.raises(ValueError, match="even"):
        zn.rope_frequencies(7)


def test_mlp_kinds():
    x = x_in()
    m = zn.MLP(E, 24, kind="swiglu", rngs=nnx.Rngs(0))
    ref = (jax.nn.silu(x @ m.w_gate[...]) * (x @ m.w_in[...])) @ m.w_out[...]
    assert_close(m(x), ref, atol=1e-5, what="swiglu")
    g = zn.MLP(E, 24, kind="gelu", use_bias=True, rngs=nnx.Rngs(0))
    assert_close(g(x), jax.nn.gelu(x @ g.w_in[...]) @ g.w_out[...], atol=1e-5, what="gelu")
    assert param_count(m) == 3 * E * 24 and param_count(g) == 2 * E * 24 + 24 + E
    with pytest.raises(ValueError, match="kind"):
        zn.MLP(E, 24, kind="relu", rngs=nnx.Rngs(0))


def test_norm_and_embed_axes():
    n = zn.RMSNorm(E, rngs=nnx.Rngs(0))
    assert n.scale.get_metadata()["out_sharding"] == ("embed",)
    x = x_in()
    assert_close(n(x), x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6), atol=1e-5, what="rmsnorm")
    e = zn.Embed(50, E, rngs=nnx.Rngs(0))
    assert e.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    std = float(jnp.std(e.embedding[...]))
    assert abs(std - 1 / math.sqrt(E)) < 0.05
    with pytest.raises(ValueError, match="logical axis"):
        zn.axes("embd")


# ----------------------------------------------------------------------------- mixer registry


def test_mixer_registry_and_build():
    assert "attention" in zn.mixer_names("layer") and "softmax" in zn.mixer_names("transform")
    assert set(zn.mixer_names()) == set(zn.mixer_names("layer")) | set(za.names())
    m = zn.build_mixer({"transform": "sliding_window", "window": 4, "qk_norm": True}, E, rngs=nnx.Rngs(0),
                       num_heads=H, rope=True)
    assert isinstance(m, zn.MultiHeadAttention)
    assert m.qk_norm and m.rope and m.options()["window"] == 4
    m2 = zn.build_mixer({"module": "attention", "num_heads": 2, "transform": "linear"}, E, rngs=nnx.Rngs(0))
    assert m2.num_heads == 2 and m2.transform_name == "linear"
    m3 = zn.build_mixer({"module": "attention", "num_heads": 2}, E, rngs=nnx.Rngs(0))
    assert m3.transform_name == "softmax"
    assert zn.build_mixer("based", E, rngs=nnx.Rngs(0), num_heads=H).transform_name == "based"
    # a transform name always means MultiHeadAttention, in every spelling
    for spec in ("flow", {"transform": "flow"}, {"module": "flow"}, {"module": "attention", "transform": "flow"}):
        assert zn.check_mixer_spec(spec) == {"module": "attention", "transform": "flow"}
        assert zn.build_mixer(spec, E, rngs=nnx.Rngs(0), num_heads=H).transform_name == "flow"
    assert zn.get_mixer("flow")(E, rngs=nnx.Rngs(0), num_heads=H).transform_name == "flow"
    assert "MultiHeadAttention(transform='flow')" in zn.describe_mixer("flow")
    with pytest.raises(ValueError, match="unknown mixer"):
        zn.get_mixer("nope")
    with pytest.raises(ValueError, match="layers\\[1\\]: unknown mixer 'flow_layer'"):
        zn.check_mixer_spec("flow_layer", name="layers[1]")  # removed: "flow" is the one name
    with pytest.raises(ValueError, match="'transform' or a 'module'"):
        zn.build_mixer({"window": 3}, E, rngs=nnx.Rngs(0), num_heads=H)
    with pytest.raises(ValueError, match="not both"):
        zn.check_mixer_spec({"module": "flow", "transform": "linear"})
    with pytest.raises(ValueError, match="mixer name"):
        zn.register_mixer("", lambda d, rngs: None)
    with pytest.raises(ValueError, match="transform name"):
        zn.register_mixer("softmax", lambda d, *, rngs: None)
    with pytest.raises(ValueError, match="rngs"):
        zn.register_mixer("test_no_rngs", lambda d: None)
