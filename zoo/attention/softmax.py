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

import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention import blockwise, registry
from zoo.attention.blockwise import BlockSizes
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


def _attend(
    q, k, v, mask, *, variant: str, scale, bias, sink_logit, logn_train_length, softplus_opts,
    logn_kind: str = "ratio",
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
    lg = _logits(q, k, scale) * blockwise.logn_factor(n, logn_train_length, logn_kind)
    if bias is not None and variant == "softmax":
        lg = lg + bias
    if variant == "softmax":
        w = _softmax_weights(lg, mask, n, sink_logit=sink_logit)
    else:
        w = _sigmoid_weights(lg, mask, n, bias=bias)
    return _apply(w, v, v.dtype)


def _position_bias(h: int, tq: int, tk: int, alibi_slopes: Any, bias_fn: Any) -> Array | None:
    """The ``[1, heads or 1, Tq, Tk]`` bias that ``alibi_slopes`` / ``bias_fn`` describe (quadratic
    forms only; the blockwise form evaluates them per block)."""
    out = None
    qp, kp = jnp.arange(tq, dtype=jnp.int32), jnp.arange(tk, dtype=jnp.int32)
    if alibi_slopes is not None:
        sl = per_head("alibi_slopes", alibi_slopes, h)
        out = (-sl[:, None, None] * jnp.abs(qp[:, None] - kp[None, :]).astype(jnp.float32))[None]
    if bias_fn is not None:
        if not callable(bias_fn):
            raise ValueError(f"bias_fn must be a callable (q_pos, k_pos) -> [heads or 1, n, m]; got {bias_fn!r}")
        x = jnp.asarray(bias_fn(qp, kp), jnp.float32)
        x = (x[None] if x.ndim == 2 else x)[None]
        out = x if out is None else out + x
    return out


def _softplus_opts(q_length: int, reweight: bool, power: float, delta: float, eps: float, q_pos: Array | None = None):
    if not power > 0:
        raise ValueError(f"power must be > 0; got {power!r}")
    opts = {"reweight": reweight, "power": float(power), "delta": float(delta), "eps": float(eps)}
    if reweight:
        qp = jnp.arange(q_length) if q_pos is None else q_pos
        opts["delta"] = jnp.where(qp < 3, 0.0, float(delta))[None, None, :, None]
    return opts


# ----------------------------------------------------------------------------- implementations
# Family "softmax": fn(q, k, v, *, variant, causal, mask, scale, window, bias, sink_logit,
# logn_train_length, logn_kind, segment_ids, alibi_slopes, bias_fn, block_sizes, sigmoid_bias,
# reweight, power, delta, eps) -> [batch, q_length, heads, value_dim]; options already validated.

FAMILY = "softmax"
# impl="auto" leaves the quadratic form when q_length * k_length exceeds this (its T x T weights
# would cost 4 bytes * batch * heads * this much); measured crossover: benchmarks/softmax_long.py.
QUADRATIC_LIMIT = 512 * 512


def _impl_xla(
    q, k, v, *, variant, causal, mask=None, scale=None, window=None, bias=None, sink_logit=None,
    logn_train_length=None, logn_kind="ratio", segment_ids=None, alibi_slopes=None, bias_fn=None,
    block_sizes=None, sigmoid_bias=None, reweight=False, power=15.0, delta=1.0, eps=1e-8,
):
    """The quadratic form: ``[B, H, Tq, Tk]`` logits, masks and weights materialised."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    vis = causal_mask(tq, tk, window)[None, None] if causal else jnp.ones((1, 1, tq, tk), bool)
    if mask is not None:
        vis = vis & broadcast_mask("mask", mask, b, h, tq, tk)
    if segment_ids is not None:
        qs, ks = blockwise._segments(segment_ids, b, tq, tk)
        vis = vis & (qs[:, None, :, None] == ks[:, None, None, :])
    vis = jnp.broadcast_to(vis, (b, h, tq, tk))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if sink_logit is not None:
        sink_logit = per_head("sink_logit", sink_logit, h)
    opts = None
    if variant == "softmax":
        if bias is not None:
            bias = broadcast_to_shape("bias", bias, (b, h, tq, tk), "[batch, heads, q_length, k_length]")
        pb = _position_bias(h, tq, tk, alibi_slopes, bias_fn)
        if pb is not None:
            bias = pb if bias is None else bias + pb
    elif variant == "sigmoid":
        bias = -math.log(tk) if sigmoid_bias is None else sigmoid_bias
    else:
        opts = _softplus_opts(tq, reweight, power, delta, eps)
    return _attend(
        q, k, v, vis, variant=variant, scale=scale, bias=bias, sink_logit=sink_logit,
        logn_train_length=logn_train_length, softplus_opts=opts, logn_kind=logn_kind,
    )


def _impl_blockwise(
    q, k, v, *, variant, causal, mask=None, scale=None, window=None, bias=None, sink_logit=None,
    logn_train_length=None, logn_kind="ratio", segment_ids=None, alibi_slopes=None, bias_fn=None,
    block_sizes=None, sigmoid_bias=None, reweight=False, power=15.0, delta=1.0, eps=1e-8,
):
    """``zoo.attention.blockwise.attention`` (O(T) memory, window cost O(T w))."""
    var = ("lssar" if reweight else "lssa") if variant == "softplus" else variant
    return blockwise.attention(
        q, k, v, variant=var, causal=causal, scale=scale, window=window, mask=mask,
        segment_ids=segment_ids, sink_logit=sink_logit, logn_train_length=logn_train_length,
        logn_kind=logn_kind, alibi_slopes=alibi_slopes, bias_fn=bias_fn, sigmoid_bias=sigmoid_bias,
        power=power, delta=delta, eps=eps, block_sizes=block_sizes,
    )


def _impl_cudnn(q, k, v, *, causal, mask=None, scale=None, window=None, **_):
    """``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU; plain softmax only)."""
    lw = None if window is None else (window - 1, 0)  # (left, right): `left` keys before, plus itself
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=lw, implementation="cudnn",
    )


def _impl_splash(q, k, v, *, causal, scale=None, window=None, sink_logit=None, segment_ids=None, **_):
    """TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``): the MQA
    kernel per kv head (grouped-query without repeating k/v), causal / local masks, sinks,
    segment ids; vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, tq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    g = h // hk
    if window is not None:
        m = sa.LocalMask((tq, tk), window_size=(window - 1, 0), offset=0)
    elif causal:
        m = sa.CausalMask((tq, tk))
    else:
        m = sa.FullMask((tq, tk))
    kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([m] * g))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = jnp.moveaxis((q * scale).astype(q.dtype).reshape(b, tq, hk, g, d), 1, 3)  # [B, Hk, G, Tq, D]
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [B, Hk, Tk, .]
    sinks = None if sink_logit is None else per_head("sink_logit", sink_logit, h).reshape(hk, g)
    seg = None
    if segment_ids is not None:
        qs, ks = blockwise._segments(segment_ids, b, tq, tk)
        seg = sa.SegmentIds(q=qs, kv=ks)

    def one(qq, kk, vv, sg, sk):
        return kernel(qq, kk, vv, segment_ids=sg, sinks=sk)

    per_head_fn = jax.vmap(one, in_axes=(0, 0, 0, None, None if sinks is None else 0))
    out = jax.vmap(per_head_fn, in_axes=(0, 0, 0, None if seg is None else 0, None))(qh, kh, vh, seg, sinks)
    return jnp.moveaxis(out, 3, 1).reshape(b, tq, h, v.shape[-1]).astype(v.dtype)


def _impl_pallas(
    q, k, v, *, variant, causal, scale=None, window=None, sink_logit=None, logn_train_length=None,
    logn_kind="ratio", alibi_slopes=None, bias_fn=None, sigmoid_bias=None, eps=1e-8, **_,
):
    """``kernels_pallas.flash_attention`` inside ``shard_map`` over the active mesh (GPU Triton /
    TPU Mosaic; Pallas interpret mode elsewhere, when named explicitly)."""
    from kernels_pallas.flash_attention import flash_attention_sharded

    platform = jax.default_backend()
    return flash_attention_sharded(
        q, k, v, variant=variant, causal=causal, scale=scale, window=window, sink_logit=sink_logit,
        logn_train_length=logn_train_length, logn_kind=logn_kind, alibi_slopes=alibi_slopes, bias_fn=bias_fn,
        sigmoid_bias=sigmoid_bias, eps=eps, interpret=platform not in ("gpu", "tpu"),
        backend="gpu" if platform == "gpu" else "tpu",
    )


def _pallas_supports(*, alibi_slopes=None, **o) -> str | None:
    if importlib.util.find_spec("kernels_pallas") is None:
        return "kernels_pallas is not importable"
    from kernels_pallas.flash_attention import supports

    if alibi_slopes is not None and isinstance(alibi_slopes, jax.core.Tracer):
        return "traced alibi_slopes (they may be learned; the kernel gives them no gradient)"
    o.pop("dtype", None), o.pop("head_dim", None), o.pop("q_length", None), o.pop("k_length", None)
    o.pop("auto", None), o.pop("block_sizes", None)
    return supports(alibi_slopes=alibi_slopes, **o)


def _xla_supports(*, auto=False, q_length=0, k_length=0, **_) -> str | None:
    if auto and q_length * k_length > QUADRATIC_LIMIT:
        return (f"q_length * k_length = {q_length * k_length} > QUADRATIC_LIMIT = {QUADRATIC_LIMIT} under "
                "impl='auto' (the quadratic form materialises the weights; name impl='xla' to force it)")
    return None


def _blockwise_supports(*, bias=None, **_) -> str | None:
    if bias is not None:
        return "a bias array [.., q_length, k_length] (give alibi_slopes or bias_fn instead)"
    return None


def _library_refusals(o: dict, unsupported: tuple[str, ...]) -> str | None:
    if o.get("variant") != "softmax":
        return f"variant {o.get('variant')!r} (plain softmax only)"
    for name in unsupported:
        if o.get(name) is not None:
            return f"option {name}"
    return None


def _cudnn_supports(**o) -> str | None:
    why = _library_refusals(o, ("sink_logit", "logn_train_length", "alibi_slopes", "bias_fn", "bias",
                                "mask", "segment_ids"))
    if why:
        return why
    if o.get("dtype") not in (jnp.bfloat16, jnp.float16):
        return f"dtype {o.get('dtype')} (cuDNN flash attention takes bfloat16/float16)"
    d = o.get("head_dim", 0)
    if d % 8 or d > 256:
        return f"head_dim {d} (a multiple of 8, at most 256)"
    return None


def _splash_supports(**o) -> str | None:
    why = _library_refusals(o, ("logn_train_length", "alibi_slopes", "bias_fn", "bias", "mask"))
    if why:
        return why
    if o.get("q_length", 0) % 128 or o.get("k_length", 0) % 128:
        return "lengths that are not multiples of 128 (splash blocks)"
    if o.get("head_dim", 0) % 128:
        return f"head_dim {o.get('head_dim')} (a multiple of 128)"
    if o.get("segment_ids") is not None and not o.get("causal"):
        return "non-causal segment ids (a query may see no key: splash's softmax is then undefined)"
    return None


registry.register_impl(FAMILY, registry.Implementation("xla", _impl_xla, supports=_xla_supports), overwrite=True)
registry.register_impl(FAMILY, registry.Implementation(
    "blockwise", _impl_blockwise, supports=_blockwise_supports), overwrite=True)
registry.register_impl(FAMILY, registry.Implementation(
    "cudnn", _impl_cudnn, platforms=("gpu",), supports=_cudnn_supports), overwrite=True)
registry.register_impl(FAMILY, registry.Implementation(
    "splash", _impl_splash, platforms=("tpu",), supports=_splash_supports), overwrite=True)
# Not in the "auto" preference until it has run on hardware (benchmarks/RESULTS.md): name it.
registry.register_impl(FAMILY, registry.Implementation(
    "pallas", _impl_pallas, platforms=("gpu", "tpu"), interpret=True, supports=_pallas_supports), overwrite=True)
# The library kernels first where they take the options; the quadratic form while it is small;
# the blockwise form for long sequences (xla refuses those under "auto").
registry.set_preference(FAMILY, {
    "cpu": ("xla", "blockwise"), "gpu": ("cudnn", "xla", "blockwise"), "tpu": ("splash", "xla", "blockwise"),
})


def _check_options(q, k, v, o: dict) -> dict:
    check_qkv(q, k, v, causal=o["causal"])
    o = dict(o)
    o["window"] = as_int("window", o.get("window"))
    if o["window"] is not None and not o["causal"]:
        raise ValueError("window needs causal=True (a sliding window looks back from each query)")
    o["logn_train_length"] = as_int("logn_train_length", o.get("logn_train_length"))
    if o["logn_train_length"] == 1:
        raise ValueError("logn_train_length must be >= 2 (log 1 = 0)")
    check_choice("logn_kind", o.get("logn_kind", "ratio"), ("ratio", "sqrt"))
    bs = o.get("block_sizes")
    if bs is not None and not isinstance(bs, BlockSizes):
        raise ValueError(f"block_sizes must be a zoo.attention.blockwise.BlockSizes; got {type(bs).__name__}")
    return o


def resolve_impl(impl: str | Sequence[str] = "auto", q: Any = None, k: Any = None, **options: Any) -> str:
    """The implementation ``impl`` selects on the default backend for arrays shaped like ``q, k``
    and these options (``registry.resolve("softmax", ...)``)."""
    return _resolve(impl, q, k, options).name


def _resolve(impl, q, k, o: dict) -> registry.Implementation:
    facts = dict(o, dtype=jnp.dtype(q.dtype), head_dim=q.shape[-1], q_length=q.shape[1], k_length=k.shape[1],
                 auto=impl == "auto")
    facts.setdefault("variant", "softmax")
    return registry.resolve(FAMILY, impl, **facts)


def _dispatch(q, k, v, *, impl, **o) -> Array:
    o = _check_options(q, k, v, o)
    return _resolve(impl, q, k, o).fn(q, k, v, **o)


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
    logn_kind: str = "ratio",
    segment_ids: Array | tuple[Array, Array] | None = None,
    alibi_slopes: Array | None = None,
    bias_fn: Callable[[Array, Array], Array] | None = None,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Scaled dot-product softmax attention ``y_i = sum_j a_ij v_j``.

    ``a_ij = exp(l_ij) / (exp(s_h) + sum_{j' visible} exp(l_ij'))`` with
    ``l_ij = c_i * scale * q_i.k_j + bias_ij``; ``c_i`` is the entropy-invariant factor of the
    ``n_i`` keys query i sees: ``max(1, log n_i / log T)`` (``logn_kind="ratio"``: Chiang &
    Cholak 2022, Entropy-ABF) or ``sqrt(log n_i / log T)`` (``"sqrt"``: Jin et al., NeurIPS 2023,
    unclamped) with ``T = logn_train_length`` (``c_i = 1`` when None); the sink term only when
    ``sink_logit`` is given.

    Args:
      q ``[batch, q_length, heads, head_dim]``; k ``[batch, k_length, kv_heads, head_dim]``;
      v ``[batch, k_length, kv_heads, value_dim]`` (grouped-query: ``heads % kv_heads == 0``).
      causal: key j visible to query i iff ``j <= i``.
      mask: bool, broadcastable to ``[batch, heads, q_length, k_length]``; True = visible.
      scale: default ``1/sqrt(head_dim)``.
      window: causal sliding window: query i sees keys ``i - window < j <= i``.
      bias: additive logits, broadcastable to ``[batch, heads, q_length, k_length]``.
      sink_logit: ``[heads]`` learned sink logit ``s_h`` (an "attend to nothing" slot).
      logn_train_length / logn_kind: entropy-invariant log-n scaling (above).
      segment_ids: int ``[batch, length]``, or a pair ``(q_ids [batch, q_length], kv_ids
        [batch, k_length])``: packed sequences, a key is visible only within its segment.
      alibi_slopes: ``[heads]``: bias ``-slope_h |i - j|`` (ALiBi, Press et al. 2022).
      bias_fn: ``(q_pos [q_length], k_pos [k_length]) -> [heads or 1, q_length, k_length]``,
        additive logits as a function of positions (the blockwise form calls it per block).
      impl: ``"auto"`` (default), ``"xla"`` (the quadratic form), ``"blockwise"``
        (:mod:`zoo.attention.blockwise`: O(T) memory, a window costs O(T w)), ``"cudnn"`` (GPU,
        plain softmax in bf16/fp16), ``"splash"`` (TPU splash kernel), ``"pallas"``
        (``kernels_pallas.flash_attention``; interpret mode on CPU; named explicitly) or an ordered
        tuple; ``"auto"`` takes the library kernel where it fits, else the quadratic form up to
        ``q_length * k_length = QUADRATIC_LIMIT``, else the blockwise form.
      block_sizes: :class:`zoo.attention.blockwise.BlockSizes` of the blockwise form.

    Returns ``[batch, q_length, heads, value_dim]`` in ``v.dtype``; a query that sees no key
    returns 0. Paper: Vaswani et al. 2017; sinks: Xiao et al. 2024 / gpt-oss; log-n: Jin et al. 2023.
    """
    return _dispatch(
        q, k, v, impl=impl, variant="softmax", causal=causal, mask=mask, scale=scale, window=window,
        bias=bias, sink_logit=sink_logit, logn_train_length=logn_train_length, logn_kind=logn_kind,
        segment_ids=segment_ids, alibi_slopes=alibi_slopes, bias_fn=bias_fn, block_sizes=block_sizes,
    )


def _naive_logits_and_mask(q, k, v, *, causal, mask, scale, window, segment_ids=None):
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
    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        vis = vis & (jnp.asarray(qs)[:, None, :, None] == jnp.asarray(ks)[:, None, None, :])
    return lg, vis, f32(v)


def softmax_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None,
    scale: float | None = None, window: int | None = None, bias: Array | None = None,
    sink_logit: Array | None = None, logn_train_length: int | None = None, logn_kind: str = "ratio",
    segment_ids: Any = None, alibi_slopes: Array | None = None, bias_fn: Callable | None = None,
) -> Array:
    """Reference: ``jax.nn.softmax`` over explicitly masked logits with k/v heads repeated; the
    sink is an extra logit column dropped after the softmax; log-n scaling from the row counts;
    ALiBi ``-slope_h |i - j|`` and ``bias_fn(arange(Tq), arange(Tk))`` added as full arrays."""
    lg, vis, v = _naive_logits_and_mask(q, k, v, causal=causal, mask=mask, scale=scale, window=window,
                                        segment_ids=segment_ids)
    if logn_train_length is not None:
        r = jnp.log(jnp.maximum(jnp.sum(vis, axis=-1, keepdims=True), 1)) / math.log(logn_train_length)
        lg = lg * (jnp.maximum(1.0, r) if logn_kind == "ratio" else jnp.sqrt(r))
    if bias is not None:
        lg = lg + bias
    tq, tk = lg.shape[2], lg.shape[3]
    i, j = jnp.arange(tq)[:, None], jnp.arange(tk)[None, :]
    if alibi_slopes is not None:
        lg = lg - jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, 1, 1) * jnp.abs(i - j)
    if bias_fn is not None:
        lg = lg + jnp.asarray(bias_fn(jnp.arange(tq), jnp.arange(tk)), jnp.float32)
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
    segment_ids: Any = None,
) -> Array:
    """Reference: ``sum_j [visible] sigmoid(l_ij + b) v_j`` with ``b = -log(k_length)`` by default."""
    lg, vis, v = _naive_logits_and_mask(q, k, v, causal=causal, mask=mask, scale=scale, window=window,
                                        segment_ids=segment_ids)
    b = -math.log(k.shape[1]) if bias is None else bias
    w = jnp.where(vis, jax.nn.sigmoid(lg + b), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).astype(v.dtype)


def softplus_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, mask: Array | None = None,
    window: int | None = None, reweight: bool = False, power: float = 15.0, delta: float = 1.0,
    eps: float = 1e-8, segment_ids: Any = None,
) -> Array:
    """Reference: LSSA / LSSAR written directly (``relu(n a - delta)^p`` without the log-domain
    shift, then divided by the row max; exact while it does not overflow, i.e. at test sizes)."""
    d = q.shape[-1]
    nq = q / jnp.maximum(jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    nk = k / jnp.maximum(jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    lg, vis, v = _naive_logits_and_mask(nq, nk, v, causal=causal, mask=mask, scale=1.0, window=window,
                                        segment_ids=segment_ids)
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
    segment_ids: Array | tuple[Array, Array] | None = None,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Sigmoid attention ``y_i = sum_{j visible} sigmoid(scale * q_i.k_j + b) v_j`` (no normalisation).

    ``b`` defaults to ``-log(k_length)`` (the same for every query, also when causal, as the
    FlashSigmoid reference); pass the configured maximum length's ``-log n`` to match a model
    trained at another length. Shapes and ``mask``/``window``/``segment_ids`` as :func:`softmax`.
    Paper: Ramapuram et al. 2024 (arXiv 2409.04431).

    Args:
      impl, block_sizes: as :func:`softmax`.
    """
    check_qkv(q, k, v, causal=causal)
    b_ = -math.log(k.shape[1]) if bias is None else bias
    return _dispatch(
        q, k, v, impl=impl, variant="sigmoid", causal=causal, mask=mask, scale=scale, window=window,
        sigmoid_bias=b_, segment_ids=segment_ids, block_sizes=block_sizes,
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
    segment_ids: Array | tuple[Array, Array] | None = None,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Length-scaled softplus attention LSSA, and with ``reweight=True`` LSSAR.

    LSSA: ``a_ij = softplus(log d * log n_i * q^_i.k^_j) / (sum_j' softplus(...) + eps)`` with
    L2-normalised ``q^, k^``, head dim ``d`` and ``n_i`` the number of keys query i sees.
    LSSAR: ``w_ij = relu(n_i a_ij - delta_i)^p / (sum_j' relu(...)^p + eps)`` with
    ``delta_i = 0`` for the first three positions and ``delta`` after, computed in the log domain
    (``exp(p log(.) - max)``) so it stays finite at any length; ``eps`` is added after that
    shift, so a row whose re-weighted entries are tiny but positive is still normalised to 1
    (the direct form would let ``eps`` swamp it). A uniform row (every ``n a <= delta``) gives
    all-zero weights and output 0. In a blockwise pass LSSA needs only the running sum of
    softplus (no max: the logits are bounded); LSSAR needs that complete sum before its first
    weight, so it takes two passes over the keys (:mod:`zoo.attention.blockwise`).

    Form implemented: Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length
    Extrapolation in Large Language Models" (arXiv 2501.13428), as written in the public
    third-party reproduction ``lssa_attention`` / ``lssar_attention`` (p = 15, delta = 1); the
    authors' code (iminfine/freeatten) could not be read, so the exact scale factor is that
    reproduction's, not checked against the official code.

    Args:
      impl, block_sizes: as :func:`softmax`.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0; got {power!r}")
    return _dispatch(
        q, k, v, impl=impl, variant="softplus", causal=causal, mask=mask, scale=None, window=window,
        reweight=reweight, power=power, delta=delta, eps=eps, segment_ids=segment_ids, block_sizes=block_sizes,
    )


def sliding_window(
    q: Array, k: Array, v: Array, *, causal: bool = False, window: int, mask: Array | None = None,
    scale: float | None = None, bias: Array | None = None, sink_logit: Array | None = None,
    logn_train_length: int | None = None, logn_kind: str = "ratio", segment_ids: Any = None,
    alibi_slopes: Array | None = None, bias_fn: Callable | None = None,
    impl: str | Sequence[str] = "auto", block_sizes: BlockSizes | None = None,
) -> Array:
    """Causal sliding-window softmax attention: query i sees keys ``i - window < j <= i``
    (causal only: pass ``causal=True``). Options as :func:`softmax`; the blockwise form visits
    only the key blocks inside the window (cost O(T window))."""
    if causal is not True:
        raise ValueError(f"sliding_window attention is causal only: pass causal=True; got causal={causal!r}")
    return softmax(q, k, v, causal=True, window=window, mask=mask, scale=scale, bias=bias,
                   sink_logit=sink_logit, logn_train_length=logn_train_length, logn_kind=logn_kind,
                   segment_ids=segment_ids, alibi_slopes=alibi_slopes, bias_fn=bias_fn, impl=impl,
                   block_sizes=block_sizes)


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


def _visible_count(qpos: Array, cap: int, ns: int, window: int | None) -> Array:
    """Keys a query at position ``p`` sees on the cache (every position ``<= p`` was written):
    ``#{x <= p : p - x < W and (x < ns or p - x < cap - ns)}`` with ``W = window`` (or inf)."""
    big = jnp.iinfo(jnp.int32).max // 4
    w = big if window is None else window
    near = jnp.minimum(w, cap - ns)
    lo = jnp.maximum(0, qpos - near + 1)
    cnt = qpos - lo + 1
    # sink positions below the ring range that are still inside the window
    s_lo, s_hi = jnp.maximum(0, qpos - w + 1), jnp.minimum(ns, lo) - 1
    return (cnt + jnp.maximum(0, s_hi - s_lo + 1)).astype(jnp.float32)


def _prefill_blockwise(cache, q, k, v, *, variant, ns, window, scale, sigmoid_bias, sink_logit, logn_train_length,
                       logn_kind, alibi_slopes, bias_fn, block_sizes, reweight, power, delta, eps):
    cap = cache.pos.shape[0]
    t = q.shape[1]
    kc, vc = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    qpos = cache.length + jnp.arange(t, dtype=jnp.int32)
    # Visibility by position: causal, inside `window`, and what the cache still holds (the last
    # cap - ns positions, plus the ns StreamingLLM sinks, which obey the window too).
    ring = cap - ns
    w_eff = ring if window is None else min(window, ring)
    glob = dict(num_global=ns, global_window=window) if ns and (window is None or window > ring) else {}
    common = dict(causal=True, window=w_eff, block_sizes=block_sizes, q_position=cache.length, **glob)
    if variant != "softmax":
        var = ("lssar" if reweight else "lssa") if variant == "softplus" else variant
        y = blockwise.attention(
            q, jnp.concatenate([cache.k, kc], 1), jnp.concatenate([cache.v, vc], 1), variant=var,
            kv_positions=jnp.concatenate([cache.pos, qpos]), scale=scale, sigmoid_bias=sigmoid_bias,
            power=power, delta=delta, eps=eps, **common,
        )
        return y
    # Softmax: the cache (dense over its slots) and the prompt (blocks skipped outside the
    # window) as two partial softmaxes merged by their log-sum-exp; the sink joins one of them.
    n = None
    if logn_train_length is not None:
        n = _visible_count(qpos, cap, ns, window)
    opts = dict(scale=scale, logn_train_length=logn_train_length, logn_kind=logn_kind, alibi_slopes=alibi_slopes,
                bias_fn=bias_fn, counts=n, return_lse=True, **common)
    y_c, l_c = blockwise.attention(q, cache.k, cache.v, kv_positions=cache.pos, sink_logit=sink_logit, **opts)
    y_n, l_n = blockwise.attention(q, kc, vc, **opts)
    m = jax.lax.stop_gradient(jnp.maximum(l_c, l_n))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    a_c, a_n = jnp.exp(l_c - m), jnp.exp(l_n - m)
    den = a_c + a_n
    den = jnp.where(den > 0, den, 1.0)[..., None]
    y = (a_c[..., None] * y_c.astype(jnp.float32) + a_n[..., None] * y_n.astype(jnp.float32)) / den
    return y.astype(v.dtype)


def prefill(
    cache: KVCache, q: Array, k: Array, v: Array, *,
    variant: str = "softmax",
    num_sink_tokens: int = 0,
    scale: float | None = None,
    window: int | None = None,
    bias: float | None = None,
    sink_logit: Array | None = None,
    logn_train_length: int | None = None,
    logn_kind: str = "ratio",
    alibi_slopes: Array | None = None,
    bias_fn: Callable[[Array, Array], Array] | None = None,
    reweight: bool = False,
    power: float = 15.0,
    delta: float = 1.0,
    eps: float = 1e-8,
    impl: str | Sequence[str] = "auto",
    block_sizes: BlockSizes | None = None,
) -> tuple[Array, KVCache]:
    """A prompt in one parallel call on the cache: ``q [batch, T, heads, head_dim]``, ``k, v
    [batch, T, kv_heads, dim]`` at positions ``cache.length ..``; returns ``(y [batch, T, heads,
    value_dim], cache)``, equal to ``T`` calls of :func:`step`.

    Query ``t`` attends over the cached tokens and the prompt's tokens ``<= t`` that the cache
    would still hold at step ``t``: all while ``t < capacity``, afterwards the first
    ``num_sink_tokens`` and the last ``capacity - num_sink_tokens`` (StreamingLLM), and only
    those inside ``window``. New k/v are cast to the cache dtype first (as :func:`step` stores
    them). ``variant`` is ``"softmax" | "sigmoid" | "softplus"`` with the parallel functions'
    options (ALiBi and ``bias_fn`` see absolute positions); sigmoid's ``bias`` defaults to
    ``-log(capacity)`` (pass ``-log(T)`` to match a parallel call over ``T`` keys).

    ``impl``: ``"xla"`` materialises ``[T, capacity + T]`` weights; ``"blockwise"`` (chosen by
    ``"auto"`` when ``T * (capacity + T) > QUADRATIC_LIMIT``) is the chunked prefill: memory
    O(T + capacity); for softmax the cache slots and the prompt are two blockwise passes merged
    by their log-sum-exp, the prompt's visiting only the key blocks inside the window (a long
    prompt on a sliding-window cache costs O(T window)). Library kernels do not take cache
    slots: ``"cudnn"`` / ``"splash"`` fall back to ``"auto"`` here.
    """
    check_choice("variant", variant, VARIANTS)
    _check_cache(cache)
    check_qkv(q, k, v, causal=True)
    cap = cache.pos.shape[0]
    ns = _check_sinks(num_sink_tokens, cap)
    window = as_int("window", window)
    logn_train_length = as_int("logn_train_length", logn_train_length)
    check_choice("logn_kind", logn_kind, ("ratio", "sqrt"))
    if variant != "softmax" and (alibi_slopes is not None or bias_fn is not None):
        raise ValueError(f"alibi_slopes / bias_fn are options of the softmax variant; got variant={variant!r}")
    new = write(cache, k, v, num_sink_tokens=ns)
    b, t, h, d = q.shape
    if variant == "sigmoid" and bias is None:
        bias = -math.log(cap)
    if variant == "softplus" and not power > 0:
        raise ValueError(f"power must be > 0; got {power!r}")
    if isinstance(impl, str) and impl in ("cudnn", "splash"):
        impl = "auto"
    o = dict(variant=variant, causal=True, window=window, sink_logit=sink_logit, logn_train_length=logn_train_length,
             alibi_slopes=alibi_slopes, bias_fn=bias_fn, block_sizes=block_sizes)
    form = registry.resolve(FAMILY, ("xla", "blockwise") if impl == "auto" else impl, dtype=jnp.dtype(q.dtype),
                            head_dim=d, q_length=t, k_length=cap + t, auto=impl == "auto", **o)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if form.name == "blockwise":
        y = _prefill_blockwise(
            cache, q, k, v, variant=variant, ns=ns, window=window, scale=scale, sigmoid_bias=bias,
            sink_logit=sink_logit, logn_train_length=logn_train_length, logn_kind=logn_kind,
            alibi_slopes=alibi_slopes, bias_fn=bias_fn, block_sizes=block_sizes, reweight=reweight,
            power=power, delta=delta, eps=eps,
        )
        return y, new
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
    vals = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    qpos = cache.length + jnp.arange(t, dtype=jnp.int32)  # [T]
    kpos = jnp.concatenate([cache.pos, qpos])  # [cap + T], -1 = empty slot
    qi, kj = qpos[:, None], kpos[None, :]
    vis = (kj >= 0) & (kj <= qi) & ((qi < cap) | (kj < ns) | (kj > qi - (cap - ns)))
    if window is not None:
        vis = vis & (kj > qi - window)
    vis = jnp.broadcast_to(vis[None, None], (b, h, t, cap + t))
    if sink_logit is not None:
        sink_logit = per_head("sink_logit", sink_logit, h)
    opts = None
    if variant == "softplus":
        opts = _softplus_opts(t, reweight, power, delta, eps, q_pos=qpos)
    if variant == "softmax":
        bias = None
        if alibi_slopes is not None:
            sl = per_head("alibi_slopes", alibi_slopes, h)
            bias = (-sl[:, None, None] * jnp.abs(qi - kj).astype(jnp.float32))[None]
        if bias_fn is not None:
            x = jnp.asarray(bias_fn(qpos, kpos), jnp.float32)
            x = (x[None] if x.ndim == 2 else x)[None]
            bias = x if bias is None else bias + x
    y = _attend(
        q, keys, vals, vis, variant=variant, scale=scale, bias=bias, sink_logit=sink_logit,
        logn_train_length=logn_train_length, softplus_opts=opts, logn_kind=logn_kind,
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
