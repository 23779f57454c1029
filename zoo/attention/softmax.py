"""Softmax attention and its variants from the seed papers, with a KV cache for decoding.

All share one core: logits ``l_ij = scale * q_i.k_j`` (float32; grouped-query heads without
copying k/v), a boolean visibility mask (causal, sliding window, user mask, cache slots), and a
row-wise weight function:

- :func:`softmax`: ``a_ij = exp(l_ij) / (exp(s_h) + sum_j' exp(l_ij'))`` computed with a running
  max; ``s_h`` is an optional learned per-head sink logit (gpt-oss / "softmax-off-by-one" when
  ``s_h = 0``; absent by default). Options: ``window`` (each query sees its last ``window`` keys,
  itself included), ``logn_train_length`` (entropy-invariant scaling, below), additive ``bias``.
- :func:`sigmoid`: ``a_ij = sigmoid(l_ij + b)``, no normalisation, ``b = -log n`` by default
  (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention";
  ``apple/ml-sigmoid-attention``). Masked entries are exactly 0.
- :func:`softplus`: LSSA / LSSAR (Gao & Spratling 2025, arXiv 2501.13428; see its docstring).

Entropy-invariant log-n scaling (Chiang & Cholak 2022; Jin et al. 2023; Entropy-ABF): the
logits of a query that sees ``n_i`` keys are multiplied by ``max(1, log n_i / log T_train)``.

Decoding: :func:`init_cache` / :func:`prefill` / :func:`step` on a fixed-capacity
:class:`KVCache`. When more tokens arrive than the cache holds, the first ``num_sink_tokens``
stay and the rest is a ring buffer of the most recent tokens (StreamingLLM, Xiao et al. 2024;
with ``num_sink_tokens=0`` a plain sliding-window cache). Rotary embeddings are the caller's
(module's) business: StreamingLLM caches keys before RoPE and re-rotates them by cache slot.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention.common import (
    as_int,
    broadcast_mask,
    broadcast_to_shape,
    causal_mask,
    check_choice,
    check_positive_int,
    check_qkv,
    check_token,
    per_head,
    shape_str,
)

Array = jax.Array
VARIANTS = ("softmax", "sigmoid", "softplus")


# ----------------------------------------------------------------------------- weight functions
# Each takes logits lg [B, H, Tq, Tk] (float32), a bool mask of the same shape and per-row
# visible counts n [B, H, Tq, 1] (float32), and returns weights (masked entries exactly 0).


def _softmax_weights(lg, mask, n, *, sink_logit=None):
    lg = jnp.where(mask, lg, -jnp.inf)
    m = jnp.max(lg, axis=-1, keepdims=True)
    if sink_logit is not None:
        m = jnp.maximum(m, sink_logit[None, :, None, None])
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(lg - m), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    if sink_logit is not None:
        den = den + jnp.exp(sink_logit[None, :, None, None] - m)
    # A row that sees no key (and no sink) gets all-zero weights instead of NaN.
    return p / jnp.where(den > 0, den, 1.0)


def _sigmoid_weights(lg, mask, n, *, bias):
    return jnp.where(mask, jax.nn.sigmoid(lg + bias), 0.0)


def _softplus_weights(lg, mask, n, *, reweight, power, delta, eps):
    a = jnp.where(mask, jax.nn.softplus(lg), 0.0)
    a = a / (jnp.sum(a, axis=-1, keepdims=True) + eps)
    if not reweight:
        return a
    # LSSAR: w = relu(n a - delta)^p, renormalised. (n a - 1)^15 overflows float32 at n = 8192,
    # so it is computed as exp(p log(.) - max) (the ratio is unchanged by the shift).
    x = n * a - delta
    pos = mask & (x > 0)
    logw = jnp.where(pos, power * jnp.log(jnp.where(pos, x, 1.0)), -jnp.inf)
    mx = jnp.max(logw, axis=-1, keepdims=True)
    mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    w = jnp.where(pos, jnp.exp(logw - mx), 0.0)
    return w / (jnp.sum(w, axis=-1, keepdims=True) + eps)


# ----------------------------------------------------------------------------- core


def _logits(q: Array, k: Array, scale: float) -> Array:
    """``[B, Tq, H, D] x [B, Tk, Hkv, D] -> [B, H, Tq, Tk]`` float32 without repeating k."""
    b, tq, h, d = q.shape
    hk = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, tq, hk, h // hk, d)
    lg = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32))
    return lg.reshape(b, h, tq, k.shape[1]) * scale


def _apply(w: Array, v: Array, dtype) -> Array:
    """``[B, H, Tq, Tk] x [B, Tk, Hkv, Dv] -> [B, Tq, H, Dv]``."""
    b, h, tq, tk = w.shape
    hk = v.shape[2]
    wg = w.reshape(b, hk, h // hk, tq, tk)
    out = jnp.einsum("bkgqs,bskd->bqkgd", wg, v.astype(jnp.float32))
    return out.reshape(b, tq, h, v.shape[-1]).astype(dtype)


def _logn_factor(n: Array, train_length: int | None) -> Array | float:
    if train_length is None:
        return 1.0
    return jnp.maximum(1.0, jnp.log(jnp.maximum(n, 1.0)) / math.log(train_length))


def _attend(
    q, k, v, mask, *, variant: str, scale, bias, sink_logit, logn_train_length, softplus_opts,
) -> Array:
    """Shared by the parallel forms and :func:`step`: ``mask [B, H, Tq, Tk]`` bool."""
    b, tq, h, d = q.shape
    n = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)
    if variant == "softplus":
        qn = q.astype(jnp.float32)
        kn = k.astype(jnp.float32)
        qn = qn / jnp.maximum(jnp.linalg.norm(qn, axis=-1, keepdims=True), 1e-12)
        kn = kn / jnp.maximum(jnp.linalg.norm(kn, axis=-1, keepdims=True), 1e-12)
        lg = _logits(qn, kn, 1.0) * (math.log(d) * jnp.log(jnp.maximum(n, 1.0)))
        w = _softplus_weights(lg, mask, n, **softplus_opts)
        return _apply(w, v, v.dtype)
    lg = _logits(q, k, scale) * _logn_factor(n, logn_train_length)
    if bias is not None and variant == "softmax":
        lg = lg + bias
    if variant == "softmax":
        w = _softmax_weights(lg, mask, n, sink_logit=sink_logit)
    else:
        w = _sigmoid_weights(lg, mask, n, bias=bias)
    return _apply(w, v, v.dtype)


def _parallel(
    q, k, v, *, variant, causal, mask, scale, window, bias=None, sink_logit=None,
    logn_train_length=None, softplus_opts=None,
):
    check_qkv(q, k, v, causal=causal)
    b, tq, h, d = q.shape
    window = as_int("window", window)
    logn_train_length = as_int("logn_train_length", logn_train_length)
    if logn_train_length == 1:
        raise ValueError("logn_train_length must be >= 2 (log 1 = 0)")
    tk = k.shape[1]
    vis = jnp.ones((1, 1, tq, tk), bool)
    if causal:
        vis = causal_mask(tq, tk, window)[None, None]
    elif window is not None:
        raise ValueError("window needs causal=True (a sliding window looks back from each query)")
    if mask is not None:
        vis = vis & broadcast_mask("mask", mask, b, h, tq, tk)
    vis = jnp.broadcast_to(vis, (b, h, tq, tk))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if sink_logit is not None:
        sink_logit = per_head("sink_logit", sink_logit, h)
    if bias is not None and variant == "softmax":
        bias = broadcast_to_shape("bias", bias, (b, h, tq, tk), "[batch, heads, q_length, k_length]")
    return _attend(
        q, k, v, vis, variant=variant, scale=scale, bias=bias, sink_logit=sink_logit,
        logn_train_length=logn_train_length, softplus_opts=softplus_opts,
    )


# ----------------------------------------------------------------------------- public API


def softmax(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    mask: Array | None = None,
    scale: float | None = None,
    window: int | None = None,
    bias: Array | None = None,
    sink_logit: Array | None = None,
    logn_train_length: int | None = None,
) -> Array:
    """Scaled dot-product softmax attention ``y_i = sum_j a_ij v_j``.

    ``a_ij = exp(l_ij) / (exp(s_h) + sum_{j' visible} exp(l_ij'))`` with
    ``l_ij = c_i * scale * q_i.k_j + bias_ij``, ``c_i = max(1, log n_i / log logn_train_length)``
    (1 when ``logn_train_length`` is None) and the sink term only when ``sink_logit`` is given.

    Args:
      q ``[batch, q_length, heads, head_dim]``; k ``[batch, k_length, kv_heads, head_dim]``;
      v ``[batch, k_length, kv_heads, value_dim]`` (grouped-query: ``heads % kv_heads == 0``).
      causal: key j visible to query i iff ``j <= i``.
      mask: bool, broadcastable to ``[batch, heads, q_length, k_length]``; True = visible.
      scale: default ``1/sqrt(head_dim)``.
      window: causal sliding window: query i sees keys ``i - window < j <= i``.
      bias: additive logits, broadcastable to ``[batch, heads, q_length, k_length]``.
      sink_logit: ``[heads]`` learned sink logit ``s_h`` (an "attend to nothing" slot).
      logn_train_length: training length ``T`` for entropy-invariant log-n scaling.

    Returns ``[batch, q_length, heads, value_dim]`` in ``v.dtype``; a query that sees no key
    returns 0. Paper: Vaswani et al. 2017; sinks: Xiao et al. 2024 / gpt-oss; log-n: Jin et al. 2023.
    """
    return _parallel(
        q, k, v, variant="softmax", causal=causal, mask=mask, scale=scale, window=window,
        bias=bias, sink_logit=sink_logit, logn_train_length=logn_train_length,
    )


def _naive_logits_and_mask(q, k, v, *, causal, mask, scale, window):
    """Reference helper: k/v heads repeated, ``[B, H, Tq, Tk]`` float32 logits and visibility."""
    check_qkv(q, k, v, causal=causal)
    h, hk = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, h // hk, axis=2), jnp.repeat(v, h // hk, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    lg = jnp.einsum("bqhd,bkhd->bhqk", f32(q), f32(k)) * scale
    vis = jnp.ones(lg.shape, bool)
    if causal:
        vis = vis & causal_mask(q.shape[1], k.shape[1], window)
    if mask is not None:
        vis = vis & jnp.asarray(mask, bool)
    return lg, vis, f32(v)


def softmax_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None,
    scale: float | None = None, window: int | None = None, bias: Array | None = None,
    sink_logit: Array | None = None, logn_train_length: int | None = None,
) -> Array:
    """Reference: ``jax.nn.softmax`` over explicitly masked logits with k/v heads repeated; the
    sink is an extra logit column dropped after the softmax; log-n scaling from the row counts."""
    lg, vis, v = _naive_logits_and_mask(q, k, v, causal=causal, mask=mask, scale=scale, window=window)
    if logn_train_length is not None:
        n = jnp.sum(vis, axis=-1, keepdims=True)
        lg = lg * jnp.maximum(1.0, jnp.log(jnp.maximum(n, 1)) / math.log(logn_train_length))
    if bias is not None:
        lg = lg + bias
    lg = jnp.where(vis, lg, -jnp.inf)
    if sink_logit is not None:
        sink = jnp.broadcast_to(jnp.asarray(sink_logit, jnp.float32)[None, :, None, None], lg.shape[:3] + (1,))
        lg = jnp.concatenate([lg, sink], axis=-1)
    w = jax.nn.softmax(lg, axis=-1)
    w = jnp.where(jnp.isnan(w), 0.0, w)[..., : vis.shape[-1]]  # rows that see nothing -> 0
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).astype(v.dtype)


def sigmoid_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None,
    scale: float | None = None, bias: float | None = None, window: int | None = None,
) -> Array:
    """Reference: ``sum_j [visible] sigmoid(l_ij + b) v_j`` with ``b = -log(k_length)`` by default."""
    lg, vis, v = _naive_logits_and_mask(q, k, v, causal=causal, mask=mask, scale=scale, window=window)
    b = -math.log(k.shape[1]) if bias is None else bias
    w = jnp.where(vis, jax.nn.sigmoid(lg + b), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).astype(v.dtype)


def softplus_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None,
    window: int | None = None, reweight: bool = False, power: float = 15.0, delta: float = 1.0,
    eps: float = 1e-8,
) -> Array:
    """Reference: LSSA / LSSAR written directly (``relu(n a - delta)^p`` without the log-domain
    shift, then divided by the row max; exact while it does not overflow, i.e. at test sizes)."""
    d = q.shape[-1]
    nq = q / jnp.maximum(jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    nk = k / jnp.maximum(jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    lg, vis, v = _naive_logits_and_mask(nq, nk, v, causal=causal, mask=mask, scale=1.0, window=window)
    n = jnp.sum(vis, axis=-1, keepdims=True).astype(jnp.float32)
    a = jnp.where(vis, jax.nn.softplus(lg * math.log(d) * jnp.log(jnp.maximum(n, 1.0))), 0.0)
    a = a / (jnp.sum(a, axis=-1, keepdims=True) + eps)
    if reweight:
        dl = jnp.where(jnp.arange(q.shape[1]) < 3, 0.0, delta)[None, None, :, None]
        w = jnp.where(vis, jnp.maximum(n * a - dl, 0.0) ** power, 0.0)
        mx = jnp.max(w, axis=-1, keepdims=True)
        w = w / jnp.where(mx > 0, mx, 1.0)  # the documented convention: eps after the max shift
        a = w / (jnp.sum(w, axis=-1, keepdims=True) + eps)
    return jnp.einsum("bhqk,bkhd->bqhd", a, v).astype(v.dtype)


def sigmoid(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    mask: Array | None = None,
    scale: float | None = None,
    bias: float | None = None,
    window: int | None = None,
) -> Array:
    """Sigmoid attention ``y_i = sum_{j visible} sigmoid(scale * q_i.k_j + b) v_j`` (no normalisation).

    ``b`` defaults to ``-log(k_length)`` (the same for every query, also when causal, as the
    FlashSigmoid reference); pass the configured maximum length's ``-log n`` to match a model
    trained at another length. Shapes as :func:`softmax`. Paper: Ramapuram et al. 2024
    (arXiv 2409.04431).
    """
    check_qkv(q, k, v, causal=causal)
    b_ = -math.log(k.shape[1]) if bias is None else bias
    return _parallel(
        q, k, v, variant="sigmoid", causal=causal, mask=mask, scale=scale, window=window, bias=b_,
    )


def softplus(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    mask: Array | None = None,
    window: int | None = None,
    reweight: bool = False,
    power: float = 15.0,
    delta: float = 1.0,
    eps: float = 1e-8,
) -> Array:
    """Length-scaled softplus attention LSSA, and with ``reweight=True`` LSSAR.

    LSSA: ``a_ij = softplus(log d * log n_i * q^_i.k^_j) / (sum_j' softplus(...) + eps)`` with
    L2-normalised ``q^, k^``, head dim ``d`` and ``n_i`` the number of keys query i sees.
    LSSAR: ``w_ij = relu(n_i a_ij - delta_i)^p / (sum_j' relu(...)^p + eps)`` with
    ``delta_i = 0`` for the first three positions and ``delta`` after, computed in the log domain
    (``exp(p log(.) - max)``) so it stays finite at any length; ``eps`` is added after that
    shift, so a row whose re-weighted entries are tiny but positive is still normalised to 1
    (the direct form would let ``eps`` swamp it). A uniform row (every ``n a <= delta``) gives
    all-zero weights and output 0.

    Form implemented: Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length
    Extrapolation in Large Language Models" (arXiv 2501.13428), as written in the public
    third-party reproduction ``lssa_attention`` / ``lssar_attention`` (p = 15, delta = 1); the
    authors' code (iminfine/freeatten) could not be read, so the exact scale factor is that
    reproduction's, not checked against the official code.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0; got {power!r}")
    opts = {"reweight": reweight, "power": float(power), "delta": float(delta), "eps": float(eps)}
    if reweight:
        tq = q.shape[1]
        opts["delta"] = jnp.where(jnp.arange(tq) < 3, 0.0, float(delta))[None, None, :, None]
    return _parallel(
        q, k, v, variant="softplus", causal=causal, mask=mask, scale=None, window=window,
        softplus_opts=opts,
    )


def sliding_window(
    q: Array, k: Array, v: Array, *, causal: bool = False, window: int, mask: Array | None = None,
    scale: float | None = None, bias: Array | None = None, sink_logit: Array | None = None,
    logn_train_length: int | None = None,
) -> Array:
    """Causal sliding-window softmax attention: query i sees keys ``i - window < j <= i``
    (causal only: pass ``causal=True``). Options as :func:`softmax`."""
    if causal is not True:
        raise ValueError(f"sliding_window attention is causal only: pass causal=True; got causal={causal!r}")
    return softmax(q, k, v, causal=True, window=window, mask=mask, scale=scale, bias=bias,
                   sink_logit=sink_logit, logn_train_length=logn_train_length)


# ----------------------------------------------------------------------------- decoding


class KVCache(NamedTuple):
    """Fixed-capacity key/value cache.

    k: ``[batch, capacity, kv_heads, head_dim]``; v: ``[batch, capacity, kv_heads, value_dim]``;
    pos: ``[capacity]`` int32 absolute position of the token in each slot (-1 = empty);
    length: ``[]`` int32 number of tokens written so far.
    """

    k: Array
    v: Array
    pos: Array
    length: Array


def init_cache(
    batch: int, kv_heads: int, head_dim: int, capacity: int, value_dim: int | None = None,
    dtype: Any = jnp.float32,
) -> KVCache:
    """An empty :class:`KVCache` holding ``capacity`` tokens."""
    check_positive_int("capacity", capacity, allow_none=False)
    e = head_dim if value_dim is None else value_dim
    return KVCache(
        jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
        jnp.zeros((batch, capacity, kv_heads, e), dtype),
        jnp.full((capacity,), -1, jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def init_state(
    batch: int, heads: int, head_dim: int, value_dim: int | None = None, *,
    kv_heads: int | None = None, max_len: int | None = None, dtype: Any = None,
    window: int | None = None,
) -> KVCache:
    """The decoding state of the softmax family (the registry's uniform ``init_state``): an empty
    :class:`KVCache` of ``max_len`` slots for ``kv_heads`` heads, or ``min(max_len, window)`` slots
    (a ring buffer) with a sliding ``window``; ``dtype`` defaults to float32."""
    max_len = as_int("max_len", max_len, allow_none=False) if max_len is not None else None
    if max_len is None:
        raise ValueError("max_len: a KV cache needs max_len (the number of tokens it holds); got None")
    window = as_int("window", window)
    cap = max_len if window is None else min(max_len, window)
    return init_cache(batch, heads if kv_heads is None else kv_heads, head_dim, cap, value_dim,
                      jnp.float32 if dtype is None else dtype)


def _slot(t: Array, capacity: int, num_sink_tokens: int) -> Array:
    """Slot of absolute position ``t``: sinks keep slots ``0..ns-1``, the rest is a ring."""
    ring = capacity - num_sink_tokens
    return jnp.where(t < capacity, t, num_sink_tokens + (t - num_sink_tokens) % ring)


def _check_sinks(num_sink_tokens: Any, capacity: int) -> int:
    ns = as_int("num_sink_tokens", num_sink_tokens, minimum=0, allow_none=False)
    if ns >= capacity:
        raise ValueError(f"num_sink_tokens must be an int in [0, capacity={capacity}); got {num_sink_tokens!r}")
    return ns


def _check_cache(cache: Any) -> None:
    if not isinstance(cache, KVCache):
        raise ValueError(f"state must be a KVCache (from init_state / init_cache); got {type(cache).__name__}")


def write(cache: KVCache, k: Array, v: Array, *, num_sink_tokens: int = 0) -> KVCache:
    """Writes ``k [batch, T, kv_heads, head_dim]``, ``v [batch, T, kv_heads, value_dim]`` into the
    cache (no attention), as ``T`` calls of :func:`step` would: tokens that a later one evicts are
    never written."""
    _check_cache(cache)
    cap = cache.pos.shape[0]
    num_sink_tokens = _check_sinks(num_sink_tokens, cap)
    if k.ndim != 4 or k.shape[0] != cache.k.shape[0] or k.shape[2:] != cache.k.shape[2:]:
        raise ValueError(
            f"k must be [batch={cache.k.shape[0]}, length, {cache.k.shape[2]}, {cache.k.shape[3]}]; got {shape_str(k)}"
        )
    if v.shape[:2] != k.shape[:2] or v.shape[2:] != cache.v.shape[2:]:
        raise ValueError(
            f"v must be [{k.shape[0]}, {k.shape[1]}, {cache.v.shape[2]}, {cache.v.shape[3]}]; got {shape_str(v)}"
        )
    t = cache.length + jnp.arange(k.shape[1], dtype=jnp.int32)
    end = cache.length + k.shape[1]
    keep = (t < num_sink_tokens) | (t >= end - (cap - num_sink_tokens)) | (end <= cap)
    slot = jnp.where(keep, _slot(t, cap, num_sink_tokens), cap)  # cap = out of bounds -> dropped
    return KVCache(
        cache.k.at[:, slot].set(k.astype(cache.k.dtype), mode="drop"),
        cache.v.at[:, slot].set(v.astype(cache.v.dtype), mode="drop"),
        cache.pos.at[slot].set(t, mode="drop"),
        end,
    )


def prefill(
    cache: KVCache, q: Array, k: Array, v: Array, *,
    variant: str = "softmax",
    num_sink_tokens: int = 0,
    scale: float | None = None,
    window: int | None = None,
    bias: float | None = None,
    sink_logit: Array | None = None,
    logn_train_length: int | None = None,
    reweight: bool = False,
    power: float = 15.0,
    delta: float = 1.0,
    eps: float = 1e-8,
) -> tuple[Array, KVCache]:
    """A prompt in one parallel call on the cache: ``q [batch, T, heads, head_dim]``, ``k, v
    [batch, T, kv_heads, dim]`` at positions ``cache.length ..``; returns ``(y [batch, T, heads,
    value_dim], cache)``, equal to ``T`` calls of :func:`step`.

    Query ``t`` attends over the cached tokens and the prompt's tokens ``<= t`` that the cache
    would still hold at step ``t``: all while ``t < capacity``, afterwards the first
    ``num_sink_tokens`` and the last ``capacity - num_sink_tokens`` (StreamingLLM), and only
    those inside ``window``. New k/v are cast to the cache dtype first (as :func:`step` stores
    them). ``variant`` is ``"softmax" | "sigmoid" | "softplus"`` with the parallel functions'
    options; sigmoid's ``bias`` defaults to ``-log(capacity)`` (pass ``-log(T)`` to match a
    parallel call over ``T`` keys).
    """
    check_choice("variant", variant, VARIANTS)
    _check_cache(cache)
    check_qkv(q, k, v, causal=True)
    cap = cache.pos.shape[0]
    ns = _check_sinks(num_sink_tokens, cap)
    window = as_int("window", window)
    new = write(cache, k, v, num_sink_tokens=ns)
    b, t, h, d = q.shape
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
    vals = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    qpos = cache.length + jnp.arange(t, dtype=jnp.int32)  # [T]
    kpos = jnp.concatenate([cache.pos, qpos])  # [cap + T], -1 = empty slot
    qi, kj = qpos[:, None], kpos[None, :]
    vis = (kj >= 0) & (kj <= qi) & ((qi < cap) | (kj < ns) | (kj > qi - (cap - ns)))
    if window is not None:
        vis = vis & (kj > qi - window)
    vis = jnp.broadcast_to(vis[None, None], (b, h, t, cap + t))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if sink_logit is not None:
        sink_logit = per_head("sink_logit", sink_logit, h)
    opts = None
    if variant == "softplus":
        if not power > 0:
            raise ValueError(f"power must be > 0; got {power!r}")
        opts = {"reweight": reweight, "power": float(power), "eps": float(eps),
                "delta": jnp.where(qpos < 3, 0.0, float(delta))[None, None, :, None]}
    if variant == "sigmoid" and bias is None:
        bias = -math.log(cap)
    y = _attend(
        q, keys, vals, vis, variant=variant, scale=scale, bias=bias, sink_logit=sink_logit,
        logn_train_length=logn_train_length, softplus_opts=opts,
    )
    return y, new


def step(cache: KVCache, q_t: Array, k_t: Array, v_t: Array, **options: Any) -> tuple[Array, KVCache]:
    """One decoding step: :func:`prefill` of one token ``q_t [batch, heads, head_dim]``,
    ``k_t [batch, kv_heads, head_dim]``, ``v_t [batch, kv_heads, value_dim]`` (same options);
    returns ``(y_t [batch, heads, value_dim], cache)``. While ``length <= capacity`` (and no
    window) this equals the causal parallel form at that position."""
    check_token(q_t, k_t, v_t)
    y, cache = prefill(cache, q_t[:, None], k_t[:, None], v_t[:, None], **options)
    return y[:, 0], cache
