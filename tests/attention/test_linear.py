"""Linear attention: every form equals the naive masked quadratic reference, plus fixtures.

Tolerances (float32): forms vs reference 2e-5 abs + 2e-5 rel on outputs (sums of <= 64 terms of
O(1) values); gradients 1e-4 abs + 1e-4 rel. Fixture parity (float64 oracle, our float32):
1e-5 abs + 1e-5 rel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, f32, fixture, rand, tree_assert_close

TOL = dict(atol=2e-5, rtol=2e-5)
GTOL = dict(atol=1e-4, rtol=1e-4)


def qkv(b=2, t=37, h=4, hk=4, d=8, e=8, seed=0, dtype=np.float32):
    return rand(seed, b, t, h, d, dtype=dtype), rand(seed + 1, b, t, hk, d, dtype=dtype), rand(
        seed + 2, b, t, hk, e, dtype=dtype
    )


DECAYS = {
    "none": None,
    "per_head": np.array([0.05, 0.3, 1.0, 3.0], np.float32),
    "per_token": np.random.default_rng(5).uniform(0.0, 2.0, (2, 37, 4)).astype(np.float32),
}


@pytest.mark.parametrize("impl", ["chunked", "scan"])
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("normalize", [True, False, pytest.param("mean", marks=pytest.mark.slow)])
def test_causal_forms_equal_reference(impl, decay, normalize):
    q, k, v = qkv()
    kw = dict(causal=True, decay=DECAYS[decay], normalize=normalize)
    ref = za.linear_naive(q, k, v, **kw)
    # chunk 8 with T=37: four full chunks and a ragged one of 5.
    out = za.linear(q, k, v, impl=impl, chunk_size=8, **kw)
    assert_close(out, ref, **TOL, what=f"{impl}/{decay}/{normalize}")


@pytest.mark.parametrize("chunk", [*(pytest.param(c, marks=pytest.mark.slow) for c in (1, 5)), 16, 37, 64])
def test_chunked_any_chunk_size(chunk):
    q, k, v = qkv(t=37)
    ref = za.linear_naive(q, k, v, causal=True, feature_map="taylor")
    out = za.linear(q, k, v, causal=True, feature_map="taylor", impl="chunked", chunk_size=chunk)
    assert_close(out, ref, **TOL, what=f"chunk {chunk}")


@pytest.mark.parametrize("impl, decay", [  # conformance checks every impl's gradients too
    ("chunked", "per_head"), *(pytest.param(i, d, marks=pytest.mark.slow)
                               for i, d in (("chunked", "none"), ("scan", "none"), ("scan", "per_head")))])
def test_gradients_equal_reference(impl, decay):
    q, k, v = qkv(t=19)
    dec = DECAYS[decay]
    w = rand(9, *v.shape)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    ref = jax.grad(lambda *a: loss(lambda q, k, v: za.linear_naive(q, k, v, causal=True, decay=dec), *a),
                   argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(lambda q, k, v: za.linear(q, k, v, causal=True, decay=dec, impl=impl,
                                                             chunk_size=4), *a), argnums=(0, 1, 2))(q, k, v)
    tree_assert_close(got, ref, **GTOL, what=f"grad {impl}")


@pytest.mark.slow  # left out of CI (README test command); run with -m slow
def test_gradient_wrt_decay_rates():
    """learn_decay=True: every form is differentiable in the rates and equals the reference."""
    q, k, v = qkv(t=13)
    rates = DECAYS["per_head"]
    f = lambda fn: jax.grad(lambda r: jnp.sum(fn(r) ** 2))(rates)
    ref = f(lambda r: za.linear_naive(q, k, v, causal=True, decay=r, learn_decay=True))
    assert np.all(np.abs(np.asarray(ref)) > 1e-3)
    for impl in ("chunked", "scan"):
        got = f(lambda r, impl=impl: za.linear(q, k, v, causal=True, decay=r, learn_decay=True, impl=impl,
                                               chunk_size=4))
        assert_close(got, ref, **GTOL, what=f"d/d decay {impl}")


@pytest.mark.parametrize("impl", [pytest.param("chunked", marks=pytest.mark.slow), "scan", "pallas", "naive"])
def test_decay_is_a_constant_by_default(impl):
    """learn_decay=False (default): no gradient flows to the decay in any form, so every
    implementation computes the same function and gradient (the kernel never differentiates it)."""
    q, k, v = qkv(b=1, t=9, h=4, d=4, e=4)
    rates = DECAYS["per_head"]
    fn = za.linear_naive if impl == "naive" else functools.partial(za.linear, impl=impl, chunk_size=4)
    g = jax.grad(lambda r: jnp.sum(fn(q, k, v, causal=True, decay=r) ** 2))(rates)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_noncausal_reference_and_gqa():
    q, k, v = qkv(h=4, hk=2)
    out = za.linear(q, k, v)
    ref = za.linear_naive(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
    assert_close(out, ref, **TOL, what="non-causal gqa")
    # Grouped-query heads: head h uses kv head h // 2.
    assert_close(za.linear(q[:, :, 2:3], k[:, :, 1:2], v[:, :, 1:2]), out[:, :, 2:3], **TOL)


def test_noncausal_different_lengths():
    q = rand(0, 2, 5, 2, 8)
    k, v = rand(1, 2, 11, 2, 8), rand(2, 2, 11, 2, 4)
    out = za.linear(q, k, v)
    assert out.shape == (2, 5, 2, 4)
    assert_close(out, za.linear_naive(q, k, v), **TOL)


@pytest.mark.parametrize("impl", ["chunked", "scan"])
def test_step_over_sequence_equals_parallel(impl):
    q, k, v = qkv(t=11, h=4, hk=2)
    dec = DECAYS["per_head"]
    par, final = za.linear(q, k, v, causal=True, decay=dec, impl=impl, chunk_size=4, return_state=True)
    state = za.linear_init_state(2, 4, 8, 8)
    outs = []
    for t in range(11):
        y, state = za.linear_step(state, q[:, t], k[:, t], v[:, t], decay=dec)
        outs.append(y)
    assert_close(jnp.stack(outs, 1), par, **TOL, what="step vs parallel")
    tree_assert_close(state, final, **TOL, what="final state")


@pytest.mark.slow  # left out of CI (README test command); run with -m slow
def test_chaining_with_state_equals_one_pass():
    q, k, v = qkv(t=30)
    dec = DECAYS["per_head"]
    full = za.linear(q, k, v, causal=True, decay=dec, impl="chunked", chunk_size=8, normalize="mean")
    a, st = za.linear(q[:, :13], k[:, :13], v[:, :13], causal=True, decay=dec, impl="chunked",
                      chunk_size=8, normalize="mean", return_state=True)
    b = za.linear(q[:, 13:], k[:, 13:], v[:, 13:], causal=True, decay=dec, impl="scan",
                  normalize="mean", initial_state=st)
    assert_close(jnp.concatenate([a, b], 1), full, **TOL)


@pytest.mark.parametrize("impl", ["chunked", "scan"])
def test_causality(impl):
    q, k, v = qkv(t=20)
    j = 12
    out = za.linear(q, k, v, causal=True, impl=impl, chunk_size=8)
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    q2[:, j:] += 3.0
    k2[:, j:] -= 2.0
    v2[:, j:] *= -5.0
    out2 = za.linear(q2, k2, v2, causal=True, impl=impl, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(out[:, :j]), np.asarray(out2[:, :j]))
    assert not np.allclose(np.asarray(out[:, j:]), np.asarray(out2[:, j:]))


def test_jit_vmap():
    q, k, v = qkv(t=16)
    f = jax.jit(lambda q, k, v: za.linear(q, k, v, causal=True, impl="chunked", chunk_size=4))
    assert_close(f(q, k, v), za.linear_naive(q, k, v, causal=True), **TOL)
    # vmap over an extra leading axis equals the batched call.
    vm = jax.vmap(lambda q, k, v: za.linear(q[None], k[None], v[None], causal=True)[0])(q, k, v)
    assert_close(vm, za.linear_naive(q, k, v, causal=True), **TOL)


@pytest.mark.parametrize("fm", ["elu", "taylor", "nalaformer"])
def test_bf16_finite_and_close(fm):
    q, k, v = qkv(t=64)
    ref = za.linear_naive(q, k, v, causal=True, feature_map=fm)
    out = za.linear(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), causal=True, feature_map=fm,
                    impl="chunked", chunk_size=16)
    assert out.dtype == jnp.bfloat16
    # bf16 inputs carry ~3 significant digits: relative 2e-2 as in benchmarks.md.
    assert_close(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2, what=f"bf16 {fm}")


@pytest.mark.slow  # left out of CI (README test command); run with -m slow
def test_long_sequence_decay_stays_finite():
    q, k, v = qkv(b=1, t=2048, h=2, hk=2, d=4, e=4)
    out = za.linear(q, k, v, causal=True, decay=np.array([0.0, 5.0], np.float32), impl="chunked",
                    normalize=False)
    assert np.all(np.isfinite(np.asarray(out)))


def test_alibi_slopes():
    np.testing.assert_allclose(np.asarray(za.alibi_slopes(8)), 2.0 ** (-np.arange(1, 9)), rtol=1e-6)
    s6 = np.asarray(za.alibi_slopes(6))
    assert s6.shape == (6,) and np.all(np.diff(s6[:4]) < 0)


# ----------------------------------------------------------------------------- fixtures


def test_fixture_fast_transformers_causal():
    fx = fixture("linear_attention_causal")
    q, k, v = f32(fx["q"], fx["k"], fx["v"])
    for impl in ("chunked", "scan"):
        out = za.linear(q, k, v, causal=True, eps=float(fx["eps"]), impl=impl, chunk_size=16)
        assert_close(out, fx["out"], atol=1e-5, rtol=1e-5, what=impl)


def test_fixture_fast_transformers_noncausal():
    fx = fixture("linear_attention_noncausal")
    out = za.linear(*f32(fx["q"], fx["k"], fx["v"]), eps=float(fx["eps"]))
    assert_close(out, fx["out"], atol=1e-5, rtol=1e-5)


def test_fixture_based_causal():
    fx = fixture("based_linear_attention_causal")
    q, k, v = f32(fx["q"], fx["k"], fx["v"])
    out = za.get("based")(q, k, v, causal=True, eps=float(fx["eps"]), impl="chunked", chunk_size=8)
    assert_close(out, fx["out"], atol=1e-5, rtol=1e-5)


def test_fixture_hedgehog_fla_causal():
    fx = fixture("hedgehog_linear_attention_causal")
    q, k, v = f32(fx["q"], fx["k"], fx["v"])
    # fla stores torch Linear weights [out, in]; ours are [in, out].
    params = ({"weight": f32(fx["weight_q"]).T, "bias": f32(fx["bias_q"])},
              {"weight": f32(fx["weight_k"]).T, "bias": f32(fx["bias_k"])})
    out = za.get("hedgehog")(q, k, v, causal=True, feature_map_params=params, eps=float(fx["eps"]))
    assert_close(out, fx["out"], atol=1e-5, rtol=1e-5)


def test_fixture_hedgehog_lolcats_causal():
    fx = fixture("hedgehog_lolcats_linear_attention_causal")
    q, k, v = f32(fx["q"], fx["k"], fx["v"])
    params = ({"weight": f32(fx["layer_q"])}, {"weight": f32(fx["layer_k"])})
    out = za.linear(q, k, v, causal=True, feature_map="hedgehog_lolcats", feature_map_params=params,
                    eps=float(fx["eps"]), impl="chunked", chunk_size=16)
    assert_close(out, fx["out"], atol=1e-5, rtol=1e-5)


def test_fixture_nalaformer_core():
    fx = fixture("nala_core_noncausal")
    out = za.get("nalaformer")(*f32(fx["q"], fx["k"], fx["v"]), eps=float(fx["eps"]))
    assert_close(out, fx["out"], atol=1e-5, rtol=1e-5)


def test_nalaformer_causal_is_prefix_of_noncausal():
    # The causal form through prefix sums: output i equals the non-causal form on tokens 0..i.
    q, k, v = qkv(t=9)
    causal = za.get("nalaformer")(q, k, v, causal=True)
    for i in (0, 4, 8):
        pre = za.get("nalaformer")(q[:, i:i + 1], k[:, : i + 1], v[:, : i + 1])
        assert_close(causal[:, i:i + 1], pre, **TOL)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, shapes, match",
    [
        ({}, ((2, 8, 4), (2, 8, 4, 8), (2, 8, 4, 8)), "q must have rank 4"),
        ({"causal": True}, ((2, 8, 4, 8), (2, 9, 4, 8), (2, 9, 4, 8)), "same length"),
        ({}, ((2, 8, 4, 8), (2, 8, 3, 8), (2, 8, 3, 8)), "multiple of k/v heads"),
        ({}, ((2, 8, 4, 8), (2, 8, 4, 8), (2, 7, 4, 8)), "v must be"),
        ({}, ((2, 8, 4, 8), (2, 8, 4, 6), (2, 8, 4, 8)), "k head_dim"),
        ({"feature_map": "nope"}, ((2, 8, 4, 8),) * 3, "unknown feature_map 'nope'; valid names: elu"),
        ({"impl": "fast"}, ((2, 8, 4, 8),) * 3, "impl='fast'"),
        ({"causal": True, "decay": np.ones(3)}, ((2, 8, 4, 8),) * 3, "decay must be"),
        ({"chunk_size": 0}, ((2, 8, 4, 8),) * 3, "chunk_size must be a positive integer"),
        ({"feature_map": "hedgehog"}, ((2, 8, 4, 8),) * 3, "feature_map_params"),
    ],
)
def test_bad_input(kwargs, shapes, match):
    arrays = [np.zeros(s, np.float32) for s in shapes]
    with pytest.raises(ValueError, match=match):
        za.linear(*arrays, **kwargs)


# ----------------------------------------------------------------------------- defect 4: rates 0 and +inf


def oracle(q, k, v, rates, *, normalize=True, eps=1e-6, s0=None, z0=None):
    """The token recurrence in float64 NumPy (elu + 1 feature map): ``S_t = lambda_t S_{t-1} +
    phi(k_t) v_t^T``, ``lambda_t = exp(-rate_t)`` with ``lambda = 0`` exactly at ``rate = inf``
    (written independently of zoo). ``rates [B, T, H]`` or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    b, t, h, d = q.shape
    e = v.shape[-1]
    s = np.zeros((b, h, d, e)) if s0 is None else np.asarray(s0, np.float64)
    z = np.zeros((b, h, d)) if z0 is None else np.asarray(z0, np.float64)
    out = np.zeros((b, t, h, e))
    for i in range(t):
        if rates is not None:
            lam = np.where(np.isinf(rates[:, i]), 0.0, np.exp(-np.where(np.isinf(rates[:, i]), 0.0, rates[:, i])))
            s, z = lam[..., None, None] * s, lam[..., None] * z
        fk, fq = phi(k[:, i]), phi(q[:, i])
        s = s + fk[..., :, None] * v[:, i, :, None, :]
        z = z + fk
        num = np.einsum("bhd,bhde->bhe", fq, s)
        out[:, i] = num / (np.einsum("bhd,bhd->bh", fq, z)[..., None] + eps) if normalize else num
    return out, s, z


_T = 21
_RNG = np.random.default_rng(11)
LIMIT_DECAYS = {
    "zero_per_head": np.zeros(4, np.float32),
    "inf_per_head": np.full(4, np.inf, np.float32),
    "mixed_per_head": np.array([0.0, np.inf, 0.5, 0.0], np.float32),
    # per token: random rates with resets (inf) and no-decay steps (0), including a reset at
    # t = 0, two in a row and one on a chunk boundary (chunk 4: t = 8)
    "mixed_per_token": np.where(
        _RNG.random((2, _T, 4)) < 0.2, np.inf, np.where(_RNG.random((2, _T, 4)) < 0.3, 0.0,
                                                        _RNG.uniform(0.0, 2.0, (2, _T, 4)))
    ).astype(np.float32),
}
LIMIT_DECAYS["mixed_per_token"][:, [0, 5, 6, 8]] = np.inf
LIMIT_DECAYS["all_inf_per_token"] = np.full((2, _T, 4), np.inf, np.float32)


@pytest.mark.parametrize("decay", list(LIMIT_DECAYS))
@pytest.mark.parametrize("impl", ["chunked", "scan", pytest.param("pallas", marks=pytest.mark.slow), "naive", "step"])
def test_rates_zero_and_inf_are_exact(impl, decay):
    """Defect 4: a rate of +inf (a hard reset) gave NaN in the chunked form from the reset on and
    everywhere in linear_naive. Every form is finite and equals the float64 recurrence (outputs
    2e-5 abs + 2e-5 rel, final state the same)."""
    rates = LIMIT_DECAYS[decay]
    per_token = rates.ndim == 3
    if impl == "pallas" and per_token:
        pytest.skip("the kernel takes per-head rates (per-token decay is rejected: test_impl_registry)")
    q, k, v = qkv(t=_T)
    full = rates if per_token else np.broadcast_to(rates, (2, _T, 4))
    want, s_want, z_want = oracle(q, k, v, full)
    if impl == "naive":
        got = za.linear_naive(q, k, v, causal=True, decay=rates)
        state = None
    elif impl == "step":
        state = za.linear_init_state(2, 4, 8, 8)
        outs = []
        for t in range(_T):
            y, state = za.linear_step(state, q[:, t], k[:, t], v[:, t], decay=rates[:, t] if per_token else rates)
            outs.append(y)
        got = jnp.stack(outs, 1)
    else:
        got, state = za.linear(q, k, v, causal=True, decay=rates, impl=impl, chunk_size=4, return_state=True)
    assert np.all(np.isfinite(np.asarray(got))), f"{impl}/{decay}: non-finite output"
    assert_close(got, want, **TOL, what=f"{impl}/{decay}")
    if state is not None:
        assert_close(state.S, s_want, **TOL, what=f"{impl}/{decay} S")
        assert_close(state.z, z_want, **TOL, what=f"{impl}/{decay} z")


@pytest.mark.parametrize("impl", ["chunked", pytest.param("scan", marks=pytest.mark.slow)])
def test_gradients_finite_and_exact_with_resets(impl):
    """learn_decay=True with resets and zero rates: gradients w.r.t. q, k, v and the (finite)
    rates are finite and equal the reference's; the gradient at an infinite rate is 0
    (d exp(-r)/dr = 0 there)."""
    q, k, v = qkv(t=_T)
    rates = LIMIT_DECAYS["mixed_per_token"]
    w = rand(9, *v.shape)

    def loss(fn, q, k, v, r):
        return jnp.sum(fn(q, k, v, causal=True, decay=r, learn_decay=True) * w)

    args = (q, k, v, rates)
    ref = jax.grad(functools.partial(loss, za.linear_naive), argnums=(0, 1, 2, 3))(*args)
    fn = functools.partial(za.linear, impl=impl, chunk_size=4)
    got = jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3))(*args)
    for name, a, e in zip(("dq", "dk", "dv", "drate"), got, ref):
        assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(e))), name
        assert_close(a, e, **GTOL, what=f"{impl} {name}")
    np.testing.assert_array_equal(np.asarray(got[3])[np.isinf(rates)], 0.0)


@pytest.mark.parametrize("bad", [-0.5, np.nan])
@pytest.mark.parametrize("form", ["linear", "naive", "step"])
def test_decay_out_of_range_is_rejected(form, bad):
    q, k, v = qkv(t=5)
    rates = np.array([0.1, bad, 0.2, 0.3], np.float32)
    with pytest.raises(ValueError, match=r"decay must lie in \[0.0, inf\]"):
        if form == "linear":
            za.linear(q, k, v, causal=True, decay=rates)
        elif form == "naive":
            za.linear_naive(q, k, v, causal=True, decay=rates)
        else:
            za.linear_step(za.linear_init_state(2, 4, 8, 8), q[:, 0], k[:, 0], v[:, 0], decay=rates)


# ----------------------------------------------------------------------------- implementation registry


def test_impl_registry():
    """The "linear" family: its implementations, auto's per-platform choice and the reasons."""
    impls = za.implementations("linear")
    assert set(impls) == {"chunked", "scan", "pallas"}
    assert impls["pallas"].platforms == ("gpu", "tpu") and impls["pallas"].interpret
    for name in ("linear", "based", "hedgehog", "nalaformer"):
        assert za.get(name).impl_family == "linear"
    per_head, per_token = DECAYS["per_head"], DECAYS["per_token"]
    pick = lambda impl="auto", on="cpu", **kw: za.resolve("linear", impl, on=on, **kw).name
    assert pick() == "scan"
    assert pick(on="gpu") == pick(on="tpu") == "pallas"
    assert pick(on="gpu", decay=per_head) == "pallas"  # a constant (or traced, stored) decay: the kernel
    assert pick(on="gpu", decay=per_token) == "chunked"
    assert pick(on="gpu", decay=per_head, learn_decay=True) == "chunked"
    assert pick(on="gpu", decay=None, learn_decay=True) == "pallas"  # nothing to learn
    assert pick(("pallas", "scan"), decay=per_token) == "scan"
    assert pick("pallas") == "pallas"  # explicit on CPU: interpret mode
    with pytest.raises(ValueError, match="learn_decay=True needs a differentiable decay"):
        pick("pallas", on="gpu", decay=per_head, learn_decay=True)
    with pytest.raises(ValueError, match="per-token decay"):
        pick("pallas", decay=per_token)
    q, k, v = qkv(t=8)
    with pytest.raises(ValueError, match="per-token decay"):
        za.linear(q, k, v, causal=True, decay=per_token[:, :8], impl="pallas")
    with pytest.raises(ValueError, match="impl='xla' is not valid"):
        za.linear(q, k, v, causal=True, impl="xla")


def test_impl_tuple_and_auto_give_the_same_values():
    q, k, v = qkv(t=19)
    dec = DECAYS["per_head"]
    ref = za.linear_naive(q, k, v, causal=True, decay=dec)
    for impl in ("auto", ("pallas", "chunked"), ("chunked",)):
        assert_close(za.linear(q, k, v, causal=True, decay=dec, impl=impl, chunk_size=8), ref, **TOL, what=str(impl))


def test_traced_decay_under_jit_equals_eager():
    """A decay that is a traced value (a model's stored constant under jit) is used as given."""
    q, k, v = qkv(t=12)
    dec = jnp.asarray(DECAYS["per_head"])
    f = jax.jit(lambda q, k, v, d: za.linear(q, k, v, causal=True, decay=d, impl="pallas", chunk_size=4))
    assert_close(f(q, k, v, dec), za.linear_naive(q, k, v, causal=True, decay=dec), **TOL)


# ----------------------------------------------------------------------------- decoding inputs


def test_init_state_numpy_sizes_and_step_checks():
    st = za.linear_init_state(np.int64(2), np.int64(4), np.int32(8), np.int64(6))
    assert st.S.shape == (2, 4, 8, 6) and st.z.shape == (2, 4, 8) and st.count.shape == (2,)
    st2 = za.get("linear").init_state(np.int64(2), np.int64(4), np.int64(8))
    assert st2.S.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        za.linear_init_state(0, 4, 8)
    q = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"q_t must be \[batch, heads, head_dim\]"):
        za.linear_step(st2, q[:, None], q, q)
    with pytest.raises(ValueError, match="k_t must be a floating point array"):
        za.linear_step(st2, q, q.astype(np.int32), q)
    with pytest.raises(ValueError, match="state must have shapes"):
        za.linear_step(st, q, q, q)
