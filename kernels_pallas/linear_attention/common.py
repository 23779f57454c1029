"""Shared part of the linear-attention kernels: block sizes, the static plan of one call, and the
block maths (pure functions of loaded tiles) that the TPU grid programs (:mod:`.tpu`) and the GPU
loop programs (:mod:`.gpu`) both run.

Notation (per batch element and head; ``lambda = exp(-rate)``, blocks of ``C`` tokens, local
indices ``r, s``, ``L`` real tokens in the block, ``S_n`` the state before block ``n``)::

    O_n     = [(Q_n K_n^T) * D] V_n + diag(lambda^(r+1)) Q_n S_n        D_rs = lambda^(r-s) [r >= s]
    S_{n+1} = lambda^L S_n + (diag(lambda^(L-1-s)) K_n)^T V_n

(Qin et al. 2024, "Lightning Attention-2", Alg. 1/2; derivation and backward in the package
docstring.) A rate of ``+inf`` (``lambda = 0``, a hard reset every token) is clamped to
:data:`MAX_RATE` by the entry point: ``exp(-MAX_RATE * n)`` is exactly 0 in float32 for ``n >= 1``
and exactly 1 for ``n = 0``, so every power above is exact and ``0 * inf`` never appears.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array
F32 = jnp.float32
BACKENDS = ("tpu", "gpu")
# exp(-1e4) underflows to exactly 0 in float32 (smallest subnormal ~ exp(-103.3)).
MAX_RATE = 1e4


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels.

    block_t: tokens per block (the chunk ``C``); rounded up to a power of two >= 16 on GPU and to a
      multiple of 8 (16 for 16-bit inputs) on TPU, and capped by the (rounded) sequence length.
    block_e: value columns per forward program (the ``E`` tile; the backward loops over the same
      tiles inside a program). ``None``: all columns (TPU default). GPU: a power of two >= 16.
    num_warps / num_stages: Triton launch parameters (GPU only).
    """

    block_t: int = 64
    block_e: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def get_default(cls, backend: str) -> BlockSizes:
        """Defaults per backend: TPU ``C=128`` (MXU width), all value columns in one tile; GPU
        ``C=64`` and 64-column value tiles (the fp32 state tile ``F x 64`` stays in registers)."""
        if backend == "tpu":
            return cls(block_t=128, block_e=None)
        if backend == "gpu":
            return cls(block_t=64, block_e=64, num_warps=4, num_stages=2)
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one call (hashable: the custom_vjp's non-differentiable argument)."""

    backend: str
    interpret: Any
    t: int  # real length
    bt: int  # block length C
    nb: int  # number of blocks
    fp: int  # padded feature dim
    ep: int  # padded value dim
    be: int  # value tile
    has_decay: bool
    precision: Any
    num_warps: int | None
    num_stages: int | None

    @property
    def tp(self) -> int:
        return self.nb * self.bt

    @property
    def ne(self) -> int:
        return self.ep // self.be

    @property
    def ragged(self) -> bool:
        return self.t != self.tp


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def make_plan(
    t: int, f: int, e: int, dtype: Any, *, backend: str, interpret: Any, chunk_size: int | None,
    block_sizes: BlockSizes | None, has_decay: bool, precision: Any,
) -> Plan:
    """The padded tile sizes for a ``[T, F] x [T, E]`` problem on ``backend`` (Triton tiles are
    powers of two; Mosaic blocks are ``(8k, 128m)``, ``16k`` rows for 16-bit inputs)."""
    bs = block_sizes or BlockSizes.get_default(backend)
    bt = int(chunk_size or bs.block_t)
    if backend == "gpu":
        bt = min(next_pow2(max(bt, 16)), next_pow2(max(t, 16)))
        fp = next_pow2(max(f, 16))
        be = next_pow2(max(bs.block_e or 64, 16))
        if e <= be:
            be = next_pow2(max(e, 16))
        ep = round_up(e, be)
    else:
        align = 8 if jnp.dtype(dtype).itemsize >= 4 else 16
        bt = min(round_up(bt, align), round_up(t, align))
        fp = round_up(f, 128)
        ep = round_up(e, 128)
        be = ep if bs.block_e is None else min(round_up(bs.block_e, 128), ep)
        ep = round_up(e, be)
    if precision is None:
        precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return Plan(
        backend=backend, interpret=interpret, t=t, bt=bt, nb=-(-t // bt), fp=fp, ep=ep, be=be,
        has_decay=has_decay, precision=precision, num_warps=bs.num_warps, num_stages=bs.num_stages,
    )


# ----------------------------------------------------------------------------- block maths


def dot(a: Array, b: Array, ca: int, cb: int, plan: Plan) -> Array:
    """2-D matmul contracting ``a`` dim ``ca`` with ``b`` dim ``cb``, float32 accumulation."""
    return lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), precision=plan.precision, preferred_element_type=F32
    )


def intra_decay(rate: Array, c: int, plan: Plan) -> Array:
    """``D_rs = lambda^(r-s)`` for ``r >= s`` else 0, ``[C, C]`` float32."""
    r = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    s = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    mask = r >= s
    if not plan.has_decay:
        return jnp.where(mask, 1.0, 0.0).astype(F32)
    diff = jnp.where(mask, r - s, 0).astype(F32)
    return jnp.where(mask, jnp.exp(-rate * diff), 0.0)


def query_factor(rate: Array, c: int, w: int) -> Array:
    """``lambda^(r+1)`` broadcast to ``[C, w]``."""
    r = lax.broadcasted_iota(jnp.int32, (c, w), 0).astype(F32)
    return jnp.exp(-rate * (r + 1.0))


def key_factor(rate: Array, c: int, w: int, valid: Any) -> Array:
    """``lambda^(L-1-s)`` for real tokens ``s < L`` else 0, broadcast to ``[C, w]``."""
    s = lax.broadcasted_iota(jnp.int32, (c, w), 0)
    ex = valid - 1 - s
    return jnp.where(ex >= 0, jnp.exp(-rate * jnp.maximum(ex, 0).astype(F32)), 0.0)


def block_decay(rate: Array, w: int, valid: Any) -> Array:
    """``lambda^L`` as a ``[1, w]`` row (vector math: no scalar transcendental on TPU)."""
    return jnp.exp(-rate * jnp.full((1, w), valid, jnp.int32).astype(F32))


def fwd_block(q, k, v, s, rate, valid, plan: Plan):
    """One block of the forward: returns ``(O_n [C, w] f32, S_{n+1} [F, w] f32)``."""
    c, w = q.shape[0], v.shape[1]
    cdt = q.dtype
    a = dot(q, k, 1, 1, plan) * intra_decay(rate, c, plan)
    o = dot(a.astype(cdt), v, 1, 0, plan)
    inter = dot(q, s.astype(cdt), 1, 0, plan)
    if plan.has_decay:
        inter = inter * query_factor(rate, c, w)
        vk = (v.astype(F32) * key_factor(rate, c, w, valid)).astype(cdt)
        s = s * block_decay(rate, w, valid) + dot(k, vk, 0, 0, plan)
    else:
        s = s + dot(k, v, 0, 0, plan)
    return o + inter, s


def bwd_intra_block(q, k, vs, dos, rate, plan: Plan):
    """Intra-block gradients: ``(dq [C, F], dk [C, F], [dv tile [C, be]])`` float32."""
    c = q.shape[0]
    cdt = q.dtype
    d = intra_decay(rate, c, plan)
    a = (dot(q, k, 1, 1, plan) * d).astype(cdt)
    dp = dot(dos[0], vs[0], 1, 1, plan)
    for do_j, v_j in zip(dos[1:], vs[1:]):
        dp = dp + dot(do_j, v_j, 1, 1, plan)
    dp = (dp * d).astype(cdt)
    dq = dot(dp, k, 1, 0, plan)
    dk = dot(dp, q, 0, 0, plan)
    dvs = [dot(a, do_j, 0, 0, plan) for do_j in dos]
    return dq, dk, dvs


def dq_block(k, vs, dos, dq_i, ss, rate, plan: Plan):
    """Inter-block ``dQ`` of one block and the state update (forward sweep)."""
    c, f = k.shape
    cdt = k.dtype
    acc = dot(dos[0], ss[0].astype(cdt), 1, 1, plan)
    for do_j, s_j in zip(dos[1:], ss[1:]):
        acc = acc + dot(do_j, s_j.astype(cdt), 1, 1, plan)
    if plan.has_decay:
        acc = acc * query_factor(rate, c, f)
        kf = key_factor(rate, c, plan.be, c)  # the state after the last block is never used
        bd = block_decay(rate, plan.be, c)
        ss = [s_j * bd + dot(k, (v_j.astype(F32) * kf).astype(cdt), 0, 0, plan) for s_j, v_j in zip(ss, vs)]
    else:
        ss = [s_j + dot(k, v_j, 0, 0, plan) for s_j, v_j in zip(ss, vs)]
    return dq_i + acc, ss


def dkv_block(q, k, vs, dos, dk_i, dv_is, gs, rate, valid, plan: Plan):
    """Inter-block ``dK``, ``dV`` of one block and the cotangent-state update (reverse sweep)."""
    c, f = k.shape
    cdt = k.dtype
    acc = dot(vs[0], gs[0].astype(cdt), 1, 1, plan)
    for v_j, g_j in zip(vs[1:], gs[1:]):
        acc = acc + dot(v_j, g_j.astype(cdt), 1, 1, plan)
    dvs = [dot(k, g_j.astype(cdt), 1, 0, plan) for g_j in gs]
    if plan.has_decay:
        acc = acc * key_factor(rate, c, f, valid)
        kf = key_factor(rate, c, plan.be, valid)
        dvs = [dv * kf for dv in dvs]
        qd = (q.astype(F32) * query_factor(rate, c, f)).astype(cdt)
        bd = block_decay(rate, plan.be, valid)
        gs = [g_j * bd + dot(qd, do_j, 0, 0, plan) for g_j, do_j in zip(gs, dos)]
    else:
        gs = [g_j + dot(q, do_j, 0, 0, plan) for g_j, do_j in zip(gs, dos)]
    dvs = [dv_i + dv for dv_i, dv in zip(dv_is, dvs)]
    return dk_i + acc, dvs, gs


def valid(plan: Plan, n: Any) -> Any:
    """Real tokens in block ``n`` (static ``C`` unless decay meets a ragged last block)."""
    if plan.has_decay and plan.ragged:
        return jnp.minimum(plan.bt, plan.t - n * plan.bt)
    return plan.bt


def tiles(ref: Any, rows: Any, plan: Plan) -> list[Array]:
    """The ``plan.ne`` value tiles ``[rows, be]`` of a ``[*, Ep]`` ref."""
    return [ref[rows, pl.ds(j * plan.be, plan.be)] for j in range(plan.ne)]


def store_tiles(ref: Any, rows: Any, xs: list[Array], plan: Plan) -> None:
    for j, x in enumerate(xs):
        ref[rows, pl.ds(j * plan.be, plan.be)] = x.astype(ref.dtype)


# ----------------------------------------------------------------------------- pallas_call pieces
# Kernel-level layout: q, k [B, H, Tp, Fp]; v, o [B, H, Tp, Ep]; states [B, H, Fp, Ep] float32.


def dkv_out_shape(plan: Plan, b: int, h: int, dtype: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Outputs of the reverse-sweep backward kernel (both backends): ``dk [B, H, T, F]`` and
    ``dv [B, H, T, E]`` in the compute dtype, ``d initial_state [B, H, F, E]`` in float32."""
    return (
        jax.ShapeDtypeStruct((b, h, plan.tp, plan.fp), dtype),
        jax.ShapeDtypeStruct((b, h, plan.tp, plan.ep), dtype),
        jax.ShapeDtypeStruct((b, h, plan.fp, plan.ep), F32),
    )


def spec(plan: Plan, rows: int, cols: int, row_block: Any, col_block: Any = 0) -> pl.BlockSpec:
    """Block ``[rows, cols]`` of a ``[B, H, R, C]`` array; ``row_block``/``col_block`` map the grid
    indices after ``(b, h)`` to block indices."""

    def index_map(b, h, *g):
        r = row_block(*g) if callable(row_block) else row_block
        c = col_block(*g) if callable(col_block) else col_block
        return (b, h, r, c)

    return pl.BlockSpec((None, None, rows, cols), index_map)


def cost(plan: Plan, b: int, h: int, itemsize: int, passes: float) -> pl.CostEstimate:
    t, f, e, c = plan.tp, plan.fp, plan.ep, plan.bt
    flops = int(passes * 2 * b * h * t * (c * f + c * e + 2 * f * e))
    trans = int(b * h * t * c) if plan.has_decay else 0
    nbytes = int(passes * b * h * (t * (2 * f + 2 * e) * itemsize + 2 * f * e * 4))
    return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _bwd_intra_kernel(rate_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, plan: Plan, read_rate):
    rate = read_rate(rate_ref) if plan.has_decay else None
    rows = slice(None)
    dq, dk, dvs = bwd_intra_block(
        q_ref[...], k_ref[...], tiles(v_ref, rows, plan), tiles(do_ref, rows, plan), rate, plan
    )
    dq_ref[...] = dq
    dk_ref[...] = dk
    store_tiles(dv_ref, rows, dvs, plan)


def bwd_intra(q, k, v, do, rate, plan: Plan, *, rate_spec: pl.BlockSpec, read_rate, compiler_params: Any):
    """The intra-block backward terms, every block in parallel (grid ``(B, H, blocks)``, the same
    program on both backends): ``(dq_i, dk_i, dv_i)`` float32."""
    b, h = q.shape[:2]
    bt, fp, ep, nb, tp = plan.bt, plan.fp, plan.ep, plan.nb, plan.tp
    blk = lambda n: n
    return pl.pallas_call(
        functools.partial(_bwd_intra_kernel, plan=plan, read_rate=read_rate),
        out_shape=(
            jax.ShapeDtypeStruct((b, h, tp, fp), F32),
            jax.ShapeDtypeStruct((b, h, tp, fp), F32),
            jax.ShapeDtypeStruct((b, h, tp, ep), F32),
        ),
        grid=(b, h, nb),
        in_specs=[
            rate_spec, spec(plan, bt, fp, blk), spec(plan, bt, fp, blk),
            spec(plan, bt, ep, blk), spec(plan, bt, ep, blk),
        ],
        out_specs=[spec(plan, bt, fp, blk), spec(plan, bt, fp, blk), spec(plan, bt, ep, blk)],
        compiler_params=compiler_params,
        interpret=plan.interpret, cost_estimate=cost(plan, b, h, q.dtype.itemsize, 1.0),
        name="causal_linear_attention_bwd_intra",
    )(rate, q, k, v, do)


def flops(batch: int, heads: int, length: int, f: int, e: int, chunk: int, *, backward: bool = False) -> float:
    """Model FLOPs of the chunked form (``benchmarks.md`` section 2 generalised to ``F != E``):
    forward ``2BHT(C(F+E) + 2FE)``; backward ``2BHT(2C(F+E) + 5FE)``-ish (``8BHTCD + 10BHTD^2``
    at ``F = E = D``)."""
    fwd = 2.0 * batch * heads * length * (chunk * (f + e) + 2 * f * e)
    if not backward:
        return fwd
    return fwd + 2.0 * batch * heads * length * (2 * chunk * (f + e) + 5 * f * e)
