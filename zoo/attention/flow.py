"""Flow-Attention (Flowformer, Wu et al. ICML 2022): linear attention with flow conservation.

With the sigmoid feature map ``phi = sigmoid`` on queries (sinks, ``i = 1..n``) and keys
(sources, ``j = 1..m``) and ``a~ = phi(a) + eps``, exactly as ``thuml/Flowformer``
``Flow_Attention.py`` (no 1/sqrt(d) scaling; eps is added to both factors of each dot product):

Non-causal (``Flow_Attention``)::

    I_i = q~_i . (sum_j phi(k_j) + eps)              incoming flow of sink i
    O_j = k~_j . (sum_i phi(q_i) + eps)              outgoing flow of source j
    I^_i = q~_i . (sum_j phi(k_j) / O_j + eps)       conserved incoming flow
    O^_j = clip(k~_j . (sum_i phi(q_i) / I_i + eps), -c, c)      conserved outgoing flow
    A_i = sigmoid(I^_i * n / m)                      allocation
    C_j = m * softmax_j(O^_j)                        competition
    y_i = A_i * (phi(q_i) / I_i)^T sum_j phi(k_j) (C_j v_j)^T

Causal (``Flow_Attention_Causal``), with prefix sums and the official "normal" rescaling by the
1-based position (prefix sums become prefix means)::

    I_i = q~_i . (sum_{j<=i} phi(k_j) + eps)         O_j = k~_j . (sum_{i<=j} phi(q_i) + eps)
    I^_i = q~_i . (sum_{j<=i} phi(k_j) j / O_j + eps) / i
    O^_j = clip(k~_j . (sum_{i<=j} phi(q_i) i / I_i + eps) / j, -c, c)
    A_i = sigmoid(I^_i)                              (no n/m factor)
    C_j = j exp(O^_j) / sum_{j'<=j} exp(O^_j')       (prefix softmax at the key's own position)
    y_i = A_i * (phi(q_i) / I_i)^T sum_{j<=i} phi(k_j) (C_j v_j)^T

``c = clamp = 1`` as in the core file (the repo's NLP / RL copies use 5 / 10; ``None`` = no
clip). Since all flows are positive, ``O^ >= 0`` and only the upper clip acts. The causal
competition is computed with a cumulative log-sum-exp, so it stays finite without the clip.

Forms: the causal parallel form computes every per-token flow with O(T d) prefix sums and the
final product ``sum_{j<=i} (phi(q_i)/I_i . phi(k_j)) C_j v_j`` with causal linear attention
(``zoo.attention.linear``, chunked by default: memory O(T/C d e), never a cumulative sum of
``d x e`` outer products per token); :func:`init_state` / :func:`step` are the O(d e)-state
recurrence; :func:`flow_naive` is the quadratic reference with explicit masks. The projections
``Wq, Wk, Wv, Wo`` and the output dropout of the Flowformer layer are the caller's (module's).

Paper: Wu, Wu, Xu, Wang, Long, "Flowformer: Linearizing Transformers with Conservation Flows"
(ICML 2022).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.attention.common import check_positive_int, check_qkv, check_state, check_token, repeat_kv
from zoo.attention.linear import LinearState
from zoo.attention.linear import linear as _linear

Array = jax.Array


class FlowState(NamedTuple):
    """Recurrent state of causal Flow-Attention (all float32).

    sum_q, sum_k: ``[batch, heads, head_dim]`` prefix sums of ``phi(q_i)`` / ``phi(k_j)``.
    sum_q_in: ``[batch, heads, head_dim]`` ``sum_i phi(q_i) i / I_i``.
    sum_k_out: ``[batch, heads, head_dim]`` ``sum_j phi(k_j) j / O_j``.
    lse: ``[batch, heads]`` ``log sum_j exp(O^_j)`` (``-inf`` before any token).
    S: ``[batch, heads, head_dim, value_dim]`` ``sum_j phi(k_j) (C_j v_j)^T``.
    count: ``[batch]`` number of tokens consumed (float32, exact up to 2^24).
    """

    sum_q: Array
    sum_k: Array
    sum_q_in: Array
    sum_k_out: Array
    lse: Array
    S: Array
    count: Array


def init_state(batch: int, heads: int, head_dim: int, value_dim: int | None = None) -> FlowState:
    """Empty causal Flow-Attention state (float32)."""
    e = head_dim if value_dim is None else value_dim
    z = jnp.zeros((batch, heads, head_dim), jnp.float32)
    return FlowState(
        z, z, z, z, jnp.full((batch, heads), -jnp.inf, jnp.float32),
        jnp.zeros((batch, heads, head_dim, e), jnp.float32), jnp.zeros((batch,), jnp.float32),
    )


# ----------------------------------------------------------------------------- helpers


def _check_opts(eps: Any, clamp: Any) -> None:
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and clamp > 0):
        raise ValueError(f"clamp must be a positive number or None; got {clamp!r}")


def _prepare(q, k, v, *, causal, eps, clamp):
    """Validates; returns float32 ``phi(q), phi(k), v`` with k/v heads repeated."""
    _, _, groups = check_qkv(q, k, v, causal=causal)
    _check_opts(eps, clamp)
    f32 = jnp.float32
    fq = jax.nn.sigmoid(q.astype(f32))
    fk = jax.nn.sigmoid(repeat_kv(k, groups).astype(f32))
    return fq, fk, repeat_kv(v, groups).astype(f32)


def _clip(x: Array, clamp: float | None) -> Array:
    return x if clamp is None else jnp.clip(x, -clamp, clamp)


def _dot(a: Array, b: Array) -> Array:
    return jnp.sum(a * b, axis=-1)


def _check_state(state: Any, b: int, h: int, d: int, e: int) -> FlowState:
    want = FlowState((b, h, d), (b, h, d), (b, h, d), (b, h, d), (b, h), (b, h, d, e), (b,))
    return check_state(state, FlowState, want)


# ----------------------------------------------------------------------------- public API


def flow(
    q: Array, k: Array, v: Array, *,
    causal: bool = False,
    eps: float = 1e-6,
    clamp: float | None = 1.0,
    chunk_size: int | None = None,
    impl: str | tuple[str, ...] = "chunked",
    initial_state: FlowState | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, FlowState]:
    """Flow-Attention (see the module docstring for the equations).

    Args:
      q: ``[batch, q_length, heads, head_dim]`` (before the sigmoid feature map).
      k: ``[batch, k_length, kv_heads, head_dim]`` (``heads % kv_heads == 0``); non-causal
        attention allows ``k_length != q_length``.
      v: ``[batch, k_length, kv_heads, value_dim]``.
      causal: the causal form (``Flow_Attention_Causal``); needs ``q_length == k_length``.
      eps: added to both factors of each flow dot product (1e-6 as in the source).
      clamp: upper (and lower) clip of the conserved outgoing flow, 1 in the core source;
        None for no clip.
      chunk_size, impl: causal only; the form of the final causal product, passed to
        :func:`zoo.attention.linear.linear`: an implementation of the ``"linear"`` family
        (``"chunked"`` by default, ``"scan"``, ``"pallas"``), ``"auto"`` or an ordered tuple.
      initial_state / return_state: causal only; continue from / also return a
        :class:`FlowState` (a sequence split in two parts gives the same outputs).

    Returns ``[batch, q_length, heads, value_dim]`` in ``v.dtype`` (float32 inside), and the final
    state when ``return_state``.

    Paper: Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows" (ICML 2022).
    """
    check_positive_int("chunk_size", chunk_size)
    fq, fk, vf = _prepare(q, k, v, causal=causal, eps=eps, clamp=clamp)
    b, n, h, d = fq.shape
    m, e = fk.shape[1], vf.shape[-1]
    if not causal:
        if initial_state is not None or return_state:
            raise ValueError("initial_state and return_state need causal=True")
        sk, sq = jnp.sum(fk, axis=1), jnp.sum(fq, axis=1)  # [B, H, D]
        inc = _dot(fq + eps, sk[:, None] + eps)  # I_i [B, n, H]
        out = _dot(fk + eps, sq[:, None] + eps)  # O_j [B, m, H]
        cons_in = _dot(fq + eps, jnp.sum(fk / out[..., None], axis=1)[:, None] + eps)
        cons_out = _clip(_dot(fk + eps, jnp.sum(fq / inc[..., None], axis=1)[:, None] + eps), clamp)
        alloc = jax.nn.sigmoid(cons_in * (n / m))
        comp = jax.nn.softmax(cons_out, axis=1) * m
        kv = jnp.einsum("bjhd,bjhe->bhde", fk, vf * comp[..., None])
        y = jnp.einsum("bihd,bhde->bihe", fq / inc[..., None], kv) * alloc[..., None]
        return y.astype(v.dtype)

    if initial_state is None:
        s0 = init_state(b, h, d, e)
    else:
        s0 = _check_state(initial_state, b, h, d, e)
    pos = s0.count[:, None] + jnp.arange(1, n + 1, dtype=jnp.float32)[None, :]  # [B, T]
    pos = pos[..., None]  # [B, T, 1] broadcast over heads
    cq = s0.sum_q[:, None] + jnp.cumsum(fq, axis=1)
    ck = s0.sum_k[:, None] + jnp.cumsum(fk, axis=1)
    inc = _dot(fq + eps, ck + eps)  # I_i
    out = _dot(fk + eps, cq + eps)  # O_j
    cqi = s0.sum_q_in[:, None] + jnp.cumsum(fq * (pos / inc)[..., None], axis=1)
    cko = s0.sum_k_out[:, None] + jnp.cumsum(fk * (pos / out)[..., None], axis=1)
    cons_in = _dot(fq + eps, cko + eps) / pos
    cons_out = _clip(_dot(fk + eps, cqi + eps) / pos, clamp)
    lse = jax.lax.cumlogsumexp(cons_out, axis=1)
    if initial_state is not None:
        lse = jnp.logaddexp(s0.lse[:, None], lse)
    comp = pos * jnp.exp(cons_out - lse)
    lin0 = LinearState(s0.S, jnp.zeros((b, h, d), jnp.float32), jnp.zeros((b,), jnp.int32))
    num, lin = _linear(
        fq / inc[..., None], fk, vf * comp[..., None], causal=True, feature_map="identity",
        normalize=False, chunk_size=chunk_size, impl=impl, initial_state=lin0, return_state=True,
    )
    y = (num * jax.nn.sigmoid(cons_in)[..., None]).astype(v.dtype)
    if not return_state:
        return y
    last = lambda x: x[:, -1]
    final = FlowState(*map(last, (cq, ck, cqi, cko, lse)), lin.S, s0.count + n)
    return y, final


def flow_naive(
    q: Array, k: Array, v: Array, *, causal: bool = False, eps: float = 1e-6,
    clamp: float | None = 1.0,
) -> Array:
    """Reference: every prefix (or full) sum written as a product with an explicit 0/1 matrix
    ``M`` (lower-triangular when causal, all ones otherwise) and the output as the quadratic
    attention matrix ``W_ij = A_i M_ij (phi(q_i).phi(k_j) / I_i) C_j``, ``y = W v``. O(T^2)."""
    fq, fk, vf = _prepare(q, k, v, causal=causal, eps=eps, clamp=clamp)
    n, m = fq.shape[1], fk.shape[1]
    mat = jnp.tril(jnp.ones((n, m))) if causal else jnp.ones((n, m))
    # Sums over queries seen by source j: i <= j when causal (the source's cumsum, which is NOT
    # the transpose of the attention mask), all queries otherwise.
    src = mat if causal else jnp.ones((m, n))
    # Position normaliser: i when causal ("normal" in the source), 1 otherwise.
    pos = jnp.arange(1.0, n + 1)[None, :, None] if causal else jnp.ones((1, n, 1))
    msum = lambda mat_, x: jnp.einsum("ij,bjhd->bihd", mat_, x)
    inc = _dot(fq + eps, msum(mat, fk) + eps)  # sink i: keys j <= i (or all)
    out = _dot(fk + eps, msum(src, fq) + eps)  # source j: queries i <= j (or all)
    if causal:
        cons_in = _dot(fq + eps, msum(mat, fk * (pos / out)[..., None]) + eps) / pos
        cons_out = _clip(_dot(fk + eps, msum(src, fq * (pos / inc)[..., None]) + eps) / pos, clamp)
        alloc = jax.nn.sigmoid(cons_in)
        ex = jnp.exp(cons_out)
        comp = pos * ex / jnp.einsum("ij,bjh->bih", mat, ex)
    else:
        cons_in = _dot(fq + eps, msum(mat, fk / out[..., None]) + eps)
        cons_out = _clip(_dot(fk + eps, msum(src, fq / inc[..., None]) + eps), clamp)
        alloc = jax.nn.sigmoid(cons_in * n / m)
        comp = m * jnp.exp(cons_out) / jnp.sum(jnp.exp(cons_out), axis=1, keepdims=True)
    w = jnp.einsum("bihd,bjhd->bhij", fq, fk) * mat
    w = w / jnp.moveaxis(inc, 1, 2)[..., None] * jnp.moveaxis(alloc, 1, 2)[..., None]
    w = w * jnp.moveaxis(comp, 1, 2)[:, :, None, :]
    return jnp.einsum("bhij,bjhe->bihe", w, vf).astype(v.dtype)


def step(
    state: FlowState, q_t: Array, k_t: Array, v_t: Array, *,
    eps: float = 1e-6, clamp: float | None = 1.0,
) -> tuple[Array, FlowState]:
    """One decoding step of causal Flow-Attention (token number ``t = state.count + 1``).

    ``q_t [batch, heads, head_dim]``, ``k_t [batch, kv_heads, head_dim]``,
    ``v_t [batch, kv_heads, value_dim]``. Updates the prefix sums, then
    ``I = q~.(sum_k + eps)``, ``O = k~.(sum_q + eps)``, ``I^ = q~.(sum_k_out + eps)/t``,
    ``O^ = clip(k~.(sum_q_in + eps)/t)``, ``C = t exp(O^ - lse)``, ``S += phi(k)(C v)^T`` and
    ``y = sigmoid(I^) (phi(q)/I)^T S``. Returns ``(y_t [batch, heads, value_dim], new_state)``;
    equal to the causal parallel form at that position.
    """
    check_token(q_t, k_t, v_t)
    one = lambda x: x[:, None]
    fq, fk, vf = _prepare(one(q_t), one(k_t), one(v_t), causal=True, eps=eps, clamp=clamp)
    fq, fk, vf = fq[:, 0], fk[:, 0], vf[:, 0]
    b, h, d = fq.shape
    s = _check_state(state, b, h, d, vf.shape[-1])
    count = s.count + 1
    t = count[:, None]  # [B, 1]
    sum_q, sum_k = s.sum_q + fq, s.sum_k + fk
    inc = _dot(fq + eps, sum_k + eps)
    out = _dot(fk + eps, sum_q + eps)
    sum_q_in = s.sum_q_in + fq * (t / inc)[..., None]
    sum_k_out = s.sum_k_out + fk * (t / out)[..., None]
    cons_in = _dot(fq + eps, sum_k_out + eps) / t
    cons_out = _clip(_dot(fk + eps, sum_q_in + eps) / t, clamp)
    lse = jnp.logaddexp(s.lse, cons_out)
    comp = t * jnp.exp(cons_out - lse)
    S = s.S + fk[..., :, None] * (vf * comp[..., None])[..., None, :]
    y = jnp.einsum("bhd,bhde->bhe", fq / inc[..., None], S) * jax.nn.sigmoid(cons_in)[..., None]
    return y.astype(v_t.dtype), FlowState(sum_q, sum_k, sum_q_in, sum_k_out, lse, S, count)
