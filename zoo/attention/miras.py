"""Miras (Behrouz, Razaviyayn, Zhong, Mirrokni 2025): test-time memories as four composable choices.

A memory ``M`` with parameters ``A`` (one set per head) learns online from ``(k_t, v_t)`` and is
read with ``q_t``. The four choices:

1. memory architecture: a matrix (``depth=1``, ``M(x) = x W``) or an MLP (``depth >= 2``, as in
   :mod:`zoo.attention.titans`; ``residual=True`` for the papers' ``x + MLP(x)``);
2. attentional bias ``l(M(k_t); v_t)`` (``bias``), with ``r = M(k) - v``:
   ``"dot"`` ``-<M(k), v>``; ``"l2"`` ``||r||_2^2``; ``"lp"`` ``||r||_p^p`` (``p``, Moneta p=3);
   ``"huber"`` ``||r||_2^2`` if ``||r||_2 <= delta_t`` else ``delta_t ||r||_1`` (Yaad: the update
   uses the l2 gradient ``2 r`` for small errors and ``delta_t sign(r)`` for outliers; ``delta_t``
   per token);
3. retention (``retention``), a local decay ``(1 - alpha_t)`` toward 0 plus a read-out ``W = R(A)``:
   ``"none"`` (no decay, ``W = A``); ``"l2"`` (``W = A``; l2 retention = weight decay);
   ``"lq"`` (``W = A / max(||A||_q, eps)^(q-2)`` per layer, entrywise q-norm, ``q_order``; Moneta
   q=4; the ``eps`` guard keeps ``A = 0`` finite); ``"kl"`` (``W = c * softmax(A)`` over the
   inputs of each output unit, ``c = kl_scale``: Memora's KL-regularised update
   ``W_t = c Softmax((1 - alpha_t) log W_{t-1} - theta_t g_t)`` is exactly this recurrence on the
   logits ``A``, since the softmax ignores the per-slice constant ``log W - A``);
4. learning algorithm (``algorithm``): ``"gd"`` or ``"momentum"`` (``eta_t``).

The update, with gradients ``g_t = grad_W l(W_{t'}; k_t, v_t)`` taken at the effective weights of
the chunk start ``t'`` (``t' = t - 1`` for ``chunk_size=1``, the exact recurrence):

    S_t = eta_t S_{t-1} - theta_t g_t      (gd: the write is -theta_t g_t; the state's S stays as given)
    A_t = (1 - alpha_t) A_{t-1} + S_t     (retention "none": alpha = 0)
    W_t = R(A_t),   y_t = M_{W_t}(q_t)

Gates: ``theta >= 0``, ``eta in [0, 1]``, ``alpha in [0, 1]``, ``delta >= 0``, no NaN (checked when
concrete; a ValueError names the gate). Causal only: every form raises a ValueError unless
``causal=True``.

Known models are instances (tested against independent implementations):
- unnormalised causal linear attention: matrix, ``dot``, ``none``, gd, ``theta = 1``;
- gated / decayed linear attention (RetNet, GLA-style scalar gate): matrix, ``dot``, ``l2``;
- DeltaNet (beta = 2 theta with this loss): matrix, ``l2``, ``none``, gd;
  Gated DeltaNet-like with ``l2`` retention;
- Titans' neural memory: ``l2``, ``l2``, ``momentum`` (:func:`zoo.attention.titans.titans`);
- Moneta ``lp`` + ``lq``; Yaad ``huber`` + ``l2``; Memora ``l2`` + ``kl`` (presets
  :func:`moneta`, :func:`yaad`, :func:`memora`; the papers use 2-layer MLP memories: pass
  ``depth=2`` with ``key`` or ``weights``).

Forms: the chunked form of :mod:`zoo.attention.titans` (``form="dual"`` for the identity read-outs
``none``/``l2``; ``"materialize"`` per-token weights for ``lq``/``kl``; ``"auto"`` picks), the
token-by-token reference :func:`miras_naive`, and :func:`init_state` / :func:`step` for decoding.
All take ``chunk_size`` (default 64 in every form, 1 = the exact recurrence) with one meaning, so
they agree given the same value; the :class:`MemoryState` keeps the chunk-start weights and the
token count, so decoding continues the parallel form exactly, from any state (module docstring
of :mod:`zoo.attention.titans`). The Moneta/Memora normalisation is applied per token (no
chunk-boundary approximation).

Paper: Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey Through Test-Time
Memorization, Attentional Bias, Retention, and Online Optimization" (arXiv 2504.13173, 2025).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from zoo.attention.common import check_choice
from zoo.attention.titans import (
    DEFAULT_ALPHA,
    DEFAULT_CHUNK,
    DEFAULT_ETA,
    THETA_SCALE,
    MemoryState,
    Rule,
    check_chunk,
    check_options,
    gate,
    init_state,
    init_weights,
    l2_loss,
    prepare,
    run_chunked,
    run_sequential,
    run_step,
    start_state,
    step_gate,
    step_inputs,
)

Array = jax.Array
BIASES = ("dot", "l2", "lp", "huber")
RETENTIONS = ("none", "l2", "lq", "kl")
ALGORITHMS = ("gd", "momentum")
FORMS = ("auto", "dual", "materialize")
PRESETS: dict[str, dict[str, str]] = {
    "moneta": {"bias": "lp", "retention": "lq", "algorithm": "gd"},
    "yaad": {"bias": "huber", "retention": "l2", "algorithm": "gd"},
    "memora": {"bias": "l2", "retention": "kl", "algorithm": "gd"},
}
DEFAULT_DELTA = 1.0

__all__ = [
    "ALGORITHMS", "BIASES", "MemoryState", "PRESETS", "RETENTIONS", "init_state", "init_weights",
    "memora", "memory_weights", "miras", "miras_naive", "moneta", "preset", "step", "yaad",
]


# ----------------------------------------------------------------------------- choices


def _pow(x: Array, p: float) -> Array:
    """``x ** p``; an integral ``p`` uses repeated multiplication (``lax.integer_pow``), not
    ``exp(p log x)``: several times faster on CPU, exact, and smooth at ``x = 0``."""
    return x ** int(p) if float(p).is_integer() else x**p


def dot_loss(o: Array, v: Array, aux: Any = None) -> Array:
    """Dot-product attentional bias ``-<o, v>`` per token."""
    return -jnp.sum(o * v, axis=-1)


def lp_loss(o: Array, v: Array, aux: Any = None, *, p: float = 3.0) -> Array:
    """``||o - v||_p^p`` per token."""
    return jnp.sum(_pow(jnp.abs(o - v), p), axis=-1)


def huber_loss(o: Array, v: Array, delta: Array) -> Array:
    """Yaad's bias: ``||r||_2^2`` if ``||r||_2 <= delta`` else ``delta ||r||_1`` (``r = o - v``,
    ``delta`` per token)."""
    r = o - v
    sq = jnp.sum(r * r, axis=-1)
    return jnp.where(sq <= delta * delta, sq, delta * jnp.sum(jnp.abs(r), axis=-1))


def lq_readout(a: Array, *, q_order: float = 4.0, eps: float = 1e-6) -> Array:
    """Moneta's read-out ``A / max(||A||_q, eps)^(q-2)`` over the last two axes (one layer)."""
    if q_order == 2:
        return a
    s = jnp.sum(_pow(jnp.abs(a), q_order), axis=(-2, -1), keepdims=True)
    # max(s^(1/q), eps) with finite gradients at s = 0 (where s^(1/q) has an infinite slope)
    pos = s > jnp.finfo(jnp.float32).tiny
    norm = jnp.maximum(jnp.where(pos, jnp.where(pos, s, 1.0) ** (1.0 / q_order), 0.0), eps)
    return a / _pow(norm, q_order - 2)


def kl_readout(a: Array, *, scale: float = 1.0) -> Array:
    """Memora's read-out ``c * softmax(A)`` over the inputs (axis -2) of each output unit."""
    return scale * jax.nn.softmax(a, axis=-2)


def make_rule(bias, retention, *, p, q_order, kl_scale, eps, activation, residual, grad_clip) -> Rule:
    """The memory :class:`Rule` of a Miras choice: attentional-bias loss ``l(o, v)`` and, for the
    ``lq`` / ``kl`` retentions, the read-out ``R(A)`` of the parameters (public: the NNX memory
    layers build their rule with it)."""
    loss: Callable[..., Array] = {
        "dot": dot_loss, "l2": l2_loss, "lp": functools.partial(lp_loss, p=p), "huber": huber_loss,
    }[bias]
    readout = None
    if retention == "lq":
        readout = functools.partial(lq_readout, q_order=q_order, eps=eps)
    elif retention == "kl":
        readout = functools.partial(kl_readout, scale=kl_scale)
    return Rule(loss, activation=activation, residual=residual, readout=readout, grad_clip=grad_clip)


def check_choices(bias, retention, algorithm, *, p, q_order, kl_scale, eps, eta, alpha, delta):
    """Validates a Miras choice; ValueError naming the argument (shared with ``zoo.nn.MirasMemory``)."""
    check_choice("bias", bias, BIASES)
    check_choice("retention", retention, RETENTIONS)
    check_choice("algorithm", algorithm, ALGORITHMS)
    for name, x, lo in (("p", p, 1.0), ("q_order", q_order, 1.0)):
        if not (isinstance(x, (int, float)) and x >= lo):
            raise ValueError(f"{name} must be a number >= {lo}; got {x!r}")
    for name, x in (("kl_scale", kl_scale), ("eps", eps)):
        if not (isinstance(x, (int, float)) and x > 0):
            raise ValueError(f"{name} must be a positive number; got {x!r}")
    if algorithm == "gd" and eta is not None:
        raise ValueError("eta (momentum) needs algorithm='momentum'")
    if retention == "none" and alpha is not None:
        raise ValueError("alpha (forgetting) needs a retention other than 'none'")
    if bias != "huber" and delta is not None:
        raise ValueError("delta is the threshold of bias='huber'")


def memory_weights(
    weights: Sequence[Array] | MemoryState, *, retention: str = "l2", q_order: float = 4.0,
    kl_scale: float = 1.0, eps: float = 1e-6,
) -> tuple[Array, ...]:
    """The effective weights ``W = R(A)`` of memory parameters ``A`` (a :class:`MemoryState` or
    a list of ``[..., d_in, d_out]`` arrays) under ``retention``."""
    check_choice("retention", retention, RETENTIONS)
    ws = weights.weights if isinstance(weights, MemoryState) else weights
    rule = make_rule("l2", retention, p=2.0, q_order=q_order, kl_scale=kl_scale, eps=eps,
                 activation="identity", residual=False, grad_clip=None)
    return rule.read([jnp.asarray(w, jnp.float32) for w in ws])


# ----------------------------------------------------------------------------- public API


def _setup(q, k, v, *, bias, retention, algorithm, theta, eta, alpha, delta, p, q_order, kl_scale,
           eps, weights, depth, expansion, key, activation, residual, grad_clip, initial_state, causal):
    check_choices(bias, retention, algorithm, p=p, q_order=q_order, kl_scale=kl_scale, eps=eps,
                   eta=eta, alpha=alpha, delta=delta)
    qf, kf, vf = prepare(q, k, v, causal)
    b, t, h, dk = kf.shape
    dv = vf.shape[-1]
    check_options(activation=activation, residual=residual, grad_clip=grad_clip, dk=dk, dv=dv)
    th = gate("theta", THETA_SCALE / dk if theta is None else theta, b, t, h)
    et = None if algorithm == "gd" else gate("eta", DEFAULT_ETA if eta is None else eta, b, t, h)
    al = None if retention == "none" else gate("alpha", DEFAULT_ALPHA if alpha is None else alpha,
                                                    b, t, h)
    dl = gate("delta", DEFAULT_DELTA if delta is None else delta, b, t, h) if bias == "huber" else None
    state = start_state(initial_state, weights, depth, expansion, key, b, h, dk, dv)
    rule = make_rule(bias, retention, p=p, q_order=q_order, kl_scale=kl_scale, eps=eps,
                 activation=activation, residual=residual, grad_clip=grad_clip)
    return (qf, kf, vf, th, et, al, dl), state, rule


def miras(
    q: Array, k: Array, v: Array, *,
    bias: str = "l2", retention: str = "l2", algorithm: str = "gd",
    theta: Any = None, eta: Any = None, alpha: Any = None, delta: Any = None,
    p: float = 3.0, q_order: float = 4.0, kl_scale: float = 1.0, eps: float = 1e-6,
    weights: Sequence[Array] | None = None, depth: int | None = None, expansion: int = 4,
    key: Array | None = None, activation: str = "gelu", residual: bool = False,
    grad_clip: float | None = None, chunk_size: int = DEFAULT_CHUNK, form: str = "auto",
    initial_state: MemoryState | None = None, return_state: bool = False, causal: bool = False,
) -> Array | tuple[Array, MemoryState]:
    """A Miras memory, chunked parallel form (equations in the module docstring):
    ``S_t = eta_t S_{t-1} - theta_t grad l(R(A_{t'}); k_t, v_t)``, ``A_t = (1 - alpha_t) A_{t-1} + S_t``,
    ``y_t = M_{R(A_t)}(q_t)``.

    Args:
      q: ``[batch, length, heads, key_dim]``; k: ``[batch, length, kv_heads, key_dim]``;
        v: ``[batch, length, kv_heads, value_dim]``.
      bias: ``dot | l2 | lp | huber``; retention: ``none | l2 | lq | kl``; algorithm: ``gd | momentum``.
      theta (learning rate, default ``0.01 / key_dim``), eta (momentum only, default 0.5),
        alpha (forgetting, not with retention none, default 0), delta (huber only, default 1):
        scalars, ``[heads]`` or per token ``[batch, length, heads]``.
      p: order of the ``lp`` bias; q_order: order of the ``lq`` retention; kl_scale: mass ``c`` of
        the ``kl`` simplex; eps: guard of the lq normaliser.
      weights / depth / expansion / key / activation / residual / grad_clip / initial_state /
        return_state / chunk_size: as :func:`zoo.attention.titans.titans` (``chunk_size`` default
        64 as in :func:`miras_naive` and :func:`step`; 1 = the exact recurrence; a state may
        stop inside a chunk). ``weights`` are the parameters ``A`` (for ``kl`` the logits: zeros =
        uniform weights ``c / d_in``).
      form: ``auto | dual | materialize`` (``dual`` needs retention none or l2).
      causal: must be True (ValueError otherwise).

    Returns ``[batch, length, heads, value_dim]`` in ``v.dtype`` and the final state when
    ``return_state``.

    Paper: Behrouz et al., "It's All Connected" (arXiv 2504.13173, 2025), Sec. 3-5.
    """
    chunk_size = check_chunk(chunk_size)
    check_choice("form", form, FORMS)
    xs, state, rule = _setup(
        q, k, v, bias=bias, retention=retention, algorithm=algorithm, theta=theta, eta=eta,
        alpha=alpha, delta=delta, p=p, q_order=q_order, kl_scale=kl_scale, eps=eps, weights=weights,
        depth=depth, expansion=expansion, key=key, activation=activation, residual=residual,
        grad_clip=grad_clip, initial_state=initial_state, causal=causal,
    )
    if form == "auto":
        form = "dual" if rule.readout is None else "materialize"
    elif form == "dual" and rule.readout is not None:
        raise ValueError(f"form='dual' needs retention 'none' or 'l2'; got retention={retention!r}")
    y, state = run_chunked(*xs, state, rule=rule, chunk=chunk_size, form=form)
    y = y.astype(v.dtype)
    return (y, state) if return_state else y


def miras_naive(
    q: Array, k: Array, v: Array, *,
    bias: str = "l2", retention: str = "l2", algorithm: str = "gd",
    theta: Any = None, eta: Any = None, alpha: Any = None, delta: Any = None,
    p: float = 3.0, q_order: float = 4.0, kl_scale: float = 1.0, eps: float = 1e-6,
    weights: Sequence[Array] | None = None, depth: int | None = None, expansion: int = 4,
    key: Array | None = None, activation: str = "gelu", residual: bool = False,
    grad_clip: float | None = None, chunk_size: int = DEFAULT_CHUNK,
    initial_state: MemoryState | None = None, return_state: bool = False, causal: bool = False,
) -> Array | tuple[Array, MemoryState]:
    """Reference: the Miras recurrence token by token (``jax.lax.scan``, ``jax.grad`` per token),
    gradients at the effective weights of each chunk start (``chunk_size``, default 64 as
    :func:`miras`; 1 = the exact recurrence): the oracle of :func:`miras` with the same chunk
    size. Arguments as :func:`miras`."""
    chunk_size = check_chunk(chunk_size)
    xs, state, rule = _setup(
        q, k, v, bias=bias, retention=retention, algorithm=algorithm, theta=theta, eta=eta,
        alpha=alpha, delta=delta, p=p, q_order=q_order, kl_scale=kl_scale, eps=eps, weights=weights,
        depth=depth, expansion=expansion, key=key, activation=activation, residual=residual,
        grad_clip=grad_clip, initial_state=initial_state, causal=causal,
    )
    y, state = run_sequential(*xs, state, rule=rule, chunk=chunk_size)
    y = y.astype(v.dtype)
    return (y, state) if return_state else y


def moneta(q: Array, k: Array, v: Array, **kwargs: Any) -> Array | tuple[Array, MemoryState]:
    """Moneta: :func:`miras` with the ``lp`` bias (``p=3``) and ``lq`` retention (``q_order=4``),
    gd: ``A_t = (1 - alpha_t) A_{t-1} - theta_t grad ||M(k_t) - v_t||_p^p``,
    ``W_t = A_t / ||A_t||_q^(q-2)``. Keyword arguments as :func:`miras`."""
    return miras(q, k, v, **{**PRESETS["moneta"], **kwargs})


def yaad(q: Array, k: Array, v: Array, **kwargs: Any) -> Array | tuple[Array, MemoryState]:
    """Yaad: :func:`miras` with the Huber bias (threshold ``delta_t``) and l2 retention, gd:
    ``W_t = (1 - alpha_t) W_{t-1} - theta_t (2 r k^T if ||r|| <= delta_t else delta_t sign(r) k^T)``
    (matrix memory; back-propagated through an MLP). Keyword arguments as :func:`miras`."""
    return miras(q, k, v, **{**PRESETS["yaad"], **kwargs})


def memora(q: Array, k: Array, v: Array, **kwargs: Any) -> Array | tuple[Array, MemoryState]:
    """Memora: :func:`miras` with the l2 bias and KL retention, gd:
    ``W_t = c Softmax((1 - alpha_t) log W_{t-1} - theta_t grad ||M(k_t) - v_t||^2)`` (weights
    non-negative, each output unit's incoming weights summing to ``c = kl_scale``). Keyword
    arguments as :func:`miras`."""
    return miras(q, k, v, **{**PRESETS["memora"], **kwargs})


def step(
    state: MemoryState, q_t: Array, k_t: Array, v_t: Array, *,
    bias: str = "l2", retention: str = "l2", algorithm: str = "gd",
    theta: Any = None, eta: Any = None, alpha: Any = None, delta: Any = None,
    p: float = 3.0, q_order: float = 4.0, kl_scale: float = 1.0, eps: float = 1e-6,
    activation: str = "gelu", residual: bool = False, grad_clip: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Array, MemoryState]:
    """One decoding step of a Miras memory: where ``state.count % chunk_size == 0`` the frozen
    weights become ``R(A)``; ``S <- eta S - theta grad l(W_frozen; k_t, v_t)``,
    ``A <- (1 - alpha) A + S``, ``y_t = M_{R(A)}(q_t)``, ``count <- count + 1``. With the same
    ``chunk_size`` (default 64 everywhere) steps continue :func:`miras` exactly.

    ``q_t [batch, heads, key_dim]``, ``k_t [batch, kv_heads, key_dim]``,
    ``v_t [batch, kv_heads, value_dim]``; gates scalars, ``[heads]`` or ``[batch, heads]``.
    Returns ``(y_t [batch, heads, value_dim] in v_t.dtype, new_state)``.
    """
    chunk_size = check_chunk(chunk_size)
    check_choices(bias, retention, algorithm, p=p, q_order=q_order, kl_scale=kl_scale, eps=eps,
                   eta=eta, alpha=alpha, delta=delta)
    state, q, k, v, b, h = step_inputs(state, q_t, k_t, v_t)
    check_options(activation=activation, residual=residual, grad_clip=grad_clip, dk=k.shape[-1],
                     dv=v.shape[-1])
    th = step_gate("theta", THETA_SCALE / k.shape[-1] if theta is None else theta, b, h)
    et = None if algorithm == "gd" else step_gate("eta", DEFAULT_ETA if eta is None else eta, b, h)
    al = None if retention == "none" else step_gate(
        "alpha", DEFAULT_ALPHA if alpha is None else alpha, b, h)
    dl = step_gate("delta", DEFAULT_DELTA if delta is None else delta, b, h) if bias == "huber" else None
    rule = make_rule(bias, retention, p=p, q_order=q_order, kl_scale=kl_scale, eps=eps,
                 activation=activation, residual=residual, grad_clip=grad_clip)
    y, state = run_step(state, q, k, v, th, et, al, dl, rule, chunk_size)
    return y.astype(v_t.dtype), state


def preset(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` (:func:`miras`, :func:`miras_naive` or :func:`step`) with the choices of the preset
    ``name`` (``moneta | yaad | memora``) fixed."""
    check_choice("name", name, tuple(PRESETS))
    return functools.partial(fn, **PRESETS[name])
