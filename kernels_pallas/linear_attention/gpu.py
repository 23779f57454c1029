"""Pallas Triton programs of the linear-attention kernels (Ampere and Hopper, ROCm).

Why Triton and not Mosaic GPU (the jax 0.9+ default): Mosaic GPU targets sm90+ only (no
A100/L4/consumer cards, no ROCm), and in jax 0.10 ``pl.pallas_call`` lowering to Mosaic GPU is
itself deprecated in favour of ``plgpu.kernel`` with explicit warpgroup/TMA/barrier programming, a
separate Hopper-specific kernel. The Triton backend (chosen by passing
``pltriton.CompilerParams``: the params type picks the backend) runs the grid/BlockSpec program on
sm80+ and ROCm; it is deprecated in jax 0.11 but present in the range this project pins
(``jax<0.12``). Triton grid programs may run concurrently, so the block axis is a ``fori_loop``
inside each program (carry in registers), grid ``(batch, heads, value tiles)``; every loaded tile
has power-of-two sizes (features padded to a power of two >= 16, values split into power-of-two
tiles of ``block_e`` columns), as Triton requires. The block maths is :mod:`.common`'s.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_attention import common as cm
from kernels_pallas.linear_attention.common import F32, Plan


def rate_spec() -> pl.BlockSpec:
    """Decay rates ``[H]``: the program's head's scalar."""
    return pl.BlockSpec((None,), lambda b, h, *_: (h,))


def read_rate(rate_ref: Any) -> jax.Array:
    return rate_ref[()]


def compiler_params(plan: Plan) -> Any:
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


def _rows(plan: Plan, n: Any) -> Any:
    return pl.ds(pl.multiple_of(n * plan.bt, plan.bt), plan.bt)


def _fwd_kernel(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, *, plan: Plan):
    rate = read_rate(rate_ref) if plan.has_decay else None

    def body(n, s):
        rows = _rows(plan, n)
        o, s = cm.fwd_block(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], s, rate, cm.valid(plan, n), plan)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s

    st_ref[...] = lax.fori_loop(0, plan.nb, body, s0_ref[...].astype(F32))


def _dq_kernel(rate_ref, k_ref, v_ref, do_ref, dqi_ref, s0_ref, dq_ref, *, plan: Plan):
    rate = read_rate(rate_ref) if plan.has_decay else None

    def body(n, ss):
        rows = _rows(plan, n)
        dq, ss = cm.dq_block(
            k_ref[rows, :], cm.tiles(v_ref, rows, plan), cm.tiles(do_ref, rows, plan), dqi_ref[rows, :],
            list(ss), rate, plan,
        )
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return tuple(ss)

    lax.fori_loop(0, plan.nb, body, tuple(t.astype(F32) for t in cm.tiles(s0_ref, slice(None), plan)))


def _dkv_kernel(
    rate_ref, q_ref, k_ref, v_ref, do_ref, dki_ref, dvi_ref, dst_ref, dk_ref, dv_ref, ds0_ref,
    *, plan: Plan,
):
    rate = read_rate(rate_ref) if plan.has_decay else None

    def body(i, gs):
        n = plan.nb - 1 - i
        rows = _rows(plan, n)
        dk, dvs, gs = cm.dkv_block(
            q_ref[rows, :], k_ref[rows, :], cm.tiles(v_ref, rows, plan), cm.tiles(do_ref, rows, plan),
            dki_ref[rows, :], cm.tiles(dvi_ref, rows, plan), list(gs), rate, cm.valid(plan, n), plan,
        )
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        cm.store_tiles(dv_ref, rows, dvs, plan)
        return tuple(gs)

    g0 = tuple(t.astype(F32) for t in cm.tiles(dst_ref, slice(None), plan))
    gs = lax.fori_loop(0, plan.nb, body, g0)
    cm.store_tiles(ds0_ref, slice(None), list(gs), plan)


def forward(q, k, v, rate, s0, plan: Plan):
    """``(o [B, H, Tp, Ep], S_T [B, H, Fp, Ep] f32)`` from kernel-layout inputs."""
    b, h = q.shape[:2]
    fp, ep, be, tp = plan.fp, plan.ep, plan.be, plan.tp
    spec = functools.partial(cm.spec, plan)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct((b, h, tp, ep), q.dtype), jax.ShapeDtypeStruct((b, h, fp, ep), F32)),
        grid=(b, h, plan.ne),
        in_specs=[
            rate_spec(),
            spec(tp, fp, 0),
            spec(tp, fp, 0),
            spec(tp, be, 0, lambda e: e),
            spec(fp, be, 0, lambda e: e),
        ],
        out_specs=[spec(tp, be, 0, lambda e: e), spec(fp, be, 0, lambda e: e)],
        compiler_params=compiler_params(plan),
        interpret=plan.interpret, cost_estimate=cm.cost(plan, b, h, q.dtype.itemsize, 1.0),
        name="causal_linear_attention_fwd",
    )(rate, q, k, v, s0)


def backward(q, k, v, rate, s0, do, dst, plan: Plan):
    """``(dq, dk, dv, d initial_state)`` in kernel layout (see :func:`.tpu.backward`)."""
    b, h = q.shape[:2]
    fp, ep, tp = plan.fp, plan.ep, plan.tp
    cdt = q.dtype
    spec = functools.partial(cm.spec, plan)
    dq_i, dk_i, dv_i = cm.bwd_intra(
        q, k, v, do, rate, plan, rate_spec=rate_spec(), read_rate=read_rate, compiler_params=compiler_params(plan),
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct((b, h, tp, fp), cdt),
        grid=(b, h),
        in_specs=[
            rate_spec(), spec(tp, fp, 0), spec(tp, ep, 0), spec(tp, ep, 0), spec(tp, fp, 0), spec(fp, ep, 0),
        ],
        out_specs=spec(tp, fp, 0),
        compiler_params=compiler_params(plan),
        interpret=plan.interpret, cost_estimate=cm.cost(plan, b, h, cdt.itemsize, 0.5),
        name="causal_linear_attention_bwd_dq",
    )(rate, k, v, do, dq_i, s0)
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        out_shape=cm.dkv_out_shape(plan, b, h, cdt),
        grid=(b, h),
        in_specs=[
            rate_spec(), spec(tp, fp, 0), spec(tp, fp, 0), spec(tp, ep, 0), spec(tp, ep, 0),
            spec(tp, fp, 0), spec(tp, ep, 0), spec(fp, ep, 0),
        ],
        out_specs=[spec(tp, fp, 0), spec(tp, ep, 0), spec(fp, ep, 0)],
        compiler_params=compiler_params(plan),
        interpret=plan.interpret, cost_estimate=cm.cost(plan, b, h, cdt.itemsize, 1.0),
        name="causal_linear_attention_bwd_dkv",
    )(rate, q, k, v, do, dk_i, dv_i, dst)
    return dq, dk, dv, ds0
