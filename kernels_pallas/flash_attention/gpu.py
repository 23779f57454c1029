"""Pallas Triton programs of the flash-attention kernels (Ampere and Hopper, ROCm).

Triton rather than Mosaic GPU for the reasons in :mod:`kernels_pallas.linear_attention.gpu`
(sm80+ and ROCm; the grid/BlockSpec program). Triton grid programs may run concurrently, so the
reductions are loops inside a program (carry in registers):

- forward and dQ: grid ``(B, Hkv, G, query blocks)``, a ``fori_loop`` over the visible key
  blocks ``[lo(i), hi(i))`` (a sliding window visits ``O(window)`` blocks);
- dK/dV: grid ``(B, Hkv, key blocks)``, loops over the group's ``G`` heads and the query blocks
  ``[lo(j), hi(j))`` that see the key block, so ``dk, dv`` come out per key/value head.

Layout as :mod:`.tpu` (``q [B, Hkv, G * Tq, D]``); residual rows ``[B, Hkv, G * Tq]``; per-head
parameters ``[Hkv, Gp]`` (``Gp`` a power of two). Every loaded tile has power-of-two sizes (head
dims padded to a power of two >= 16). Block maths: :mod:`.common`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.flash_attention import common as cm
from kernels_pallas.flash_attention.common import F32, Plan


def _cp(plan: Plan) -> Any:
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


def _params_spec(plan: Plan) -> pl.BlockSpec:
    return pl.BlockSpec((None, plan.gp), lambda b, h, *_: (h, 0))


def _ds(start: Any, n: int) -> Any:
    return pl.ds(pl.multiple_of(start * n, n), n)


def _fwd_kernel(sink_ref, slope_ref, q_ref, k_ref, v_ref, o_ref, *rest, plan: Plan):
    hk, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bq, bk = plan.bq, plan.bk
    q = q_ref[...]
    qpos = cm.positions(i * bq, bq, 0)
    slope = slope_ref[g] if plan.has_alibi else None
    head = hk * plan.groups + g

    def body(kb, carry):
        rows = _ds(kb, bk)
        return cm.fwd_block(
            q, k_ref[rows, :], v_ref[rows, :], qpos, cm.positions(kb * bk, bk, 1), head, slope, *carry, plan,
        )

    m, den = cm.init_carry(plan, bq, sink_ref[g] if plan.has_sink else None)
    lo, hi = cm.kv_range(plan, i)
    m, den, acc = lax.fori_loop(lo, hi, body, (m, den, jnp.zeros((bq, plan.ep), F32)))
    o, r = cm.finish(m, den, acc, plan)
    o_ref[...] = o.astype(o_ref.dtype)
    if plan.has_residual:
        rest[0][...] = r[:, 0]


def forward(q, k, v, sink, slope, plan: Plan):
    """``(o [B, Hkv, G*Tq, Ep], r [B, Hkv, G*Tq] f32 or None)`` from kernel-layout inputs."""
    b, hkv = q.shape[:2]
    bq, nq, dp, ep, tkp = plan.bq, plan.nq, plan.dp, plan.ep, plan.tkp
    rows = lambda b_, h, g, i: (b_, h, g * nq + i, 0)  # noqa: E731
    whole = lambda b_, h, g, i: (b_, h, 0, 0)  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((b, hkv, plan.groups * plan.tqp, ep), q.dtype)]
    out_specs = [pl.BlockSpec((None, None, bq, ep), rows)]
    if plan.has_residual:
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, plan.groups * plan.tqp), F32))
        out_specs.append(pl.BlockSpec((None, None, bq), lambda b_, h, g, i: (b_, h, g * nq + i)))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=out_shape,
        grid=(b, hkv, plan.groups, nq),
        in_specs=[
            _params_spec(plan), _params_spec(plan),
            pl.BlockSpec((None, None, bq, dp), rows),
            pl.BlockSpec((None, None, tkp, dp), whole),
            pl.BlockSpec((None, None, tkp, ep), whole),
        ],
        out_specs=out_specs,
        compiler_params=_cp(plan),
        interpret=plan.interpret, name=f"flash_attention_{plan.variant}_fwd",
    )(sink, slope, q, k, v)
    return outs[0], (outs[1] if plan.has_residual else None)


def _dq_kernel(sink_ref, slope_ref, q_ref, k_ref, v_ref, do_ref, r_ref, dd_ref, dq_ref, *, plan: Plan):
    hk, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bq, bk = plan.bq, plan.bk
    q, do = q_ref[...], do_ref[...]
    r, dd = r_ref[...][None, :], dd_ref[...][None, :]
    qpos = cm.positions(i * bq, bq, 1)
    slope = slope_ref[g] if plan.has_alibi else None
    head = hk * plan.groups + g

    def body(kb, dq):
        rows = _ds(kb, bk)
        k = k_ref[rows, :]
        _, ds = cm.bwd_block(q, k, v_ref[rows, :], do, r, dd, qpos, cm.positions(kb * bk, bk, 0), head, slope, plan)
        return dq + cm.dot(ds.astype(k.dtype), k, 0, 0, plan)

    lo, hi = cm.kv_range(plan, i)
    dq_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros((bq, plan.dp), F32)).astype(dq_ref.dtype)


def _dkv_kernel(sink_ref, slope_ref, q_ref, k_ref, v_ref, do_ref, r_ref, dd_ref, dk_ref, dv_ref, *, plan: Plan):
    hk, j = pl.program_id(1), pl.program_id(2)
    bq, bk, nq = plan.bq, plan.bk, plan.nq
    k, v = k_ref[...], v_ref[...]
    kpos = cm.positions(j * bk, bk, 0)
    lo, hi = cm.q_range(plan, j)
    dk = jnp.zeros((bk, plan.dp), F32)
    dv = jnp.zeros((bk, plan.ep), F32)
    for g in range(plan.groups):
        slope = slope_ref[g] if plan.has_alibi else None

        def body(qb, carry, g=g, slope=slope):
            dk, dv = carry
            rows = _ds(g * nq + qb, bq)
            q, do = q_ref[rows, :], do_ref[rows, :]
            p, ds = cm.bwd_block(
                q, k, v, do, r_ref[rows][None, :], dd_ref[rows][None, :], cm.positions(qb * bq, bq, 1), kpos,
                hk * plan.groups + g, slope, plan,
            )
            return dk + cm.dot(ds.astype(q.dtype), q, 1, 0, plan), dv + cm.dot(p.astype(do.dtype), do, 1, 0, plan)

        dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, sink, slope, do, r, dd, plan: Plan):
    """``(dq, dk, dv)`` in kernel layout (see :func:`.tpu.backward`)."""
    b, hkv = q.shape[:2]
    bq, bk, nq, dp, ep, tkp = plan.bq, plan.bk, plan.nq, plan.dp, plan.ep, plan.tkp
    gtq = plan.groups * plan.tqp
    cdt = q.dtype
    rows = lambda b_, h, g, i: (b_, h, g * nq + i, 0)  # noqa: E731
    res = lambda b_, h, g, i: (b_, h, g * nq + i)  # noqa: E731
    whole = lambda b_, h, *_: (b_, h, 0, 0)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(q.shape, cdt),
        grid=(b, hkv, plan.groups, nq),
        in_specs=[
            _params_spec(plan), _params_spec(plan),
            pl.BlockSpec((None, None, bq, dp), rows),
            pl.BlockSpec((None, None, tkp, dp), whole),
            pl.BlockSpec((None, None, tkp, ep), whole),
            pl.BlockSpec((None, None, bq, ep), rows),
            pl.BlockSpec((None, None, bq), res),
            pl.BlockSpec((None, None, bq), res),
        ],
        out_specs=pl.BlockSpec((None, None, bq, dp), rows),
        compiler_params=_cp(plan),
        interpret=plan.interpret, name=f"flash_attention_{plan.variant}_bwd_dq",
    )(sink, slope, q, k, v, do, r, dd)

    krows = lambda b_, h, j: (b_, h, j, 0)  # noqa: E731
    wrow = lambda b_, h, j: (b_, h, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct(k.shape, cdt), jax.ShapeDtypeStruct(v.shape, cdt)),
        grid=(b, hkv, plan.nk),
        in_specs=[
            _params_spec(plan), _params_spec(plan),
            pl.BlockSpec((None, None, gtq, dp), whole),
            pl.BlockSpec((None, None, bk, dp), krows),
            pl.BlockSpec((None, None, bk, ep), krows),
            pl.BlockSpec((None, None, gtq, ep), whole),
            pl.BlockSpec((None, None, gtq), wrow),
            pl.BlockSpec((None, None, gtq), wrow),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, dp), krows), pl.BlockSpec((None, None, bk, ep), krows)],
        compiler_params=_cp(plan),
        interpret=plan.interpret, name=f"flash_attention_{plan.variant}_bwd_dkv",
    )(sink, slope, q, k, v, do, r, dd)
    return dq, dk, dv
