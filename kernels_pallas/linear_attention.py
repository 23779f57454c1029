"""Pallas kernels for tiled causal linear attention with per-head decay (Lightning Attention-2).

Recurrence (per batch ``b`` and head ``h``, ``lambda_h = exp(-s_h)``, ``s_h >= 0``)::

    S_t = lambda_h S_{t-1} + k_t v_t^T        (S_0 = initial_state)
    o_t = q_t^T S_t                           final_state = S_T

i.e. ``o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j + lambda^(i+1) q_i^T S_0``.

Block form (Qin et al. 2024, "Lightning Attention-2", Alg. 1/2) with blocks of ``C`` tokens, local
index ``r, s = 0..C-1``, ``S_n`` the state *before* block ``n`` (after its previous token) and ``L``
the number of real tokens in the block (``C`` except for a ragged last block)::

    O_n     = [(Q_n K_n^T) * D] V_n + diag(lambda^(r+1)) Q_n S_n        D_rs = lambda^(r-s) [r >= s]
    S_{n+1} = lambda^L S_n + (diag(lambda^(L-1-s)) K_n)^T V_n

The carried state here is the recurrence's ``S_t`` itself, so the query factor is
``lambda^(r+1)`` and the key factor ``lambda^(L-1-s)`` (the Lightning code carries
``lambda * S_t`` instead, giving the equivalent pair ``lambda^r`` / ``lambda^(C-s)``; mixing the two
conventions is the classic off-by-one). Padded tokens of a ragged last block have zero k/v and get
key factor 0, and the last block decays the state by ``lambda^L`` only, so the final state is exact.

Backward (``G_n = dLoss/dS_n``, ``G_N = d final_state``)::

    dQ_n = [(dO_n V_n^T) * D] K_n + diag(lambda^(r+1)) dO_n S_n^T                (forward sweep)
    dK_n = [(dO_n V_n^T) * D]^T Q_n + diag(lambda^(L-1-s)) V_n G_{n+1}^T          (reverse sweep)
    dV_n = [(Q_n K_n^T) * D]^T dO_n + diag(lambda^(L-1-s)) K_n G_{n+1}
    G_n  = lambda^L G_{n+1} + (diag(lambda^(r+1)) Q_n)^T dO_n        d initial_state = G_0

as three kernels: the intra-block terms (all blocks in parallel), a forward sweep over blocks that
recomputes ``S_n`` for ``dQ``, and a reverse sweep that carries ``G`` for ``dK``, ``dV`` and
``d initial_state``. Both carried states are float32 and stay on chip. The decay rates are
**not differentiated** (their cotangent is zero; Lightning/TransNormer use fixed ALiBi slopes): use
the XLA forms in ``zoo.attention.linear`` to learn them.

Lowerings (``backend``):

- ``"tpu"``: Mosaic TPU. Grid ``(batch, heads, [value tiles,] blocks)`` with the block axis last and
  ``"arbitrary"`` (sequential), everything else ``"parallel"``; the state lives in a VMEM scratch
  across grid steps; the rates sit in SMEM. Feature/value dims are padded to multiples of 128 and
  blocks to multiples of 8 (16 for 16-bit inputs), so every block's last two dims are (8k, 128m).
- ``"gpu"``: Pallas **Triton** (``pltriton.CompilerParams``), for Ampere *and* Hopper. Why not
  Mosaic GPU, the jax 0.9+ default: it only targets sm90+ (no A100/L4/consumer cards, no ROCm),
  and in jax 0.10 ``pl.pallas_call`` lowering to Mosaic GPU is itself deprecated in favour of
  ``plgpu.kernel`` with explicit warpgroup/TMA/barrier programming - a separate, Hopper-specific
  kernel that cannot be developed without the hardware. The Triton backend (chosen by passing
  ``pltriton.CompilerParams``, since the params type picks the backend) runs the same grid/BlockSpec
  program on sm80+ and ROCm; it is deprecated in jax 0.11 but still present in the 0.10/0.11 range
  this project pins (``jax<0.12``). Triton grid programs may run concurrently, so the block axis is
  a ``fori_loop`` inside each program (carry in registers), grid ``(batch, heads, value tiles)``;
  all loaded tiles have power-of-two sizes (features padded to a power of two >= 16, values split
  into power-of-two tiles of ``block_e`` columns), as Triton requires.
- On CPU only interpret mode exists; ``interpret=None`` turns it on automatically there and uses
  the TPU program (``backend="gpu"`` runs the Triton-style program in the interpreter).
  ``interpret=pltpu.InterpretParams(...)`` runs the TPU program in the TPU simulator (races,
  uninitialised memory, randomised parallel grid order).

Public API: :func:`causal_linear_attention`, :func:`sharded_causal_linear_attention`,
:class:`BlockSizes`, :func:`causal_linear_attention_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array
F32 = jnp.float32
BACKENDS = ("tpu", "gpu")


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
class _Plan:
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


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _resolve_backend(backend: str | None, interpret: Any) -> tuple[str, Any]:
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


def _make_plan(
    t: int, f: int, e: int, dtype: Any, *, backend: str, interpret: Any, chunk_size: int | None,
    block_sizes: BlockSizes | None, has_decay: bool, precision: Any,
) -> _Plan:
    bs = block_sizes or BlockSizes.get_default(backend)
    bt = chunk_size or bs.block_t
    if not isinstance(bt, int) or bt < 1:
        raise ValueError(f"chunk_size / block_t must be a positive int; got {bt!r}")
    if backend == "gpu":
        bt = min(_next_pow2(max(bt, 16)), _next_pow2(max(t, 16)))
        fp = _next_pow2(max(f, 16))
        be = _next_pow2(max(bs.block_e or 64, 16))
        if e <= be:
            be = _next_pow2(max(e, 16))
        ep = _round_up(e, be)
    else:
        align = 8 if jnp.dtype(dtype).itemsize >= 4 else 16
        bt = min(_round_up(bt, align), _round_up(t, align))
        fp = _round_up(f, 128)
        ep = _round_up(e, 128)
        be = ep if bs.block_e is None else min(_round_up(bs.block_e, 128), ep)
        ep = _round_up(e, be)
    if precision is None:
        precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return _Plan(
        backend=backend, interpret=interpret, t=t, bt=bt, nb=-(-t // bt), fp=fp, ep=ep, be=be,
        has_decay=has_decay, precision=precision, num_warps=bs.num_warps, num_stages=bs.num_stages,
    )


def _compiler_params(plan: _Plan, semantics: tuple[str, ...]) -> Any:
    if plan.backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=semantics)
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


def _rate_spec(plan: _Plan) -> pl.BlockSpec:
    """Decay rates ``[H]``: whole array in SMEM on TPU, the head's scalar on GPU."""
    if plan.backend == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((None,), lambda b, h, *_: (h,))


def _read_rate(plan: _Plan, rate_ref: Any) -> Array:
    if plan.backend == "tpu":
        return rate_ref[pl.program_id(1)]
    return rate_ref[()]


# ----------------------------------------------------------------------------- block math
# Pure functions of loaded tiles, shared by the TPU (grid) and GPU (loop) drivers.


def _dot(a: Array, b: Array, ca: int, cb: int, plan: _Plan) -> Array:
    """2-D matmul contracting ``a`` dim ``ca`` with ``b`` dim ``cb``, float32 accumulation."""
    return lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), precision=plan.precision, preferred_element_type=F32
    )


def _intra_decay(rate: Array, c: int, plan: _Plan) -> Array:
    """``D_rs = lambda^(r-s)`` for ``r >= s`` else 0, ``[C, C]`` float32."""
    r = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    s = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    mask = r >= s
    if not plan.has_decay:
        return jnp.where(mask, 1.0, 0.0).astype(F32)
    diff = jnp.where(mask, r - s, 0).astype(F32)
    return jnp.where(mask, jnp.exp(-rate * diff), 0.0)


def _query_factor(rate: Array, c: int, w: int) -> Array:
    """``lambda^(r+1)`` broadcast to ``[C, w]``."""
    r = lax.broadcasted_iota(jnp.int32, (c, w), 0).astype(F32)
    return jnp.exp(-rate * (r + 1.0))


def _key_factor(rate: Array, c: int, w: int, valid: Any) -> Array:
    """``lambda^(L-1-s)`` for real tokens ``s < L`` else 0, broadcast to ``[C, w]``."""
    s = lax.broadcasted_iota(jnp.int32, (c, w), 0)
    ex = valid - 1 - s
    return jnp.where(ex >= 0, jnp.exp(-rate * jnp.maximum(ex, 0).astype(F32)), 0.0)


def _block_decay(rate: Array, w: int, valid: Any) -> Array:
    """``lambda^L`` as a ``[1, w]`` row (vector math: no scalar transcendental on TPU)."""
    return jnp.exp(-rate * jnp.full((1, w), valid, jnp.int32).astype(F32))


def _fwd_block(q, k, v, s, rate, valid, plan: _Plan):
    """One block of the forward: returns ``(O_n [C, w] f32, S_{n+1} [F, w] f32)``."""
    c, w = q.shape[0], v.shape[1]
    cdt = q.dtype
    a = _dot(q, k, 1, 1, plan) * _intra_decay(rate, c, plan)
    o = _dot(a.astype(cdt), v, 1, 0, plan)
    inter = _dot(q, s.astype(cdt), 1, 0, plan)
    if plan.has_decay:
        inter = inter * _query_factor(rate, c, w)
        vk = (v.astype(F32) * _key_factor(rate, c, w, valid)).astype(cdt)
        s = s * _block_decay(rate, w, valid) + _dot(k, vk, 0, 0, plan)
    else:
        s = s + _dot(k, v, 0, 0, plan)
    return o + inter, s


def _bwd_intra_block(q, k, vs, dos, rate, plan: _Plan):
    """Intra-block gradients: ``(dq [C, F], dk [C, F], [dv tile [C, be]])`` float32."""
    c = q.shape[0]
    cdt = q.dtype
    d = _intra_decay(rate, c, plan)
    a = (_dot(q, k, 1, 1, plan) * d).astype(cdt)
    dp = _dot(dos[0], vs[0], 1, 1, plan)
    for do_j, v_j in zip(dos[1:], vs[1:]):
        dp = dp + _dot(do_j, v_j, 1, 1, plan)
    dp = (dp * d).astype(cdt)
    dq = _dot(dp, k, 1, 0, plan)
    dk = _dot(dp, q, 0, 0, plan)
    dvs = [_dot(a, do_j, 0, 0, plan) for do_j in dos]
    return dq, dk, dvs


def _dq_block(k, vs, dos, dq_i, ss, rate, plan: _Plan):
    """Inter-block ``dQ`` of one block and the state update (forward sweep)."""
    c, f = k.shape
    cdt = k.dtype
    acc = _dot(dos[0], ss[0].astype(cdt), 1, 1, plan)
    for do_j, s_j in zip(dos[1:], ss[1:]):
        acc = acc + _dot(do_j, s_j.astype(cdt), 1, 1, plan)
    if plan.has_decay:
        acc = acc * _query_factor(rate, c, f)
        kf = _key_factor(rate, c, plan.be, c)  # the state after the last block is never used
        bd = _block_decay(rate, plan.be, c)
        ss = [s_j * bd + _dot(k, (v_j.astype(F32) * kf).astype(cdt), 0, 0, plan) for s_j, v_j in zip(ss, vs)]
    else:
        ss = [s_j + _dot(k, v_j, 0, 0, plan) for s_j, v_j in zip(ss, vs)]
    return dq_i + acc, ss


def _dkv_block(q, k, vs, dos, dk_i, dv_is, gs, rate, valid, plan: _Plan):
    """Inter-block ``dK``, ``dV`` of one block and the cotangent-state update (reverse sweep)."""
    c, f = k.shape
    cdt = k.dtype
    acc = _dot(vs[0], gs[0].astype(cdt), 1, 1, plan)
    for v_j, g_j in zip(vs[1:], gs[1:]):
        acc = acc + _dot(v_j, g_j.astype(cdt), 1, 1, plan)
    dvs = [_dot(k, g_j.astype(cdt), 1, 0, plan) for g_j in gs]
    if plan.has_decay:
        acc = acc * _key_factor(rate, c, f, valid)
        kf = _key_factor(rate, c, plan.be, valid)
        dvs = [dv * kf for dv in dvs]
        qd = (q.astype(F32) * _query_factor(rate, c, f)).astype(cdt)
        bd = _block_decay(rate, plan.be, valid)
        gs = [g_j * bd + _dot(qd, do_j, 0, 0, plan) for g_j, do_j in zip(gs, dos)]
    else:
        gs = [g_j + _dot(q, do_j, 0, 0, plan) for g_j, do_j in zip(gs, dos)]
    dvs = [dv_i + dv for dv_i, dv in zip(dv_is, dvs)]
    return dk_i + acc, dvs, gs


def _valid(plan: _Plan, n: Any) -> Any:
    """Real tokens in block ``n`` (static ``C`` unless decay meets a ragged last block)."""
    if plan.has_decay and plan.ragged:
        return jnp.minimum(plan.bt, plan.t - n * plan.bt)
    return plan.bt


def _tiles(ref: Any, rows: Any, plan: _Plan) -> list[Array]:
    return [ref[rows, pl.ds(j * plan.be, plan.be)] for j in range(plan.ne)]


def _store_tiles(ref: Any, rows: Any, xs: list[Array], plan: _Plan) -> None:
    for j, x in enumerate(xs):
        ref[rows, pl.ds(j * plan.be, plan.be)] = x.astype(ref.dtype)


# ----------------------------------------------------------------------------- kernels


def _fwd_grid_kernel(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, s_scr, *, plan: _Plan):
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _init():
        s_scr[...] = s0_ref[...]

    rate = _read_rate(plan, rate_ref) if plan.has_decay else None
    o, s = _fwd_block(q_ref[...], k_ref[...], v_ref[...], s_scr[...], rate, _valid(plan, n), plan)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s

    @pl.when(n == plan.nb - 1)
    def _final():
        st_ref[...] = s


def _fwd_loop_kernel(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, *, plan: _Plan):
    rate = _read_rate(plan, rate_ref) if plan.has_decay else None

    def body(n, s):
        rows = pl.ds(pl.multiple_of(n * plan.bt, plan.bt), plan.bt)
        o, s = _fwd_block(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], s, rate, _valid(plan, n), plan)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s

    st_ref[...] = lax.fori_loop(0, plan.nb, body, s0_ref[...].astype(F32))


def _bwd_intra_kernel(rate_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, plan: _Plan):
    rate = _read_rate(plan, rate_ref) if plan.has_decay else None
    rows = slice(None)
    dq, dk, dvs = _bwd_intra_block(
        q_ref[...], k_ref[...], _tiles(v_ref, rows, plan), _tiles(do_ref, rows, plan), rate, plan
    )
    dq_ref[...] = dq
    dk_ref[...] = dk
    _store_tiles(dv_ref, rows, dvs, plan)


def _dq_grid_kernel(rate_ref, k_ref, v_ref, do_ref, dqi_ref, s0_ref, dq_ref, s_scr, *, plan: _Plan):
    n = pl.program_id(2)
    rows = slice(None)

    @pl.when(n == 0)
    def _init():
        s_scr[...] = s0_ref[...]

    rate = _read_rate(plan, rate_ref) if plan.has_decay else None
    dq, ss = _dq_block(
        k_ref[...], _tiles(v_ref, rows, plan), _tiles(do_ref, rows, plan), dqi_ref[...],
        _tiles(s_scr, rows, plan), rate, plan,
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    _store_tiles(s_scr, rows, ss, plan)


def _dq_loop_kernel(rate_ref, k_ref, v_ref, do_ref, dqi_ref, s0_ref, dq_ref, *, plan: _Plan):
    rate = _read_rate(plan, rate_ref) if plan.has_decay else None

    def body(n, ss):
        rows = pl.ds(pl.multiple_of(n * plan.bt, plan.bt), plan.bt)
        dq, ss = _dq_block(
            k_ref[rows, :], _tiles(v_ref, rows, plan), _tiles(do_ref, rows, plan), dqi_ref[rows, :],
            list(ss), rate, plan,
        )
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return tuple(ss)

    lax.fori_loop(0, plan.nb, body, tuple(t.astype(F32) for t in _tiles(s0_ref, slice(None), plan)))


def _dkv_grid_kernel(
    rate_ref, q_ref, k_ref, v_ref, do_ref, dki_ref, dvi_ref, dst_ref, dk_ref, dv_ref, ds0_ref, g_scr,
    *, plan: _Plan,
):
    i = pl.program_id(2)
    n = plan.nb - 1 - i
    rows = slice(None)

    @pl.when(i == 0)
    def _init():
        g_scr[...] = dst_ref[...]

    rate = _read_rate(plan, rate_ref) if plan.has_decay else None
    dk, dvs, gs = _dkv_block(
        q_ref[...], k_ref[...], _tiles(v_ref, rows, plan), _tiles(do_ref, rows, plan), dki_ref[...],
        _tiles(dvi_ref, rows, plan), _tiles(g_scr, rows, plan), rate, _valid(plan, n), plan,
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    _store_tiles(dv_ref, rows, dvs, plan)
    _store_tiles(g_scr, rows, gs, plan)

    @pl.when(i == plan.nb - 1)
    def _final():
        ds0_ref[...] = g_scr[...]


def _dkv_loop_kernel(
    rate_ref, q_ref, k_ref, v_ref, do_ref, dki_ref, dvi_ref, dst_ref, dk_ref, dv_ref, ds0_ref,
    *, plan: _Plan,
):
    rate = _read_rate(plan, rate_ref) if plan.has_decay else None

    def body(i, gs):
        n = plan.nb - 1 - i
        rows = pl.ds(pl.multiple_of(n * plan.bt, plan.bt), plan.bt)
        dk, dvs, gs = _dkv_block(
            q_ref[rows, :], k_ref[rows, :], _tiles(v_ref, rows, plan), _tiles(do_ref, rows, plan),
            dki_ref[rows, :], _tiles(dvi_ref, rows, plan), list(gs), rate, _valid(plan, n), plan,
        )
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        _store_tiles(dv_ref, rows, dvs, plan)
        return tuple(gs)

    g0 = tuple(t.astype(F32) for t in _tiles(dst_ref, slice(None), plan))
    gs = lax.fori_loop(0, plan.nb, body, g0)
    _store_tiles(ds0_ref, slice(None), list(gs), plan)


# ----------------------------------------------------------------------------- pallas_call wrappers
# Kernel-level layout: q, k [B, H, Tp, Fp]; v, o [B, H, Tp, Ep]; states [B, H, Fp, Ep] float32.


def _spec(plan: _Plan, rows: int, cols: int, row_block: Any, col_block: Any = 0) -> pl.BlockSpec:
    """Block ``[rows, cols]`` of a ``[B, H, R, C]`` array; ``row_block``/``col_block`` map the grid
    indices after ``(b, h)`` to block indices."""

    def index_map(b, h, *g):
        r = row_block(*g) if callable(row_block) else row_block
        c = col_block(*g) if callable(col_block) else col_block
        return (b, h, r, c)

    return pl.BlockSpec((None, None, rows, cols), index_map)


def _cost(plan: _Plan, b: int, h: int, itemsize: int, passes: float) -> pl.CostEstimate:
    t, f, e, c = plan.tp, plan.fp, plan.ep, plan.bt
    flops = int(passes * 2 * b * h * t * (c * f + c * e + 2 * f * e))
    trans = int(b * h * t * c) if plan.has_decay else 0
    nbytes = int(passes * b * h * (t * (2 * f + 2 * e) * itemsize + 2 * f * e * 4))
    return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _forward(q, k, v, rate, s0, plan: _Plan):
    b, h = q.shape[:2]
    bt, fp, ep, be, nb = plan.bt, plan.fp, plan.ep, plan.be, plan.nb
    out_shape = (jax.ShapeDtypeStruct((b, h, plan.tp, ep), q.dtype), jax.ShapeDtypeStruct((b, h, fp, ep), F32))
    if plan.backend == "tpu":
        grid = (b, h, plan.ne, nb)
        in_specs = [
            _rate_spec(plan),
            _spec(plan, bt, fp, lambda e, n: n),
            _spec(plan, bt, fp, lambda e, n: n),
            _spec(plan, bt, be, lambda e, n: n, lambda e, n: e),
            _spec(plan, fp, be, 0, lambda e, n: e),
        ]
        out_specs = [_spec(plan, bt, be, lambda e, n: n, lambda e, n: e), _spec(plan, fp, be, 0, lambda e, n: e)]
        kernel = functools.partial(_fwd_grid_kernel, plan=plan)
        scratch = [pltpu.VMEM((fp, be), F32)]
        params = _compiler_params(plan, ("parallel", "parallel", "parallel", "arbitrary"))
    else:
        grid = (b, h, plan.ne)
        tp = plan.tp
        in_specs = [
            _rate_spec(plan),
            _spec(plan, tp, fp, 0),
            _spec(plan, tp, fp, 0),
            _spec(plan, tp, be, 0, lambda e: e),
            _spec(plan, fp, be, 0, lambda e: e),
        ]
        out_specs = [_spec(plan, tp, be, 0, lambda e: e), _spec(plan, fp, be, 0, lambda e: e)]
        kernel = functools.partial(_fwd_loop_kernel, plan=plan)
        scratch = []
        params = _compiler_params(plan, ())
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, compiler_params=params, interpret=plan.interpret,
        cost_estimate=_cost(plan, b, h, q.dtype.itemsize, 1.0), name="causal_linear_attention_fwd",
    )(rate, q, k, v, s0)


def _backward(q, k, v, rate, s0, do, dst, plan: _Plan):
    b, h = q.shape[:2]
    bt, fp, ep, nb, tp = plan.bt, plan.fp, plan.ep, plan.nb, plan.tp
    cdt = q.dtype
    tpu = plan.backend == "tpu"

    # 1) intra-block terms, every block in parallel.
    blk = lambda n: n  # noqa: E731
    intra = pl.pallas_call(
        functools.partial(_bwd_intra_kernel, plan=plan),
        out_shape=(
            jax.ShapeDtypeStruct((b, h, tp, fp), F32),
            jax.ShapeDtypeStruct((b, h, tp, fp), F32),
            jax.ShapeDtypeStruct((b, h, tp, ep), F32),
        ),
        grid=(b, h, nb),
        in_specs=[
            _rate_spec(plan), _spec(plan, bt, fp, blk), _spec(plan, bt, fp, blk),
            _spec(plan, bt, ep, blk), _spec(plan, bt, ep, blk),
        ],
        out_specs=[_spec(plan, bt, fp, blk), _spec(plan, bt, fp, blk), _spec(plan, bt, ep, blk)],
        compiler_params=_compiler_params(plan, ("parallel", "parallel", "parallel")),
        interpret=plan.interpret, cost_estimate=_cost(plan, b, h, cdt.itemsize, 1.0),
        name="causal_linear_attention_bwd_intra",
    )
    dq_i, dk_i, dv_i = intra(rate, q, k, v, do)

    # 2) forward sweep: dQ += lambda^(r+1) dO S_n^T (S recomputed block by block).
    if tpu:
        grid, rows, full = (b, h, nb), blk, None
        seq = ("parallel", "parallel", "arbitrary")
        dq_kernel = functools.partial(_dq_grid_kernel, plan=plan)
        dq_scratch = [pltpu.VMEM((fp, ep), F32)]
    else:
        grid, rows, full = (b, h), 0, tp
        seq = ()
        dq_kernel = functools.partial(_dq_loop_kernel, plan=plan)
        dq_scratch = []
    r = full or bt
    dq = pl.pallas_call(
        dq_kernel,
        out_shape=jax.ShapeDtypeStruct((b, h, tp, fp), cdt),
        grid=grid,
        in_specs=[
            _rate_spec(plan), _spec(plan, r, fp, rows), _spec(plan, r, ep, rows),
            _spec(plan, r, ep, rows), _spec(plan, r, fp, rows), _spec(plan, fp, ep, 0),
        ],
        out_specs=_spec(plan, r, fp, rows),
        scratch_shapes=dq_scratch,
        compiler_params=_compiler_params(plan, seq),
        interpret=plan.interpret, cost_estimate=_cost(plan, b, h, cdt.itemsize, 0.5),
        name="causal_linear_attention_bwd_dq",
    )(rate, k, v, do, dq_i, s0)

    # 3) reverse sweep: dK, dV += decayed G_{n+1} terms; G_n = lambda^L G_{n+1} + (lambda^(r+1) Q)^T dO.
    if tpu:
        rows = lambda i: nb - 1 - i  # noqa: E731
        dkv_kernel = functools.partial(_dkv_grid_kernel, plan=plan)
        dkv_scratch = [pltpu.VMEM((fp, ep), F32)]
    else:
        dkv_kernel = functools.partial(_dkv_loop_kernel, plan=plan)
        dkv_scratch = []
    dk, dv, ds0 = pl.pallas_call(
        dkv_kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, h, tp, fp), cdt),
            jax.ShapeDtypeStruct((b, h, tp, ep), cdt),
            jax.ShapeDtypeStruct((b, h, fp, ep), F32),
        ),
        grid=grid,
        in_specs=[
            _rate_spec(plan), _spec(plan, r, fp, rows), _spec(plan, r, fp, rows),
            _spec(plan, r, ep, rows), _spec(plan, r, ep, rows), _spec(plan, r, fp, rows),
            _spec(plan, r, ep, rows), _spec(plan, fp, ep, 0),
        ],
        out_specs=[_spec(plan, r, fp, rows), _spec(plan, r, ep, rows), _spec(plan, fp, ep, 0)],
        scratch_shapes=dkv_scratch,
        compiler_params=_compiler_params(plan, seq),
        interpret=plan.interpret, cost_estimate=_cost(plan, b, h, cdt.itemsize, 1.0),
        name="causal_linear_attention_bwd_dkv",
    )(rate, q, k, v, do, dk_i, dv_i, dst)
    return dq, dk, dv, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_call(q, k, v, rate, s0, plan: _Plan):
    return _forward(q, k, v, rate, s0, plan)


def _kernel_call_fwd(q, k, v, rate, s0, plan: _Plan):
    return _forward(q, k, v, rate, s0, plan), (q, k, v, rate, s0)


def _kernel_call_bwd(plan: _Plan, res, cts):
    q, k, v, rate, s0 = res
    do, dst = cts
    dq, dk, dv, ds0 = _backward(q, k, v, rate, s0, do.astype(q.dtype), dst.astype(F32), plan)
    # Decay rates are not differentiated (documented): zero cotangent.
    return dq, dk, dv, jnp.zeros_like(rate), ds0.astype(s0.dtype)


_kernel_call.defvjp(_kernel_call_fwd, _kernel_call_bwd)


# ----------------------------------------------------------------------------- public API


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
      decay_rate: ``None`` (no decay) or ``[heads]`` rates ``s_h >= 0`` (not differentiated: zero
        gradient).
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
    initial_state (backward kernels, see the module docstring).

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
        raise ValueError("length must be positive")
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must be float32, bfloat16 or float16; got {dtype}")
    if decay_rate is not None:
        decay_rate = jnp.asarray(decay_rate, F32)
        if decay_rate.ndim == 0:
            decay_rate = jnp.broadcast_to(decay_rate, (h,))
        if decay_rate.shape != (h,):
            raise ValueError(f"decay_rate must be None or [heads={h}]; got {_shape(decay_rate)}")
    if initial_state is not None and initial_state.shape != (b, h, f, e):
        raise ValueError(f"initial_state must be [{b}, {h}, {f}, {e}]; got {_shape(initial_state)}")

    backend, interpret = _resolve_backend(backend, interpret)
    plan = _make_plan(
        t, f, e, dtype, backend=backend, interpret=interpret, chunk_size=chunk_size,
        block_sizes=block_sizes, has_decay=decay_rate is not None, precision=precision,
    )
    pad_t = plan.tp - t

    def to_kernel(x: Array, width: int) -> Array:
        x = jnp.swapaxes(x.astype(dtype), 1, 2)  # [B, H, T, D]
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad_t), (0, width - x.shape[-1])))

    qk = to_kernel(q, plan.fp)
    kk = to_kernel(k, plan.fp)
    vk = to_kernel(v, plan.ep)
    rate = jnp.zeros((h,), F32) if decay_rate is None else lax.stop_gradient(decay_rate)
    s0 = jnp.zeros((b, h, f, e), F32) if initial_state is None else initial_state.astype(F32)
    s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, plan.fp - f), (0, plan.ep - e)))
    o, st = _kernel_call(qk, kk, vk, rate, s0, plan)
    out = jnp.swapaxes(o[:, :, :t, :e], 1, 2)
    return out, st[:, :, :f, :e]


def sharded_causal_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    decay_rate: Array | None = None,
    *,
    mesh: Mesh,
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | tuple[str, ...] | None = None,
    initial_state: Array | None = None,
    **kwargs: Any,
) -> tuple[Array, Array]:
    """:func:`causal_linear_attention` under ``jax.shard_map``, split over batch and heads.

    Each device runs the kernel on its ``[B / |batch_axis|, T, H / |head_axis|, .]`` shard (the
    recurrence is independent per batch element and head, so no communication is needed); the
    sequence is not split. ``batch_axis`` / ``head_axis`` name mesh axes (or ``None`` for
    replicated); ``kwargs`` go to :func:`causal_linear_attention`. Same shapes and returns:
    ``S_t = lambda_h S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` per shard (Qin et al. 2024,
    Lightning Attention-2).
    """
    b, _, h, f = q.shape
    e = v.shape[-1]
    x_spec = P(batch_axis, None, head_axis, None)
    s_spec = P(batch_axis, head_axis, None, None)
    if initial_state is None:
        initial_state = jnp.zeros((b, h, f, e), F32)
    has_decay = decay_rate is not None
    rate = jnp.zeros((h,), F32) if decay_rate is None else jnp.broadcast_to(jnp.asarray(decay_rate, F32), (h,))

    def local(q_, k_, v_, r_, s_):
        return causal_linear_attention(
            q_, k_, v_, r_ if has_decay else None, initial_state=s_, **kwargs
        )

    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, P(head_axis), s_spec),
        out_specs=(x_spec, s_spec), check_vma=False,
    )
    return fn(q, k, v, rate, initial_state)


def causal_linear_attention_reference(
    q: Array, k: Array, v: Array, decay_rate: Array | None = None, *,
    initial_state: Array | None = None,
) -> tuple[Array, Array]:
    """Token recurrence ``S_t = lambda S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` as one
    ``lax.scan`` in float32 (the oracle of the kernels; O(T) sequential steps). Same shapes and
    returns as :func:`causal_linear_attention` (Katharopoulos et al. 2020, with the per-head decay
    of Qin et al. 2024)."""
    b, t, h, f = q.shape
    e = v.shape[-1]
    s0 = jnp.zeros((b, h, f, e), F32) if initial_state is None else initial_state.astype(F32)
    lam = None if decay_rate is None else jnp.exp(-jnp.broadcast_to(jnp.asarray(decay_rate, F32), (h,)))

    def step(s, xs):
        q_t, k_t, v_t = xs
        if lam is not None:
            s = lam[:, None, None] * s
        s = s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhf,bhfe->bhe", q_t, s, precision=lax.Precision.HIGHEST)

    xs = tuple(jnp.moveaxis(x.astype(F32), 1, 0) for x in (q, k, v))
    s_t, o = lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(jnp.result_type(q.dtype, k.dtype, v.dtype)), s_t


def flops(batch: int, heads: int, length: int, f: int, e: int, chunk: int, *, backward: bool = False) -> float:
    """Model FLOPs of the chunked form (``benchmarks.md`` section 2 generalised to ``F != E``):
    forward ``2BHT(C(F+E) + 2FE)``; backward ``2BHT(2C(F+E) + 5FE)``-ish (``8BHTCD + 10BHTD^2``
    at ``F = E = D``)."""
    fwd = 2.0 * batch * heads * length * (chunk * (f + e) + 2 * f * e)
    if not backward:
        return fwd
    return fwd + 2.0 * batch * heads * length * (2 * chunk * (f + e) + 5 * f * e)


__all__ = [
    "BlockSizes",
    "causal_linear_attention",
    "causal_linear_attention_reference",
    "flops",
    "sharded_causal_linear_attention",
]
