"""Entry points of the linear-attention kernels: the checked public function and the unchecked
kernel call that ``zoo.attention.linear`` uses after it has validated and resolved everything."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_attention import gpu, tpu
from kernels_pallas.linear_attention.common import BACKENDS, F32, MAX_RATE, BlockSizes, Plan, make_plan

Array = jax.Array
_PROGRAMS = {"tpu": tpu, "gpu": gpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_call(q, k, v, rate, s0, plan: Plan):
    return _PROGRAMS[plan.backend].forward(q, k, v, rate, s0, plan)


def _kernel_call_fwd(q, k, v, rate, s0, plan: Plan):
    return _PROGRAMS[plan.backend].forward(q, k, v, rate, s0, plan), (q, k, v, rate, s0)


def _kernel_call_bwd(plan: Plan, res, cts):
    q, k, v, rate, s0 = res
    do, dst = cts
    dq, dk, dv, ds0 = _PROGRAMS[plan.backend].backward(q, k, v, rate, s0, do.astype(q.dtype), dst.astype(F32), plan)
    # Decay rates are not differentiated (documented): zero cotangent.
    return dq, dk, dv, jnp.zeros_like(rate), ds0.astype(s0.dtype)


_kernel_call.defvjp(_kernel_call_fwd, _kernel_call_bwd)


def causal_linear_attention_kernel(
    q: Array, k: Array, v: Array, decay_rate: Array | None, initial_state: Array | None, *,
    backend: str, interpret: Any, chunk_size: int | None = None, block_sizes: BlockSizes | None = None,
    precision: Any = None,
) -> tuple[Array, Array]:
    """The kernels on inputs the caller has already validated (no checks, no backend resolution):
    ``q, k [B, T, H, F]``, ``v [B, T, H, E]`` (float32/bfloat16/float16), ``decay_rate [H]``
    (rates ``>= 0``, ``+inf`` allowed) or None, ``initial_state [B, H, F, E]`` or None;
    ``backend`` ``"tpu"``/``"gpu"`` and ``interpret`` as in :func:`causal_linear_attention`.
    Returns ``(o [B, T, H, E], S_T [B, H, F, E] float32)``: ``S_t = lambda_h S_{t-1} + k_t v_t^T``,
    ``o_t = q_t^T S_t`` (Qin et al. 2024, Lightning Attention-2)."""
    b, t, h, f = q.shape
    e = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    plan = make_plan(
        t, f, e, dtype, backend=backend, interpret=interpret, chunk_size=chunk_size,
        block_sizes=block_sizes, has_decay=decay_rate is not None, precision=precision,
    )
    pad_t = plan.tp - t

    def to_kernel(x: Array, width: int) -> Array:
        x = jnp.swapaxes(x.astype(dtype), 1, 2)  # [B, H, T, D]
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad_t), (0, width - x.shape[-1])))

    # A rate of +inf (a reset) becomes MAX_RATE: every power lambda^n is then exact (common.py).
    rate = jnp.zeros((h,), F32) if decay_rate is None else jnp.minimum(lax.stop_gradient(decay_rate), MAX_RATE)
    s0 = jnp.zeros((b, h, f, e), F32) if initial_state is None else initial_state.astype(F32)
    s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, plan.fp - f), (0, plan.ep - e)))
    o, st = _kernel_call(to_kernel(q, plan.fp), to_kernel(k, plan.fp), to_kernel(v, plan.ep), rate, s0, plan)
    return jnp.swapaxes(o[:, :, :t, :e], 1, 2), st[:, :, :f, :e]


def resolve_backend(backend: str | None, interpret: Any) -> tuple[str, Any]:
    """``(backend, interpret)`` from the arguments and the default device: the TPU program on TPU
    and CPU, the Triton program on GPU; interpret mode exactly on CPU unless given."""
    platform = jax.default_backend()
    auto = backend is None
    if auto:
        backend = "tpu" if platform in ("tpu", "cpu") else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    if auto and platform == "cpu" and interpret is False:
        # (An explicit backend with interpret=False is allowed on a CPU host: it lowers the real
        # kernel, e.g. for jax.export(platforms=["tpu"]) / ahead-of-time compilation.)
        raise ValueError("Pallas only runs in interpret mode on CPU: pass interpret=True or None")
    if isinstance(interpret, pltpu.InterpretParams) and backend != "tpu":
        raise ValueError("interpret=pltpu.InterpretParams(...) simulates a TPU: it needs backend='tpu'")
    return backend, interpret


def _shape(x: Any) -> str:
    return "x".join(map(str, getattr(x, "shape", ()))) or "scalar"


def causal_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    decay_rate: Array | None = None,
    *,
    initial_state: Array | None = None,
    chunk_size: int | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: Any = None,
    precision: Any = None,
) -> tuple[Array, Array]:
    """Causal linear attention with per-head decay as Pallas kernels (Lightning Attention-2).

    ``S_t = lambda_h S_{t-1} + k_t v_t^T`` (``S_0 = initial_state``), ``o_t = q_t^T S_t``,
    ``lambda_h = exp(-decay_rate_h)``; returns ``(o, S_T)``. No feature map, normaliser or scaling:
    pass feature-mapped ``q``/``k`` and append a column of ones to ``v`` for the normaliser (as
    ``zoo.attention.linear`` does).

    Args:
      q, k: ``[batch, length, heads, F]``.
      v: ``[batch, length, heads, E]``.
      decay_rate: ``None`` (no decay), a scalar or ``[heads]`` rates ``s_h >= 0`` (``+inf``: a
        reset every token). Not differentiated: zero gradient.
      initial_state: ``[batch, heads, F, E]`` (float32; ``None`` = zeros).
      chunk_size: block length ``C`` (overrides ``block_sizes.block_t``; rounded as described in
        :class:`BlockSizes`). Any length works: the last block is padded.
      block_sizes: :class:`BlockSizes` (``None``: ``BlockSizes.get_default(backend)``).
      backend: ``"tpu"`` (Mosaic TPU program), ``"gpu"`` (Triton program) or ``None`` (from the
        default device; the TPU program on CPU).
      interpret: ``None`` (True exactly on CPU), a bool, or ``pltpu.InterpretParams`` (TPU program).
        ``interpret=False`` with an explicit ``backend`` lowers the real kernel even on a CPU host
        (for ``jax.export(..., platforms=["tpu" | "cuda"])``); it cannot *run* there.
      precision: matmul precision; default ``HIGHEST`` for float32 inputs (no TF32 / bf16 passes),
        default precision for 16-bit inputs.

    Inputs may be float32 or bfloat16 (float16 on GPU); they are computed in their common dtype
    with float32 accumulation and a float32 state. Returns ``o [batch, length, heads, E]`` in that
    dtype and ``final_state [batch, heads, F, E]`` float32. Differentiable in q, k, v and
    initial_state (backward kernels, see the package docstring).

    Paper: Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths
    in Large Language Models" (2024); Katharopoulos et al., "Transformers are RNNs" (2020).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, length, heads, dim]; got {_shape(x)}")
    b, t, h, f = q.shape
    e = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [{b}, {t}, {h}, {f}]; got {_shape(k)}")
    if v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [{b}, {t}, {h}, value_dim]; got {_shape(v)}")
    if t == 0:
        raise ValueError("q, k, v must hold at least one token (length >= 1)")
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must be float32, bfloat16 or float16; got {dtype}")
    if decay_rate is not None:
        decay_rate = jnp.asarray(decay_rate, F32)
        if decay_rate.ndim == 0:
            decay_rate = jnp.broadcast_to(decay_rate, (h,))
        if decay_rate.shape != (h,):
            raise ValueError(f"decay_rate must be None, a scalar or [heads={h}]; got {_shape(decay_rate)}")
    if initial_state is not None and initial_state.shape != (b, h, f, e):
        raise ValueError(f"initial_state must be [{b}, {h}, {f}, {e}]; got {_shape(initial_state)}")
    if chunk_size is not None and not (
        isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool) and chunk_size >= 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    backend, interpret = resolve_backend(backend, interpret)
    return causal_linear_attention_kernel(
        q, k, v, decay_rate, initial_state, backend=backend, interpret=interpret, chunk_size=chunk_size,
        block_sizes=block_sizes, precision=precision,
    )
