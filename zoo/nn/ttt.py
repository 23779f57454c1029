"""The TTT layer (token mixer): TTT-Linear / TTT-MLP with the paper's learned pieces.

For ``x [B, T, E]`` and ``H`` heads of width ``D`` (ttt-lm-jax ``ttt/models/ttt_layer.py``):

    q_t = x_t W_Q,  k_t = x_t W_K,  v_t = x_t W_V      (short causal convolutions + SiLU if conv > 0)
    sigma_t = base_lr * sigmoid(x_t W_lr + b_lr) / D   (the learning rate of each written token, per head)
    tau_i = max(0, 1/i + lambda_i)                     (position i = 1..b inside a mini-batch; lambda = 0 at init)
    o = ttt(q, k, v; eta = sigma, token_scale = tau, inner model theta_0, LN(gamma, beta))
    out_t = (rmsnorm(o_t) * silu(x_t W_G)) W_O

The inner model's initial parameters ``theta_0`` (``depth=1``: TTT-Linear ``W, b``; ``depth=2``:
TTT-MLP, hidden ``expansion * D``) and its LayerNorm are parameters of the layer (the official
``W1, b1, (W2, b2)``, ``ttt_norm``), trained by the outer loop through the mini-batch dual form
(:func:`zoo.attention.ttt`, mini-batch ``chunk_size`` b = 16). Decoding carries the
:class:`zoo.attention.TTTState` (exact from inside a mini-batch). Differences from the official
layer: no RoPE on q/k (the recurrence is position-free; give ``conv`` for local context), the
output norm is an RMS norm with an optional SiLU gate (the shared layer body of
:class:`zoo.nn.DeltaNetLayer`) where the official Transformer backbone uses a LayerNorm.

Mixer ``"ttt_layer"`` (``depth=2`` for TTT-MLP); the mixers ``"ttt_linear"`` / ``"ttt_mlp"`` are
the transforms inside ``MultiHeadAttention`` (constant learning rate, learned inner model).

Paper: Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (2024).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.common import as_int
from zoo.attention.ttt import init_params as ttt_init_params
from zoo.nn.attention import register_mixer
from zoo.nn.deltanet import DeltaNetLayer
from zoo.nn.layers import axes, normal_init, param

Array = jax.Array


class TTTLayer(DeltaNetLayer):
    """A TTT-Linear (``depth=1``) or TTT-MLP (``depth=2``) layer ``[B, T, E] -> [B, T, E]``.

    Args: as :class:`zoo.nn.DeltaNetLayer` (``expand_v`` must stay 1: the paper's residual
    ``f(x) = x + LN(g(x))`` needs ``Dv = D``; ``conv`` default 0; ``chunk_size`` = the
    mini-batch b, default 16), plus ``depth`` (1 or 2), ``expansion`` (TTT-MLP hidden width
    factor, 4) and ``base_lr`` (1.0, the official TTT-Linear's ``ttt_base_lr``).

    Parameters (logical axes) beyond the shared ones: ``w_lr [E, H]`` (embed, heads), ``b_lr [H]``,
    ``token_offset [b]`` (None), ``inner_w{l} [H, d_in, d_out]``, ``inner_b{l} [H, d_out]``,
    ``ln_weight``, ``ln_bias [H, D]`` (heads, ...).
    """

    l2_qk = False
    silu_without_conv = False

    def __init__(
        self, d_model: int, num_heads: int, *, depth: int = 1, expansion: int = 4, base_lr: float = 1.0,
        conv: int = 0, chunk_size: int = 16, expand_v: float = 1.0, **kw: Any,
    ):
        self.depth = as_int("depth", depth, allow_none=False)
        if self.depth not in (1, 2):
            raise ValueError(f"depth must be 1 (TTT-Linear) or 2 (TTT-MLP); got {depth!r}")
        self.expansion = as_int("expansion", expansion, allow_none=False)
        if not (isinstance(base_lr, (int, float)) and base_lr > 0):
            raise ValueError(f"base_lr must be a positive number; got {base_lr!r}")
        if expand_v != 1:
            raise ValueError(f"expand_v must be 1 for TTT (the residual x + LN(g(x)) needs Dv = D); got {expand_v!r}")
        self.base_lr = float(base_lr)
        super().__init__(d_model, num_heads, conv=conv, chunk_size=chunk_size, expand_v=1, **kw)

    def init_gates(self, rngs: nnx.Rngs, pd: Any) -> None:
        e, h, d = self.d_model, self.num_heads, self.head_dim
        self.w_lr = param(rngs, normal_init(e), (e, h), ("embed", "heads"), pd)
        self.b_lr = param(rngs, nnx.initializers.zeros, (h,), ("heads",), pd)
        self.token_offset = param(rngs, nnx.initializers.zeros, (self.chunk_size,), (None,), pd)
        init = ttt_init_params(rngs.params(), h, d, d, depth=self.depth, expansion=self.expansion)
        for i, (w, b) in enumerate(zip(init["weights"], init["biases"])):
            setattr(self, f"inner_w{i}", nnx.Param(w.astype(pd), **axes("heads", None, None)))
            setattr(self, f"inner_b{i}", nnx.Param(b.astype(pd), **axes("heads", None)))
        self.ln_weight = nnx.Param(init["ln_weight"].astype(pd), **axes("heads", None))
        self.ln_bias = nnx.Param(init["ln_bias"].astype(pd), **axes("heads", None))

    def _inner(self) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        f = lambda n: getattr(self, n)[...].astype(jnp.float32)  # noqa: E731
        return (tuple(f(f"inner_w{i}") for i in range(self.depth)),
                tuple(f(f"inner_b{i}") for i in range(self.depth)))

    def _options(self) -> dict[str, Any]:
        f = lambda n: getattr(self, n)[...].astype(jnp.float32)  # noqa: E731
        i = jnp.arange(1, self.chunk_size + 1, dtype=jnp.float32)
        return dict(token_scale=jnp.maximum(1.0 / i + f("token_offset"), 0.0), ln_weight=f("ln_weight"),
                    ln_bias=f("ln_bias"), residual="query", chunk_size=self.chunk_size)

    def gates(self, x: Array) -> dict[str, Array]:
        """``{"eta": [B, T, H]}``: ``base_lr * sigmoid(x W_lr + b_lr) / D``, float32."""
        z = jnp.einsum("bte,eh->bth", x.astype(jnp.float32), self.w_lr[...].astype(jnp.float32))
        return {"eta": self.base_lr * jax.nn.sigmoid(z + self.b_lr[...].astype(jnp.float32)) / self.head_dim}

    def init_memory(self, batch: int) -> Any:
        ws, bs = self._inner()
        return za.ttt_init_state(batch, self.num_heads, self.head_dim, self.head_dim, weights=ws, biases=bs,
                                 depth=self.depth)

    def mix(self, f: dict[str, Array], g: dict[str, Array], memory: Any) -> tuple[Array, Any]:
        return za.ttt(f["q"], f["k"], f["v"], eta=g["eta"], depth=self.depth, initial_state=memory,
                      return_state=True, causal=True, **self._options())

    def mix_step(self, f: dict[str, Array], g: dict[str, Array], memory: Any) -> tuple[Array, Any]:
        return za.ttt_step(memory, f["q"], f["k"], f["v"], eta=g["eta"], **self._options())


def ttt_layer_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> TTTLayer:
    """``zoo.nn.register_mixer`` factory of :class:`TTTLayer` (mixer ``"ttt_layer"``)."""
    return TTTLayer(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)


register_mixer(
    "ttt_layer", ttt_layer_mixer,
    description="TTTLayer: TTT-Linear (depth=1) / TTT-MLP (depth=2) with the paper's learned per-token learning "
                "rates, token-position scales, inner model and LayerNorm; the mixers 'ttt_linear' / 'ttt_mlp' are "
                "the transforms inside MultiHeadAttention",
)

__all__ = ["TTTLayer", "ttt_layer_mixer"]
