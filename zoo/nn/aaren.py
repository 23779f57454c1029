"""Aaren layer: attention as a many-to-many RNN with a learned query (Feng et al., 2024).

For input ``h [B, T, E]``, per head ``n`` with a learned query ``q_n [head_dim]``:

    k_t = h_t W_K + b_K,   v_t = h_t W_V + b_V                   (optionally SiLU(.))
    o_t = sum_{i<=t} softmax_i(scale q_n.k_i) v_i                (prefix softmax, causal)
    y_t = concat_n(o_t) W_O + b_O

``o_t`` is computed by ``zoo.attention.aaren`` with a parallel prefix scan (O(log T) depth) in
training and by its O(1)-state recurrence when decoding (:meth:`init_state` / :meth:`prefill` /
:meth:`decode_step`: state ``(m, u, w)`` per head, constant in T). The query is a parameter
(Xavier-initialised), not a function of the input, so input dependence enters only through
the keys and values. No ``1/sqrt(head_dim)`` by default (the learned query absorbs it), as the
public implementations; ``scale="sqrt"`` uses the Transformer convention.

Mixer ``"aaren_layer"``. It differs from the mixer ``"aaren"`` (``MultiHeadAttention`` with the
``aaren`` transform), where each token is scored with its *own projected query*
``s_t = q_t.k_t`` (``q_t = x_t W_Q``): here the query is one learned parameter per head, as in
the paper.

Paper: Feng, Tung, Hajimirsadeghi, Bengio, Ahmed, "Attention as an RNN" (arXiv 2405.13956).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.aaren import IMPLS as AAREN_IMPLS
from zoo.attention.common import check_float, shape_str
from zoo.nn.attention import check_input, register_mixer
from zoo.nn.layers import param as _param

Array = jax.Array




class AarenLayer(nnx.Module):
    """Multi-head Aaren ``[B, T, d_model] -> [B, T, d_model]`` (causal only).

    Args:
      d_model: model width ``E``.
      num_heads: heads ``H`` (one learned query each).
      head_dim: per-head key/value width (default ``d_model // num_heads``).
      scale: ``None`` (1, default), ``"sqrt"`` (``1/sqrt(head_dim)``) or a number.
      activation: ``None`` or ``"silu"`` on the keys and values (claCase/Attention-as-RNN).
      use_bias: biases on the key/value/output projections.
      impl: ``"associative"`` or ``"sequential"`` scan (``zoo.attention.aaren``).

    Parameters: ``query [H, head_dim]`` (axes ``heads, head_dim``), ``wk, wv [E, H, head_dim]``
    (``embed, heads, head_dim``), ``wo [H, head_dim, E]`` (``heads, head_dim, embed``).
    """

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int | None = None, scale: Any = None,
        activation: str | None = None, use_bias: bool = True, impl: str = "associative",
        dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        for name, val in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim or 1)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) or give head_dim")
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu'; got {activation!r}")
        if impl not in AAREN_IMPLS:
            raise ValueError(f"impl must be one of {AAREN_IMPLS}; got {impl!r}")
        if not (scale is None or scale == "sqrt" or isinstance(scale, (int, float))):
            raise ValueError(f"scale must be None, 'sqrt' or a number; got {scale!r}")
        d = head_dim or d_model // num_heads
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d
        self.scale = 1.0 / math.sqrt(d) if scale == "sqrt" else scale
        self.activation, self.use_bias, self.impl, self.dtype = activation, use_bias, impl, dtype
        pd = param_dtype
        self.query = _param(rngs, nnx.initializers.xavier_uniform(), (num_heads, d), ("heads", "head_dim"), pd)
        fan_in = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
        self.wk = _param(rngs, fan_in, (d_model, num_heads, d), ("embed", "heads", "head_dim"), pd)
        self.wv = _param(rngs, fan_in, (d_model, num_heads, d), ("embed", "heads", "head_dim"), pd)
        fan_out = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
        self.wo = _param(rngs, fan_out, (num_heads, d, d_model), ("heads", "head_dim", "embed"), pd)
        if use_bias:
            zeros = nnx.initializers.zeros_init()
            self.bk = _param(rngs, zeros, (num_heads, d), ("heads", "head_dim"), pd)
            self.bv = _param(rngs, zeros, (num_heads, d), ("heads", "head_dim"), pd)
            self.bo = _param(rngs, zeros, (d_model,), ("embed",), pd)

    def _kv(self, x: Array) -> tuple[Array, Array]:
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        k = jnp.einsum("...e,ehd->...hd", x, self.wk[...].astype(dt))
        v = jnp.einsum("...e,ehd->...hd", x, self.wv[...].astype(dt))
        if self.use_bias:
            k, v = k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if self.activation == "silu":
            k, v = jax.nn.silu(k), jax.nn.silu(v)
        return k, v

    def _out(self, o: Array, dtype: Any) -> Array:
        dt = self.dtype or dtype
        y = jnp.einsum("...hd,hde->...e", o.astype(dt), self.wo[...].astype(dt))
        if self.use_bias:
            y = y + self.bo[...].astype(dt)
        return y

    def __call__(self, x: Array, *, causal: bool = True, mask: Array | None = None) -> Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; ``mask [B, T]`` (True = token; padding is
        skipped by the scan). Aaren is causal: ``causal=False`` raises ValueError."""
        if causal is not True:
            raise ValueError("causal must be True: Aaren is a causal prefix scan (no bidirectional form)")
        check_input("x", x, self.d_model)
        k, v = self._kv(x)
        o = za.aaren(self.query[...].astype(k.dtype), k, v, causal=True, scale=self.scale, mask=mask, impl=self.impl)
        return self._out(o, x.dtype)

    def init_state(self, batch: int, max_len: int | None = None) -> za.AarenState:
        """The empty prefix (constant size: ``max_len`` is not needed)."""
        return za.get("aaren").init_state(batch, self.num_heads, self.head_dim)

    def prefill(self, x: Array, state: za.AarenState, position: Any = 0) -> tuple[Array, za.AarenState]:
        """A prompt ``x [B, T, d_model]`` in one parallel scan from ``state`` ->
        ``(y [B, T, d_model], state)``, equal to ``T`` calls of :meth:`decode_step` (``position``
        is unused: Aaren has no positions)."""
        check_input("x", x, self.d_model)
        k, v = self._kv(x)
        o, state = za.get("aaren").prefill(state, self.query[...].astype(k.dtype), k, v, scale=self.scale,
                                           impl=self.impl)
        return self._out(o, x.dtype), state

    def decode_step(self, x_t: Array, state: za.AarenState, position: Any = None) -> tuple[Array, za.AarenState]:
        """One token ``x_t [B, d_model]`` (or ``[B, 1, d_model]``) -> ``(y_t, state)``; equals the
        parallel form at that position. ``position`` is unused (Aaren has no positions)."""
        squeeze = getattr(x_t, "ndim", None) == 2
        x = x_t if squeeze else (x_t[:, 0] if getattr(x_t, "ndim", None) == 3 and x_t.shape[1] == 1 else None)
        if x is None or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x_t must be [batch, d_model={self.d_model}] or [batch, 1, d_model]; got {shape_str(x_t)}"
            )
        check_float("x_t", x)
        k, v = self._kv(x)
        o, state = za.get("aaren").step(state, self.query[...].astype(k.dtype), k, v, scale=self.scale)
        y = self._out(o, x_t.dtype)
        return (y if squeeze else y[:, None]), state


def aaren_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> AarenLayer:
    """``zoo.nn.register_mixer`` factory of :class:`AarenLayer` (mixer ``"aaren_layer"``)."""
    return AarenLayer(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)


register_mixer(
    "aaren_layer", aaren_mixer,
    description="AarenLayer: Aaren with one learned query per head, as the paper (the mixer 'aaren' scores "
                "each token with its own projected query inside MultiHeadAttention)",
)
