"""Aaren: attention as a many-to-many RNN computed with a parallel prefix scan (Feng et al. 2024).

Every token ``i`` gets a score ``s_i = scale * q_i.k_i``; the output at position ``t`` is the
softmax over the scores seen so far applied to their values,

    o_t = sum_{i<=t, mask_i} exp(s_i) v_i / sum_{i<=t, mask_i} exp(s_i).

In the Aaren module ``q`` is one learned query per head (``q [heads, head_dim]``), shared by all
positions, so ``o_t`` is softmax attention of that query over the prefix ``1..t``. A query given
per position (``q [batch, length, heads, head_dim]``) scores each token with its own query row
(as :func:`step` does with ``q_t``); a constant row gives Aaren exactly. This is *not* causal
softmax attention with one softmax row per query.

The prefix is summarised by the triple ``(m, u, w)``: running max ``m = max s_i``, normaliser
``u = sum exp(s_i - m)`` and numerator ``w = sum exp(s_i - m) v_i``, combined with the
associative operator (the numerically stable form: it only exponentiates non-positive numbers)

    (m_A, u_A, w_A) + (m_B, u_B, w_B) = (m, u_A e^{m_A - m} + u_B e^{m_B - m},
                                            w_A e^{m_A - m} + w_B e^{m_B - m}),  m = max(m_A, m_B)

with leaves ``(s_i, 1, v_i)`` and identity ``(-inf, 0, 0)``; padding / masked tokens are the
identity. ``o_t = w_{1..t} / u_{1..t}`` (0 while no unmasked token has been seen).

Forms: ``impl="associative"`` (``jax.lax.associative_scan``, O(log T) depth), ``"sequential"``
(``jax.lax.scan`` over the same combine), the O(1)-state recurrence :func:`init_state` /
:func:`step`, and the quadratic masked prefix-softmax reference :func:`aaren_naive`.

Scale: by default there is **no** ``1/sqrt(head_dim)`` factor (``scale=1``), as in the public
Aaren implementations (andreofner/attention-as-rnn-pytorch, claCase/Attention-as-RNN) and the
paper's ``softmax(q K^T)``: the query is learned, so a scale is absorbed into it. Pass
``scale=1/sqrt(head_dim)`` for the Transformer convention.

Paper: Feng, Tung, Hajimirsadeghi, Bengio, Ahmed, "Attention as an RNN" (arXiv 2405.13956, 2024).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention.common import (
    check_choice,
    check_float,
    check_qkv,
    check_rank,
    check_state,
    repeat_kv,
    shape_str,
)

Array = jax.Array
IMPLS = ("associative", "sequential")


class AarenState(NamedTuple):
    """Prefix summary of Aaren (float32).

    m: ``[batch, heads]`` running max of the scores (``-inf`` before any token).
    u: ``[batch, heads]`` normaliser ``sum_i exp(s_i - m)``.
    w: ``[batch, heads, value_dim]`` numerator ``sum_i exp(s_i - m) v_i``.
    """

    m: Array
    u: Array
    w: Array


def init_state(
    batch: int, heads: int, head_dim: int | None = None, value_dim: int | None = None,
) -> AarenState:
    """The empty prefix (the identity ``(-inf, 0, 0)``); ``value_dim`` defaults to ``head_dim``."""
    e = head_dim if value_dim is None else value_dim
    if e is None:
        raise ValueError("init_state needs value_dim (or head_dim)")
    return AarenState(
        jnp.full((batch, heads), -jnp.inf, jnp.float32),
        jnp.zeros((batch, heads), jnp.float32),
        jnp.zeros((batch, heads, e), jnp.float32),
    )


# ----------------------------------------------------------------------------- core


def _check_causal(causal: Any) -> None:
    if causal is not True:
        raise ValueError(f"Aaren is causal only (a prefix scan): pass causal=True; got causal={causal!r}")


def _combine(a: AarenState, b: AarenState) -> AarenState:
    """The associative operator; ``a`` is the earlier segment. Exact with ``-inf`` identities."""
    m = jnp.maximum(a.m, b.m)
    ref = jnp.where(jnp.isfinite(m), m, 0.0)  # both empty: avoid -inf - -inf
    ea, eb = jnp.exp(a.m - ref), jnp.exp(b.m - ref)
    return AarenState(m, a.u * ea + b.u * eb, a.w * ea[..., None] + b.w * eb[..., None])


def _output(s: AarenState, dtype) -> Array:
    """``w / u`` (0 where the prefix is empty)."""
    ok = s.u > 0
    return jnp.where(ok[..., None], s.w / jnp.where(ok, s.u, 1.0)[..., None], 0.0).astype(dtype)


def _scale(scale: Any) -> float | Array:
    return 1.0 if scale is None else scale


def _scores_and_values(q, k, v, scale, mask):
    """Validates; returns float32 leaves ``(s [B,T,H], ones [B,T,H], v [B,T,H,E])`` with masked
    tokens set to the identity."""
    check_rank("k", k, 4, "[batch, length, kv_heads, head_dim]")
    check_rank("v", v, 4, "[batch, length, kv_heads, value_dim]")
    b, t, hk, d = k.shape
    if getattr(q, "ndim", None) == 2:
        h = q.shape[0]
        if q.shape[1] != d:
            raise ValueError(
                f"q must be [heads, {d}] (one query per head, head_dim of k); got {shape_str(q)}"
            )
        _, _, groups = check_qkv(jnp.zeros((b, 1, h, d), q.dtype), k, v)
    elif getattr(q, "ndim", None) == 4:
        _, _, groups = check_qkv(q, k, v, causal=True)
    else:
        raise ValueError(
            f"q must be [heads, head_dim] (one learned query per head) or [batch, length, heads, "
            f"head_dim] (one per position); got {shape_str(q)}"
        )
    k = repeat_kv(k, groups).astype(jnp.float32)
    v = repeat_kv(v, groups).astype(jnp.float32)
    qf = q.astype(jnp.float32)
    if q.ndim == 2:
        s = jnp.einsum("hd,bthd->bth", qf, k)
    else:
        s = jnp.einsum("bthd,bthd->bth", qf, k)
    s = s * _scale(scale)
    u = jnp.ones_like(s)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (b, t):
            raise ValueError(
                f"mask must be [batch, length] = [{b}, {t}] (True = token); got {shape_str(mask)}"
            )
        keep = mask.astype(bool)[..., None]
        s = jnp.where(keep, s, -jnp.inf)
        u = jnp.where(keep, u, 0.0)
        v = jnp.where(keep[..., None], v, 0.0)
    return s, u, v


def _check_state(state: Any, b: int, h: int, e: int) -> AarenState:
    return check_state(state, AarenState, AarenState((b, h), (b, h), (b, h, e)))


# ----------------------------------------------------------------------------- public API


def aaren(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    scale: float | None = None,
    mask: Array | None = None,
    impl: str = "associative",
    initial_state: AarenState | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, AarenState]:
    """Aaren prefix-scan attention ``o_t = sum_{i<=t} softmax(s)_i v_i``, ``s_i = scale q_i.k_i``.

    Args:
      q: ``[heads, head_dim]`` (Aaren's learned query per head) or
        ``[batch, length, heads, head_dim]`` (token ``i`` scored with ``q_i``).
      k: ``[batch, length, kv_heads, head_dim]`` (``heads % kv_heads == 0``).
      v: ``[batch, length, kv_heads, value_dim]``.
      causal: must be given as True (Aaren is a causal prefix scan; there is no bidirectional
        form; the default False raises, as for every causal-only transform).
      scale: multiplies the scores; default 1 (no ``1/sqrt(d)``, see the module docstring).
      mask: bool ``[batch, length]``, True = real token; False tokens (padding) are the identity
        element: they change neither the state nor later outputs. A position with no real token
        at or before it outputs 0.
      impl: ``"associative"`` (``jax.lax.associative_scan``) or ``"sequential"`` (``jax.lax.scan``).
      initial_state / return_state: start from / also return an :class:`AarenState`.

    Returns ``[batch, length, heads, value_dim]`` in ``v.dtype`` (float32 inside), and the state
    after the last token when ``return_state``.

    Paper: Feng et al., "Attention as an RNN" (arXiv 2405.13956, 2024).
    """
    _check_causal(causal)
    check_choice("impl", impl, IMPLS)
    s, u, vv = _scores_and_values(q, k, v, scale, mask)
    b, t, h = s.shape
    e = vv.shape[-1]
    if initial_state is None:
        s0 = init_state(b, h, value_dim=e)
    else:
        s0 = _check_state(initial_state, b, h, e)
    leaves = AarenState(s, u, vv)
    if impl == "associative":
        prefix = jax.lax.associative_scan(_combine, leaves, axis=1)
        if initial_state is not None:
            lift = lambda x: x[:, None]
            prefix = _combine(AarenState(*map(lift, s0)), prefix)
        out = _output(prefix, v.dtype)
        final = AarenState(*(x[:, -1] for x in prefix))
    else:
        def body(state, leaf):
            state = _combine(state, leaf)
            return state, state

        tm = lambda x: jnp.moveaxis(x, 1, 0)
        final, prefix = jax.lax.scan(body, s0, AarenState(*map(tm, leaves)))
        out = jnp.moveaxis(_output(prefix, v.dtype), 0, 1)
    if return_state:
        return out, final
    return out


def aaren_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, scale: float | None = None,
    mask: Array | None = None,
) -> Array:
    """Reference: masked prefix softmax ``o_t = softmax_i(s_i + log[i <= t and mask_i]) . v`` as an
    explicit ``[length, length]`` matrix per (batch, head) with ``jax.nn.softmax``. O(T^2)."""
    _check_causal(causal)
    s, _, vv = _scores_and_values(q, k, v, scale, None)
    b, t, h = s.shape
    vis = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, t (output), i (token)]
    if mask is not None:
        vis = vis & jnp.asarray(mask, bool)[:, None, None, :]
    vis = jnp.broadcast_to(vis, (b, h, t, t))
    logits = jnp.where(vis, jnp.moveaxis(s, 1, 2)[:, :, None, :], -jnp.inf)
    any_vis = jnp.any(vis, axis=-1, keepdims=True)
    a = jnp.where(any_vis, jax.nn.softmax(jnp.where(any_vis, logits, 0.0), axis=-1), 0.0)
    return jnp.einsum("bhti,bihe->bthe", a, vv).astype(v.dtype)


def step(
    state: AarenState, q_t: Array, k_t: Array, v_t: Array, *,
    scale: float | None = None, mask_t: Array | None = None,
) -> tuple[Array, AarenState]:
    """One recurrent step: ``T <- T + (s, 1, v_t)`` with ``s = scale q_t.k_t``; emits ``w / u``.

    ``q_t [heads, head_dim]`` (Aaren's query) or ``[batch, heads, head_dim]``,
    ``k_t [batch, kv_heads, head_dim]``, ``v_t [batch, kv_heads, value_dim]``, ``mask_t`` optional
    bool ``[batch]`` (False = padding: the state is unchanged). O(head_dim) time and memory per
    head. Returns ``(y_t [batch, heads, value_dim], new_state)``.
    """
    for name, x in (("k_t", k_t), ("v_t", v_t), ("q_t", q_t)):
        if name != "q_t" and getattr(x, "ndim", None) != 3:
            raise ValueError(f"{name} must be [batch, heads, dim] (one token); got {shape_str(x)}")
        check_float(name, x)
    if getattr(q_t, "ndim", None) == 3:
        q = q_t[:, None]
    elif getattr(q_t, "ndim", None) == 2:
        q = q_t
    else:
        raise ValueError(
            f"q_t must be [heads, head_dim] or [batch, heads, head_dim]; got {shape_str(q_t)}"
        )
    if mask_t is not None:
        mask_t = jnp.asarray(mask_t)
        if mask_t.shape != (k_t.shape[0],):
            raise ValueError(f"mask_t must be [batch] = [{k_t.shape[0]}]; got {shape_str(mask_t)}")
        mask_t = mask_t[:, None]
    s, u, vv = _scores_and_values(q, k_t[:, None], v_t[:, None], scale, mask_t)
    b, _, h = s.shape
    state = _check_state(state, b, h, vv.shape[-1])
    new = _combine(state, AarenState(s[:, 0], u[:, 0], vv[:, 0]))
    return _output(new, v_t.dtype), new
