"""DeltaNet and Gated DeltaNet: linear attention whose state learns by the delta rule.

Per head, with the state ``S [key_dim, value_dim]`` (flash-linear-attention's layout), writing
strengths ``beta_t`` and (Gated DeltaNet) decay factors ``a_t = exp(-rate_t)``:

    S_t = a_t S_{t-1} - beta_t k_t (k_t^T a_t S_{t-1} - v_t^T)
        = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t

i.e. one step of gradient descent with learning rate ``beta_t`` on ``1/2 ||S^T k_t - v_t||^2`` (the
Miras "l2 attentional bias, GD" instance; with the decay, "l2 retention"). ``decay=None`` (all
rates 0) is DeltaNet; a rate of ``+inf`` is a hard reset (``a_t = 0``: the state restarts at
``beta_t k_t v_t^T``).

Forms (all equal; float32 inside, outputs in ``v.dtype``):

- :func:`deltanet`, the chunk-parallel WY / UT form (Yang et al. 2024, Sec. 3; Gated DeltaNet
  Sec. 3.3), exact at every chunk size ``C`` (a ragged last chunk is padded with ``beta = 0``,
  ``k = 0``, rate 0 tokens, which change nothing). Per chunk (rows are tokens, ``G`` the
  inclusive cumulative log-decay inside the chunk, ``Gamma_ij = exp(G_i - G_j)`` for ``i >= j``,
  ``S`` the state at the chunk start):

      A  = StrictTril(diag(beta) (K K^T * Gamma))      T = (I + A)^{-1}  (unit lower-triangular solve)
      W  = T diag(beta) (K * e^G)                       U = T diag(beta) V
      U' = U - W S
      O  = (Q * e^G) S + Tril(Q K^T * Gamma) U'
      S <- e^{G_C} S + (K * e^{G_C - G})^T U'

  The chunk-local parts (``A``, ``T``, ``W``, ``U``, ``Tril(Q K^T * Gamma)``) are batched over all
  chunks; only the state recursion (``U' = U - W S``, ``S <- ...``) runs in a ``jax.lax.scan`` over
  chunks, whose gradient stores one state per chunk (memory O(T/C * Dk * Dv + T * C)); the
  outputs are then one batched product. ``T`` is computed as fla's ``solve_tril`` does: forward
  substitution on 16-row diagonal blocks, merged pairwise by matmuls, with the derivative
  ``dT = -T dA T`` (:func:`unit_lower_inverse`; the autodiff of ``solve_triangular`` is ~100x
  slower on CPU).
  Numerics: ``Gamma`` is never a difference of cumulative sums: each entry is the segment sum
  ``sum_{j<u<=i} g_u`` (Mamba-2's ``segsum``: a cumulative sum over a lower-triangular masked
  copy), so it is exact and ``<= 0``; ``e^G`` and ``e^{G_C - G}`` are a prefix and a suffix sum
  (no subtraction). Every exponent is ``<= 0`` and masked before ``exp``: nothing overflows, and
  rates ``0`` and ``+inf`` (``-inf`` log-decays, only ever added) are exact and finite, with
  finite gradients. ``impl="scan"`` is the token recurrence (:func:`deltanet_naive`'s scan).
- :func:`deltanet_naive`, the obviously right reference: ``jax.lax.scan`` over tokens applying the
  recurrence above literally.
- :func:`init_state` / :func:`step`: one-token decoding on a :class:`DeltaNetState`;
  ``deltanet(..., initial_state=, return_state=True)`` continues from any state (prefill).

Arguments: ``beta`` a scalar, ``[heads]`` or ``[batch, length, heads]`` in ``[0, 2]`` (the papers
use ``sigmoid`` of a projection, in ``(0, 1)``; ``2`` is the stability limit for unit keys);
``decay`` rates ``>= 0`` (``+inf`` allowed) of the same shapes. Concrete values are checked
(ValueError naming the argument for a wrong shape, a value out of range or NaN); both are
differentiable. Default ``beta`` (None): ``1 / key_dim``, which for unit-variance keys makes
``beta |k|^2 ~ 1`` (the papers' ``beta -> 1`` with l2-normalised keys); the layers
(:mod:`zoo.nn.deltanet`) pass the papers' data-dependent ``beta``.

Queries are used as given unless ``scale`` is set (fla's kernels multiply q by
``key_dim ** -0.5``: pass ``scale=key_dim ** -0.5`` to match them); keys are used as given (the
papers' layers l2-normalise them, which keeps ``|beta k_i^T k_j| <= 1`` and the solve well
conditioned). Causal only. k/v may have fewer heads than q (grouped-query: repeated; the state is
per query head).

Papers: Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (NeurIPS 2024); Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule" (ICLR 2025); Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast
Weight Programmers" (ICML 2021).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention import registry
from zoo.attention.common import (
    as_int,
    check_qkv,
    check_range,
    check_state,
    check_token,
    chunk,
    per_head,
    repeat_kv,
    shape_str,
    unchunk,
)
from zoo.attention.registry import Implementation

Array = jax.Array

FAMILY = "deltanet"
DEFAULT_CHUNK = 64
BETA_RANGE = (0.0, 2.0)


class DeltaNetState(NamedTuple):
    """Recurrent state of (Gated) DeltaNet.

    S: ``[batch, heads, key_dim, value_dim]`` float32 (fla's layout: ``o_t = S_t^T q_t``).
    """

    S: Array


def init_state(batch: int, heads: int, head_dim: int, value_dim: int | None = None) -> DeltaNetState:
    """Empty decoding state (zeros) for ``heads`` query heads; sizes may be NumPy integers."""
    batch, heads, head_dim = (as_int(n, x, allow_none=False) for n, x in
                              (("batch", batch), ("heads", heads), ("head_dim", head_dim)))
    value_dim = head_dim if value_dim is None else as_int("value_dim", value_dim, allow_none=False)
    return DeltaNetState(jnp.zeros((batch, heads, head_dim, value_dim), jnp.float32))


# ----------------------------------------------------------------------------- checks


def _per_token(name: str, x: Any, b: int, t: int, h: int, lo: float, hi: float | None, inf_ok: bool) -> Array:
    """A scalar, ``[heads]`` or ``[batch, length, heads]`` -> ``[batch, length, heads]`` float32;
    ValueError naming ``name`` for another shape or (concrete values) out of ``[lo, hi]`` / NaN."""
    check_range(name, x, lo, hi, inf_ok=inf_ok)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim <= 1:
        try:
            return jnp.broadcast_to(per_head(name, x, h), (b, t, h))
        except ValueError:
            pass
    elif x.shape == (b, t, h):
        return x
    raise ValueError(
        f"{name} must be a scalar, [heads={h}] or [batch={b}, length={t}, heads={h}] (one per token and "
        f"head); got {shape_str(x)}"
    )


def _per_head_token(name: str, x: Any, b: int, h: int, lo: float, hi: float | None, inf_ok: bool) -> Array:
    """One token's value: a scalar, ``[heads]`` or ``[batch, heads]`` -> ``[batch, heads]`` float32."""
    check_range(name, x, lo, hi, inf_ok=inf_ok)
    x = jnp.asarray(x, jnp.float32)
    if x.shape == (b, h):
        return x
    if x.ndim <= 1:
        try:
            return jnp.broadcast_to(per_head(name, x, h), (b, h))
        except ValueError:
            pass
    raise ValueError(f"{name} must be a scalar, [heads={h}] or [batch={b}, heads={h}] (one token); got {shape_str(x)}")


def _beta(beta: Any, b: int, t: int, h: int, d: int) -> Array:
    if beta is None:
        return jnp.full((b, t, h), 1.0 / d, jnp.float32)
    return _per_token("beta", beta, b, t, h, *BETA_RANGE, inf_ok=False)


def _log_decay(decay: Any, b: int, t: int, h: int) -> Array | None:
    """Rates -> log-decay ``g = -rate <= 0`` ``[B, T, H]`` (``-inf``: reset), or None."""
    if decay is None:
        return None
    return -_per_token("decay", decay, b, t, h, 0.0, None, inf_ok=True)


def _prepare(q, k, v, causal, scale):
    if causal is not True:
        raise ValueError(f"deltanet is causal only (a recurrence): pass causal=True; got causal={causal!r}")
    _, _, groups = check_qkv(q, k, v, causal=True)
    f32 = jnp.float32
    q, k, v = q.astype(f32), repeat_kv(k, groups).astype(f32), repeat_kv(v, groups).astype(f32)
    if scale is not None:
        q = q * scale
    return q, k, v


def _start(initial_state: Any, b: int, h: int, dk: int, dv: int) -> Array:
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), jnp.float32)
    if not isinstance(initial_state, DeltaNetState) and getattr(initial_state, "ndim", None) == 4:
        initial_state = DeltaNetState(initial_state)  # a bare [B, H, Dk, Dv] array (fla's h0)
    return check_state(initial_state, DeltaNetState, DeltaNetState((b, h, dk, dv))).S


# ----------------------------------------------------------------------------- cores
# Every core: q, k [B, T, H, Dk], v [B, T, H, Dv], beta [B, T, H], g [B, T, H] log-decay or None,
# s0 [B, H, Dk, Dv] (all float32) -> (o [B, T, H, Dv], final state [B, H, Dk, Dv]).


def _token_update(s, q_t, k_t, v_t, b_t, g_t):
    """One token of the recurrence on ``s [B, H, Dk, Dv]`` (``q_t, k_t [B, H, Dk]``, ``v_t [B, H, Dv]``,
    ``b_t, g_t [B, H]``): decay, then ``S - beta k (k^T S - v^T)``, then ``o = S^T q``."""
    if g_t is not None:
        s = jnp.exp(g_t)[..., None, None] * s
    err = jnp.einsum("bhk,bhkv->bhv", k_t, s) - v_t  # k^T S - v^T
    s = s - b_t[..., None, None] * k_t[..., :, None] * err[..., None, :]
    return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)


def _core_scan(q, k, v, beta, g, s0):
    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(beta, 1, 0),
          None if g is None else jnp.moveaxis(g, 1, 0))

    def body(s, x):
        return _token_update(s, *x)

    s, o = jax.lax.scan(body, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


def _segsum(g: Array) -> Array:
    """``g [..., C]`` -> ``[..., C, C]`` with ``[i, j] = sum_{j<u<=i} g_u`` for ``i >= j`` (0 above the
    diagonal): each entry summed directly (a cumulative sum over a strictly-lower masked copy),
    never a difference of cumulative sums, so it is exact, ``<= 0`` for ``g <= 0`` and has no
    ``inf - inf`` for ``g = -inf``."""
    c = g.shape[-1]
    x = jnp.broadcast_to(g[..., :, None], g.shape + (c,))  # x[..., u, j] = g_u
    x = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), x, 0.0)  # keep u > j
    return jnp.cumsum(x, axis=-2)


def _forward_substitution(a: Array) -> Array:
    """``(I + a)^{-1}`` of strictly lower-triangular ``a [..., n, n]`` row by row (fla's loop):
    ``T_i = e_i - a_i T`` with T's later rows still identity rows, which ``a_i`` does not reach."""
    n = a.shape[-1]
    t = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
    for i in range(1, n):
        row = -jnp.einsum("...j,...jk->...k", a[..., i, :], t)
        t = t.at[..., i, :].set(row.at[..., i].set(1.0))
    return t


_BASE = 16  # diagonal blocks inverted by forward substitution


def _block_inverse(a: Array) -> Array:
    """``(I + a)^{-1}`` for strictly lower-triangular ``a [..., n, n]``: forward substitution on the
    diagonal blocks of ``_BASE`` rows (batched), then pairwise merges
    ``[[T11, 0], [-T22 L21 T11, T22]]`` (matmuls; fla's ``solve_tril`` does the same with 16-row
    blocks). ``n`` is padded to ``_BASE * 2^m`` with zeros (identity rows, which change nothing)."""
    n = a.shape[-1]
    if n <= _BASE:
        return _forward_substitution(a)
    size = _BASE * 2 ** math.ceil(math.log2(n / _BASE))
    if size != n:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - n), (0, size - n)])
    nb = size // _BASE
    blk = lambda r, c, w: a[..., r * w:(r + 1) * w, c * w:(c + 1) * w]
    blocks = _forward_substitution(jnp.stack([blk(i, i, _BASE) for i in range(nb)], -3))
    w = _BASE
    while w < size:
        t11, t22 = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        l21 = jnp.stack([blk(2 * j + 1, 2 * j, w) for j in range(blocks.shape[-3] // 2)], -3)
        t21 = -(t22 @ l21 @ t11)
        blocks = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                                  jnp.concatenate([t21, t22], -1)], -2)
        w *= 2
    return blocks[..., 0, :n, :n]


@jax.custom_jvp
def unit_lower_inverse(a: Array) -> Array:
    """``T = (I + StrictTril(a))^{-1}`` ``[..., n, n]`` (the UT transform's triangular solve), by
    blocks (:func:`_block_inverse`); derivative ``dT = -T StrictTril(da) T`` (matmuls: the
    autodiff of a triangular solve is slow on CPU)."""
    return _block_inverse(jnp.tril(a, -1))


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    t = unit_lower_inverse(a)
    return t, -(t @ jnp.tril(da, -1) @ t)


def _core_chunked(q, k, v, beta, g, s0, chunk_size: int):
    t = q.shape[1]
    c = min(chunk_size, t)

    def blocks(x):  # [B, T, H, ...] -> [n, B, H, C, ...] (ragged end padded with zeros)
        x, _ = chunk(x, c, axis=1)  # [B, n, C, H, ...]
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    qc, kc, vc, bc = blocks(q), blocks(k), blocks(v), blocks(beta)  # padding: beta = k = 0
    lower = jnp.tril(jnp.ones((c, c), bool))
    kk = jnp.einsum("...id,...jd->...ij", kc, kc)
    qk = jnp.einsum("...id,...jd->...ij", qc, kc)
    if g is None:
        qg, kd, w_rhs = qc, kc, kc
        decay_end = None
    else:
        gc = blocks(g)  # padding: g = 0 (no decay)
        seg = _segsum(gc)
        gamma = jnp.where(lower, jnp.exp(jnp.where(lower, seg, 0.0)), 0.0)  # masked before exp
        kk, qk = kk * gamma, qk * gamma
        prefix = jnp.cumsum(gc, axis=-1)  # G_i: from the chunk start to i (inclusive), <= 0
        suffix = jnp.concatenate(  # G_C - G_i = sum_{u > i} g_u, summed directly
            [jnp.flip(jnp.cumsum(jnp.flip(gc[..., 1:], -1), -1), -1), jnp.zeros_like(gc[..., :1])], -1)
        e_prefix = jnp.exp(prefix)[..., None]
        qg, kd, w_rhs = qc * e_prefix, kc * jnp.exp(suffix)[..., None], kc * e_prefix
        decay_end = jnp.exp(prefix[..., -1])  # e^{G_C} [n, B, H]
    a = bc[..., :, None] * jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), kk, 0.0)
    tinv = unit_lower_inverse(a)  # T = (I + A)^{-1}
    w = tinv @ (bc[..., None] * w_rhs)  # W = T diag(beta) (K e^G)
    u = tinv @ (bc[..., None] * vc)  # U = T diag(beta) V

    def body(s, xs):  # the state recursion only; everything else is batched over chunks
        w_r, u_r, k_r, e_r = xs
        u_r = u_r - w_r @ s  # U' = U - W S
        s_next = s if e_r is None else e_r[..., None, None] * s
        return s_next + jnp.swapaxes(k_r, -1, -2) @ u_r, (s, u_r)

    s, (s_start, u_new) = jax.lax.scan(body, s0, (w, u, kd, decay_end))
    attn = jnp.where(lower, qk, 0.0)  # Tril(Q K^T * Gamma), diagonal included
    o = qg @ s_start + attn @ u_new  # (Q e^G) S + Tril(Q K^T * Gamma) U'   [n, B, H, C, Dv]
    o = unchunk(jnp.moveaxis(jnp.moveaxis(o, 3, 2), 0, 1), t, axis=1)  # -> [B, n, C, H, Dv] -> [B, T, H, Dv]
    return o, s


# Family "deltanet": fn(q, k, v, beta, g, s0, *, chunk_size) -> (o, final state).


def _impl_chunked(q, k, v, beta, g, s0, *, chunk_size):
    return _core_chunked(q, k, v, beta, g, s0, chunk_size or DEFAULT_CHUNK)


def _impl_scan(q, k, v, beta, g, s0, *, chunk_size):
    return _core_scan(q, k, v, beta, g, s0)


registry.register_impl(FAMILY, Implementation("chunked", _impl_chunked), overwrite=True)
registry.register_impl(FAMILY, Implementation("scan", _impl_scan), overwrite=True)
# benchmarks/RESULTS.md (DeltaNet section): for training (forward + backward) the chunked form is
# several times faster than the token scan on CPU; the scan is faster for a forward pass alone on
# CPU (impl="scan" there for inference).
registry.set_preference(FAMILY, {"cpu": ("chunked", "scan"), "gpu": ("chunked", "scan"), "tpu": ("chunked", "scan")})


# ----------------------------------------------------------------------------- public API


def deltanet(
    q: Array, k: Array, v: Array, *,
    beta: Any = None,
    decay: Any = None,
    scale: float | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
    initial_state: DeltaNetState | Array | None = None,
    return_state: bool = False,
    impl: str | Sequence[str] = "auto",
) -> Array | tuple[Array, DeltaNetState]:
    """(Gated) DeltaNet ``S_t = a_t S_{t-1} - beta_t k_t (k_t^T a_t S_{t-1} - v_t^T)``,
    ``o_t = S_t^T q_t`` with ``a_t = exp(-rate_t)`` (module docstring).

    Args:
      q: ``[batch, length, heads, key_dim]``.
      k: ``[batch, length, kv_heads, key_dim]`` (``heads % kv_heads == 0``), used as given (the
        papers l2-normalise keys in the layer).
      v: ``[batch, length, kv_heads, value_dim]``.
      beta: writing strengths in ``[0, 2]``: a scalar, ``[heads]`` or ``[batch, length, heads]``
        (default ``1 / key_dim``).
      decay: Gated DeltaNet's rates ``>= 0`` (factor ``exp(-rate)`` applied to the state before the
        update; ``+inf``: reset), same shapes as ``beta``; None: DeltaNet (no decay). fla's
        log-decay ``g`` is ``-rate``.
      scale: multiplies q (none by default; fla's kernels use ``key_dim ** -0.5``).
      causal: must be True (causal only; False by default like every zoo transform).
      chunk_size: chunk length of the chunked form (default 64; any value gives the same
        numbers; lengths below it use one chunk).
      initial_state: a :class:`DeltaNetState` (or a bare ``[batch, heads, key_dim, value_dim]``
        array) to continue from. return_state: also return the final :class:`DeltaNetState`.
      impl: ``"auto"`` (the chunked form), ``"chunked"``, ``"scan"`` (token recurrence) or an
        ordered tuple of them (``zoo.attention.implementations("deltanet")``).

    Returns ``[batch, length, heads, value_dim]`` in ``v.dtype`` (computed in float32), and the
    final state when ``return_state``.
    """
    chunk_size = as_int("chunk_size", chunk_size)
    q32, k32, v32 = _prepare(q, k, v, causal, scale)
    b, t, h, dk = q32.shape
    bt = _beta(beta, b, t, h, dk)
    g = _log_decay(decay, b, t, h)
    form = registry.resolve(FAMILY, impl)
    s0 = _start(initial_state, b, h, dk, v32.shape[-1])
    o, s = form.fn(q32, k32, v32, bt, g, s0, chunk_size=chunk_size)
    o = o.astype(v.dtype)
    return (o, DeltaNetState(s)) if return_state else o


def deltanet_naive(
    q: Array, k: Array, v: Array, *, beta: Any = None, decay: Any = None, scale: float | None = None,
    causal: bool = False, initial_state: DeltaNetState | Array | None = None, return_state: bool = False,
) -> Array | tuple[Array, DeltaNetState]:
    """Reference: the recurrence applied token by token (``jax.lax.scan``): decay the state, one
    delta-rule step, read ``o_t = S_t^T q_t``. Same arguments and result as :func:`deltanet`."""
    q32, k32, v32 = _prepare(q, k, v, causal, scale)
    b, t, h, dk = q32.shape
    o, s = _core_scan(q32, k32, v32, _beta(beta, b, t, h, dk), _log_decay(decay, b, t, h),
                      _start(initial_state, b, h, dk, v32.shape[-1]))
    o = o.astype(v.dtype)
    return (o, DeltaNetState(s)) if return_state else o


def gated_deltanet(q: Array, k: Array, v: Array, **options: Any) -> Array | tuple[Array, DeltaNetState]:
    """Gated DeltaNet: :func:`deltanet` with ``decay`` rates (``a_t = exp(-decay_t)``)."""
    return deltanet(q, k, v, **options)


def step(
    state: DeltaNetState, q_t: Array, k_t: Array, v_t: Array, *,
    beta: Any = None, decay: Any = None, scale: float | None = None,
) -> tuple[Array, DeltaNetState]:
    """One decoding step: ``q_t [batch, heads, key_dim]``, ``k_t [batch, kv_heads, key_dim]``,
    ``v_t [batch, kv_heads, value_dim]``; ``beta`` / ``decay``: a scalar, ``[heads]`` or
    ``[batch, heads]``. Returns ``(o_t [batch, heads, value_dim], new_state)``."""
    _, _, groups = check_token(q_t, k_t, v_t)
    b, h, dk = q_t.shape
    f32 = jnp.float32
    q, k, v = q_t.astype(f32), jnp.repeat(k_t, groups, axis=1).astype(f32), jnp.repeat(v_t, groups, axis=1).astype(f32)
    if scale is not None:
        q = q * scale
    bt = (jnp.full((b, h), 1.0 / dk, f32) if beta is None
          else _per_head_token("beta", beta, b, h, *BETA_RANGE, inf_ok=False))
    g = None if decay is None else -_per_head_token("decay", decay, b, h, 0.0, None, inf_ok=True)
    s0 = _start(state, b, h, dk, v.shape[-1])
    s, o = _token_update(s0, q, k, v, bt, g)
    return o.astype(v_t.dtype), DeltaNetState(s)


__all__ = ["DEFAULT_CHUNK", "DeltaNetState", "deltanet", "deltanet_naive", "gated_deltanet", "init_state", "step"]
