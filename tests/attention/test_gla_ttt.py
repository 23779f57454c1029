"""GLA (per-channel decay) and TTT-Linear/MLP against the fixtures of the reference code
(tests/fixtures/gla_ttt/PROVENANCE.md: flash-linear-attention's naive.py run with PyTorch, and
the official ttt-lm-jax ``process_mini_batch``), plus the limits the shared suite cannot reach
(per-channel decays need batch and length)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from zoo.attention.ttt import TTTState

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "gla_ttt"
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 against float32 PyTorch / JAX references


def load(name):
    return {k: jnp.asarray(v) for k, v in np.load(FIX / f"{name}.npz").items()}


# ----------------------------------------------------------------------------- GLA


@pytest.mark.parametrize("impl,chunk", [("chunked", 4), ("scan", None)])
def test_gla_matches_fla_naive(impl, chunk):
    """fla's ``naive_recurrent_gla`` scales q by K^-0.5 and takes log-decays ``gk``: zoo rates
    are ``-gk``. Output, final state and every gradient (the decay's through learn_decay)."""
    d = load("gla_fla")
    scale = d["q"].shape[-1] ** -0.5

    def run(q, k, v, gk, h0, fn):
        state = za.linear_init_state(2, 3, 5, 7)._replace(S=h0)
        o, st = fn(q, k, v, causal=True, feature_map="identity", normalize=False, decay=-gk, learn_decay=True,
                   scale=scale, initial_state=state, return_state=True,
                   **({} if fn is za.linear_naive else dict(impl=impl, chunk_size=chunk)))
        return o, st.S

    args = tuple(d[n] for n in ("q", "k", "v", "gk", "h0"))
    o, ht = run(*args, za.linear)
    np.testing.assert_allclose(o, d["o"], **TOL)
    np.testing.assert_allclose(ht, d["ht"], **TOL)
    loss = lambda *a: sum(jnp.sum(x * c) for x, c in zip(run(*a, za.linear), (d["do"], d["dht"])))
    grads = jax.grad(loss, argnums=range(5))(*args)
    for name, g in zip(("dq", "dk", "dv", "dgk", "dh0"), grads):
        np.testing.assert_allclose(g, d[name], err_msg=name, **TOL)


def _gla_inputs(rates):
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    b, t, h, f, e = 2, 11, 2, 4, 3
    q, k = (jax.random.normal(x, (b, t, h, f)) for x in ks[:2])
    v = jax.random.normal(ks[2], (b, t, h, e))
    return q, k, v, jnp.broadcast_to(jnp.asarray(rates, jnp.float32), (b, t, h, f))


@pytest.mark.parametrize("kind", ["zero", "inf", "mixed", "large"])
def test_gla_limits_finite_and_exact(kind):
    """Per-channel rates 0 (no decay), +inf (reset), a mix, and large finite ones (the factor
    underflows: 50 per token over a chunk of 8 is e^-400) agree with the naive form, finite."""
    base = {"zero": 0.0, "inf": jnp.inf, "large": 50.0}.get(kind)
    if base is None:
        r = jax.random.uniform(jax.random.PRNGKey(1), (2, 11, 2, 4), maxval=3.0)
        base = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(2), 0.2, r.shape), jnp.inf, r)
        base = base.at[:, :, :, 0].set(0.0)
    q, k, v, rates = _gla_inputs(base)
    opts = dict(causal=True, feature_map="identity", normalize=False, decay=rates)
    ref = za.linear_naive(q, k, v, **opts)
    assert bool(jnp.all(jnp.isfinite(ref)))
    for impl, c in (("chunked", 4), ("scan", None)):
        out = za.linear(q, k, v, impl=impl, chunk_size=c, **opts)
        assert bool(jnp.all(jnp.isfinite(out)))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {c}")


def test_gla_step_per_channel_decodes_as_parallel():
    q, k, v, rates = _gla_inputs(jax.random.uniform(jax.random.PRNGKey(4), (2, 11, 2, 4), maxval=2.0))
    opts = dict(feature_map="identity", normalize=False)
    full = za.linear(q, k, v, causal=True, decay=rates, **opts)
    state = za.linear_init_state(2, 2, 4, 3)
    for t in range(q.shape[1]):
        y, state = za.linear_step(state, q[:, t], k[:, t], v[:, t], decay=rates[:, t], **opts)
        np.testing.assert_allclose(y, full[:, t], rtol=1e-5, atol=1e-5)


def test_gla_bf16_close_to_float32():
    q, k, v, rates = _gla_inputs(jax.random.uniform(jax.random.PRNGKey(5), (2, 11, 2, 4), maxval=1.0))
    opts = dict(causal=True, feature_map="identity", normalize=False, decay=rates, impl="chunked", chunk_size=4)
    ref = za.linear(q, k, v, **opts)
    low = za.linear(*(x.astype(jnp.bfloat16) for x in (q, k, v)), **opts)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), ref, rtol=0.05, atol=0.05)


def test_gla_bad_decay_shape_names_argument():
    q, k, v, _ = _gla_inputs(0.0)
    with pytest.raises(ValueError, match="decay must be"):
        za.linear(q, k, v, causal=True, feature_map="identity", decay=jnp.zeros((2, 11, 2, 5)))


# ----------------------------------------------------------------------------- TTT


def _fla_state(d):
    b, h, dk, dv = d["h0"].shape
    zw, zb = jnp.zeros((b, h, dk, dv)), jnp.zeros((b, h, dv))
    return TTTState((d["h0"],), (d["hb0"][:, :, 0],), (zw,), (zb,), jnp.int32(0))


@pytest.mark.parametrize("fn", ["ttt", "ttt_naive"])
def test_ttt_linear_matches_fla(fn):
    """fla's ``chunk_ttt_linear_ref``: the inner output residual (``residual="inner"``), a
    row-only rate (``eta=1``, ``token_scale=eta_t``), q scaled by ``scale``. Outputs, final
    weights and bias, and every gradient."""
    d = load("ttt_linear_fla")
    f = getattr(za, fn)

    def run(q, k, v, w, b, eta, h0, hb0):
        st = _fla_state(dict(h0=h0, hb0=hb0))
        o, s = f(q, k, v, eta=1.0, token_scale=eta[..., 0], ln_weight=w, ln_bias=b, scale=float(d["scale"]),
                 eps=float(d["eps"]), residual="inner", chunk_size=int(d["chunk_size"]), initial_state=st,
                 return_state=True, causal=True)
        return o, s.weights[0], s.biases[0][:, :, None]

    names = ("q", "k", "v", "w", "b", "eta", "h0", "hb0")
    args = tuple(d[n] for n in names)
    o, ht, hbt = run(*args)
    np.testing.assert_allclose(o, d["o"], **TOL)
    np.testing.assert_allclose(ht, d["ht"], **TOL)
    np.testing.assert_allclose(hbt, d["hbt"], **TOL)
    cots = (d["do"], d["dht"], d["dhbt"])
    grads = jax.grad(lambda *a: sum(jnp.sum(x * c) for x, c in zip(run(*a), cots)), argnums=range(8))(*args)
    for n, g in zip(names, grads):
        np.testing.assert_allclose(g, d[f"d{n}"], err_msg=n, **TOL)


def test_ttt_linear_ragged_outputs_match_fla():
    """A ragged last mini-batch: the outputs agree. (fla pads with zero tokens whose bias
    gradient is not zero and copies the last rate onto the padding, so its final *bias* has
    the padding's updates; zoo's padding changes nothing: the final state is compared with a
    fixture-free check, decoding, in the shared suite.)"""
    d = load("ttt_linear_fla_ragged")
    o = za.ttt(d["q"], d["k"], d["v"], eta=1.0, token_scale=d["eta"][..., 0], ln_weight=d["w"], ln_bias=d["b"],
               scale=float(d["scale"]), eps=float(d["eps"]), residual="inner", chunk_size=int(d["chunk_size"]),
               initial_state=_fla_state(d), causal=True)
    np.testing.assert_allclose(o, d["o"], **TOL)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_ttt_matches_official(kind):
    """The official ttt-lm-jax ``process_mini_batch`` (paper residual ``x + LN(g(x))``), its
    ``get_eta``: ``eta_ts = base_lr * max(0, 1/t + lambda_t) * sigmoid(lr_logit_s) / d``."""
    d = load(f"ttt_{kind}_official")
    depth = 1 if kind == "linear" else 2
    wn = ("W1",) if depth == 1 else ("W1", "W2")
    bn = ("b1",) if depth == 1 else ("b1", "b2")
    c = int(d["chunk_size"])
    dk = d["q"].shape[-1]

    def run(q, k, v, ws, bs, ln_w, ln_b, lr_logit, idx):
        tau = jnp.maximum(1.0 / jnp.arange(1, c + 1) + idx, 0.0)
        return za.ttt(q, k, v, eta=float(d["base_lr"]) * jax.nn.sigmoid(lr_logit) / dk, token_scale=tau,
                      weights=ws, biases=tuple(b[:, 0] for b in bs), ln_weight=ln_w, ln_bias=ln_b, depth=depth,
                      residual="query", chunk_size=c, causal=True, return_state=True)

    args = (d["q"], d["k"], d["v"], tuple(d[n] for n in wn), tuple(d[n] for n in bn), d["ln_scale"],
            d["ln_bias"], d["lr_logit"], d["token_idx_learned"])
    o, st = run(*args)
    np.testing.assert_allclose(o, d["o"], **TOL)
    for n, w in zip(wn, st.weights):
        np.testing.assert_allclose(w, d[f"final_{n}"], err_msg=n, **TOL)
    for n, b in zip(bn, st.biases):
        np.testing.assert_allclose(b, d[f"final_{n}"][:, :, 0], err_msg=n, **TOL)
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0] * d["cot"]), argnums=range(9))(*args)
    gq, gk, gv, gw, gb, gln_w, gln_b, glr, gidx = grads
    for name, g in (("dq", gq), ("dk", gk), ("dv", gv), ("dln_scale", gln_w), ("dln_bias", gln_b),
                    ("dlr_logit", glr), ("dtoken_idx_learned", gidx)):
        np.testing.assert_allclose(g, d[name], err_msg=name, **TOL)
    for n, g in zip(wn, gw):
        np.testing.assert_allclose(g, d[f"d{n}"], err_msg=n, **TOL)
    for n, g in zip(bn, gb):
        np.testing.assert_allclose(g, d[f"d{n}"], err_msg=n, **TOL)


def test_ttt_bad_input_names_argument():
    q = jnp.ones((1, 4, 2, 4))
    with pytest.raises(ValueError, match="causal"):
        za.ttt(q, q, q, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="eta"):
        za.ttt(q, q, q, eta=-1.0, key=jax.random.PRNGKey(0), causal=True)
    with pytest.raises(ValueError, match="residual"):
        za.ttt(q, q, q, residual="bogus", key=jax.random.PRNGKey(0), causal=True)


@pytest.mark.parametrize("chunk", [pytest.param(32, marks=pytest.mark.slow)])  # conformance: gla grads in CI
def test_gla_chunked_gradient_equals_scan(chunk):
    """Longer than one 16-token chunk (chunk_size above 16 means 16): the chunked form's
    gradient equals the scan's (whose VJP is the chunked one's: so also against the naive)."""
    ks = jax.random.split(jax.random.PRNGKey(6), 4)
    q, k, v = (jax.random.normal(x, (1, 21, 2, 3)) for x in ks[:3])
    rates = jax.random.uniform(ks[3], (1, 21, 2, 3), maxval=1.0)
    opts = dict(causal=True, feature_map="identity", normalize=False, decay=rates, learn_decay=True)
    loss = lambda f, **o: jax.grad(lambda q, k, v, r: jnp.sum(jnp.sin(f(q, k, v, **{**opts, "decay": r}, **o))),
                                   argnums=range(4))(q, k, v, rates)
    want = loss(za.linear_naive)
    for got in (loss(za.linear, impl="chunked", chunk_size=chunk), loss(za.linear, impl="scan")):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
