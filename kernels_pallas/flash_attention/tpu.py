"""Mosaic TPU programs of the flash-attention kernels.

Kernel layout: ``q, do, o [B, Hkv, G * Tq, D]`` (the ``G`` query heads of a key/value head stacked
along rows: grouped-query attention without copying k/v), ``k, v [B, Hkv, Tk, D]``, per-head
parameters ``[Hkv, G]`` in SMEM. Grids:

- forward and dQ: ``(B, Hkv, G, query blocks, key steps)``, the last axis ``"arbitrary"`` (the
  running max / sum / accumulator live in VMEM scratch across it). Key step ``j`` of query block
  ``i`` loads key block ``lo(i) + j``, clamped to ``hi(i) - 1`` (a repeated block index: no new
  DMA) and skipped past ``hi(i)``: a sliding window's grid axis has ``kv_steps = O(window)``
  steps, so the cost is ``O(T window)``.
- dK/dV: ``(B, Hkv, key blocks, G, query steps)``, the last two ``"arbitrary"``: one program
  accumulates over the whole group, so ``dk, dv`` come out per key/value head.

The residual rows (log-sum-exp or ``Z``, and ``D``) enter the backward as ``[B, Hkv, 8, G * Tq]``
(8 sublanes, lane-dense rows of ``block_q``), the forward writes them lane-replicated
``[B, Hkv, G * Tq, 128]`` (the layout of jax's splash attention). Block maths: :mod:`.common`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.flash_attention import common as cm
from kernels_pallas.flash_attention.common import F32, LANES, SUBLANES, Plan


def _params_spec() -> pl.BlockSpec:
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _cp(*semantics: str) -> Any:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _kv_block(plan: Plan, i: Any, j: Any) -> tuple[Any, Any]:
    lo, hi = cm.kv_range(plan, i)
    return jnp.minimum(lo + j, hi - 1), lo + j < hi


def _q_block(plan: Plan, j: Any, s: Any) -> tuple[Any, Any]:
    lo, hi = cm.q_range(plan, j)
    return jnp.minimum(lo + s, hi - 1), lo + s < hi


def _fwd_kernel(sink_ref, slope_ref, q_ref, k_ref, v_ref, o_ref, *rest, plan: Plan):
    r_ref = rest[0] if plan.has_residual else None
    m_scr, l_scr, acc_scr = rest[-3:]
    hk, g, i, j = (pl.program_id(a) for a in range(1, 5))
    kb, run = _kv_block(plan, i, j)
    bq = plan.bq

    @pl.when(j == 0)
    def _init():
        m, den = cm.init_carry(plan, bq, sink_ref[hk, g] if plan.has_sink else None)
        m_scr[...] = jnp.broadcast_to(m, (bq, LANES))
        l_scr[...] = jnp.broadcast_to(den, (bq, LANES))
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(run)
    def _step():
        m, den, acc = cm.fwd_block(
            q_ref[...], k_ref[...], v_ref[...], cm.positions(i * bq, bq, 0), cm.positions(kb * plan.bk, plan.bk, 1),
            hk * plan.groups + g, slope_ref[hk, g] if plan.has_alibi else None,
            m_scr[:, :1], l_scr[:, :1], acc_scr[...], plan,
        )
        m_scr[...] = jnp.broadcast_to(m, (bq, LANES))
        l_scr[...] = jnp.broadcast_to(den, (bq, LANES))
        acc_scr[...] = acc

    @pl.when(j == plan.kv_steps - 1)
    def _final():
        o, r = cm.finish(m_scr[:, :1], l_scr[:, :1], acc_scr[...], plan)
        o_ref[...] = o.astype(o_ref.dtype)
        if r_ref is not None:
            r_ref[...] = jnp.broadcast_to(r, (bq, LANES))


def forward(q, k, v, sink, slope, plan: Plan):
    """``(o [B, Hkv, G*Tq, Ep], r [B, Hkv, G*Tq] f32 or None)`` from kernel-layout inputs."""
    b, hkv = q.shape[:2]
    bq, bk, nq, dp, ep = plan.bq, plan.bk, plan.nq, plan.dp, plan.ep
    rows = lambda b_, h, g, i, j: (b_, h, g * nq + i, 0)  # noqa: E731

    def kv(b_, h, g, i, j):
        return (b_, h, _kv_block(plan, i, j)[0], 0)

    out_shape = [jax.ShapeDtypeStruct((b, hkv, plan.groups * plan.tqp, ep), q.dtype)]
    out_specs = [pl.BlockSpec((None, None, bq, ep), rows)]
    if plan.has_residual:
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, plan.groups * plan.tqp, LANES), F32))
        out_specs.append(pl.BlockSpec((None, None, bq, LANES), rows))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=out_shape,
        grid=(b, hkv, plan.groups, nq, plan.kv_steps),
        in_specs=[
            _params_spec(), _params_spec(),
            pl.BlockSpec((None, None, bq, dp), rows),
            pl.BlockSpec((None, None, bk, dp), kv),
            pl.BlockSpec((None, None, bk, ep), kv),
        ],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, LANES), F32), pltpu.VMEM((bq, LANES), F32), pltpu.VMEM((bq, ep), F32)],
        compiler_params=_cp("parallel", "parallel", "parallel", "parallel", "arbitrary"),
        interpret=plan.interpret, name=f"flash_attention_{plan.variant}_fwd",
    )(sink, slope, q, k, v)
    return outs[0], (outs[1][..., 0] if plan.has_residual else None)


def _dq_kernel(sink_ref, slope_ref, q_ref, k_ref, v_ref, do_ref, r_ref, dd_ref, dq_ref, dq_scr, *, plan: Plan):
    hk, g, i, j = (pl.program_id(a) for a in range(1, 5))
    kb, run = _kv_block(plan, i, j)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    @pl.when(run)
    def _step():
        k = k_ref[...]
        _, ds = cm.bwd_block(
            q_ref[...], k, v_ref[...], do_ref[...], r_ref[:1, :], dd_ref[:1, :],
            cm.positions(i * plan.bq, plan.bq, 1), cm.positions(kb * plan.bk, plan.bk, 0),
            hk * plan.groups + g, slope_ref[hk, g] if plan.has_alibi else None, plan,
        )
        dq_scr[...] += cm.dot(ds.astype(k.dtype), k, 0, 0, plan)

    @pl.when(j == plan.kv_steps - 1)
    def _final():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(
    sink_ref, slope_ref, q_ref, k_ref, v_ref, do_ref, r_ref, dd_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, plan: Plan,
):
    hk, j, g, s = (pl.program_id(a) for a in range(1, 5))
    qb, run = _q_block(plan, j, s)

    @pl.when((g == 0) & (s == 0))
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when(run)
    def _step():
        q, do = q_ref[...], do_ref[...]
        p, ds = cm.bwd_block(
            q, k_ref[...], v_ref[...], do, r_ref[:1, :], dd_ref[:1, :],
            cm.positions(qb * plan.bq, plan.bq, 1), cm.positions(j * plan.bk, plan.bk, 0),
            hk * plan.groups + g, slope_ref[hk, g] if plan.has_alibi else None, plan,
        )
        dk_scr[...] += cm.dot(ds.astype(q.dtype), q, 1, 0, plan)
        dv_scr[...] += cm.dot(p.astype(do.dtype), do, 1, 0, plan)

    @pl.when((g == plan.groups - 1) & (s == plan.q_steps - 1))
    def _final():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, sink, slope, do, r, dd, plan: Plan):
    """``(dq, dk, dv)`` in kernel layout; ``r``/``dd`` ``[B, Hkv, G*Tq]`` float32."""
    b, hkv = q.shape[:2]
    bq, bk, nq, dp, ep = plan.bq, plan.bk, plan.nq, plan.dp, plan.ep
    cdt = q.dtype
    rows8 = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, hkv, SUBLANES, x.shape[-1]))  # noqa: E731
    r8, dd8 = rows8(r), rows8(dd)

    rows = lambda b_, h, g, i, j: (b_, h, g * nq + i, 0)  # noqa: E731
    res = lambda b_, h, g, i, j: (b_, h, 0, g * nq + i)  # noqa: E731

    def kv(b_, h, g, i, j):
        return (b_, h, _kv_block(plan, i, j)[0], 0)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(q.shape, cdt),
        grid=(b, hkv, plan.groups, nq, plan.kv_steps),
        in_specs=[
            _params_spec(), _params_spec(),
            pl.BlockSpec((None, None, bq, dp), rows),
            pl.BlockSpec((None, None, bk, dp), kv),
            pl.BlockSpec((None, None, bk, ep), kv),
            pl.BlockSpec((None, None, bq, ep), rows),
            pl.BlockSpec((None, None, SUBLANES, bq), res),
            pl.BlockSpec((None, None, SUBLANES, bq), res),
        ],
        out_specs=pl.BlockSpec((None, None, bq, dp), rows),
        scratch_shapes=[pltpu.VMEM((bq, dp), F32)],
        compiler_params=_cp("parallel", "parallel", "parallel", "parallel", "arbitrary"),
        interpret=plan.interpret, name=f"flash_attention_{plan.variant}_bwd_dq",
    )(sink, slope, q, k, v, do, r8, dd8)

    def qrows(b_, h, j, g, s):
        return (b_, h, g * nq + _q_block(plan, j, s)[0], 0)

    def qres(b_, h, j, g, s):
        return (b_, h, 0, g * nq + _q_block(plan, j, s)[0])

    krows = lambda b_, h, j, g, s: (b_, h, j, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct(k.shape, cdt), jax.ShapeDtypeStruct(v.shape, cdt)),
        grid=(b, hkv, plan.nk, plan.groups, plan.q_steps),
        in_specs=[
            _params_spec(), _params_spec(),
            pl.BlockSpec((None, None, bq, dp), qrows),
            pl.BlockSpec((None, None, bk, dp), krows),
            pl.BlockSpec((None, None, bk, ep), krows),
            pl.BlockSpec((None, None, bq, ep), qrows),
            pl.BlockSpec((None, None, SUBLANES, bq), qres),
            pl.BlockSpec((None, None, SUBLANES, bq), qres),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, dp), krows), pl.BlockSpec((None, None, bk, ep), krows)],
        scratch_shapes=[pltpu.VMEM((bk, dp), F32), pltpu.VMEM((bk, ep), F32)],
        compiler_params=_cp("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=plan.interpret, name=f"flash_attention_{plan.variant}_bwd_dkv",
    )(sink, slope, q, k, v, do, r8, dd8)
    return dq, dk, dv
