"""Positional attention (Back de Luca et al., ICML 2025): weights from positional encodings only.

With fixed positional encodings ``P [length, pos_dim]`` (one-hot by default in the paper, see
:func:`identity_encoding`) and per-head projections, head ``h`` attends with

    Q_h = P W_Q[h] + b_Q[h],   K_h = P W_K[h] + b_K[h]          ([length, qk_dim] each)
    A_h = softmax(Q_h K_h^T * scale)                           (scale = 1/sqrt(qk_dim))
    y[b, i, h] = sum_j A_h[i, j] v[b, j, h]

so ``A`` depends on neither the input nor the batch element and is computed once per length
(:func:`positional_weights`), then applied to values already projected from the input and split
into heads (:func:`positional_apply`; ``V_h = X W_V[h]``, and the output projection ``W_O`` are
the module's). In the paper ``qk_dim = pos_dim`` (q/k are not split across heads), so the scale is
``1/sqrt(pos_dim)``, not ``1/sqrt(model_dim / heads)``. Non-causal as in the paper; ``causal=True``
restricts query ``i`` to keys ``j <= i``.

Kernels use the ``x @ W`` convention: ``w_q, w_k [heads, pos_dim, qk_dim]`` (the transpose of a
PyTorch ``nn.Linear`` weight block).

Paper: Back de Luca, Giapitzakis, Yang, Velickovic, Fountoulakis, "Positional Attention:
Expressivity and Learnability of Algorithmic Computation" (ICML 2025, arXiv 2410.01686);
code: ``opallab/positional_attention``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from zoo.attention.common import causal_mask, check_float, check_positive_int, check_rank, repeat_kv, shape_str

Array = jax.Array


def identity_encoding(length: int, dim: int | None = None) -> Array:
    """One-hot positional encodings ``P = I [length, dim]`` (``dim >= length``, default ``length``;
    the paper uses ``dim = n + 1`` with one scratch position). Float32."""
    check_positive_int("length", length, allow_none=False)
    check_positive_int("dim", dim)
    dim = length if dim is None else dim
    if dim < length:
        raise ValueError(f"dim must be >= length ({length}) for one-hot encodings; got {dim}")
    return jnp.eye(length, dim, dtype=jnp.float32)


def positional_qk(
    p: Array, w_q: Array, b_q: Array | None, w_k: Array, b_k: Array | None,
) -> tuple[Array, Array]:
    """Per-head positional queries and keys ``Q_h = P W_Q[h] + b_Q[h]``, ``K_h = P W_K[h] + b_K[h]``.

    ``p [length, pos_dim]``, ``w_q, w_k [heads, pos_dim, qk_dim]``, ``b_q, b_k [heads, qk_dim]``
    or None. Returns ``(q, k)``, each ``[length, heads, qk_dim]`` float32.
    """
    check_rank("p", p, 2, "[length, pos_dim]")
    lp, dp = p.shape
    check_rank("w_q", w_q, 3, "[heads, pos_dim, qk_dim]")
    h, _, dqk = w_q.shape
    want = (h, dp, dqk)
    for name, w in (("w_q", w_q), ("w_k", w_k)):
        if getattr(w, "shape", None) != want:
            raise ValueError(f"{name} must be [heads, pos_dim, qk_dim] = {list(want)}; got {shape_str(w)}")
    for name, bias in (("b_q", b_q), ("b_k", b_k)):
        if bias is not None and getattr(bias, "shape", None) != (h, dqk):
            raise ValueError(f"{name} must be [heads, qk_dim] = [{h}, {dqk}] or None; got {shape_str(bias)}")
    f32 = jnp.float32
    p = p.astype(f32)
    q = jnp.einsum("lp,hpd->lhd", p, w_q.astype(f32))
    k = jnp.einsum("lp,hpd->lhd", p, w_k.astype(f32))
    if b_q is not None:
        q = q + b_q.astype(f32)
    if b_k is not None:
        k = k + b_k.astype(f32)
    return q, k


def _weights_from_qk(q: Array, k: Array, scale: float | None, causal: bool) -> Array:
    """``[..., Lq, H, D] x [..., Lk, H, D] -> softmax weights [..., H, Lq, Lk]`` (float32)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("...ihd,...jhd->...hij", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits * scale
    if causal:
        # The diagonal is always visible, so no row is empty.
        logits = jnp.where(causal_mask(q.shape[-3], k.shape[-3]), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def positional_weights(
    p: Array, w_q: Array, b_q: Array | None, w_k: Array, b_k: Array | None, *,
    scale: float | None = None, causal: bool = False,
) -> Array:
    """Attention weights ``A_h = softmax((P W_Q[h] + b_Q[h]) (P W_K[h] + b_K[h])^T * scale)``.

    Args:
      p: positional encodings ``[length, pos_dim]`` (e.g. :func:`identity_encoding`).
      w_q, w_k: ``[heads, pos_dim, qk_dim]``; b_q, b_k: ``[heads, qk_dim]`` or None.
      scale: default ``1/sqrt(qk_dim)`` (= ``1/sqrt(pos_dim)`` in the paper).
      causal: query ``i`` sees keys ``j <= i`` only.

    Returns ``[heads, length, length]`` float32, rows summing to 1, the same for every input: compute
    once per length and pass to :func:`positional_apply`. Paper: Back de Luca et al. (ICML 2025).
    """
    q, k = positional_qk(p, w_q, b_q, w_k, b_k)
    return _weights_from_qk(q, k, scale, causal)


def positional_apply(weights: Array, v: Array) -> Array:
    """``y[b, i, h] = sum_j A[h, i, j] v[b, j, h]``.

    ``weights [heads, q_length, k_length]`` (shared by the batch) or
    ``[batch, heads, q_length, k_length]``; ``v [batch, k_length, kv_heads, head_dim]`` with
    ``heads % kv_heads == 0``. Returns ``[batch, q_length, heads, head_dim]`` in ``v.dtype``.
    """
    check_rank("v", v, 4, "[batch, length, heads, head_dim]")
    b, tk, hv, _ = v.shape
    nd = getattr(weights, "ndim", None)
    if nd not in (3, 4) or weights.shape[-1] != tk or (nd == 4 and weights.shape[0] != b):
        raise ValueError(
            f"weights must be [heads, q_length, {tk}] or [{b}, heads, q_length, {tk}] to match "
            f"v {shape_str(v)}; got {shape_str(weights)}"
        )
    h = weights.shape[-3]
    if h % hv:
        raise ValueError(f"weights heads ({h}) must be a multiple of v heads ({hv})")
    vf = repeat_kv(v, h // hv).astype(jnp.float32)
    w = weights.astype(jnp.float32)
    spec = "hij,bjhe->bihe" if nd == 3 else "bhij,bjhe->bihe"
    return jnp.einsum(spec, w, vf).astype(v.dtype)


def _check_positional_qkv(q: Any, k: Any, v: Any, causal: bool) -> None:
    """q/k ``[(batch,) length, heads, qk_dim]`` (both shared or both per batch), v ``[batch, k_length,
    kv_heads, head_dim]``."""
    check_rank("v", v, 4, "[batch, k_length, kv_heads, head_dim]")
    b, tk, hv, _ = v.shape
    shared = getattr(q, "ndim", None) == 3
    layout = "[length, heads, qk_dim]" if shared else "[batch, length, heads, qk_dim]"
    if not shared:
        check_rank("q", q, 4, "[length, heads, qk_dim] (shared) or [batch, length, heads, qk_dim]")
    check_rank("k", k, q.ndim, layout + " like q")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
    if q.shape[-3] == 0 or tk == 0:
        raise ValueError(f"q and k must hold at least one token (length >= 1); got q length {q.shape[-3]}, "
                         f"k length {tk}")
    lead = () if shared else (b,)
    if q.shape[:-3] != lead:
        raise ValueError(f"q batch size {q.shape[0]} != v batch size {b}")
    if k.shape != lead + (tk,) + q.shape[-2:]:
        raise ValueError(f"k must be {list(lead + (tk,) + q.shape[-2:])} (v's length, q's heads and qk_dim); "
                         f"got {shape_str(k)}")
    h = q.shape[-2]
    if hv == 0 or h % hv:
        raise ValueError(f"q heads ({h}) must be a multiple of v heads ({hv})")
    if causal and q.shape[-3] != tk:
        raise ValueError(f"causal attention needs q and k of the same length; got q length {q.shape[-3]}, "
                         f"k length {tk}")


def positional(
    q: Array, k: Array, v: Array, *, causal: bool = False, scale: float | None = None,
) -> Array:
    """Positional attention ``y_i = sum_j softmax_j(scale Q_h[i].K_h[j]) v[b, j, h]``.

    The registered transform: ``q``/``k`` are the *positional* queries and keys
    (``P W_Q[h] + b_Q[h]``, see :func:`positional_qk`), ``v`` comes from the input.

    Args:
      q: ``[q_length, heads, qk_dim]`` (shared by every batch element: the weights are computed
        once, ``[heads, q_length, k_length]``) or ``[batch, q_length, heads, qk_dim]``.
      k: ``[k_length, heads, qk_dim]`` or ``[batch, k_length, heads, qk_dim]``, like ``q``.
      v: ``[batch, k_length, kv_heads, head_dim]`` (``heads % kv_heads == 0``).
      causal: query ``i`` sees keys ``j <= i`` (needs ``q_length == k_length``).
      scale: default ``1/sqrt(qk_dim)``.

    Returns ``[batch, q_length, heads, head_dim]`` in ``v.dtype`` (float32 inside). Decoding
    (causal) is softmax attention over positional q/k: ``zoo.attention.softmax_step`` with
    ``q_t, k_t`` the positional query/key of the token (broadcast over the batch).

    Paper: Back de Luca et al., "Positional Attention: Expressivity and Learnability of Algorithmic
    Computation" (ICML 2025).
    """
    _check_positional_qkv(q, k, v, causal)
    return positional_apply(_weights_from_qk(q, k, scale, causal), v)


def positional_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, scale: float | None = None,
) -> Array:
    """Reference: a Python loop over batch elements and heads, ``softmax(q_h k_h^T scale) v_h`` with
    ``jax.nn.softmax`` on an explicitly masked ``[q_length, k_length]`` matrix."""
    _check_positional_qkv(q, k, v, causal)
    b, h = v.shape[0], q.shape[-2]
    groups = h // v.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = []
    for bi in range(b):
        qb = q if q.ndim == 3 else q[bi]
        kb = k if k.ndim == 3 else k[bi]
        heads = []
        for hi in range(h):
            logits = (qb[:, hi].astype(jnp.float32) @ kb[:, hi].astype(jnp.float32).T) * scale
            if causal:
                logits = jnp.where(jnp.tril(jnp.ones(logits.shape, bool)), logits, -jnp.inf)
            heads.append(jax.nn.softmax(logits, axis=-1) @ v[bi, :, hi // groups].astype(jnp.float32))
        rows.append(jnp.stack(heads, axis=1))
    return jnp.stack(rows).astype(v.dtype)
