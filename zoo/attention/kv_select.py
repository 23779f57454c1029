"""Decode-time KV selection: pick ``budget`` cache slots per step, attend over them only.

Shape 2 of wave2.md section 0: ``select(cache, q_t, ...) -> indices [batch, G, K]`` (``G`` = 1,
``kv_heads`` or ``heads``: one selection shared by all heads, per kv head or per query head),
then :func:`attend_selected` ``(cache, q_t, indices) -> y_t [batch, heads, value_dim]`` over the
existing :class:`zoo.attention.softmax.KVCache` (slots with ``pos = -1`` are empty and never
attended). The caller writes the new token first (:func:`zoo.attention.softmax.write`): the
selection includes the current token, as both papers. ``*_step`` do write + select + attend.

These are decode-time only (prefill is full attention in both papers), so they do not fit the
``Transform`` contract (a parallel form with an exact step): they are exported as functions in
``zoo.attention``, not registered. The cross-layer policy of TidalDecode (which layers select,
which reuse) belongs to the model's decode loop, which passes ``indices`` from layer to layer;
slot indices are valid across layers because every layer's cache writes a position to the same
slot.

Budget rule (one rule for both): ``budget`` must be a positive int (else ValueError naming
``budget``); a budget above the cache capacity is clipped to the capacity, and while the cache
holds fewer tokens than the budget every written slot is selected (so ``budget >= length`` is
exactly full attention, :func:`zoo.attention.softmax.step`).

- TidalDecode (Yang et al. 2024, ``DerrickYLJ/TidalDecode`` ``modify_llama.py``): per query
  head, the ``K`` slots with the largest raw logits ``q_h.k_{g(h),j} / sqrt(d)``
  (:func:`tidaldecode_select`); a selection layer attends fully and records them, later layers
  attend over the recorded slots (:func:`tidaldecode_step` with ``indices``).
- TokenSelect (arXiv 2411.02886, ``pzs19/TokenSelect`` ``token_retrieval.py``): one selection per
  token shared by all heads, by soft voting ``v_j = sum_h softmax_j(q_h.k_{g(h),j})`` over the
  candidates (no ``1/sqrt d``; each head has total vote 1), always keeping the first ``n_init``
  and the last ``n_local`` positions (:func:`tokenselect_select`). Not here: the paper's RoPE
  re-rotation by compacted slot index (the released code caches keys before RoPE and rotates the
  query as ``n_local`` positions after each key) and its selection cache (disabled in the
  release).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from zoo.attention.common import as_int, check_token, shape_str
from zoo.attention.softmax import KVCache, write
from zoo.attention.softmax import step as _softmax_step

Array = jax.Array
_F32 = jnp.float32


def _check(cache: Any, q_t: Array) -> tuple[int, int, int]:
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache (zoo.attention.softmax); got {type(cache).__name__}")
    b, _, hk, d = cache.k.shape
    if getattr(q_t, "ndim", None) != 3 or q_t.shape[0] != b or q_t.shape[2] != d or q_t.shape[1] % hk:
        raise ValueError(f"q_t must be [batch={b}, heads (a multiple of {hk}), head_dim={d}]; got {shape_str(q_t)}")
    return q_t.shape[1], hk, q_t.shape[1] // hk


def _budget(budget: Any, capacity: int) -> int:
    return min(as_int("budget", budget, allow_none=False), capacity)


def _logits(cache: KVCache, q_t: Array, g: int) -> Array:
    """``q_h . k_{h // g, j}`` as ``[batch, heads, capacity]`` (float32, unscaled)."""
    b, hq, d = q_t.shape
    q4 = q_t.astype(_F32).reshape(b, hq // g, g, d)
    return jnp.einsum("bkgd,bckd->bkgc", q4, cache.k.astype(_F32)).reshape(b, hq, -1)


def _top(scores: Array, k: int) -> Array:
    """Indices of the ``k`` largest scores, in slot order."""
    return jnp.sort(lax.top_k(scores, k)[1], axis=-1)


def attend_selected(cache: KVCache, q_t: Array, indices: Array, *, scale: float | None = None) -> Array:
    """Softmax attention of ``q_t [batch, heads, head_dim]`` over the cache slots ``indices
    [batch, G, K]`` (``G`` = 1, kv_heads or heads); empty slots (``pos < 0``) are skipped and a
    row with none returns 0. Returns ``[batch, heads, value_dim]`` in the cache's value dtype."""
    hq, hk, g = _check(cache, q_t)
    idx = jnp.asarray(indices)
    b = q_t.shape[0]
    if idx.ndim != 3 or idx.shape[0] != b or idx.shape[1] not in (1, hk, hq) or not jnp.issubdtype(idx.dtype,
                                                                                                  jnp.integer):
        raise ValueError(f"indices must be ints [batch={b}, 1 | kv_heads={hk} | heads={hq}, K]; got {shape_str(idx)}")
    if idx.shape[1] == hk and hk != hq:
        idx = jnp.repeat(idx, g, axis=1)
    idx = jnp.broadcast_to(idx, (b, hq, idx.shape[2]))
    kv_head = jnp.arange(hq) // g  # [H]
    kk = cache.k[jnp.arange(b)[:, None, None], idx, kv_head[None, :, None]].astype(_F32)  # [B, H, K, D]
    vv = cache.v[jnp.arange(b)[:, None, None], idx, kv_head[None, :, None]].astype(_F32)  # [B, H, K, E]
    ok = cache.pos[idx] >= 0
    s = (1.0 / math.sqrt(q_t.shape[-1])) if scale is None else scale
    lg = jnp.where(ok, jnp.einsum("bhd,bhkd->bhk", q_t.astype(_F32), kk) * s, -jnp.inf)
    m = jnp.max(lg, -1, keepdims=True)
    p = jnp.where(ok, jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30)
    return jnp.einsum("bhk,bhke->bhe", p, vv).astype(cache.v.dtype)


def tidaldecode_select(cache: KVCache, q_t: Array, *, budget: int, scale: float | None = None) -> Array:
    """TidalDecode's selection: per query head the ``K = min(budget, capacity)`` slots with the
    largest ``q_h.k_j`` (empty slots last). Returns int ``[batch, heads, K]`` in slot order."""
    _, _, g = _check(cache, q_t)
    k = _budget(budget, cache.pos.shape[0])
    lg = _logits(cache, q_t, g)
    return _top(jnp.where(cache.pos >= 0, lg, -jnp.inf), k)


def tokenselect_select(cache: KVCache, q_t: Array, *, budget: int, n_init: int = 0, n_local: int = 0) -> Array:
    """TokenSelect's selection, shared by all heads: the first ``n_init`` and last ``n_local``
    written positions always, plus the ``budget`` candidates with the largest soft vote
    ``sum_h softmax_j(q_h.k_{g(h),j})`` (softmax over the candidates); ``K = min(n_init + budget +
    n_local, capacity)``. Returns int ``[batch, 1, K]`` in slot order."""
    _, _, g = _check(cache, q_t)
    n_init = as_int("n_init", n_init, minimum=0, allow_none=False)
    n_local = as_int("n_local", n_local, minimum=0, allow_none=False)
    k = min(as_int("budget", budget, allow_none=False) + n_init + n_local, cache.pos.shape[0])
    pos, length = cache.pos, cache.length
    valid = pos >= 0
    forced = valid & ((pos < n_init) | (pos >= length - n_local))
    cand = valid & ~forced
    lg = jnp.where(cand, _logits(cache, q_t, g), -jnp.inf)  # [B, H, cap]
    m = jnp.max(lg, -1, keepdims=True)
    e = jnp.where(cand, jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    vote = jnp.sum(e / jnp.maximum(jnp.sum(e, -1, keepdims=True), 1e-30), axis=1)  # [B, cap]
    score = jnp.where(forced, jnp.inf, jnp.where(cand, vote, -jnp.inf))
    return _top(score, k)[:, None]


def tidaldecode_step(
    cache: KVCache, q_t: Array, k_t: Array, v_t: Array, *, budget: int, indices: Array | None = None,
    scale: float | None = None,
) -> tuple[Array, KVCache, Array]:
    """One TidalDecode step of one layer: writes the token, then ``indices=None`` (a selection
    layer): full attention (:func:`zoo.attention.softmax.step`) and this step's selection;
    ``indices`` given (a reuse layer): attention over those slots. Returns ``(y_t [batch, heads,
    value_dim], cache, indices)``."""
    check_token(q_t, k_t, v_t)
    _budget(budget, cache.pos.shape[0])
    if indices is None:
        y, new = _softmax_step(cache, q_t, k_t, v_t, scale=scale)
        return y, new, tidaldecode_select(new, q_t, budget=budget, scale=scale)
    new = write(cache, k_t[:, None], v_t[:, None])
    return attend_selected(new, q_t, indices, scale=scale), new, indices


def tokenselect_step(
    cache: KVCache, q_t: Array, k_t: Array, v_t: Array, *, budget: int, n_init: int = 0, n_local: int = 0,
    scale: float | None = None,
) -> tuple[Array, KVCache, Array]:
    """One TokenSelect step of one layer: write, select (:func:`tokenselect_select`), attend.
    Returns ``(y_t [batch, heads, value_dim], cache, indices [batch, 1, K])``."""
    check_token(q_t, k_t, v_t)
    new = write(cache, k_t[:, None], v_t[:, None])
    idx = tokenselect_select(new, q_t, budget=budget, n_init=n_init, n_local=n_local)
    return attend_selected(new, q_t, idx, scale=scale), new, idx
