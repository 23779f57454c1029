"""Mask-producing sparse attention (zoo.attention.sparse): S2, NSA, Routing.

Each fast form (quadratic and blockwise softmax core) equals its independent reference (float32,
``atol=2e-5, rtol=2e-4``; gradients ``atol=1e-4, rtol=1e-3``); budgets covering every key give
full attention; causal forms are causal (changing a future token changes no earlier output),
LongLoRA's rolled S2 and Routing's balanced top-w are shown not to be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close
from zoo.attention import sparse

OUT = dict(atol=2e-5, rtol=2e-4)
GRAD = dict(atol=1e-4, rtol=1e-3)
B, T, H, HK, D, E = 2, 13, 4, 2, 8, 5
SMALL = za.BlockSizes(4, 4, 1)  # ragged blocks at T = 13


def _qkv(seed=0, t=T, hk=HK):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, t, H, D)), jax.random.normal(ks[1], (B, t, hk, D)),
            jax.random.normal(ks[2], (B, t, hk, E)))


def _gates(seed=7):
    return jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(seed), (B, T, H, 3)))


MU = jax.random.normal(jax.random.PRNGKey(5), (H, 3, D))
FORMS = {
    "s2": (sparse.s2, sparse.s2_naive, dict(group_size=4, num_sink=1)),
    "nsa": (sparse.nsa, sparse.nsa_naive, dict(block_size=3, top_k=2, window_size=4, gates=_gates())),
    "nsa_slc": (sparse.nsa, sparse.nsa_naive, dict(block_size=3, top_k=2)),
    "routing": (sparse.routing, sparse.routing_naive, dict(centroids=MU)),
}


@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "blockwise"])
@pytest.mark.parametrize("name", list(FORMS))
def test_equals_reference(name, impl):
    fast, ref, opts = FORMS[name]
    q, k, v = _qkv()
    for causal in (True, False):
        y = fast(q, k, v, causal=causal, impl=impl, block_sizes=SMALL, **opts)
        assert_close(y, ref(q, k, v, causal=causal, **opts), **OUT, what=f"{name} {impl} causal={causal}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  for n in FORMS])  # conformance checks every form's gradients in CI
def test_gradients_equal_reference(name):
    fast, ref, opts = FORMS[name]
    q, k, v = _qkv(1)
    w = jax.random.normal(jax.random.PRNGKey(9), (B, T, H, E))
    gs = opts.get("gates")
    rest = {a: b for a, b in opts.items() if a != "gates"}

    def loss(f, **kw):
        def fn(q, k, v, g):
            gk = {} if g is None else {"gates": g}
            return jnp.sum(w * f(q, k, v, causal=True, **rest, **kw, **gk))
        return fn

    g1 = jax.grad(loss(fast, impl="blockwise", block_sizes=SMALL), argnums=(0, 1, 2, 3))(q, k, v, gs)
    g2 = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(q, k, v, gs)
    for a, b_, n in zip(g1, g2, "qkvg"):
        if a is not None:
            assert_close(a, b_, **GRAD, what=f"{name} d{n}")
    assert float(jnp.abs(g1[0]).max()) > 0 and float(jnp.abs(g1[1]).max()) > 0  # gradients flow


@pytest.mark.parametrize("name", [n if n == "nsa" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FORMS])  # conformance checks s2's and routing's causality in CI
def test_causal(name):
    """Changing token c (q, k and v) changes no output before c, and does change later ones."""
    fast, _, opts = FORMS[name]
    q, k, v = _qkv(2)
    f = lambda q, k, v: fast(q, k, v, causal=True, impl="blockwise", block_sizes=SMALL, **opts)
    y = f(q, k, v)
    for c in (2, 6, 10):
        y2 = f(q.at[:, c].add(1.5), k.at[:, c].add(-2.0), v.at[:, c].add(3.0))
        assert_close(y2[:, :c], y[:, :c], atol=0, what=f"{name}: outputs before {c}")
        assert float(jnp.abs(y2[:, c:] - y[:, c:]).max()) > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_full_budgets_are_full_attention(causal):
    q, k, v = _qkv(3)
    full = za.softmax_naive(q, k, v, causal=causal)
    # S2: one group holding every token (shifted heads: groups [0, G/2) and [G/2, ..) unless G >= 2T)
    assert_close(sparse.s2(q, k, v, causal=causal, group_size=2 * T), full, **OUT, what="s2 G=2T")
    assert_close(sparse.s2(q, k, v, causal=causal, group_size=T, shift_heads=0.0), full, **OUT, what="s2 G=T")
    # NSA: top_k >= number of blocks, selection branch alone
    assert_close(sparse.nsa(q, k, v, causal=causal, block_size=3, top_k=5), full, **OUT, what="nsa top_k=nb")
    assert_close(sparse.nsa(q, k, v, causal=causal, block_size=3, top_k=99), full, **OUT, what="nsa top_k>nb")
    # Routing: one cluster
    mu1 = jax.random.normal(jax.random.PRNGKey(1), (H, 1, D))
    assert_close(sparse.routing(q, k, v, causal=causal, centroids=mu1), full, **OUT, what="routing C=1")


def test_s2_groups_are_block_diagonal_attention():
    """Unshifted heads: causal softmax inside each group [mG, (m+1)G) computed group by group;
    shifted heads: groups [0, G/2), [G/2, 3G/2), ..."""
    q, k, v = _qkv(4, hk=H)
    g = 4
    y = sparse.s2(q, k, v, causal=True, group_size=g)
    for head, starts in ((0, range(0, T, g)), (H - 1, range(-(g // 2), T, g))):
        for lo in starts:
            a, b_ = max(lo, 0), min(lo + g, T)
            sub = za.softmax_naive(q[:, a:b_, head:head + 1], k[:, a:b_, head:head + 1], v[:, a:b_, head:head + 1],
                                   causal=True)
            assert_close(y[:, a:b_, head:head + 1], sub, **OUT, what=f"head {head} group {lo}")


def _s2_rolled(q, k, v, g):
    """LongLoRA's non-flash S2 (forward_noflashattn): shifted heads rolled by -G/2, causal inside
    groups of the rolled order, rolled back (the second half of the heads)."""
    h = q.shape[2]

    def grouped(q, k, v):
        t = q.shape[1]
        r = lambda x: x.reshape(x.shape[0] * (t // g), g, *x.shape[2:])
        y = za.softmax_naive(r(q), r(k), r(v), causal=True)
        return y.reshape(q.shape[0], t, *y.shape[2:])

    y0 = grouped(q[:, :, : h // 2], k[:, :, : h // 2], v[:, :, : h // 2])
    roll = lambda x, s: jnp.roll(x, s, axis=1)
    y1 = roll(grouped(*(roll(x[:, :, h // 2:], -(g // 2)) for x in (q, k, v))), g // 2)
    return jnp.concatenate([y0, y1], axis=2)


def test_s2_rolled_leaks_ours_does_not():
    """The rolled form puts tokens [0, G/2) in one group with [T - G/2, T): it equals ours
    except on those first tokens, whose outputs change when the last token changes."""
    t, g = 16, 8
    q, k, v = _qkv(5, t=t, hk=H)
    rolled = _s2_rolled(q, k, v, g)
    ours = sparse.s2(q, k, v, causal=True, group_size=g)
    assert_close(rolled[:, g // 2:], ours[:, g // 2:], **OUT, what="rolled == ours after the first half group")
    v2 = v.at[:, -1].add(5.0)
    leak = jnp.abs(_s2_rolled(q, k, v2, g)[:, : g // 2, H // 2:] - rolled[:, : g // 2, H // 2:]).max()
    assert float(leak) > 1e-2, "LongLoRA's rolled S2 leaks the last token into the first ones"
    ours2 = sparse.s2(q, k, v2, causal=True, group_size=g)
    assert_close(ours2[:, :-1], ours[:, :-1], atol=0, what="ours: no leak")


def test_nsa_branches():
    q, k, v = _qkv(6)
    ones = lambda i: jnp.zeros((3,)).at[i].set(1.0)
    # window branch alone = sliding-window attention
    y = sparse.nsa(q, k, v, causal=True, block_size=3, top_k=1, window_size=4, gates=ones(2))
    assert_close(y, za.softmax_naive(q, k, v, causal=True, window=4), **OUT, what="gates (0,0,1)")
    # top_k = 1: the own block only (it is always selected) = S2 without shift, G = block
    y = sparse.nsa(q, k, v, causal=True, block_size=3, top_k=1)
    assert_close(y, sparse.s2_naive(q, k, v, causal=True, group_size=3, shift_heads=0.0), **OUT, what="top_k=1")
    # block_size 1: the compression branch is full attention
    y = sparse.nsa(q, k, v, causal=True, block_size=1, top_k=1, window_size=1, gates=ones(0))
    assert_close(y, za.softmax_naive(q, k, v, causal=True), **OUT, what="l=1 compression")


def test_nsa_selects_the_best_blocks():
    """One query whose compression scores prefer block 0: selected with its own block (top_k = 2)."""
    d, bs = 4, 2
    k = jnp.zeros((1, 8, 1, d)).at[0, :2, 0, 0].set(5.0)  # block 0 aligned with q
    q = jnp.zeros((1, 8, 1, d)).at[0, :, 0, 0].set(1.0)
    v = jnp.arange(8.0).reshape(1, 8, 1, 1)
    y = sparse.nsa(q, k, v, causal=True, block_size=bs, top_k=2)
    # query 7 sees blocks 0 and 3: keys 0, 1 (logit 2.5), 6, 7 (logit 0)
    w = jnp.exp(jnp.array([2.5, 2.5, 0.0, 0.0]))
    assert_close(y[0, 7, 0, 0], jnp.dot(w, jnp.array([0.0, 1.0, 6.0, 7.0])) / w.sum(), atol=1e-5)


def test_routing_balanced_topw_is_not_causal():
    """Official balanced routing (cluster c takes the w tokens of the sequence with the largest
    scores) depends on later tokens; argmax buckets do not."""
    t, w = 16, 4
    q, _, v = _qkv(8, t=t, hk=H)
    mu = jax.random.normal(jax.random.PRNGKey(2), (H, 4, D))

    def balanced(q, v):
        s = jnp.einsum("bthd,hcd->bhct", sparse._ln(q, 1e-6), mu)  # [B, H, C, T]
        top = jax.lax.top_k(s, w)[1]  # [B, H, C, w]
        member = jnp.any(top[..., None] == jnp.arange(t), axis=-2)  # [B, H, C, T]
        mask = jnp.einsum("bhci,bhcj->bhij", member.astype(jnp.float32), member.astype(jnp.float32)) > 0
        return za.softmax_naive(q, q, v, causal=True, mask=mask)

    y = balanced(q, v)
    q2 = q.at[:, -1].mul(-3.0)  # the last token moves: it enters or leaves clusters, displacing others
    assert float(jnp.abs(balanced(q2, v)[:, :-1] - y[:, :-1]).max()) > 1e-3, "balanced top-w leaks"
    a = sparse.routing(q, q, v, causal=True, centroids=mu)
    a2 = sparse.routing(q2, q2, v, causal=True, centroids=mu)
    assert_close(a2[:, :-1], a[:, :-1], atol=0, what="argmax routing is causal")


def test_routing_assignments_are_per_token_argmax():
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 5, H, D))
    c = sparse.routing_assignments(x, MU)
    xn = np.asarray(x, np.float64)
    xn = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
    expect = np.argmax(np.einsum("bthd,hcd->bthc", xn, np.asarray(MU, np.float64)), -1)
    np.testing.assert_array_equal(np.asarray(c), expect)


def test_bad_options():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_size"):
        sparse.nsa(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="top_k"):
        sparse.nsa(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="window_size"):
        sparse.nsa(q, k, v, gates=_gates())
    with pytest.raises(ValueError, match="gates"):
        sparse.nsa(q, k, v, window_size=2, gates=jnp.ones((B, T, H, 2)))
    with pytest.raises(ValueError, match="group_size"):
        sparse.s2(q, k, v, group_size=0)
    with pytest.raises(ValueError, match="centroids"):
        sparse.routing(q, k, v)
    with pytest.raises(ValueError, match="centroids"):
        sparse.routing(q, k, v, centroids=jnp.ones((H, 2, D + 1)))
