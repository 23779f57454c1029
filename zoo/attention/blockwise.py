"""Blockwise (flash) forms of the softmax family: O(T) memory, a window's cost O(T w).

One core serves every variant. Queries are cut into blocks of ``block_q`` and keys into blocks
of ``block_k``; per query block a loop visits only the key blocks that can be visible (all of
them; those at or before the diagonal when causal; the ``ceil((w + block_q - 1) / block_k)``
blocks that hold a sliding window of ``w``, sliced with ``dynamic_slice``) and keeps a row
state instead of the ``T x T`` weights. The backward pass is a ``jax.custom_vjp`` that
recomputes the logits block by block from the saved row statistics (FlashAttention-2, Dao
2023): one loop over key blocks accumulating ``dk, dv`` per block and adding into ``dq``; the
residuals are q, k, v, the output and one or three numbers per row. Logits are
``l_ij = q'_i.k_j + bias(pos_i, pos_j)``, where ``q'`` already carries the scale (and the log-n
factor), so autodiff outside the core takes care of both.

Variants and what their row state is in a blockwise pass:

- ``"softmax"``: ``y_i = sum_j exp(l_ij) v_j / (exp(s_h) + sum_j exp(l_ij))``: running max
  ``m_i`` and sum ``l_i`` (online softmax); the learned sink ``s_h`` starts the state
  (``m = s_h, l = 1``), so it joins the normaliser and never needs a value. Saved: the
  log-sum-exp ``L_i``. Backward: ``P = exp(l - L)``, ``dl = P (dO.v_j - dO.y_i)``,
  ``ds_h = -sum_i exp(s_h - L_i) dO_i.y_i``. A row that sees nothing (and has no sink) gives 0.
- ``"sigmoid"``: ``y_i = sum_j sigmoid(l_ij + b) v_j`` (FlashSigmoid, Ramapuram et al. 2024):
  no normaliser, so no running max and nothing saved per row; ``dl = dO.v_j p (1 - p)``.
- ``"lssa"``: ``y_i = sum_j f_ij v_j / (Z_i + eps)``, ``f = softplus(l)``, ``Z_i = sum_j f_ij``:
  the normaliser is a plain running sum (softplus of the bounded logits of L2-normalised q, k
  cannot overflow, so no max is needed). Saved: ``Z_i``.
- ``"lssar"``: ``a = f / (Z_i + eps)``, ``x = n_i a - delta_i``, ``w = relu(x)^p`` renormalised:
  the re-weighting needs the *complete* ``Z_i`` before the first weight, so it is two passes:
  one over the key blocks for ``Z_i`` (no values), then an online softmax over the logits
  ``g = p log x`` (on ``x > 0``) with ``y = sum exp(g - m) v / (sum exp(g - m) + eps)`` (eps after
  the max shift, as the reference). Saved: ``Z_i, m_i`` and the sum. Its backward needs one more
  row reduction ``R_i = sum_j (dL/da_ij) a_ij`` (a pass over the key blocks) before the weights'
  gradient, because every ``f_ij`` reaches the output through ``Z_i``.

Visibility per block comes from positions, never from a ``T x T`` array: causal
(``pos_j <= pos_i``, top-left aligned when the lengths differ, as ``softmax.causal_mask``),
sliding window (``pos_i - pos_j < window``, optionally keeping the first ``num_global``
positions, StreamingLLM's sink tokens), padded keys, a user mask (sliced per block; a
key-padding mask ``[batch, 1, 1, k_length]`` costs O(T)), segment ids (packed sequences). Bias
is a function of the positions (ALiBi slopes, or any ``bias_fn``), evaluated per block.

Ragged lengths are padded to a multiple of the block and masked. Block sizes are a frozen
:class:`BlockSizes` with per-backend defaults (:meth:`BlockSizes.get_default`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.attention.common import as_int, check_qkv, per_head, shape_str
from zoo.attention.rope import logn_scale

Array = jax.Array
VARIANTS = ("softmax", "sigmoid", "lssa", "lssar")
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise core.

    ``block_q`` queries and ``block_k`` keys per block (capped at the lengths, so short inputs
    are one block); ``q_parallel`` query blocks processed at once (``lax.map``'s batch size:
    1 = one after another, which lets a causal or windowed loop skip blocks; more = parallel
    work for GPUs/TPUs). Numerics do not depend on them.
    """

    block_q: int = 256
    block_k: int = 512
    q_parallel: int = 1

    def __post_init__(self):
        for name in ("block_q", "block_k", "q_parallel"):
            object.__setattr__(self, name, as_int(f"block_sizes.{name}", getattr(self, name), allow_none=False))

    @classmethod
    def get_default(cls, platform: str | None = None) -> BlockSizes:
        """The defaults for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``; default: the backend)."""
        if platform is None:
            p = jax.default_backend()
            platform = "gpu" if p in ("cuda", "rocm", "gpu") else p
        return _DEFAULT_BLOCKS.get(platform, _DEFAULT_BLOCKS["cpu"])


# CPU: measured in benchmarks/softmax_long.py (blocks that stay in cache, one query block at a
# time so causal/windowed loops skip work). GPU/TPU: matmul-unit sized tiles, many query blocks
# in parallel.
_DEFAULT_BLOCKS = {
    "cpu": BlockSizes(256, 512, 1),
    "gpu": BlockSizes(128, 128, 64),
    "tpu": BlockSizes(512, 512, 16),
}


# ----------------------------------------------------------------------------- static spec


@dataclasses.dataclass(frozen=True)
class _Spec:
    variant: str
    causal: bool
    window: int | None
    num_global: int
    global_window: int | None  # the window the num_global positions still obey (None: none)
    bq: int
    bk: int
    qpar: int
    tq: int  # true lengths (arrays are padded to multiples of the blocks)
    tk: int
    heads: int
    kv_heads: int
    explicit_kpos: bool  # key positions given as an array (cache slots): no block skipping
    mask_shape: tuple[int, ...] | None  # [Bm, Hm, Tqm, Tkm] (each 1 or full, padded)
    has_seg: bool
    bias_fn: Callable[..., Any] | None  # (q_pos [bq], k_pos [bk], params) -> [1 or heads, bq, bk]
    eps: float
    power: float

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def skips(self) -> bool:
        """Whether the loops may skip key blocks by index (contiguous positions, no globals)."""
        return not self.explicit_kpos and not (self.window is not None and self.num_global)


class _Aux(NamedTuple):
    """Non-differentiable inputs of the core."""

    pos0: Array  # [] int32: position of query 0 and (contiguous keys) key 0
    kpos: Array | None  # [Tk_pad] int32 key positions (-1: empty) when explicit
    mask: Array | None  # bool [Bm, Hm, Tqm, Tkm]
    qseg: Array | None  # [B, Tq_pad] int32
    kseg: Array | None  # [B, Tk_pad] int32
    n: Array | None  # lssar: visible counts, broadcastable [B?, Hk?, G?, Tq_pad]
    delta: Array | None  # lssar: [Tq_pad]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sl(x: Array, start: Any, size: int, axis: int) -> Array:
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _k_range(spec: _Spec, q0: Any, tk_pad: int) -> tuple[Any, Any]:
    """First key index and number of key blocks the query block at ``q0`` visits."""
    nk = tk_pad // spec.bk
    if spec.skips() and spec.window is not None:
        span = _cdiv(spec.window + spec.bq - 1, spec.bk) * spec.bk
        if span < tk_pad:
            return jnp.clip(q0 - spec.window + 1, 0, tk_pad - span), span // spec.bk
    if spec.causal and not spec.explicit_kpos:
        return 0, jnp.minimum(nk, (q0 + spec.bq - 1) // spec.bk + 1)
    return 0, nk


def _q_range(spec: _Spec, k0: Any, tq_pad: int) -> tuple[Any, Any]:
    """First query index and number of query blocks that can see the key block at ``k0``."""
    nq = tq_pad // spec.bq
    if spec.skips() and spec.window is not None:
        span = _cdiv(spec.bk + spec.window - 1, spec.bq) * spec.bq
        if span < tq_pad:
            return jnp.clip(k0, 0, tq_pad - span), span // spec.bq
    if spec.causal and not spec.explicit_kpos:
        first = jnp.minimum(k0 // spec.bq, nq)
        return first * spec.bq, nq - first
    return 0, nq


def _visible(spec: _Spec, aux: _Aux, q0: Any, k0: Any) -> tuple[Array, Array, Array]:
    """Boolean visibility of the block (broadcastable to ``[B, Hk, G, bq, bk]``) and positions."""
    qpos = aux.pos0 + q0 + jnp.arange(spec.bq, dtype=jnp.int32)
    if spec.explicit_kpos:
        kpos = _sl(aux.kpos, k0, spec.bk, 0)
        valid = kpos >= 0
    else:
        kidx = k0 + jnp.arange(spec.bk, dtype=jnp.int32)
        kpos = aux.pos0 + kidx
        valid = kidx < spec.tk
    vis = jnp.broadcast_to(valid[None, :], (spec.bq, spec.bk))
    if spec.causal:
        vis = vis & (kpos[None, :] <= qpos[:, None])
    if spec.window is not None:
        near = (qpos[:, None] - kpos[None, :]) < spec.window
        if spec.num_global:
            glob = kpos[None, :] < spec.num_global
            if spec.global_window is not None:
                glob = glob & ((qpos[:, None] - kpos[None, :]) < spec.global_window)
            near = near | glob
        vis = vis & near
    vis = vis[None, None, None]
    if aux.mask is not None:
        m = aux.mask
        if m.shape[2] > 1:
            m = _sl(m, q0, spec.bq, 2)
        if m.shape[3] > 1:
            m = _sl(m, k0, spec.bk, 3)
        hm = m.shape[1] > 1
        m = m.reshape(m.shape[0], spec.kv_heads if hm else 1, spec.groups if hm else 1, m.shape[2], m.shape[3])
        vis = vis & m
    if aux.qseg is not None:
        qs = _sl(aux.qseg, q0, spec.bq, 1)
        ks = _sl(aux.kseg, k0, spec.bk, 1)
        vis = vis & (qs[:, None, None, :, None] == ks[:, None, None, None, :])
    return vis, qpos, kpos


def _heads5(x: Array, spec: _Spec) -> Array:
    """``[1 or heads, bq, bk] -> [1, Hk or 1, G or 1, bq, bk]``."""
    if x.shape[0] == spec.heads and spec.heads > 1:
        return x.reshape(1, spec.kv_heads, spec.groups, *x.shape[1:])
    return x.reshape(1, 1, 1, *x.shape[1:])


def _scores(spec: _Spec, qb: Array, kb: Array, qpos: Array, kpos: Array, bparams: Any) -> Array:
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=_F32)
    if spec.bias_fn is not None:
        s = s + _heads5(spec.bias_fn(qpos, kpos, bparams).astype(_F32), spec)
    return s


def _pv(p: Array, vb: Array) -> Array:
    return jnp.einsum("bhgqk,bhke->bhgqe", p.astype(vb.dtype), vb, preferred_element_type=_F32)


def _row(x: Any, q0: Any, bq: int) -> Any:
    """Slice of a per-row array ``[..., Tq_pad]`` (None passes)."""
    return None if x is None else _sl(x, q0, bq, x.ndim - 1)


def _q_major(spec: _Spec, nq: int, tk_pad: int, init: Callable, body: Callable) -> Any:
    """``lax.map`` over query blocks of a loop over the key blocks each visits; the per-block
    results ``[..., bq, *rest]`` (query axis 3) are put back in order ``[..., nq * bq, *rest]``."""

    def per_block(i):
        q0 = i * spec.bq
        start, count = _k_range(spec, q0, tk_pad)
        return lax.fori_loop(0, count, lambda j, c: body(q0, start + j * spec.bk, c), init(q0))

    batch = None if spec.qpar <= 1 else min(spec.qpar, nq)
    outs = lax.map(per_block, jnp.arange(nq, dtype=jnp.int32), batch_size=batch)

    def merge(x):  # [nq, B, Hk, G, bq, ...] -> [B, Hk, G, nq * bq, ...]
        x = jnp.moveaxis(x, 0, 3)
        return x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], *x.shape[5:])

    return jax.tree.map(merge, outs)


# ----------------------------------------------------------------------------- forward


def _lssar_x(spec: _Spec, f: Array, z: Array, n: Array, delta: Array) -> Array:
    return n[..., None] * (f / (z[..., None] + spec.eps)) - delta[..., None]


def _forward(spec: _Spec, diff: tuple, aux: _Aux) -> tuple[Array, Array, tuple]:
    q, k, v, sink, sb, bp = diff
    b, hk, g, tq_pad, _ = q.shape
    tk_pad, e = k.shape[2], v.shape[-1]
    nq = tq_pad // spec.bq
    shape = (b, hk, g, spec.bq)
    neg = jnp.full(shape, -jnp.inf, _F32)
    zeros = jnp.zeros(shape, _F32)
    acc0 = jnp.zeros(shape + (e,), _F32)

    def blocks(q0, k0):
        vis, qpos, kpos = _visible(spec, aux, q0, k0)
        kb, vb = _sl(k, k0, spec.bk, 2), _sl(v, k0, spec.bk, 2)
        s = _scores(spec, _sl(q, q0, spec.bq, 3), kb, qpos, kpos, bp)
        return s, vis, vb

    def online(m, tot, acc, s, vis, vb):
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        return m_new, tot * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + _pv(p, vb)

    z_all = None
    if spec.variant == "lssar":  # pass 1: the complete softplus normaliser of every row
        def z_body(q0, k0, z):
            s, vis, _ = blocks(q0, k0)
            return z + jnp.sum(jnp.where(vis, jax.nn.softplus(s), 0.0), axis=-1)

        z_all = _q_major(spec, nq, tk_pad, lambda q0: zeros, z_body)

    def init(q0):
        if spec.variant == "softmax":
            m0 = neg if sink is None else jnp.broadcast_to(sink[None, :, :, None], shape).astype(_F32)
            return m0, (zeros if sink is None else jnp.ones(shape, _F32)), acc0
        if spec.variant == "lssar":
            return neg, zeros, acc0
        return zeros, acc0

    def body(q0, k0, c):
        s, vis, vb = blocks(q0, k0)
        if spec.variant == "softmax":
            return online(*c, s, vis, vb)
        if spec.variant == "sigmoid":
            z, acc = c
            return z, acc + _pv(jnp.where(vis, jax.nn.sigmoid(s + sb), 0.0), vb)
        if spec.variant == "lssa":
            z, acc = c
            f = jnp.where(vis, jax.nn.softplus(s), 0.0)
            return z + jnp.sum(f, axis=-1), acc + _pv(f, vb)
        # lssar: online softmax over g = p log x where x > 0
        x = _lssar_x(spec, jax.nn.softplus(s), _row(z_all, q0, spec.bq), _row(aux.n, q0, spec.bq),
                     _row(aux.delta, q0, spec.bq))
        pos = vis & (x > 0)
        gl = spec.power * jnp.log(jnp.where(pos, x, 1.0))
        return online(*c, gl, pos, vb)

    st = _q_major(spec, nq, tk_pad, init, body)
    if spec.variant == "softmax":
        m, tot, acc = st
        ok = tot > 0
        out = acc / jnp.where(ok, tot, 1.0)[..., None]
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        lse = m_safe + jnp.log(jnp.where(ok, tot, 1.0))
        # residual: +inf for a row that sees nothing (its weights exp(l - inf) are 0); output: -inf
        return out, jnp.where(ok, lse, -jnp.inf), (jnp.where(ok, lse, jnp.inf),)
    if spec.variant == "sigmoid":
        return st[1], jnp.zeros(st[0].shape, _F32), ()
    if spec.variant == "lssa":
        z, acc = st
        return acc / (z[..., None] + spec.eps), jnp.zeros(z.shape, _F32), (z,)
    m, tot, acc = st
    out = acc / (tot[..., None] + spec.eps)
    return out, jnp.zeros(m.shape, _F32), (z_all, jnp.where(jnp.isfinite(m), m, 0.0), tot)


# ----------------------------------------------------------------------------- backward


def _backward(spec: _Spec, diff: tuple, aux: _Aux, out: Array, stats: tuple, dout: Array, dlse: Array):
    q, k, v, sink, sb, bp = diff
    b, hk, g, tq_pad, d = q.shape
    tk_pad, e = k.shape[2], v.shape[-1]
    nq, nk = tq_pad // spec.bq, tk_pad // spec.bk
    do = dout.astype(_F32)
    dl_row = jnp.sum(do * out, axis=-1)  # dO_i . y_i
    if spec.variant == "softmax":
        dl_row = dl_row - dlse.astype(_F32)

    def blocks(q0, k0):
        vis, qpos, kpos = _visible(spec, aux, q0, k0)
        kb, vb = _sl(k, k0, spec.bk, 2), _sl(v, k0, spec.bk, 2)
        qb, dob = _sl(q, q0, spec.bq, 3), _sl(do, q0, spec.bq, 3)
        s = _scores(spec, qb, kb, qpos, kpos, bp)
        dp = jnp.einsum("bhgqe,bhke->bhgqk", dob, vb, preferred_element_type=_F32)
        return s, vis, qb, kb, vb, dob, dp, qpos, kpos

    def lssar_parts(s, vis, dp, q0):
        z, m, tot = (_row(x, q0, spec.bq) for x in stats)
        n, delta = _row(aux.n, q0, spec.bq), _row(aux.delta, q0, spec.bq)
        f = jax.nn.softplus(s)
        a = f / (z[..., None] + spec.eps)
        x = n[..., None] * a - delta[..., None]
        pos = vis & (x > 0)
        xs = jnp.where(pos, x, 1.0)
        w = jnp.where(pos, jnp.exp(spec.power * jnp.log(xs) - m[..., None]) / (tot[..., None] + spec.eps), 0.0)
        da = jnp.where(pos, n[..., None] * spec.power / xs * w * (dp - _row(dl_row, q0, spec.bq)[..., None]), 0.0)
        return w, da, a, z

    r_all = None
    if spec.variant == "lssar":  # R_i = sum_j dL/da_ij a_ij, needed before any weight gradient
        def r_body(q0, k0, r):
            s, vis, _, _, _, _, dp, _, _ = blocks(q0, k0)
            _, da, a, _ = lssar_parts(s, vis, dp, q0)
            return r + jnp.sum(jnp.where(vis, da * a, 0.0), axis=-1)

        r_all = _q_major(spec, nq, tk_pad, lambda q0: jnp.zeros((b, hk, g, spec.bq), _F32), r_body)

    def grads(q0, k0):
        """(weights W applied to v, dS = dL/dlogits) of the block."""
        s, vis, qb, kb, vb, dob, dp, qpos, kpos = blocks(q0, k0)
        dl = _row(dl_row, q0, spec.bq)[..., None]
        if spec.variant == "softmax":
            w = jnp.where(vis, jnp.exp(s - _row(stats[0], q0, spec.bq)[..., None]), 0.0)
            ds = w * (dp - dl)
        elif spec.variant == "sigmoid":
            p = jax.nn.sigmoid(s + sb)
            w = jnp.where(vis, p, 0.0)
            ds = w * (1.0 - p) * dp
        elif spec.variant == "lssa":
            r = 1.0 / (_row(stats[0], q0, spec.bq)[..., None] + spec.eps)
            w = jnp.where(vis, jax.nn.softplus(s), 0.0) * r
            ds = jnp.where(vis, (dp - dl) * r * jax.nn.sigmoid(s), 0.0)
        else:
            w, da, _, z = lssar_parts(s, vis, dp, q0)
            df = (da - _row(r_all, q0, spec.bq)[..., None]) / (z[..., None] + spec.eps)
            ds = jnp.where(vis, df * jax.nn.sigmoid(s), 0.0)
        return w, ds, qb, kb, dob, qpos, kpos

    def bias_grad(ds, qpos, kpos, dbp):
        hb = jax.eval_shape(lambda p: spec.bias_fn(qpos, kpos, p), bp).shape[0]
        ct = jnp.sum(ds, axis=0)  # over batch -> [Hk, G, bq, bk]
        ct = ct.reshape(spec.heads, spec.bq, spec.bk) if hb == spec.heads and spec.heads > 1 else \
            jnp.sum(ct, axis=(0, 1))[None]
        _, vjp = jax.vjp(lambda p: spec.bias_fn(qpos, kpos, p).astype(_F32), bp)
        return jax.tree.map(jnp.add, dbp, vjp(ct.astype(_F32))[0])

    track_bias = spec.bias_fn is not None and bp is not None and jax.tree_util.tree_leaves(bp)

    def per_kblock(carry, j):
        dq, dsb, dbp = carry
        k0 = j * spec.bk
        start, count = _q_range(spec, k0, tq_pad)

        def body(i, c):
            dk_a, dv_a, dq, dsb, dbp = c
            q0 = start + i * spec.bq
            w, ds, qb, kb, dob, qpos, kpos = grads(q0, k0)
            dv_a = dv_a + jnp.einsum("bhgqk,bhgqe->bhke", w, dob, preferred_element_type=_F32)
            dk_a = dk_a + jnp.einsum("bhgqk,bhgqd->bhkd", ds, qb, preferred_element_type=_F32)
            dq_blk = _sl(dq, q0, spec.bq, 3) + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kb, preferred_element_type=_F32)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_blk, q0, 3)
            if dsb is not None:
                dsb = dsb + jnp.sum(ds)
            if track_bias:
                dbp = bias_grad(ds, qpos, kpos, dbp)
            return dk_a, dv_a, dq, dsb, dbp

        init = (jnp.zeros((b, hk, spec.bk, d), _F32), jnp.zeros((b, hk, spec.bk, e), _F32), dq, dsb, dbp)
        dk_a, dv_a, dq, dsb, dbp = lax.fori_loop(0, count, body, init)
        return (dq, dsb, dbp), (dk_a, dv_a)

    dsb0 = None if sb is None else jnp.zeros((), _F32)
    dbp0 = jax.tree.map(lambda x: jnp.zeros(x.shape, _F32), bp) if track_bias else None
    (dq, dsb, dbp), (dks, dvs) = lax.scan(
        per_kblock, (jnp.zeros(q.shape, _F32), dsb0, dbp0), jnp.arange(nk, dtype=jnp.int32))
    dk = jnp.moveaxis(dks, 0, 2).reshape(b, hk, tk_pad, d)
    dv = jnp.moveaxis(dvs, 0, 2).reshape(b, hk, tk_pad, e)
    dsink = None
    if sink is not None:
        p_sink = jnp.exp(sink[None, :, :, None].astype(_F32) - stats[0])
        dsink = (-jnp.sum(p_sink * dl_row, axis=(0, 3))).astype(sink.dtype)
    if dsb is not None:
        dsb = dsb.astype(sb.dtype)
    if bp is not None:
        dbp = jax.tree.map(lambda gr, x: gr.astype(x.dtype), dbp, bp) if track_bias else \
            jax.tree.map(jnp.zeros_like, bp)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsink, dsb, dbp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(spec: _Spec, diff: tuple, aux: _Aux) -> tuple[Array, Array]:
    out, lse, _ = _forward(spec, diff, aux)
    return out, lse


def _core_fwd(spec, diff, aux):
    out, lse, stats = _forward(spec, diff, aux)
    return (out, lse), (diff, aux, out, stats)


def _core_bwd(spec, res, cts):
    diff, aux, out, stats = res
    dout, dlse = cts
    return _backward(spec, diff, aux, out, stats, dout, dlse), None


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- counts


def _counts(spec: _Spec, aux: _Aux, b: int, tq_pad: int, tk_pad: int) -> Array:
    """Number of keys each query sees, ``[B or 1, Hk or 1, G or 1, Tq_pad]`` float32 (a pass over
    the visited blocks summing the visibility; no logits)."""
    bv = b if (aux.qseg is not None or (aux.mask is not None and aux.mask.shape[0] > 1)) else 1
    hm = aux.mask is not None and aux.mask.shape[1] > 1
    shape = (bv, spec.kv_heads if hm else 1, spec.groups if hm else 1, spec.bq)

    def body(q0, k0, n):
        vis, _, _ = _visible(spec, aux, q0, k0)
        return n + jnp.broadcast_to(jnp.sum(vis, axis=-1, dtype=_F32), shape)

    return _q_major(spec, tq_pad // spec.bq, tk_pad, lambda q0: jnp.zeros(shape, _F32), body)


def _analytic_counts(tq: int, tk: int, causal: bool, window: int | None) -> Array:
    """Visible keys per query without masks: ``|[max(0, i - w + 1), min(i, Tk - 1)]|`` (causal)."""
    i = np.arange(tq)
    if not causal:
        return jnp.full((tq,), float(tk), _F32)
    lo = np.zeros_like(i) if window is None else np.maximum(0, i - window + 1)
    return jnp.asarray(np.maximum(0, np.minimum(i, tk - 1) - lo + 1), _F32)


# ----------------------------------------------------------------------------- public API


def _alibi_bias(qpos: Array, kpos: Array, slopes: Array) -> Array:
    return -slopes[:, None, None] * jnp.abs(qpos[:, None] - kpos[None, :]).astype(_F32)


def _user_bias(fn: Callable, qpos: Array, kpos: Array, params: Any) -> Array:
    x = jnp.asarray(fn(qpos, kpos))
    return x[None] if x.ndim == 2 else x


def _sum_bias(fns: tuple, qpos: Array, kpos: Array, params: Any) -> Array:
    out = None
    for fn, p in zip(fns, params):
        x = fn(qpos, kpos, p).astype(_F32)
        out = x if out is None else out + x
    return out


def logn_factor(n: Array, train_length: int | None, kind: str = "ratio") -> Array | float:
    """Entropy-invariant logit factor from the visible count ``n``: ``"ratio"`` (Chiang & Cholak
    2022, Entropy-ABF): ``max(1, log n / log T_train)``; ``"sqrt"`` (Jin et al., NeurIPS 2023):
    ``sqrt(log n / log T_train)``, not clamped (below the training length it flattens)."""
    if train_length is None:
        return 1.0
    return logn_scale(jnp.maximum(n, 1.0), train_length, kind)


def _mask4(mask: Any, b: int, h: int, tq: int, tk: int) -> Array:
    m = jnp.asarray(mask).astype(bool)
    if m.ndim > 4:
        raise ValueError(f"mask must broadcast to [batch, heads, q_length, k_length] = [{b}, {h}, {tq}, {tk}]; "
                         f"got {shape_str(m)}")
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    full = (b, h, tq, tk)
    if any(s not in (1, f) for s, f in zip(m.shape, full)):
        raise ValueError(f"mask must broadcast to [batch, heads, q_length, k_length] = [{b}, {h}, {tq}, {tk}]; "
                         f"got {shape_str(m)}")
    return m


def _segments(segment_ids: Any, b: int, tq: int, tk: int) -> tuple[Array, Array]:
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be [batch, length] or a pair (q_ids [batch, q_length], "
                             f"kv_ids [batch, k_length]); got a sequence of {len(segment_ids)}")
        qs, ks = (jnp.asarray(x) for x in segment_ids)
    else:
        qs = ks = jnp.asarray(segment_ids)
    if qs.shape != (b, tq) or ks.shape != (b, tk) or not jnp.issubdtype(qs.dtype, jnp.integer) \
            or not jnp.issubdtype(ks.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer [batch, length] = [{b}, {tq}] (or a pair with kv ids "
                         f"[{b}, {tk}]); got {shape_str(qs)}, {shape_str(ks)}")
    return qs.astype(jnp.int32), ks.astype(jnp.int32)


def attention(
    q: Array, k: Array, v: Array, *,
    variant: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    mask: Array | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    sink_logit: Array | None = None,
    logn_train_length: int | None = None,
    logn_kind: str = "ratio",
    alibi_slopes: Array | None = None,
    bias_fn: Callable[[Array, Array], Array] | None = None,
    sigmoid_bias: Any = None,
    power: float = 15.0,
    delta: float = 1.0,
    eps: float = 1e-8,
    block_sizes: BlockSizes | None = None,
    kv_positions: Array | None = None,
    q_position: Any = 0,
    num_global: int = 0,
    global_window: int | None = None,
    counts: Array | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Blockwise attention of the softmax family (module docstring); equals the quadratic forms
    of ``zoo.attention.softmax`` (:func:`~zoo.attention.softmax.softmax_naive` etc.).

    Args:
      q ``[batch, q_length, heads, head_dim]``; k ``[batch, k_length, kv_heads, head_dim]``;
      v ``[batch, k_length, kv_heads, value_dim]`` (grouped-query: k/v heads are never repeated).
      variant: ``"softmax"``, ``"sigmoid"``, ``"lssa"`` or ``"lssar"`` (softplus, re-weighted).
      causal: key j visible to query i iff ``j <= i`` (top-left aligned for other lengths).
      scale: logit scale (default ``1/sqrt(head_dim)``; softplus variants use L2-normalised q, k
        and ``log d * log n_i`` instead).
      window: causal sliding window, query i sees ``i - window < j <= i``; only the key blocks
        inside it are visited (cost O(T window)).
      mask: bool broadcastable to ``[batch, heads, q_length, k_length]`` (True = visible).
      segment_ids: int ``[batch, length]`` (self-attention) or a pair ``(q_ids [batch, q_length],
        kv_ids [batch, k_length])``: a key is visible only to queries of its segment.
      sink_logit: ``[heads]`` learned sink logit (softmax).
      logn_train_length / logn_kind: entropy-invariant scaling by :func:`logn_factor` of the
        number of keys each query sees.
      alibi_slopes: ``[heads]``, bias ``-slope_h |pos_i - pos_j|`` (ALiBi, Press et al. 2022;
        differentiable). bias_fn: ``(q_pos [n], k_pos [m]) -> [heads or 1, n, m]`` (or ``[n, m]``)
        additive logits evaluated per block (a constant function of the positions).
      sigmoid_bias: sigmoid's ``b`` (default ``-log(k_length)``).
      power / delta / eps: LSSA/LSSAR constants (``delta`` applies from the fourth position on).
      block_sizes: :class:`BlockSizes` (default :meth:`BlockSizes.get_default`).
      kv_positions: ``[k_length]`` int positions of the keys (-1 = empty slot; a KV cache), else
        ``q_position + arange(k_length)``; q_position: position of query 0 (may be traced).
      num_global: keys at positions ``< num_global`` stay visible outside the window (while
        inside ``global_window`` when given): StreamingLLM's sink tokens on a cache.
      counts: ``[q_length]`` number of keys each query sees, for log-n / softplus scaling, when
        the keys given are only part of what it sees (merged partial results); default: counted.
      return_lse: softmax only: also return the log-sum-exp ``[batch, q_length, heads]`` of each
        row (``+inf`` for a row that sees nothing), differentiable (merging partial results).

    Returns ``[batch, q_length, heads, value_dim]`` in ``v.dtype`` (computed in float32).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not valid; expected one of {', '.join(map(repr, VARIANTS))}")
    if logn_kind not in ("ratio", "sqrt"):
        raise ValueError(f"logn_kind={logn_kind!r} is not valid; expected 'ratio' or 'sqrt'")
    h, hk, g = check_qkv(q, k, v)
    b, tq, _, d = q.shape
    tk, e = k.shape[1], v.shape[-1]
    window = as_int("window", window)
    if window is not None and not causal:
        raise ValueError("window needs causal=True (a sliding window looks back from each query)")
    num_global = as_int("num_global", num_global, minimum=0, allow_none=False)
    global_window = as_int("global_window", global_window)
    logn_train_length = as_int("logn_train_length", logn_train_length)
    if logn_train_length == 1:
        raise ValueError("logn_train_length must be >= 2 (log 1 = 0)")
    if block_sizes is None:
        block_sizes = BlockSizes.get_default()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes; got {type(block_sizes).__name__}")
    bq, bk = min(block_sizes.block_q, tq), min(block_sizes.block_k, tk)
    tq_pad, tk_pad = _cdiv(tq, bq) * bq, _cdiv(tk, bk) * bk

    # Non-differentiable inputs, padded.
    mask4 = None
    if mask is not None:
        mask4 = _mask4(mask, b, h, tq, tk)
        pads = [(0, 0), (0, 0), (0, tq_pad - tq if mask4.shape[2] > 1 else 0),
                (0, tk_pad - tk if mask4.shape[3] > 1 else 0)]
        mask4 = jnp.pad(mask4, pads)
    qseg = kseg = None
    if segment_ids is not None:
        qseg, kseg = _segments(segment_ids, b, tq, tk)
        qseg = jnp.pad(qseg, ((0, 0), (0, tq_pad - tq)), constant_values=-1)
        kseg = jnp.pad(kseg, ((0, 0), (0, tk_pad - tk)), constant_values=-2)
    kpos = None
    if kv_positions is not None:
        kpos = jnp.asarray(kv_positions, jnp.int32)
        if kpos.shape != (tk,):
            raise ValueError(f"kv_positions must be [k_length={tk}] ints; got {shape_str(kpos)}")
        kpos = jnp.pad(kpos, (0, tk_pad - tk), constant_values=-1)
    pos0 = jnp.asarray(q_position, jnp.int32)

    fns, params = [], []
    if alibi_slopes is not None:
        fns.append(_alibi_bias)
        params.append(per_head("alibi_slopes", alibi_slopes, h))
    if bias_fn is not None:
        if not callable(bias_fn):
            raise ValueError(f"bias_fn must be a callable (q_pos, k_pos) -> [heads or 1, n, m]; got {bias_fn!r}")
        fns.append(functools.partial(_user_bias, bias_fn))
        params.append(None)
    if fns and variant != "softmax":
        raise ValueError(f"alibi_slopes / bias_fn are options of the softmax variant; got variant={variant!r}")
    spec_bias = functools.partial(_sum_bias, tuple(fns)) if fns else None
    bp = tuple(params) if fns else None

    spec = _Spec(
        variant=variant, causal=bool(causal), window=window, num_global=num_global,
        global_window=global_window if num_global else None, bq=bq, bk=bk,
        qpar=block_sizes.q_parallel, tq=tq, tk=tk, heads=h, kv_heads=hk, explicit_kpos=kpos is not None,
        mask_shape=None if mask4 is None else tuple(mask4.shape), has_seg=qseg is not None,
        bias_fn=spec_bias, eps=float(eps), power=float(power),
    )
    aux = _Aux(pos0, kpos, mask4, qseg, kseg, None, None)

    need_n = variant in ("lssa", "lssar") or (variant == "softmax" and logn_train_length is not None)
    n = None
    if need_n and counts is not None:
        counts = jnp.asarray(counts, _F32)
        if counts.shape != (tq,):
            raise ValueError(f"counts must be [q_length={tq}]; got {shape_str(counts)}")
        n = jnp.pad(counts, (0, tq_pad - tq))[None, None, None]
    elif need_n:
        if mask4 is None and qseg is None and kpos is None:
            n = jnp.pad(_analytic_counts(tq, tk, causal, window), (0, tq_pad - tq))[None, None, None]
        else:
            n = _counts(spec, aux, b, tq_pad, tk_pad)

    # [B, T, H, D] -> [B, Hk, G, T, D]
    q5 = jnp.moveaxis(q.reshape(b, tq, hk, g, d), 1, 3)
    k4, v4 = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    if variant in ("lssa", "lssar"):
        l2 = lambda x: x.astype(_F32) / jnp.maximum(jnp.linalg.norm(x.astype(_F32), axis=-1, keepdims=True), 1e-12)
        q5 = jnp.pad(l2(q5), ((0, 0),) * 3 + ((0, tq_pad - tq), (0, 0)))
        q5 = q5 * (math.log(d) * jnp.log(jnp.maximum(n, 1.0)))[..., None]
        k4 = l2(k4)
    else:
        s = 1.0 / math.sqrt(d) if scale is None else scale
        fac = s if n is None else s * logn_factor(n, logn_train_length, logn_kind)[..., None]
        q5 = jnp.pad(q5, ((0, 0),) * 3 + ((0, tq_pad - tq), (0, 0)))
        q5 = (q5.astype(_F32) * fac).astype(q.dtype) if n is not None else (q5 * s).astype(q.dtype)
    k4 = jnp.pad(k4, ((0, 0), (0, 0), (0, tk_pad - tk), (0, 0)))
    v4 = jnp.pad(v4, ((0, 0), (0, 0), (0, tk_pad - tk), (0, 0)))

    sink = None
    if sink_logit is not None:
        if variant != "softmax":
            raise ValueError(f"sink_logit is an option of the softmax variant; got variant={variant!r}")
        sink = per_head("sink_logit", sink_logit, h).reshape(hk, g)
    sb = None
    if variant == "sigmoid":
        sb = jnp.asarray(-math.log(tk) if sigmoid_bias is None else sigmoid_bias, _F32)
        if sb.ndim != 0:
            raise ValueError(f"sigmoid_bias must be a scalar; got {shape_str(sb)}")
    if variant == "lssar":
        qidx = jnp.arange(tq_pad) + pos0
        aux = aux._replace(n=jnp.broadcast_to(n, n.shape), delta=jnp.where(qidx < 3, 0.0, float(delta)).astype(_F32))

    out, lse = _core(spec, (q5, k4, v4, sink, sb, bp), aux)
    out = jnp.moveaxis(out[:, :, :, :tq], 3, 1).reshape(b, tq, h, e).astype(v.dtype)
    if return_lse:
        if variant != "softmax":
            raise ValueError("return_lse needs variant='softmax'")
        return out, jnp.moveaxis(lse[:, :, :, :tq], 3, 1).reshape(b, tq, h)
    return out
