"""Decode-time KV selection (zoo.attention.kv_select): TidalDecode and TokenSelect.

With a budget covering the cache each step equals ``softmax.step`` (float32, ``atol=1e-6``:
the same softmax summed in another order); with a smaller budget the output equals dense
masked softmax over the slots a NumPy argsort picks; bad budgets raise ValueError naming
``budget``; a budget above the capacity is clipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close

B, H, HK, D, E, CAP, P = 2, 4, 2, 8, 5, 12, 9  # P tokens prefilled, capacity CAP


def _setup(seed=0, hk=HK):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, P, H, D))
    k = jax.random.normal(ks[1], (B, P, hk, D))
    v = jax.random.normal(ks[2], (B, P, hk, E))
    cache = za.softmax_prefill(za.init_cache(B, hk, D, CAP, E), q, k, v)[1]
    tok = (jax.random.normal(ks[3], (B, H, D)), jax.random.normal(ks[4], (B, hk, D)),
           jax.random.normal(ks[5], (B, hk, E)))
    return cache, tok


@pytest.mark.parametrize("hk", [HK, pytest.param(H, marks=pytest.mark.slow)])  # CI: grouped heads
@pytest.mark.parametrize("budget", [P + 1, CAP, 100])
def test_full_budget_equals_softmax_step(budget, hk):
    cache, (q_t, k_t, v_t) = _setup(hk=hk)
    y_ref, c_ref = za.softmax_step(cache, q_t, k_t, v_t)
    y, c, idx = jax.jit(lambda c, a, b_, d: za.tidaldecode_step(c, a, b_, d, budget=budget))(cache, q_t, k_t, v_t)
    assert_close(y, y_ref, atol=0, what="tidal selection layer (full attention)")
    assert idx.shape == (B, H, min(budget, CAP))
    y2, c2, _ = za.tidaldecode_step(cache, q_t, k_t, v_t, budget=budget, indices=idx)
    assert_close(y2, y_ref, atol=1e-6, what="tidal reuse layer")
    y3, c3, idx3 = za.tokenselect_step(cache, q_t, k_t, v_t, budget=budget, n_init=1, n_local=2)
    assert_close(y3, y_ref, atol=1e-6, what="tokenselect")
    for cc in (c, c2, c3):
        np.testing.assert_array_equal(np.asarray(cc.pos), np.asarray(c_ref.pos))


def _dense_over(cache, q_t, slots):
    """Reference: softmax over the given slots per (batch, head), written out with NumPy."""
    kc, vc, q = (np.asarray(x, np.float64) for x in (cache.k, cache.v, q_t))
    g = q.shape[1] // kc.shape[2]
    out = np.zeros(q.shape[:2] + (vc.shape[-1],))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = sorted(slots[b][h])
            lg = kc[b, s, h // g] @ q[b, h] / np.sqrt(q.shape[-1])
            w = np.exp(lg - lg.max())
            out[b, h] = (w / w.sum()) @ vc[b, s, h // g]
    return out


def test_tidaldecode_topk_equals_dense_over_argsort():
    cache, (q_t, k_t, v_t) = _setup(1)
    budget = 4
    from zoo.attention.softmax import write
    new = write(cache, k_t[:, None], v_t[:, None])
    idx = za.tidaldecode_select(new, q_t, budget=budget)
    kc, q = np.asarray(new.k, np.float64), np.asarray(q_t, np.float64)
    g = H // HK
    n = int(new.length)
    slots = [[list(np.argsort(-(kc[b, :n, h // g] @ q[b, h]))[:budget]) for h in range(H)] for b in range(B)]
    assert [[sorted(map(int, r)) for r in bb] for bb in np.asarray(idx)] == [[sorted(r) for r in bb] for bb in slots]
    y = za.attend_selected(new, q_t, idx)
    assert_close(y, _dense_over(new, q_t, slots), atol=1e-5, what="attend over top-k")
    # a reuse layer (another layer's cache) attends over the recorded slots
    cache2, (q2, k2, v2) = _setup(2)
    y2, new2, _ = za.tidaldecode_step(cache2, q2, k2, v2, budget=budget, indices=idx)
    assert_close(y2, _dense_over(new2, q2, slots), atol=1e-5, what="reuse layer")


def test_tokenselect_vote():
    cache, (q_t, k_t, v_t) = _setup(3)
    from zoo.attention.softmax import write
    new = write(cache, k_t[:, None], v_t[:, None])
    n = int(new.length)
    n_init, n_local, budget = 2, 3, 2
    idx = np.asarray(za.tokenselect_select(new, q_t, budget=budget, n_init=n_init, n_local=n_local))
    kc, q = np.asarray(new.k, np.float64), np.asarray(q_t, np.float64)
    g = H // HK
    cand = np.arange(n_init, n - n_local)
    for b in range(B):
        vote = np.zeros(len(cand))
        for h in range(H):
            s = kc[b, cand, h // g] @ q[b, h]  # no 1/sqrt(d)
            vote += np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        want = set(range(n_init)) | set(range(n - n_local, n)) | set(cand[np.argsort(-vote)[:budget]].tolist())
        assert set(idx[b, 0].tolist()) == want
    y = za.attend_selected(new, q_t, idx)
    assert_close(y, _dense_over(new, q_t, [[list(idx[b, 0])] * H for b in range(B)]), atol=1e-5, what="attend")


def test_tokenselect_one_head_ranks_by_qk_and_heads_vote_with_mass_one():
    cache, (q_t, k_t, v_t) = _setup(4, hk=H)
    from zoo.attention.softmax import write
    new = write(cache, k_t[:, None], v_t[:, None])
    one = new._replace(k=new.k[:, :, :1], v=new.v[:, :, :1])
    idx = np.asarray(za.tokenselect_select(one, q_t[:, :1], budget=3))
    s = np.einsum("bcd,bd->bc", np.asarray(one.k[:, :P + 1, 0]), np.asarray(q_t[:, 0]))
    for b in range(B):
        assert set(idx[b, 0].tolist()) == set(np.argsort(-s[b])[:3].tolist())
    # head 0 scaled by 1e3: its vote becomes one-hot (mass 1); the other heads still rank the
    # rest, whereas a sum of raw logits would be head 0's own top-3
    big = q_t.at[:, 0].mul(1e3)
    idx_big = np.asarray(za.tokenselect_select(new, big, budget=3))
    kk = np.asarray(new.k[:, :P + 1], np.float64)
    s = np.einsum("bchd,bhd->bhc", kk, np.asarray(big, np.float64))
    soft = np.exp(s - s.max(-1, keepdims=True))
    vote = (soft / soft.sum(-1, keepdims=True)).sum(1)
    raw_top = [set(np.argsort(-s[b].sum(0))[:3].tolist()) for b in range(B)]
    for b in range(B):
        assert set(idx_big[b, 0].tolist()) == set(np.argsort(-vote[b])[:3].tolist())
    assert any(set(idx_big[b, 0].tolist()) != raw_top[b] for b in range(B)), "soft vote differs from logit sum"


def test_bad_budgets():
    cache, (q_t, k_t, v_t) = _setup()
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="budget"):
            za.tidaldecode_select(cache, q_t, budget=bad)
        with pytest.raises(ValueError, match="budget"):
            za.tokenselect_select(cache, q_t, budget=bad)
        with pytest.raises(ValueError, match="budget"):
            za.tidaldecode_step(cache, q_t, k_t, v_t, budget=bad)
    with pytest.raises(ValueError, match="q_t"):
        za.tidaldecode_select(cache, q_t[:, :, :3], budget=2)
    with pytest.raises(ValueError, match="indices"):
        za.attend_selected(cache, q_t, jnp.zeros((B, 3, 2), jnp.int32))
