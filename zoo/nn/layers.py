"""Building-block NNX layers with logical axis names on every parameter.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds logical axis names from
``AXES`` (``embed, heads, kv_heads, head_dim, mlp, vocab``; ``None`` = replicated). A rules table
(``nnx.logical_axis_rules``) maps them to mesh axes; ``nnx.get_partition_spec(nnx.state(m))``
reads them back. Eager sharding (flax >= 0.12) shards a parameter when it is created, which
needs a mesh: :func:`axes` turns it on only while a mesh is set (``jax.set_mesh``), so the same
code builds a model on one CPU with no mesh, under ``nnx.eval_shape``, or sharded under a mesh
(with rules that cover the names).

Layers: :class:`RMSNorm`, :class:`Embed`, :class:`MLP` (GELU or SwiGLU), :class:`ShortConv`
(causal depthwise convolution over time with a decoding state), and rotary position
embeddings (:func:`rope_frequencies`, :func:`apply_rope`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from zoo.attention import rope as _rope

Array = jax.Array
AXES = ("embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
Names = Sequence[str | None]


def axes(*names: str | None) -> dict[str, Any]:
    """Variable metadata giving a parameter the logical axis ``names`` (one per dimension).

    ``nnx.Param(value, **axes("embed", "mlp"))``. Eager sharding (the parameter is placed
    sharded when created) is requested only when it is on, a mesh is set (``jax.set_mesh``) and
    the active ``nnx.logical_axis_rules`` map every name to axes of that mesh: creating an eagerly
    sharded variable without a mesh, or with a name the mesh does not know, raises in flax 0.12.
    Otherwise the names are metadata only, read later by ``nnx.get_partition_spec``.
    """
    for n in names:
        if n is not None and n not in AXES:
            raise ValueError(f"unknown logical axis name {n!r}; valid names: {', '.join(AXES)} or None")
    return {"out_sharding": tuple(names), "eager_sharding": _can_shard_eagerly(names)}


def _can_shard_eagerly(names: Sequence[str | None]) -> bool:
    if not nnx.using_eager_sharding():
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    rules = dict(core_spmd.get_logical_axis_rules() or ())
    for n in names:
        if n is None:
            continue
        target = rules.get(n, n)
        targets = target if isinstance(target, (tuple, list)) else (target,)
        if any(a is not None and a not in mesh.axis_names for a in targets):
            return False
    return True


def normal_init(fan_in: int, scale: float = 1.0) -> nnx.Initializer:
    """``N(0, scale^2 / fan_in)`` (LeCun normal with an explicit fan-in, for multi-axis kernels)."""
    std = scale / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return (std * jax.random.normal(key, tuple(shape), jnp.float32)).astype(dtype)

    return init


def axis_init(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
    """``init`` annotated with logical axis ``names`` (for ``kernel_init=`` of ``nnx.Linear`` etc.)."""
    return nnx.with_metadata(init, **axes(*names))


def param(
    rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], names: Names, dtype: Any = jnp.float32,
) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` drawn with ``init`` and carrying logical axis ``names``."""
    if len(names) != len(shape):
        raise ValueError(f"need one axis name per dimension: shape {tuple(shape)}, names {tuple(names)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), **axes(*names))


def l2norm(x: Array, eps: float = 1e-6) -> Array:
    """``x / sqrt(sum x^2 + eps)`` over the last axis, in float32 (flash-linear-attention's ``l2norm``)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def cast(x: Array, dtype: Any) -> Array:
    """``x`` in ``dtype`` (unchanged when ``dtype`` is None)."""
    return x if dtype is None else x.astype(dtype)


class RMSNorm(nnx.RMSNorm):
    """RMS normalisation ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (Zhang & Sennrich
    2019); ``nnx.RMSNorm`` whose ``scale [num_features]`` carries the logical axis ``axis_name``."""

    def __init__(
        self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None,
        param_dtype: Any = jnp.float32, axis_name: str | None = "embed", rngs: nnx.Rngs,
    ):
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            scale_metadata=axes(axis_name),
        )


class Embed(nnx.Embed):
    """Token embedding table ``[num_embeddings, features]`` with axes ``("vocab", "embed")``.

    Initialised ``N(0, 1/features)`` so that tied output logits ``h . E^T`` of a unit-RMS ``h``
    start at unit scale. ``attend(h)`` gives those logits.
    """

    def __init__(
        self, num_embeddings: int, features: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
            embedding_init=normal_init(features), rngs=rngs, embedding_metadata=axes("vocab", "embed"),
        )


class MLP(nnx.Module):
    """Position-wise feed-forward network ``[..., d_model] -> [..., d_model]``.

    ``kind="swiglu"``: ``W_down (silu(x W_gate) * (x W_up))`` (Shazeer 2020, "GLU Variants Improve
    Transformer"); ``kind="gelu"``: ``W_out gelu(x W_in)``. Kernels ``[d_model, hidden]`` with axes
    ``("embed", "mlp")`` and ``[hidden, d_model]`` with ``("mlp", "embed")``; biases optional.
    Parameter count: ``3 d h`` (swiglu) or ``2 d h`` (gelu), plus ``2h + d`` / ``h + d`` biases.
    """

    def __init__(
        self, d_model: int, hidden: int, *, kind: str = "swiglu", use_bias: bool = False,
        dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"kind must be 'swiglu' or 'gelu'; got {kind!r}")
        for name, n in (("d_model", d_model), ("hidden", hidden)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"{name} must be a positive int; got {n!r}")
        self.kind, self.dtype, self.use_bias = kind, dtype, use_bias
        pd = param_dtype
        self.w_in = param(rngs, normal_init(d_model), (d_model, hidden), ("embed", "mlp"), pd)
        if kind == "swiglu":
            self.w_gate = param(rngs, normal_init(d_model), (d_model, hidden), ("embed", "mlp"), pd)
        self.w_out = param(rngs, normal_init(hidden), (hidden, d_model), ("mlp", "embed"), pd)
        if use_bias:
            zeros = nnx.initializers.zeros
            self.b_in = param(rngs, zeros, (hidden,), ("mlp",), pd)
            if kind == "swiglu":
                self.b_gate = param(rngs, zeros, (hidden,), ("mlp",), pd)
            self.b_out = param(rngs, zeros, (d_model,), ("embed",), pd)

    def __call__(self, x: Array) -> Array:
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        h = x @ self.w_in[...].astype(dt)
        if self.use_bias:
            h = h + self.b_in[...].astype(dt)
        if self.kind == "swiglu":
            g = x @ self.w_gate[...].astype(dt)
            if self.use_bias:
                g = g + self.b_gate[...].astype(dt)
            h = jax.nn.silu(g) * h
        else:
            h = jax.nn.gelu(h)
        y = h @ self.w_out[...].astype(dt)
        if self.use_bias:
            y = y + self.b_out[...].astype(dt)
        return y


class ShortConv(nnx.Module):
    """Causal depthwise convolution over time: ``y_t = sum_{i<width} W[i] * x_{t-i} (+ b)``.

    Each channel has its own ``width`` taps (kernel ``[width, features]``, axes
    ``(None, "embed")``); positions before the start are zeros. The short convolution of
    H3 / BASED / zoology blocks: it gives a mixer access to the previous tokens, which
    associative recall (MQAR) needs to learn quickly. ``__call__(x [B, T, C]) -> [B, T, C]``;
    decoding keeps the last ``width - 1`` inputs: ``init_state(batch)`` -> ``[B, width-1, C]``,
    ``prefill(x [B, T, C], state) -> (y, state)`` (a prompt in one call) and
    ``decode_step(x_t [B, C], state) -> (y_t [B, C], state)``, all equal to the parallel form.
    """

    def __init__(
        self, features: int, width: int, *, use_bias: bool = False, dtype: Any = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int; got {width!r}")
        self.features, self.width, self.use_bias, self.dtype = features, width, use_bias, dtype
        self.kernel = param(rngs, normal_init(width), (width, features), (None, "embed"), param_dtype)
        if use_bias:
            self.bias = param(rngs, nnx.initializers.zeros, (features,), ("embed",), param_dtype)

    def _check(self, name: str, x: Any, rank: int) -> None:
        layout = "[batch, length, features]" if rank == 3 else "[batch, features]"
        if getattr(x, "ndim", None) != rank or x.shape[-1] != self.features:
            raise ValueError(f"{name} must be {layout} with features={self.features}; got {getattr(x, 'shape', x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating point array; got dtype {x.dtype}")

    def _conv(self, xp: Array, t: int) -> Array:
        """``xp [B, width - 1 + t, C]`` (history then the new inputs) -> ``y [B, t, C]``."""
        w = self.kernel[...].astype(xp.dtype)
        # Tap i multiplies x_{t-i}: a sum of width shifted copies (width is small).
        y = sum(w[i] * xp[:, self.width - 1 - i: self.width - 1 - i + t] for i in range(self.width))
        return y + self.bias[...].astype(xp.dtype) if self.use_bias else y

    def __call__(self, x: Array) -> Array:
        self._check("x", x, 3)
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        return self._conv(jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0))), x.shape[1])

    def init_state(self, batch: int, max_len: int | None = None, dtype: Any = None) -> Array:
        """The last ``width - 1`` inputs, zeros: ``[batch, width - 1, features]``."""
        return jnp.zeros((batch, self.width - 1, self.features), dtype or self.dtype or jnp.float32)

    def prefill(self, x: Array, state: Array) -> tuple[Array, Array]:
        """A prompt ``x [B, T, C]`` after the inputs kept in ``state`` -> ``(y [B, T, C], state)``,
        equal to ``T`` calls of :meth:`decode_step`."""
        self._check("x", x, 3)
        dt = self.dtype or x.dtype
        xp = jnp.concatenate([state.astype(dt), x.astype(dt)], axis=1)  # oldest first
        return self._conv(xp, x.shape[1]), xp[:, xp.shape[1] - (self.width - 1):].astype(state.dtype)

    def decode_step(self, x_t: Array, state: Array, position: Any = None) -> tuple[Array, Array]:
        """One token: ``x_t [B, C]`` -> ``(y_t [B, C], new_state)``."""
        self._check("x_t", x_t, 2)
        dt = self.dtype or x_t.dtype
        window = jnp.concatenate([state.astype(dt), x_t.astype(dt)[:, None]], axis=1)  # oldest first
        w = self.kernel[...].astype(dt)[::-1]  # tap width-1 (oldest) ... tap 0 (current)
        y = jnp.einsum("bwc,wc->bc", window, w)
        if self.use_bias:
            y = y + self.bias[...].astype(dt)
        return y, window[:, 1:].astype(state.dtype)


# ----------------------------------------------------------------------------- rotary embeddings


def rope_frequencies(head_dim: int, theta: float = 10_000.0) -> Array:
    """Rotary inverse frequencies ``theta^(-2i/head_dim)``, ``i < head_dim/2`` (float32): the
    unscaled case of :func:`zoo.attention.rope.rope_frequencies` (which also takes a
    ``scaling`` and returns the logit scale)."""
    return _rope.rope_frequencies(head_dim, theta=theta)[0]


def apply_rope(x: Array, positions: Array, theta: float = 10_000.0, *, inv_freq: Array | None = None) -> Array:
    """Rotary position embedding (Su et al. 2021, "RoFormer"), split-half (GPT-NeoX) layout.

    ``x [batch, length, heads, head_dim]``; ``positions`` int ``[length]``, ``[batch, length]`` or
    a scalar (broadcast). Pairs ``(x_i, x_{i + D/2})`` are rotated by angle ``pos * theta^(-2i/D)``
    (computed in float32), so ``rope(q, m) . rope(k, n)`` depends only on ``m - n``. Returns
    ``x``'s shape and dtype. ``inv_freq`` (e.g. a scaled one from
    :func:`zoo.attention.rope.rope_frequencies`) replaces ``theta``'s frequencies; this is
    :func:`zoo.attention.rope.apply_rope`.
    """
    if inv_freq is None:
        inv_freq = rope_frequencies(x.shape[-1], theta)
    return _rope.apply_rope(x, positions, inv_freq)
