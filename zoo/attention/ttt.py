"""TTT-Linear and TTT-MLP (Sun et al. 2024): RNNs whose hidden state is a model trained at test time.

Per head the hidden state is the parameters ``theta = (W_1, b_1, ..., W_L, b_L)`` of an inner
model ``g`` (``L = 1``: TTT-Linear, ``g(x) = x W + b``; ``L = 2``: TTT-MLP,
``g(x) = gelu(x W_1 + b_1) W_2 + b_2`` with the tanh-approximate GELU and hidden width
``expansion * key_dim``), read through a learned LayerNorm ``LN`` (per-head weight ``gamma`` and
bias ``beta``, over the value features) and a residual:

    f(x; theta) = x + LN(g(x; theta))                                  (residual="query", the paper)
    l_s(theta)  = 1/2 ||LN(g(k_s; theta)) - (v_s - k_s)||^2            (LayerNorm-fused reconstruction)
    theta_t     = theta_0 - tau_t sum_{s<=t, s in the mini-batch} sigma_s grad l_s(theta_0)
    y_t         = q_t + LN(g(q_t; theta_t))

Mini-batch gradient descent: the tokens are cut into mini-batches of ``chunk_size`` b (default 16,
counted from the start of the stream); every gradient of a mini-batch is taken at the
parameters ``theta_0`` of its start, token t reads with ``theta_t`` (its own and the earlier
tokens of the mini-batch applied), and the next mini-batch starts from ``theta_b``. The learning
rate of token s seen from token t is ``eta_ts = tau_t sigma_s`` for ``s <= t``: ``sigma_s`` the
per-token rate of the written token (``eta``; the paper's ``base_lr * sigmoid(theta_lr x_s) / d``)
and ``tau_t`` the read-side scale (``token_scale``; the paper's ``max(0, 1/t + lambda_t)`` by
position t = 1..b inside the mini-batch, default ``1/t``). Read from the official JAX code
(test-time-training/ttt-lm-jax ``ttt/models/ttt_layer.py``: ``get_eta``,
``TTTLinearBase.process_mini_batch``, ``TTTMLPBase.process_mini_batch``).

``residual`` variants: ``"query"`` (above; needs key_dim == value_dim), ``"inner"``: flash-linear-
attention's port (``fla/ops/ttt/naive.py``) adds the inner output instead, ``y_t = z_t + LN(z_t)``
with ``z_t = g(q_t; theta_t)`` (same loss, needs key_dim == value_dim); ``"none"``: no residual,
``l_s = 1/2 ||LN(g(k_s)) - v_s||^2`` and ``y_t = LN(g(q_t; theta_t))`` (any value_dim). fla's
row-only rate ``eta_t`` is ``eta=1, token_scale=eta_t`` per token.

Forms:
- :func:`ttt`, the mini-batch dual form (paper Sec. 2.7): per mini-batch, the gradients at
  ``theta_0`` in factored form (layer inputs ``X_l`` and error signals ``D_l = dl/dz_l``, one
  ``jax.grad``), then every layer's query-side pre-activation as matmuls,
  ``Z_l = Xq_l W_l + b_l - tau * [ (Xq_l R_l + r_l) + ((Xq_l X_l^T + 1) * sigma * tril) D_l ]``
  (``R_l, r_l`` the sums carried from earlier tokens of the mini-batch; no per-token weights).
  One ``jax.lax.scan`` over mini-batches carries the state. Any length: a ragged last
  mini-batch is zero-padded (rate 0, changes nothing).
- :func:`ttt_naive`, the obviously right reference: a ``jax.lax.scan`` over tokens with
  ``jax.grad`` of the inner loss at ``theta_0`` per token, the primal
  ``theta_t = theta_0 - tau_t R_t`` per token, and ``theta_0 <- theta_b`` at mini-batch ends.
- :func:`init_state` / :func:`step`: exact one-token decoding on a :class:`TTTState`.

Decoding is exact from any position, also inside a mini-batch: since ``eta_ts = tau_t sigma_s``,
``theta_t = theta_0 - tau_t R_t`` with the running sums ``R_t = sum_{s<=t} sigma_s grad l_s(theta_0)``,
so the state is ``(theta_0, R_t, count)`` (O(|theta|)). At a mini-batch end (``count % b == 0``
after the token) it folds: ``theta_0 <- theta_0 - tau_t R_t``, ``R <- 0``. The parallel forms
continue from any state: the stream is laid on the mini-batch grid by ``count % b`` neutral
tokens in front (rate 0), as :mod:`zoo.attention.titans` does (a traced ``count`` gathers the
stream into ``T + b - 1`` slots).

Numerics: float32 inside (the output in ``v.dtype``). LayerNorm uses the biased variance and
``eps`` (default 1e-6, as the paper's code). Rates are checked when concrete: ``eta >= 0``,
``token_scale >= 0``, finite (a ValueError names the argument).

Causal only (ValueError unless ``causal=True``). One inner model per query head; grouped k/v
heads are repeated. Queries are used as given unless ``scale`` is set (fla scales them by
``key_dim ** -0.5``); the paper's layer adds projections, a causal convolution and RoPE.

Paper: Sun, Li, Dalal, Xu, Vikram, Zhang, Dubois, Chen, Wang, Koyejo, Hashimoto, Guestrin,
"Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv 2407.04620, 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention.common import (
    as_int,
    check_choice,
    check_qkv,
    check_range,
    check_token,
    chunk,
    repeat_kv,
    shape_str,
    unchunk,
)
from zoo.attention.titans import _check_count, _gather_time, _offset, check_causal

Array = jax.Array
DEFAULT_CHUNK = 16  # the paper's mini-batch size
RESIDUALS = ("query", "inner", "none")
INIT_STD = 0.02  # the official code's initializer_range for the inner weights


class TTTState(NamedTuple):
    """Recurrent state of TTT (float32 arrays, int32 ``count``).

    weights: per layer ``[batch, heads, d_in, d_out]``, the inner weights ``W_0`` at the start of
      the current mini-batch. biases: per layer ``[batch, heads, d_out]`` (``b_0``).
    grads / bias_grads: the running sums ``R = sum_s sigma_s grad_W l_s(theta_0)`` and
      ``r = sum_s sigma_s grad_b l_s(theta_0)`` over the tokens of the current mini-batch seen so
      far (zero at a mini-batch start); the current parameters are ``theta_0 - tau_t (R, r)``.
    count: tokens consumed, int32 ``[]`` (or ``[batch]``); a mini-batch starts where
      ``count % chunk_size == 0``.
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    grads: tuple[Array, ...]
    bias_grads: tuple[Array, ...]
    count: Array


# ----------------------------------------------------------------------------- inner model


def layer_norm(z: Array, weight: Array, bias: Array, eps: float) -> Array:
    """``(z - mean) / sqrt(var + eps) * weight + bias`` over the last axis (biased variance)."""
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
    return (z - mu) * jax.lax.rsqrt(var + eps) * weight + bias


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)  # flax's nn.gelu, as the official TTT-MLP


def _inner(ws, bs, x):
    """``g(x)``: ``x [..., d_0]`` through layers ``ws[l] [..., d_in, d_out]``, ``bs[l] [..., d_out]``
    (leading dims of x beyond the weights' are broadcast: weights ``[d_in, d_out]`` per head)."""
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = h @ w + b
        if i < len(ws) - 1:
            h = _gelu(h)
    return h


def _target(k, v, residual):
    return v if residual == "none" else v - k


def _readout(z, q, ln_w, ln_b, eps, residual):
    o = layer_norm(z, ln_w, ln_b, eps)
    if residual == "query":
        return q + o
    if residual == "inner":
        return z + o
    return o


def init_weights(
    key: Array | None, heads: int, key_dim: int, value_dim: int | None = None, *,
    depth: int = 1, expansion: int = 4, std: float = INIT_STD,
) -> tuple[Array, ...]:
    """Initial inner weights per head, ``depth`` arrays ``[heads, d_in, d_out]`` drawn
    ``N(0, std^2)`` (the official code's ``normal(0.02)``), hidden width ``expansion * key_dim``.
    ``key`` is required: all-zero weights put the LayerNorm at a zero-variance input."""
    depth = as_int("depth", depth, allow_none=False)
    expansion = as_int("expansion", expansion, allow_none=False)
    if key is None:
        raise ValueError("TTT needs its inner weights: pass weights=... or a PRNG key=... to draw them")
    e = key_dim if value_dim is None else value_dim
    dims = [key_dim] + [expansion * key_dim] * (depth - 1) + [e]
    keys = jax.random.split(key, depth)
    return tuple(std * jax.random.normal(kk, (heads, dims[i], dims[i + 1]), jnp.float32) for i, kk in enumerate(keys))


def _initial_params(weights, biases, depth, expansion, key, h, dk, dv):
    depth = as_int("depth", depth, allow_none=False)
    if weights is None:
        ws = init_weights(key, h, dk, dv, depth=depth, expansion=expansion)
    else:
        if not isinstance(weights, (list, tuple)) or len(weights) != depth:
            n = len(weights) if isinstance(weights, (list, tuple)) else "?"
            raise ValueError(f"weights must be a list/tuple of depth={depth} arrays [heads, d_in, d_out]; got "
                             f"{type(weights).__name__} of {n}")
        ws = tuple(jnp.asarray(w, jnp.float32) for w in weights)
    d_in = dk
    for i, w in enumerate(ws):
        last = i == len(ws) - 1
        if w.ndim != 3 or w.shape[:2] != (h, d_in) or (last and w.shape[2] != dv):
            raise ValueError(f"weights[{i}] must be [heads={h}, {d_in}, {dv if last else 'd_out'}]; got {shape_str(w)}")
        d_in = w.shape[2]
    if biases is None:
        bs = tuple(jnp.zeros((h, w.shape[2]), jnp.float32) for w in ws)
    else:
        if not isinstance(biases, (list, tuple)) or len(biases) != len(ws):
            raise ValueError(f"biases must be a list/tuple of {len(ws)} arrays [heads, d_out] (one per layer)")
        bs = tuple(jnp.asarray(b, jnp.float32) for b in biases)
        for i, (b, w) in enumerate(zip(bs, ws)):
            if b.shape != (h, w.shape[2]):
                raise ValueError(f"biases[{i}] must be [heads={h}, {w.shape[2]}]; got {shape_str(b)}")
    return ws, bs


def init_params(
    key: Array, heads: int, head_dim: int, value_dim: int | None = None, *, depth: int = 1, expansion: int = 4,
    **_: Any,
) -> dict[str, Any]:
    """The learned parameters of a TTT layer, as the options they initialise (the registry's
    ``init_params``): the initial inner model ``weights`` (``N(0, 0.02^2)``, the official code's
    init) and zero ``biases``, the inner LayerNorm ``ln_weight`` (ones) and ``ln_bias`` (zeros)."""
    dv = head_dim if value_dim is None else value_dim
    ws = init_weights(key, heads, head_dim, dv, depth=depth, expansion=expansion)
    return {"weights": ws, "biases": tuple(jnp.zeros((heads, w.shape[-1]), jnp.float32) for w in ws),
            "ln_weight": jnp.ones((heads, dv), jnp.float32), "ln_bias": jnp.zeros((heads, dv), jnp.float32)}


def init_state(
    batch: int, heads: int, head_dim: int, value_dim: int | None = None, *,
    weights: Sequence[Array] | None = None, biases: Sequence[Array] | None = None, depth: int = 1,
    expansion: int = 4, key: Array | None = None,
) -> TTTState:
    """Decoding state at the start of a stream: the inner ``weights`` / ``biases`` (per head,
    ``[heads, d_in, d_out]`` / ``[heads, d_out]``; default: drawn from ``key`` / zeros) broadcast
    over the batch, zero running sums, ``count = 0``."""
    batch, heads, head_dim = (as_int(n, x, allow_none=False) for n, x in
                              (("batch", batch), ("heads", heads), ("head_dim", head_dim)))
    dv = head_dim if value_dim is None else as_int("value_dim", value_dim, allow_none=False)
    ws, bs = _initial_params(weights, biases, depth, expansion, key, heads, head_dim, dv)
    bc = lambda xs: tuple(jnp.broadcast_to(x, (batch,) + x.shape) for x in xs)
    ws, bs = bc(ws), bc(bs)
    zeros = lambda xs: tuple(jnp.zeros_like(x) for x in xs)
    return TTTState(ws, bs, zeros(ws), zeros(bs), jnp.zeros((), jnp.int32))


def _check_state(state, b, h, dk, dv) -> TTTState:
    if not isinstance(state, TTTState):
        raise ValueError(f"initial_state/state must be a TTTState; got {type(state).__name__}")
    ws, bs, gs, rs = (tuple(x) for x in state[:4])
    if not ws or not (len(bs) == len(gs) == len(rs) == len(ws)):
        raise ValueError("state must hold one weight, bias, grad and bias_grad array per layer")
    d_in = dk
    for i, (w, bb, g, r) in enumerate(zip(ws, bs, gs, rs)):
        last = i == len(ws) - 1
        ok = getattr(w, "ndim", 0) == 4 and w.shape[:3] == (b, h, d_in) and (not last or w.shape[3] == dv)
        if not ok or getattr(g, "shape", None) != w.shape or getattr(bb, "shape", None) != w.shape[:2] + w.shape[3:] \
                or getattr(r, "shape", None) != w.shape[:2] + w.shape[3:]:
            raise ValueError(
                f"state.weights[{i}]/grads[{i}] must be [batch={b}, heads={h}, {d_in}, {dv if last else 'd_out'}] and "
                f"state.biases[{i}]/bias_grads[{i}] [batch={b}, heads={h}, d_out]; got {shape_str(w)}, "
                f"{shape_str(g)}, {shape_str(bb)}, {shape_str(r)}")
        d_in = w.shape[3]
    f32 = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)
    return TTTState(f32(ws), f32(bs), f32(gs), f32(rs), _check_count(state.count, b))


# ----------------------------------------------------------------------------- inputs


def _rate(name: str, x: Any, b: int, t: int, h: int) -> Array:
    """``eta``: a scalar, ``[heads]`` or ``[batch, length, heads]`` -> ``[B, T, H]`` (``>= 0``)."""
    check_range(name, x, lo=0.0)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0 or x.shape == (h,):
        return jnp.broadcast_to(x, (b, t, h))
    if x.shape != (b, t, h):
        raise ValueError(f"{name} must be a scalar, [heads={h}] or [batch={b}, length={t}, heads={h}]; got "
                         f"{shape_str(x)}")
    return x


def _token_scale(token_scale: Any, pos: Array, b: int, t: int, h: int, c: int) -> Array:
    """``tau`` per token ``[B, T, H]`` from ``token_scale`` (None: ``1/(pos + 1)``; a scalar; per
    position ``[chunk_size]``; per token ``[batch, length, heads]``); ``pos [B, T]`` the position of
    each token inside its mini-batch."""
    if token_scale is None:
        return jnp.broadcast_to((1.0 / (pos + 1).astype(jnp.float32))[..., None], (b, t, h))
    check_range("token_scale", token_scale, lo=0.0)
    x = jnp.asarray(token_scale, jnp.float32)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (b, t, h))
    if x.shape == (c,):
        return jnp.broadcast_to(x[pos][..., None], (b, t, h))
    if x.shape == (b, t, h):
        return x
    raise ValueError(f"token_scale must be None (1/t), a scalar, [chunk_size={c}] (per position in the mini-batch) "
                     f"or [batch={b}, length={t}, heads={h}] (per token); got {shape_str(x)}")


def _ln_params(ln_weight, ln_bias, h, dv):
    out = []
    for name, x, default in (("ln_weight", ln_weight, 1.0), ("ln_bias", ln_bias, 0.0)):
        x = jnp.full((h, dv), default, jnp.float32) if x is None else jnp.asarray(x, jnp.float32)
        if x.shape != (h, dv):
            raise ValueError(f"{name} must be [heads={h}, value_dim={dv}] (the inner LayerNorm per head); got "
                             f"{shape_str(x)}")
        out.append(x)
    return tuple(out)


def _check_residual(residual, dk, dv):
    check_choice("residual", residual, RESIDUALS)
    if residual != "none" and dk != dv:
        raise ValueError(f"residual={residual!r} needs key_dim == value_dim (target v - k); got {dk} and {dv}; "
                         "use residual='none'")


def _check_eps(eps):
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number; got {eps!r}")


def _inputs(q, k, v, eta, token_scale, weights, biases, ln_weight, ln_bias, depth, expansion, key, eps, scale,
            residual, chunk_size, initial_state, causal):
    check_causal(causal)
    c = as_int("chunk_size", chunk_size, allow_none=False)
    _, _, groups = check_qkv(q, k, v, causal=True)
    f = lambda x: jnp.asarray(x, jnp.float32)
    q, k, v = f(q), f(repeat_kv(k, groups)), f(repeat_kv(v, groups))
    if scale is not None:
        q = q * scale
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    _check_residual(residual, dk, dv)
    _check_eps(eps)
    if initial_state is not None:
        state = _check_state(initial_state, b, h, dk, dv)
    else:
        ws, bs = _initial_params(weights, biases, depth, expansion, key, h, dk, dv)
        bc = lambda xs: tuple(jnp.broadcast_to(x, (b,) + x.shape) for x in xs)
        zeros = lambda xs: tuple(jnp.zeros((b,) + x.shape, jnp.float32) for x in xs)
        state = TTTState(bc(ws), bc(bs), zeros(ws), zeros(bs), np.zeros((), np.int32))
    sigma = _rate("eta", 1.0 / dk if eta is None else eta, b, t, h)
    pos = (jnp.broadcast_to(jnp.asarray(state.count, jnp.int32), (b,))[:, None] + jnp.arange(t)[None, :]) % c
    tau = _token_scale(token_scale, pos, b, t, h, c)
    ln = _ln_params(ln_weight, ln_bias, h, dv)
    return q, k, v, sigma, tau, ln, state, c


def _advance(count, t):
    return jnp.asarray(count, jnp.int32) + jnp.int32(t)


# ----------------------------------------------------------------------------- dual form


def _chunk_dual(carry, xs, ln, eps, residual):
    """One mini-batch, ``[B, H, C, .]`` arrays: outputs and the carry after it (module docstring)."""
    ws, bs, gs, rs = carry
    q, k, v, sigma, tau, last_real = xs
    ln_w, ln_b = (x[None, :, None] for x in ln)  # [1, H, 1, dv]
    c = q.shape[2]
    target = _target(k, v, residual)

    def total(offsets):  # the mini-batch's summed loss at theta_0, with pre-activation offsets
        h, hs = k, []
        for i, (w, bb) in enumerate(zip(ws, bs)):
            hs.append(h)
            z = jnp.einsum("bhcd,bhde->bhce", h, w) + bb[:, :, None] + offsets[i]
            h = _gelu(z) if i < len(ws) - 1 else z
        o = layer_norm(h, ln_w, ln_b, eps)
        return 0.5 * jnp.sum(jnp.square(o - target)), hs

    zeros = [jnp.zeros(k.shape[:-1] + (w.shape[-1],), jnp.float32) for w in ws]
    deltas, hs = jax.grad(total, has_aux=True)(zeros)  # deltas[l]: dl_s/dz_l per token
    tril = jnp.tril(jnp.ones((c, c), bool))
    tq = tau[..., None]
    h = q
    new_gs, new_rs = [], []
    for i, (w, bb, g, r) in enumerate(zip(ws, bs, gs, rs)):
        att = jnp.where(tril, (jnp.einsum("bhid,bhjd->bhij", h, hs[i]) + 1.0) * sigma[..., None, :], 0.0)
        z = (jnp.einsum("bhcd,bhde->bhce", h, w) + bb[:, :, None]
             - tq * (jnp.einsum("bhcd,bhde->bhce", h, g) + r[:, :, None])
             - tq * jnp.einsum("bhij,bhje->bhie", att, deltas[i]))
        sd = sigma[..., None] * deltas[i]
        new_gs.append(g + jnp.einsum("bhcd,bhce->bhde", hs[i], sd))
        new_rs.append(r + jnp.sum(sd, axis=2))
        h = _gelu(z) if i < len(ws) - 1 else z
    y = _readout(h, q, ln_w, ln_b, eps, residual)
    # fold at a mini-batch end: theta_0 <- theta_0 - tau_last (R, r), R <- 0
    t_last, fold = tau[..., -1], last_real > 0  # [B, H]
    t4, f4, f3 = t_last[..., None, None], fold[..., None, None], fold[..., None]
    ws2 = tuple(jnp.where(f4, w - t4 * g, w) for w, g in zip(ws, new_gs))
    bs2 = tuple(jnp.where(f3, bb - t_last[..., None] * r, bb) for bb, r in zip(bs, new_rs))
    gs2 = tuple(jnp.where(f4, 0.0, g) for g in new_gs)
    rs2 = tuple(jnp.where(f3, 0.0, r) for r in new_rs)
    return (ws2, bs2, gs2, rs2), y


def _run_dual(q, k, v, sigma, tau, ln, state: TTTState, c: int, eps: float, residual: str):
    b, t, h, _ = q.shape
    real = jnp.ones((b, t, h), jnp.float32)
    xs = (q, k, v, sigma, tau, real)  # neutral tokens: all zero (rate 0, not real)
    r, static = _offset(state.count, c)
    if static and r:
        xs = tuple(jnp.concatenate([jnp.zeros((b, r) + x.shape[2:], x.dtype), x], 1) for x in xs)
    elif not static:
        rb = jnp.broadcast_to(r, (b,))
        pos = jnp.arange(t + c - 1)[None, :] - rb[:, None]
        ok = (pos >= 0) & (pos < t)
        idx = jnp.clip(pos, 0, t - 1)
        xs = tuple(jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 2)), _gather_time(x, idx), 0.0) for x in xs)
    length = xs[0].shape[1]

    def split(x):  # [B, L, H, ...] -> [n, B, H, C, ...] (zero padding at the end)
        x = chunk(x, c)[0]
        return jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))

    xs_c = [split(x) for x in xs]
    xs_c[-1] = xs_c[-1][..., -1]  # is the last slot of the mini-batch a real token: [n, B, H]
    carry = tuple(tuple(x) for x in state[:4])
    carry, y = jax.lax.scan(lambda cr, x: _chunk_dual(cr, x, ln, eps, residual), carry, tuple(xs_c))
    y = unchunk(jnp.transpose(y, (1, 0, 3, 2, 4)), length, axis=1)
    if static:
        y = y[:, r:r + t]
    else:
        y = _gather_time(y, jnp.arange(t)[None, :] + rb[:, None])
    return y, TTTState(*carry, _advance(state.count, t))


# ----------------------------------------------------------------------------- sequential reference


def _token_update(ws, bs, gs, rs, pos, q, k, v, sigma, tau, ln_w, ln_b, *, eps, residual, c):
    """One token for one head: gradient of ``l(theta_0; k, v)`` by ``jax.grad``, ``R += sigma g``,
    read with ``theta_0 - tau R``; fold where the token ends a mini-batch (``pos == c - 1``)."""

    def loss(params):
        w, bb = params
        o = layer_norm(_inner(w, bb, k), ln_w, ln_b, eps)
        return 0.5 * jnp.sum(jnp.square(o - _target(k, v, residual)))

    gw, gb = jax.grad(loss)((ws, bs))
    gs = tuple(g + sigma * x for g, x in zip(gs, gw))
    rs = tuple(r + sigma * x for r, x in zip(rs, gb))
    cur_w = tuple(w - tau * g for w, g in zip(ws, gs))
    cur_b = tuple(bb - tau * r for bb, r in zip(bs, rs))
    y = _readout(_inner(cur_w, cur_b, q), q, ln_w, ln_b, eps, residual)
    fold = pos == c - 1
    ws = tuple(jnp.where(fold, cw, w) for cw, w in zip(cur_w, ws))
    bs = tuple(jnp.where(fold, cb, bb) for cb, bb in zip(cur_b, bs))
    gs = tuple(jnp.where(fold, 0.0, g) for g in gs)
    rs = tuple(jnp.where(fold, 0.0, r) for r in rs)
    return y, ws, bs, gs, rs


def _run_sequential(q, k, v, sigma, tau, ln, state: TTTState, c: int, eps: float, residual: str):
    b, t, h, _ = q.shape
    count = jnp.broadcast_to(jnp.asarray(state.count, jnp.int32), (b,))

    def one_head(ws, bs, gs, rs, count, q, k, v, sigma, tau, ln_w, ln_b):
        def body(carry, x):
            ws, bs, gs, rs, i = carry
            y, ws, bs, gs, rs = _token_update(ws, bs, gs, rs, i % c, *x, ln_w, ln_b, eps=eps, residual=residual, c=c)
            return (ws, bs, gs, rs, i + 1), y

        (ws, bs, gs, rs, _), y = jax.lax.scan(body, (ws, bs, gs, rs, count), (q, k, v, sigma, tau))
        return y, ws, bs, gs, rs

    # heads: axis 0 of the state (after the batch), axis 1 of the per-token arrays, 0 of LN params
    inner = jax.vmap(one_head, in_axes=(0, 0, 0, 0, None, 1, 1, 1, 1, 1, 0, 0), out_axes=(1, 0, 0, 0, 0))
    outer = jax.vmap(inner, in_axes=(0, 0, 0, 0, 0) + (0,) * 5 + (None, None))
    y, ws, bs, gs, rs = outer(*state[:4], count, q, k, v, sigma, tau, *ln)
    return y, TTTState(ws, bs, gs, rs, _advance(state.count, t))


# ----------------------------------------------------------------------------- public API


def ttt(
    q: Array, k: Array, v: Array, *,
    eta: Any = None, token_scale: Any = None,
    weights: Sequence[Array] | None = None, biases: Sequence[Array] | None = None,
    ln_weight: Array | None = None, ln_bias: Array | None = None,
    depth: int = 1, expansion: int = 4, key: Array | None = None,
    eps: float = 1e-6, scale: float | None = None, residual: str = "query",
    chunk_size: int = DEFAULT_CHUNK, initial_state: TTTState | None = None, return_state: bool = False,
    causal: bool = False,
) -> Array | tuple[Array, TTTState]:
    """TTT layer core, mini-batch dual form (equations in the module docstring): ``depth=1`` is
    TTT-Linear, ``depth=2`` TTT-MLP.

    Args:
      q, k: ``[batch, length, heads | kv_heads, key_dim]``; v: ``[batch, length, kv_heads, value_dim]``
        (the inner model's test, training and label views).
      eta: ``sigma_s >= 0``, the learning rate of each written token: a scalar, ``[heads]`` or
        ``[batch, length, heads]`` (default ``1 / key_dim``: the paper's ``base_lr / d``).
      token_scale: ``tau_t >= 0`` scaling the rates read by token t: None (``1/t``, t = 1..b the
        position inside the mini-batch, the paper's default), a scalar, ``[chunk_size]`` per
        position (the paper's learnable ``max(0, 1/t + lambda_t)``) or ``[batch, length, heads]``.
      weights / biases: the inner model's initial parameters per head, ``depth`` arrays
        ``[heads, d_in, d_out]`` / ``[heads, d_out]`` (hidden width ``expansion * key_dim``);
        default: weights drawn ``N(0, 0.02^2)`` from ``key`` (required then), zero biases.
      ln_weight, ln_bias: the inner LayerNorm ``[heads, value_dim]`` (default ones / zeros).
      eps: LayerNorm epsilon. scale: multiplies q (none by default). residual: ``"query"`` (paper),
        ``"inner"`` (fla's port) or ``"none"``.
      chunk_size: the mini-batch size b (default 16).
      initial_state / return_state: start from / also return a :class:`TTTState` (the state
        overrides weights/biases; it may stop inside a mini-batch).
      causal: must be True.

    Returns ``[batch, length, heads, value_dim]`` in ``v.dtype`` and the final state when
    ``return_state``.

    Paper: Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (2024).
    """
    q_, k_, v_, sigma, tau, ln, state, c = _inputs(q, k, v, eta, token_scale, weights, biases, ln_weight, ln_bias,
                                                   depth, expansion, key, eps, scale, residual, chunk_size,
                                                   initial_state, causal)
    y, state = _run_dual(q_, k_, v_, sigma, tau, ln, state, c, eps, residual)
    y = y.astype(v.dtype)
    return (y, state) if return_state else y


def ttt_naive(
    q: Array, k: Array, v: Array, *,
    eta: Any = None, token_scale: Any = None,
    weights: Sequence[Array] | None = None, biases: Sequence[Array] | None = None,
    ln_weight: Array | None = None, ln_bias: Array | None = None,
    depth: int = 1, expansion: int = 4, key: Array | None = None,
    eps: float = 1e-6, scale: float | None = None, residual: str = "query",
    chunk_size: int = DEFAULT_CHUNK, initial_state: TTTState | None = None, return_state: bool = False,
    causal: bool = False,
) -> Array | tuple[Array, TTTState]:
    """Reference: token by token (``jax.lax.scan``), ``jax.grad`` of the inner loss at the
    mini-batch-start parameters per token, ``theta_t = theta_0 - tau_t sum_{s<=t} sigma_s grad l_s``
    (the primal form), ``theta_0 <- theta_t`` at each mini-batch end. Arguments as :func:`ttt`."""
    q_, k_, v_, sigma, tau, ln, state, c = _inputs(q, k, v, eta, token_scale, weights, biases, ln_weight, ln_bias,
                                                   depth, expansion, key, eps, scale, residual, chunk_size,
                                                   initial_state, causal)
    y, state = _run_sequential(q_, k_, v_, sigma, tau, ln, state, c, eps, residual)
    y = y.astype(v.dtype)
    return (y, state) if return_state else y


def ttt_linear(q: Array, k: Array, v: Array, **options: Any) -> Array | tuple[Array, TTTState]:
    """TTT-Linear: :func:`ttt` with ``depth=1`` (``g(x) = x W + b``)."""
    return ttt(q, k, v, depth=1, **options)


def ttt_mlp(q: Array, k: Array, v: Array, **options: Any) -> Array | tuple[Array, TTTState]:
    """TTT-MLP: :func:`ttt` with ``depth=2`` (``g(x) = gelu(x W_1 + b_1) W_2 + b_2``, hidden
    ``expansion * key_dim``, tanh-approximate GELU)."""
    return ttt(q, k, v, depth=2, **options)


def step(
    state: TTTState, q_t: Array, k_t: Array, v_t: Array, *,
    eta: Any = None, token_scale: Any = None, ln_weight: Array | None = None, ln_bias: Array | None = None,
    eps: float = 1e-6, scale: float | None = None, residual: str = "query", chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Array, TTTState]:
    """One decoding step: ``R <- R + sigma grad l(theta_0; k_t, v_t)``, ``y_t = f(q_t; theta_0 -
    tau R)``, fold at a mini-batch end, ``count + 1``; continues :func:`ttt` exactly (same
    ``chunk_size``).

    ``q_t [batch, heads, key_dim]``, ``k_t``/``v_t [batch, kv_heads, dim]``; ``eta`` a scalar,
    ``[heads]`` or ``[batch, heads]``; ``token_scale`` None (``1/t``), a scalar, ``[chunk_size]``
    per position or ``[batch, heads]``. Returns ``(y_t [batch, heads, value_dim], new_state)``."""
    c = as_int("chunk_size", chunk_size, allow_none=False)
    _, _, groups = check_token(q_t, k_t, v_t)
    f = lambda x: jnp.asarray(x, jnp.float32)
    q, k, v = f(q_t), f(repeat_kv(k_t[:, None], groups)[:, 0]), f(repeat_kv(v_t[:, None], groups)[:, 0])
    if scale is not None:
        q = q * scale
    b, h, dk = q.shape
    dv = v.shape[-1]
    _check_residual(residual, dk, dv)
    _check_eps(eps)
    state = _check_state(state, b, h, dk, dv)
    pos = jnp.broadcast_to(jnp.asarray(state.count, jnp.int32) % c, (b,))
    e = 1.0 / dk if eta is None else eta
    e = jnp.asarray(e, jnp.float32)
    sigma = _rate("eta", e[:, None] if e.ndim == 2 else e, b, 1, h)[:, 0]
    ts = token_scale
    if ts is not None and jnp.ndim(ts) == 2:
        ts = jnp.asarray(ts)[:, None]
    tau = _token_scale(ts, pos[:, None], b, 1, h, c)[:, 0]
    ln_w, ln_b = _ln_params(ln_weight, ln_bias, h, dv)

    def one(ws, bs, gs, rs, pos, q, k, v, sigma, tau, ln_w, ln_b):
        return _token_update(ws, bs, gs, rs, pos, q, k, v, sigma, tau, ln_w, ln_b, eps=eps, residual=residual, c=c)

    inner = jax.vmap(one, in_axes=(0, 0, 0, 0, None, 0, 0, 0, 0, 0, 0, 0))
    y, ws, bs, gs, rs = jax.vmap(inner, in_axes=(0,) * 10 + (None, None))(*state[:4], pos, q, k, v, sigma, tau,
                                                                          ln_w, ln_b)
    return y.astype(v_t.dtype), TTTState(ws, bs, gs, rs, _advance(state.count, 1))


def inner_params(state: TTTState, tau: Any) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """The parameters ``theta_0 - tau (R, r)`` the last token read with (``tau`` its read scale,
    a scalar or ``[batch, heads]``; at a mini-batch end the state is folded and ``R = 0``)."""
    t = jnp.asarray(tau, jnp.float32)
    t = t.reshape(t.shape + (1,) * (2 - t.ndim)) if t.ndim else t
    ws = tuple(w - (t[..., None, None] if t.ndim else t) * g for w, g in zip(state.weights, state.grads))
    bs = tuple(bb - (t[..., None] if t.ndim else t) * r for bb, r in zip(state.biases, state.bias_grads))
    return ws, bs


__all__ = ["TTTState", "init_state", "init_weights", "inner_params", "layer_norm", "step", "ttt", "ttt_linear",
           "ttt_mlp", "ttt_naive"]
