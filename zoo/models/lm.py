"""Decoder-only language model with a per-layer token-mixer pattern, and generation.

``DecoderLM`` stacks pre-norm residual blocks

    x = x + conv_g(g) * (g W + b),  g = norm_g(x)   (optional gated-convolution block, zoology)
    h = norm_1(x);  h = h + conv(h)  (optional short causal conv, as BASED / zoology blocks)
    x = x + mixer(h)                  (any zoo.attention transform or registered mixer module)
    x = x + mlp(norm_2(x))            (SwiGLU or GELU; optional)

between a token embedding (optionally plus learned positions; RoPE is applied inside the
attention mixers) and a final RMS norm with (tied) output logits. Mixers are given per layer
(``mixers=["based", {"transform": "sliding_window", "window": 8}, "softmax"]``), so hybrid
models are a config string. Decoding runs on the mixers' own recurrent states (KV caches,
linear-attention states, ...): :meth:`DecoderLM.init_state`, :meth:`DecoderLM.prefill` (a whole
prompt in one parallel call per layer, returning every layer's state) and
:meth:`DecoderLM.decode_step` (one token), with :func:`generate` on top (prefill the prompt, then
one decode step per new token; one jitted function per config).

Bad input is a ``ValueError`` naming the argument: token ids outside ``[0, vocab_size)`` (checked
when the values are concrete, i.e. outside ``jit``), decoding past a learned-position
``max_len``, a ``generate(max_len=...)`` shorter than prompt + steps, length-0 sequences.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention.common import concrete
from zoo.nn.attention import build_mixer
from zoo.nn.layers import MLP, Embed, RMSNorm, ShortConv, normal_init, param

Array = jax.Array
POS = ("rope", "learned", "none")
MLPS = ("swiglu", "gelu", None)


def _check_int(name: str, x: Any, minimum: int = 1) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {x!r}")


def _check_choice(name: str, x: Any, choices: Sequence[Any]) -> None:
    if x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {x!r}")


def mixer_specs(mixers: Any, num_layers: int) -> list[Any]:
    """One mixer spec per layer: a single spec (str, dict, Transform) for all, or a list of
    ``num_layers`` specs; ValueError naming ``mixers`` otherwise."""
    if isinstance(mixers, (list, tuple)):
        if len(mixers) != num_layers:
            raise ValueError(f"mixers has {len(mixers)} entries but num_layers={num_layers}; give one per layer")
        return list(mixers)
    return [mixers] * num_layers


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` entries) of ``model``; works on an abstract
    model from ``nnx.eval_shape`` too."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(math.prod(x.shape) for x in leaves)


def decode_steps(module: Any, x: Array, state: Any, position: Array | int = 0) -> tuple[Array, Any]:
    """``T`` calls of ``module.decode_step`` in a ``lax.scan``: ``x [B, T, E]`` at positions
    ``position .. position + T - 1`` -> ``(y [B, T, E], state)``. The definition a mixer's
    ``prefill`` must equal, and the prefill of a module that has none."""
    pos0 = jnp.asarray(position, jnp.int32)

    def body(st, inp):
        x_t, t = inp
        y_t, st = module.decode_step(x_t, st, pos0 + t)
        return st, y_t

    state, ys = jax.lax.scan(body, state, (jnp.swapaxes(x, 0, 1), jnp.arange(x.shape[1], dtype=jnp.int32)))
    return jnp.swapaxes(ys, 0, 1), state


def prefill_module(module: Any, x: Array, state: Any, position: Array | int = 0) -> tuple[Array, Any]:
    """``module.prefill(x, state, position)`` (one parallel call, the mixer interface), or
    :func:`decode_steps` for a module that offers only ``decode_step``."""
    if hasattr(module, "prefill"):
        return module.prefill(x, state, position)
    return decode_steps(module, x, state, position)


def check_tokens(name: str, tokens: Any, vocab_size: int, *, ndim: int = 2) -> Array:
    """``tokens`` as an int array of rank ``ndim`` (``[batch, length >= 1]`` or ``[batch]``) whose
    ids lie in ``[0, vocab_size)``; ValueError naming ``name`` otherwise. The range is checked
    when the values are concrete (not under ``jit``, where they are unknown)."""
    a = concrete(tokens)
    dt = getattr(tokens, "dtype", None) if a is None else a.dtype
    shape = tuple(getattr(tokens, "shape", ())) if a is None else a.shape
    layout = "[batch, length]" if ndim == 2 else "[batch]"
    if len(shape) != ndim or dt is None or not jnp.issubdtype(dt, jnp.integer):
        raise ValueError(f"{name} must be int {layout}; got {dt} {shape}")
    if ndim == 2 and shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token (length >= 1); got shape {shape}")
    if a is not None and a.size:
        bad = (a < 0) | (a >= vocab_size)
        if bad.any():
            raise ValueError(
                f"{name} must hold token ids in [0, vocab_size={vocab_size}); got {int(a[bad].flat[0])} "
                f"({int(bad.sum())} out of range)"
            )
    return jnp.asarray(tokens)


class GatedConv(nnx.Module):
    """Zoology's gated short-convolution residual block (BaseConv with a short filter):

        y = x + conv(h) * (h W + b),    h = norm(x),

    ``conv`` a causal depthwise convolution of ``width`` taps with a bias
    (``conv(h)_t = sum_{i<width} K[i] * h_{t-i} + c``, a :class:`ShortConv`), ``W [d, d]``,
    ``b [d]``. The elementwise product of the convolved and the projected input is what lets a
    following recall layer (BASED, linear attention) see "this token and the previous one" in
    one feature, which MQAR needs (Arora et al. 2023, "Zoology: Measuring and Improving Recall in
    Efficient Language Models", section 4 / appendix; BASED, Arora et al. 2024, "Simple linear
    attention language models balance the recall-throughput tradeoff", stacks it before each
    BASED layer). ``x [B, T, d] -> [B, T, d]``; decoding keeps the conv's last ``width - 1``
    normalised inputs: :meth:`init_state`, :meth:`prefill`, :meth:`decode_step`, all equal to the
    parallel form.
    """

    def __init__(self, d_model: int, width: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        _check_int("gated_conv", width)
        self.dtype = dtype
        self.norm = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = ShortConv(d_model, width, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w = param(rngs, normal_init(d_model), (d_model, d_model), (None, "embed"), param_dtype)
        self.b = param(rngs, nnx.initializers.zeros, (d_model,), ("embed",), param_dtype)

    def _gate(self, h: Array) -> Array:
        dt = self.dtype or h.dtype
        return h.astype(dt) @ self.w[...].astype(dt) + self.b[...].astype(dt)

    def __call__(self, x: Array) -> Array:
        """``x [B, T, d]`` -> ``x + conv(h) * (h W + b)`` ``[B, T, d]`` (causal)."""
        h = self.norm(x)
        return x + (self.conv(h) * self._gate(h)).astype(x.dtype)

    def init_state(self, batch: int) -> Array:
        """The conv's last ``width - 1`` normalised inputs, zeros: ``[batch, width - 1, d]``."""
        return self.conv.init_state(batch)

    def decode_step(self, x_t: Array, state: Array) -> tuple[Array, Array]:
        """One token ``x_t [B, d]`` -> ``(y_t [B, d], state)``."""
        h = self.norm(x_t)
        c, state = self.conv.decode_step(h, state)
        return x_t + (c * self._gate(h)).astype(x_t.dtype), state

    def prefill(self, x: Array, state: Array) -> tuple[Array, Array]:
        """``x [B, T, d]`` after the inputs kept in ``state`` -> ``(y [B, T, d], state)``, equal to
        ``T`` :meth:`decode_step` calls."""
        h = self.norm(x)
        c, state = self.conv.prefill(h, state)
        return x + (c * self._gate(h)).astype(x.dtype), state


class Block(nnx.Module):
    """Pre-norm residual block: ``x + mixer(h + conv(h))`` with ``h = norm_1(x)``, then
    ``x + mlp(norm_2(x))``. ``conv`` (a :class:`ShortConv` of width ``short_conv``) and the MLP are
    optional. With ``gated_conv > 0`` a :class:`GatedConv` residual block of that width runs first
    (``x + conv(g) * (g W + b)``, ``g = norm(x)``: zoology's BaseConv layer before each mixer).
    ``mixer`` is any module with the mixer interface (see ``zoo.nn.register_mixer``)."""

    def __init__(
        self, d_model: int, mixer: nnx.Module, *, mlp: str | None = "swiglu", mlp_hidden: int = 0,
        short_conv: int = 0, gated_conv: int = 0, dtype: Any = None, param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_int("gated_conv", gated_conv, 0)
        gate = GatedConv(d_model, gated_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if gated_conv else None
        self.gate = nnx.data(gate)
        self.norm1 = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        conv = ShortConv(d_model, short_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if short_conv else None
        self.conv = nnx.data(conv)
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.mlp = MLP(d_model, mlp_hidden, kind=mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = nnx.data(None)

    def __call__(self, x: Array, *, causal: bool = True, mask: Array | None = None) -> Array:
        """``x [B, T, E]`` -> ``[B, T, E]`` (``mask`` is passed to the mixer only when given)."""
        if self.gate is not None:
            x = self.gate(x)
        h = self.norm1(x)
        if self.conv is not None:
            h = h + self.conv(h)
        kw = {} if mask is None else {"mask": mask}
        x = x + self.mixer(h, causal=causal, **kw).astype(x.dtype)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return x

    def init_state(self, batch: int, max_len: int) -> dict[str, Any]:
        """Decoding state: ``{"mixer": ..., "conv": ..., "gate": ...}`` (``conv`` only with a short
        conv, ``gate`` only with a gated-conv block)."""
        state = {"mixer": self.mixer.init_state(batch, max_len)}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch)
        if self.gate is not None:
            state["gate"] = self.gate.init_state(batch)
        return state

    def decode_step(self, x_t: Array, state: dict[str, Any], position: Array) -> tuple[Array, dict[str, Any]]:
        """One token ``x_t [B, E]`` at ``position`` -> ``(y_t [B, E], state)``."""
        state = dict(state)
        if self.gate is not None:
            x_t, state["gate"] = self.gate.decode_step(x_t, state["gate"])
        h = self.norm1(x_t)
        if self.conv is not None:
            c, state["conv"] = self.conv.decode_step(h, state["conv"])
            h = h + c
        y, state["mixer"] = self.mixer.decode_step(h, state["mixer"], position)
        x_t = x_t + y.astype(x_t.dtype)
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.norm2(x_t)).astype(x_t.dtype)
        return x_t, state

    def prefill(self, x: Array, state: dict[str, Any], position: Array | int = 0) -> tuple[Array, dict[str, Any]]:
        """``x [B, T, E]`` at positions ``position .. position + T - 1`` -> ``(y [B, T, E], state)``:
        one parallel call of the conv's and the mixer's ``prefill`` (:func:`prefill_module`),
        equal to ``T`` :meth:`decode_step` calls."""
        state = dict(state)
        if self.gate is not None:
            x, state["gate"] = self.gate.prefill(x, state["gate"])
        h = self.norm1(x)
        if self.conv is not None:
            c, state["conv"] = self.conv.prefill(h, state["conv"])
            h = h + c
        y, state["mixer"] = prefill_module(self.mixer, h, state["mixer"], position)
        x = x + y.astype(x.dtype)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return x, state


def build_blocks(
    *, d_model: int, num_layers: int, num_heads: int, mixers: Any, num_kv_heads: int | None,
    head_dim: int | None, mlp: str | None, mlp_ratio: float, short_conv: int, rope: bool,
    dtype: Any, param_dtype: Any, rngs: nnx.Rngs, rope_scaling: Any = None, gated_conv: int = 0,
) -> nnx.List:
    """Validates the shared block arguments and builds the stack of :class:`Block` s."""
    for name, x in (("d_model", d_model), ("num_layers", num_layers), ("num_heads", num_heads)):
        _check_int(name, x)
    _check_int("short_conv", short_conv, 0)
    _check_int("gated_conv", gated_conv, 0)
    _check_choice("mlp", mlp, MLPS)
    if head_dim is None and d_model % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model}) (or give head_dim)")
    if num_kv_heads is not None and (not isinstance(num_kv_heads, int) or num_kv_heads <= 0
                                     or num_heads % num_kv_heads):
        raise ValueError(f"num_kv_heads ({num_kv_heads!r}) must be a positive int dividing num_heads ({num_heads})")
    if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
        raise ValueError(f"mlp_ratio must be > 0; got {mlp_ratio!r}")
    specs = mixer_specs(mixers, num_layers)
    hidden = int(round(mlp_ratio * d_model))
    if rope_scaling is not None and not rope:
        raise ValueError("rope_scaling needs rotary positions (pos='rope')")
    defaults = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rope=rope,
                    dtype=dtype, param_dtype=param_dtype)
    if rope_scaling is not None:
        defaults["rope_scaling"] = rope_scaling
    blocks = []
    for i, spec in enumerate(specs):
        mixer = build_mixer(spec, d_model, rngs=rngs, name=f"mixers[{i}]", **defaults)
        blocks.append(Block(d_model, mixer, mlp=mlp, mlp_hidden=hidden, short_conv=short_conv,
                            gated_conv=gated_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    return nnx.List(blocks)


class LMState(NamedTuple):
    """Decoding state of :class:`DecoderLM`: one state per block and the next position (int32)."""

    layers: tuple[Any, ...]
    position: Array


class DecoderLM(nnx.Module):
    """Causal decoder language model ``tokens [B, T] -> logits [B, T, V]`` (see module docstring).

    Args:
      vocab_size, d_model, num_layers, num_heads: sizes.
      mixers: one spec for all layers or a list with one per layer; a spec is a
        ``zoo.attention`` name (``"softmax"``, ``"based"``...), a dict ``{"transform": name,
        **kw}`` (``kw``: :class:`zoo.nn.MultiHeadAttention` arguments or transform options,
        e.g. ``"window": 8``) or ``{"module": name, **kw}`` (a ``zoo.nn.register_mixer`` mixer).
      num_kv_heads, head_dim: attention defaults (grouped-query heads; ``d_model // num_heads``).
      mlp: ``"swiglu"``, ``"gelu"`` or None; hidden width ``round(mlp_ratio * d_model)``.
      short_conv: width of a causal depthwise conv applied before each mixer (0 = off).
      gated_conv: width of the causal depthwise conv of a :class:`GatedConv` residual block
        ``x + conv(h) * (h W + b)`` (``h = norm(x)``) placed before each mixer block (0 = off):
        the zoology / BASED stack (Arora et al. 2023, 2024), in which recurrent mixers such as
        BASED solve MQAR. Decoding carries its conv state.
      pos: ``"rope"`` (rotary, in the attention mixers), ``"learned"`` (``[max_len, d_model]``
        added to the embeddings) or ``"none"``.
      rope_scaling: RoPE length-extrapolation scaling of every attention mixer
        (:class:`zoo.attention.rope.RopeScaling` or a dict, e.g. ``{"kind": "yarn", "factor": 4,
        "original_max_len": 256}``; needs ``pos="rope"``); parameter-free kinds can be set after
        training (a new model with the same parameters), ``clex`` adds ODE parameters.
      max_len: longest sequence (learned positions; default decoding capacity).
      tie_embeddings: output logits ``h E^T`` with the input embedding ``E``; else a separate
        ``[d_model, vocab]`` head.
      dtype: compute dtype; param_dtype: parameter dtype. Logits are float32.

    Parameter count with tied embeddings, ``pos="rope"``, SwiGLU, no biases, ``H D = d``:
    ``V d + L (4 d^2 + 3 d F + 2 d + w d) + d`` (``F`` MLP width, ``w`` short-conv width); a
    gated-conv block of width ``g`` adds ``L (d^2 + (g + 3) d)`` (``W``, ``b``, conv taps and bias,
    norm).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        *,
        mixers: Any = "softmax",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mlp: str | None = "swiglu",
        mlp_ratio: float = 4,
        short_conv: int = 0,
        gated_conv: int = 0,
        pos: str = "rope",
        rope_scaling: Any = None,
        max_len: int = 2048,
        tie_embeddings: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_int("vocab_size", vocab_size)
        _check_int("max_len", max_len)
        _check_choice("pos", pos, POS)
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
        self.pos, self.max_len, self.tie_embeddings, self.dtype = pos, max_len, tie_embeddings, dtype
        self.blocks = build_blocks(
            d_model=d_model, num_layers=num_layers, num_heads=num_heads, mixers=mixers,
            num_kv_heads=num_kv_heads, head_dim=head_dim, mlp=mlp, mlp_ratio=mlp_ratio,
            short_conv=short_conv, rope=pos == "rope", dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            rope_scaling=rope_scaling, gated_conv=gated_conv,
        )
        self.embed = Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if pos == "learned":
            self.pos_embed = param(rngs, normal_init(d_model), (max_len, d_model), (None, "embed"), param_dtype)
        self.final_norm = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not tie_embeddings:
            self.lm_head = param(rngs, normal_init(d_model), (d_model, vocab_size), ("embed", "vocab"), param_dtype)

    def _logits(self, x: Array) -> Array:
        x = self.final_norm(x)
        if self.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = x @ self.lm_head[...].astype(x.dtype)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: Array) -> Array:
        """``tokens [B, T]`` int ids in ``[0, vocab_size)`` -> logits ``[B, T, vocab]`` float32 (causal)."""
        tokens = check_tokens("tokens", tokens, self.vocab_size)
        t = tokens.shape[1]
        x = self.embed(tokens)
        if self.pos == "learned":
            if t > self.max_len:
                raise ValueError(f"tokens length {t} > max_len {self.max_len} (learned positions)")
            x = x + self.pos_embed[...][:t].astype(x.dtype)
        for blk in self.blocks:
            x = blk(x, causal=True)
        return self._logits(x)

    def _positions(self, x: Array, position: Array | int, length: int, what: str) -> Array:
        """``x [B, T, E]`` plus the learned embeddings of positions ``position .. position + T - 1``.

        A concrete position past ``max_len`` is a ValueError; a traced one (under ``jit``) gives NaN
        rows there (``mode="fill"``) instead of silently reusing the last embedding."""
        if self.pos != "learned":
            return x
        p = concrete(position)
        if p is not None and int(p) + length > self.max_len:
            raise ValueError(
                f"{what}: positions {int(p)}..{int(p) + length - 1} go past max_len {self.max_len} "
                f"(learned positions); decode at most max_len tokens"
            )
        idx = jnp.asarray(position, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
        pe = self.pos_embed[...].at[idx].get(mode="fill", fill_value=jnp.nan)
        return x + pe.astype(x.dtype)[None]

    def init_state(self, batch: int, max_len: int | None = None) -> LMState:
        """Empty decoding state for ``batch`` sequences of up to ``max_len`` (default the model's)
        tokens, at position 0. With learned positions ``max_len`` may not exceed the model's."""
        _check_int("batch", batch)
        max_len = self.max_len if max_len is None else max_len
        _check_int("max_len", max_len)
        if self.pos == "learned" and max_len > self.max_len:
            raise ValueError(
                f"max_len ({max_len}) > the model's max_len ({self.max_len}): learned positions end there"
            )
        layers = tuple(blk.init_state(batch, max_len) for blk in self.blocks)
        return LMState(layers, jnp.zeros((), jnp.int32))

    def decode_step(self, tokens_t: Array, state: LMState) -> tuple[Array, LMState]:
        """Consumes one token per sequence ``tokens_t [B]`` (ids in ``[0, vocab_size)``) at
        ``state.position``; returns the next-token logits ``[B, vocab]`` (float32) and the
        advanced state."""
        tokens_t = check_tokens("tokens_t", tokens_t, self.vocab_size, ndim=1)
        pos = state.position
        x = self._positions(self.embed(tokens_t)[:, None], pos, 1, "decode_step")[:, 0]
        layers = []
        for blk, s in zip(self.blocks, state.layers):
            x, s = blk.decode_step(x, s, pos)
            layers.append(s)
        return self._logits(x), LMState(tuple(layers), pos + 1)

    def prefill(
        self, tokens: Array, state: LMState | None = None, *, max_len: int | None = None, last_only: bool = False,
    ) -> tuple[Array, LMState]:
        """Consumes a prompt ``tokens [B, T]`` from ``state`` in one parallel call per layer
        (:meth:`Block.prefill`); equal to ``T`` :meth:`decode_step` calls.

        ``state=None`` starts a fresh state (:meth:`init_state` with ``max_len``) at position 0,
        a position known while tracing (mixers that process segments, such as Titans MAC, then
        run whole segments in parallel). Returns the logits ``[B, T, vocab]`` (``last_only``:
        only the last token's, ``[B, vocab]``; the vocabulary projection of the other tokens is
        skipped) and the state advanced by ``T``.
        """
        tokens = check_tokens("tokens", tokens, self.vocab_size)
        b, t = tokens.shape
        if state is None:
            state, position = self.init_state(b, max_len), 0
        else:
            if max_len is not None:
                raise ValueError("max_len is for a fresh state (state=None); the given state has its own capacity")
            p = concrete(state.position)
            position = state.position if p is None else int(p)
        x = self._positions(self.embed(tokens), position, t, "prefill")
        layers = []
        for blk, s in zip(self.blocks, state.layers):
            x, s = blk.prefill(x, s, position)
            layers.append(s)
        logits = self._logits(x[:, -1] if last_only else x)
        return logits, LMState(tuple(layers), state.position + t)


# ----------------------------------------------------------------------------- generation


def _sample(logits: Array, key: Array, temperature: float, top_k: int | None) -> Array:
    """Greedy (``temperature == 0``) or temperature / top-k sampling from ``logits [B, V]``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _make_generate(graphdef: Any, num_steps: int, temperature: float, top_k: int | None, capacity: int):
    def run(state: Any, prompt: Array, key: Array) -> Array:
        model = nnx.merge(graphdef, state)
        logits, st = model.prefill(prompt, max_len=capacity, last_only=True)
        keys = jax.random.split(key, num_steps)
        first = _sample(logits, keys[0], temperature, top_k)

        def decode(carry, k):
            st, tok = carry
            logits, st = model.decode_step(tok, st)
            nxt = _sample(logits, k, temperature, top_k)
            return (st, nxt), nxt

        _, rest = jax.lax.scan(decode, (st, first), keys[1:])
        new = jnp.concatenate([first[:, None], rest.T], axis=1)
        return jnp.concatenate([prompt, new.astype(prompt.dtype)], axis=1)

    return jax.jit(run)


_make_generate_cached = functools.lru_cache(maxsize=32)(_make_generate)


def generate(
    model: DecoderLM, prompt: Array, num_steps: int, *, key: Array | None = None,
    temperature: float = 0.0, top_k: int | None = None, max_len: int | None = None,
) -> Array:
    """Autoregressive generation: ``prompt [B, T0]`` int -> ``[B, T0 + num_steps]``.

    The prompt is consumed by :meth:`DecoderLM.prefill` (one parallel call per layer), then
    ``num_steps`` tokens are sampled, each fed back through :meth:`DecoderLM.decode_step` (a
    ``lax.scan``). ``temperature=0`` is greedy (deterministic); otherwise logits are divided by
    ``temperature``, restricted to the ``top_k`` largest when given, and sampled with ``key``
    (required). The decoding state holds ``max_len`` tokens (default ``T0 + num_steps``; a
    smaller one is a ValueError rather than a silently wrapping or clamped cache). With learned
    positions ``T0 + num_steps`` may not exceed the model's ``max_len``. The whole loop is one
    ``jax.jit`` function, cached per model structure and settings.
    """
    prompt = check_tokens("prompt", prompt, model.vocab_size)
    _check_int("num_steps", num_steps, 0)
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0; got {temperature!r}")
    if top_k is not None:
        _check_int("top_k", top_k)
        if top_k > model.vocab_size:
            raise ValueError(f"top_k ({top_k}) > vocab_size ({model.vocab_size})")
    if temperature > 0 and key is None:
        raise ValueError("key: sampling with temperature > 0 needs a PRNG key")
    total = prompt.shape[1] + num_steps
    capacity = total if max_len is None else max_len
    _check_int("max_len", capacity)
    if capacity < total:
        raise ValueError(
            f"max_len ({capacity}) < prompt length + num_steps ({prompt.shape[1]} + {num_steps} = {total}): "
            f"the decoding state must hold the whole sequence"
        )
    if model.pos == "learned" and total > model.max_len:
        raise ValueError(f"prompt + num_steps = {total} > model max_len {model.max_len} (learned positions)")
    if model.pos == "learned":
        capacity = min(capacity, model.max_len)
    if num_steps == 0:
        return prompt
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    args = (graphdef, num_steps, float(temperature), top_k, capacity)
    try:
        fn = _make_generate_cached(*args)
    except TypeError:  # an unhashable static attribute somewhere in the model
        fn = _make_generate(*args)
    return fn(state, prompt.astype(jnp.int32), key)


__all__ = ["Block", "DecoderLM", "GatedConv", "LMState", "build_blocks", "check_tokens", "decode_steps", "generate",
           "mixer_specs", "param_count", "prefill_module"]
