"""Aaren prefix-scan attention: associative == sequential scan == step == masked prefix softmax."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, fixture, rand, tree_assert_close

# ``zoo.attention.aaren`` is also the name of the function exported by the package.
A = importlib.import_module("zoo.attention.aaren")

B, T, H, D, E = 2, 11, 2, 4, 3
TOL = 2e-6  # float32 forms vs float32 reference, O(1) values

# Jitted entry points (eager op-by-op dispatch of the scans is slow on a busy CPU).
causal_aaren = functools.partial(A.aaren, causal=True)
causal_naive = functools.partial(A.aaren_naive, causal=True)
aaren = jax.jit(causal_aaren, static_argnames=("causal", "impl", "return_state"))
aaren_naive = jax.jit(causal_naive, static_argnames=("causal",))


def _run_steps(q, k, v, mask=None):
    """Feeds the tokens one at a time through ``A.step`` (a ``lax.scan`` over time). ``q`` is
    ``[heads, head_dim]`` (constant) or per position. Returns ``(y [B, T, H, E], states [T, ...])``."""
    st0 = A.init_state(k.shape[0], k.shape[2] if q.ndim == 4 else q.shape[0], value_dim=v.shape[-1])
    tm = lambda x: None if x is None else jnp.moveaxis(jnp.asarray(x), 1, 0)

    def body(st, xs):
        q_t, k_t, v_t, m_t = xs
        y, st = A.step(st, q if q_t is None else q_t, k_t, v_t, mask_t=m_t)
        return st, (y, st)

    _, (ys, states) = jax.lax.scan(body, st0, (tm(q) if q.ndim == 4 else None, tm(k), tm(v), tm(mask)))
    return jnp.moveaxis(ys, 0, 1), states


run_steps = jax.jit(_run_steps)


def _inputs(seed=0, hk=H, per_position=False):
    q = rand(seed, B, T, H, D) if per_position else rand(seed, H, D)
    return q, rand(seed + 1, B, T, hk, D), rand(seed + 2, B, T, hk, E)


def _mask():
    m = np.ones((B, T), bool)
    m[0, 2:5] = False  # padding in the middle
    m[1, :3] = False  # leading padding: outputs 0 until the first real token
    return m


def _dense_prefix_softmax(q, k, v, mask=None, scale=1.0):
    """Independent float64 numpy oracle: o_t = softmax over {i <= t, mask_i} of scale q.k_i."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, _ = k.shape
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                qq = q[hi] if q.ndim == 2 else None
                idx = [i for i in range(ti + 1) if mask is None or mask[bi, i]]
                if not idx:
                    continue
                qi = [qq if qq is not None else q[bi, i, hi] for i in idx]
                s = np.array([scale * (a @ k[bi, i, hi]) for a, i in zip(qi, idx)])
                p = np.exp(s - s.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, idx, hi]
    return out


@pytest.mark.parametrize("impl", ["associative", "sequential"])
@pytest.mark.parametrize("per_position", [False, True])
def test_forms_equal_naive_and_numpy(impl, per_position):
    q, k, v = _inputs(per_position=per_position)
    m = _mask()
    for mask in (None, m):
        ref = _dense_prefix_softmax(q, k, v, mask)
        assert_close(aaren_naive(q, k, v, mask=mask), ref, atol=TOL, what="naive vs numpy")
        assert_close(aaren(q, k, v, mask=mask, impl=impl), ref, atol=TOL, what=impl)
    # Leading padding outputs exactly 0.
    assert np.all(np.asarray(aaren(q, k, v, mask=m, impl=impl))[1, :3] == 0)


def test_scale_and_grouped_query_heads():
    q, k, v = rand(3, 4, D), rand(4, B, T, 2, D), rand(5, B, T, 2, E)
    kk, vv = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    ref = _dense_prefix_softmax(q, kk, vv, scale=0.5)
    assert_close(aaren(q, k, v, scale=0.5), ref, atol=TOL, what="GQA + scale")


def test_states_and_step_equal_scan():
    q, k, v = _inputs(seed=7)
    m = _mask()
    out_a, st_a = aaren(q, k, v, mask=m, return_state=True)
    out_s, st_s = aaren(q, k, v, mask=m, impl="sequential", return_state=True)
    tree_assert_close(st_a, st_s, atol=TOL, what="final state assoc vs seq")
    # Final state by definition: m = max s_i, u = sum exp(s_i - m), w = sum exp(s_i - m) v_i.
    s = np.einsum("hd,bthd->bth", q.astype(np.float64), k)
    s = np.where(m[..., None], s, -np.inf)
    mx = s.max(axis=1)
    p = np.exp(s - mx[:, None])
    assert_close(st_a.m, mx, atol=1e-6, what="running max")
    assert_close(st_a.u, p.sum(1), atol=TOL, rtol=1e-6, what="normaliser")
    assert_close(st_a.w, np.einsum("bth,bthe->bhe", p, v), atol=TOL, rtol=1e-6, what="numerator")

    ys, states = run_steps(q, k, v, m)
    assert_close(ys, out_a, atol=TOL, what="step vs scan")
    st = A.AarenState(*(x[-1] for x in states))
    tree_assert_close(st, st_a, atol=TOL, rtol=1e-6, what="step final state")


@pytest.mark.parametrize("impl", ["associative", "sequential"])
def test_initial_state_splits_sequence(impl):
    q, k, v = _inputs(seed=11, per_position=True)
    full, st_full = aaren(q, k, v, impl=impl, return_state=True)
    c = 4
    y1, st1 = aaren(q[:, :c], k[:, :c], v[:, :c], impl=impl, return_state=True)
    y2, st2 = aaren(q[:, c:], k[:, c:], v[:, c:], impl=impl, initial_state=st1, return_state=True)
    assert_close(jnp.concatenate([y1, y2], 1), full, atol=TOL, what="split")
    tree_assert_close(st2, st_full, atol=TOL, rtol=1e-6, what="split state")


def test_causality():
    q, k, v = _inputs(seed=13, per_position=True)
    j = 6
    base = aaren(q, k, v)
    k2, v2, q2 = k.copy(), v.copy(), q.copy()
    k2[:, j:] += 3.0
    v2[:, j:] -= 2.0
    q2[:, j:] *= -1.0
    pert = aaren(q2, k2, v2)
    np.testing.assert_array_equal(np.asarray(base)[:, :j], np.asarray(pert)[:, :j])
    assert not np.allclose(np.asarray(base)[:, j:], np.asarray(pert)[:, j:])


def test_large_scores_stable():
    """Scores of +-1e4 overflow a naive exp; the combine only exponentiates non-positive numbers."""
    q, k, v = _inputs(seed=17)
    out = aaren(q * 1e3, k * 10, v)
    ref = _dense_prefix_softmax(q * 1e3, k * 10, v)
    assert_close(out, ref, atol=1e-5, what="large scores")


@pytest.mark.parametrize("impl", ["associative", "sequential"])
def test_gradients_match_naive(impl):
    q, k, v = _inputs(seed=19)
    m = _mask()
    w = rand(20, B, T, H, E)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v, mask=m))
    fast = lambda *a, **kw: causal_aaren(*a, impl=impl, **kw)
    g = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(causal_naive), argnums=(0, 1, 2)))(q, k, v)
    for name, a, e in zip("qkv", g, g_ref):
        assert_close(a, e, atol=1e-5, rtol=1e-5, what=f"d{name}")


def test_step_gradients_from_empty_state():
    """Gradients through step starting from the -inf identity state (and padding) stay exact."""
    q, k, v = _inputs(seed=21)
    m = _mask()

    w = np.arange(1, T + 1, dtype=np.float32)[None, :, None, None]
    run = lambda q, k, v: jnp.sum(w * _run_steps(q, k, v, m)[0])
    naive = lambda q, k, v: jnp.sum(w * causal_naive(q, k, v, mask=m))
    g = jax.jit(jax.grad(run, argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(naive, argnums=(0, 1, 2)))(q, k, v)
    for name, a, e in zip("qkv", g, g_ref):
        assert_close(a, e, atol=1e-5, rtol=1e-5, what=f"step d{name}")


def test_jit_vmap():
    q, k, v = _inputs(seed=23)
    ref = causal_naive(q, k, v)
    for impl in ("associative", "sequential"):
        jitted = jax.jit(causal_aaren, static_argnames=("impl",))(q, k, v, impl=impl)
        assert_close(jitted, ref, atol=TOL, what=f"jit {impl}")
    vm = jax.jit(jax.vmap(lambda kb, vb: causal_aaren(q, kb[None], vb[None])[0]))(k, v)
    assert_close(vm, ref, atol=TOL, what="vmap over batch")


def test_bf16():
    q, k, v = _inputs(seed=29, per_position=True)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = aaren(qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    ref = _dense_prefix_softmax(*(np.asarray(x, np.float32) for x in (qb, kb, vb)))
    assert_close(out.astype(jnp.float32), ref, atol=3e-2, rtol=2e-2, what="bf16")


def test_fixture_parity():
    f = fixture("aaren_prefix_scan_attention")
    q, k, v = (np.asarray(f[n], np.float32) for n in "qkv")
    for impl in ("associative", "sequential"):
        out, st = aaren(q, k, v, impl=impl, return_state=True)
        assert_close(out, f["out"], atol=1e-5, what=f"fixture out ({impl})")
        assert_close(st.m, f["running_max"][:, -1], atol=1e-5, what="fixture running max")
        # normaliser = sum_{i<=t} exp(s_i - m_t) grows with t (up to ~T): compare relatively.
        assert_close(st.u, f["normalizer"][:, -1], atol=1e-5, rtol=1e-6, what="fixture normaliser")
        assert_close(out.mean(axis=2), f["out_module_mean_heads"], atol=1e-5, what="module mean")
    assert_close(aaren_naive(q, k, v), f["out"], atol=1e-5, what="fixture naive")
    ys, states = run_steps(q, k, v)
    assert_close(ys, f["out"], atol=1e-5, what="fixture step outputs")
    assert_close(jnp.moveaxis(states.m, 0, 1), f["running_max"], atol=1e-5, what="step running max")
    assert_close(jnp.moveaxis(states.u, 0, 1), f["normalizer"], atol=1e-5, rtol=1e-6, what="step normaliser")


def test_registered():
    tr = za.get("aaren")
    assert tr.causal_only and tr.step_fn is A.step and tr.reference_fn is A.aaren_naive
    q, k, v = _inputs(seed=31, per_position=True)
    out = jax.jit(lambda q, k, v: tr(q, k, v, causal=True))(q, k, v)
    assert_close(out, aaren_naive(q, k, v), atol=TOL, what="registry")


def test_bad_inputs():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="q must be"):
        causal_aaren(q[0], k, v)
    with pytest.raises(ValueError, match=r"q must be \[heads, 4\]"):
        causal_aaren(rand(0, H, D + 1), k, v)
    with pytest.raises(ValueError, match="k must have rank 4"):
        causal_aaren(q, k[0], v)
    with pytest.raises(ValueError, match="v must be"):
        causal_aaren(q, k, v[:, :-1])
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        causal_aaren(rand(0, 3, D), k, v)
    with pytest.raises(ValueError, match=r"mask must be \[batch, length\]"):
        causal_aaren(q, k, v, mask=np.ones((B, T + 1), bool))
    with pytest.raises(ValueError, match="causal only"):
        causal_aaren(q, k, v, causal=False)
    with pytest.raises(ValueError, match="impl="):
        causal_aaren(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="initial_state/state must be a AarenState"):
        causal_aaren(q, k, v, initial_state=(1, 2, 3))
    with pytest.raises(ValueError, match=r"state must have shapes m \[2, 2\]"):
        causal_aaren(q, k, v, initial_state=A.init_state(B + 1, H, D, E))
    st = A.init_state(B, H, D, E)
    with pytest.raises(ValueError, match="k_t must be"):
        A.step(st, q, k[:, :2], v[:, 0])
    with pytest.raises(ValueError, match="q_t must be"):
        A.step(st, q[0], k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match=r"mask_t must be \[batch\]"):
        A.step(st, q, k[:, 0], v[:, 0], mask_t=np.ones((B, 1), bool))
