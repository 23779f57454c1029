"""Dense quadratic oracle of :func:`kernels_pallas.flash_attention.flash_attention` (the same
options, materialising ``[batch, heads, q_length, k_length]``): for benchmarks and for options the
``zoo.attention`` references take in another form (``alibi_slopes`` / ``bias_fn`` become a bias
array there)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def flash_attention_reference(
    q: Array, k: Array, v: Array, *, variant: str = "softmax", causal: bool = False,
    scale: float | None = None, window: int | None = None, sink_logit: Array | None = None,
    logn_train_length: int | None = None, alibi_slopes: Array | None = None,
    bias_fn: Callable[..., Any] | None = None, sigmoid_bias: float | None = None, eps: float = 1e-8,
    logn_kind: str = "ratio",
) -> Array:
    """``y_i = sum_j w_ij v_j`` with the weights of :func:`flash_attention`'s docstring, written
    directly (k/v heads repeated, float32, explicit mask)."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    q, k, v = f32(q), jnp.repeat(f32(k), h // hkv, axis=2), jnp.repeat(f32(v), h // hkv, axis=2)
    i = jnp.arange(tq)[:, None]
    j = jnp.arange(tk)[None, :]
    vis = jnp.ones((tq, tk), bool)
    if causal:
        vis = j <= i
        if window is not None:
            vis = vis & (i - j < window)
    n = jnp.sum(vis, axis=-1, keepdims=True).astype(jnp.float32)  # [Tq, 1]
    if variant == "softplus":
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        f = math.log(d) * jnp.log(jnp.maximum(n, 1.0))
    else:
        f = 1.0 / math.sqrt(d) if scale is None else scale
        if logn_train_length is not None:
            ratio = jnp.log(n) / math.log(logn_train_length)
            f = f * (jnp.sqrt(ratio) if logn_kind == "sqrt" else jnp.maximum(1.0, ratio))
    lg = jnp.einsum("bqhd,bkhd->bhqk", q, k) * f
    heads = jnp.arange(h)[:, None, None]
    if alibi_slopes is not None:
        lg = lg - f32(alibi_slopes)[:, None, None] * jnp.abs(i - j)
    if bias_fn is not None:
        if len(inspect.signature(bias_fn).parameters) == 2:  # bias_fn(q_pos [n], k_pos [m])
            lg = lg + jnp.asarray(bias_fn(jnp.arange(tq), jnp.arange(tk)), jnp.float32)
        else:
            lg = lg + jax.vmap(lambda hh: jnp.broadcast_to(bias_fn(i, j, hh), (tq, tk)))(heads[:, 0, 0])
    if variant == "softmax":
        lg = jnp.where(vis, lg, -jnp.inf)
        if sink_logit is not None:
            sink = jnp.broadcast_to(f32(sink_logit)[None, :, None, None], (b, h, tq, 1))
            lg = jnp.concatenate([lg, sink], axis=-1)
        w = jax.nn.softmax(lg, axis=-1)[..., :tk]
    elif variant == "sigmoid":
        bias = -math.log(tk) if sigmoid_bias is None else sigmoid_bias
        w = jnp.where(vis, jax.nn.sigmoid(lg + bias), 0.0)
    else:
        a = jnp.where(vis, jax.nn.softplus(lg), 0.0)
        w = a / (jnp.sum(a, axis=-1, keepdims=True) + eps)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)
