"""Flow-Attention layer (Flowformer; Wu, Wu, Xu, Wang, Long, ICML 2022).

    q = x W_q + b_q,  k = c W_k + b_k,  v = c W_v + b_v     (c = x for self-attention)
    y = Dropout( FlowAttention(q, k, v) W_o + b_o )

with the flow-conservation linear attention of ``zoo.attention.flow`` (sigmoid feature map,
incoming/outgoing flows, competition and allocation; no ``1/sqrt(d)``), split into heads of
``head_dim``. Causal (the default, language models: prefix flows, O(d e) recurrent state for decoding via
:meth:`init_state` / :meth:`prefill` / :meth:`decode_step`) or non-causal (also
cross-attention with ``context``). All four projections have biases, as the reference layers;
output dropout 0.05 in the paper's NLP setup, 0 by default here.

Without dropout this layer computes exactly ``zoo.nn.MultiHeadAttention(num_heads, d_model,
transform="flow", use_bias=True, transform_kwargs={"eps": eps, "clamp": clamp})`` (a test
checks it), so it is not a separate mixer: the mixer for Flow-Attention is ``"flow"``. The
class keeps the paper's parameter layout (for loading reference weights) and its dropout.

Reference code: thuml/Flowformer ``Flow_Attention.py`` (``Flow_Attention``,
``Flow_Attention_Causal``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.common import check_float, shape_str
from zoo.nn.attention import check_input
from zoo.nn.layers import param as _param

Array = jax.Array




class FlowAttentionLayer(nnx.Module):
    """Multi-head Flow-Attention ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
      d_model: model width; num_heads, head_dim: heads (``head_dim`` default ``d_model // num_heads``).
      eps: the flows' epsilon (1e-6). clamp: clip of the conserved outgoing flow (1 as the core
        file; ``None`` = off).
      dropout: output dropout rate (needs ``rngs`` with a ``dropout`` stream when > 0 in training).
      chunk_size, impl: form of the causal product (``zoo.attention.flow``).

    Parameters ``wq, wk, wv [E, H, head_dim]`` (axes ``embed, heads, head_dim``) with biases
    ``[H, head_dim]``, ``wo [H, head_dim, E]`` (``heads, head_dim, embed``) with bias ``[E]``.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int | None = None, eps: float = 1e-6,
        clamp: float | None = 1.0, dropout: float = 0.0, chunk_size: int | None = None, impl: str = "chunked",
        dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        for name, val in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim or 1)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) or give head_dim")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number; got {eps!r}")
        if clamp is not None and not (isinstance(clamp, (int, float)) and clamp > 0):
            raise ValueError(f"clamp must be a positive number or None; got {clamp!r}")
        d = head_dim or d_model // num_heads
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d
        self.eps, self.clamp, self.chunk_size, self.impl, self.dtype = eps, clamp, chunk_size, impl, dtype
        pd = param_dtype
        w_in = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
        zeros = nnx.initializers.zeros_init()
        for n in ("q", "k", "v"):
            setattr(self, f"w{n}", _param(rngs, w_in, (d_model, num_heads, d), ("embed", "heads", "head_dim"), pd))
            setattr(self, f"b{n}", _param(rngs, zeros, (num_heads, d), ("heads", "head_dim"), pd))
        w_out = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
        self.wo = _param(rngs, w_out, (num_heads, d, d_model), ("heads", "head_dim", "embed"), pd)
        self.bo = _param(rngs, zeros, (d_model,), ("embed",), pd)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def _proj(self, x: Array, name: str) -> Array:
        dt = self.dtype or x.dtype
        w, b = getattr(self, f"w{name}"), getattr(self, f"b{name}")
        return jnp.einsum("...e,ehd->...hd", x.astype(dt), w[...].astype(dt)) + b[...].astype(dt)

    def _out(self, o: Array, dtype: Any) -> Array:
        dt = self.dtype or dtype
        y = jnp.einsum("...hd,hde->...e", o.astype(dt), self.wo[...].astype(dt)) + self.bo[...].astype(dt)
        return self.dropout(y) if self.dropout is not None else y

    def __call__(
        self, x: Array, context: Array | None = None, *, causal: bool = True, mask: Array | None = None,
    ) -> Array:
        """``x [B, T, E] -> [B, T, E]``. ``context [B, S, E]``: keys/values from another sequence
        (cross-attention; ``causal=True`` then needs ``S == T``: query ``i`` sees context positions
        ``j <= i``). ``mask`` is not supported (Flow-Attention has no key masking: every source
        takes part in the flows) and raises ValueError."""
        check_input("x", x, self.d_model)
        if mask is not None:
            raise ValueError("mask is not supported by Flow-Attention (no key masking in the flows); pass None")
        c = x
        if context is not None:
            check_input("context", context, self.d_model)
            if context.shape[0] != x.shape[0] or (causal and context.shape[1] != x.shape[1]):
                raise ValueError(
                    f"context must be [batch={x.shape[0]}, length, d_model={self.d_model}] (the length of x "
                    f"= {x.shape[1]} when causal); got {shape_str(context)}"
                )
            c = context
        q, k, v = self._proj(x, "q"), self._proj(c, "k"), self._proj(c, "v")
        o = za.flow(q, k, v, causal=causal, eps=self.eps, clamp=self.clamp, chunk_size=self.chunk_size, impl=self.impl)
        return self._out(o, x.dtype)

    def _options(self) -> dict[str, Any]:
        return {"eps": self.eps, "clamp": self.clamp, "chunk_size": self.chunk_size, "impl": self.impl}

    def init_state(self, batch: int, max_len: int | None = None) -> za.FlowState:
        """Empty causal state (constant size: ``max_len`` is not needed)."""
        return za.get("flow").init_state(batch, self.num_heads, self.head_dim)

    def prefill(self, x: Array, state: za.FlowState, position: Any = 0) -> tuple[Array, za.FlowState]:
        """A prompt ``x [B, T, E]`` in one parallel call from ``state`` -> ``(y [B, T, E], state)``,
        equal to ``T`` calls of :meth:`decode_step` (``position`` is unused: no positions)."""
        check_input("x", x, self.d_model)
        q, k, v = self._proj(x, "q"), self._proj(x, "k"), self._proj(x, "v")
        o, state = za.get("flow").prefill(state, q, k, v, **self._options())
        return self._out(o, x.dtype), state

    def decode_step(self, x_t: Array, state: za.FlowState, position: Any = None) -> tuple[Array, za.FlowState]:
        """One causal token ``x_t [B, E]`` (or ``[B, 1, E]``) -> ``(y_t, state)``; equals the causal
        parallel form at that position (the position is the state's own token count)."""
        squeeze = getattr(x_t, "ndim", None) == 2
        x = x_t if squeeze else (x_t[:, 0] if getattr(x_t, "ndim", None) == 3 and x_t.shape[1] == 1 else None)
        if x is None or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x_t must be [batch, d_model={self.d_model}] or [batch, 1, d_model]; got {shape_str(x_t)}"
            )
        check_float("x_t", x)
        q, k, v = self._proj(x, "q"), self._proj(x, "k"), self._proj(x, "v")
        o, state = za.get("flow").step(state, q, k, v, **self._options())
        y = self._out(o, x_t.dtype)
        return (y if squeeze else y[:, None]), state
