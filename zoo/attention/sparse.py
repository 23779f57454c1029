"""Mask-producing sparse attention: a selection becomes a boolean mask, then masked softmax.

Every form here is ``f(q, k, v, *, causal=False, ...) -> [batch, q_length, heads, value_dim]``
(wave2.md section 0, shape 1): compute which keys each query may see (static shapes: budgets
are static ints, top-k has a static k), turn it into a boolean mask ``[batch, heads, q_length,
k_length]`` and run the softmax core of :func:`zoo.attention.softmax.softmax` with ``mask=``
(``impl="auto"``: the quadratic form for short inputs, the blockwise form for long ones). A
query that sees no key returns 0 (as softmax). Each ``*_naive`` reference computes the same
selection independently, the obvious way (explicit group / cluster / block loops, argsort
instead of top-k), and runs dense masked softmax (:func:`zoo.attention.softmax.softmax_naive`).

- :func:`s2`: LongLoRA S^2-Attn (Chen et al., ICLR 2024; ``dvlab-research/LongLoRA``
  ``llama_attn_replace.py``) with SinkLoRA's sink tokens (Zhang 2024, paper-level; no released
  code). Tokens are cut into groups of ``G``; heads ``[0, H - n_shift)`` attend inside groups
  ``[mG, (m+1)G)``, the last ``n_shift = int(H * shift_heads)`` heads inside groups shifted by
  ``G // 2``: ``[0, G/2), [G/2, 3G/2), ...`` -- *without wrap-around*, as LongLoRA's flash path
  (``cu_seqlens``). LongLoRA's non-flash path rolls by ``-G/2``, which puts tokens
  ``[0, G/2)`` in one group with ``[n - G/2, n)`` *after* them in rolled order: under the causal
  mask those early tokens see the last tokens, a leak of the future (tests/attention/
  test_sparse.py::test_s2_rolled_leaks_ours_does_not shows it). Here group membership is by
  true position, so ``causal=True`` is exactly causal. ``num_sink`` first tokens are visible
  to every query (SF-Attn's global sinks), causality still applied.
- :func:`nsa`: DeepSeek Native Sparse Attention (Yuan et al. 2025) at transform level, fla's
  naive NSA conventions (``fla/ops/nsa/naive.py``): blocks of ``block_size`` tokens serve both
  compression (stride = length = ``block_size``, mean pooling; the paper's learned MLP is a
  later module) and selection. Compression branch: ``K~_j = mean(k_{jl..jl+l-1})`` (likewise
  ``V~``), block j visible to query t iff ``(j+1) l - 1 <= t`` (causal) or always (non-causal;
  a ragged last block is the mean of its tokens), ``o_cmp = softmax(q.K~^T/sqrt d) V~``.
  Selection: the block scores are the compression probabilities ``p_cmp`` summed over the
  heads of a grouped-query group (one selection per kv head, as the paper); the query's own
  block is always selected (score +inf), blocks after it never (causal); the ``top_k`` best
  blocks (static; clipped to the number of blocks) give the keys ``o_slc`` attends to (causal
  inside them). Sliding branch of ``window_size`` keys. With ``gates`` ``[B, T, H, 3]``
  (compression, selection, window; e.g. ``sigmoid`` of a learned MLP):
  ``o = g_cmp o_cmp + g_slc o_slc + g_win o_win``; without gates ``o = o_slc``. Top-k is not
  differentiable: q, k reach the output through the attention of each branch, the compressed
  keys through ``o_cmp`` only.
- :func:`routing`: Routing Transformer (Roy et al., TACL 2021), *causal argmax-bucket*
  routing with given centroids ``mu [heads, n_clusters, head_dim]`` (learned by k-means EMA in
  a module): ``c(x) = argmax_c LN(x).mu_{h,c}`` (layer norm over d without gain/bias, as the
  official ``layer_norm(scaling=False)``); query i sees key j iff ``c(q_i) = c(k_j)`` (and
  ``j <= i`` when causal). The official training-time routing is *balanced top-w*: cluster c
  takes the w tokens of the whole sequence with the largest scores, so whether token i enters
  a cluster depends on the scores of later tokens and its output changes when a future token
  changes -- not causal even with a causal mask (the test shows it). Argmax buckets decide each
  token's cluster from that token alone, so the causal mask makes the whole map causal. Each
  token lies in exactly one cluster; the official scatter's ``1 / (count + 0.01)`` (a 1% bias
  when count = 1) is not applied. Pass ``k=q`` for the official ``share_qk``.

Shared helpers: :func:`expand_block_mask` (block mask -> token mask), :func:`topk_block_mask`.

Decoding (``*_prefill`` / ``*_step`` on :class:`zoo.attention.softmax.KVCache` of ``max_len``
slots, every token kept): the causal parallel form's rows at the new positions, exact but
O(capacity^2) per call; sparse decode (NSA's compressed cache and block retrieval) is not here
yet. The decode-time selectors (TidalDecode, TokenSelect) are :mod:`zoo.attention.kv_select`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.attention.blockwise import BlockSizes
from zoo.attention.common import as_int, broadcast_to_shape, check_qkv, repeat_kv, shape_str
from zoo.attention.softmax import softmax as _softmax
from zoo.attention.softmax import softmax_naive as _softmax_naive

Array = jax.Array
_F32 = jnp.float32


# ----------------------------------------------------------------------------- shared helpers


def expand_block_mask(block_mask: Array, block_size: int, k_length: int) -> Array:
    """Key-block mask ``[..., n_blocks]`` -> key mask ``[..., k_length]``: key j is visible iff
    its block ``j // block_size`` is (a ragged last block is cut at ``k_length``)."""
    return jnp.repeat(block_mask, block_size, axis=-1)[..., :k_length]


def topk_block_mask(scores: Array, k: int) -> Array:
    """Boolean ``[..., n]``: the ``k`` largest entries of ``scores`` (static ``k``, clipped to
    ``n``) that are ``> -inf`` (``-inf`` marks a block that may not be chosen; ``+inf`` one that
    must be)."""
    n = scores.shape[-1]
    vals, idx = lax.top_k(scores, min(k, n))
    hit = (idx[..., :, None] == jnp.arange(n)) & (vals > -jnp.inf)[..., None]
    return jnp.any(hit, axis=-2)


def _attend(q, k, v, *, causal, mask, impl, block_sizes, window=None):
    return _softmax(q, k, v, causal=causal, mask=mask, window=window, impl=impl, block_sizes=block_sizes)


def _sizes(name: str, value: Any) -> int:
    return as_int(name, value, allow_none=False)


# ----------------------------------------------------------------------------- S2-Attn


def _s2_params(t: int, h: int, group_size: Any, group_ratio: float, shift_heads: float, num_sink: Any):
    if group_size is None:
        if not 0 < group_ratio <= 1:
            raise ValueError(f"group_ratio must be in (0, 1]; got {group_ratio!r}")
        g = max(1, int(t * group_ratio))
    else:
        g = _sizes("group_size", group_size)
    if not 0 <= shift_heads <= 1:
        raise ValueError(f"shift_heads must be a fraction of the heads in [0, 1]; got {shift_heads!r}")
    ns = as_int("num_sink", num_sink, minimum=0, allow_none=False)
    return g, int(h * shift_heads), ns


def s2_mask(length: int, heads: int, *, group_size: int | None = None, group_ratio: float = 0.25,
            shift_heads: float = 0.5, num_sink: int = 0, k_length: int | None = None) -> Array:
    """Boolean ``[heads, length, k_length]`` S^2 / SF visibility (module docstring; causality is
    applied by the attention call): same group ``floor((i + s_h) / G) = floor((j + s_h) / G)``
    with ``s_h = G // 2`` for the shifted heads and 0 for the others, or ``j < num_sink``
    (``k_length`` defaults to ``length``; groups are by position on both sides)."""
    g, n_shift, ns = _s2_params(length, heads, group_size, group_ratio, shift_heads, num_sink)
    tk = length if k_length is None else k_length
    i, j = jnp.arange(length), jnp.arange(tk)
    shift = jnp.where(jnp.arange(heads) >= heads - n_shift, g // 2, 0)[:, None]  # [H, 1]
    gi, gj = (i[None] + shift) // g, (j[None] + shift) // g  # [H, T], [H, Tk]
    return (gi[:, :, None] == gj[:, None, :]) | (j < ns)[None, None, :]


def s2(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    group_size: int | None = None,
    group_ratio: float = 0.25,
    shift_heads: float = 0.5,
    num_sink: int = 0,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Shifted sparse attention (LongLoRA S^2-Attn; SinkLoRA sinks with ``num_sink``).

    Args:
      q ``[batch, length, heads, head_dim]``; k, v ``[batch, length, kv_heads, dim]`` (other
        key lengths when not causal: groups by position on both sides).
      causal: causal inside groups (LongLoRA trains causal LMs); exact: no future leaks.
      group_size: tokens per group ``G`` (default ``max(1, int(length * group_ratio))``; a last
        group may be shorter: ragged lengths are fine).
      shift_heads: fraction of the heads (the last ones) whose groups are shifted by ``G // 2``.
      num_sink: first tokens visible to every query (SF-Attn sinks).
      impl / block_sizes: the softmax core (:func:`zoo.attention.softmax.softmax`).

    Returns ``[batch, length, heads, value_dim]``. Paper: Chen et al., "LongLoRA", ICLR 2024.
    """
    h, _, _ = check_qkv(q, k, v, causal=causal)
    m = s2_mask(q.shape[1], h, group_size=group_size, group_ratio=group_ratio, shift_heads=shift_heads,
                num_sink=num_sink, k_length=k.shape[1])
    return _attend(q, k, v, causal=causal, mask=m[None], impl=impl, block_sizes=block_sizes)


def s2_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, group_size: int | None = None,
    group_ratio: float = 0.25, shift_heads: float = 0.5, num_sink: int = 0,
) -> Array:
    """Reference: the groups listed explicitly per head (``[0, G), [G, 2G), ...`` or
    ``[0, G/2), [G/2, 3G/2), ...``), a NumPy mask, dense masked softmax."""
    h, _, _ = check_qkv(q, k, v, causal=causal)
    t, tk = q.shape[1], k.shape[1]
    g, n_shift, ns = _s2_params(t, h, group_size, group_ratio, shift_heads, num_sink)
    m = np.zeros((h, t, tk), bool)
    for head in range(h):
        start = 0 if head < h - n_shift else -(g // 2)
        for lo in range(start, max(t, tk), g):
            queries = [x for x in range(lo, lo + g) if 0 <= x < t]
            keys = [x for x in range(lo, lo + g) if 0 <= x < tk]
            for a in queries:
                m[head, a, keys] = True
        m[head, :, :ns] = True
    return _softmax_naive(q, k, v, causal=causal, mask=jnp.asarray(m)[None])


# ----------------------------------------------------------------------------- NSA


def _nsa_check(q, k, v, causal, block_size, top_k, window, gates):
    h, hk, g = check_qkv(q, k, v, causal=causal)
    bs = _sizes("block_size", block_size)
    tk = _sizes("top_k", top_k)
    window = as_int("window_size", window)
    b, t = q.shape[:2]
    if gates is not None:
        if window is None:
            raise ValueError("gates weight three branches (compression, selection, window): window_size must be given")
        gates = broadcast_to_shape("gates", gates, (b, t, h, 3), "[batch, length, heads, 3]")
        if not jnp.issubdtype(gates.dtype, jnp.floating):
            raise ValueError(f"gates must be floating point; got {gates.dtype}")
    return h, hk, g, bs, tk, window, gates


def _nsa_combine(gates, o_cmp, o_slc, o_win, dtype):
    if gates is None:
        return o_slc
    g32 = gates.astype(_F32)
    y = sum(g32[..., i, None] * o.astype(_F32) for i, o in enumerate((o_cmp, o_slc, o_win)))
    return y.astype(dtype)


def nsa(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    block_size: int = 64,
    top_k: int = 16,
    window_size: int | None = None,
    gates: Array | None = None,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Native Sparse Attention (module docstring): compression, top-k block selection, window.

    Args:
      q ``[batch, length, heads, head_dim]``; k, v ``[batch, length, kv_heads, dim]``.
      block_size: tokens per compression / selection block (``l = stride = l'``, as fla).
      top_k: blocks each query attends to (the own block included; clipped to the number of
        blocks: ``top_k >= ceil(length / block_size)`` is full attention).
      window_size: sliding-window branch: query i sees ``i - w < j <= i`` (causal) or
        ``|i - j| < w`` (non-causal); needed with gates.
      gates: broadcastable to ``[batch, length, heads, 3]`` (compression, selection, window);
        None: the selection branch alone.

    Returns ``[batch, length, heads, value_dim]``. Paper: Yuan et al., "Native Sparse Attention", 2025.
    """
    h, hk, g, bs, top_k, window, gates = _nsa_check(q, k, v, causal, block_size, top_k, window_size, gates)
    b, t, _, d = q.shape
    tk = k.shape[1]
    nb = -(-tk // bs)
    pad = nb * bs - tk
    # compressed keys / values: block means (a ragged last block: mean of its tokens)
    cnt = jnp.minimum(bs, tk - jnp.arange(nb) * bs).astype(_F32)[None, :, None, None]
    pool = lambda x: jnp.pad(x.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
        b, nb, bs, x.shape[2], x.shape[3]).sum(2) / cnt
    kc, vc = pool(k), pool(v)
    i = jnp.arange(t)[:, None]
    j = jnp.arange(nb)[None, :]
    vis_c = ((j + 1) * bs - 1 <= i) if causal else jnp.ones((t, nb), bool)  # [T, nb]
    # selection scores: compression probabilities, summed over each group's heads
    lg = jnp.einsum("bthd,bnhd->bhtn", q.astype(_F32), repeat_kv(kc, g)) / math.sqrt(d)
    lg = jnp.where(vis_c, lg, -jnp.inf)
    p = jnp.exp(lg - jnp.max(lg, -1, keepdims=True))
    p = jnp.where(vis_c, p, 0.0)
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30)
    score = lax.stop_gradient(p.reshape(b, hk, g, t, nb).sum(2))  # [B, Hk, T, nb]
    own = j == i // bs
    score = jnp.where(own, jnp.inf, score)
    if causal:
        score = jnp.where(j > i // bs, -jnp.inf, score)
    sel = topk_block_mask(score, top_k)  # [B, Hk, T, nb]
    mask = repeat_kv(jnp.moveaxis(expand_block_mask(sel, bs, tk), 1, 2), g)  # [B, T, H, Tk]
    o_slc = _attend(q, k, v, causal=causal, mask=jnp.moveaxis(mask, 2, 1), impl=impl, block_sizes=block_sizes)
    if gates is None:
        return o_slc
    o_cmp = _attend(q, kc.astype(k.dtype), vc.astype(v.dtype), causal=False, mask=vis_c[None, None], impl=impl,
                    block_sizes=block_sizes)
    if causal:
        o_win = _attend(q, k, v, causal=True, mask=None, window=window, impl=impl, block_sizes=block_sizes)
    else:
        near = jnp.abs(jnp.arange(t)[:, None] - jnp.arange(tk)[None, :]) < window
        o_win = _attend(q, k, v, causal=False, mask=near[None, None], impl=impl, block_sizes=block_sizes)
    return _nsa_combine(gates, o_cmp, o_slc, o_win, v.dtype)


def nsa_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, block_size: int = 64, top_k: int = 16,
    window_size: int | None = None, gates: Array | None = None,
) -> Array:
    """Reference: block means by an explicit loop, compression logits masked with -inf and
    ``jax.nn.softmax``, the selection by a descending argsort (first ``top_k`` blocks that are
    allowed), key j visible iff block ``j // block_size`` was chosen; dense masked softmax per
    branch."""
    h, hk, g, bs, top_k, window, gates = _nsa_check(q, k, v, causal, block_size, top_k, window_size, gates)
    b, t, _, d = q.shape
    tk = k.shape[1]
    nb = -(-tk // bs)
    kc = jnp.stack([jnp.mean(k[:, n * bs:(n + 1) * bs].astype(_F32), axis=1) for n in range(nb)], 1)
    vc = jnp.stack([jnp.mean(v[:, n * bs:(n + 1) * bs].astype(_F32), axis=1) for n in range(nb)], 1)
    vis_c = np.ones((t, nb), bool)
    allowed = np.ones((t, nb), bool)
    for ti in range(t):
        for n in range(nb):
            if causal:
                vis_c[ti, n] = (n + 1) * bs - 1 <= ti
                allowed[ti, n] = n <= ti // bs
    kr = jnp.repeat(kc, g, axis=2)
    lg = jnp.einsum("bthd,bnhd->bhtn", q.astype(_F32), kr) / math.sqrt(d)
    p = jax.nn.softmax(jnp.where(vis_c, lg, -jnp.inf), axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)
    p5 = p.reshape(b, hk, g, t, nb)  # head h = kv head h // g
    score = sum(p5[:, :, x] for x in range(g))
    own = np.arange(nb)[None, :] == (np.arange(t) // bs)[:, None]
    score = jnp.where(own, jnp.inf, jnp.where(allowed, score, -jnp.inf))
    order = jnp.argsort(-score, axis=-1)[..., :top_k]  # [B, Hk, T, k]
    ok = jnp.take_along_axis(score, order, axis=-1) > -jnp.inf
    kb = jnp.arange(tk) // bs  # block of each key
    vis = jnp.any((order[..., None] == kb) & ok[..., None], axis=-2)  # [B, Hk, T, T]
    vis = jnp.repeat(vis, g, axis=1)
    o_slc = _softmax_naive(q, k, v, causal=causal, mask=vis)
    if gates is None:
        return o_slc
    o_cmp = _softmax_naive(q, kc, vc, mask=jnp.asarray(vis_c)[None, None])
    if causal:
        o_win = _softmax_naive(q, k, v, causal=True, window=window)
    else:
        near = np.abs(np.arange(t)[:, None] - np.arange(tk)[None, :]) < window
        o_win = _softmax_naive(q, k, v, mask=jnp.asarray(near)[None, None])
    return _nsa_combine(gates, o_cmp, o_slc, o_win, v.dtype)


# ----------------------------------------------------------------------------- Routing


def _routing_check(q, k, v, centroids, eps):
    h, hk, g = check_qkv(q, k, v)
    if centroids is None:
        raise ValueError(f"centroids must be given: [heads={h}, n_clusters, head_dim={q.shape[-1]}]")
    mu = jnp.asarray(centroids)
    if mu.ndim != 3 or mu.shape[0] != h or mu.shape[2] != q.shape[-1] or mu.shape[1] < 1:
        raise ValueError(f"centroids must be [heads={h}, n_clusters, head_dim={q.shape[-1]}]; got {shape_str(mu)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps!r}")
    return h, hk, g, mu.astype(_F32)


def _ln(x: Array, eps: float) -> Array:
    x = x.astype(_F32)
    mu = jnp.mean(x, -1, keepdims=True)
    return (x - mu) * lax.rsqrt(jnp.mean(jnp.square(x - mu), -1, keepdims=True) + eps)


def routing_assignments(x: Array, centroids: Array, *, eps: float = 1e-6) -> Array:
    """Argmax-bucket cluster of each token: ``argmax_c LN(x_t).mu_{h,c}`` for ``x [batch,
    length, heads, head_dim]`` and ``centroids [heads, n_clusters, head_dim]`` -> int ``[batch,
    length, heads]``. Depends on the token alone (the property that makes routing causal)."""
    s = jnp.einsum("bthd,hcd->bthc", _ln(x, eps), lax.stop_gradient(jnp.asarray(centroids, _F32)))
    return jnp.argmax(s, axis=-1)


def routing(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    centroids: Array | None = None,
    eps: float = 1e-6,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Routing attention with argmax buckets (module docstring): query i sees key j iff both are
    routed to the same centroid (per query head; grouped-query keys are routed by each head's
    centroids).

    Args:
      q ``[batch, q_length, heads, head_dim]``; k, v ``[batch, k_length, kv_heads, dim]``.
      centroids: ``[heads, n_clusters, head_dim]`` (no gradient flows to them through the
        routing; a module updates them by k-means EMA).
      eps: layer-norm epsilon of the routing vectors.

    Returns ``[batch, q_length, heads, value_dim]`` (a query whose cluster holds no visible key
    returns 0). Paper: Roy et al., "Efficient Content-Based Sparse Attention with Routing
    Transformers", TACL 2021.
    """
    h, hk, g, mu = _routing_check(q, k, v, centroids, eps)
    cq = routing_assignments(q, mu, eps=eps)  # [B, Tq, H]
    ck = routing_assignments(repeat_kv(k, g), mu, eps=eps)  # [B, Tk, H]
    mask = jnp.moveaxis(cq, 2, 1)[:, :, :, None] == jnp.moveaxis(ck, 2, 1)[:, :, None, :]
    return _attend(q, k, v, causal=causal, mask=mask, impl=impl, block_sizes=block_sizes)


def routing_init_params(key: Array, heads: int, head_dim: int, value_dim: int | None = None, *,
                        n_clusters: int = 8, **_: Any) -> dict[str, Array]:
    """The routing centroids a module owns (the registry's ``init_params``): ``LN(N(0, 1))``
    ``[heads, n_clusters, head_dim]`` as the official initialisation. (The official k-means EMA
    update is not implemented yet: as a module parameter they receive no gradient through the
    argmax routing.)"""
    n_clusters = as_int("n_clusters", n_clusters, allow_none=False)
    return {"centroids": _ln(jax.random.normal(key, (heads, n_clusters, head_dim)), 1e-6)}


def routing_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, centroids: Array | None = None, eps: float = 1e-6,
) -> Array:
    """Reference: layer norm and one dot product per cluster written out, argmax over the stack,
    visibility as the union over clusters of (query in c) x (key in c); dense masked softmax."""
    h, hk, g, mu = _routing_check(q, k, v, centroids, eps)
    kr = jnp.repeat(k, g, axis=2)

    def assign(x):
        x = x.astype(_F32)
        xn = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)
        return jnp.argmax(jnp.stack([(xn * mu[:, c]).sum(-1) for c in range(mu.shape[1])], -1), -1)

    cq, ck = assign(q), assign(kr)
    vis = sum(
        jnp.moveaxis(cq == c, 2, 1)[:, :, :, None] & jnp.moveaxis(ck == c, 2, 1)[:, :, None, :]
        for c in range(mu.shape[1])
    ) > 0
    return _softmax_naive(q, k, v, causal=causal, mask=vis)


# ----------------------------------------------------------------------------- decoding


def _decode_rows(fn, cache, q, k, v, options):
    """Rows ``cache.length ..`` of the causal parallel form ``fn`` over every cached token: the
    queries are placed at their positions in a ``[batch, capacity, heads, dim]`` array (other
    rows are zeros whose outputs are dropped). Exact because every causal form here computes
    row i from ``q_i`` and the keys ``<= i`` alone (its selection included); cost O(capacity^2)
    per call (no sparse decode kernel yet)."""
    from zoo.attention.softmax import KVCache, write  # noqa: PLC0415 - the module shadows its name

    if not isinstance(cache, KVCache):
        raise ValueError(f"state must be a KVCache (from init_state); got {type(cache).__name__}")
    h, _, _ = check_qkv(q, k, v, causal=True)
    cap, t = cache.pos.shape[0], q.shape[1]
    if t > cap:
        raise ValueError(f"q length {t} exceeds the cache capacity max_len={cap} (sparse forms keep every token)")
    start = cache.length
    new = write(cache, k, v)
    qs = lax.dynamic_update_slice(jnp.zeros((q.shape[0], cap) + q.shape[2:], q.dtype), q, (0, start, 0, 0))
    gates = options.get("gates")
    if gates is not None and jnp.ndim(gates) == 4 and jnp.shape(gates)[1] == t:
        gates = jnp.asarray(gates)
        options = {**options, "gates": lax.dynamic_update_slice(
            jnp.zeros((gates.shape[0], cap) + gates.shape[2:], gates.dtype), gates, (0, start, 0, 0))}
    y = fn(qs, new.k, new.v, causal=True, **options)
    return lax.dynamic_slice_in_dim(y, start, t, axis=1), new


def _prefill_fn(fn):
    def prefill(cache: Any, q: Array, k: Array, v: Array, **options: Any) -> tuple[Array, Any]:
        """A prompt on the KV cache (capacity ``max_len``, every token kept): ``(y, cache)``,
        equal to the causal parallel form at those positions."""
        return _decode_rows(fn, cache, q, k, v, options)

    prefill.__name__ = f"{fn.__name__}_prefill"
    return prefill


def _step_fn(fn):
    def step(cache: Any, q_t: Array, k_t: Array, v_t: Array, **options: Any) -> tuple[Array, Any]:
        """One token ``q_t [batch, heads, head_dim]``: :func:`prefill` of one token."""
        from zoo.attention.common import check_token  # noqa: PLC0415

        check_token(q_t, k_t, v_t)
        gates = options.get("gates")
        if gates is not None and jnp.ndim(gates) == 3:  # [batch, heads, 3] for this token
            options = {**options, "gates": jnp.asarray(gates)[:, None]}
        y, cache = _decode_rows(fn, cache, q_t[:, None], k_t[:, None], v_t[:, None], options)
        return y[:, 0], cache

    step.__name__ = f"{fn.__name__}_step"
    return step


s2_prefill, s2_step = _prefill_fn(s2), _step_fn(s2)
nsa_prefill, nsa_step = _prefill_fn(nsa), _step_fn(nsa)
routing_prefill, routing_step = _prefill_fn(routing), _step_fn(routing)
