"""Titans language models: memory as context (MAC), as a gate (MAG), as a layer (MAL).

Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Sec. 4. Each model
is a :class:`zoo.models.DecoderLM` whose every block mixes tokens with one of three modules
(registered as the mixers ``"titans_mac"``, ``"titans_mag"``, ``"titans_mal"``, so they also fit
hybrid stacks). They combine softmax attention, the neural long-term memory
:class:`zoo.nn.TitansMemory` ``M`` and ``N_p`` learned persistent tokens ``P [N_p, E]``:

MAC, memory as context (:class:`MemoryAsContext`). The sequence is cut into segments
``S^(t)`` of ``segment_len`` tokens; per segment, in the paper's order **retrieve -> attend ->
write**:

    h_t = M*_{t-1}(S^(t) W_Q)                 retrieve: read the memory left by segments < t (no update)
    y_t = Attn(P || h_t || S^(t))             attend: causal inside the segment, P visible to all
    M_t = M_{t-1} updated with y_t            write: keys/values from y_t (the attention output)
    o_t = y_t (x) M*(y_t)                     gate the attention output with a memory read

Note: lucidrains/titans-pytorch reads and writes the memory from the block input before the
attention (the maintainer: "this was never done correctly", issues #32/#57); here the write uses
the attention output ``y_t`` and the retrieval only the previous segments' memory. The memory
read ``M*(y_t)`` in the gate is per token: token ``i`` reads the memory after the writes of
tokens ``<= i`` of its segment (the paper's ``M*_t(y_t)`` after the whole segment would let a
token see later tokens of its segment, which a causal LM cannot). The ``h_t`` tokens are
masked causally (token ``i`` sees ``h_j``, ``j <= i``) [unverified: the paper's figure shows
them fully visible, but they come from the segment's own queries].

MAG, memory as a gate (:class:`MemoryAsGate`), with ``x~ = P || x``:

    y = SW-Attn*(x~)                          sliding window of ``window`` keys, P always visible
    o = rmsnorm_a(y) * sigmoid(rmsnorm_b(M(x~)))   [unverified: the paper says both branches are
                                                   normalised with learned vectors, then a
                                                   nonlinearity; this exact form is ours]

MAL, memory as a layer (:class:`MemoryAsLayer`): ``y = M(x~)``, ``o = SW-Attn*(y)``; the
memory's outputs at the persistent positions, ``M(P)``, are the attention's always-visible
prefix [our reading of ``SW-Attn(y)`` with ``y`` over ``P || x``].

In MAG and MAL the memory reads the persistent tokens first (they are its first segment, see
:class:`zoo.nn.TitansMemory`). Rotary embeddings (``rope``) rotate the sequence's queries and
keys by absolute position (``h_t``'s keys by their token's position); persistent keys are not
rotated.

Decoding (:meth:`init_state` / :meth:`prefill` / :meth:`decode_step` of each mixer;
:func:`zoo.models.generate`) equals the forward for all three: MAG/MAL keep a ring buffer of the
last ``window`` keys/values plus the persistent ones and the memory layer's state; MAC keeps a
segment buffer (keys/values of the segment's tokens and of its ``h`` tokens), the memory's
effective weights at the segment start (for the retrieval) and the memory state being written,
whose chunks restart at each segment start as in the forward.

``prefill(x, state, position)`` equals ``T`` decode steps. MAG/MAL: one parallel call (the new
tokens attend to the ring buffer and to each other inside the window; the memory layer's own
``prefill``). MAC works in segments: from a position known while tracing (a Python int, or
``DecoderLM.prefill`` from a fresh state) the tokens up to the next segment start run token by
token, every whole segment in parallel (as the forward), and a ragged last segment in parallel
with the memory layer's ``prefill`` for its write; a traced or per-sequence position runs all
tokens token by token (``lax.scan`` of :meth:`MemoryAsContext.decode_step`).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.common import causal_mask, concrete, shape_str
from zoo.models.lm import DecoderLM, decode_steps, prefill_module
from zoo.nn.attention import register_mixer
from zoo.nn.layers import RMSNorm, apply_rope, cast, normal_init, param
from zoo.nn.memory import TitansMemory

Array = jax.Array
VARIANTS = ("mac", "mag", "mal")


def _check_int(name: str, x: Any, minimum: int) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {x!r}")


def _positions(position: Array | int, batch: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(position, jnp.int32), (batch,))


def _write(buf: Array, x_t: Array, slot: Array) -> Array:
    """``buf [B, W, ...]`` with ``x_t [B, ...]`` written at ``slot [B]``."""
    hit = jnp.arange(buf.shape[1])[None, :] == slot[:, None]
    return jnp.where(hit.reshape(hit.shape + (1,) * (buf.ndim - 2)), x_t[:, None].astype(buf.dtype), buf)


class SegmentAttention(nnx.Module):
    """Softmax attention ``[B, Tq, E] -> [B, Tq, E]`` over explicitly given keys/values and mask.

    ``q = x W_Q``, ``k = x W_K``, ``v = x W_V`` (``[E, H, D]``, axes embed/heads/head_dim; RoPE on q
    and k at the given positions), ``out = softmax(q k^T / sqrt(D), mask) v W_O`` (``W_O [H, D, E]``).
    The models concatenate the keys of persistent tokens, memory tokens and the sequence and give
    the visibility mask themselves (:func:`zoo.attention.softmax` with ``causal=False``).
    """

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int | None = None, rope: bool = True,
        rope_theta: float = 10_000.0, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        _check_int("num_heads", num_heads, 1)
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model}) when head_dim is not given")
            head_dim = d_model // num_heads
        _check_int("head_dim", head_dim, 1)
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim; got {head_dim}")
        e, h, d, pd = d_model, num_heads, head_dim, param_dtype
        self.d_model, self.num_heads, self.head_dim = e, h, d
        self.rope, self.rope_theta, self.dtype = bool(rope), float(rope_theta), dtype
        for n in ("q", "k", "v"):
            setattr(self, f"w{n}", param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd))
        self.wo = param(rngs, normal_init(h * d), (h, d, e), ("heads", "head_dim", "embed"), pd)

    def project(self, x: Array, positions: Array | None, names: tuple[str, ...] = ("q", "k", "v")
                ) -> tuple[Array, ...]:
        """``x [B, T, E]`` -> the projections ``names`` ``[B, T, H, D]``; q and k rotated at
        ``positions`` (``[T]`` or ``[B, T]``; None = no rotation, e.g. persistent tokens)."""
        dt = self.dtype or x.dtype
        out = []
        for n in names:
            y = jnp.einsum("bte,ehd->bthd", x.astype(dt), getattr(self, f"w{n}")[...].astype(dt))
            if n != "v" and self.rope and positions is not None:
                y = apply_rope(y, positions, self.rope_theta)
            out.append(y)
        return tuple(out)

    def attend(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
        """``q [B, Tq, H, D]``, ``k, v [B, Tk, H, D]``, bool ``mask`` broadcastable to
        ``[B, H, Tq, Tk]`` -> ``[B, Tq, E]``."""
        y = za.softmax(q, k, v, causal=False, mask=mask)
        dt = self.dtype or q.dtype
        return cast(jnp.einsum("bthd,hde->bte", y.astype(dt), self.wo[...].astype(dt)), self.dtype)


class NormGate(nnx.Module):
    """Titans' gate ``y (x) m = rmsnorm_a(y) * sigmoid(rmsnorm_b(m))`` (learned scales ``[E]``)
    [unverified exact form: the paper normalises both branches with learnable vectors, then
    applies a nonlinearity]."""

    def __init__(self, d_model: int, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.norm_y = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_m = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, y: Array, m: Array) -> Array:
        return self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m))


def _memory(d_model, *, memory_heads, memory_depth, chunk_size, num_persistent, memory_kwargs, dtype,
            param_dtype, rngs) -> TitansMemory:
    kw = dict(memory_kwargs or {})
    for k in ("depth", "chunk_size", "num_persistent"):
        if k in kw:
            raise ValueError(f"memory_kwargs must not set {k!r} (use memory_depth / chunk_size / num_persistent)")
    return TitansMemory(d_model, memory_heads, depth=memory_depth, chunk_size=chunk_size,
                        num_persistent=num_persistent, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)


class _TitansMixer(nnx.Module):
    """Shared constructor checks and parts of the three Titans mixers."""

    def _setup(self, d_model, num_heads, *, num_persistent, memory_heads, memory_depth, chunk_size,
               memory_persistent, head_dim, rope, memory_kwargs, dtype, param_dtype, rngs):
        _check_int("d_model", d_model, 1)
        _check_int("num_heads", num_heads, 1)
        _check_int("num_persistent", num_persistent, 0)
        _check_int("memory_depth", memory_depth, 1)
        _check_int("chunk_size", chunk_size, 1)
        memory_heads = num_heads if memory_heads is None else memory_heads
        _check_int("memory_heads", memory_heads, 1)
        self.d_model, self.num_persistent, self.dtype = d_model, num_persistent, dtype
        self.attn = SegmentAttention(d_model, num_heads, head_dim=head_dim, rope=rope, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.memory = _memory(d_model, memory_heads=memory_heads, memory_depth=memory_depth, chunk_size=chunk_size,
                              num_persistent=num_persistent if memory_persistent else 0,
                              memory_kwargs=memory_kwargs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _check_x(self, x: Array, causal: bool) -> None:
        if causal is not True:
            raise ValueError(f"causal must be True: Titans models are causal; got causal={causal!r}")
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, length, d_model={self.d_model}]; got {shape_str(x)}")

    def _check_xt(self, x_t: Array) -> None:
        if getattr(x_t, "ndim", None) != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must be [batch, d_model={self.d_model}]; got {shape_str(x_t)}")

    def _prefix_kv(self, tokens: Array | None, batch: int) -> tuple[Array, Array]:
        """Keys/values of always-visible prefix ``tokens [1, N, E]`` (no rotation), ``[B, N, H, D]``
        (``N = 0`` when None)."""
        if tokens is None:
            z = jnp.zeros((batch, 0, self.attn.num_heads, self.attn.head_dim), self.dtype or jnp.float32)
            return z, z
        k, v = self.attn.project(tokens, None, ("k", "v"))
        shape = (batch,) + k.shape[1:]
        return jnp.broadcast_to(k, shape), jnp.broadcast_to(v, shape)


class _SlidingWindowMixer(_TitansMixer):
    """MAG / MAL: sliding-window attention with an always-visible prefix, and its ring-buffer decoding."""

    def _window_attention(self, x: Array, prefix: Array | None) -> Array:
        b, t, _ = x.shape
        q, k, v = self.attn.project(x, jnp.arange(t))
        pk, pv = self._prefix_kv(prefix, b)
        n = pk.shape[1]
        mask = jnp.concatenate([jnp.ones((t, n), bool), causal_mask(t, t, self.window)], axis=1)
        return self.attn.attend(q, jnp.concatenate([pk, k.astype(pk.dtype)], 1),
                                jnp.concatenate([pv, v.astype(pv.dtype)], 1), mask[None, None])

    def _window_state(self, batch: int, max_len: int | None, prefix: Array | None) -> dict[str, Any]:
        w = self.window if max_len is None else min(self.window, max_len)
        dt = self.dtype or jnp.float32
        pk, pv = self._prefix_kv(prefix, batch)
        zeros = jnp.zeros((batch, w, self.attn.num_heads, self.attn.head_dim), dt)
        return {"k": zeros, "v": zeros, "pos": jnp.full((batch, w), -1, jnp.int32), "pk": pk, "pv": pv}

    def _window_step(self, x_t: Array, st: dict[str, Any], pos: Array) -> tuple[Array, dict[str, Any]]:
        q, k, v = self.attn.project(x_t[:, None], pos[:, None])
        slot = pos % st["k"].shape[1]
        st = {**st, "k": _write(st["k"], k[:, 0], slot), "v": _write(st["v"], v[:, 0], slot),
              "pos": _write(st["pos"], pos, slot)}
        vis = (st["pos"] >= 0) & (st["pos"] > pos[:, None] - self.window)
        mask = jnp.concatenate([jnp.ones(st["pk"].shape[:2], bool), vis], axis=1)[:, None, None, :]
        y = self.attn.attend(q, jnp.concatenate([st["pk"], st["k"]], 1), jnp.concatenate([st["pv"], st["v"]], 1),
                             mask)
        return y[:, 0], st

    def _window_prefill(self, x: Array, st: dict[str, Any], pos: Array) -> tuple[Array, dict[str, Any]]:
        """``x [B, T, E]`` at positions ``pos[b] + t`` in one call: equal to ``T`` :meth:`_window_step`.

        Query ``i`` sees the prefix, the ring-buffer entries still inside its window
        (``pos_j > P_i - window``; an entry a new token overwrites in the step-by-step form lies
        ``W = window`` or more positions back, so it is outside that window already) and the new
        tokens ``j <= i`` with ``i - j < window``. The last ``min(T, W)`` new keys/values are then
        written to their slots ``P % W`` (distinct: consecutive positions)."""
        b, t, _ = x.shape
        w = st["k"].shape[1]
        positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        q, k, v = self.attn.project(x, positions)
        seen = (st["pos"][:, None, :] >= 0) & (st["pos"][:, None, :] > positions[:, :, None] - self.window)
        mask = jnp.concatenate([jnp.ones((b, t, st["pk"].shape[1]), bool), seen,
                                jnp.broadcast_to(causal_mask(t, t, self.window), (b, t, t))], axis=2)
        cat = lambda *xs: jnp.concatenate([a.astype(st["pk"].dtype) for a in xs], axis=1)
        y = self.attn.attend(q, cat(st["pk"], st["k"], k), cat(st["pv"], st["v"], v), mask[:, None])
        m = min(t, w)
        rows, slots = jnp.arange(b)[:, None], positions[:, t - m:] % w
        st = {**st, "k": st["k"].at[rows, slots].set(k[:, t - m:].astype(st["k"].dtype)),
              "v": st["v"].at[rows, slots].set(v[:, t - m:].astype(st["v"].dtype)),
              "pos": st["pos"].at[rows, slots].set(positions[:, t - m:])}
        return y, st


class MemoryAsGate(_SlidingWindowMixer):
    """Titans MAG mixer ``[B, T, E] -> [B, T, E]``: ``o = rmsnorm(SW-Attn*(P || x)) *
    sigmoid(rmsnorm(M(P || x)))`` (module docstring; the gate's exact form is [unverified]).

    Args:
      d_model, num_heads: width and attention heads; head_dim: attention head width.
      window: keys each query sees (itself included), besides the persistent ones.
      num_persistent: persistent tokens ``P`` (one parameter, shared by attention and memory:
        ``memory.persistent``).
      memory_heads (default ``num_heads``), memory_depth, chunk_size, memory_kwargs: the
        :class:`zoo.nn.TitansMemory` (``memory_kwargs`` for its other options).
      rope: rotary embeddings in the attention; dtype, param_dtype.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, window: int = 64, num_persistent: int = 4,
        memory_heads: int | None = None, memory_depth: int = 2, chunk_size: int = 16, head_dim: int | None = None,
        rope: bool = True, memory_kwargs: dict[str, Any] | None = None, dtype: Any = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        _check_int("window", window, 1)
        self.window = window
        self._setup(d_model, num_heads, num_persistent=num_persistent, memory_heads=memory_heads,
                    memory_depth=memory_depth, chunk_size=chunk_size, memory_persistent=True, head_dim=head_dim,
                    rope=rope, memory_kwargs=memory_kwargs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = NormGate(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _persistent(self) -> Array | None:
        return self.memory.persistent[...][None] if self.num_persistent else None

    def __call__(self, x: Array, *, causal: bool = True) -> Array:
        self._check_x(x, causal)
        y = self._window_attention(x, self._persistent())
        return self.gate(y, self.memory(x))

    def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
        """Ring buffer of ``min(window, max_len)`` keys/values, persistent keys/values, memory state."""
        return {"attn": self._window_state(batch, max_len, self._persistent()),
                "memory": self.memory.init_state(batch)}

    def decode_step(self, x_t: Array, state: dict[str, Any], position: Array | int) -> tuple[Array, dict[str, Any]]:
        """One token ``x_t [B, E]`` at ``position`` -> ``(o_t [B, E], state)``; equals the forward."""
        self._check_xt(x_t)
        pos = _positions(position, x_t.shape[0])
        y, attn = self._window_step(x_t, state["attn"], pos)
        m, mem = self.memory.decode_step(x_t, state["memory"], position)  # the count keeps position's shape
        return self.gate(y, m), {"attn": attn, "memory": mem}

    def prefill(self, x: Array, state: dict[str, Any], position: Array | int = 0) -> tuple[Array, dict[str, Any]]:
        """``x [B, T, E]`` at positions ``position ..`` -> ``(o [B, T, E], state)`` in one parallel
        call; equals ``T`` :meth:`decode_step` calls."""
        self._check_x(x, True)
        y, attn = self._window_prefill(x, state["attn"], _positions(position, x.shape[0]))
        m, mem = prefill_module(self.memory, x, state["memory"], position)
        return self.gate(y, m), {"attn": attn, "memory": mem}


class MemoryAsLayer(_SlidingWindowMixer):
    """Titans MAL mixer ``[B, T, E] -> [B, T, E]``: ``y = M(P || x)``, ``o = SW-Attn*(y)`` with the
    memory's outputs at the persistent positions as the always-visible prefix. Arguments as
    :class:`MemoryAsGate`."""

    def __init__(
        self, d_model: int, num_heads: int, *, window: int = 64, num_persistent: int = 4,
        memory_heads: int | None = None, memory_depth: int = 2, chunk_size: int = 16, head_dim: int | None = None,
        rope: bool = True, memory_kwargs: dict[str, Any] | None = None, dtype: Any = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        _check_int("window", window, 1)
        self.window = window
        self._setup(d_model, num_heads, num_persistent=num_persistent, memory_heads=memory_heads,
                    memory_depth=memory_depth, chunk_size=chunk_size, memory_persistent=True, head_dim=head_dim,
                    rope=rope, memory_kwargs=memory_kwargs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, *, causal: bool = True) -> Array:
        self._check_x(x, causal)
        prefix, st = self.memory.initial(x.shape[0])
        y, _ = self.memory.stream(x, st)
        return self._window_attention(y, prefix)

    def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
        """Memory state after the persistent tokens, their outputs' keys/values, ring buffer."""
        prefix, mem = self.memory.initial(batch)
        return {"attn": self._window_state(batch, max_len, prefix), "memory": mem}

    def decode_step(self, x_t: Array, state: dict[str, Any], position: Array | int) -> tuple[Array, dict[str, Any]]:
        """One token ``x_t [B, E]`` at ``position`` -> ``(o_t [B, E], state)``; equals the forward."""
        self._check_xt(x_t)
        pos = _positions(position, x_t.shape[0])
        y, mem = self.memory.decode_step(x_t, state["memory"], position)  # the count keeps position's shape
        o, attn = self._window_step(y, state["attn"], pos)
        return o, {"attn": attn, "memory": mem}

    def prefill(self, x: Array, state: dict[str, Any], position: Array | int = 0) -> tuple[Array, dict[str, Any]]:
        """``x [B, T, E]`` at positions ``position ..`` -> ``(o [B, T, E], state)`` in one parallel
        call; equals ``T`` :meth:`decode_step` calls."""
        self._check_x(x, True)
        y, mem = prefill_module(self.memory, x, state["memory"], position)
        o, attn = self._window_prefill(y, state["attn"], _positions(position, x.shape[0]))
        return o, {"attn": attn, "memory": mem}


class MemoryAsContext(_TitansMixer):
    """Titans MAC mixer ``[B, T, E] -> [B, T, E]``: per segment retrieve -> attend -> write
    (module docstring).

    Args:
      segment_len: tokens per segment (attention is causal inside a segment and does not see
        earlier segments: they reach it only through the memory).
      num_persistent: persistent tokens ``P`` (attention only; the memory does not read them).
      chunk_size: the memory's chunk size inside a segment (chunks restart at segment starts).
      Others as :class:`MemoryAsGate`.

    :meth:`segment` runs one segment and also returns the retrieved tokens ``h`` and the
    attention output ``y`` (the memory's write input).
    """

    def __init__(
        self, d_model: int, num_heads: int, *, segment_len: int = 64, num_persistent: int = 4,
        memory_heads: int | None = None, memory_depth: int = 2, chunk_size: int = 16, head_dim: int | None = None,
        rope: bool = True, memory_kwargs: dict[str, Any] | None = None, dtype: Any = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        _check_int("segment_len", segment_len, 1)
        self.segment_len = segment_len
        self._setup(d_model, num_heads, num_persistent=num_persistent, memory_heads=memory_heads,
                    memory_depth=memory_depth, chunk_size=chunk_size, memory_persistent=False, head_dim=head_dim,
                    rope=rope, memory_kwargs=memory_kwargs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if num_persistent:
            self.persistent = param(rngs, normal_init(1), (num_persistent, d_model), (None, "embed"), param_dtype)
        self.gate = NormGate(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _persistent(self) -> Array | None:
        return self.persistent[...][None] if self.num_persistent else None

    def initial_carry(self, batch: int) -> tuple[Any, dict[str, Array]]:
        """``(memory state, conv state of the retrieval queries)`` before the first segment."""
        _, st = self.memory.initial(batch)
        return st, st.conv

    def _retrieve_attend(self, x: Array, positions: Array, mem: Any, conv_x: dict[str, Array]
                         ) -> tuple[Array, dict[str, Array], dict[str, Array]]:
        """Steps 1-2 of a segment (or of its first ``S' <= S`` tokens) ``x [B, S', E]`` at
        ``positions [S']``: ``(y [B, S', E], conv_x, {"h", "k", "v", "kh", "vh"})``."""
        b, s, _ = x.shape
        # 1. retrieve: h = M*_{t-1}(x W_Q), the memory after the previous segments (no update)
        h, conv_x = self.memory.retrieve(x, self.memory.read_weights(mem.memory), conv_x)
        # 2. attend over P || h || x, causal inside the segment, P visible to all
        q, k, v = self.attn.project(x, positions)
        kh, vh = self.attn.project(h, positions, ("k", "v"))
        pk, pv = self._prefix_kv(self._persistent(), b)
        tri = causal_mask(s, s)
        mask = jnp.concatenate([jnp.ones((s, pk.shape[1]), bool), tri, tri], axis=1)
        cat = lambda *xs: jnp.concatenate([a.astype(pk.dtype) for a in xs], axis=1)
        y = self.attn.attend(q, cat(pk, kh, k), cat(pv, vh, v), mask[None, None])
        return y, conv_x, {"h": h, "k": k, "v": v, "kh": kh, "vh": vh}

    def segment(self, x: Array, positions: Array, carry: tuple[Any, dict[str, Array]]
                ) -> tuple[Array, tuple[Any, dict[str, Array]], dict[str, Array]]:
        """One segment ``x [B, S, E]`` at absolute ``positions [S]``: returns
        ``(o [B, S, E], carry after the segment, {"h": h, "y": y})``."""
        mem, conv_x = carry
        y, conv_x, aux = self._retrieve_attend(x, positions, mem, conv_x)
        # 3. write the memory with y, reading it back per token; gate y with the read
        r, mem = self.memory.stream(y, mem)
        return self.gate(y, r), (mem, conv_x), {"h": aux["h"], "y": y}

    def __call__(self, x: Array, *, causal: bool = True) -> Array:
        self._check_x(x, causal)
        b, t, e = x.shape
        s = self.segment_len
        n = -(-t // s)
        # Padding after the last real token changes no real output (causal inside a segment).
        xs = jnp.pad(x, ((0, 0), (0, n * s - t), (0, 0))).reshape(b, n, s, e).swapaxes(0, 1)
        pos = jnp.arange(n * s, dtype=jnp.int32).reshape(n, s)

        def body(carry, inp):
            o, carry, _ = self.segment(inp[0], inp[1], carry)
            return carry, o

        _, o = jax.lax.scan(body, self.initial_carry(b), (xs, pos))
        return o.swapaxes(0, 1).reshape(b, n * s, -1)[:, :t]

    def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
        """Segment buffers (keys/values of the segment's tokens and of its ``h`` tokens,
        ``[B, segment_len, H, D]``), persistent keys/values, the memory state being written, the
        memory's effective weights at the segment start and the retrieval conv state."""
        mem, conv_x = self.initial_carry(batch)
        pk, pv = self._prefix_kv(self._persistent(), batch)
        z = jnp.zeros((batch, self.segment_len, self.attn.num_heads, self.attn.head_dim), self.dtype or jnp.float32)
        return {"k": z, "v": z, "kh": z, "vh": z, "pk": pk, "pv": pv, "memory": mem, "conv_x": conv_x,
                "segment_weights": self.memory.read_weights(mem.memory)}

    def decode_step(self, x_t: Array, state: dict[str, Any], position: Array | int) -> tuple[Array, dict[str, Any]]:
        """One token ``x_t [B, E]`` at ``position`` -> ``(o_t [B, E], state)``; equals the forward."""
        self._check_xt(x_t)
        b = x_t.shape[0]
        pos = _positions(position, b)
        off = pos % self.segment_len
        start = off == 0
        st = dict(state)
        cur = self.memory.read_weights(st["memory"].memory)
        seg_w = tuple(jnp.where(start.reshape((b,) + (1,) * (c.ndim - 1)), c, w)
                      for c, w in zip(cur, st["segment_weights"]))
        x = x_t[:, None]
        h, st["conv_x"] = self.memory.retrieve(x, seg_w, st["conv_x"])
        q, k, v = self.attn.project(x, pos[:, None])
        kh, vh = self.attn.project(h, pos[:, None], ("k", "v"))
        for name, a in (("k", k), ("v", v), ("kh", kh), ("vh", vh)):
            st[name] = _write(st[name], a[:, 0], off)
        vis = jnp.arange(self.segment_len)[None, :] <= off[:, None]
        mask = jnp.concatenate([jnp.ones(st["pk"].shape[:2], bool), vis, vis], axis=1)[:, None, None, :]
        y = self.attn.attend(q, jnp.concatenate([st["pk"], st["kh"], st["k"]], 1),
                             jnp.concatenate([st["pv"], st["vh"], st["v"]], 1), mask)[:, 0]
        # the memory's chunk position, shaped as ``position`` (so its count keeps the state's shape)
        r, st["memory"] = self.memory.stream_step(y, st["memory"], jnp.asarray(position, jnp.int32) % self.segment_len)
        st["segment_weights"] = seg_w
        return self.gate(y, r), st

    def prefill(self, x: Array, state: dict[str, Any], position: Array | int = 0) -> tuple[Array, dict[str, Any]]:
        """``x [B, T, E]`` at positions ``position ..`` -> ``(o [B, T, E], state)``; equals ``T``
        :meth:`decode_step` calls (module docstring: segments in parallel from a position known
        while tracing, the tokens before the first segment start one by one; a traced or
        per-sequence ``position`` runs every token one by one)."""
        self._check_x(x, True)
        p = concrete(position)
        if p is None or p.ndim != 0:
            return decode_steps(self, x, state, position)
        b, t, e = x.shape
        s, p = self.segment_len, int(p)
        outs = []
        head = min(t, -p % s)
        if head:  # the rest of a segment already begun
            o, state = decode_steps(self, x[:, :head], state, p)
            outs.append(o)
        start, n = p + head, (t - head) // s
        if n:  # whole segments, as the forward
            xs = x[:, head:head + n * s].reshape(b, n, s, e).swapaxes(0, 1)
            pos = (start + jnp.arange(n * s, dtype=jnp.int32)).reshape(n, s)

            def body(carry, inp):
                o, carry, _ = self.segment(inp[0], inp[1], carry)
                return carry, o

            (mem, conv_x), o = jax.lax.scan(body, (state["memory"], state["conv_x"]), (xs, pos))
            # the segment buffers and weights are reset by the next token (a segment start)
            state = {**state, "memory": mem, "conv_x": conv_x}
            outs.append(o.swapaxes(0, 1).reshape(b, n * s, -1))
        r = t - head - n * s
        if r:  # a ragged last segment: its first r tokens, the buffers filled as decode_step does
            st = dict(state)
            st["segment_weights"] = self.memory.read_weights(st["memory"].memory)
            pos = start + n * s + jnp.arange(r, dtype=jnp.int32)
            y, st["conv_x"], aux = self._retrieve_attend(x[:, t - r:], pos, st["memory"], st["conv_x"])
            for name in ("k", "v", "kh", "vh"):
                st[name] = st[name].at[:, :r].set(aux[name].astype(st[name].dtype))
            rd, st["memory"] = prefill_module(self.memory, y, st["memory"], 0)  # chunks restart at the segment
            outs.append(self.gate(y, rd))
            state = st
        return jnp.concatenate(outs, axis=1), state


# ----------------------------------------------------------------------------- mixers and the LM


def _factory(cls):
    def factory(d_model: int, rngs: nnx.Rngs, *, num_heads: int, **kw: Any):
        return cls(d_model, num_heads, rngs=rngs, **kw)

    # The signature names every constructor argument, so a mixer spec's typo is caught by
    # zoo.nn.check_mixer_spec (config validation) rather than at build time.
    P = inspect.Parameter
    ctor = [p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "d_model", "num_heads", "rngs")]
    factory.__signature__ = inspect.Signature(
        [P("d_model", P.POSITIONAL_OR_KEYWORD), P("rngs", P.POSITIONAL_OR_KEYWORD),
         P("num_heads", P.KEYWORD_ONLY)] + [p.replace(kind=P.KEYWORD_ONLY) for p in ctor])
    factory.__name__ = f"{cls.__name__}_mixer"
    factory.__doc__ = f"``zoo.nn.register_mixer`` factory of :class:`{cls.__name__}`."
    return factory


MIXERS = {"mac": MemoryAsContext, "mag": MemoryAsGate, "mal": MemoryAsLayer}
for _v, _cls in MIXERS.items():
    register_mixer(f"titans_{_v}", _factory(_cls))


class TitansLM(DecoderLM):
    """A Titans language model: a :class:`DecoderLM` whose every block mixes with MAC, MAG or MAL.

    Blocks are pre-norm residual: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; embeddings,
    output head, :meth:`init_state` / :meth:`decode_step` and :func:`zoo.models.generate` are
    those of :class:`DecoderLM`.

    Args:
      vocab_size, d_model, num_layers, num_heads: sizes (``num_heads`` attention heads).
      variant: ``"mac"`` (memory as context), ``"mag"`` (memory as gate), ``"mal"`` (memory as layer).
      segment_len: MAC's segment length (MAC only).
      window: MAG/MAL sliding-window size (default ``segment_len``; MAG/MAL only).
      num_persistent: persistent memory tokens ``N_p``.
      memory_depth: layers of the memory MLP (1 = matrix memory); memory_heads: memory heads
        (default ``num_heads``); chunk_size: the memory's training chunk (default
        ``min(16, segment_len)``); memory_kwargs: other :class:`zoo.nn.TitansMemory` options.
      mlp, mlp_ratio, short_conv, pos, max_len, tie_embeddings, dtype, param_dtype: as
        :class:`DecoderLM` (``pos="rope"``: rotary embeddings in the attention).

    Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Sec. 4.
    """

    def __init__(
        self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, *, variant: str = "mac",
        segment_len: int = 64, window: int | None = None, num_persistent: int = 4, memory_depth: int = 2,
        memory_heads: int | None = None, chunk_size: int | None = None, memory_kwargs: dict[str, Any] | None = None,
        mlp: str | None = "swiglu", mlp_ratio: float = 4, short_conv: int = 0, pos: str = "rope",
        max_len: int = 2048, tie_embeddings: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
        _check_int("segment_len", segment_len, 1)
        if window is not None:
            _check_int("window", window, 1)
            if variant == "mac":
                raise ValueError("window is for variant 'mag' / 'mal'; MAC attends inside segments (segment_len)")
        if chunk_size is None:
            chunk_size = min(16, segment_len)
        spec: dict[str, Any] = {
            "module": f"titans_{variant}", "num_persistent": num_persistent, "memory_depth": memory_depth,
            "memory_heads": memory_heads, "chunk_size": chunk_size, "memory_kwargs": memory_kwargs,
        }
        if variant == "mac":
            spec["segment_len"] = segment_len
        else:
            spec["window"] = segment_len if window is None else window
        self.variant, self.segment_len = variant, segment_len
        super().__init__(vocab_size, d_model, num_layers, num_heads, mixers=spec, mlp=mlp, mlp_ratio=mlp_ratio,
                         short_conv=short_conv, pos=pos, max_len=max_len, tie_embeddings=tie_embeddings,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


__all__ = ["MIXERS", "VARIANTS", "MemoryAsContext", "MemoryAsGate", "MemoryAsLayer", "NormGate",
           "SegmentAttention", "TitansLM"]
