"""Flow-Attention (Flowformer): fast forms == quadratic reference == official cumsum form."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, fixture, rand, tree_assert_close

# ``zoo.attention.flow`` is also the name of the function exported by the package.
F = importlib.import_module("zoo.attention.flow")

B, T, H, D, E = 2, 13, 2, 4, 3
TOL = 2e-6  # float32 forms vs float32 / float64 references; outputs are O(1)

_STATIC = ("causal", "eps", "clamp", "chunk_size", "impl", "return_state")
flow = jax.jit(F.flow, static_argnames=_STATIC)
flow_naive = jax.jit(F.flow_naive, static_argnames=("causal", "eps", "clamp"))


def _run_steps(q, k, v, eps=1e-6):
    """Feeds the tokens one at a time through ``F.step`` (a ``lax.scan`` over time)."""
    tm = lambda x: jnp.moveaxis(jnp.asarray(x), 1, 0)
    body = lambda st, x: (lambda y, st: (st, y))(*F.step(st, *x, eps=eps))
    st, ys = jax.lax.scan(body, F.init_state(*q.shape[::2], q.shape[3], v.shape[-1]), (tm(q), tm(k), tm(v)))
    return jnp.moveaxis(ys, 0, 1), st


run_steps = jax.jit(_run_steps, static_argnames=("eps",))


def _inputs(seed=0, t=T, tk=None, hk=H, scale=1.0):
    tk = t if tk is None else tk
    return (rand(seed, B, t, H, D, scale=scale), rand(seed + 1, B, tk, hk, D, scale=scale),
            rand(seed + 2, B, tk, hk, E))


def _official_cumsum_form(q, k, v, causal, eps=1e-6, clamp=1.0):
    """Independent float64 numpy transcription of thuml/Flowformer Flow_Attention(_Causal).forward
    (per-head core, layout [B, L, H, D]); the causal product is the source's cumsum of k (x) v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    q, k = sig(q), sig(k)
    L, S = q.shape[1], k.shape[1]
    dot = lambda a, b: np.sum(a * b, -1)
    if not causal:
        sink_in = 1.0 / dot(q + eps, k.sum(1, keepdims=True) + eps)
        src_out = 1.0 / dot(k + eps, q.sum(1, keepdims=True) + eps)
        c_sink = dot(q + eps, (k * src_out[..., None]).sum(1, keepdims=True) + eps)
        c_src = dot(k + eps, (q * sink_in[..., None]).sum(1, keepdims=True) + eps)
        c_src = np.clip(c_src, -clamp, clamp)
        alloc = sig(c_sink * L / S)
        ex = np.exp(c_src - c_src.max(1, keepdims=True))
        comp = ex / ex.sum(1, keepdims=True) * S
        kv = np.einsum("bjhd,bjhe->bhde", k, v * comp[..., None])
        return np.einsum("bihd,bhde->bihe", q * sink_in[..., None], kv) * alloc[..., None]
    normal = np.arange(1, L + 1, dtype=np.float64)[None, :, None]
    sink_in = 1.0 / dot(q + eps, np.cumsum(k, 1) + eps) * normal
    src_out = 1.0 / dot(k + eps, np.cumsum(q, 1) + eps) * normal
    c_sink = dot(q + eps, np.cumsum(k * src_out[..., None], 1) + eps) / normal
    c_src = dot(k + eps, np.cumsum(q * sink_in[..., None], 1) + eps) / normal
    c_src = np.clip(c_src, -clamp, clamp)
    alloc = sig(c_sink)
    ex = np.exp(c_src)
    comp = ex / np.cumsum(ex, 1) * normal
    kv = np.cumsum(np.einsum("bjhd,bjhe->bjhde", k, v * comp[..., None]), 1)
    return np.einsum("bihd,bihde->bihe", q * (sink_in / normal)[..., None], kv) * alloc[..., None]


# ----------------------------------------------------------------------------- equality of forms


@pytest.mark.parametrize("causal", [False, True])
def test_naive_equals_official_form(causal):
    q, k, v = _inputs(seed=1)
    ref = _official_cumsum_form(q, k, v, causal)
    assert_close(flow_naive(q, k, v, causal=causal), ref, atol=TOL, what="naive")
    # A larger clamp (the repo's NLP copy uses 5) with inputs that make the clip active.
    q2, k2, v2 = _inputs(seed=2, scale=3.0)
    ref = _official_cumsum_form(q2, k2, v2, causal, clamp=5.0)
    assert_close(flow_naive(q2, k2, v2, causal=causal, clamp=5.0), ref, atol=TOL, what="clamp 5")


@pytest.mark.parametrize("impl,chunk", [("chunked", 4), ("chunked", 64), ("scan", None)])
def test_causal_fast_forms_equal_naive(impl, chunk):
    q, k, v = _inputs(seed=3)
    ref = flow_naive(q, k, v, causal=True)
    assert_close(flow(q, k, v, causal=True, impl=impl, chunk_size=chunk), ref, atol=TOL, what=impl)
    assert_close(ref, _official_cumsum_form(q, k, v, True), atol=TOL, what="naive vs official")


def test_noncausal_different_lengths_and_gqa():
    q, k, v = _inputs(seed=5, t=7, tk=10, hk=1)
    kk, vv = np.repeat(k, H, axis=2), np.repeat(v, H, axis=2)
    ref = _official_cumsum_form(q, kk, vv, False)
    assert_close(flow(q, k, v), ref, atol=TOL, what="Tq != Tk, grouped heads")
    assert_close(flow_naive(q, k, v), ref, atol=TOL, what="naive Tq != Tk")


def test_no_clamp_is_finite():
    """Without the clip the causal competition uses a cumulative log-sum-exp (no overflow)."""
    q, k, v = _inputs(seed=6, scale=3.0)
    out = flow(q, k, v, causal=True, clamp=None)
    assert_close(out, _official_cumsum_form(q, k, v, True, clamp=np.inf), atol=TOL, what="no clamp")


def test_step_and_state_equal_parallel():
    q, k, v = _inputs(seed=7)
    out, st = flow(q, k, v, causal=True, chunk_size=4, return_state=True)
    ys, s = run_steps(q, k, v)
    assert_close(ys, out, atol=TOL, what="step vs parallel")
    # States hold prefix sums that grow with T: compare relatively.
    tree_assert_close(s, st, atol=TOL, rtol=1e-5, what="final state")
    assert_close(st.sum_q, jax.nn.sigmoid(q).sum(1), atol=1e-5, what="sum_q definition")
    assert_close(st.count, np.full((B,), T), atol=0, what="count")


@pytest.mark.parametrize("impl", ["chunked", "scan"])
def test_initial_state_splits_sequence(impl):
    q, k, v = _inputs(seed=8)
    full, st_full = flow(q, k, v, causal=True, impl=impl, chunk_size=4, return_state=True)
    c = 6
    y1, st1 = flow(q[:, :c], k[:, :c], v[:, :c], causal=True, impl=impl, chunk_size=4,
                   return_state=True)
    y2, st2 = flow(q[:, c:], k[:, c:], v[:, c:], causal=True, impl=impl, chunk_size=4,
                   initial_state=st1, return_state=True)
    assert_close(jnp.concatenate([y1, y2], 1), full, atol=TOL, what="split outputs")
    tree_assert_close(st2, st_full, atol=TOL, rtol=1e-5, what="split state")


# ----------------------------------------------------------------------------- identities


def test_causality():
    q, k, v = _inputs(seed=9)
    j = 7
    base = flow(q, k, v, causal=True, chunk_size=4)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, j:] += 1.5
    k2[:, j:] -= 2.0
    v2[:, j:] *= 3.0
    pert = flow(q2, k2, v2, causal=True, chunk_size=4)
    np.testing.assert_array_equal(np.asarray(base)[:, :j], np.asarray(pert)[:, :j])
    assert not np.allclose(np.asarray(base)[:, j:], np.asarray(pert)[:, j:])


def test_causal_output_equals_run_on_prefix():
    q, k, v = _inputs(seed=10)
    full = flow(q, k, v, causal=True)
    for i in (1, 5):
        pre = flow(q[:, :i], k[:, :i], v[:, :i], causal=True)
        assert_close(pre[:, -1], full[:, i - 1], atol=TOL, what=f"prefix {i}")


def test_noncausal_permutations():
    q, k, v = _inputs(seed=11, t=6, tk=9)
    out = flow(q, k, v)
    pq = np.random.default_rng(0).permutation(6)
    pk = np.random.default_rng(1).permutation(9)
    assert_close(flow(q[:, pq], k, v), np.asarray(out)[:, pq], atol=TOL, what="query equivariance")
    assert_close(flow(q, k[:, pk], v[:, pk]), out, atol=TOL, what="(k, v) permutation invariance")


def test_length_one_causal_equals_noncausal():
    q, k, v = _inputs(seed=12, t=1)
    assert_close(flow(q, k, v, causal=True), flow(q, k, v), atol=TOL, what="length 1")


def test_memory_linear_causal_form():
    """The chunked causal form never holds a per-token d x e state ([B, T, H, D, E])."""
    t, d, e, c = 64, 8, 8, 16
    q, k, v = (jnp.zeros((1, t, 1, x)) for x in (d, d, e))
    jaxpr = jax.make_jaxpr(lambda q, k, v: F.flow(q, k, v, causal=True, chunk_size=c))(q, k, v)

    def sizes(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < t * d * e // 2, f"an intermediate has {biggest} elements (T*D*E = {t * d * e})"
    # The official cumsum form does materialise it (the check above can fail).
    cumsum_kv = lambda k, v: jnp.cumsum(jnp.einsum("bjhd,bjhe->bjhde", k, v), 1)
    official = jax.make_jaxpr(cumsum_kv)(k, v)
    assert max(sizes(official.jaxpr)) >= t * d * e


# ----------------------------------------------------------------------------- autodiff, transforms


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_naive(causal):
    q, k, v = _inputs(seed=13)
    w = rand(14, B, T, H, E)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v, causal=causal))
    fast = lambda *a, **kw: F.flow(*a, chunk_size=4, **kw)
    g = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(F.flow_naive), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", g, g_ref):
        assert_close(a, r, atol=1e-5, rtol=1e-5, what=f"d{name}")


def test_step_gradient_finite():
    q, k, v = _inputs(seed=15, t=3)

    run = lambda q, k, v: jnp.sum(_run_steps(q, k, v)[0])
    g = jax.jit(jax.grad(run, argnums=(0, 1, 2)))(q, k, v)
    naive = lambda *a: jnp.sum(F.flow_naive(*a, causal=True))
    g_ref = jax.jit(jax.grad(naive, argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", g, g_ref):
        assert_close(a, r, atol=1e-5, rtol=1e-5, what=f"step d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_jit_vmap(causal):
    q, k, v = _inputs(seed=16)
    ref = F.flow_naive(q, k, v, causal=causal)
    vm = jax.jit(jax.vmap(lambda a, b, c: F.flow(a[None], b[None], c[None], causal=causal)[0]))
    assert_close(vm(q, k, v), ref, atol=TOL, what="vmap over batch")


def test_bf16():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(seed=17))
    for causal in (False, True):
        out = flow(q, k, v, causal=causal)
        assert out.dtype == jnp.bfloat16
        ref = _official_cumsum_form(*(np.asarray(x, np.float32) for x in (q, k, v)), causal)
        assert_close(out.astype(jnp.float32), ref, atol=2e-2, rtol=2e-2, what=f"bf16 {causal=}")


# ----------------------------------------------------------------------------- fixtures, registry


@pytest.mark.parametrize("causal", [False, True])
def test_fixture_parity(causal):
    f = fixture("flow_attention_causal" if causal else "flow_attention_noncausal")
    q, k, v = (np.asarray(f[n], np.float32) for n in "qkv")
    eps = float(f["eps"])
    assert_close(flow(q, k, v, causal=causal, eps=eps), f["out"], atol=1e-5, what="fast")
    assert_close(flow_naive(q, k, v, causal=causal, eps=eps), f["out"], atol=1e-5, what="naive")
    if causal:
        out = flow(q, k, v, causal=True, eps=eps, impl="scan")
        assert_close(out, f["out"], atol=1e-5, what="scan")
        assert_close(run_steps(q, k, v, eps=eps)[0], f["out"], atol=1e-5, what="step")


def test_registered():
    tr = za.get("flow")
    assert tr.step_fn is F.step and tr.init_state_fn is F.init_state and tr.reference_fn is F.flow_naive
    q, k, v = _inputs(seed=18)
    ref = F.flow_naive(q, k, v, causal=True)
    out = jax.jit(lambda q, k, v: tr(q, k, v, causal=True))(q, k, v)
    assert_close(out, ref, atol=TOL, what="registry")


def test_bad_inputs():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="q must have rank 4"):
        F.flow(q[0], k, v)
    with pytest.raises(ValueError, match="k head_dim"):
        F.flow(q, k[..., :-1], v)
    with pytest.raises(ValueError, match="v must be"):
        F.flow(q, k, v[:, :-1])
    with pytest.raises(ValueError, match="causal attention needs q and k of the same length"):
        F.flow(q, k[:, :-1], v[:, :-1], causal=True)
    with pytest.raises(ValueError, match="eps must be"):
        F.flow(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="clamp must be"):
        F.flow(q, k, v, clamp=0.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        F.flow(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="impl="):
        F.flow(q, k, v, causal=True, impl="fast")
    with pytest.raises(ValueError, match="need causal=True"):
        F.flow(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="initial_state/state must be a FlowState"):
        F.flow(q, k, v, causal=True, initial_state=(0,))
    with pytest.raises(ValueError, match="state must have shapes"):
        F.flow(q, k, v, causal=True, initial_state=F.init_state(B, H, D + 1, E))
    s = F.init_state(B, H, D, E)
    with pytest.raises(ValueError, match="q_t must be"):
        F.step(s, q[:, :2], k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="v_t must be"):
        F.step(s, q[:, 0], k[:, 0], v[:, :1])
