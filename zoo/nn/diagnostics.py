"""Attention diagnostics: explicit weights, per-head entropy, attention sinks, entropy regulariser.

Weights ``A [batch, heads, q_length, k_length]`` (rows sum to 1 for softmax attention).

- Entropy of row ``i``: ``H_i = -sum_j A_ij log A_ij`` (``0 log 0 = 0``); per head: the mean over
  batch and queries (entropy collapse, Zhai et al. 2023, shows up as ``H -> 0``).
- Sink score (Gu et al. 2024, "When Attention Sink Emerges in Language Models", and
  sail-sg/Attention-Sink ``eval_sink_open_source.py``): ``alpha_k = mean_{t >= k} A_tk`` (the mean
  attention key ``k`` receives from the queries that can see it); a head is a *sink head* when
  ``alpha_first > 0.3``; the sink rate is the fraction of (layer, head) pairs that are.
- Entropy regulariser: ``coef * mean_heads(H)`` to *subtract* from the loss (AEM-style attention
  entropy maximisation: "AEM: Attention Entropy Maximization for Multiple Instance Learning",
  Zhang et al. 2024), or ``coef * (H - target)^2`` when a target entropy is given.

:func:`attention_weights` computes the weights of *any* registered transform whose output is
linear in ``v`` (softmax, sigmoid, softplus, sliding window, linear/BASED/Hedgehog/NaLa, flow,
Aaren) exactly, by running the transform on one-hot values ``v_j = e_j``: the output row ``i``
is then row ``i`` of the attention matrix. :func:`softmax_weights` is the direct formula for
softmax attention. :class:`AttentionDiagnostics` wraps a transform: with ``enabled=True`` it sows
the weights, per-head entropy, sink scores and optionally the entropy-regulariser term with
``nnx.sow(nnx.Intermediate, ...)`` under ``nnx.capture``, and never changes the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.common import causal_mask, shape_str

Array = jax.Array
SINK_THRESHOLD = 0.3


def _check_weights(weights: Any, name: str = "weights") -> Array:
    w = jnp.asarray(weights)
    if w.ndim < 3:
        raise ValueError(
            f"{name} must be [..., heads, q_length, k_length] (e.g. [batch, heads, q, k]); got {shape_str(w)}"
        )
    return w


def softmax_weights(
    q: Array, k: Array, *, causal: bool = False, scale: float | None = None, bias: Array | None = None,
    mask: Array | None = None, window: int | None = None,
) -> Array:
    """Explicit softmax attention weights ``softmax_j(scale q_i.k_j + bias_ij)`` over visible keys.

    ``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]`` -> ``[B, H, Tq, Tk]`` float32 (masked entries exactly
    0, a row that sees no key is all 0). ``bias`` and ``mask`` broadcast to ``[B, H, Tq, Tk]``.
    """
    for name, x in (("q", q), ("k", k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, length, heads, head_dim]; got {shape_str(x)}")
    b, tq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hk == 0 or h % hk:
        raise ValueError(f"k must be [{b}, length, kv_heads dividing {h}, {d}]; got {shape_str(k)}")
    if causal and tq != tk:
        raise ValueError(f"causal attention needs q and k of the same length; got {tq} and {tk}")
    kr = jnp.repeat(k, h // hk, axis=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lg = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), kr.astype(jnp.float32)) * scale
    if bias is not None:
        lg = lg + jnp.asarray(bias, jnp.float32)
    vis = jnp.ones((1, 1, tq, tk), bool)
    if causal:
        vis = causal_mask(tq, tk, window)[None, None]
    if mask is not None:
        vis = vis & jnp.asarray(mask, bool)
    vis = jnp.broadcast_to(vis, lg.shape)
    lg = jnp.where(vis, lg, -jnp.inf)
    mx = jnp.max(lg, axis=-1, keepdims=True)
    mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    p = jnp.where(vis, jnp.exp(lg - mx), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(den > 0, den, 1.0)


def attention_weights(transform: str | Callable[..., Array], q: Array, k: Array, **options: Any) -> Array:
    """Exact attention matrix ``[B, H, Tq, Tk]`` of a transform that is linear in ``v``.

    Runs ``transform(q, k, V, **options)`` with one-hot values ``V[b, j, h, :] = e_j`` (``Tk``
    value features), so ``out[b, i, h, j] = A^h_ij``. ``transform`` is a registry name
    (``zoo.attention.get``) or a callable ``fn(q, k, v, **options)``. Costs ``O(Tq Tk)`` memory:
    for diagnostics, not for training long sequences. ``k`` may be ``[B, Tk, Hkv, D]``; Aaren's
    ``q [H, D]`` is accepted (then ``Tq = Tk``).
    """
    fn = za.get(transform) if isinstance(transform, str) else transform
    if getattr(k, "ndim", None) != 4:
        raise ValueError(f"k must be [batch, length, kv_heads, head_dim]; got {shape_str(k)}")
    b, tk, hk, _ = k.shape
    eye = jnp.broadcast_to(jnp.eye(tk, dtype=jnp.float32)[None, :, None, :], (b, tk, hk, tk))
    out = fn(q, k, eye, **options)
    return jnp.moveaxis(out, 2, 1).astype(jnp.float32)  # [B, Tq, H, Tk] -> [B, H, Tq, Tk]


def row_entropy(weights: Array, eps: float = 0.0) -> Array:
    """``H_i = -sum_j A_ij log A_ij`` per row (``0 log 0 = 0``): ``[..., Tq, Tk] -> [..., Tq]``."""
    w = _check_weights(weights).astype(jnp.float32)
    pos = w > eps
    return -jnp.sum(jnp.where(pos, w * jnp.log(jnp.where(pos, w, 1.0)), 0.0), axis=-1)


def attention_entropy(weights: Array, query_mask: Array | None = None) -> Array:
    """Per-head entropy: the mean of :func:`row_entropy` over batch and queries.

    ``weights [B, H, Tq, Tk]`` -> ``[H]`` (any leading axes before ``B`` are kept, e.g. layers:
    ``[L, B, H, Tq, Tk] -> [L, H]``). ``query_mask`` (broadcast to ``[B, Tq]``, True = real
    query) excludes padding rows.
    """
    w = _check_weights(weights)
    if w.ndim < 4:
        raise ValueError(f"weights must be [..., batch, heads, q_length, k_length]; got {shape_str(w)}")
    ent = row_entropy(w)  # [..., B, H, Tq]
    if query_mask is None:
        return jnp.mean(ent, axis=(-3, -1))
    m = jnp.broadcast_to(jnp.asarray(query_mask, jnp.float32)[:, None, :], ent.shape[-3:])
    return jnp.sum(ent * m, axis=(-3, -1)) / jnp.maximum(jnp.sum(m, axis=(-3, -1)), 1.0)


def sink_scores(weights: Array) -> Array:
    """``alpha_k = mean_{t >= k} A_tk`` averaged over the batch: ``[..., B, H, T, T] -> [..., H, T]``.

    Needs square (self-attention) weights; for causal attention ``t >= k`` are exactly the
    queries that see key ``k``.
    """
    w = _check_weights(weights)
    if w.ndim < 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must be [..., batch, heads, T, T] (self-attention); got {shape_str(w)}")
    t = w.shape[-1]
    below = jnp.tril(jnp.ones((t, t), jnp.float32))  # [t, k]: t >= k
    tot = jnp.sum(w.astype(jnp.float32) * below, axis=-2)  # [..., B, H, T]
    alpha = tot / jnp.arange(t, 0, -1, dtype=jnp.float32)
    return jnp.mean(alpha, axis=-3)


def sink_heads(weights: Array, threshold: float = SINK_THRESHOLD) -> Array:
    """Bool ``[..., H]``: heads whose first key gets ``alpha_first > threshold``."""
    return sink_scores(weights)[..., 0] > threshold


def sink_ratio(weights: Array, threshold: float = SINK_THRESHOLD) -> Array:
    """Fraction of (layer, head) pairs that are sink heads (scalar). ``weights [..., B, H, T, T]``."""
    return jnp.mean(sink_heads(weights, threshold).astype(jnp.float32))


def entropy_regularizer(
    weights: Array, *, coef: float = 1.0, target: float | None = None, query_mask: Array | None = None,
) -> Array:
    """Loss term on the attention entropy (add it to the training loss).

    ``target=None``: ``-coef * mean_heads(H)`` (AEM-style: maximise entropy, discouraging the
    entropy collapse of a few over-confident heads). Otherwise ``coef * mean_heads((H - target)^2)``.
    Differentiable in the weights.
    """
    ent = attention_entropy(weights, query_mask)
    if target is None:
        return -coef * jnp.mean(ent)
    return coef * jnp.mean((ent - target) ** 2)


def capturing(module: nnx.Module) -> bool:
    """True while ``module`` runs under ``nnx.capture(...)`` (flax >= 0.12.8 marks every submodule
    with a ``__captures__`` collection then). The modules here sow only in that case: ``sow``
    outside ``nnx.capture`` is deprecated and would grow the module's state on every call."""
    return hasattr(module, "__captures__")


class AttentionDiagnostics(nnx.Module):
    """Wraps an attention transform; when enabled, records its weights without changing outputs.

    ``diag = AttentionDiagnostics("softmax", enabled=True)``; ``y = diag(q, k, v, causal=True)``
    returns exactly ``zoo.attention.get("softmax")(q, k, v, causal=True)``; run under
    ``y, stats = nnx.capture(model, nnx.Intermediate)(...)`` it also sows (as ``nnx.Intermediate``,
    found in ``stats`` at the module's path):

    - ``attention_weights`` ``[B, H, Tq, Tk]`` (when ``record_weights``),
    - ``attention_entropy`` ``[H]`` and, for self-attention, ``sink_scores`` ``[H, Tk]``,
    - ``entropy_loss`` (scalar, when ``entropy_coef`` is set): :func:`entropy_regularizer`.

    Softmax-family transforms (``softmax``, ``sliding_window``; ``sigmoid`` and ``softplus``
    through the one-hot-value path) get their weights from an explicit computation; other
    transforms through :func:`attention_weights`. ``enabled`` can be switched at any time
    (``module.enabled = False`` or ``nnx.view(model, diagnostics=False)``).
    """

    def __init__(
        self, transform: str | Callable[..., Array] = "softmax", *, enabled: bool = False,
        record_weights: bool = True, entropy_coef: float | None = None,
        entropy_target: float | None = None, **options: Any,
    ):
        self.transform = transform
        self.fn = za.get(transform) if isinstance(transform, str) else transform
        self.enabled = enabled
        self.record_weights = record_weights
        self.entropy_coef = entropy_coef
        self.entropy_target = entropy_target
        arrays = [n for n, o in options.items() if any(hasattr(x, "shape") for x in jax.tree.leaves(o))]
        if arrays:
            raise ValueError(
                f"options {arrays} hold arrays: pass array-valued options (bias, mask, ...) per call, "
                "the constructor keeps only static options"
            )
        self.options = dict(options)

    def set_view(self, diagnostics: bool | None = None) -> None:
        """Used by ``nnx.view(model, diagnostics=True/False)``."""
        if diagnostics is not None:
            self.enabled = diagnostics

    def weights(self, q: Array, k: Array, **options: Any) -> Array:
        """The attention weights ``[B, H, Tq, Tk]`` of the wrapped transform for ``q, k``."""
        opts = {**self.options, **options}
        name = self.transform if isinstance(self.transform, str) else None
        if name == "sliding_window":
            opts.setdefault("causal", True)
        if name in ("softmax", "sliding_window") and not (set(opts) - {"causal", "scale", "bias", "mask",
                                                                          "window"}):
            return softmax_weights(q, k, **opts)
        return attention_weights(self.fn, q, k, **opts)

    def __call__(self, q: Array, k: Array, v: Array, **options: Any) -> Array:
        opts = {**self.options, **options}
        out = self.fn(q, k, v, **opts)
        if self.enabled and capturing(self):
            w = self.weights(q, k, **options)
            if self.record_weights:
                self.sow(nnx.Intermediate, "attention_weights", w)
            self.sow(nnx.Intermediate, "attention_entropy", attention_entropy(w))
            if w.shape[-1] == w.shape[-2]:
                self.sow(nnx.Intermediate, "sink_scores", sink_scores(w))
            if self.entropy_coef is not None:
                self.sow(nnx.Intermediate, "entropy_loss",
                         entropy_regularizer(w, coef=self.entropy_coef, target=self.entropy_target))
        return out
