"""Linear attention (Katharopoulos et al. 2020) with Lightning-Attention-2 chunking and decay.

With feature maps ``phi_q, phi_k`` (``zoo.attention.feature_maps``) and per-step decay
``lambda_t = exp(-rate_t)`` (``rate_t >= 0``; constant per head for Lightning / TransNormer, or
per token for gated linear attention; ``rate = +inf`` is a hard reset, ``lambda = 0``), causal
linear attention is the recurrence

    S_t = lambda_t S_{t-1} + phi_k(k_t) v_t^T          z_t = lambda_t z_{t-1} + phi_k(k_t)
    y_t = phi_q(q_t)^T S_t / (phi_q(q_t)^T z_t + eps)    (normalize=True)
    y_t = phi_q(q_t)^T S_t                               (normalize=False)

i.e. ``y_i = sum_{j<=i} prod_{j<u<=i} lambda_u (phi_q(q_i).phi_k(k_j)) v_j / (...)``.

Per-channel decay (GLA, Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
Training", ICML 2024): ``decay [batch, length, heads, feature_dim]`` gives every key feature its
own factor, ``S_t = diag(lambda_t) S_{t-1} + phi_k(k_t) v_t^T`` (and ``z`` alike), i.e.
``y_i = sum_{j<=i} (sum_f phi_q(q_i)_f phi_k(k_j)_f prod_{j<u<=i} lambda_{u,f}) v_j / (...)``.
Registered as ``"gla"``: the identity feature map, no normaliser (``normalize=False``). Non-causal
attention uses the full sums. There is no 1/sqrt(d) scaling unless ``scale`` is given (as in
the original papers). ``normalize="mean"`` divides numerator and denominator by the number of
keys seen before adding eps (NaLaFormer's ``mean`` normaliser).

Implementations (``impl=``; registered as the ``"linear"`` family of
``zoo.attention.registry``), all equal to the naive masked quadratic reference
:func:`linear_naive`, all exact at rates 0 and ``+inf``:

- ``"chunked"``: Lightning Attention-2 (Qin et al. 2024): quadratic inside a chunk of
  ``chunk_size`` tokens, a KV state carried between chunks (computed for all chunks at once and
  prefix-combined with :func:`zoo.attention.common.affine_scan`); any length (ragged last chunk
  padded with zero keys and no decay); memory O(T/C * F * Dv). Decay products inside a chunk are
  ``exp`` of differences of cumulative *finite* log-decays, zeroed where a reset lies between
  (never ``inf - inf``). Per-channel decay runs chunks of at most ``SUB_CHUNK`` = 16 tokens (GLA's
  secondary chunk; a larger ``chunk_size`` means 16): inside a chunk
  the pairwise ``sum_f q_tf k_sf exp(B_tf - B_sf)`` (a ``[C, C, F]`` product, ``s <= t``), every
  exponent ``<= 0`` (masked before ``exp``; never ``exp(-B)``, which reaches ``lambda^-C``), and
  the state carried between chunks as above; memory O(T * 16 * F). (GLA's kernels also tile a
  primary chunk into 16-token sub-blocks joined by matmuls against the sub-block's first row;
  on XLA:CPU that form's gradient crashes the compiler (jax 0.10.2, two sub-blocks), and the
  state between 16-token chunks carries the same information.)
- ``"scan"``: the token recurrence above as one ``jax.lax.scan`` (O(F * Dv) state); its
  gradient is the chunked form's VJP (same function; differentiating the scan would store every
  state).
- ``"pallas"``: the tiled kernels of ``kernels_pallas.linear_attention`` (GPU/TPU; Pallas
  interpret mode on CPU when named explicitly), inside ``shard_map`` over the active mesh
  (``zoo.attention.dispatch``). Takes a per-head decay only (not per token or per channel:
  ``"auto"`` then picks an XLA form), and gives no decay gradient.

``impl`` is a name, an ordered tuple of names (the first that can take the options) or
``"auto"``: the per-platform preference (CPU: scan, chunked; GPU/TPU: pallas, chunked), the
choice logged once. The decay is a constant by default (``learn_decay=False``: no gradient flows
to it in any form, so every implementation computes the same function and gradient, and a
decay stored in a model, traced under ``jit``, still reaches the kernel); ``learn_decay=True``
makes it differentiable in every form and so excludes the kernel.

Decoding uses :func:`init_state` / :func:`step` with the explicit state ``(S, z, count)``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention import dispatch, registry
from zoo.attention import feature_maps as fmaps
from zoo.attention.common import (
    affine_scan,
    as_int,
    check_positive_int,
    check_qkv,
    check_range,
    check_state,
    check_token,
    chunk,
    repeat_kv,
    shape_str,
    unchunk,
)
from zoo.attention.registry import Implementation

Array = jax.Array

FAMILY = "linear"
DEFAULT_CHUNK = 64


class LinearState(NamedTuple):
    """Recurrent state of causal linear attention.

    S: ``[batch, heads, feature_dim, value_dim]`` sum of decayed ``phi(k) v^T`` (float32).
    z: ``[batch, heads, feature_dim]`` sum of decayed ``phi(k)`` (float32).
    count: ``[batch]`` int32 number of tokens consumed (for ``normalize="mean"``).
    """

    S: Array
    z: Array
    count: Array


def alibi_slopes(heads: int) -> Array:
    """Per-head decay rates ``s_h`` (ALiBi slopes, as Lightning Attention's ``_build_slope_tensor``):
    ``2^(-8h/H)`` for ``h = 1..H``, interleaved when ``H`` is not a power of two. Use as
    ``decay=alibi_slopes(H)`` (``lambda_h = exp(-s_h)``)."""
    heads = as_int("heads", heads, allow_none=False)

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        s = pow2(heads)
    else:
        c = 2 ** math.floor(math.log2(heads))
        s = pow2(c) + pow2(2 * c)[0::2][: heads - c]
    return jnp.asarray(s, jnp.float32)


def feature_dim(feature_map: Any, head_dim: int, feature_map_params: Any = None) -> int:
    """Feature dimension that ``feature_map`` gives for ``head_dim`` inputs."""
    fm = fmaps.get(feature_map)
    d = fm.dim(head_dim)
    if d is not None:
        return d
    pk = feature_map_params[1] if isinstance(feature_map_params, tuple) else feature_map_params
    w = pk.get("weight") if isinstance(pk, dict) else None
    heads = w.shape[0] if w is not None and w.ndim == 3 else 1
    out = jax.eval_shape(lambda x: fm.key(x, pk), jax.ShapeDtypeStruct((1, heads, head_dim), jnp.float32))
    return out.shape[-1]


def init_state(
    batch: int, heads: int, head_dim: int, value_dim: int | None = None, *,
    feature_map: Any = "elu", feature_map_params: Any = None,
) -> LinearState:
    """Empty decoding state for ``heads`` query heads (float32); sizes may be NumPy integers."""
    batch, heads, head_dim = (as_int(n, x, allow_none=False) for n, x in
                              (("batch", batch), ("heads", heads), ("head_dim", head_dim)))
    value_dim = as_int("value_dim", value_dim)
    f = feature_dim(feature_map, head_dim, feature_map_params)
    e = head_dim if value_dim is None else value_dim
    return LinearState(
        jnp.zeros((batch, heads, f, e), jnp.float32),
        jnp.zeros((batch, heads, f), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
    )


# ----------------------------------------------------------------------------- helpers


def _rates(decay: Any, b: int, t: int, h: int, learn_decay: bool, f: int | None = None) -> Array | None:
    """Decay rates (``>= 0``, ``+inf`` allowed): a scalar or ``[H]`` -> ``[H]``; ``[B, T, H]`` per
    token or ``[B, T, H, F]`` per token and key feature (GLA; ``f`` the feature dimension) as is;
    float32, without gradient unless ``learn_decay``."""
    if decay is None:
        return None
    check_range("decay", decay, lo=0.0, inf_ok=True)
    d = jnp.asarray(decay, jnp.float32)
    if d.ndim == 0 or d.shape == (h,):
        d = jnp.broadcast_to(d, (h,))
    elif d.shape != (b, t, h) and not (f is not None and d.shape == (b, t, h, f)):
        fdim = "feature_dim" if f is None else f"feature_dim={f}"
        raise ValueError(
            f"decay must be a scalar, [heads={h}] (rate per head), [batch={b}, length={t}, heads={h}] "
            f"(rate per token) or [batch={b}, length={t}, heads={h}, {fdim}] (per token and key "
            f"feature, GLA); got {shape_str(d)}"
        )
    return d if learn_decay else jax.lax.stop_gradient(d)


def _log_decay(rates: Array | None, b: int, t: int, h: int) -> Array | None:
    """Rates ``[H]``, ``[B, T, H]`` or ``[B, T, H, F]`` -> log-decay ``g = -rate`` ``[B, T, H]``
    (``[B, T, H, F]`` per channel; ``-inf``: reset)."""
    if rates is None:
        return None
    return -rates if rates.ndim == 4 else jnp.broadcast_to(-rates, (b, t, h))


def _prepare(q, k, v, *, causal, feature_map, feature_map_params, scale, normalize, eps):
    _, _, groups = check_qkv(q, k, v, causal=causal)
    if normalize not in (True, False, "mean"):
        raise ValueError(f"normalize must be True, False or 'mean'; got {normalize!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    f32 = jnp.float32
    q, k = q.astype(f32), k.astype(f32)
    if scale is not None:
        q = q * scale
    fq, fk = fmaps.apply(feature_map, q, k, feature_map_params)
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map gives q features {fq.shape[-1]} != k features {fk.shape[-1]}")
    # A column of ones appended to v carries the normaliser z through every form.
    va = jnp.concatenate([v.astype(f32), jnp.ones(v.shape[:-1] + (1,), f32)], axis=-1)
    return fq, fk, va


def _finish(num: Array, counts: Array | None, *, normalize, eps, dtype) -> Array:
    y, den = num[..., :-1], num[..., -1:]
    if normalize == "mean":
        y = y / (den + eps * counts)
    elif normalize:
        y = y / (den + eps)
    return y.astype(dtype)


def _check_state(state: Any, b: int, h: int, f: int, e: int) -> LinearState:
    return check_state(state, LinearState, LinearState((b, h, f, e), (b, h, f), (b,)), cast=None)


def _aug_state(state: LinearState | None, b, h, f, e) -> Array:
    if state is None:
        return jnp.zeros((b, h, f, e + 1), jnp.float32)
    state = _check_state(state, b, h, f, e)
    return jnp.concatenate([state.S, state.z[..., None]], axis=-1).astype(jnp.float32)


def _split_state(sa: Array, count: Array) -> LinearState:
    return LinearState(sa[..., :-1], sa[..., -1], count)


# ----------------------------------------------------------------------------- causal cores
# All cores take fq, fk [B, T, H, F], va [B, T, H, E], g [B, T, H] log-decay, or [B, T, H, F] per
# key feature (or None; -inf is a reset), s0 [B, H, F, E], and return (num [B, T, H, E], final
# state [B, H, F, E]).


def _core_scan(fq, fk, va, g, s0):
    per_channel = g is not None and g.ndim == 4

    def body(s, xs):
        q_t, k_t, v_t, g_t = xs
        if g_t is not None:
            s = (jnp.exp(g_t)[..., None] if per_channel else jnp.exp(g_t)[..., None, None]) * s
        s = s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhf,bhfe->bhe", q_t, s)

    tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    s_final, num = jax.lax.scan(body, s0, (tm(fq), tm(fk), tm(va), tm(g)))
    return jnp.moveaxis(num, 0, 1), s_final


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core_scan_fast_grad(fq, fk, va, g, s0, chunk: int):
    """The token scan forward (fastest on CPU) with the chunked form's backward: both compute the
    same function, and differentiating the scan itself stores every ``[F, E]`` state (20x slower
    on CPU at training sizes), while the chunked VJP recomputes from chunk states."""
    return _core_scan(fq, fk, va, g, s0)


def _scan_fwd(fq, fk, va, g, s0, chunk):
    return _core_scan(fq, fk, va, g, s0), (fq, fk, va, g, s0)


def _scan_bwd(chunk, res, ct):
    _, vjp = jax.vjp(lambda *a: _core_chunked(*a, chunk), *res)
    return vjp(ct)


_core_scan_fast_grad.defvjp(_scan_fwd, _scan_bwd)


SUB_CHUNK = 16  # per-channel decay: chunks of at most GLA's secondary chunk (fla's BC = min(16, BT))


def _chunk_cumulative(g: Array) -> tuple[Array, Array]:
    """Log-decay ``g [..., C, ...]`` (axis 2 of ``[B, N, C, H, .]``; ``-inf`` = reset) -> the
    inclusive cumulative sum of its finite part and the running count of resets: the decay over
    ``(s, t]`` is ``exp(cg_t - cg_s)`` where the counts agree and 0 where they differ."""
    reset = jnp.isneginf(g)
    return jnp.cumsum(jnp.where(reset, 0.0, g), axis=2), jnp.cumsum(reset.astype(jnp.int32), axis=2)


def _seg(cg_to: Array, cr_to: Array, cg_from: Array, cr_from: Array) -> Array:
    """``prod_{from<u<=to} lambda_u = exp(cg_to - cg_from)`` (argument masked to 0 before ``exp``,
    then 0 where a reset lies between); the callers only pass ``to >= from`` (exponent ``<= 0``)."""
    keep = cr_to == cr_from
    return jnp.where(keep, jnp.exp(jnp.where(keep, cg_to - cg_from, 0.0)), 0.0)


def _intra_per_channel(fq, fk, g):
    """Intra-chunk scores ``A [B, N, H, C, C]`` with ``A_ts = sum_f q_tf k_sf prod_{s<u<=t}
    lambda_uf`` for ``s <= t`` (else 0): the pairwise ``[C, C, F]`` decays, each exponent masked
    to ``s <= t`` (so ``<= 0``) before ``exp``.

    fq, fk, g: ``[B, N, C, H, F]`` (g the log-decay, ``-inf`` = reset)."""
    c = fq.shape[2]
    cg, cr = _chunk_cumulative(g)
    tri = jnp.tril(jnp.ones((c, c), bool))[:, :, None, None]  # [t, s, 1, 1]
    w = _seg(cg[:, :, :, None], cr[:, :, :, None], cg[:, :, None], cr[:, :, None])  # [B, N, t, s, H, F]
    w = jnp.where(tri, w, 0.0)
    return jnp.einsum("bnthf,bnshf,bntshf->bnhts", fq, fk, w)


def _core_chunked_channel(fq, fk, va, g, s0, chunk_size: int):
    """The chunked form with per-channel log-decay ``g [B, T, H, F]`` (GLA), in chunks of at most
    ``SUB_CHUNK`` tokens (module docstring)."""
    b, t, h, f = fq.shape
    c = min(chunk_size, t, SUB_CHUNK)
    fq, fk, va, gc = (chunk(x, c)[0] for x in (fq, fk, va, g))  # [B, N, C, H, .]; pads: g = 0
    a = _intra_per_channel(fq, fk, gc)
    cg, cr = _chunk_cumulative(gc)
    last_g, last_r = cg[:, :, -1:], cr[:, :, -1:]
    kw = fk * _seg(last_g, last_r, cg, cr)  # each key decayed to the chunk end
    chunk_decay = jnp.where(last_r[:, :, 0] == 0, jnp.exp(last_g[:, :, 0]), 0.0)  # [B, N, H, F]
    q_dec = fq * jnp.where(cr == 0, jnp.exp(cg), 0.0)  # each query decayed from the chunk start
    intra = jnp.einsum("bnhrs,bnshe->bnrhe", a, va)
    delta = jnp.einsum("bnshf,bnshe->bnhfe", kw, va)
    acc_a, acc_b = affine_scan(chunk_decay, delta, axis=1)  # a [B, N, H, F] scales the rows
    s_after = acc_a[..., None] * s0[:, None] + acc_b
    s_before = jnp.concatenate([s0[:, None], s_after[:, :-1]], axis=1)
    inter = jnp.einsum("bnrhf,bnhfe->bnrhe", q_dec, s_before)
    return unchunk(intra + inter, t), s_after[:, -1]


def _core_chunked(fq, fk, va, g, s0, chunk_size: int):
    if g is not None and g.ndim == 4:
        return _core_chunked_channel(fq, fk, va, g, s0, chunk_size)
    b, t, h, f = fq.shape
    c = min(chunk_size, t)
    # Padded keys/values are zero and padded steps do not decay (g = 0), so the state is exact.
    fq, fk, va = (chunk(x, c)[0] for x in (fq, fk, va))  # [B, N, C, H, .]
    n = fq.shape[1]
    mask = jnp.tril(jnp.ones((c, c), bool))
    a = jnp.einsum("bnrhf,bnshf->bnhrs", fq, fk)
    if g is None:
        a = jnp.where(mask, a, 0.0)
        kw = fk
        chunk_decay = jnp.ones((b, n, h), jnp.float32)
        q_dec = None
    else:
        # prod_{s<u<=r} lambda_u = exp(cg_r - cg_s) with cg the cumulative *finite* log-decay,
        # and 0 when a reset (g = -inf) lies in (s, r], i.e. when the reset counts differ. No
        # inf - inf, and every exp argument is <= 0 where it is used (no overflow in the VJP).
        gc = chunk(g, c)[0]  # [B, N, C, H]
        reset = jnp.isneginf(gc)
        cg = jnp.cumsum(jnp.where(reset, 0.0, gc), axis=2)
        cr = jnp.cumsum(reset.astype(jnp.int32), axis=2)
        cgh, crh = jnp.moveaxis(cg, 2, 3), jnp.moveaxis(cr, 2, 3)  # [B, N, H, C]
        keep = mask & (crh[..., :, None] == crh[..., None, :])
        a = jnp.where(keep, a * jnp.exp(jnp.where(keep, cgh[..., :, None] - cgh[..., None, :], 0.0)), 0.0)
        last_g, last_r = cg[:, :, -1:], cr[:, :, -1:]
        kw = fk * jnp.where(cr == last_r, jnp.exp(last_g - cg), 0.0)[..., None]  # decay to chunk end
        chunk_decay = jnp.where(last_r[:, :, 0] == 0, jnp.exp(last_g[:, :, 0]), 0.0)  # [B, N, H]
        q_dec = jnp.where(cr == 0, jnp.exp(cg), 0.0)[..., None]  # decay from the chunk start
    intra = jnp.einsum("bnhrs,bnshe->bnrhe", a, va)
    delta = jnp.einsum("bnshf,bnshe->bnhfe", kw, va)  # state contribution of each chunk
    # Prefix-compose the affine maps S -> a_n S + delta_n over chunks (exact, no overflow).
    acc_a, acc_b = affine_scan(chunk_decay, delta, axis=1)
    s_after = acc_a[..., None, None] * s0[:, None] + acc_b  # state after chunk n
    s_before = jnp.concatenate([s0[:, None], s_after[:, :-1]], axis=1)
    inter = jnp.einsum("bnrhf,bnhfe->bnrhe", fq, s_before)
    if q_dec is not None:
        inter = q_dec * inter
    return unchunk(intra + inter, t), s_after[:, -1]


# ----------------------------------------------------------------------------- implementations
# Family "linear": fn(fq, fk, va, rates, s0, *, chunk_size, platform) -> (num, final state), with
# rates None, [H] or [B, T, H] (already validated and, unless learn_decay, without gradient).


def _impl_chunked(fq, fk, va, rates, s0, *, chunk_size, platform):
    b, t, h, _ = fq.shape
    return _core_chunked(fq, fk, va, _log_decay(rates, b, t, h), s0, chunk_size or DEFAULT_CHUNK)


def _impl_scan(fq, fk, va, rates, s0, *, chunk_size, platform):
    b, t, h, _ = fq.shape
    return _core_scan_fast_grad(fq, fk, va, _log_decay(rates, b, t, h), s0, chunk_size or DEFAULT_CHUNK)


_TOKENS = ("batch", None, "heads", None)  # [B, T, H, .]
_STATE = ("batch", "heads", None, None)  # [B, H, F, E]


def _impl_pallas(fq, fk, va, rates, s0, *, chunk_size, platform):
    from kernels_pallas import linear_attention as kernel

    backend = "gpu" if platform == "gpu" else "tpu"
    interpret = platform not in ("gpu", "tpu")

    def call(fq, fk, va, rates, s0):
        return kernel.causal_linear_attention_kernel(
            fq, fk, va, rates, s0, backend=backend, interpret=interpret, chunk_size=chunk_size,
        )

    return dispatch.kernel_call(
        call, (fq, fk, va, rates, s0), in_axes=(_TOKENS, _TOKENS, _TOKENS, ("heads",), _STATE),
        out_axes=(_TOKENS, _STATE),
    )


def _pallas_supports(*, decay: Any = None, learn_decay: bool = False, **options: Any) -> str | None:
    if importlib.util.find_spec("kernels_pallas") is None:
        return "kernels_pallas is not importable"
    if decay is not None and jnp.ndim(decay) == 3:
        return "per-token decay [batch, length, heads] (the kernel takes one rate per head)"
    if decay is not None and jnp.ndim(decay) == 4:
        return "per-channel decay [batch, length, heads, feature_dim] (GLA; the kernel takes one rate per head)"
    if decay is not None and learn_decay:
        return "learn_decay=True needs a differentiable decay (the kernel gives no decay gradient)"
    return None


registry.register_impl(FAMILY, Implementation("chunked", _impl_chunked), overwrite=True)
registry.register_impl(FAMILY, Implementation("scan", _impl_scan), overwrite=True)
registry.register_impl(FAMILY, Implementation(
    "pallas", _impl_pallas, platforms=("gpu", "tpu"), interpret=True, supports=_pallas_supports,
), overwrite=True)
# Measured in benchmarks/RESULTS.md: on CPU the token scan beats the chunked form; on matmul
# units (GPU/TPU) the kernel, then the chunked form.
registry.set_preference(FAMILY, {
    "cpu": ("scan", "chunked"), "gpu": ("pallas", "chunked"), "tpu": ("pallas", "chunked"),
})


def resolve_impl(impl: str | Sequence[str] = "auto", *, decay: Any = None, learn_decay: bool = False) -> str:
    """The name of the implementation ``impl`` selects on the default backend for these options
    (``registry.resolve("linear", ...)``; the choice of ``"auto"`` is logged once)."""
    return registry.resolve(FAMILY, impl, decay=decay, learn_decay=learn_decay).name


# ----------------------------------------------------------------------------- public API


def linear(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    feature_map: Any = "elu",
    feature_map_params: Any = None,
    eps: float = 1e-6,
    normalize: bool | str = True,
    decay: Any = None,
    learn_decay: bool = False,
    scale: float | None = None,
    chunk_size: int | None = None,
    impl: str | Sequence[str] = "auto",
    initial_state: LinearState | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, LinearState]:
    """Linear attention ``y_i = phi_q(q_i)^T S_i / (phi_q(q_i)^T z_i + eps)`` (see module docstring).

    Args:
      q: ``[batch, q_length, heads, head_dim]``.
      k: ``[batch, k_length, kv_heads, head_dim]`` (``heads % kv_heads == 0``).
      v: ``[batch, k_length, kv_heads, value_dim]``.
      causal: prefix sums (needs ``q_length == k_length``) instead of full sums.
      feature_map: name in ``feature_maps.names()``, a ``FeatureMap``, a callable or a pair.
      feature_map_params: parameters of a learnable map (or a pair ``(params_q, params_k)``).
      eps: added to the denominator. normalize: True, False or ``"mean"``.
      decay: causal only; rates ``>= 0`` with ``lambda = exp(-rate)`` (``+inf``: a hard reset):
        a scalar or ``[heads]`` (Lightning / TransNormer; see :func:`alibi_slopes`),
        ``[batch, length, heads]`` per token, or ``[batch, length, heads, feature_dim]`` per token
        and key feature (GLA's gates; ``feature_dim`` = the feature map's output size, ``head_dim``
        for the identity map). Concrete values are range-checked.
      learn_decay: False (default): the decay is a constant, no gradient flows to it (in every
        form). True: differentiable in the decay (selects an XLA form; not the kernel).
      scale: multiplies q before the feature map (none by default, as in the papers).
      chunk_size: chunk length of the chunked and Pallas forms (default 64 for the chunked form,
        the kernel's block size for Pallas).
      impl: ``"auto"``, ``"chunked"``, ``"scan"``, ``"pallas"`` or an ordered tuple of them
        (``zoo.attention.implementations("linear")``; the quadratic reference is
        :func:`linear_naive`). Non-causal attention has one form (the full sums).
      initial_state / return_state: causal only; start from / also return a :class:`LinearState`.

    Returns ``[batch, q_length, heads, value_dim]`` in ``v.dtype`` (computed in float32), and the
    final state when ``return_state``.

    Paper: Katharopoulos et al., "Transformers are RNNs" (ICML 2020); chunked form: Qin et al.,
    "Lightning Attention-2" (2024).
    """
    check_positive_int("chunk_size", chunk_size)
    fq, fk, va = _prepare(
        q, k, v, causal=causal, feature_map=feature_map, feature_map_params=feature_map_params,
        scale=scale, normalize=normalize, eps=eps,
    )
    b, tq, h, f = fq.shape
    tk = fk.shape[1]
    on = registry.platform()
    if not causal:
        registry.resolve(FAMILY, impl, on=on)  # validates impl; the full sums are one form
        if decay is not None or initial_state is not None or return_state:
            raise ValueError("decay, initial_state and return_state need causal=True")
        kv = jnp.einsum("bjhf,bjhe->bhfe", fk, va)
        num = jnp.einsum("bihf,bhfe->bihe", fq, kv)
        return _finish(num, jnp.float32(tk), normalize=normalize, eps=eps, dtype=v.dtype)

    rates = _rates(decay, b, tq, h, learn_decay, f)
    form = registry.resolve(FAMILY, impl, on=on, decay=rates, learn_decay=learn_decay)
    s0 = _aug_state(initial_state, b, h, f, va.shape[-1] - 1)
    chunk_size = None if chunk_size is None else int(chunk_size)
    num, s_final = form.fn(fq, fk, va, rates, s0, chunk_size=chunk_size, platform=on)
    c0 = jnp.zeros((b,), jnp.int32) if initial_state is None else initial_state.count
    counts = (c0[:, None] + jnp.arange(1, tq + 1, dtype=jnp.int32)[None, :]).astype(jnp.float32)
    out = _finish(num, counts[:, :, None, None], normalize=normalize, eps=eps, dtype=v.dtype)
    if return_state:
        return out, _split_state(s_final, c0 + tq)
    return out


def linear_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, feature_map: Any = "elu",
    feature_map_params: Any = None, eps: float = 1e-6, normalize: bool | str = True,
    decay: Any = None, learn_decay: bool = False, scale: float | None = None,
) -> Array:
    """Reference: the masked quadratic form ``y = A v / (rowsum(A) + eps)`` with
    ``A_ij = phi_q(q_i).phi_k(k_j) * prod_{j<u<=i} lambda_u * [j <= i]``, the decay product
    taken term by term: 0 when a factor is 0 (a rate of ``+inf``), else ``exp`` of the sum of
    the finite log-decays (per key feature f for a ``[batch, length, heads, feature_dim]`` decay:
    ``A_ij = sum_f phi_q(q_i)_f phi_k(k_j)_f prod_{j<u<=i} lambda_uf``). Obviously right, O(T^2)
    memory (O(T^2 F) per channel), O(T^3) work."""
    fq, fk, va = _prepare(
        q, k, v, causal=causal, feature_map=feature_map, feature_map_params=feature_map_params,
        scale=scale, normalize=normalize, eps=eps,
    )
    b, tq, h, f = fq.shape
    tk = fk.shape[1]
    a = jnp.einsum("bihf,bjhf->bhij", fq, fk)
    if causal:
        a = jnp.where(jnp.tril(jnp.ones((tq, tk), bool)), a, 0.0)
        g = _log_decay(_rates(decay, b, tq, h, learn_decay, f), b, tq, h)
        if g is not None:
            pos = jnp.arange(tq)
            i, j, u = pos[:, None, None], pos[None, :, None], pos[None, None, :]
            between = ((u > j) & (u <= i)).astype(jnp.float32)  # [i, j, u]: u in (j, i]
            reset = jnp.isneginf(g)
            gf, rf = jnp.where(reset, 0.0, g), reset.astype(jnp.float32)
            if g.ndim == 4:  # per key feature: A_ij = sum_f q_if k_jf prod_u lambda_uf
                logw = jnp.einsum("iju,buhf->bhijf", between, gf)
                zeros = jnp.einsum("iju,buhf->bhijf", between, rf)
                w = jnp.where(zeros > 0, 0.0, jnp.exp(logw))
                a = jnp.einsum("bihf,bjhf,bhijf->bhij", fq, fk, w)
                a = jnp.where(jnp.tril(jnp.ones((tq, tk), bool)), a, 0.0)
            else:
                logw = jnp.einsum("iju,buh->bhij", between, gf)
                zeros = jnp.einsum("iju,buh->bhij", between, rf)
                a = a * jnp.where(zeros > 0, 0.0, jnp.exp(logw))
        counts = jnp.arange(1, tq + 1, dtype=jnp.float32)[None, :, None, None]
    else:
        if decay is not None:
            raise ValueError("decay needs causal=True")
        counts = jnp.float32(tk)
    num = jnp.einsum("bhij,bjhe->bihe", a, va)
    return _finish(num, counts, normalize=normalize, eps=eps, dtype=v.dtype)


def step(
    state: LinearState, q_t: Array, k_t: Array, v_t: Array, *,
    feature_map: Any = "elu", feature_map_params: Any = None, eps: float = 1e-6,
    normalize: bool | str = True, decay: Any = None, learn_decay: bool = False, scale: float | None = None,
) -> tuple[Array, LinearState]:
    """One decoding step of causal linear attention.

    ``q_t [batch, heads, head_dim]``, ``k_t [batch, kv_heads, head_dim]``,
    ``v_t [batch, kv_heads, value_dim]``; ``decay``: a scalar, ``[heads]``, ``[batch, heads]`` or
    ``[batch, heads, feature_dim]`` (GLA, per key feature) rates (``+inf``: reset). Returns
    ``(y_t [batch, heads, value_dim], new_state)``: ``S <- lambda S + phi(k) v^T``,
    ``z <- lambda z + phi(k)``, ``y = phi(q)^T S / (phi(q)^T z + eps)``.
    """
    check_token(q_t, k_t, v_t)
    fq, fk, va = _prepare(
        q_t[:, None], k_t[:, None], v_t[:, None], causal=True, feature_map=feature_map,
        feature_map_params=feature_map_params, scale=scale, normalize=normalize, eps=eps,
    )
    b, _, h, f = fq.shape
    s = _aug_state(state, b, h, f, va.shape[-1] - 1)
    if decay is not None:
        d = jnp.asarray(decay, jnp.float32)
        if d.ndim in (2, 3):
            if d.shape not in ((b, h), (b, h, f)):
                raise ValueError(f"decay must be a scalar, [heads={h}], [batch={b}, heads={h}] or [batch={b}, "
                                 f"heads={h}, feature_dim={f}] (GLA); got {shape_str(d)}")
            decay = d[:, None]  # [B, 1, H(, F)]: per token of a length-1 sequence
        rates = _rates(decay, b, 1, h, learn_decay, f)
        g = _log_decay(rates, b, 1, h)[:, 0]
        s = (jnp.exp(g)[..., None] if g.ndim == 3 else jnp.exp(g)[..., None, None]) * s
    s = s + fk[:, 0, :, :, None] * va[:, 0, :, None, :]
    num = jnp.einsum("bhf,bhfe->bhe", fq[:, 0], s)
    count = state.count + 1
    y = _finish(num, count[:, None, None].astype(jnp.float32), normalize=normalize, eps=eps, dtype=v_t.dtype)
    return y, _split_state(s, count)
