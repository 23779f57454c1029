"""The GLA layer (token mixer): gated linear attention with per-channel, data-dependent gates.

For ``x [B, T, E]`` and ``H`` heads of key width ``Dk`` and value width ``Dv = expand_v * Dk``
(flash-linear-attention's ``GatedLinearAttention`` layer; the paper's Sec. 4):

    q_t = x_t W_Q,  k_t = x_t W_K,  v_t = x_t W_V      (short causal convolutions + SiLU if conv > 0)
    log alpha_t = logsigmoid(x_t W_1 W_2 + b) / tau    (low-rank gate, rank r, per head and key channel)
    o = linear(q, k, v; decay = -log alpha, identity map, no normaliser, scale = Dk^-1/2)
    out_t = (rmsnorm(o_t) * silu(x_t W_G)) W_O

``tau`` = ``gate_logit_normalizer`` (16, fla's default: gates start close to 1). fla's layer uses
``expand_k = 0.5``, ``expand_v = 1``: ``GLALayer(E, H, head_dim=E // (2 H), expand_v=2)``.
Training runs :func:`zoo.attention.linear` with ``decay [B, T, H, Dk]`` (its chunked form with
GLA's per-channel gates, or the scan: ``impl``), decoding :func:`zoo.attention.linear_step` on a
:class:`zoo.attention.LinearState`; everything else (convolutions, output norm and gate, decoding
state, the mixer contract) is :class:`zoo.nn.DeltaNetLayer`'s.

Mixer ``"gla_layer"``; the mixer ``"gla"`` is the transform inside ``MultiHeadAttention`` (plain
projections, constant per-head decay options).

Paper: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient
Training" (ICML 2024).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.common import as_int
from zoo.nn.attention import register_mixer
from zoo.nn.deltanet import DeltaNetLayer
from zoo.nn.layers import normal_init, param

Array = jax.Array
_GLA = dict(feature_map="identity", normalize=False)


class GLALayer(DeltaNetLayer):
    """A GLA layer ``[B, T, E] -> [B, T, E]`` (module docstring).

    Args: as :class:`zoo.nn.DeltaNetLayer` (``conv`` default 0, as fla's ``use_short_conv=False``),
    plus ``gate_low_rank`` (r, default 16), ``gate_logit_normalizer`` (tau, default 16) and
    ``impl`` (of :func:`zoo.attention.linear`: "auto", "chunked", "scan").

    Parameters (logical axes) beyond the shared ones: ``w_gate1 [E, r]`` (embed, None),
    ``w_gate2 [r, H, Dk]`` (None, heads, head_dim), ``b_gate [H, Dk]`` (heads, head_dim).
    """

    l2_qk = False
    silu_without_conv = False

    def __init__(
        self, d_model: int, num_heads: int, *, conv: int = 0, gate_low_rank: int = 16,
        gate_logit_normalizer: float = 16.0, impl: str = "auto", **kw: Any,
    ):
        self.gate_low_rank = as_int("gate_low_rank", gate_low_rank, allow_none=False)
        if not (isinstance(gate_logit_normalizer, (int, float)) and gate_logit_normalizer > 0):
            raise ValueError(f"gate_logit_normalizer must be a positive number; got {gate_logit_normalizer!r}")
        self.gate_logit_normalizer, self.impl = float(gate_logit_normalizer), impl
        super().__init__(d_model, num_heads, conv=conv, **kw)

    def init_gates(self, rngs: nnx.Rngs, pd: Any) -> None:
        e, h, dk, r = self.d_model, self.num_heads, self.head_dim, self.gate_low_rank
        self.w_gate1 = param(rngs, normal_init(e), (e, r), ("embed", None), pd)
        self.w_gate2 = param(rngs, normal_init(r), (r, h, dk), (None, "heads", "head_dim"), pd)
        self.b_gate = param(rngs, nnx.initializers.zeros, (h, dk), ("heads", "head_dim"), pd)

    def gates(self, x: Array) -> dict[str, Array]:
        """``{"decay": [B, T, H, Dk]}``: the rates ``-logsigmoid(x W_1 W_2 + b) / tau >= 0``, float32."""
        f = lambda a: a[...].astype(jnp.float32)  # noqa: E731
        z = jnp.einsum("btr,rhd->bthd", x.astype(jnp.float32) @ f(self.w_gate1), f(self.w_gate2)) + f(self.b_gate)
        return {"decay": -jax.nn.log_sigmoid(z) / self.gate_logit_normalizer}

    def init_memory(self, batch: int) -> Any:
        return za.linear_init_state(batch, self.num_heads, self.head_dim, self.value_dim)

    def mix(self, f: dict[str, Array], g: dict[str, Array], memory: Any) -> tuple[Array, Any]:
        return za.linear(f["q"], f["k"], f["v"], causal=True, decay=g["decay"], learn_decay=True,
                         scale=self.head_dim ** -0.5, chunk_size=self.chunk_size, impl=self.impl,
                         initial_state=memory, return_state=True, **_GLA)

    def mix_step(self, f: dict[str, Array], g: dict[str, Array], memory: Any) -> tuple[Array, Any]:
        return za.linear_step(memory, f["q"], f["k"], f["v"], decay=g["decay"], learn_decay=True,
                              scale=self.head_dim ** -0.5, **_GLA)


def gla_layer_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> GLALayer:
    """``zoo.nn.register_mixer`` factory of :class:`GLALayer` (mixer ``"gla_layer"``)."""
    return GLALayer(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)


register_mixer(
    "gla_layer", gla_layer_mixer,
    description="GLALayer: GLA's layer (per-channel gates from a low-rank projection, logsigmoid / 16; output "
                "norm and SiLU gate); the mixer 'gla' is the transform with constant decay options inside "
                "MultiHeadAttention",
)

__all__ = ["GLALayer", "gla_layer_mixer"]
