"""Linear attention (Katharopoulos et al. 2020) with Lightning-Attention-2 chunking and decay.

With feature maps ``phi_q, phi_k`` (``zoo.attention.feature_maps``) and per-step decay
``lambda_t = exp(g_t)`` (``g_t <= 0``; constant per head for Lightning / TransNormer, or per token
for gated linear attention), causal linear attention is the recurrence

    S_t = lambda_t S_{t-1} + phi_k(k_t) v_t^T          z_t = lambda_t z_{t-1} + phi_k(k_t)
    y_t = phi_q(q_t)^T S_t / (phi_q(q_t)^T z_t + eps)    (normalize=True)
    y_t = phi_q(q_t)^T S_t                               (normalize=False)

i.e. ``y_i = sum_{j<=i} prod_{j<u<=i} lambda_u (phi_q(q_i).phi_k(k_j)) v_j / (...)``. Non-causal
attention uses the full sums. There is no 1/sqrt(d) scaling unless ``scale`` is given (as in
the original papers). ``normalize="mean"`` divides numerator and denominator by the number of
keys seen before adding eps (NaLaFormer's ``mean`` normaliser).

Forms (``impl``), all equal to the naive masked quadratic reference :func:`linear_naive`:
- ``"chunked"``: Lightning Attention-2 (Qin et al. 2024): quadratic inside a chunk of
  ``chunk_size`` tokens, a KV state carried between chunks (computed for all chunks at once and
  prefix-combined with ``jax.lax.associative_scan``); any length (ragged last chunk padded with
  zero keys and no decay); memory O(T/C * F * Dv).
- ``"scan"``: the token recurrence above as one ``jax.lax.scan`` (O(F * Dv) state); its
  gradient is the chunked form's VJP (same function; differentiating the scan would store every
  state).
- ``"pallas"``: the tiled kernel in ``kernels_pallas`` (GPU/TPU; interpret mode on CPU).
- ``"auto"``: ``pallas`` on GPU/TPU when available (and the decay, if any, is a per-head
  constant: the kernel does not differentiate the decay rates), else the faster XLA form for
  the backend (``scan`` on CPU, ``chunked`` elsewhere); the choice is logged once.
Decoding uses :func:`init_state` / :func:`step` with the explicit state ``(S, z, count)``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention import feature_maps as fmaps
from zoo.attention.common import (
    check_choice,
    check_positive_int,
    check_qkv,
    repeat_kv,
    shape_str,
)

Array = jax.Array
logger = logging.getLogger("zoo.attention")

IMPLS = ("auto", "xla", "chunked", "scan", "pallas")
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
    """Empty decoding state for ``heads`` query heads (float32)."""
    f = feature_dim(feature_map, head_dim, feature_map_params)
    e = head_dim if value_dim is None else value_dim
    return LinearState(
        jnp.zeros((batch, heads, f, e), jnp.float32),
        jnp.zeros((batch, heads, f), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
    )


# ----------------------------------------------------------------------------- helpers


def _log_decay(decay: Any, b: int, t: int, h: int) -> Array | None:
    """Decay rates (>= 0) ``[H]`` or per token ``[B, T, H]`` -> log-decay ``g = -rate`` ``[B, T, H]``."""
    if decay is None:
        return None
    d = jnp.asarray(decay, jnp.float32)
    if d.ndim == 0 or d.shape == (h,):
        return jnp.broadcast_to(-d, (b, t, h))
    if d.shape == (b, t, h):
        return -d
    raise ValueError(
        f"decay must be a scalar, [heads={h}] (rate per head) or [batch={b}, length={t}, heads={h}] "
        f"(rate per token); got {shape_str(d)}"
    )


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


def _check_state(state: Any, b: int, h: int, f: int, e: int) -> None:
    if not isinstance(state, LinearState):
        raise ValueError(f"initial_state/state must be a LinearState; got {type(state).__name__}")
    if state.S.shape != (b, h, f, e) or state.z.shape != (b, h, f):
        raise ValueError(
            f"state must have S [{b}, {h}, {f}, {e}] and z [{b}, {h}, {f}]; got S {shape_str(state.S)}, "
            f"z {shape_str(state.z)}"
        )


def _aug_state(state: LinearState | None, b, h, f, e) -> Array:
    if state is None:
        return jnp.zeros((b, h, f, e + 1), jnp.float32)
    _check_state(state, b, h, f, e)
    return jnp.concatenate([state.S, state.z[..., None]], axis=-1).astype(jnp.float32)


def _split_state(sa: Array, count: Array) -> LinearState:
    return LinearState(sa[..., :-1], sa[..., -1], count)


# ----------------------------------------------------------------------------- causal cores
# All cores take fq, fk [B, T, H, F], va [B, T, H, E], g [B, T, H] log-decay (or None),
# s0 [B, H, F, E], and return (num [B, T, H, E], final state [B, H, F, E]).


def _core_scan(fq, fk, va, g, s0):
    def body(s, xs):
        q_t, k_t, v_t, g_t = xs
        if g_t is not None:
            s = jnp.exp(g_t)[..., None, None] * s
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


def _core_chunked(fq, fk, va, g, s0, chunk: int):
    b, t, h, f = fq.shape
    e = va.shape[-1]
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        # Padded keys/values are zero and padded steps do not decay, so the state is exact.
        p = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        fq, fk, va = p(fq), p(fk), p(va)
        g = None if g is None else p(g)
    r = lambda x: x.reshape(b, n, c, *x.shape[2:])
    fq, fk, va = r(fq), r(fk), r(va)
    mask = jnp.tril(jnp.ones((c, c), bool))
    a = jnp.einsum("bnrhf,bnshf->bnhrs", fq, fk)
    if g is None:
        a = jnp.where(mask, a, 0.0)
        kw = fk
        chunk_decay = jnp.ones((b, n, h), jnp.float32)
        q_dec = None
    else:
        cg = jnp.cumsum(r(g), axis=2)  # [B, N, C, H] cumulative log-decay inside each chunk
        cgh = jnp.moveaxis(cg, 2, 3)  # [B, N, H, C]
        diff = cgh[..., :, None] - cgh[..., None, :]
        a = jnp.where(mask, a * jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
        kw = fk * jnp.exp(cg[:, :, -1:] - cg)[..., None]
        chunk_decay = jnp.exp(cg[:, :, -1])  # [B, N, H]
        q_dec = jnp.exp(cg)[..., None]
    intra = jnp.einsum("bnhrs,bnshe->bnrhe", a, va)
    delta = jnp.einsum("bnshf,bnshe->bnhfe", kw, va)  # state contribution of each chunk

    # Prefix-combine the affine maps S -> a_n S + delta_n over chunks (exact, no overflow).
    def combine(x, y):
        a1, b1 = x
        a2, b2 = y
        return a1 * a2, a2[..., None, None] * b1 + b2

    acc_a, acc_b = jax.lax.associative_scan(combine, (chunk_decay, delta), axis=1)
    s_after = acc_a[..., None, None] * s0[:, None] + acc_b  # state after chunk n
    s_before = jnp.concatenate([s0[:, None], s_after[:, :-1]], axis=1)
    inter = jnp.einsum("bnrhf,bnhfe->bnrhe", fq, s_before)
    if q_dec is not None:
        inter = q_dec * inter
    num = (intra + inter).reshape(b, n * c, h, e)[:, :t]
    return num, s_after[:, -1]


_warned: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.info(msg)


def resolve_impl(impl: str, *, decay_per_token: bool = False) -> str:
    """Resolves ``impl`` ("auto"/"xla") to a concrete form for the default backend (logged once)."""
    check_choice("impl", impl, IMPLS)
    if impl not in ("auto", "xla"):
        return impl
    platform = jax.default_backend()
    if impl == "auto" and platform in ("gpu", "tpu", "cuda", "rocm") and not decay_per_token:
        if _pallas_available():
            _log_once(f"zoo.attention.linear: impl='auto' -> 'pallas' on {platform}")
            return "pallas"
    # Measured in benchmarks/RESULTS.md: on CPU the token scan beats the chunked form; on
    # matmul units (GPU/TPU) the chunked form wins.
    choice = "scan" if platform == "cpu" else "chunked"
    _log_once(f"zoo.attention.linear: impl={impl!r} -> {choice!r} on {platform}")
    return choice


def _pallas_available() -> bool:
    try:
        import kernels_pallas  # noqa: F401
    except ImportError:
        return False
    return hasattr(kernels_pallas, "causal_linear_attention")


def _core_pallas(fq, fk, va, decay, s0, chunk):
    import kernels_pallas

    rate = None if decay is None else jnp.broadcast_to(jnp.asarray(decay, jnp.float32), (fq.shape[2],))
    return kernels_pallas.causal_linear_attention(fq, fk, va, rate, initial_state=s0, chunk_size=chunk)


# ----------------------------------------------------------------------------- public API


def linear(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    feature_map: Any = "elu",
    feature_map_params: Any = None,
    eps: float = 1e-6,
    normalize: bool | str = True,
    decay: Any = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
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
      decay: causal only; rates ``>= 0`` with ``lambda = exp(-rate)``: ``[heads]`` (Lightning /
        TransNormer; see :func:`alibi_slopes`) or ``[batch, length, heads]`` per token.
      scale: multiplies q before the feature map (none by default, as in the papers).
      chunk_size: chunk length of the chunked and Pallas forms (default 64).
      impl: ``"auto" | "xla" | "chunked" | "scan" | "pallas"`` (the quadratic reference is
        :func:`linear_naive`).
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
    if not causal:
        check_choice("impl", impl, IMPLS)
        if decay is not None or initial_state is not None or return_state:
            raise ValueError("decay, initial_state and return_state need causal=True")
        kv = jnp.einsum("bjhf,bjhe->bhfe", fk, va)
        num = jnp.einsum("bihf,bhfe->bihe", fq, kv)
        return _finish(num, jnp.float32(tk), normalize=normalize, eps=eps, dtype=v.dtype)

    g = _log_decay(decay, b, tq, h)
    # The Pallas kernel gives no gradient for the decay rates: "auto" uses it only when the rates
    # are constants (not traced values that may be learned).
    traced_decay = isinstance(decay, jax.core.Tracer)
    form = resolve_impl(impl, decay_per_token=decay is not None and (jnp.ndim(decay) == 3 or traced_decay))
    s0 = _aug_state(initial_state, b, h, f, va.shape[-1] - 1)
    chunk = chunk_size or DEFAULT_CHUNK
    if form == "scan":
        num, s_final = _core_scan_fast_grad(fq, fk, va, g, s0, chunk)
    elif form == "chunked":
        num, s_final = _core_chunked(fq, fk, va, g, s0, chunk)
    else:
        if not _pallas_available():
            raise ValueError("impl='pallas' needs kernels_pallas.causal_linear_attention (not importable)")
        if decay is not None and jnp.ndim(decay) == 3:
            raise ValueError("impl='pallas' supports a per-head decay [heads], not per-token decay")
        num, s_final = _core_pallas(fq, fk, va, decay, s0, chunk)
    c0 = jnp.zeros((b,), jnp.int32) if initial_state is None else initial_state.count
    counts = (c0[:, None] + jnp.arange(1, tq + 1, dtype=jnp.int32)[None, :]).astype(jnp.float32)
    out = _finish(num, counts[:, :, None, None], normalize=normalize, eps=eps, dtype=v.dtype)
    if return_state:
        return out, _split_state(s_final, c0 + tq)
    return out


def linear_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, feature_map: Any = "elu",
    feature_map_params: Any = None, eps: float = 1e-6, normalize: bool | str = True,
    decay: Any = None, scale: float | None = None,
) -> Array:
    """Reference: the masked quadratic form ``y = (A / rowsum(A) + eps)`` with
    ``A_ij = phi_q(q_i).phi_k(k_j) * prod_{j<u<=i} lambda_u * [j <= i]``. Obviously right, O(T^2)."""
    fq, fk, va = _prepare(
        q, k, v, causal=causal, feature_map=feature_map, feature_map_params=feature_map_params,
        scale=scale, normalize=normalize, eps=eps,
    )
    b, tq, h, f = fq.shape
    tk = fk.shape[1]
    a = jnp.einsum("bihf,bjhf->bhij", fq, fk)
    if causal:
        a = jnp.where(jnp.tril(jnp.ones((tq, tk), bool)), a, 0.0)
        g = _log_decay(decay, b, tq, h)
        if g is not None:
            pos = jnp.arange(tq)
            # prod_{j<u<=i} lambda_u computed term by term (no cumulative-sum differences).
            i, j, u = pos[:, None, None], pos[None, :, None], pos[None, None, :]
            between = (u > j) & (u <= i)
            logw = jnp.einsum("iju,buh->bhij", between.astype(jnp.float32), g)
            a = a * jnp.exp(logw)
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
    normalize: bool | str = True, decay: Any = None, scale: float | None = None,
) -> tuple[Array, LinearState]:
    """One decoding step of causal linear attention.

    ``q_t [batch, heads, head_dim]``, ``k_t [batch, kv_heads, head_dim]``,
    ``v_t [batch, kv_heads, value_dim]``; ``decay`` ``[heads]`` or ``[batch, heads]`` rates.
    Returns ``(y_t [batch, heads, value_dim], new_state)``: ``S <- lambda S + phi(k) v^T``,
    ``z <- lambda z + phi(k)``, ``y = phi(q)^T S / (phi(q)^T z + eps)``.
    """
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"{name} must be [batch, heads, head_dim] (one token); got {shape_str(x)}")
    fq, fk, va = _prepare(
        q_t[:, None], k_t[:, None], v_t[:, None], causal=True, feature_map=feature_map,
        feature_map_params=feature_map_params, scale=scale, normalize=normalize, eps=eps,
    )
    b, _, h, f = fq.shape
    s = _aug_state(state, b, h, f, va.shape[-1] - 1)
    if decay is not None:
        d = jnp.asarray(decay, jnp.float32)
        if d.ndim == 2:
            if d.shape != (b, h):
                raise ValueError(f"decay must be [heads={h}] or [batch={b}, heads={h}]; got {shape_str(d)}")
            d = d[:, None]
        s = jnp.exp(_log_decay(d, b, 1, h)[:, 0])[..., None, None] * s
    s = s + fk[:, 0, :, :, None] * va[:, 0, :, None, :]
    num = jnp.einsum("bhf,bhfe->bhe", fq[:, 0], s)
    count = state.count + 1
    y = _finish(num, count[:, None, None].astype(jnp.float32), normalize=normalize, eps=eps, dtype=v_t.dtype)
    return y, _split_state(s, count)
