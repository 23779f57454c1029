"""Special modules: sigmaReparam, MoH, Hedgehog (+ distillation), diagnostics, positional attention,
Aaren / Flow / NaLaFormer layers. Fixture parity (float64 oracles vs our float32), identities,
decode == forward, logical axis names, eval_shape, ValueErrors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoo.attention as za
import zoo.nn as znn
from tests.helpers import assert_close, f32, fixture, rand
from zoo.nn import diagnostics as diag
from zoo.nn.aaren import AarenLayer
from zoo.nn.flow import FlowAttentionLayer
from zoo.nn.hedgehog import HedgehogFeatureMap, hedgehog_distillation_loss, hedgehog_weights
from zoo.nn.moh import MoHAttention, relative_position_cpb, routing_gates
from zoo.nn.nalaformer import NaLaFormerAttention, rope_angles, rope_grid
from zoo.nn.positional import PositionalAttention, PositionalAttentionBlock, split_qk_proj
from zoo.nn.sigma_reparam import SigmaReparamDense

# Fixture tolerance: float32 against float64 oracles (PROVENANCE-2 reports the sources' own
# float32 paths within 2e-7 .. 5e-7 of the float64 values); the measured errors are <= 1e-6.
TOL = 1e-5


def _rngs(seed=0):
    return nnx.Rngs(seed)


def _set(var, value):
    var[...] = jnp.asarray(value, jnp.float32)


def _all_params_named(module):
    """Every nnx.Param carries one logical axis name (or None) per dimension."""
    for path, p in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = p.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(p.get_value().shape), (path, names)


def _grad(fn):
    """``nnx.grad`` compiled (eager op-by-op differentiation is slow on a busy CPU)."""
    return nnx.jit(nnx.grad(fn))


@nnx.jit
def _step(layer, x_t, state, position):
    return layer.decode_step(x_t, state, position)


def _decode_all(layer, x, state):
    """Token-by-token decoding (one compiled step reused for every position)."""
    ys = []
    for t in range(x.shape[1]):
        y, state = _step(layer, x[:, t], state, jnp.int32(t))
        ys.append(y)
    return jnp.stack(ys, 1)


# ============================================================================ sigmaReparam


def _sigma_from_fixture():
    fx = fixture("sigma_reparam_linear")
    out_f, in_f = fx["W"].shape
    m = SigmaReparamDense(in_f, out_f, rngs=_rngs())
    _set(m.kernel, fx["W"].T)
    _set(m.bias, fx["b"])
    _set(m.gamma, fx["gamma"])
    _set(m.u, fx["u0"])
    return m, fx


def test_sigma_reparam_fixture_parity():
    m, fx = _sigma_from_fixture()
    x = f32(fx["x"])
    for i in range(int(fx["n_iters"])):
        y = m(x)
        assert_close(m.u[...], fx["u_hist"][i], atol=TOL, what=f"u after call {i + 1}")
        assert_close(m.sigma[...], fx["sigma_hist"][i], atol=TOL, what=f"sigma after call {i + 1}")
    assert_close(m.effective_kernel().T, fx["W_eff"], atol=TOL, what="W_eff")
    assert_close(y, fx["y"], atol=TOL, what="y")


def test_sigma_reparam_eval_does_not_update_u_and_grad_flows_through_sigma():
    m, fx = _sigma_from_fixture()
    x = f32(fx["x"])
    m.eval()
    y_eval = m(x)
    assert_close(m.u[...], f32(fx["u0"]), atol=0.0, what="u frozen in eval")
    # eval runs one step from the stored u, as the first training call does.
    m.train()
    assert_close(m(x), y_eval, atol=1e-6)
    assert not np.allclose(np.asarray(m.u[...]), fx["u0"])

    def loss(mod):
        return jnp.sum(mod(x, deterministic=True) ** 2)

    g = _grad(loss)(m)
    gk = np.asarray(g["kernel"][...])
    assert np.all(np.isfinite(gk)) and np.abs(gk).max() > 0
    # d/dW of gamma W / sigma(W) differs from the gradient with sigma held fixed.
    k, s = m.kernel[...], jax.lax.stop_gradient(m.sigma[...])
    fixed = jax.grad(lambda kk: jnp.sum((x @ (m.gamma[...] * kk / s) + m.bias[...]) ** 2))(k)
    assert np.abs(gk - np.asarray(fixed)).max() > 1e-4
    assert "u" not in nnx.state(m, nnx.Param) and "u" in nnx.state(m, nnx.BatchStat)


def test_sigma_reparam_init_and_convergence():
    m = SigmaReparamDense(6, 5, rngs=_rngs(1))  # vision init: gamma = sigma(W0), W_hat = W
    assert_close(m.effective_kernel(), m.kernel[...], atol=1e-5)
    assert_close(m(jnp.eye(6)), m.kernel[...] + m.bias[...], atol=1e-5)
    r = SigmaReparamDense(6, 5, gamma_init="one", u_init="random", rngs=_rngs(2))
    assert_close(r.gamma[...], 1.0, atol=0.0)
    for _ in range(60):
        r(jnp.ones((1, 6)))
    top = np.linalg.svd(np.asarray(r.kernel[...]), compute_uv=False)[0]
    assert_close(r.sigma[...], top, atol=1e-4, rtol=1e-4, what="power iteration -> top singular value")
    assert_close(np.linalg.norm(np.asarray(r.effective_kernel()), 2), 1.0, atol=1e-4, what="||W_hat||_2 -> gamma")
    _all_params_named(m)


def test_sigma_reparam_bad_inputs():
    with pytest.raises(ValueError, match="gamma_init"):
        SigmaReparamDense(3, 4, gamma_init="two", rngs=_rngs())
    with pytest.raises(ValueError, match="in_features"):
        SigmaReparamDense(0, 4, rngs=_rngs())
    with pytest.raises(ValueError, match="x must be"):
        SigmaReparamDense(3, 4, rngs=_rngs())(jnp.ones((2, 5)))


# ============================================================================ MoH


def _moh_from_fixture():
    fx = fixture("moh_attention")
    h, s, k = int(fx["num_heads"]), int(fx["shared_head"]), int(fx["routed_head"])
    hw = tuple(int(v) for v in fx["image_hw"])
    c = fx["x"].shape[-1]
    m = MoHAttention(c, h, num_shared=s, top_k=k, attention="cosine", cpb=True, seq_length=hw[0] * hw[1],
                     rngs=_rngs())
    for mod, name in ((m.qkv, "qkv"), (m.proj, "proj"), (m.cpb_fc1, "cpb_fc1"), (m.cpb_fc2, "cpb_fc2")):
        _set(mod.kernel, fx[f"p_{name}_weight"].T)
        _set(mod.bias, fx[f"p_{name}_bias"])
    for mod, name in ((m.wg, "wg"), (m.wg_0, "wg_0"), (m.wg_1, "wg_1")):
        _set(mod.kernel, fx[f"p_{name}_weight"].T)
    _set(m.temperature, fx["p_temperature"].reshape(-1))
    _set(m.query_embedding, fx["p_query_embedding"][:, 0])
    return m, fx, hw


def test_moh_fixture_parity():
    m, fx, hw = _moh_from_fixture()
    idx, table = relative_position_cpb(hw)
    np.testing.assert_array_equal(idx, fx["relative_pos_index"])
    assert_close(table, fx["relative_coords_table"], atol=0.0, what="CPB table")
    x = f32(fx["x"])
    out, aux = m(x, hw=hw, return_aux=True, causal=False)  # the vision model: non-causal
    assert_close(aux["head_gates"], fx["head_gates"], atol=TOL, what="head_gates")
    assert_close(aux["router_probs"], fx["router_probs"], atol=TOL, what="router_probs")
    np.testing.assert_array_equal(np.asarray(aux["routed_mask"]), fx["routed_mask"])
    assert_close(aux["load_balance_loss"], fx["load_balance_loss"], atol=TOL, what="load_balance_loss")
    assert_close(m.attention_weights(x, hw=hw, causal=False), fx["attn"], atol=TOL, what="attn")
    assert_close(aux["head_out"], fx["head_out"], atol=TOL, what="head_out")
    assert_close(out, fx["out"], atol=TOL, what="out")
    # the given rel_bias and the explicit CPB inputs are equivalent entry points
    assert_close(m(x, rel_bias=f32(fx["rel_bias"]), causal=False), fx["out"], atol=TOL, what="out from rel_bias")
    out2 = m(x, relative_pos_index=fx["relative_pos_index"], relative_coords_table=f32(fx["relative_coords_table"]),
             causal=False)
    assert_close(out2, fx["out"], atol=TOL, what="out from CPB inputs")
    assert not nnx.state(m, nnx.Intermediate)  # nothing is sown outside nnx.capture
    _, inter = nnx.capture(m, nnx.Intermediate)(x, hw=hw, causal=False)
    assert_close(inter["load_balance_loss"].get_value()[0], fx["load_balance_loss"], atol=TOL)


def test_moh_gate_identities():
    x = rand(0, 2, 5, 16)
    lone = MoHAttention(16, 4, num_shared=0, top_k=2, rngs=_rngs())
    g = lone.gates(x)
    assert_close(jnp.sum(g["head_gates"], -1), np.full((2, 5), 2.0), atol=1e-5, what="routed gates sum to K")
    assert np.all(np.asarray(jnp.sum(g["head_gates"] > 0, -1)) == 2)
    mix = MoHAttention(16, 4, num_shared=2, top_k=1, rngs=_rngs())
    g = mix.gates(x)
    a = g["shared_weight_0"]
    assert_close(jnp.sum(g["head_gates"][..., :2], -1), 2 * a[..., 0], atol=1e-5, what="shared = h_s alpha_s")
    assert_close(jnp.sum(g["head_gates"][..., 2:], -1), 1 * a[..., 1], atol=1e-5, what="routed = K alpha_r")
    # perfectly balanced routing (E = 12, K = 3): every head gets mean prob 1/E and K/E of tokens
    base = np.arange(12, dtype=np.float32) * 0.3
    logits = np.stack([np.roll(base, i) for i in range(12)])
    lb = routing_gates(jnp.asarray(logits), 3)["load_balance_loss"]
    assert_close(lb, 3.0, atol=1e-5, what="balanced L_b = K")


def test_moh_decode_matches_causal_forward_and_grads():
    m = MoHAttention(16, 4, num_shared=1, top_k=2, rope=True, rngs=_rngs(3))
    x = rand(1, 2, 6, 16)
    y = m(x, causal=True)
    assert_close(_decode_all(m, x, m.init_state(2, 6)), y, atol=2e-6, what="decode == forward")

    def loss(mod):
        out, aux = mod(x, causal=True, return_aux=True)
        return jnp.mean(out**2) + 0.01 * aux["load_balance_loss"]

    grads = _grad(loss)(m)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert np.abs(np.asarray(grads["wg"]["kernel"][...])).max() > 0  # the router learns
    _all_params_named(m)


def test_moh_bad_inputs():
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(16, 4, num_shared=2, top_k=3, rngs=_rngs())
    with pytest.raises(ValueError, match="cpb"):
        MoHAttention(16, 4, top_k=1, cpb=True, rngs=_rngs())
    cos = MoHAttention(16, 4, top_k=1, attention="cosine", cpb=True, rngs=_rngs())
    with pytest.raises(ValueError, match="hw"):
        cos(rand(0, 1, 6, 16))
    with pytest.raises(ValueError, match="x must be"):
        cos(rand(0, 1, 6, 8))


# ============================================================================ Hedgehog


def test_hedgehog_feature_map_module_matches_fixtures():
    fx = fixture("hedgehog_feature_map_fla")
    b, t, h, d = fx["x"].shape
    m = HedgehogFeatureMap(h, d, per_head=False, rngs=_rngs())
    np.testing.assert_array_equal(np.asarray(m.weight[...]), np.eye(d))  # fla's identity init
    _set(m.weight, fx["weight"].T)
    _set(m.bias, fx["bias"])
    assert_close(m(f32(fx["x"])), fx["phi_x"], atol=TOL, what="fla hedgehog")
    fx = fixture("hedgehog_feature_map_lolcats")
    f = fx["layer"].shape[-1]
    m = HedgehogFeatureMap(h, d, f, variant="lolcats", use_bias=False, rngs=_rngs())
    _set(m.weight, fx["layer"])
    assert_close(m(f32(fx["x"])), fx["phi_x"], atol=TOL, what="lolcats hedgehog")
    _all_params_named(m)
    # the module's params plug into the linear-attention transform
    q, k, v = rand(0, 1, 5, h, d), rand(1, 1, 5, h, d), rand(2, 1, 5, h, 3)
    y = za.linear(q, k, v, causal=True, feature_map=m.feature_map_name, feature_map_params=m.params())
    w = hedgehog_weights(q, k, m.params(), causal=True, feature_map=m.feature_map_name, eps=0.0)
    assert_close(y, jnp.einsum("bhij,bjhe->bihe", w, v), atol=1e-5, rtol=1e-4, what="quadratic == linear")


def test_hedgehog_weights_rows_and_mask():
    q, k = rand(0, 2, 6, 2, 4), rand(1, 2, 6, 2, 4)
    w = hedgehog_weights(q, k, za.feature_maps.hedgehog_init(None, 4, heads=2), causal=True)
    assert_close(jnp.sum(w, -1), np.ones((2, 2, 6)), atol=1e-5)
    assert np.all(np.asarray(w)[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0.0)


def test_hedgehog_distillation_reduces_loss_and_bounds():
    h, d = 2, 4
    q, k = rand(0, 2, 8, h, d, scale=1.5), rand(1, 2, 8, h, d, scale=1.5)
    fmap = HedgehogFeatureMap(h, d, rngs=_rngs())
    opt = nnx.Optimizer(fmap, optax.adam(5e-2), wrt=nnx.Param)

    def loss_fn(m):
        return hedgehog_distillation_loss(q, k, m.params(), causal=True)

    @nnx.jit
    def train_step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    l0, ent = hedgehog_distillation_loss(q, k, fmap.params(), causal=True, return_teacher_entropy=True)
    losses = [float(train_step(fmap, opt)) for _ in range(15)]
    l_end = float(loss_fn(fmap))
    assert np.isfinite(losses).all() and l_end < float(l0) - 1e-3, (float(l0), l_end)
    assert l_end >= float(ent) - 1e-6 and float(l0) >= float(ent) - 1e-6  # Gibbs: xent >= teacher entropy
    # equality iff the distributions match: the teacher against itself through the entropy path
    t = diag.softmax_weights(q, k, causal=True)
    assert_close(jnp.mean(diag.row_entropy(t)), ent, atol=1e-6)


# ============================================================================ diagnostics


def _np_entropy(w):
    w = np.asarray(w, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(w > 0, w * np.log(w), 0.0).sum(-1)


def test_attention_diagnostics_outputs_unchanged_and_sown_stats():
    q, k, v = rand(0, 2, 7, 2, 4), rand(1, 2, 7, 1, 4), rand(2, 2, 7, 1, 3)
    plain = diag.AttentionDiagnostics("softmax")
    on = diag.AttentionDiagnostics("softmax", enabled=True, entropy_coef=0.5)
    y0, none = nnx.capture(plain, nnx.Intermediate)(q, k, v, causal=True)
    y1, sown = nnx.capture(on, nnx.Intermediate)(q, k, v, causal=True)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(za.softmax(q, k, v, causal=True)))
    assert not none
    w = np.asarray(sown["attention_weights"].get_value()[0], np.float64)
    # independent numpy weights and entropy
    kk = np.repeat(np.asarray(k, np.float64), 2, axis=2)
    lg = np.einsum("bihd,bjhd->bhij", np.asarray(q, np.float64), kk) / 2.0
    lg = np.where(np.tril(np.ones((7, 7), bool)), lg, -np.inf)
    ref = np.exp(lg - lg.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert_close(w, ref, atol=1e-6, what="weights")
    ent = sown["attention_entropy"].get_value()[0]
    assert_close(ent, _np_entropy(ref).mean(axis=(0, 2)), atol=1e-5, what="entropy")
    alpha = np.array([[ref[:, h, k:, k].mean(-1).mean(0) for k in range(7)] for h in range(2)])
    assert_close(sown["sink_scores"].get_value()[0], alpha, atol=1e-6, what="sink scores")
    assert_close(sown["entropy_loss"].get_value()[0], -0.5 * _np_entropy(ref).mean(), atol=1e-5, what="AEM term")
    on.enabled = False
    assert not nnx.capture(on, nnx.Intermediate)(q, k, v, causal=True)[1]


@pytest.mark.slow  # CI time; run with -m slow
def test_attention_weights_of_any_transform_and_sinks():
    q, k, v = rand(0, 1, 6, 2, 4), rand(1, 1, 6, 2, 4), rand(2, 1, 6, 2, 3)
    for name in ("linear", "flow", "sigmoid", "based"):
        w = diag.attention_weights(name, q, k, causal=True)
        assert_close(jnp.einsum("bhij,bjhe->bihe", w, v), za.get(name)(q, k, v, causal=True), atol=2e-5, what=name)
    # a head that puts 0.9 of every row on the first token is a sink head; uniform is not
    t = 10
    sink = np.tril(np.full((t, t), 0.1 / np.maximum(np.arange(t)[:, None], 1)))
    sink[:, 0] = 0.9
    sink[0, 0] = 1.0
    uni = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    w = jnp.asarray(np.stack([sink, uni])[None], jnp.float32)  # [1, 2, T, T]
    np.testing.assert_array_equal(np.asarray(diag.sink_heads(w)), [True, False])
    assert_close(diag.sink_ratio(w), 0.5, atol=0.0)
    g = jax.grad(lambda ww: diag.entropy_regularizer(ww, coef=1.0, target=1.0))(w)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match="weights"):
        diag.attention_entropy(jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="array-valued"):
        diag.AttentionDiagnostics("softmax", bias=jnp.zeros((1,)))


# ============================================================================ positional attention


def _load_positional(layer, fx):
    for key, val in split_qk_proj(fx["qk_proj_weight"], fx["qk_proj_bias"], int(fx["num_heads"])).items():
        _set(getattr(layer, key), val)
    for name in ("v_proj", "o_proj"):
        _set(getattr(layer, name).kernel, fx[f"{name}_weight"].T)
        _set(getattr(layer, name).bias, fx[f"{name}_bias"])


def test_positional_layer_fixture_parity():
    fx = fixture("positional_attention_layer")
    h, p = int(fx["num_heads"]), int(fx["pos_dim"])
    layer = PositionalAttention(fx["x"].shape[-1], h, p, rngs=_rngs())
    _load_positional(layer, fx)
    # the fused qk_proj layout: row h*2P + j -> W_Q[h][j] (j < P), W_K[h][j - P]
    assert_close(np.transpose(layer.q_kernel[...], (0, 2, 1)), f32(fx["W_Q"]), atol=0.0)
    assert_close(np.transpose(layer.k_kernel[...], (0, 2, 1)), f32(fx["W_K"]), atol=0.0)
    assert_close(layer.q_bias[...], f32(fx["b_Q"]), atol=0.0)
    assert_close(layer.attention_weights(f32(fx["p"]), causal=False), fx["attn_weights_derived"], atol=TOL, what="A")
    assert_close(layer(f32(fx["x"]), f32(fx["p"]), causal=False), fx["out"], atol=TOL, what="layer out")
    _all_params_named(layer)


def test_positional_block_fixture_parity():
    fx = fixture("positional_attention_block")
    blk = PositionalAttentionBlock(fx["x"].shape[-1], int(fx["num_heads"]), int(fx["pos_dim"]),
                                   int(fx["mlp_hidden_dim"]), rngs=_rngs())
    _load_positional(blk.attn, fx)
    for i, name in ((0, "mlp0"), (1, "mlp2")):
        _set(blk.mlp[i].kernel, fx[f"{name}_weight"].T)
        _set(blk.mlp[i].bias, fx[f"{name}_bias"])
    x, p = f32(fx["x"]), f32(fx["p"])
    assert_close(blk.attn(x, p, causal=False), fx["attn_out"], atol=TOL, what="attn_out")
    assert_close(blk(x, p, causal=False), fx["out"], atol=TOL, what="block out")


def test_positional_weights_input_independent_and_affine():
    layer = PositionalAttention(8, 2, 5, record=True, rngs=_rngs())
    x1, x2 = rand(0, 3, 5, 8), rand(1, 3, 5, 8, scale=10.0)
    sown = nnx.capture(lambda m: (m(x1), m(x2)), nnx.Intermediate)(layer)[1]["attn_weights"].get_value()
    np.testing.assert_array_equal(np.asarray(sown[0]), np.asarray(sown[1]))
    # one layer is affine in X: f(a x1 + (1 - a) x2) = a f(x1) + (1 - a) f(x2)
    a = 0.3
    assert_close(layer(a * x1 + (1 - a) * x2), a * layer(x1) + (1 - a) * layer(x2), atol=1e-4)
    a_causal = np.asarray(layer.attention_weights(jnp.eye(5), causal=True))
    assert np.all(a_causal[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0.0)
    with pytest.raises(ValueError, match="p must be"):
        layer(x1, jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="p must be given"):
        PositionalAttention(8, 2, 7, rngs=_rngs())(x1)


# ============================================================================ Aaren / Flow layers


def test_aaren_layer_decode_matches_forward_and_mask():
    layer = AarenLayer(8, 2, activation="silu", rngs=_rngs())
    x = rand(0, 2, 7, 8)
    y = layer(x)
    assert y.shape == (2, 7, 8)
    assert_close(_decode_all(layer, x, layer.init_state(2)), y, atol=2e-6, what="decode == forward")
    seq = AarenLayer(8, 2, impl="sequential", rngs=_rngs())
    assert_close(seq(x), layer.__class__(8, 2, rngs=_rngs())(x), atol=2e-6, what="sequential == associative")
    mask = np.ones((2, 7), bool)
    mask[:, 5:] = False  # trailing padding does not change earlier outputs
    assert_close(layer(x, mask=mask)[:, :5], y[:, :5], atol=1e-6)
    g = _grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(nnx.state(g, nnx.Param)))
    assert np.abs(np.asarray(g["query"][...])).max() > 0  # the learned query gets gradients
    _all_params_named(layer)
    with pytest.raises(ValueError, match="causal"):
        layer(x, causal=False)
    with pytest.raises(ValueError, match="x must be"):
        layer(rand(0, 2, 7, 6))
    with pytest.raises(ValueError, match="x_t"):
        layer.decode_step(rand(0, 2, 6), layer.init_state(2))


def test_flow_layer_matches_fixtures_with_selection_projections():
    # x = [q | k | v] and 0/1 projections selecting each block, W_o selecting the heads back:
    # the layer then computes exactly the fixture's Flow-Attention core.
    for causal in (False, True):
        fx = fixture("flow_attention_causal" if causal else "flow_attention_noncausal")
        b, t, h, d = fx["q"].shape
        c = h * d
        layer = FlowAttentionLayer(3 * c, h, head_dim=d, rngs=_rngs())
        sel = np.zeros((3, 3 * c, h, d))
        for i in range(3):
            sel[i, i * c:(i + 1) * c] = np.eye(c).reshape(c, h, d)
        for i, n in enumerate("qkv"):
            _set(getattr(layer, f"w{n}"), sel[i])
        _set(layer.wo, sel[0].reshape(3 * c, c).T.reshape(h, d, 3 * c))
        x = np.concatenate([fx[n].reshape(b, t, c) for n in "qkv"], -1)
        y = layer(f32(x), causal=causal)[..., :c]
        assert_close(y, fx["out"].reshape(b, t, c), atol=TOL, what=f"flow layer causal={causal}")
    assert layer(f32(x), causal=False, context=f32(x[:, :5])).shape == x.shape


def test_flow_layer_decode_matches_forward():
    layer = FlowAttentionLayer(8, 2, rngs=_rngs())
    x = rand(0, 2, 9, 8)
    y = layer(x, causal=True)
    assert_close(_decode_all(layer, x, layer.init_state(2)), y, atol=2e-6, what="decode == forward")
    x2 = np.array(x)
    x2[:, 6:] += 5.0  # causality
    assert_close(layer(jnp.asarray(x2), causal=True)[:, :6], y[:, :6], atol=1e-6)
    g = _grad(lambda m: jnp.sum(m(x, causal=False) ** 2))(layer)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(nnx.state(g, nnx.Param)))
    _all_params_named(layer)
    with pytest.raises(ValueError, match="context"):
        layer(x, x[:, :5], causal=True)  # causal cross-attention needs x's length
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=jnp.ones((2, 9), bool))
    with pytest.raises(ValueError, match="x must be a floating point"):
        layer(jnp.ones((2, 9, 8), jnp.int32))
    # prefill continuing a state == the causal forward
    y1, st = layer.prefill(x[:, :4], layer.init_state(2))
    y2, _ = layer.prefill(x[:, 4:], st, 4)
    assert_close(jnp.concatenate([y1, y2], 1), y, atol=2e-6, what="prefill, prefill == forward")


def test_flow_layer_is_multi_head_attention_with_flow():
    """FlowAttentionLayer (no dropout) computes MultiHeadAttention(transform="flow", use_bias=True):
    the same mechanism, hence one mixer name ("flow"); causal, non-causal and cross-attention."""
    layer = FlowAttentionLayer(8, 2, eps=1e-5, clamp=2.0, rngs=_rngs(1))
    mha = znn.MultiHeadAttention(2, 8, transform="flow", use_bias=True, transform_kwargs={"eps": 1e-5, "clamp": 2.0},
                                 rngs=_rngs(2))
    for n in "qkv":
        _set(getattr(mha, f"{n}_proj"), getattr(layer, f"w{n}")[...])
        _set(getattr(mha, f"{n}_bias"), rand(ord(n), 2, 4))
        _set(getattr(layer, f"b{n}"), getattr(mha, f"{n}_bias")[...])
    _set(mha.o_proj, layer.wo[...])
    _set(layer.bo, rand(9, 8))
    _set(mha.o_bias, layer.bo[...])
    x, c = rand(0, 2, 6, 8), rand(1, 2, 4, 8)
    for args, causal in (((x,), True), ((x,), False), ((x, c), False)):
        assert_close(layer(*args, causal=causal), mha(*args, causal=causal), atol=1e-6, what=f"causal={causal}")
    assert "flow_layer" not in znn.mixer_names()


# ============================================================================ NaLaFormer


def test_nalaformer_module_fixture_parity():
    fx = fixture("nala_module_full")
    c, h = int(fx["dim"]), int(fx["num_heads"])
    hw = tuple(int(v) for v in fx["image_hw"])
    sin, cos = rope_grid(hw, c // h)
    assert_close(sin, fx["sin"], atol=1e-6)
    assert_close(cos, fx["cos"], atol=1e-6)
    assert_close(rope_angles(c // h), fx["rope_angle"], atol=1e-7)
    m = NaLaFormerAttention(c, h, rngs=_rngs())
    for mod, name in ((m.qkvg, "qkvg"), (m.out_proj, "out_proj")):
        _set(mod.kernel, fx[f"p_{name}_weight"].T)
        _set(mod.bias, fx[f"p_{name}_bias"])
    _set(m.lepe.kernel, np.transpose(fx["p_lepe_weight"], (2, 3, 1, 0)))
    _set(m.lepe.bias, fx["p_lepe_bias"])
    _set(m.ln.scale, fx["p_ln_weight"])
    _set(m.ln.bias, fx["p_ln_bias"])
    x = f32(np.transpose(fx["x"], (0, 2, 3, 1)))  # NCHW -> NHWC
    ref = np.transpose(fx["out"], (0, 2, 3, 1))
    # measured: 2.2e-7 (the official float32 path itself is 2.2e-7 from the float64 oracle)
    assert_close(m(x, causal=False), ref, atol=TOL, what="NaLa module out")  # the vision module: non-causal
    tokens = m(x.reshape(x.shape[0], -1, c), hw=hw, causal=False)
    assert_close(tokens.reshape(ref.shape), ref, atol=TOL, what="token layout")
    _all_params_named(m)


def test_nalaformer_causal_decode_and_errors():
    m = NaLaFormerAttention(16, 2, lepe=False, rngs=_rngs())
    x = rand(0, 2, 7, 16)
    y = m(x, causal=True)
    assert_close(_decode_all(m, x, m.init_state(2)), y, atol=2e-6, what="decode == causal forward")
    x2 = np.array(x)
    x2[:, 5:] = 3.0
    assert_close(m(jnp.asarray(x2), causal=True)[:, :5], y[:, :5], atol=1e-6)
    g = _grad(lambda mod: jnp.sum(mod(x, hw=(1, 7)) ** 2))(m)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(nnx.state(g, nnx.Param)))
    with pytest.raises(ValueError, match="lepe"):
        NaLaFormerAttention(16, 2, rngs=_rngs())(x, causal=True)
    with pytest.raises(ValueError, match="divisible by 4"):
        NaLaFormerAttention(12, 2, rngs=_rngs())
    with pytest.raises(ValueError, match="hw"):
        m(x, hw=(2, 3))


# ============================================================================ registry, eval_shape


@pytest.mark.parametrize("build", [
    lambda r: SigmaReparamDense(8, 4, rngs=r),
    lambda r: MoHAttention(16, 4, num_shared=2, top_k=1, attention="cosine", cpb=True, rngs=r),
    lambda r: HedgehogFeatureMap(2, 4, rngs=r),
    lambda r: PositionalAttentionBlock(8, 2, 5, 16, rngs=r),
    lambda r: AarenLayer(8, 2, rngs=r),
    lambda r: FlowAttentionLayer(8, 2, rngs=r),
    lambda r: NaLaFormerAttention(16, 2, rngs=r),
], ids=["sigma", "moh", "hedgehog", "positional", "aaren", "flow", "nala"])
def test_eval_shape_builds_without_allocating(build):
    abstract = nnx.eval_shape(lambda: build(_rngs()))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    _all_params_named(abstract)
