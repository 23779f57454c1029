"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni 2024): a memory learned at test time.

Per head the memory ``M`` is an MLP of ``depth`` layers (depth 1 = a matrix memory ``M(x) = x W``)
whose weights are the recurrent state. Every token writes by one step of gradient descent with
momentum and weight decay on the associative loss, then reads with its query:

    l(M; k_t, v_t) = ||M(k_t) - v_t||^2                      (surprise = grad of l)
    S_t = eta_t S_{t-1} - theta_t grad_W l(M_{t-1}; k_t, v_t)  (momentum; theta_t learning rate)
    M_t = (1 - alpha_t) M_{t-1} + S_t                         (alpha_t: forgetting, weight decay)
    y_t = M_t(q_t)                                            (retrieval, no update)

with per-token gates ``theta_t >= 0``, ``eta_t in [0, 1]``, ``alpha_t in [0, 1]`` (arrays, not
modules).

General momentum delta rule (``prediction_key=p``): the memory predicts at a key ``p_t`` and
writes along ``k_t``. For a matrix memory ``M(x) = x W`` the surprise is
``u_t = k_t^T (p_t W_{t'} - v_t)`` (times 2 for this loss) instead of ``k_t^T (k_t W_{t'} - v_t)``:

    S_t = eta_t S_{t-1} - 2 theta_t k_t^T (p_t W_{t'} - v_t),   W_t = (1 - alpha_t) W_{t-1} + S_t

(with ``eta = alpha = 0``: ``W_t = W_{t-1} - 2 theta_t k_t^T (p_t W_{t-1} - v_t)``, a delta rule whose
erase key ``p`` differs from its write key ``k``); ``p = k`` is Titans. For an MLP memory the
surprise is the gradient of ``l(M; p_t, v_t)`` with respect to a weight change whose first-layer
effect is carried by ``k_t``: the forward pass, error signals and deeper layers' inputs at ``p_t``,
the first layer's input ``k_t`` (``u = k_t^T delta_1`` there).

An MLP of depth ``L`` computes ``h_0 = x, z_l = h_{l-1} W_l, h_l = act(z_l)`` and ``M(x) = z_L``
(``+ x`` with ``residual=True``), weights ``W_l [d_{l-1}, d_l]``, no biases.

Forms (every form takes ``chunk_size`` C, default ``DEFAULT_CHUNK`` = 64, and means the same
recurrence by it: the gradient of token t is taken at the effective weights ``M_{t'}`` of the
start of its chunk, chunks being the blocks of C consecutive tokens counted from the start of
the stream; ``chunk_size=1`` is the exact recurrence, gradient at ``M_{t-1}``):
- :func:`titans`, the chunked parallel training form (paper Sec. 3.2): the gradients of all
  tokens of a chunk are taken at the chunk-start weights ``M_{t'}``, then momentum and decay are
  linear recurrences inside the chunk; the state ``(M, S)`` is carried across chunks by one
  ``jax.lax.scan`` (any length: a ragged last chunk is zero-padded at the end, which by
  causality changes no kept output, and the state is read at its last real token).
  Each per-token gradient of layer ``l`` is an outer product ``h_{l-1,j}^T delta_{l,j}`` (layer
  input times error signal), obtained for the whole chunk from one ``jax.grad`` of the summed
  loss w.r.t. per-token pre-activation offsets (the same numbers as ``vmap(grad)`` at the
  chunk-start weights, without materialising ``C`` weight-sized gradients).
  ``form="dual"`` (default) never materialises per-token weights: unrolling the two recurrences,
  ``M_i = a_i M_0 + s_i S_0 + sum_{j<=i} c_ij h_j^T delta_j`` with ``a_i = prod_{m<=i}(1-alpha_m)``,
  ``s_i = sum_{m<=i} D_im e_m``, ``c_ij = -theta_j sum_{j<=m<=i} D_im G_mj``, where
  ``D_im = prod_{m<u<=i}(1-alpha_u)``, ``G_mj = prod_{j<u<=m} eta_u``, ``e_m = prod_{u<=m} eta_u``;
  so every layer's retrieval ``h^q_{l-1,i} W_{l,i}`` is matmuls (``(c * (H^q H^T)) Delta``), as in
  the dual form of TTT. ``form="materialize"`` builds the per-token weights of the chunk with
  two ``jax.lax.associative_scan`` s (momentum, then decay) and reads with them; it costs
  ``chunk_size * |M|`` memory and is the form for non-linear read-outs (:mod:`zoo.attention.miras`).
- :func:`titans_naive`, the obviously right reference: a ``jax.lax.scan`` over tokens with
  ``jax.grad`` of the loss at each step, at the chunk-start weights it keeps in its carry.
- :func:`init_state` / :func:`step`: one-token decoding on an explicit :class:`MemoryState`.

Decoding is exact for every chunk size: the :class:`MemoryState` carries, besides ``(M, S)``,
the chunk-start effective weights ``frozen`` and the number of tokens consumed ``count``. A
:func:`step` refreshes ``frozen`` to the current weights where ``count % C == 0`` (a
``jnp.where``, so it traces once) and takes the token's gradient there, so
``titans(x[:n], return_state=True)`` followed by steps over ``x[n:]`` equals ``titans(x)``.
The parallel forms continue from any state, also one in the middle of a chunk
(``r = count % C != 0``, concrete or traced under ``jit``): the stream is laid on the chunk grid
by ``r`` neutral tokens in front (``theta = 0``, ``eta = 1``, ``alpha = 0`` and a mask that
keeps their momentum out of the weights: they change nothing), the first chunk takes its
gradients at the state's ``frozen`` weights, and the rest is the ordinary chunked form. With a
concrete ``count`` the front padding has exactly ``r`` tokens (none at a chunk start, the
common case, at no cost); with a traced one the stream is gathered into a fixed length
``T + C - 1`` (``r`` neutral tokens in front, the rest after: at most ``C - 1`` extra tokens).
``count`` is an int32 scalar (every sequence of the batch has consumed as many tokens); a
``[batch]`` count (sequences at different positions) is accepted as well.

Numerics: everything in float32. The segment decays ``D`` and ``G`` above are prefix products
(``jax.lax.associative_scan``) of masked factors in ``[0, 1]``: no ratio of cumulative products
(the unstable ``beta_t / beta_i`` form), no ``exp`` of differences of cumulative logs (which
loses ``|sum log| * eps`` of relative precision and needs a clamp at ``alpha = 1``/``eta = 0``),
no overflow (underflow goes to the right limit 0), exact and differentiable at ``alpha = 1``
and ``eta = 0``. ``grad_clip`` rescales each token's gradient to a
global norm (over all layers) of at most ``grad_clip``; in factored form
``||h^T delta||_F = ||h|| ||delta||``, so the clipped chunked form stays exact.

Gates (per token, checked when concrete: a ValueError names the gate): ``theta >= 0``,
``eta in [0, 1]``, ``alpha in [0, 1]`` (``delta >= 0`` for Miras' Huber bias), NaN nowhere.

Causal only: every form raises a ValueError unless called with ``causal=True`` (the zoo's
transforms take ``causal=False`` by default, like ``jax.nn.dot_product_attention``).

Heads: one memory per query head; k/v with fewer heads (grouped-query) are repeated. Keys and
queries are used as given: the paper's layer l2-normalises them (and adds SiLU and convolutions)
before calling the memory.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention.common import (
    affine_scan,
    as_int,
    check_choice,
    check_float,
    check_qkv,
    check_range,
    check_token,
    chunk,
    concrete,
    per_head,
    repeat_kv,
    shape_str,
    unchunk,
)

Array = jax.Array
FORMS = ("dual", "materialize")
DEFAULT_CHUNK = 64
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}
# Default gates (constants broadcast to every token), for calls without the layer's learned gates:
# theta = THETA_SCALE / key_dim, eta = DEFAULT_ETA, alpha = DEFAULT_ALPHA. Chosen to stay bounded
# with unit-variance or l2-normalised keys, matrix and 2-layer MLP memories, chunks up to 256
# (measured at T = 4096): a chunk sums C gradients taken at the same weights, so the stable step
# shrinks with the chunk size and the momentum gain 1 / (1 - eta).
THETA_SCALE = 0.01
DEFAULT_ETA = 0.5
DEFAULT_ALPHA = 0.0
# Valid ranges of the gates (lo, hi; None = unbounded), checked when the values are concrete.
GATE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "theta": (0.0, None), "eta": (0.0, 1.0), "alpha": (0.0, 1.0), "delta": (0.0, None),
}
# The gates of a neutral token (no write, momentum kept, no decay): used to lay a stream that
# starts inside a chunk on the chunk grid. Order: q, k, v, theta, eta, alpha, aux (delta).
_NEUTRAL = (0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0)


class MemoryState(NamedTuple):
    """Recurrent state of a test-time memory (float32 arrays, int32 ``count``).

    weights: per layer ``[batch, heads, d_in, d_out]`` memory parameters ``A`` (for Titans the MLP
      weights; for Miras read-outs such as Lq / KL the parameters before the read-out).
    momentum: the surprise ``S`` with the same shapes (unchanged by gradient descent without
      momentum, Miras' ``algorithm="gd"``).
    frozen: the effective weights ``R(A)`` at the start of the current chunk, where the gradients
      of the chunk's tokens are taken (same shapes; only read while ``count % chunk_size != 0``).
    count: tokens consumed, int32 ``[]`` (or ``[batch]``); a chunk starts where
      ``count % chunk_size == 0``.
    """

    weights: tuple[Array, ...]
    momentum: tuple[Array, ...]
    frozen: tuple[Array, ...]
    count: Array


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a memory learns (static configuration): used by Titans and by the Miras framework.

    loss(o, v, aux) -> per-token loss (feature axis last); readout(A) -> effective weights of one
    layer (``None`` = identity); aux = extra per-token data of the loss (Huber's delta).
    """

    loss: Callable[[Array, Array, Any], Array]
    activation: str = "gelu"
    residual: bool = False
    readout: Callable[[Array], Array] | None = None
    grad_clip: float | None = None
    # True: the key array carries [write key, prediction key] concatenated on the feature axis
    # (the general momentum delta rule: predict at the prediction key, write along the write key)
    prediction_key: bool = False

    def read(self, weights: Sequence[Array]) -> tuple[Array, ...]:
        return tuple(weights) if self.readout is None else tuple(self.readout(w) for w in weights)


def l2_loss(o: Array, v: Array, aux: Any = None) -> Array:
    """Titans' associative loss ``||o - v||^2`` per token (feature axis last)."""
    return jnp.sum(jnp.square(o - v), axis=-1)


# ----------------------------------------------------------------------------- memory MLP


def apply_memory(
    weights: Sequence[Array], x: Array, *, activation: str = "gelu", residual: bool = False,
) -> Array:
    """The memory MLP ``M(x)``: ``h_0 = x``, ``z_l = h_{l-1} W_l``, ``h_l = act(z_l)`` (l < L),
    ``M(x) = z_L`` (``+ x`` when ``residual``).

    ``weights[l]`` ``[..., d_{l-1}, d_l]``, ``x`` ``[..., n, d_0]`` with matching leading dims
    (e.g. ``[batch, heads]``); returns ``[..., n, d_L]``.
    """
    act = ACTIVATIONS[activation]
    h = x
    for i, w in enumerate(weights):
        h = jnp.einsum("...nd,...de->...ne", h, w)
        if i < len(weights) - 1:
            h = act(h)
    return h + x if residual else h


def _mlp_vec(weights, x, rule):  # one head, one vector x [d_0]
    return apply_memory(weights, x[None], activation=rule.activation, residual=rule.residual)[0]


def init_weights(
    key: Array | None, heads: int, key_dim: int, value_dim: int | None = None, *,
    depth: int = 1, expansion: int = 4,
) -> tuple[Array, ...]:
    """Initial memory weights, one set per head: ``depth`` arrays ``[heads, d_in, d_out]``.

    Depth 1 (matrix memory): zeros ``[heads, key_dim, value_dim]`` (``key`` may be None).
    Depth >= 2: hidden width ``expansion * key_dim``, every layer LeCun-normal
    ``W ~ N(0, 1 / d_in)`` drawn from ``key`` (required: an all-zero MLP memory never learns, its
    gradients vanish).
    """
    depth = as_int("depth", depth, allow_none=False)
    expansion = as_int("expansion", expansion, allow_none=False)
    e = key_dim if value_dim is None else value_dim
    if depth == 1:
        return (jnp.zeros((heads, key_dim, e), jnp.float32),)
    if key is None:
        raise ValueError(f"an MLP memory (depth={depth}) needs weights=... or a PRNG key=... to draw them")
    dims = [key_dim] + [expansion * key_dim] * (depth - 1) + [e]
    keys = jax.random.split(key, depth)
    return tuple(
        jax.random.normal(kk, (heads, dims[i], dims[i + 1]), jnp.float32) / math.sqrt(dims[i])
        for i, kk in enumerate(keys)
    )


def init_state(
    batch: int, heads: int, head_dim: int, value_dim: int | None = None, *,
    weights: Sequence[Array] | None = None, depth: int | None = None, expansion: int = 4,
    key: Array | None = None,
) -> MemoryState:
    """Decoding state at the start of a stream: ``weights`` (per head ``[heads, d_in, d_out]``,
    default :func:`init_weights`) broadcast over the batch, zero momentum, ``count = 0`` (the
    next token starts a chunk, so ``frozen``, a copy of the weights here, is refreshed before use)."""
    w = _initial_weights(weights, depth, expansion, key, heads, head_dim,
                         head_dim if value_dim is None else value_dim)
    ws = tuple(jnp.broadcast_to(x, (batch,) + x.shape) for x in w)
    return MemoryState(ws, tuple(jnp.zeros_like(x) for x in ws), ws, jnp.zeros((), jnp.int32))


def _initial_weights(weights, depth, expansion, key, heads, dk, dv) -> tuple[Array, ...]:
    depth = as_int("depth", depth)
    if weights is None:
        return init_weights(key, heads, dk, dv, depth=1 if depth is None else depth, expansion=expansion)
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"weights must be a non-empty list/tuple of [heads, d_in, d_out] arrays; got "
                         f"{type(weights).__name__}")
    if depth is not None and depth != len(weights):
        raise ValueError(f"depth={depth} but weights has {len(weights)} layers")
    ws = tuple(jnp.asarray(w, jnp.float32) for w in weights)
    d_in = dk
    for i, w in enumerate(ws):
        last = i == len(ws) - 1
        if w.ndim != 3 or w.shape[:2] != (heads, d_in) or (last and w.shape[2] != dv):
            raise ValueError(
                f"weights[{i}] must be [heads={heads}, {d_in}, {dv if last else 'd_out'}]; got {shape_str(w)}"
            )
        d_in = w.shape[2]
    return ws


def _check_count(count: Any, b: int) -> Any:
    """``count`` as int32 (a NumPy array when concrete, so that the parallel forms can lay the
    stream on the chunk grid statically); ValueError unless an integer ``[]`` or ``[batch]``."""
    dt = getattr(count, "dtype", None)
    if dt is None and isinstance(count, int) and not isinstance(count, bool):
        dt = np.dtype(np.int32)
    shape = tuple(getattr(count, "shape", ()))
    if dt is None or not jnp.issubdtype(dt, jnp.integer) or shape not in ((), (b,)):
        raise ValueError(f"state.count must be an integer array of shape [] or [batch={b}] (tokens consumed); "
                         f"got {type(count).__name__} {shape_str(count)} {dt}")
    c = concrete(count)
    if c is not None:
        if np.any(c < 0):
            raise ValueError(f"state.count must be >= 0; got {c}")
        return c.astype(np.int32)
    return jnp.asarray(count, jnp.int32)


def _check_state(state, b, h, dk, dv) -> MemoryState:
    if not isinstance(state, MemoryState):
        raise ValueError(f"initial_state/state must be a MemoryState; got {type(state).__name__}")
    ws, ms, fr = tuple(state.weights), tuple(state.momentum), tuple(state.frozen)
    if not ws or len(ms) != len(ws) or len(fr) != len(ws):
        raise ValueError(f"state must hold one weight, one momentum and one frozen array per layer; got "
                         f"{len(ws)} weights, {len(ms)} momenta, {len(fr)} frozen")
    d_in = dk
    for i, (w, m, f) in enumerate(zip(ws, ms, fr)):
        last = i == len(ws) - 1
        ok = getattr(w, "ndim", 0) == 4 and w.shape[:3] == (b, h, d_in) and (not last or w.shape[3] == dv)
        if not ok or getattr(m, "shape", None) != w.shape or getattr(f, "shape", None) != w.shape:
            raise ValueError(
                f"state.weights[{i}], state.momentum[{i}] and state.frozen[{i}] must be [batch={b}, heads={h}, "
                f"{d_in}, {dv if last else 'd_out'}]; got {shape_str(w)}, {shape_str(m)} and {shape_str(f)}"
            )
        d_in = w.shape[3]
    f32 = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)
    return MemoryState(f32(ws), f32(ms), f32(fr), _check_count(state.count, b))


# ----------------------------------------------------------------------------- inputs


def _check_gate_range(name: str, x: Any) -> None:
    lo, hi = GATE_RANGES.get(name, (None, None))
    check_range(name, x, lo, hi)


def gate(name: str, x: Any, b: int, t: int, h: int) -> Array:
    """A gate given as a scalar, ``[heads]`` or per token ``[batch, length, heads]`` ->
    ``[batch, length, heads]`` float32; ValueError naming ``name`` for another shape, or for a
    concrete value outside its range (``GATE_RANGES``) or NaN."""
    _check_gate_range(name, x)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim <= 1:
        try:
            x = per_head(name, x, h)
        except ValueError:
            raise ValueError(
                f"{name} must be a scalar, [heads={h}] or [batch={b}, length={t}, heads={h}]; got "
                f"{shape_str(x)}"
            ) from None
        return jnp.broadcast_to(x, (b, t, h))
    if x.shape != (b, t, h):
        raise ValueError(
            f"{name} must be a scalar, [heads={h}] or [batch={b}, length={t}, heads={h}]; got {shape_str(x)}"
        )
    return x


def step_gate(name: str, x: Any, b: int, h: int) -> Array:
    """A one-token gate (scalar, ``[heads]`` or ``[batch, heads]``) -> ``[batch, heads]`` (range
    checked as :func:`gate`)."""
    _check_gate_range(name, x)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2 and x.shape == (b, h):
        return x
    if x.ndim <= 1:
        try:
            return jnp.broadcast_to(per_head(name, x, h), (b, h))
        except ValueError:
            pass
    raise ValueError(f"{name} must be a scalar, [heads={h}] or [batch={b}, heads={h}]; got {shape_str(x)}")


def check_options(*, activation: str, residual: bool, grad_clip: Any, dk: int, dv: int) -> None:
    check_choice("activation", activation, tuple(ACTIVATIONS))
    if residual and dk != dv:
        raise ValueError(f"residual=True needs key_dim == value_dim; got {dk} and {dv}")
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        raise ValueError(f"grad_clip must be a positive number or None; got {grad_clip!r}")


def check_chunk(chunk_size: Any) -> int:
    """``chunk_size`` as a positive ``int`` (NumPy integers accepted); ValueError otherwise."""
    return as_int("chunk_size", chunk_size, allow_none=False)


def check_causal(causal: Any) -> None:
    if causal is not True:
        raise ValueError(f"test-time memories are causal only: pass causal=True; got causal={causal!r}")


def prepare(q, k, v, causal):
    """Validates q/k/v (causal only), repeats grouped k/v heads, returns float32 ``[B, T, H, d]``."""
    check_causal(causal)
    _, _, groups = check_qkv(q, k, v, causal=True)
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    f = lambda x: jnp.asarray(x, jnp.float32)
    return f(q), f(k), f(v)


def start_state(initial_state, weights, depth, expansion, key, b, h, dk, dv) -> MemoryState:
    if initial_state is not None:
        return _check_state(initial_state, b, h, dk, dv)
    st = init_state(b, h, dk, dv, weights=weights, depth=depth, expansion=expansion, key=key)
    return st._replace(count=np.zeros((), np.int32))  # concrete: a chunk starts at token 0


# ----------------------------------------------------------------------------- chunked engine
# Arrays inside: [B, H, C, d] per chunk, weights [B, H, d_in, d_out], gates [B, H, C] or None,
# mask [B, H, C] (1 = real token, 0 = neutral) or None (all real).


def _clip_scale(sq: Array, clip: float) -> Array:
    """``min(1, clip / sqrt(sq))`` with a finite gradient at ``sq = 0``."""
    big = sq > clip * clip
    return jnp.where(big, clip * jax.lax.rsqrt(jnp.where(big, sq, 1.0)), 1.0)


def _split_key(k: Array, rule: Rule) -> tuple[Array, Array]:
    """``(write key, prediction key)``: the halves of ``k`` with ``rule.prediction_key``, else ``k`` twice."""
    if not rule.prediction_key:
        return k, k
    d = k.shape[-1] // 2
    return k[..., :d], k[..., d:]


def _factors(w0, k, v, aux, rule):
    """Per-token gradients at the weights ``w0`` in factored form: layer inputs ``hs[l]``
    ``[B, H, C, d_{l-1}]`` and error signals ``deltas[l]`` ``[B, H, C, d_l]``, so that token j's
    gradient of layer l is ``hs[l][j]^T deltas[l][j]`` (clipped when ``rule.grad_clip``). With a
    prediction key the forward pass runs at it and the first layer's input is the write key."""
    act = ACTIVATIONS[rule.activation]
    kw, k = _split_key(k, rule)

    def total(offsets):
        h, hs = k, []
        for i, w in enumerate(w0):
            hs.append(h)
            h = jnp.einsum("bhcd,bhde->bhce", h, w) + offsets[i]
            if i < len(w0) - 1:
                h = act(h)
        o = h + k if rule.residual else h
        return jnp.sum(rule.loss(o, v, aux)), hs

    zeros = [jnp.zeros(k.shape[:-1] + (w.shape[-1],), jnp.float32) for w in w0]
    deltas, hs = jax.grad(total, has_aux=True)(zeros)
    hs = [kw] + list(hs[1:])  # the write key carries the first layer's update
    if rule.grad_clip is not None:
        sq = sum(jnp.sum(h * h, -1) * jnp.sum(d * d, -1) for h, d in zip(hs, deltas))
        s = _clip_scale(sq, rule.grad_clip)[..., None]
        deltas = [d * s for d in deltas]
    return hs, deltas


def _segment_products(g: Array) -> Array:
    """``g [..., C]`` -> ``P [..., C, C]`` with ``P[i, j] = prod_{j<u<=i} g_u`` for ``j <= i``, else 0
    (prefix products of masked factors: no division, exact zeros)."""
    c = g.shape[-1]
    i = jnp.arange(c)
    x = jnp.where(i[:, None] > i[None, :], g[..., :, None], 1.0)  # x[..., u, j] = g_u if u > j
    # an associative scan (O(C^2 log C)); jnp.cumprod lowers to an O(C^3) reduce-window on CPU
    return jnp.where(i[:, None] >= i[None, :], jax.lax.associative_scan(jnp.multiply, x, axis=-2), 0.0)


def _outer_sum(coef: Array, h: Array, d: Array) -> Array:
    """``sum_j coef_j h_j^T d_j``: ``[B, H, C] x [B, H, C, d_in] x [B, H, C, d_out] -> [B, H, d_in, d_out]``."""
    return jnp.einsum("bhjd,bhje->bhde", h, coef[..., None] * d)


def _chunk_dual(ws, ms, gw, xs, mask, row, rule):
    """One chunk in the dual form (identity read-out only), gradients at the weights ``gw``; the
    state returned is the one after token ``row`` of the chunk (the last real token; later ones
    are padding). ``mask`` keeps the momentum of neutral tokens out of the weights."""
    q, k, v, theta, eta, alpha, aux = xs
    c = q.shape[2]
    hs, deltas = _factors(gw, k, v, aux, rule)
    if alpha is None:
        dmat = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), jnp.float32)), theta.shape + (c,))
        a = jnp.ones_like(theta)
    else:
        dmat, a = _segment_products(1.0 - alpha), jnp.cumprod(1.0 - alpha, axis=-1)
    if eta is None:  # gradient descent: S_i = -theta_i u_i enters the weights, no momentum state
        s = None
        cmat = -dmat * theta[..., None, :]
    else:
        gmat = _segment_products(eta)
        e = jnp.cumprod(eta, axis=-1)
        dm = dmat if mask is None else dmat * mask[..., None, :]  # M_i = (1-alpha_i) M + mask_i S_i
        s = jnp.einsum("bhim,bhm->bhi", dm, e)
        cmat = -jnp.einsum("bhim,bhmj->bhij", dm, gmat) * theta[..., None, :]
        m_row = -theta * gmat[..., row, :]
    act = ACTIVATIONS[rule.activation]
    h = q
    new_ws, new_ms = [], []
    for i, (w0, s0) in enumerate(zip(ws, ms)):
        z = a[..., None] * jnp.einsum("bhcd,bhde->bhce", h, w0)
        if s is not None:
            z = z + s[..., None] * jnp.einsum("bhcd,bhde->bhce", h, s0)
        att = cmat * jnp.einsum("bhid,bhjd->bhij", h, hs[i])
        z = z + jnp.einsum("bhij,bhje->bhie", att, deltas[i])
        h = act(z) if i < len(ws) - 1 else z
        # the state after the row token
        new_w = a[..., row, None, None] * w0 + _outer_sum(cmat[..., row, :], hs[i], deltas[i])
        new_m = s0
        if s is not None:
            new_w = new_w + s[..., row, None, None] * s0
            new_m = e[..., row, None, None] * s0 + _outer_sum(m_row, hs[i], deltas[i])
        new_ws.append(new_w)
        new_ms.append(new_m)
    y = h + q if rule.residual else h
    return tuple(new_ws), tuple(new_ms), y


def _linear_scan(a: Array, x: Array, h0: Array) -> Array:
    """``h_i = a_i h_{i-1} + x_i`` along axis 2 for ``a [B, H, C]``, ``x [B, H, C, ...]``,
    ``h0 [B, H, ...]`` (:func:`zoo.attention.common.affine_scan`); returns every ``h_i``."""
    pa, px = affine_scan(a, x, axis=2)
    return pa[..., None, None] * h0[:, :, None] + px


def _chunk_materialize(ws, ms, gw, xs, mask, row, rule):
    """One chunk with the per-token weights materialised by associative scans (any read-out),
    gradients at the effective weights ``gw``."""
    q, k, v, theta, eta, alpha, aux = xs
    hs, deltas = _factors(gw, k, v, aux, rule)
    act = ACTIVATIONS[rule.activation]
    h = q
    new_ws, new_ms = [], []
    for i, (w0, s0) in enumerate(zip(ws, ms)):
        upd = -theta[..., None, None] * jnp.einsum("bhcd,bhce->bhcde", hs[i], deltas[i])
        if eta is None:
            mom, new_ms_i = upd, s0
        else:
            mom = _linear_scan(eta, upd, s0)
            new_ms_i = mom[:, :, row]
            if mask is not None:
                mom = mom * mask[..., None, None]
        if alpha is None:
            wt = w0[:, :, None] + jax.lax.associative_scan(jnp.add, mom, axis=2)
        else:
            wt = _linear_scan(1.0 - alpha, mom, w0)
        new_ws.append(wt[:, :, row])
        new_ms.append(new_ms_i)
        if rule.readout is not None:
            wt = rule.readout(wt)
        z = jnp.einsum("bhcd,bhcde->bhce", h, wt)
        h = act(z) if i < len(ws) - 1 else z
    y = h + q if rule.residual else h
    return tuple(new_ws), tuple(new_ms), y


def _offset(count: Any, size: int) -> tuple[Any, bool]:
    """``(count % size, static)``: a Python int when ``count`` is concrete and the same for every
    sequence, else an int32 array (``[]`` or ``[batch]``)."""
    c = concrete(count)
    if c is not None and (c.ndim == 0 or np.all(c == c.flat[0])):
        return int(c.flat[0]) % size, True
    return jnp.asarray(count, jnp.int32) % size, False


def _gather_time(x: Array, idx: Array) -> Array:
    """``x [B, T, ...]`` gathered along time per sequence: ``out[b, i] = x[b, idx[b, i]]``."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


def run_chunked(q, k, v, theta, eta, alpha, aux, state: MemoryState, *, rule: Rule, chunk: int, form: str):
    """Chunked form on ``[B, T, H, d]`` inputs and ``[B, T, H]`` gates (``eta``/``alpha``/``aux``
    may be None), continuing from ``state`` (possibly inside a chunk: module docstring).
    Returns ``(y [B, T, H, d_v], final MemoryState)``."""
    fn = _chunk_dual if form == "dual" else _chunk_materialize
    b, t, h = theta.shape
    xs = (q, k, v, theta, eta, alpha, aux)
    r, static = _offset(state.count, chunk)
    cur = rule.read(state.weights)
    mask, gw0 = None, cur
    if static and r:  # r neutral tokens in front: the first chunk holds chunk - r real tokens
        xs = tuple(None if x is None else jnp.concatenate([jnp.full((b, r) + x.shape[2:], n, x.dtype), x], 1)
                   for x, n in zip(xs, _NEUTRAL))
        mask = jnp.concatenate([jnp.zeros((b, r, h)), jnp.ones((b, t, h))], axis=1)
        gw0 = tuple(state.frozen)
    elif not static:  # traced offset: gather into T + chunk - 1 slots, r neutral ones in front
        rb = jnp.broadcast_to(r, (b,))
        pos = jnp.arange(t + chunk - 1)[None, :] - rb[:, None]
        real = (pos >= 0) & (pos < t)
        idx = jnp.clip(pos, 0, t - 1)

        def place(x, n):
            return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), _gather_time(x, idx), n)

        xs = tuple(None if x is None else place(x, n) for x, n in zip(xs, _NEUTRAL))
        mask = jnp.broadcast_to(real[..., None], real.shape + (h,)).astype(jnp.float32)
        start = (rb == 0)[:, None, None, None]
        gw0 = tuple(jnp.where(start, c, f) for c, f in zip(cur, state.frozen))
    length = xs[0].shape[1]
    c = min(chunk, length)
    n = -(-length // c)

    def split(x):  # [B, L, H, ...] -> [n, B, H, c, ...] (zero padding at the end)
        x = chunk_axis(x, c)
        return jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))

    # Padding sits after the last real token, so (causality) it changes neither the outputs
    # kept nor the state, which each chunk reads at its last real token ``rows[j]``; neutral
    # tokens (mask 0) change nothing, so the gathered form may read it after them.
    rows = jnp.full((n,), c - 1, jnp.int32).at[-1].set((length - 1) % c)
    xs_c = tuple(None if x is None else split(x) for x in xs)
    mask_c = None if mask is None else split(mask)
    first = jnp.arange(n) == 0
    plain = static and not r  # every chunk starts at a chunk start of the stream

    def body(carry, inp):
        ws, ms, fr = carry
        x, m, row, is_first = inp
        gw = rule.read(ws)
        if not plain:
            gw = tuple(jnp.where(is_first, g0, g) for g0, g in zip(gw0, gw))
        ws, ms, y = fn(ws, ms, gw, x, m, row, rule)
        if m is not None and not static:  # a chunk of neutral tokens only keeps the frozen weights
            has = jnp.any(m > 0, axis=(1, 2))[:, None, None, None]
            gw = tuple(jnp.where(has, g, f) for g, f in zip(gw, fr))
        return (ws, ms, gw), y

    init = (tuple(state.weights), tuple(state.momentum), tuple(state.frozen))
    (ws, ms, fr), y = jax.lax.scan(body, init, (xs_c, mask_c, rows, first))
    y = unchunk(jnp.transpose(y, (1, 0, 3, 2, 4)), length, axis=1)  # [n, B, H, c, e] -> [B, L, H, e]
    if static:
        y = y[:, r:r + t]
    else:
        y = _gather_time(y, jnp.arange(t)[None, :] + rb[:, None])
    return y, MemoryState(ws, ms, fr, _advance(state.count, t))


def chunk_axis(x: Array, size: int) -> Array:
    """``[B, L, ...] -> [B, n, size, ...]`` (:func:`zoo.attention.common.chunk`, zero padded)."""
    return chunk(x, size, axis=1)[0]


def _advance(count: Any, t: int) -> Array:
    return jnp.asarray(count, jnp.int32) + jnp.int32(t)


# ----------------------------------------------------------------------------- sequential reference


def token_update(ws, ms, frozen, refresh, q, k, v, theta, eta, alpha, aux, rule: Rule):
    """One token of the recurrence for one head. Where ``refresh`` (a chunk starts at this
    token) the frozen weights become the current effective weights ``rule.read(ws)``; the
    gradient is taken at the frozen weights; ``S = eta S - theta g`` (``eta`` None: gradient
    descent, the write is ``-theta g`` and ``S`` is unchanged), ``A = (1 - alpha) A + S``
    (``alpha`` None: no decay); read ``y = M(q)`` with ``rule.read(A)``. Returns
    ``(y, ws, ms, frozen)``."""
    frozen = tuple(jnp.where(refresh, c, f) for c, f in zip(rule.read(ws), frozen))
    if rule.prediction_key:
        kw, kp = _split_key(k, rule)
        act = ACTIVATIONS[rule.activation]

        def write_loss(dw):  # the loss at M(kp) under a weight change dw carried by the write key kw
            h = kp
            for i, (w, d) in enumerate(zip(frozen, dw)):
                h = h @ w + (kw if i == 0 else h) @ d
                h = act(h) if i < len(frozen) - 1 else h
            return rule.loss(h + kp if rule.residual else h, v, aux)

        g = jax.grad(write_loss)(tuple(jnp.zeros_like(w) for w in frozen))
    else:
        g = jax.grad(lambda w: rule.loss(_mlp_vec(w, k, rule), v, aux))(frozen)
    if rule.grad_clip is not None:
        s = _clip_scale(sum(jnp.sum(x * x) for x in g), rule.grad_clip)
        g = tuple(s * x for x in g)
    upd = tuple(-theta * x for x in g)
    if eta is not None:
        ms = upd = tuple(eta * m + u for m, u in zip(ms, upd))
    ws = tuple(w + u if alpha is None else (1.0 - alpha) * w + u for w, u in zip(ws, upd))
    return _mlp_vec(rule.read(ws), q, rule), ws, ms, frozen


def run_sequential(q, k, v, theta, eta, alpha, aux, state: MemoryState, *, rule: Rule, chunk: int):
    """Token-by-token reference on ``[B, T, H, d]`` inputs and ``[B, T, H]`` gates, continuing from
    ``state``: each token's gradient is taken at the weights of the start of its chunk (a chunk
    starts where the number of tokens consumed is a multiple of ``chunk``)."""
    b = q.shape[0]

    def one_head(ws, ms, fr, count, q, k, v, theta, eta, alpha, aux):
        def body(carry, x):
            ws, ms, fr, i = carry
            y, ws, ms, fr = token_update(ws, ms, fr, i % chunk == 0, *x, rule)
            return (ws, ms, fr, i + 1), y

        (ws, ms, fr, _), y = jax.lax.scan(body, (ws, ms, fr, count), (q, k, v, theta, eta, alpha, aux))
        return y, ws, ms, fr

    # vmap over batch (axis 0), then heads (axis 1 of the per-token arrays, 0 of the state)
    inner = jax.vmap(one_head, in_axes=(0, 0, 0, None) + (1,) * 7, out_axes=(1, 0, 0, 0))
    f = jax.vmap(inner)
    count = jnp.broadcast_to(jnp.asarray(state.count, jnp.int32), (b,))
    y, ws, ms, fr = f(state.weights, state.momentum, state.frozen, count, q, k, v, theta, eta, alpha, aux)
    return y, MemoryState(ws, ms, fr, _advance(state.count, q.shape[1]))


# ----------------------------------------------------------------------------- public API


def _with_prediction_key(kf: Array, k: Array, prediction_key: Any, *, token: bool = False) -> Array:
    """``[write key, prediction key]`` concatenated on the feature axis (``kf``: the write key with
    grouped heads repeated, float32; ``k``: as given, for the shape check)."""
    layout = "[batch, kv_heads, key_dim]" if token else "[batch, length, kv_heads, key_dim]"
    name = "prediction_key"
    if getattr(prediction_key, "shape", None) != k.shape:
        raise ValueError(f"{name} must have k's shape {shape_str(k)} = {layout}; got {shape_str(prediction_key)}")
    check_float(name, prediction_key)
    groups = kf.shape[-2] // k.shape[-2]
    p = jnp.asarray(prediction_key, jnp.float32)
    p = repeat_kv(p[:, None], groups)[:, 0] if token else repeat_kv(p, groups)
    return jnp.concatenate([kf, p], axis=-1)


def _titans_inputs(q, k, v, theta, eta, alpha, weights, depth, expansion, key, activation, residual,
                   grad_clip, initial_state, causal, prediction_key=None):
    qf, kf, vf = prepare(q, k, v, causal)
    b, t, h, dk = kf.shape
    dv = vf.shape[-1]
    check_options(activation=activation, residual=residual, grad_clip=grad_clip, dk=dk, dv=dv)
    th = gate("theta", THETA_SCALE / dk if theta is None else theta, b, t, h)
    et = gate("eta", DEFAULT_ETA if eta is None else eta, b, t, h)
    al = gate("alpha", DEFAULT_ALPHA if alpha is None else alpha, b, t, h)
    state = start_state(initial_state, weights, depth, expansion, key, b, h, dk, dv)
    rule = Rule(l2_loss, activation=activation, residual=residual, grad_clip=grad_clip,
                prediction_key=prediction_key is not None)
    if prediction_key is not None:
        kf = _with_prediction_key(kf, k, prediction_key)
    return (qf, kf, vf, th, et, al, None), state, rule


def titans(
    q: Array, k: Array, v: Array, *,
    theta: Any = None, eta: Any = None, alpha: Any = None,
    weights: Sequence[Array] | None = None, depth: int | None = None, expansion: int = 4,
    key: Array | None = None, activation: str = "gelu", residual: bool = False,
    grad_clip: float | None = None, chunk_size: int = DEFAULT_CHUNK, form: str = "dual",
    prediction_key: Array | None = None,
    initial_state: MemoryState | None = None, return_state: bool = False, causal: bool = False,
) -> Array | tuple[Array, MemoryState]:
    """Titans neural memory, chunked parallel form (see the module docstring for the equations).

    ``S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)``, ``M_t = (1 - alpha_t) M_{t-1} + S_t``,
    ``y_t = M_t(q_t)``, ``l = ||M(k) - v||^2``, gradients at the weights ``M_{t'}`` of the start of
    the token's chunk (``chunk_size=1``: the exact recurrence).

    Args:
      q: ``[batch, length, heads, key_dim]``; k: ``[batch, length, kv_heads, key_dim]``;
        v: ``[batch, length, kv_heads, value_dim]`` (``heads % kv_heads == 0``), floating point.
      theta, eta, alpha: learning rate (``>= 0``), momentum and forgetting (in ``[0, 1]``):
        scalars, ``[heads]`` or per token ``[batch, length, heads]``. Defaults:
        ``theta = 0.01 / key_dim``, ``eta = 0.5``, ``alpha = 0`` (constants for every token;
        conservative, see ``THETA_SCALE``).
      weights: initial memory weights, ``depth`` arrays ``[heads, d_in, d_out]`` (first
        ``d_in = key_dim``, last ``d_out = value_dim``). Default :func:`init_weights`: zeros for
        depth 1; an MLP (``depth >= 2``, hidden ``expansion * key_dim``) needs ``key``.
      activation: ``gelu | silu | relu | tanh | identity`` between layers; residual: ``M(x) + x``.
      grad_clip: max global norm of each token's gradient (None: no clipping).
      chunk_size: tokens per chunk (default 64, the same default as :func:`step` and
        :func:`titans_naive`; 1 = the exact recurrence); form: ``"dual"`` or ``"materialize"``.
      prediction_key: the general momentum delta rule: ``[batch, length, kv_heads, key_dim]`` keys
        ``p_t`` at which the memory predicts (the surprise), while ``k_t`` carries the write (see
        the module docstring); None: ``p = k`` (Titans).
      initial_state / return_state: start from / also return a :class:`MemoryState` (the state
        overrides ``weights``; it may stop inside a chunk: the chunk grid continues from
        ``initial_state.count``, so chaining calls, or a call and :func:`step` s, equals one call).
      causal: must be True (ValueError otherwise).

    Returns ``[batch, length, heads, value_dim]`` in ``v.dtype`` (float32 inside) and the final
    state when ``return_state``.

    Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Sec. 3.
    """
    chunk_size = check_chunk(chunk_size)
    check_choice("form", form, FORMS)
    xs, state, rule = _titans_inputs(q, k, v, theta, eta, alpha, weights, depth, expansion, key,
                                     activation, residual, grad_clip, initial_state, causal, prediction_key)
    y, state = run_chunked(*xs, state, rule=rule, chunk=chunk_size, form=form)
    y = y.astype(v.dtype)
    return (y, state) if return_state else y


def titans_naive(
    q: Array, k: Array, v: Array, *,
    theta: Any = None, eta: Any = None, alpha: Any = None,
    weights: Sequence[Array] | None = None, depth: int | None = None, expansion: int = 4,
    key: Array | None = None, activation: str = "gelu", residual: bool = False,
    grad_clip: float | None = None, chunk_size: int = DEFAULT_CHUNK, prediction_key: Array | None = None,
    initial_state: MemoryState | None = None, return_state: bool = False, causal: bool = False,
) -> Array | tuple[Array, MemoryState]:
    """Reference: the Titans recurrence token by token (``jax.lax.scan``, ``jax.grad`` per token),
    gradients at the weights of each chunk start (kept in the carry, as in :func:`step`);
    ``chunk_size=1``: the exact recurrence, gradient at ``M_{t-1}``. Arguments (and the default
    chunk size) as :func:`titans`: the oracle of :func:`titans` with the same ``chunk_size``."""
    chunk_size = check_chunk(chunk_size)
    xs, state, rule = _titans_inputs(q, k, v, theta, eta, alpha, weights, depth, expansion, key,
                                     activation, residual, grad_clip, initial_state, causal, prediction_key)
    y, state = run_sequential(*xs, state, rule=rule, chunk=chunk_size)
    y = y.astype(v.dtype)
    return (y, state) if return_state else y


def step_inputs(state, q_t, k_t, v_t):
    """Validates one-token inputs (:func:`zoo.attention.common.check_token`) and the state,
    repeats grouped k/v heads; returns the state, float32 arrays and b, h."""
    _, _, groups = check_token(q_t, k_t, v_t)
    k_t, v_t = repeat_kv(k_t[:, None], groups)[:, 0], repeat_kv(v_t[:, None], groups)[:, 0]
    b, h, dk = q_t.shape
    state = _check_state(state, b, h, dk, v_t.shape[-1])
    f = lambda x: jnp.asarray(x, jnp.float32)
    return state, f(q_t), f(k_t), f(v_t), b, h


def run_step(state, q, k, v, theta, eta, alpha, aux, rule, chunk: int):
    """One token for every (batch, head): refresh the frozen weights where ``count % chunk == 0``,
    gradient there, ``count + 1``."""
    refresh = jnp.broadcast_to(jnp.asarray(state.count, jnp.int32) % chunk == 0, (q.shape[0],))
    one = functools.partial(token_update, rule=rule)
    inner = jax.vmap(one, in_axes=(0, 0, 0, None) + (0,) * 7)
    y, ws, ms, fr = jax.vmap(inner)(
        state.weights, state.momentum, state.frozen, refresh, q, k, v, theta, eta, alpha, aux)
    return y, MemoryState(ws, ms, fr, _advance(state.count, 1))


def step(
    state: MemoryState, q_t: Array, k_t: Array, v_t: Array, *,
    theta: Any = None, eta: Any = None, alpha: Any = None,
    activation: str = "gelu", residual: bool = False, grad_clip: float | None = None,
    chunk_size: int = DEFAULT_CHUNK, prediction_key: Array | None = None,
) -> tuple[Array, MemoryState]:
    """One decoding step of Titans: where ``state.count % chunk_size == 0`` the frozen weights
    become the current ones; ``S <- eta S - theta grad l(M_frozen; k_t, v_t)``,
    ``M <- (1 - alpha) M + S``, ``y_t = M(q_t)``, ``count <- count + 1``. With the same
    ``chunk_size`` (default 64 everywhere) steps continue :func:`titans` exactly.

    ``q_t [batch, heads, key_dim]``, ``k_t [batch, kv_heads, key_dim]``,
    ``v_t [batch, kv_heads, value_dim]``; gates scalars, ``[heads]`` or ``[batch, heads]`` (defaults
    and ranges as :func:`titans`); ``prediction_key`` ``[batch, kv_heads, key_dim]`` (or None) as
    :func:`titans`. Returns ``(y_t [batch, heads, value_dim] in v_t.dtype, new_state)``.
    """
    chunk_size = check_chunk(chunk_size)
    state, q, k, v, b, h = step_inputs(state, q_t, k_t, v_t)
    check_options(activation=activation, residual=residual, grad_clip=grad_clip, dk=k.shape[-1],
                  dv=v.shape[-1])
    th = step_gate("theta", THETA_SCALE / k.shape[-1] if theta is None else theta, b, h)
    et = step_gate("eta", DEFAULT_ETA if eta is None else eta, b, h)
    al = step_gate("alpha", DEFAULT_ALPHA if alpha is None else alpha, b, h)
    rule = Rule(l2_loss, activation=activation, residual=residual, grad_clip=grad_clip,
                prediction_key=prediction_key is not None)
    if prediction_key is not None:
        k = _with_prediction_key(k, k_t, prediction_key, token=True)
    y, state = run_step(state, q, k, v, th, et, al, None, rule, chunk_size)
    return y.astype(v_t.dtype), state
