"""Positional attention (Back de Luca, Giapitzakis, Yang, Velickovic, Fountoulakis, ICML 2025).

Queries and keys come from fixed positional encodings ``P [L, P_dim]`` only, values from the
input ``X [B, L, E]``:

    A^h = softmax( (P W_Q^h + b_Q^h) (P W_K^h + b_K^h)^T / sqrt(P_dim) )     [L, L], per head
    attn(X) = concat_h( A^h (X W_V + b_V)^h ) W_O + b_O                        [B, L, E]

Each head's q/k have the full positional dimension ``P_dim`` (they are not split across
heads); values are split into ``H`` heads of ``E / H``. ``A^h`` depends on neither the input
values nor the batch, so it is computed once per call and shared by the batch. The paper's
attention is non-causal: call with ``causal=False`` (the modules follow the zoo.nn rule,
``causal=True`` by default).

Block (``TransformerLayer`` of the reference code): ``X <- MLP([X, attn(X)])``, concatenation
then a ReLU MLP (``Linear(2E, M) -> ReLU -> Linear(M, E)`` for two layers), with **no residual
and no normalisation**.

Reference code: opallab/positional_attention ``model.py`` (``MultiheadAttention`` with
``positional=True``). Its fused ``qk_proj`` (``Linear(P, 2 P H)``) maps output row ``h*2P + j``
to ``W_Q[h][j]`` for ``j < P`` and to ``W_K[h][j - P]`` otherwise; :func:`split_qk_proj`
converts it to this module's ``q_kernel, k_kernel [H, P, P]`` (``x @ W`` per head) /
``q_bias, k_bias [H, P]``. The attention itself is ``zoo.attention.positional``
(:func:`~zoo.attention.positional.positional_weights`, ``positional_apply``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.attention.common import shape_str
from zoo.attention.positional import positional_apply, positional_weights
from zoo.nn.attention import check_input
from zoo.nn.diagnostics import capturing
from zoo.nn.layers import axis_init as _init

Array = jax.Array



def _dense(din: int, dout: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
           kernel_init: Any = None) -> nnx.Linear:
    kernel_init = nnx.initializers.xavier_uniform() if kernel_init is None else kernel_init
    return nnx.Linear(
        din, dout, kernel_init=_init(kernel_init, *axes), bias_init=_init(nnx.initializers.zeros_init(), axes[1]),
        rngs=rngs,
    )


def split_qk_proj(weight: Any, bias: Any, num_heads: int) -> dict[str, np.ndarray]:
    """The reference ``qk_proj`` (torch ``weight [2 P H, P]``, ``bias [2 P H]``) as
    ``{"q_kernel", "k_kernel": [H, P, P], "q_bias", "k_bias": [H, P]}`` (``p @ kernel[h]`` layout)."""
    w = np.asarray(weight)
    b = np.asarray(bias)
    p = w.shape[1]
    if w.shape != (2 * p * num_heads, p) or b.shape != (2 * p * num_heads,):
        raise ValueError(
            f"qk_proj weight must be [2*P*H, P] and bias [2*P*H] with H={num_heads}; got "
            f"{w.shape} and {b.shape}"
        )
    w = w.reshape(num_heads, 2, p, p)  # [h, q/k, out j, in]
    b = b.reshape(num_heads, 2, p)
    return {
        "q_kernel": np.transpose(w[:, 0], (0, 2, 1)), "k_kernel": np.transpose(w[:, 1], (0, 2, 1)),
        "q_bias": b[:, 0], "k_bias": b[:, 1],
    }


def onehot_encodings(length: int) -> Array:
    """The paper's fixed one-hot encodings ``P = I_length`` (``utils.identity_pe``)."""
    return jnp.eye(length, dtype=jnp.float32)


class PositionalAttention(nnx.Module):
    """Multi-head positional attention ``[B, L, E] -> [B, L, E]`` (see the module docstring).

    Args:
      d_model: ``E`` (divisible by ``num_heads``).
      num_heads: ``H``.
      pos_dim: ``P_dim``, the width of the positional encodings (``L`` for one-hot ``P``).
      rngs: parameter keys. Init as the reference: Xavier-uniform weights, zero biases.

    ``__call__(x, p=None, *, causal=True)``: ``p [L, pos_dim]`` (default: one-hot ``I_L``, needs
    ``pos_dim == L``). ``attention_weights(p)`` returns ``A [H, L, L]``; with ``record=True``
    (attribute) the call also sows them as ``nnx.Intermediate`` ``"attn_weights"`` (collect with
    ``nnx.capture(model, nnx.Intermediate)``).
    """

    def __init__(self, d_model: int, num_heads: int, pos_dim: int, *, record: bool = False,
                 rngs: nnx.Rngs):
        for name, val in (("d_model", d_model), ("num_heads", num_heads), ("pos_dim", pos_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads, self.pos_dim = d_model, num_heads, pos_dim
        self.head_dim = d_model // num_heads
        self.record = record
        # Xavier on the fused [P, 2 P H] matrix, as the reference initialises its qk_proj.
        qk = nnx.initializers.xavier_uniform()(rngs.params(), (pos_dim, 2 * pos_dim * num_heads))
        qk = jnp.transpose(qk.reshape(pos_dim, num_heads, 2, pos_dim), (1, 2, 0, 3))  # [H, q/k, in, out]
        zeros = jnp.zeros((num_heads, pos_dim))
        self.q_kernel = nnx.Param(_init(lambda *_: qk[:, 0], "heads", None, None)(None, None))
        self.k_kernel = nnx.Param(_init(lambda *_: qk[:, 1], "heads", None, None)(None, None))
        self.q_bias = nnx.Param(_init(lambda *_: zeros, "heads", None)(None, None))
        self.k_bias = nnx.Param(_init(lambda *_: zeros, "heads", None)(None, None))
        self.v_proj = _dense(d_model, d_model, ("embed", "heads"), rngs)
        self.o_proj = _dense(d_model, d_model, ("heads", "embed"), rngs)

    def _encodings(self, p: Array | None, length: int) -> Array:
        if p is None:
            if self.pos_dim != length:
                raise ValueError(
                    f"p must be given ([{length}, pos_dim={self.pos_dim}]) unless pos_dim equals the "
                    f"length {length} (one-hot encodings)"
                )
            return onehot_encodings(length)
        p = jnp.asarray(p)
        if p.shape != (length, self.pos_dim):
            raise ValueError(f"p must be [length={length}, pos_dim={self.pos_dim}]; got {shape_str(p)}")
        return p

    def attention_weights(self, p: Array, *, causal: bool = True) -> Array:
        """``A [H, L, L] = softmax(q_h k_h^T / sqrt(pos_dim))`` from encodings ``p [L, pos_dim]``."""
        return positional_weights(
            jnp.asarray(p, jnp.float32), self.q_kernel[...], self.q_bias[...], self.k_kernel[...],
            self.k_bias[...], scale=1.0 / math.sqrt(self.pos_dim), causal=causal,
        )

    def __call__(self, x: Array, p: Array | None = None, *, causal: bool = True) -> Array:
        """``x [B, L, E]`` -> ``[B, L, E]``; ``causal`` (default, the zoo.nn rule) restricts query
        ``i`` to keys ``j <= i``; the paper's attention is ``causal=False``."""
        check_input("x", x, self.d_model)
        b, t, _ = x.shape
        a = self.attention_weights(self._encodings(p, t), causal=causal)
        if self.record and capturing(self):
            self.sow(nnx.Intermediate, "attn_weights", a)
        v = self.v_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        heads = positional_apply(a, v)
        return self.o_proj(heads.reshape(b, t, self.d_model))


class PositionalAttentionBlock(nnx.Module):
    """``X <- MLP([X, PositionalAttention(X)])`` (no residual, no norm), as the reference
    ``TransformerLayer``: the MLP is ``mlp_layers`` Linear layers with ReLU between them,
    ``2E -> M -> ... -> M -> E``. ``causal`` is passed to the attention (default True, the
    zoo.nn rule; the reference block is ``causal=False``)."""

    def __init__(self, d_model: int, num_heads: int, pos_dim: int, mlp_hidden: int, *,
                 mlp_layers: int = 2, record: bool = False, rngs: nnx.Rngs):
        if not isinstance(mlp_layers, int) or mlp_layers < 1:
            raise ValueError(f"mlp_layers must be a positive integer; got {mlp_layers!r}")
        if not isinstance(mlp_hidden, int) or mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be a positive integer; got {mlp_hidden!r}")
        self.attn = PositionalAttention(d_model, num_heads, pos_dim, record=record, rngs=rngs)
        dims = [2 * d_model] + [mlp_hidden] * (mlp_layers - 1) + [d_model]
        lecun = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch Linear default
        n = len(dims) - 1

        def axes(i: int) -> tuple[str | None, str | None]:
            if n == 1:
                return ("embed", None)
            return ("embed" if i == 0 else "mlp", "mlp" if i == 0 else ("embed" if i == n - 1 else None))

        self.mlp = nnx.List([_dense(dims[i], dims[i + 1], axes(i), rngs, kernel_init=lecun) for i in range(n)])

    def __call__(self, x: Array, p: Array | None = None, *, causal: bool = True) -> Array:
        h = jnp.concatenate([x, self.attn(x, p, causal=causal)], axis=-1)
        for i, layer in enumerate(self.mlp):
            h = layer(h)
            if i + 1 < len(self.mlp):
                h = jax.nn.relu(h)
        return h
