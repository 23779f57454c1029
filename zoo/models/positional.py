"""PositionalTransformer: the positional-attention network of Back de Luca et al. (ICML 2025).

    X_0 = Linear(in_dim -> d_model)(values)                       [B, L, d_model]
    X_l = MLP([X_{l-1}, PositionalAttention_l(X_{l-1}; P)])        l = 1 .. num_blocks
    Y   = Linear(d_model -> out_dim)(X_L)                          [B, L, out_dim]

``L = n + scratch`` tokens: ``n`` input values followed by ``scratch`` scratch nodes (input 0,
excluded from the loss; ``zoo.data.positional`` appends them), and fixed one-hot positional
encodings ``P = I_L`` (``pos_dim = L``, the paper's ``d_p = n + 1`` with one scratch node).
``num_blocks = floor(log2 n) + 1`` as in the paper's experiments (enough depth for the
parallel-prefix algorithms it must emulate). Each block has its own positional attention
(``W_Q, W_K`` per layer); attention is non-causal and independent of the input values.

Paper defaults: ``d_model = 64``, 2 heads, MLP hidden 64 with 2 layers; Adam lr 5e-4, MSE on
the non-scratch positions.

``attention="standard"`` is the paper's baseline, the reference's ``Transformer(positional=False)``:
the same network fed ``[values, P]`` (the encodings appended to the input features), with each
block's queries and keys computed from the hidden state ``X`` instead of ``P``
(``A^h = softmax((X W_Q^h + b_Q^h)(X W_K^h + b_K^h)^T / sqrt(d_model))``, per example; each head's
q/k have the full width ``d_model``, as the reference's fused ``qk_proj``).

Reference code: opallab/positional_attention ``model.py`` (``Transformer(positional=True)``) and
``experiment_scale.py``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention.common import shape_str
from zoo.attention.positional import positional_apply
from zoo.nn.attention import check_input
from zoo.nn.diagnostics import capturing
from zoo.nn.layers import axis_init as _init
from zoo.nn.positional import PositionalAttention, PositionalAttentionBlock, onehot_encodings

Array = jax.Array



def default_num_blocks(n: int) -> int:
    """``floor(log2 n) + 1`` (``np.log2(n).astype(int) + 1`` in the reference)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    return int(math.floor(math.log2(n))) + 1


ATTENTION = ("positional", "standard")


class StandardAttention(PositionalAttention):
    """The baseline's attention (reference ``MultiheadAttention(positional=False)``): queries and
    keys from the input ``x [B, L, E]`` itself, ``A^h_b = softmax((x_b W_Q^h + b_Q^h)(x_b W_K^h +
    b_K^h)^T / sqrt(E))`` with full-width ``W_Q^h, W_K^h [E, E]``; values and output as
    :class:`~zoo.nn.positional.PositionalAttention` (whose parameters it has, with ``pos_dim = E``).
    ``__call__(x, p=None, *, causal=True)``: ``p`` is ignored."""

    def __init__(self, d_model: int, num_heads: int, *, record: bool = False, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads, d_model, record=record, rngs=rngs)

    def __call__(self, x: Array, p: Array | None = None, *, causal: bool = True) -> Array:
        check_input("x", x, self.d_model)
        b, t, _ = x.shape
        a = jax.vmap(lambda xb: self.attention_weights(xb, causal=causal))(x)  # [B, H, L, L]
        if self.record and capturing(self):
            self.sow(nnx.Intermediate, "attn_weights", a)
        v = self.v_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        return self.o_proj(positional_apply(a, v).reshape(b, t, self.d_model))


class PositionalTransformer(nnx.Module):
    """Positional-attention network for the algorithmic tasks (see the module docstring).

    Args:
      n: number of input values (the blocks count is ``floor(log2 n) + 1`` by default).
      scratch: scratch nodes appended after the values (``L = n + scratch``).
      in_dim, out_dim: per-token input / output features (1 for the scalar tasks).
      d_model, num_heads, mlp_hidden, mlp_layers: block sizes (paper: 64, 2, 64, 2).
      num_blocks: override the depth.
      encodings: ``"onehot"`` (``P = I_L``) or an array ``[L, pos_dim]`` of fixed encodings.
      record: sow each block's attention weights (``nnx.Intermediate`` ``"attn_weights"``, under
        ``nnx.capture(model, nnx.Intermediate)``).
      attention: ``"positional"`` (default) or ``"standard"`` (the paper's baseline: inputs
        ``[x, P]``, queries and keys from the hidden state; see the module docstring).

    Attention is non-causal, as the paper's (``sort`` needs every value at every position).

    ``__call__(x)``: ``x [B, L, in_dim]`` (or ``[B, L]`` when ``in_dim == 1``) ->
    ``[B, L, out_dim]``. ``attention_weights()`` returns the ``[num_blocks, H, L, L]`` weights,
    which depend only on the parameters.
    """

    def __init__(
        self, n: int, *, scratch: int = 1, in_dim: int = 1, out_dim: int = 1, d_model: int = 64,
        num_heads: int = 2, mlp_hidden: int = 64, mlp_layers: int = 2, num_blocks: int | None = None,
        encodings: str | Any = "onehot", record: bool = False, attention: str = "positional", rngs: nnx.Rngs,
    ):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}; got {attention!r}")
        blocks = default_num_blocks(n) if num_blocks is None else num_blocks
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer; got {num_blocks!r}")
        if not isinstance(scratch, int) or scratch < 0:
            raise ValueError(f"scratch must be a non-negative integer; got {scratch!r}")
        for name, val in (("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        self.n, self.scratch, self.length = n, scratch, n + scratch
        self.in_dim, self.out_dim, self.num_blocks = in_dim, out_dim, blocks
        if isinstance(encodings, str):
            if encodings != "onehot":
                raise ValueError(f"encodings must be 'onehot' or an array [L, pos_dim]; got {encodings!r}")
            p = onehot_encodings(self.length)
        else:
            p = jnp.asarray(encodings, jnp.float32)
            if p.ndim != 2 or p.shape[0] != self.length:
                raise ValueError(f"encodings must be [L={self.length}, pos_dim]; got {shape_str(p)}")
        # Fixed, not trained: a plain (non-Param) variable so optimisers never update it.
        self.encodings = nnx.Variable(p)
        self.attention = attention
        torch_default = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        enc_in = in_dim + (p.shape[1] if attention == "standard" else 0)  # standard: inputs [x, P]
        self.encode = nnx.Linear(enc_in, d_model, kernel_init=_init(torch_default, None, "embed"),
                                 bias_init=_init(nnx.initializers.zeros_init(), "embed"), rngs=rngs)
        self.blocks = nnx.List([
            PositionalAttentionBlock(d_model, num_heads, p.shape[1], mlp_hidden, mlp_layers=mlp_layers,
                                     record=record, rngs=rngs)
            for _ in range(blocks)
        ])
        if attention == "standard":
            for blk in self.blocks:
                blk.attn = StandardAttention(d_model, num_heads, record=record, rngs=rngs)
        self.decode = nnx.Linear(d_model, out_dim, kernel_init=_init(torch_default, "embed", None),
                                 bias_init=_init(nnx.initializers.zeros_init(), None), rngs=rngs)

    def attention_weights(self) -> Array:
        """``[num_blocks, H, L, L]``: every block's attention (input-independent; positional only)."""
        if self.attention != "positional":
            raise ValueError("attention_weights() is defined for attention='positional' only (the standard "
                             "attention depends on the input)")
        p = self.encodings[...]
        return jnp.stack([blk.attn.attention_weights(p, causal=False) for blk in self.blocks])

    def __call__(self, x: Array) -> Array:
        if getattr(x, "ndim", None) == 2 and self.in_dim == 1:
            x = x[..., None]
        if getattr(x, "ndim", None) != 3 or x.shape[1:] != (self.length, self.in_dim):
            raise ValueError(
                f"x must be [batch, L={self.length} (n={self.n} values + {self.scratch} scratch), "
                f"in_dim={self.in_dim}]; got {shape_str(x)}"
            )
        p = self.encodings[...]
        if self.attention == "standard":
            x = jnp.concatenate([x, jnp.broadcast_to(p.astype(x.dtype), (x.shape[0], *p.shape))], axis=-1)
        h = self.encode(x)
        for blk in self.blocks:
            h = blk(h, p, causal=False)  # the paper's attention is non-causal
        return self.decode(h)
