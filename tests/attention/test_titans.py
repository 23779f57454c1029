"""Titans neural memory: chunked forms == sequential reference (gradients frozen at chunk starts)
== independent float64 numpy recurrences; DeltaNet as a special case; exact decoding for every
chunk size (parallel == reference == init_state + prefill + step, also from inside a chunk);
causal only; gate ranges.

Tolerances (float32 vs float64 numpy or vs the float32 reference, values O(1)-O(10), sums of
<= 20 terms): outputs and states 2e-5 abs + 2e-5 rel (MLP memories 5e-5); float32 forms of the
same recurrence against each other (decoding): 1e-5 abs + 1e-5 rel; gradients 1e-4 abs + 1e-4 rel.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, assert_registered_decodes_as_it_trains, rand, tree_assert_close

T = importlib.import_module("zoo.attention.titans")  # the package exports a function `titans`

B, L, H, D = 2, 13, 2, 4
TOL = dict(atol=2e-5, rtol=2e-5)
MTOL = dict(atol=5e-5, rtol=5e-5)
DTOL = dict(atol=1e-5, rtol=1e-5)
GTOL = dict(atol=1e-4, rtol=1e-4)
STATIC = ("depth", "expansion", "activation", "residual", "grad_clip", "chunk_size")
# Jitted entry points that always return the state (one compiled program per configuration,
# shared by the tests: compilation dominates the run time of these tiny shapes).
_titans = jax.jit(lambda *a, **kw: T.titans(*a, return_state=True, causal=True, **kw),
                  static_argnames=STATIC + ("form",))
_naive = jax.jit(lambda *a, **kw: T.titans_naive(*a, return_state=True, causal=True, **kw), static_argnames=STATIC)


def titans(*a, return_state=False, **kw):
    y, st = _titans(*a, **kw)
    return (y, st) if return_state else y


def titans_naive(*a, return_state=False, **kw):
    y, st = _naive(*a, **kw)
    return (y, st) if return_state else y


def inputs(seed=0, b=B, t=L, h=H, d=D, hk=None):
    hk = h if hk is None else hk
    q, k, v = rand(seed, b, t, h, d), rand(seed + 1, b, t, hk, d), rand(seed + 2, b, t, hk, d)
    rng = np.random.default_rng(seed + 3)
    gates = dict(
        theta=rng.uniform(0.0, 0.05, (b, t, h)).astype(np.float32),
        eta=rng.uniform(0.3, 0.9, (b, t, h)).astype(np.float32),
        alpha=rng.uniform(0.0, 0.2, (b, t, h)).astype(np.float32),
    )
    return q, k, v, gates


def weights(depth, seed=7, h=H, d=D, scale=0.3):
    if depth == 1:
        return (jnp.asarray(rand(seed, h, d, d, scale=scale)),)
    return T.init_weights(jax.random.PRNGKey(seed), h, d, depth=depth, expansion=2)


# ----------------------------------------------------------------------------- numpy oracles


def np_titans(q, k, v, theta, eta, alpha, w0, chunk=1, act="matrix"):
    """float64 recurrence, explicit gradients. ``act``: "matrix" (W [d, e]) or "tanh" (2-layer MLP
    M(x) = tanh(x W1) W2). Gradients at the weights of each chunk start."""
    q, k, v, theta, eta, alpha = (np.asarray(x, np.float64) for x in (q, k, v, theta, eta, alpha))
    b, t, h, _ = q.shape
    y = np.zeros(v.shape[:3] + (w0[-1].shape[-1],))
    ws_out = [np.zeros((b,) + w.shape) for w in w0]
    ms_out = [np.zeros((b,) + w.shape) for w in w0]
    for bi in range(b):
        for hi in range(h):
            ws = [np.asarray(w[hi], np.float64) for w in w0]
            ms = [np.zeros_like(w) for w in ws]
            for i in range(t):
                if i % chunk == 0:
                    frozen = [w.copy() for w in ws]
                kk, vv = k[bi, i, hi], v[bi, i, hi]
                if act == "matrix":
                    (w,) = frozen
                    g = [2.0 * np.outer(kk, kk @ w - vv)]
                else:
                    w1, w2 = frozen
                    hid = np.tanh(kk @ w1)
                    r2 = 2.0 * (hid @ w2 - vv)
                    g = [np.outer(kk, (w2 @ r2) * (1.0 - hid**2)), np.outer(hid, r2)]
                th, et, al = theta[bi, i, hi], eta[bi, i, hi], alpha[bi, i, hi]
                ms = [et * m - th * gg for m, gg in zip(ms, g)]
                ws = [(1.0 - al) * w + m for w, m in zip(ws, ms)]
                qq = q[bi, i, hi]
                y[bi, i, hi] = qq @ ws[0] if act == "matrix" else np.tanh(qq @ ws[0]) @ ws[1]
            for i, (w, m) in enumerate(zip(ws, ms)):
                ws_out[i][bi, hi], ms_out[i][bi, hi] = w, m
    return y, ws_out, ms_out


def np_deltanet(q, k, v, beta):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): S_t = S_{t-1} + beta_t k_t (v_t - S^T k_t)^T,
    y_t = S_t^T q_t, S [d_k, d_v] from zero."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    b, t, h, _ = q.shape
    y = np.zeros(v.shape)
    for bi in range(b):
        for hi in range(h):
            s = np.zeros((k.shape[-1], v.shape[-1]))
            for i in range(t):
                kk = k[bi, i, hi]
                s = s + beta[bi, i, hi] * np.outer(kk, v[bi, i, hi] - kk @ s)
                y[bi, i, hi] = q[bi, i, hi] @ s
    return y


# ----------------------------------------------------------------------------- tests
# Depth-2 memories use tanh (the numpy oracle's) so that compiled programs are shared across
# tests; C5 = 5 splits the 13 tokens into chunks 5, 5, 3 (a ragged last chunk).
C5 = 5


def mlp(depth):
    return dict(weights=weights(depth), activation="tanh")


@pytest.mark.parametrize("depth", [1, 2])
def test_reference_and_chunked_equal_numpy(depth):
    q, k, v, g = inputs()
    w = weights(depth)
    act = "matrix" if depth == 1 else "tanh"
    tol = TOL if depth == 1 else MTOL
    for chunk in (1, C5):
        y_np, ws_np, ms_np = np_titans(q, k, v, g["theta"], g["eta"], g["alpha"], w, chunk=chunk, act=act)
        runs = {
            "naive": titans_naive(q, k, v, chunk_size=chunk, return_state=True, **mlp(depth), **g),
            "dual": titans(q, k, v, chunk_size=chunk, return_state=True, **mlp(depth), **g),
        }
        if chunk > 1:
            runs["materialize"] = titans(q, k, v, chunk_size=chunk, form="materialize", return_state=True,
                                         **mlp(depth), **g)
        for name, (y, st) in runs.items():
            assert_close(y, y_np, **tol, what=f"{name} C={chunk} y")
            tree_assert_close(list(st.weights), ws_np, **tol, what=f"{name} C={chunk} weights")
            tree_assert_close(list(st.momentum), ms_np, **tol, what=f"{name} C={chunk} momentum")


@pytest.mark.parametrize("depth,chunk,forms", [(2, 16, ("dual", "materialize")), (3, C5, ("dual",))])
def test_chunked_equals_frozen_reference(depth, chunk, forms):
    # (chunks of 1 and 5 are checked against numpy above; 16 > 13 tokens is a single chunk)
    q, k, v, g = inputs(seed=1)
    y_ref, st_ref = titans_naive(q, k, v, chunk_size=chunk, return_state=True, **mlp(depth), **g)
    for form in forms:
        y, st = titans(q, k, v, chunk_size=chunk, form=form, return_state=True, **mlp(depth), **g)
        assert_close(y, y_ref, **MTOL, what=f"{form} C={chunk} y")
        tree_assert_close(st, st_ref, **MTOL, what=f"{form} C={chunk} state")
    if depth == 2:  # chunking does change the result (gradients frozen at chunk starts)
        y1 = titans(q, k, v, chunk_size=1, **mlp(depth), **g)
        assert np.max(np.abs(np.asarray(y_ref) - np.asarray(y1))) > 1e-3


def _loss(fn, cot, q, k, v, theta, eta, alpha, w, **kw):
    y, st = fn(q, k, v, theta=theta, eta=eta, alpha=alpha, weights=w, activation="tanh",
               chunk_size=C5, return_state=True, causal=True, **kw)
    return jnp.sum(y * cot) + sum(jnp.sum(jnp.sin(x)) for x in st.weights + st.momentum)


ARGS = tuple(range(1, 8))
grad_chunked = jax.jit(jax.grad(lambda *a, form: _loss(T.titans, *a, form=form), argnums=ARGS),
                       static_argnames="form")
grad_naive = jax.jit(jax.grad(lambda *a: _loss(T.titans_naive, *a), argnums=ARGS))


@pytest.mark.parametrize("form", ["dual", "materialize"])
def test_gradients_equal_frozen_reference(form):
    q, k, v, g = inputs(seed=2)
    args = (rand(11, B, L, H, D), q, k, v, g["theta"], g["eta"], g["alpha"], weights(2))
    gc, gr = grad_chunked(*args, form=form), grad_naive(*args)
    for name, a, e in zip(("q", "k", "v", "theta", "eta", "alpha", "weights"), gc, gr):
        tree_assert_close(a, e, **GTOL, what=f"d/d{name}")


def _run_steps(state, q, k, v, gates, **kw):
    def body(st, xs):
        q_t, k_t, v_t, g_t = xs
        y, st = T.step(st, q_t, k_t, v_t, **g_t, **kw)
        return st, y

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    ys = jax.lax.scan(body, state, (tm(q), tm(k), tm(v), {n: tm(x) for n, x in gates.items()}))[1]
    return jnp.moveaxis(ys, 0, 1)


run_steps = jax.jit(_run_steps, static_argnames=("activation", "chunk_size"))


def test_linear_memory_without_momentum_and_decay_is_deltanet():
    q, k, v, g = inputs(seed=3)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)  # DeltaNet normalises keys
    gates = dict(theta=g["theta"] * 10, eta=np.zeros_like(g["eta"]), alpha=np.zeros_like(g["alpha"]))
    y_dn = np_deltanet(q, kn, v, 2.0 * gates["theta"])  # beta = 2 theta with the loss ||.||^2
    w0 = (jnp.zeros((H, D, D)),)
    assert_close(titans_naive(q, kn, v, weights=w0, chunk_size=1, **gates), y_dn, **TOL, what="naive")
    assert_close(titans(q, kn, v, weights=w0, chunk_size=1, **gates), y_dn, **TOL, what="dual")
    y_steps = run_steps(T.init_state(B, H, D), q, kn, v, gates, chunk_size=1)
    assert_close(y_steps, y_dn, **TOL, what="step")


def _split(x, n):
    return x[:, :n], x[:, n:]


def _gsplit(g, n):
    return {name: x[:, :n] for name, x in g.items()}, {name: x[:, n:] for name, x in g.items()}


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)])
def test_decoding_is_exact_for_every_chunk_size(chunk):
    """Regression (issue 10, defect 2): for C in {1, 3, 4} and T = 13 (not a multiple of 3 or 4),
    parallel == reference(C) == init_state + prefill(5 tokens: ends inside a chunk for C = 3, 4)
    + step(the other 8), outputs and final states (frozen weights and count included), 1e-5."""
    q, k, v, g = inputs(seed=4)
    kw = dict(chunk_size=chunk, activation="tanh")
    st0 = T.init_state(B, H, D, weights=weights(2))
    y_ref, st_ref = titans_naive(q, k, v, initial_state=st0, return_state=True, **kw, **g)
    for form in ("dual", "materialize"):
        y, st = titans(q, k, v, initial_state=st0, form=form, return_state=True, **kw, **g)
        assert_close(y, y_ref, **DTOL, what=f"{form} C={chunk} y")
        tree_assert_close(st, st_ref, **DTOL, what=f"{form} C={chunk} state")
    n = 5
    (q1, q2), (k1, k2), (v1, v2), (g1, g2) = _split(q, n), _split(k, n), _split(v, n), _gsplit(g, n)
    # eager calls: the state's count is concrete, the stream is laid on the chunk grid statically
    y1, st1 = T.titans(q1, k1, v1, initial_state=st0, return_state=True, causal=True, **kw, **g1)
    assert int(st1.count) == n
    y2 = run_steps(st1, q2, k2, v2, g2, **kw)
    assert_close(jnp.concatenate([y1, y2], axis=1), y_ref, **DTOL, what=f"prefill + step C={chunk}")
    # a second parallel call from the mid-chunk state: concrete count (static grid) and traced
    # count (the gathered form under jit) both continue exactly
    y2p, st2 = T.titans(q2, k2, v2, initial_state=st1, return_state=True, causal=True, **kw, **g2)
    assert_close(y2p, y_ref[:, n:], **DTOL, what=f"prefill + prefill C={chunk}")
    tree_assert_close(st2, st_ref, **DTOL, what=f"prefill + prefill state C={chunk}")
    y2t, st2t = _titans(q2, k2, v2, initial_state=st1, **kw, **g2)
    assert_close(y2t, y_ref[:, n:], **DTOL, what=f"prefill + traced prefill C={chunk}")
    tree_assert_close(st2t, st_ref, **DTOL, what=f"prefill + traced prefill state C={chunk}")


def test_continues_from_per_sequence_counts():
    """A [batch] count (sequences at different positions of the chunk grid, traced): the
    parallel form equals the reference from the same state."""
    q, k, v, g = inputs(seed=14)
    st = T.init_state(B, H, D, weights=weights(2))
    _, st = titans(q[:, :2], k[:, :2], v[:, :2], initial_state=st, chunk_size=4, activation="tanh",
                   return_state=True, **_gsplit(g, 2)[0])
    st = st._replace(count=jnp.array([2, 7], jnp.int32))  # frozen weights of a chunk start, mid-chunk
    kw = dict(initial_state=st, chunk_size=4, activation="tanh", **g)
    y_ref, st_ref = titans_naive(q, k, v, return_state=True, **kw)
    y, st_par = titans(q, k, v, return_state=True, **kw)
    assert_close(y, y_ref, **DTOL, what="[batch] count y")
    tree_assert_close(st_par, st_ref, **DTOL, what="[batch] count state")
    np.testing.assert_array_equal(np.asarray(st_par.count), [2 + L, 7 + L])


def test_registered_transform_decodes_as_it_trains():
    """``za.get("titans")``: the parallel form, the reference and init_state + prefill + step agree
    with the registered defaults (chunk_size 64 in every form) and with a given chunk size."""
    tr = za.get("titans")
    q, k, v, g = inputs(seed=15)
    for opts in ({}, {"chunk_size": 3}):
        assert_registered_decodes_as_it_trains(tr, q, k, v, prompt=5, what="titans", **opts)


def test_chaining_at_a_chunk_boundary():
    q, k, v, g = inputs(seed=4)
    y_full, st_full = titans(q, k, v, chunk_size=C5, return_state=True, **mlp(2), **g)
    # two parts split at a chunk boundary, state carried == one pass
    part = lambda sl: [x[:, sl] for x in (q, k, v)]
    gpart = lambda sl: {n: x[:, sl] for n, x in g.items()}
    y1, st1 = titans(*part(slice(0, 10)), chunk_size=C5, return_state=True, **mlp(2), **gpart(slice(0, 10)))
    y2, st2 = titans(*part(slice(10, None)), initial_state=st1, chunk_size=C5, activation="tanh",
                     return_state=True, **gpart(slice(10, None)))
    assert_close(jnp.concatenate([y1, y2], axis=1), y_full, **MTOL, what="chained y")
    tree_assert_close(st2, st_full, **MTOL, what="chained state")


def test_causality():
    q, k, v, g = inputs(seed=5)
    base = np.asarray(titans(q, k, v, chunk_size=C5, **mlp(2), **g))
    for j in (0, 6, 9, 12):  # first, middle and last token of a chunk
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        k2[:, j] += 1.0
        v2[:, j] -= 1.0
        q2[:, j] += 1.0
        g2 = {n: x.copy() for n, x in g.items()}
        g2["theta"][:, j] *= 2.0
        out = np.asarray(titans(q2, k2, v2, chunk_size=C5, **mlp(2), **g2))
        np.testing.assert_array_equal(out[:, :j], base[:, :j], err_msg=f"token {j} leaks backwards")
        assert np.max(np.abs(out[:, j] - base[:, j])) > 1e-4


def test_extremes_zero_momentum_full_forgetting():
    # eta = 0 and alpha = 1 at some tokens: segment products exactly 0, gradients finite and equal
    q, k, v, g = inputs(seed=8)
    g["eta"][:, 3] = 0.0
    g["alpha"][:, 6] = 1.0
    y = titans(q, k, v, chunk_size=C5, **mlp(2), **g)
    assert_close(y, titans_naive(q, k, v, chunk_size=C5, **mlp(2), **g), **MTOL, what="extremes")
    args = (rand(12, B, L, H, D), q, k, v, g["theta"], g["eta"], g["alpha"], weights(2))
    tree_assert_close(grad_chunked(*args, form="dual"), grad_naive(*args), **GTOL, what="grads")


def test_grad_clip_and_grouped_heads():
    q, k, v, g = inputs(seed=6, hk=1)
    kw = dict(chunk_size=C5, grad_clip=0.05, **mlp(2), **g)
    y_ref = titans_naive(q, k, v, **kw)
    assert_close(titans(q, k, v, **kw), y_ref, **MTOL, what="clip")  # clipping code shared by both forms
    rep = lambda x: np.repeat(x, H, axis=2)  # grouped-query heads == explicitly repeated k/v
    y = titans(q, rep(k), rep(v), chunk_size=C5, **mlp(2), **g)
    assert np.max(np.abs(np.asarray(y) - np.asarray(y_ref))) > 1e-3  # the clip is active
    assert_close(titans(q, k, v, chunk_size=C5, **mlp(2), **g), y, atol=0, what="gqa")


def test_default_gates_and_registry():
    q, k, v, g = inputs(seed=9)
    tr = za.get("titans")
    assert tr.causal_only and tr.step_fn is T.step and tr.reference_fn is T.titans_naive
    full = lambda x: np.full((B, L, H), x, np.float32)
    y = jax.jit(functools.partial(tr.fn, causal=True))(q, k, v)  # matrix memory from zeros, default gates and chunk
    y_ref = titans_naive(q, k, v, weights=(jnp.zeros((H, D, D)),), theta=full(0.01 / D), eta=full(0.5),
                         alpha=full(0.0), chunk_size=64)
    assert_close(y, y_ref, **TOL, what="defaults")
    st = tr.init_state(B, H, D, depth=2, key=jax.random.PRNGKey(0))
    assert [x.shape for x in st.weights] == [(B, H, D, 4 * D), (B, H, 4 * D, D)]
    assert [x.shape for x in st.frozen] == [x.shape for x in st.weights]
    assert all(np.all(np.asarray(x) == 0) for x in st.momentum)
    assert st.count.shape == () and st.count.dtype == jnp.int32 and int(st.count) == 0


@pytest.mark.slow  # left out of CI (README test command); run with -m slow
def test_jit_vmap_bf16_long():
    q, k, v, g = inputs(seed=10)
    y = titans(q, k, v, chunk_size=C5, **mlp(1), **g)
    yv = jax.jit(jax.vmap(lambda q, k, v: T.titans(q, k, v, chunk_size=C5, causal=True, **mlp(1), **g)))(
        np.stack([q, q * 0.5]), np.stack([k, k]), np.stack([v, v]))
    assert_close(yv[0], y, atol=1e-6, what="vmap")
    # bf16 unit-variance inputs on a 4k sequence, default gates: finite, for a matrix and a
    # 2-layer MLP memory (GELU, hidden 4 * 16)
    rng = np.random.default_rng(0)
    x = [jnp.asarray(rng.standard_normal((1, 4096, 2, 16)), jnp.bfloat16) for _ in range(3)]
    run = jax.jit(functools.partial(T.titans, causal=True), static_argnames=("depth",))
    for depth in (1, 2):
        out = run(*x, depth=depth, key=jax.random.PRNGKey(1))
        assert out.dtype == jnp.bfloat16
        out = np.asarray(out.astype(jnp.float32))
        assert np.all(np.isfinite(out)) and 0 < np.abs(out).max() < 1e3


def test_bad_inputs():
    q, k, v, g = inputs()
    w = weights(1)
    cases = [
        (dict(k=k[..., :3]), "head_dim"),
        (dict(v=v[:, :5]), "v must be"),
        (dict(q=q.astype(np.int32)), "q must be a floating"),
        (dict(theta=g["theta"][:, :5]), "theta"),
        (dict(eta=np.ones(3)), "eta"),
        (dict(alpha=g["alpha"][..., None]), "alpha"),
        (dict(theta=-0.1), "theta"),
        (dict(theta=np.full((B, L, H), np.nan, np.float32)), "theta"),
        (dict(eta=1.5), "eta"),
        (dict(eta=-0.5), "eta"),
        (dict(alpha=np.float32(np.nan)), "alpha"),
        (dict(alpha=1.01), "alpha"),
        (dict(depth=0), "depth"),
        (dict(depth=2, weights=w), "depth"),
        (dict(weights=(w[0][:, :3],)), r"weights\[0\]"),
        (dict(weights=None, depth=2), "key"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=None), "chunk_size"),
        (dict(form="fast"), "form"),
        (dict(activation="swish"), "activation"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(causal=False), "causal"),
        (dict(initial_state=T.init_state(B, H + 1, D)), "state"),
        (dict(initial_state=T.init_state(B, H, D)._replace(count=jnp.zeros((B + 1,), jnp.int32))), "count"),
        (dict(initial_state=T.init_state(B, H, D)._replace(count=jnp.zeros(()))), "count"),
    ]
    for kw, match in cases:
        args = dict(q=q, k=k, v=v, weights=w, causal=True)
        args.update(kw)
        for fn in (T.titans, T.titans_naive):
            if fn is T.titans_naive and "form" in kw:
                continue
            with pytest.raises(ValueError, match=match):
                fn(args["q"], args["k"], args["v"], **{n: x for n, x in args.items() if n not in ("q", "k", "v")})
    with pytest.raises(ValueError, match="causal"):  # causal-only: the default causal=False raises
        T.titans(q, k, v)
    st = T.init_state(B, H, D)
    with pytest.raises(ValueError, match="q_t"):
        T.step(st, q, k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="k_t must be a floating"):
        T.step(st, q[:, 0], k[:, 0].astype(np.int32), v[:, 0])
    for kw, match in ((dict(theta=np.ones(5)), "theta"), (dict(theta=-1.0), "theta"), (dict(eta=2.0), "eta"),
                      (dict(alpha=np.nan), "alpha"), (dict(chunk_size=0), "chunk_size")):
        with pytest.raises(ValueError, match=match):
            T.step(st, q[:, 0], k[:, 0], v[:, 0], **kw)


def _delta_rule_loop(q, k, p, v, w0, theta):
    """The general delta rule written out (numpy, token by token): predict at p, write along k,
    ``W <- W - 2 theta k^T (p W - v)``, read ``y = q W`` after the write."""
    q, k, p, v, w, theta = (np.asarray(x, np.float64) for x in (q, k, p, v, w0, theta))
    b, t, h, _ = q.shape
    w = np.broadcast_to(w, (b,) + w.shape).copy()  # [B, H, dk, dv]
    y = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        err = np.einsum("bhd,bhde->bhe", p[:, i], w) - v[:, i]
        w = w - 2 * theta[:, i, :, None, None] * np.einsum("bhd,bhe->bhde", k[:, i], err)
        y[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], w)
    return y


@pytest.mark.parametrize("fn", ["titans", "titans_naive"])
def test_prediction_key_is_the_general_delta_rule(fn):
    """Titans with ``prediction_key`` and a matrix memory, no momentum, no decay, chunk 1 is the
    delta rule whose erase key p differs from its write key k (checked against the loop above)."""
    ks = jax.random.split(jax.random.PRNGKey(7), 6)
    b, t, h, dk, dv = 2, 7, 2, 3, 4
    q, k, p = (jax.random.normal(x, (b, t, h, dk)) for x in ks[:3])
    v = jax.random.normal(ks[3], (b, t, h, dv))
    w0 = 0.3 * jax.random.normal(ks[4], (h, dk, dv))
    theta = jax.random.uniform(ks[5], (b, t, h), maxval=0.1)
    y = getattr(za, fn)(q, k, v, theta=theta, eta=0.0, alpha=0.0, weights=(w0,), chunk_size=1,
                        prediction_key=p, causal=True)
    np.testing.assert_allclose(y, _delta_rule_loop(q, k, p, v, w0, theta), rtol=1e-5, atol=1e-5)


def test_prediction_key_chunked_equals_naive_and_decodes():
    """Chunked (C=3, MLP memory, momentum) == naive with a separate prediction key, gradients
    too; p = k gives plain Titans; token steps continue the parallel form."""
    ks = jax.random.split(jax.random.PRNGKey(8), 5)
    b, t, h, d = 1, 6, 1, 3
    q, k, p, v = (jax.random.normal(x, (b, t, h, d)) for x in ks[:4])
    opts = dict(depth=2, expansion=2, key=ks[4], chunk_size=3, causal=True, theta=0.05, eta=0.8, alpha=0.1)
    run = lambda f, q, k, p, v: f(q, k, v, prediction_key=p, **opts)
    np.testing.assert_allclose(run(za.titans, q, k, p, v), run(za.titans_naive, q, k, p, v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(za.titans, q, k, k, v), za.titans(q, k, v, **opts), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda *a: jnp.sum(run(za.titans, *a) ** 2), argnums=(0, 1, 2, 3))(q, k, p, v)
    g2 = jax.grad(lambda *a: jnp.sum(run(za.titans_naive, *a) ** 2), argnums=(0, 1, 2, 3))(q, k, p, v)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    full = run(za.titans, q, k, p, v)
    y0, state = za.titans(q[:, :4], k[:, :4], v[:, :4], prediction_key=p[:, :4], return_state=True, **opts)
    step_opts = {n: opts[n] for n in ("chunk_size", "theta", "eta", "alpha")}
    for i in range(4, t):
        y, state = za.titans_step(state, q[:, i], k[:, i], v[:, i], prediction_key=p[:, i], **step_opts)
        np.testing.assert_allclose(y, full[:, i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_key"):
        za.titans(q, k, v, prediction_key=p[:, :3], **opts)
