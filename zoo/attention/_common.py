"""Shared helpers for the attention transforms: input validation, grouped-query heads, masks.

Every transform in ``zoo.attention`` uses the layout ``[batch, length, heads, head_dim]`` (as
``jax.nn.dot_product_attention``) and validates its inputs with :func:`check_qkv`, so a bad call
fails with a ``ValueError`` that names the argument and the expected shape instead of an
opaque broadcasting error deep inside XLA.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def shape_str(x: Any) -> str:
    return "x".join(str(d) for d in getattr(x, "shape", ())) or "scalar"


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if getattr(x, "ndim", None) != rank:
        raise ValueError(
            f"{name} must have rank {rank} with layout {layout}; got shape "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )


def check_qkv(q: Array, k: Array, v: Array, *, causal: bool = False) -> tuple[int, int, int]:
    """Validates ``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``.

    Returns ``(heads, kv_heads, groups)`` with ``heads == kv_heads * groups``. Raises
    ``ValueError`` naming the argument and the expected shape.
    """
    layout = "[batch, length, heads, head_dim]"
    check_rank("q", q, 4, layout)
    check_rank("k", k, 4, layout)
    check_rank("v", v, 4, layout)
    b, tq, h, d = q.shape
    bk, tk, hk, dk = k.shape
    if bk != b:
        raise ValueError(f"k batch size {bk} != q batch size {b}: k must be [{b}, length, kv_heads, {d}]")
    if dk != d:
        raise ValueError(f"k head_dim {dk} != q head_dim {d}: k must be [{b}, length, kv_heads, {d}]")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [{bk}, {tk}, {hk}, value_dim] to match k {shape_str(k)}; got {shape_str(v)}"
        )
    if hk == 0 or h % hk != 0:
        raise ValueError(
            f"q heads ({h}) must be a multiple of k/v heads ({hk}) for grouped-query attention"
        )
    if causal and tq != tk:
        raise ValueError(
            f"causal attention needs q and k of the same length; got q length {tq}, k length {tk}"
        )
    return h, hk, h // hk


def repeat_kv(x: Array, groups: int) -> Array:
    """Repeats k/v heads ``[B, T, Hkv, D] -> [B, T, Hkv * groups, D]`` (head h uses kv head h // groups)."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


def per_head(name: str, x: Any, heads: int, dtype: Any = jnp.float32) -> Array:
    """Broadcasts a scalar or ``[heads]`` array to ``[heads]``; raises naming ``name`` otherwise."""
    x = jnp.asarray(x, dtype)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (heads,))
    if x.shape != (heads,):
        raise ValueError(f"{name} must be a scalar or have shape [{heads}] (one per head); got {shape_str(x)}")
    return x


def causal_mask(tq: int, tk: int, window: int | None = None, q_offset: int = 0) -> Array:
    """Boolean ``[tq, tk]``: query i (at absolute position i + q_offset) sees key j iff j <= pos_i and,
    with a window, pos_i - j < window (``window`` keys including the query's own)."""
    qi = jnp.arange(tq)[:, None] + q_offset
    kj = jnp.arange(tk)[None, :]
    m = kj <= qi
    if window is not None:
        m = m & (qi - kj < window)
    return m


def broadcast_mask(name: str, mask: Any, b: int, h: int, tq: int, tk: int) -> Array:
    """Checks a user mask broadcastable to ``[batch, heads, q_length, k_length]`` and returns it as bool."""
    mask = jnp.asarray(mask)
    try:
        return jnp.broadcast_to(mask.astype(bool), (b, h, tq, tk))
    except ValueError:
        raise ValueError(
            f"{name} must broadcast to [batch, heads, q_length, k_length] = [{b}, {h}, {tq}, {tk}]; "
            f"got {shape_str(mask)}"
        ) from None


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, choices))}")


def check_positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}")
