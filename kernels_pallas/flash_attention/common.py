"""Shared part of the flash-attention kernels: block sizes, the static plan of one call, the
visible key/query block ranges, and the block maths (pure functions of loaded tiles) that the TPU
grid programs (:mod:`.tpu`) and the GPU loop programs (:mod:`.gpu`) both run.

Notation (one batch element, query head ``h``, query position ``i``, key position ``j``)::

    l_ij = f_i * q_i.k_j + beta_ij                              (logits, float32)
    f_i  = scale * max(1, log n_i / log T_train)                 (softmax; scale without log-n)
         = scale * sqrt(log n_i / log T_train)                   (softmax, logn_kind="sqrt")
         = log(d) * log(max(n_i, 1))                             (softplus; q, k L2-normalised)
    beta_ij = -slope_h |i - j| + bias_fn(i, j, h) + b            (b: sigmoid's scalar bias)

with ``n_i`` the number of keys query ``i`` sees (``k_length`` non-causal; ``min(i + 1, window)``
causal). Forward per query block (FlashAttention-2, Dao 2023, Alg. 1), over its visible key blocks:

    softmax : m' = max(m, rowmax l), acc' = e^(m-m') acc + e^(l-m') V,  L' = e^(m-m') L + rowsum e^(l-m')
              (m, L) start at (s_h, 1) with a sink logit s_h, else (-inf, 0); o = acc / L, r = m + log L
    sigmoid : acc' = acc + sigmoid(l) V                      (no normaliser, no running max; o = acc)
    softplus: acc' = acc + softplus(l) V,  Z' = Z + rowsum softplus(l)          o = acc / (Z + eps)

(softplus is bounded by ``log d log n`` because ``|q^.k^| <= 1``: no running max is needed). The
saved residual ``r`` is the log-sum-exp (softmax) or ``Z + eps`` (softplus). Backward
(FlashAttention-2 Alg. 2), with ``D_i = do_i.o_i`` and ``dP_ij = do_i.v_j``, recomputing ``l``::

    softmax : P = e^(l - r),              dl = P (dP - D)
    sigmoid : P = sigmoid(l),             dl = P (1 - P) dP
    softplus: P = softplus(l) / r,        dl = sigmoid(l) (dP - D) / r
    dV_j = sum_i P_ij do_i,   dQ_i = f_i sum_j dl_ij k_j,   dK_j = sum_i f_i dl_ij q_i

The backward tiles are transposed (``[keys, queries]``) so that ``r`` and ``D`` are rows
``[1, block_q]`` (a lane-dense layout on TPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
F32 = jnp.float32
BACKENDS = ("tpu", "gpu")
VARIANTS = ("softmax", "sigmoid", "softplus")
LANES = 128  # TPU lane width: residual rows are stored lane-replicated / 8-sublane broadcast
SUBLANES = 8


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels (not tuned on hardware: nothing has run on a GPU or TPU yet).

    block_q: query rows per program / grid step; block_k: key rows per inner step. Rounded up to
      a power of two >= 16 on GPU; on TPU to a multiple of 128 for the real kernel (lane-dense
      residual rows) and of 8 (16 for 16-bit inputs) in interpret mode; capped by the (rounded)
      sequence length.
    num_warps / num_stages: Triton launch parameters (GPU only).
    """

    block_q: int = 128
    block_k: int = 128
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def get_default(cls, backend: str) -> BlockSizes:
        """TPU ``128 x 128`` (MXU width); GPU ``64 x 64``, 4 warps, 2 stages (an fp32
        ``64 x 128`` accumulator fits the registers of one program)."""
        if backend == "tpu":
            return cls(block_q=128, block_k=128)
        if backend == "gpu":
            return cls(block_q=64, block_k=64, num_warps=4, num_stages=2)
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one call (hashable: the custom_vjp's non-differentiable argument)."""

    backend: str
    interpret: Any
    variant: str
    causal: bool
    window: int | None
    tq: int  # real lengths
    tk: int
    bq: int
    bk: int
    nq: int
    nk: int
    d: int  # real head dim (softplus's log d)
    dp: int  # padded head dim
    ep: int  # padded value dim
    groups: int  # query heads per key/value head
    gp: int  # groups padded (per-head parameter rows; a power of two on GPU)
    scale: float
    sigmoid_bias: float
    logn: int | None
    logn_kind: str
    has_sink: bool
    has_alibi: bool
    bias_fn: Callable[..., Any] | None
    bias_fn_head_arg: bool  # bias_fn(q_pos, k_pos, head) elementwise; else bias_fn(q_pos [n], k_pos [m])
    eps: float
    precision: Any
    num_warps: int | None
    num_stages: int | None

    @property
    def tqp(self) -> int:
        return self.nq * self.bq

    @property
    def tkp(self) -> int:
        return self.nk * self.bk

    @property
    def has_residual(self) -> bool:
        return self.variant != "sigmoid"

    @property
    def kv_steps(self) -> int:
        """Key blocks a query block can see (the TPU grid's inner axis)."""
        if self.causal and self.window is not None:
            return min(self.nk, -(-(self.bq + self.window - 1) // self.bk) + 1)
        return self.nk

    @property
    def q_steps(self) -> int:
        """Query blocks that can see a key block."""
        if self.causal and self.window is not None:
            return min(self.nq, -(-(self.bk + self.window - 1) // self.bq) + 1)
        return self.nq


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def make_plan(
    tq: int, tk: int, d: int, e: int, groups: int, dtype: Any, *, backend: str, interpret: Any,
    variant: str, causal: bool, window: int | None, scale: float, sigmoid_bias: float,
    logn: int | None, has_sink: bool, has_alibi: bool, bias_fn: Any, eps: float,
    block_q: int | None, block_k: int | None, block_sizes: BlockSizes | None, precision: Any,
    logn_kind: str = "ratio", bias_fn_head_arg: bool = True,
) -> Plan:
    """Padded tile sizes: Triton tiles are powers of two; Mosaic blocks ``(8k, 128m)`` (``128``
    rows for the real kernel: the residual rows ``[1, block_q]`` must be lane-dense)."""
    bs = block_sizes or BlockSizes.get_default(backend)
    bq = int(block_q or bs.block_q)
    bk = int(block_k or bs.block_k)
    if backend == "gpu":
        bq = min(next_pow2(max(bq, 16)), next_pow2(max(tq, 16)))
        bk = min(next_pow2(max(bk, 16)), next_pow2(max(tk, 16)))
        dp, ep, gp = next_pow2(max(d, 16)), next_pow2(max(e, 16)), next_pow2(groups)
    else:
        align = LANES if interpret is False else (8 if jnp.dtype(dtype).itemsize >= 4 else 16)
        bq = min(round_up(bq, align), round_up(tq, align))
        bk = min(round_up(bk, align), round_up(tk, align))
        dp, ep, gp = round_up(d, LANES), round_up(e, LANES), groups
    if precision is None:
        precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return Plan(
        backend=backend, interpret=interpret, variant=variant, causal=causal, window=window,
        tq=tq, tk=tk, bq=bq, bk=bk, nq=-(-tq // bq), nk=-(-tk // bk), d=d, dp=dp, ep=ep,
        groups=groups, gp=gp, scale=float(scale), sigmoid_bias=float(sigmoid_bias), logn=logn,
        logn_kind=logn_kind, bias_fn_head_arg=bias_fn_head_arg, has_sink=has_sink, has_alibi=has_alibi,
        bias_fn=bias_fn, eps=float(eps), precision=precision,
        num_warps=bs.num_warps, num_stages=bs.num_stages,
    )


# ----------------------------------------------------------------------------- block ranges


def _div(a: Any, b: int) -> Any:
    """``a // b`` for ``a >= 0`` (``lax.div``: Triton's program ids reject ``//``)."""
    return a // b if isinstance(a, int) else lax.div(a, jnp.asarray(b, a.dtype))


def kv_range(plan: Plan, i: Any) -> tuple[Any, Any]:
    """Key blocks ``[lo, hi)`` that query block ``i`` sees (causal: up to the diagonal; window:
    from the block holding ``i * bq - window + 1``)."""
    if not plan.causal:
        return 0, plan.nk
    hi = jnp.minimum(plan.nk, _div((i + 1) * plan.bq - 1, plan.bk) + 1)
    if plan.window is None:
        return 0, hi
    return _div(jnp.maximum(i * plan.bq - plan.window + 1, 0), plan.bk), hi


def q_range(plan: Plan, j: Any) -> tuple[Any, Any]:
    """Query blocks ``[lo, hi)`` that see key block ``j``."""
    if not plan.causal:
        return 0, plan.nq
    lo = _div(j * plan.bk, plan.bq)
    if plan.window is None:
        return lo, plan.nq
    return lo, jnp.minimum(plan.nq, _div(j * plan.bk + plan.bk + plan.window - 2, plan.bq) + 1)


# ----------------------------------------------------------------------------- block maths


def dot(a: Array, b: Array, ca: int, cb: int, plan: Plan) -> Array:
    """2-D matmul contracting ``a`` dim ``ca`` with ``b`` dim ``cb``, float32 accumulation."""
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=plan.precision, preferred_element_type=F32)


def positions(start: Any, n: int, axis: int) -> Array:
    """``start + [0..n)`` as an int32 column (``axis=0``, ``[n, 1]``) or row (``axis=1``, ``[1, n]``)."""
    shape = (n, 1) if axis == 0 else (1, n)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def row_factor(plan: Plan, qpos: Array) -> Any:
    """``f_i`` (see the module docstring) for query positions ``qpos``."""
    if plan.variant != "softplus" and plan.logn is None:
        return plan.scale
    if plan.causal:
        n = qpos + 1 if plan.window is None else jnp.minimum(qpos + 1, plan.window)
        n = n.astype(F32)
    else:
        n = jnp.full(qpos.shape, float(plan.tk), F32)
    logn = jnp.log(jnp.maximum(n, 1.0))
    if plan.variant == "softplus":
        return math.log(plan.d) * logn
    if plan.logn_kind == "sqrt":  # Jin et al. 2023: not clamped
        return plan.scale * jnp.sqrt(logn / math.log(plan.logn))
    return plan.scale * jnp.maximum(1.0, logn / math.log(plan.logn))


def _position_bias(qpos: Array, kpos: Array, head: Any, plan: Plan, transposed: bool) -> Array:
    if plan.bias_fn_head_arg:
        return plan.bias_fn(qpos, kpos, head).astype(F32)
    # bias_fn(q_pos [n], k_pos [m]) -> [n, m] or [heads or 1, n, m] (zoo.attention.blockwise's form):
    # the program's head is picked by a one-hot sum over the table's leading axis (no value slicing:
    # Triton cannot lower it; on Triton the table's head count must then be a power of two).
    x = plan.bias_fn(qpos.reshape(-1), kpos.reshape(-1)).astype(F32)
    if x.ndim == 3:
        pick = lax.broadcasted_iota(jnp.int32, (x.shape[0], 1, 1), 0) == head
        x = jnp.sum(jnp.where(pick, x, 0.0), axis=0)
    return x.T if transposed else x


def scores(
    qk: Array, qpos: Array, kpos: Array, head: Any, slope: Any, plan: Plan, transposed: bool = False,
) -> tuple[Array, Array | None]:
    """Logits ``l`` and the visibility mask (None: all visible) of a tile; ``qpos``/``kpos`` are
    the broadcastable position column/row (row/column for the ``transposed`` backward tiles)."""
    s = qk * row_factor(plan, qpos)
    if plan.has_alibi:
        s = s - slope * jnp.abs(qpos - kpos).astype(F32)
    if plan.bias_fn is not None:
        s = s + _position_bias(qpos, kpos, head, plan, transposed)
    if plan.variant == "sigmoid":
        s = s + plan.sigmoid_bias
    mask = None
    if plan.causal:
        mask = kpos <= qpos
        if plan.window is not None:
            mask = mask & (qpos - kpos < plan.window)
    elif plan.tkp != plan.tk:
        mask = jnp.broadcast_to(kpos < plan.tk, s.shape)
    return s, mask


def _softplus(x: Array) -> Array:
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def _masked(mask: Array | None, x: Array) -> Array:
    return x if mask is None else jnp.where(mask, x, 0.0)


def init_carry(plan: Plan, bq: int, sink: Any) -> tuple[Array, Array]:
    """``(m, L)`` columns ``[bq, 1]`` before the first key block."""
    if plan.variant == "softmax" and plan.has_sink:
        return jnp.full((bq, 1), sink, F32), jnp.ones((bq, 1), F32)
    m0 = -jnp.inf if plan.variant == "softmax" else 0.0
    return jnp.full((bq, 1), m0, F32), jnp.zeros((bq, 1), F32)


def fwd_block(q, k, v, qpos, kpos, head, slope, m, den, acc, plan: Plan):
    """One key block of the forward: returns ``(m, L, acc)`` (``m`` unused but for softmax)."""
    s, mask = scores(dot(q, k, 1, 1, plan), qpos, kpos, head, slope, plan)
    if plan.variant == "softmax":
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe)
        den = alpha * den + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + dot(p.astype(v.dtype), v, 1, 0, plan)
        return m_new, den, acc
    p = _masked(mask, _sigmoid(s) if plan.variant == "sigmoid" else _softplus(s))
    if plan.variant == "softplus":
        den = den + jnp.sum(p, axis=1, keepdims=True)
    return m, den, acc + dot(p.astype(v.dtype), v, 1, 0, plan)


def finish(m: Array, den: Array, acc: Array, plan: Plan) -> tuple[Array, Array]:
    """``(o [bq, E] f32, r [bq, 1])``: the output and the saved residual (zeros for sigmoid)."""
    if plan.variant == "softmax":
        o = acc / jnp.where(den > 0, den, 1.0)  # a row that sees no key (and no sink): 0
        return o, m + jnp.log(den)
    if plan.variant == "softplus":
        z = den + plan.eps
        return acc / z, z
    return acc, jnp.zeros_like(den)


def bwd_block(q, k, v, do, r, dd, qpos, kpos, head, slope, plan: Plan) -> tuple[Array, Array]:
    """Transposed tiles of one (key block, query block) pair: ``(P^T, dl^T * f)`` ``[bk, bq]``
    float32 with ``r``, ``D`` and ``qpos`` rows ``[1, bq]`` and ``kpos`` a column ``[bk, 1]``."""
    s, mask = scores(dot(k, q, 1, 1, plan), qpos, kpos, head, slope, plan, transposed=True)
    dp = dot(v, do, 1, 1, plan)
    if plan.variant == "softmax":
        p = _masked(mask, jnp.exp(s - r))
        ds = p * (dp - dd)
    elif plan.variant == "sigmoid":
        p = _masked(mask, _sigmoid(s))
        ds = p * (1.0 - p) * dp
    else:
        p = _masked(mask, _softplus(s) / r)
        ds = _masked(mask, _sigmoid(s) / r) * (dp - dd)
    return p, ds * row_factor(plan, qpos)
