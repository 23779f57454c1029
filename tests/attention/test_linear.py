"""Linear attention: every form equals the naive masked quadratic reference, plus fixtures.

Tolerances (float32): forms vs reference 2e-5 abs + 2e-5 rel on outputs (sums of <= 64 terms of
O(1) values); gradients 1e-4 abs + 1e-4 rel. Fixture parity (float64 oracle, our float32):
1e-5 abs + 1e-5 rel.
"""

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
@pytest.mark.parametrize("normalize", [True, False, "mean"])
def test_causal_forms_equal_reference(impl, decay, normalize):
    q, k, v = qkv()
    kw = dict(causal=True, decay=DECAYS[decay], normalize=normalize)
    ref = za.linear_naive(q, k, v, **kw)
    # chunk 8 with T=37: four full chunks and a ragged one of 5.
    out = za.linear(q, k, v, impl=impl, chunk_size=8, **kw)
    assert_close(out, ref, **TOL, what=f"{impl}/{decay}/{normalize}")


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])
def test_chunked_any_chunk_size(chunk):
    q, k, v = qkv(t=37)
    ref = za.linear_naive(q, k, v, causal=True, feature_map="taylor")
    out = za.linear(q, k, v, causal=True, feature_map="taylor", impl="chunked", chunk_size=chunk)
    assert_close(out, ref, **TOL, what=f"chunk {chunk}")


@pytest.mark.parametrize("impl", ["chunked", "scan"])
@pytest.mark.parametrize("decay", ["none", "per_head"])
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


def test_gradient_wrt_decay_rates():
    q, k, v = qkv(t=13)
    rates = DECAYS["per_head"]
    f = lambda fn: jax.grad(lambda r: jnp.sum(fn(r) ** 2))(rates)
    ref = f(lambda r: za.linear_naive(q, k, v, causal=True, decay=r))
    got = f(lambda r: za.linear(q, k, v, causal=True, decay=r, impl="chunked", chunk_size=4))
    assert_close(got, ref, **GTOL, what="d/d decay")


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
