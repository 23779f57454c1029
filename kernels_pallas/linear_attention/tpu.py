"""Mosaic TPU programs of the linear-attention kernels.

Grid ``(batch, heads, [value tiles,] blocks)`` with the block axis last and ``"arbitrary"``
(sequential), everything else ``"parallel"``; the carried state lives in a VMEM scratch across
grid steps; the decay rates sit in SMEM. Feature/value dims are padded to multiples of 128 and
blocks to multiples of 8 (16 for 16-bit inputs), so every block's last two dims are (8k, 128m).
The block maths is :mod:`.common`'s.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_attention import common as cm
from kernels_pallas.linear_attention.common import F32, Plan


def rate_spec() -> pl.BlockSpec:
    """Decay rates ``[H]``: the whole array in SMEM."""
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def read_rate(rate_ref: Any) -> jax.Array:
    return rate_ref[pl.program_id(1)]


def compiler_params(semantics: tuple[str, ...]) -> Any:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _fwd_kernel(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, s_scr, *, plan: Plan):
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
        s_scr[...] = s0_ref[...]

    rate = read_rate(rate_ref) if plan.has_decay else None
    o, s = cm.fwd_block(q_ref[...], k_ref[...], v_ref[...], s_scr[...], rate, cm.valid(plan, n), plan)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s

    @pl.when(n == plan.nb - 1)
    def _final():
        st_ref[...] = s


def _dq_kernel(rate_ref, k_ref, v_ref, do_ref, dqi_ref, s0_ref, dq_ref, s_scr, *, plan: Plan):
    n = pl.program_id(2)
    rows = slice(None)

    @pl.when(n == 0)
    def _init():
        s_scr[...] = s0_ref[...]

    rate = read_rate(rate_ref) if plan.has_decay else None
    dq, ss = cm.dq_block(
        k_ref[...], cm.tiles(v_ref, rows, plan), cm.tiles(do_ref, rows, plan), dqi_ref[...],
        cm.tiles(s_scr, rows, plan), rate, plan,
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    cm.store_tiles(s_scr, rows, ss, plan)


def _dkv_kernel(
    rate_ref, q_ref, k_ref, v_ref, do_ref, dki_ref, dvi_ref, dst_ref, dk_ref, dv_ref, ds0_ref, g_scr,
    *, plan: Plan,
):
    i = pl.program_id(2)
    n = plan.nb - 1 - i
    rows = slice(None)

    @pl.when(i == 0)
    def _init():
        g_scr[...] = dst_ref[...]

    rate = read_rate(rate_ref) if plan.has_decay else None
    dk, dvs, gs = cm.dkv_block(
        q_ref[...], k_ref[...], cm.tiles(v_ref, rows, plan), cm.tiles(do_ref, rows, plan), dki_ref[...],
        cm.tiles(dvi_ref, rows, plan), cm.tiles(g_scr, rows, plan), rate, cm.valid(plan, n), plan,
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    cm.store_tiles(dv_ref, rows, dvs, plan)
    cm.store_tiles(g_scr, rows, gs, plan)

    @pl.when(i == plan.nb - 1)
    def _final():
        ds0_ref[...] = g_scr[...]


def forward(q, k, v, rate, s0, plan: Plan):
    """``(o [B, H, Tp, Ep], S_T [B, H, Fp, Ep] f32)`` from kernel-layout inputs."""
    b, h = q.shape[:2]
    bt, fp, ep, be, nb = plan.bt, plan.fp, plan.ep, plan.be, plan.nb
    spec = functools.partial(cm.spec, plan)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=(jax.ShapeDtypeStruct((b, h, plan.tp, ep), q.dtype), jax.ShapeDtypeStruct((b, h, fp, ep), F32)),
        grid=(b, h, plan.ne, nb),
        in_specs=[
            rate_spec(),
            spec(bt, fp, lambda e, n: n),
            spec(bt, fp, lambda e, n: n),
            spec(bt, be, lambda e, n: n, lambda e, n: e),
            spec(fp, be, 0, lambda e, n: e),
        ],
        out_specs=[spec(bt, be, lambda e, n: n, lambda e, n: e), spec(fp, be, 0, lambda e, n: e)],
        scratch_shapes=[pltpu.VMEM((fp, be), F32)],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=plan.interpret, cost_estimate=cm.cost(plan, b, h, q.dtype.itemsize, 1.0),
        name="causal_linear_attention_fwd",
    )(rate, q, k, v, s0)


def backward(q, k, v, rate, s0, do, dst, plan: Plan):
    """``(dq, dk, dv, d initial_state)`` in kernel layout: the intra-block terms, a forward sweep
    for ``dQ`` and a reverse sweep carrying ``G`` for ``dK``, ``dV`` and ``d S_0``."""
    b, h = q.shape[:2]
    bt, fp, ep, nb, tp = plan.bt, plan.fp, plan.ep, plan.nb, plan.tp
    cdt = q.dtype
    spec = functools.partial(cm.spec, plan)
    seq = ("parallel", "parallel", "arbitrary")
    dq_i, dk_i, dv_i = cm.bwd_intra(
        q, k, v, do, rate, plan, rate_spec=rate_spec(), read_rate=read_rate,
        compiler_params=compiler_params(("parallel", "parallel", "parallel")),
    )

    blk = lambda n: n
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct((b, h, tp, fp), cdt),
        grid=(b, h, nb),
        in_specs=[
            rate_spec(), spec(bt, fp, blk), spec(bt, ep, blk), spec(bt, ep, blk), spec(bt, fp, blk),
            spec(fp, ep, 0),
        ],
        out_specs=spec(bt, fp, blk),
        scratch_shapes=[pltpu.VMEM((fp, ep), F32)],
        compiler_params=compiler_params(seq),
        interpret=plan.interpret, cost_estimate=cm.cost(plan, b, h, cdt.itemsize, 0.5),
        name="causal_linear_attention_bwd_dq",
    )(rate, k, v, do, dq_i, s0)

    rev = lambda i: nb - 1 - i
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        out_shape=cm.dkv_out_shape(plan, b, h, cdt),
        grid=(b, h, nb),
        in_specs=[
            rate_spec(), spec(bt, fp, rev), spec(bt, fp, rev), spec(bt, ep, rev), spec(bt, ep, rev),
            spec(bt, fp, rev), spec(bt, ep, rev), spec(fp, ep, 0),
        ],
        out_specs=[spec(bt, fp, rev), spec(bt, ep, rev), spec(fp, ep, 0)],
        scratch_shapes=[pltpu.VMEM((fp, ep), F32)],
        compiler_params=compiler_params(seq),
        interpret=plan.interpret, cost_estimate=cm.cost(plan, b, h, cdt.itemsize, 1.0),
        name="causal_linear_attention_bwd_dkv",
    )(rate, q, k, v, do, dk_i, dv_i, dst)
    return dq, dk, dv, ds0
