"""MultiHeadAttention(sigma_reparam=True): every projection used as (gamma / sigma(W)) W (Zhai et
al., ICML 2023). The references compute sigma with numpy's SVD and the attention in float64 numpy,
independently of the module's code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.models.lm import DecoderLM
from zoo.nn import MultiHeadAttention
from zoo.nn.attention import build_mixer
from zoo.train_lib import model_kwargs

E, H, D, B, T = 12, 3, 4, 2, 7
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _np_sigma(w: np.ndarray, fan_in_axes: int) -> float:
    m = np.asarray(w, np.float64).reshape(int(np.prod(w.shape[:fan_in_axes])), -1)
    return float(np.linalg.svd(m, compute_uv=False)[0])


def _randomize(m: MultiHeadAttention, seed: int) -> dict:
    """Random kernels (of varied scale) and gammas; returns them as float64 numpy arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(m._projections()):
        w = rng.standard_normal(getattr(m, name)[...].shape) * (0.3 + 0.4 * i)
        getattr(m, name)[...] = jnp.asarray(w, jnp.float32)
        g = rng.uniform(0.5, 2.0)
        m.sigma_gamma[name][...] = jnp.asarray(g, jnp.float32)
        out[name] = np.asarray(w, np.float32).astype(np.float64)
        out[name + "_gamma"] = float(np.float32(g))
    return out


def _reference(x: np.ndarray, p: dict, *, gate: bool = False) -> np.ndarray:
    """Causal softmax attention with W_hat = gamma W / sigma_max(W) (sigma from numpy's SVD)."""
    hat = {}
    for name in KERNELS + (("gate_proj",) if gate else ()):
        w = p[name]
        hat[name] = p[name + "_gamma"] * w / _np_sigma(w, 2 if name == "o_proj" else 1)
    x = x.astype(np.float64)
    q = np.einsum("bte,ehd->bthd", x, hat["q_proj"])
    k = np.einsum("bte,ehd->bthd", x, hat["k_proj"])
    v = np.einsum("bte,ehd->bthd", x, hat["v_proj"])
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bhij,bjhd->bihd", a, v)
    if gate:
        y = y / (1.0 + np.exp(-np.einsum("bte,ehd->bthd", x, hat["gate_proj"])))
    return np.einsum("bthd,hde->bte", y, hat["o_proj"])


@pytest.mark.parametrize("gate", [False, True])
def test_output_uses_gamma_w_over_svd_sigma(gate):
    m = MultiHeadAttention(H, E, sigma_reparam=True, output_gate=gate, rngs=nnx.Rngs(0))
    p = _randomize(m, 1)
    x = np.random.default_rng(2).standard_normal((B, T, E)).astype(np.float32)
    got = np.asarray(m(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got, _reference(x, p, gate=gate), rtol=1e-4, atol=1e-5)
    # the same module without the reparametrisation computes something else (the test can fail)
    plain = MultiHeadAttention(H, E, output_gate=gate, rngs=nnx.Rngs(0))
    for name in m._projections():
        getattr(plain, name)[...] = getattr(m, name)[...]
    assert np.max(np.abs(np.asarray(plain(jnp.asarray(x))) - got)) > 1e-2


def test_init_gamma_is_sigma_so_the_layer_starts_as_the_plain_one():
    m = MultiHeadAttention(H, E, sigma_reparam=True, rngs=nnx.Rngs(3))
    plain = MultiHeadAttention(H, E, rngs=nnx.Rngs(3))
    for name in KERNELS:
        w = np.asarray(getattr(m, name)[...])
        np.testing.assert_allclose(float(m.sigma_gamma[name][...]), _np_sigma(w, 2 if name == "o_proj" else 1),
                                   rtol=1e-5)
        np.testing.assert_array_equal(w, np.asarray(getattr(plain, name)[...]))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, E)), jnp.float32)
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(plain(x)), rtol=1e-4, atol=1e-5)
    assert {k for k, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))} - {
        k for k, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))} == {("sigma_gamma", n) for n in KERNELS}


def test_output_is_invariant_to_kernel_scale_and_gradient_flows_through_sigma():
    """W_hat does not change when W is scaled, so the gradient w.r.t. W is orthogonal to W:
    <dL/dW, W> = 0 (it would not be if sigma were treated as a constant)."""
    m = MultiHeadAttention(H, E, sigma_reparam=True, rope=True, rngs=nnx.Rngs(5))
    _randomize(m, 6)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, E)), jnp.float32)
    y = np.asarray(m(x))
    m.k_proj[...] = m.k_proj[...] * 3.0
    np.testing.assert_allclose(np.asarray(m(x)), y, rtol=1e-4, atol=1e-5)

    def loss(params, rest):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(x)))

    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    grads = jax.grad(loss)(params, rest)
    for name in KERNELS:
        g = np.asarray(grads[name][...], np.float64).ravel()
        w = np.asarray(params[name][...], np.float64).ravel()
        assert np.linalg.norm(g) > 1e-3
        assert abs(g @ w) < 1e-4 * np.linalg.norm(g) * np.linalg.norm(w)
        # the scale of W_hat is learned through gamma: dL/dgamma = <dL/dW_hat, W_hat> / gamma
        assert abs(float(grads["sigma_gamma"][name][...])) > 0


@pytest.mark.slow  # CI time; run with -m slow
def test_decode_and_prefill_equal_forward():
    m = MultiHeadAttention(H, E, sigma_reparam=True, rope=True, rngs=nnx.Rngs(8))
    _randomize(m, 9)
    x = jnp.asarray(np.random.default_rng(10).standard_normal((B, T, E)), jnp.float32)
    want = np.asarray(m(x))
    st = m.init_state(B, T)
    ys = []
    for t in range(T):
        y, st = m.decode_step(x[:, t], st, t)
        ys.append(np.asarray(y))
    np.testing.assert_allclose(np.stack(ys, 1), want, rtol=1e-4, atol=1e-5)
    st = m.init_state(B, T)
    y1, st = m.prefill(x[:, :4], st, 0)
    y2, _ = m.prefill(x[:, 4:], st, 4)
    np.testing.assert_allclose(np.concatenate([np.asarray(y1), np.asarray(y2)], 1), want, rtol=1e-4, atol=1e-5)


def test_option_reaches_every_layer_from_a_mixer_spec_and_the_model_config():
    mixer = build_mixer({"transform": "softmax", "sigma_reparam": True}, E, rngs=nnx.Rngs(0), num_heads=H)
    assert mixer.sigma_reparam and set(mixer.sigma_gamma) == set(KERNELS)
    kw = model_kwargs({"name": "decoder_lm", "mixer": "softmax", "mixer_options": {"sigma_reparam": True},
                       "d_model": E, "num_layers": 2, "num_heads": H})
    lm = DecoderLM(17, rngs=nnx.Rngs(0), **kw)
    assert all(blk.mixer.sigma_reparam for blk in lm.blocks)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 17, (B, T)), jnp.int32)
    assert np.all(np.isfinite(np.asarray(lm(tokens))))
    default = DecoderLM(17, E, 2, H, rngs=nnx.Rngs(0))
    assert not any(blk.mixer.sigma_reparam for blk in default.blocks)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_sigma_reparam_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="sigma_reparam"):
        MultiHeadAttention(H, E, sigma_reparam=bad, rngs=nnx.Rngs(0))
