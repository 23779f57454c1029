"""Entry points of the flash-attention kernels: the checked public function, ``supports`` (the
reason a set of options cannot run here), the unchecked kernel call and the ``shard_map`` wrapper."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.flash_attention import gpu, tpu
from kernels_pallas.flash_attention.common import F32, VARIANTS, BlockSizes, Plan, make_plan
from kernels_pallas.linear_attention.api import resolve_backend

Array = jax.Array
_PROGRAMS = {"tpu": tpu, "gpu": gpu}


# ----------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_call(q, k, v, sink, slope, plan: Plan):
    return _PROGRAMS[plan.backend].forward(q, k, v, sink, slope, plan)[0]


def _kernel_call_fwd(q, k, v, sink, slope, plan: Plan):
    o, r = _PROGRAMS[plan.backend].forward(q, k, v, sink, slope, plan)
    return o, (q, k, v, sink, slope, o, r)


def _kernel_call_bwd(plan: Plan, res, do):
    q, k, v, sink, slope, o, r = res
    do = do.astype(q.dtype)
    if plan.variant == "sigmoid":  # no normaliser: no residual and no D term
        r = dd = jnp.zeros(o.shape[:3], F32)
    else:
        dd = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)  # D_i = do_i . o_i
    dq, dk, dv = _PROGRAMS[plan.backend].backward(q, k, v, sink, slope, do, r, dd, plan)
    dsink = jnp.zeros_like(sink)
    if plan.has_sink:
        # d lse_i / d s_h = exp(s_h - lse_i) and dL/d lse_i = -D_i (padded rows have D = 0).
        b, hkv = q.shape[:2]
        rr = r.reshape(b, hkv, plan.groups, plan.tqp)[..., : plan.tq]
        dr = dd.reshape(b, hkv, plan.groups, plan.tqp)[..., : plan.tq]
        s = sink[None, :, : plan.groups, None]
        g = -jnp.sum(jnp.exp(s - rr) * dr, axis=(0, 3))
        dsink = dsink.at[:, : plan.groups].set(g)
    # ALiBi slopes are not differentiated (documented): zero cotangent.
    return dq, dk, dv, dsink, jnp.zeros_like(slope)


_kernel_call.defvjp(_kernel_call_fwd, _kernel_call_bwd)


# ----------------------------------------------------------------------------- kernel call


def _per_head(x: Array | None, hkv: int, groups: int, gp: int) -> Array:
    """``[H]`` -> ``[Hkv, Gp]`` float32 (zero-padded groups); zeros when absent."""
    if x is None:
        return jnp.zeros((hkv, gp), F32)
    x = jnp.asarray(x, F32).reshape(hkv, groups)
    return jnp.pad(x, ((0, 0), (0, gp - groups)))


def flash_attention_kernel(
    q: Array, k: Array, v: Array, *, variant: str = "softmax", causal: bool = False,
    scale: float | None = None, window: int | None = None, sink_logit: Array | None = None,
    logn_train_length: int | None = None, alibi_slopes: Array | None = None,
    bias_fn: Callable[..., Any] | None = None, sigmoid_bias: float | None = None, eps: float = 1e-8,
    block_q: int | None = None, block_k: int | None = None, block_sizes: BlockSizes | None = None,
    backend: str, interpret: Any, precision: Any = None, logn_kind: str = "ratio",
) -> Array:
    """The kernels on inputs the caller has already validated (no checks, no backend resolution);
    arguments as :func:`flash_attention`. Returns ``[batch, q_length, heads, value_dim]``."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    e = v.shape[-1]
    groups = h // hkv
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if variant == "softplus":  # LSSA: L2-normalised q, k (differentiated by JAX, outside the kernel)
        def l2(x):
            x = x.astype(F32)
            return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

        q, k = l2(q).astype(dtype), l2(k).astype(dtype)
    plan = make_plan(
        tq, tk, d, e, groups, dtype, backend=backend, interpret=interpret, variant=variant, causal=bool(causal),
        window=window, scale=1.0 / math.sqrt(d) if scale is None else scale,
        sigmoid_bias=-math.log(tk) if sigmoid_bias is None else sigmoid_bias, logn=logn_train_length,
        has_sink=sink_logit is not None, has_alibi=alibi_slopes is not None, bias_fn=bias_fn, eps=eps,
        block_q=block_q, block_k=block_k, block_sizes=block_sizes, precision=precision,
        logn_kind=logn_kind, bias_fn_head_arg=bias_fn is None or _takes_head(bias_fn),
    )

    def to_kernel(x: Array, rows: int, width: int, g: int) -> Array:
        x = jnp.swapaxes(x.astype(dtype), 1, 2)  # [B, H, T, D]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, width - x.shape[-1])))
        return x.reshape(b, hkv, g * rows, width)  # heads h = hk * G + g stacked along rows

    sink = _per_head(sink_logit, hkv, groups, plan.gp)
    slope = _per_head(None if alibi_slopes is None else lax.stop_gradient(alibi_slopes), hkv, groups, plan.gp)
    o = _kernel_call(
        to_kernel(q, plan.tqp, plan.dp, groups), to_kernel(k, plan.tkp, plan.dp, 1),
        to_kernel(v, plan.tkp, plan.ep, 1), sink, slope, plan,
    )
    o = o.reshape(b, h, plan.tqp, plan.ep)[:, :, :tq, :e]
    return jnp.swapaxes(o, 1, 2).astype(v.dtype)


# ----------------------------------------------------------------------------- checks


def _takes_head(fn: Callable[..., Any]) -> bool:
    """True for ``bias_fn(q_pos, k_pos, head)``, False for ``bias_fn(q_pos, k_pos)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(pos) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _shape(x: Any) -> str:
    return "x".join(map(str, getattr(x, "shape", ()))) or "scalar"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def supports(
    *, variant: str = "softmax", mask: Any = None, bias: Any = None, segment_ids: Any = None,
    reweight: bool = False, window: Any = None, causal: bool = False, sink_logit: Any = None,
    logn_train_length: Any = None, alibi_slopes: Any = None, bias_fn: Any = None, logn_kind: str = "ratio",
    learn_alibi: bool = False, **options: Any,
) -> str | None:
    """Why the kernels cannot take these options (None: they can). Accepts the option names of
    ``zoo.attention.softmax / sigmoid / softplus`` so a dispatcher can pass them unchanged."""
    if variant not in VARIANTS:
        return f"variant {variant!r} (kernels: {', '.join(VARIANTS)})"
    if mask is not None:
        return "a mask array (the kernels take causal / window / ragged lengths, not a [B, H, Tq, Tk] mask)"
    if segment_ids is not None:
        return "segment ids / padding masks (not implemented in the kernels)"
    if bias is not None and variant == "softmax":
        return "a bias array [B, H, Tq, Tk] (pass alibi_slopes or a bias_fn of positions)"
    if bias is not None and variant == "sigmoid" and not isinstance(bias, numbers.Real):
        return "a non-scalar sigmoid bias (pass sigmoid_bias as a float, plus alibi_slopes or bias_fn)"
    if reweight:
        return (
            "softplus LSSAR (reweight=True): its weights relu(n_i a_ij - delta)^p need the finished LSSA "
            "normaliser of the row, i.e. a second forward pass and a third backward pass for the row term "
            "sum_j a_ij dL/da_ij; not implemented (use the blockwise XLA form)"
        )
    if window is not None and not causal:
        return "window needs causal=True"
    if variant != "softmax" and (sink_logit is not None or logn_train_length is not None):
        return "sink_logit / logn_train_length belong to variant='softmax'"
    if variant == "softplus" and (alibi_slopes is not None or bias_fn is not None):
        return "softplus (LSSA) takes no additive bias"
    if logn_kind not in ("ratio", "sqrt"):
        return f"logn_kind={logn_kind!r} (kernels: 'ratio', 'sqrt')"
    if alibi_slopes is not None and learn_alibi:
        return "learned ALiBi slopes (the kernels give the slopes no gradient)"
    return None


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    variant: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    sink_logit: Array | None = None,
    logn_train_length: int | None = None,
    alibi_slopes: Array | None = None,
    logn_kind: str = "ratio",
    bias_fn: Callable[..., Array] | None = None,
    sigmoid_bias: float | None = None,
    eps: float = 1e-8,
    block_q: int | None = None,
    block_k: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: Any = None,
    backend: str | None = None,
    precision: Any = None,
) -> Array:
    """Flash attention (FlashAttention-2 forward and backward) for the softmax-family variants no
    library kernel covers, as Pallas kernels (Mosaic TPU / Triton GPU; interpret mode on CPU).

    With ``l_ij = f_i * q_i.k_j + beta_ij`` over the keys query ``i`` sees (``n_i`` of them):

    - ``variant="softmax"``: ``y_i = sum_j a_ij v_j``, ``a_ij = exp(l_ij) / (exp(s_h) +
      sum_j' exp(l_ij'))``, ``f_i = scale * max(1, log n_i / log logn_train_length)`` (1 without
      log-n; Jin et al. 2023), the sink term only with ``sink_logit`` (gpt-oss; Xiao et al. 2024);
    - ``"sigmoid"``: ``y_i = sum_j sigmoid(l_ij) v_j``, ``f_i = scale``, ``beta`` includes
      ``sigmoid_bias`` (default ``-log(k_length)``; FlashSigmoid, Ramapuram et al. 2024);
    - ``"softplus"`` (LSSA, Gao & Spratling 2025): ``y_i = sum_j softplus(l_ij) v_j /
      (sum_j' softplus(l_ij') + eps)`` with L2-normalised ``q, k`` and ``f_i = log(d) log n_i``;

    and ``beta_ij = -alibi_slopes[h] * |i - j| + bias_fn(i, j, h)`` (ALiBi, Press et al. 2022:
    ``-m_h (i - j)`` on the causal side). These are exactly ``zoo.attention.softmax`` /
    ``sigmoid`` / ``softplus`` / ``sliding_window`` (the quadratic references, tested against in
    interpret mode). Softplus LSSAR is refused (see :func:`supports`).

    Args:
      q: ``[batch, q_length, heads, head_dim]``; k: ``[batch, k_length, kv_heads, head_dim]``;
        v: ``[batch, k_length, kv_heads, value_dim]`` (grouped-query: ``heads % kv_heads == 0``).
      causal: key ``j`` visible to query ``i`` iff ``j <= i`` (needs ``q_length == k_length``).
      scale: default ``1/sqrt(head_dim)`` (softmax, sigmoid).
      window: causal sliding window, query ``i`` sees ``i - window < j <= i``; only the key blocks
        inside it are visited (cost ``O(T window)``).
      sink_logit: ``[heads]`` learned sink logits (softmax); differentiated.
      logn_train_length: ``T_train >= 2`` for entropy-invariant log-n scaling (softmax).
      logn_kind: ``"ratio"`` (``max(1, log n_i / log T_train)``, Chiang & Cholak 2022) or
        ``"sqrt"`` (``sqrt(log n_i / log T_train)``, Jin et al. 2023), as
        ``zoo.attention.blockwise.logn_factor``.
      alibi_slopes: ``[heads]`` ALiBi slopes (softmax, sigmoid); not differentiated.
      bias_fn: additive logits as a function of positions (softmax, sigmoid), traced inside the
        kernel, hashable (a module-level function), no gradient flowing into it. Either
        ``bias_fn(q_pos, k_pos, head) -> bias`` on int32 positions that broadcast against each
        other (a column and a row, in either orientation) and a scalar head index (elementwise),
        or ``zoo.attention.blockwise``'s ``bias_fn(q_pos [n], k_pos [m]) -> [n, m] | [heads or 1,
        n, m]`` (recognised by its two positional parameters; per-head tables cost one select
        per head and tile).
      sigmoid_bias: a float (sigmoid); default ``-log(k_length)``.
      eps: softplus's normaliser epsilon.
      block_q, block_k: tile sizes (override ``block_sizes``; rounded as described in
        :class:`BlockSizes`); any length works (ragged last blocks are masked).
      interpret: ``None`` (True exactly on CPU), a bool, or ``pltpu.InterpretParams`` (TPU).
      backend: ``"tpu"`` (Mosaic), ``"gpu"`` (Triton) or ``None`` (from the default device; the
        TPU program on CPU).
      precision: matmul precision; default ``HIGHEST`` for float32 inputs.

    Returns ``[batch, q_length, heads, value_dim]`` in ``v.dtype``; differentiable in ``q, k, v``
    (and ``sink_logit``). Memory ``O(T)``: the backward recomputes the logits from the saved
    per-row log-sum-exp (softmax) or normaliser (softplus); sigmoid saves nothing.

    Hardware status: only interpret mode on CPU and the Pallas -> Mosaic / Triton lowering (via
    ``jax.export`` on a CPU host) have been run; the kernels have not run on a real TPU or GPU.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, length, heads, dim]; got {_shape(x)}")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be [{b}, k_length, kv_heads, {d}]; got {_shape(k)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [{b}, {tk}, {hkv}, value_dim] to match k; got {_shape(v)}")
    if tq == 0 or tk == 0:
        raise ValueError(f"q and k must hold at least one token; got q length {tq}, k length {tk}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hkv})")
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must be float32, bfloat16 or float16; got {dtype}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if causal and tq != tk:
        raise ValueError(f"causal attention needs q and k of the same length; got {tq} and {tk}")
    if window is not None and not (_is_int(window) and window >= 1):
        raise ValueError(f"window must be a positive integer or None; got {window!r}")
    if window is not None and not causal:
        raise ValueError("window needs causal=True (a sliding window looks back from each query)")
    for name, x in (("block_q", block_q), ("block_k", block_k)):
        if x is not None and not (_is_int(x) and x >= 1):
            raise ValueError(f"{name} must be a positive integer or None; got {x!r}")
    if logn_kind not in ("ratio", "sqrt"):
        raise ValueError(f"logn_kind must be 'ratio' or 'sqrt'; got {logn_kind!r}")
    if logn_train_length is not None and not (_is_int(logn_train_length) and logn_train_length >= 2):
        raise ValueError(f"logn_train_length must be an integer >= 2 or None; got {logn_train_length!r}")
    for name, x in (("sink_logit", sink_logit), ("alibi_slopes", alibi_slopes)):
        if x is not None and jnp.shape(x) != (h,):
            raise ValueError(f"{name} must be [heads={h}]; got {_shape(jnp.asarray(x))}")
    if bias_fn is not None and not callable(bias_fn):
        raise ValueError(f"bias_fn must be callable(q_pos, k_pos, head) or None; got {bias_fn!r}")
    if sigmoid_bias is not None and not isinstance(sigmoid_bias, numbers.Real):
        raise ValueError(f"sigmoid_bias must be a float or None; got {sigmoid_bias!r}")
    why = supports(
        variant=variant, window=window, causal=causal, sink_logit=sink_logit,
        logn_train_length=logn_train_length, alibi_slopes=alibi_slopes, bias_fn=bias_fn, logn_kind=logn_kind,
    )
    if why is not None:
        raise ValueError(f"flash_attention does not support {why}")
    backend, interpret = resolve_backend(backend, interpret)
    return flash_attention_kernel(
        q, k, v, variant=variant, causal=causal, scale=scale, window=window, sink_logit=sink_logit,
        logn_train_length=logn_train_length, alibi_slopes=alibi_slopes, bias_fn=bias_fn,
        sigmoid_bias=sigmoid_bias, eps=eps, block_q=block_q, block_k=block_k, block_sizes=block_sizes,
        backend=backend, interpret=interpret, precision=precision, logn_kind=logn_kind,
    )


# ----------------------------------------------------------------------------- shard_map


def flash_attention_sharded(
    q: Array, k: Array, v: Array, *, mesh: Any = None, rules: Sequence[tuple[str, Any]] | None = None,
    **options: Any,
) -> Array:
    """:func:`flash_attention` inside ``shard_map`` over the active (or given) mesh, batch and
    heads split as the logical-axis rules say (``zoo.attention.dispatch.kernel_call``; no
    communication: every (batch, head) is independent). Grouped-query heads are split by key/value
    head (q seen as ``[B, T, Hkv, G, D]``), so each device holds whole groups; ``sink_logit`` and
    ``alibi_slopes`` follow their heads. Without a mesh (or on one device) this is the plain call.
    """
    from zoo.attention import dispatch

    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv if hkv and h % hkv == 0 else None
    if g is None or k.ndim != 4:
        return flash_attention(q, k, v, **options)  # raises the shape error
    sink, slopes = options.pop("sink_logit", None), options.pop("alibi_slopes", None)
    per_head = lambda x: None if x is None else jnp.asarray(x, F32).reshape(hkv, g)  # noqa: E731

    def local(q5, k, v, sink, slopes):
        bl, t, hl = q5.shape[0], q5.shape[1], q5.shape[2]
        flat = lambda x: None if x is None else x.reshape(hl * g)  # noqa: E731
        y = flash_attention(
            q5.reshape(bl, t, hl * g, d), k, v, sink_logit=flat(sink), alibi_slopes=flat(slopes), **options
        )
        return y.reshape(bl, t, hl, g, y.shape[-1])

    tok5, tok4, heads = ("batch", None, "heads", None, None), ("batch", None, "heads", None), ("heads", None)
    y = dispatch.kernel_call(
        local, (q.reshape(b, tq, hkv, g, d), k, v, per_head(sink), per_head(slopes)),
        in_axes=(tok5, tok4, tok4, heads, heads), out_axes=tok5, mesh=mesh, rules=rules,
    )
    return y.reshape(b, tq, h, y.shape[-1])
