"""DeltaNet and Gated DeltaNet layers (token mixers) with the papers' parametrisation.

For ``x [B, T, E]`` and ``H`` heads of key width ``Dk`` and value width ``Dv = expand_v * Dk``
(flash-linear-attention's ``DeltaNet`` / ``GatedDeltaNet`` layers; NVlabs' GatedDeltaNet):

    q_t = l2norm(silu(conv(x W_Q))),  k_t = l2norm(silu(conv(x W_K))),  v_t = silu(conv(x W_V))
    beta_t = sigmoid(x_t W_beta)                       (x 2 with ``allow_neg_eigval``)
    rate_t = exp(A_log) * softplus(x_t W_a + dt_bias)  (Gated DeltaNet only; log-decay g = -rate)
    o = deltanet(q, k, v; beta, decay=rate, scale=Dk^-1/2)        (zoo.attention.deltanet)
    out_t = (rmsnorm(o_t) * silu(x_t W_G)) W_O        (per-head RMS norm; output gate optional)

``conv`` is a causal depthwise convolution over time of ``conv`` taps per channel (fla's
``ShortConvolution``, whose SiLU is the one above). ``A`` is drawn from ``U(0, 16)`` and ``dt``
log-uniformly from ``[1e-3, 0.1]`` (``dt_bias = softplus^{-1}(dt)``), as Mamba-2 and Gated DeltaNet.
The query scale ``Dk^-1/2`` is fla's kernel default.

Training uses the exact chunked form (any ``chunk_size`` gives the same numbers); decoding
(:meth:`init_state` / :meth:`prefill` / :meth:`decode_step`) carries the transform's
:class:`zoo.attention.DeltaNetState` and the last ``conv - 1`` projected inputs of q, k, v, so a
prompt in one call, token steps and the forward agree (the mixer contract of
:mod:`zoo.nn.attention`). The recurrence has no positions: ``position`` is accepted and unused.

Mixers ``"deltanet_layer"`` (:class:`DeltaNetLayer`) and ``"gated_deltanet_layer"``
(:class:`GatedDeltaNetLayer`). They differ from the mixers ``"deltanet"`` / ``"gated_deltanet"``
(the transforms inside ``MultiHeadAttention``: plain projections, constant ``beta`` / decay
options, no convolution, no l2 norm).

Papers: Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (NeurIPS 2024); Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule" (ICLR 2025).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention.common import as_int
from zoo.nn.attention import check_input, register_mixer
from zoo.nn.layers import RMSNorm, axes, cast, l2norm, normal_init, param
from zoo.nn.memory import causal_conv

Array = jax.Array


class DeltaNetLayerState(NamedTuple):
    """Decoding state of a (Gated) DeltaNet layer.

    memory: the transform's state: :class:`zoo.attention.DeltaNetState` (``S [B, H, Dk, Dv]``
      float32; :class:`zoo.attention.LinearState` for :class:`zoo.nn.GLALayer`).
    conv: the last ``conv - 1`` projected inputs of q, k and v, ``{name: [B, conv - 1, H, D]}``
      (``{}`` without convolution).
    """

    memory: Any
    conv: dict[str, Array]


class DeltaNetLayer(nnx.Module):
    """A DeltaNet layer ``[B, T, E] -> [B, T, E]`` (module docstring; no decay).

    Args:
      d_model: ``E``. num_heads: ``H``. head_dim: key width ``Dk`` (default ``E // H``).
      expand_v: value width ``Dv = expand_v * Dk`` (an integer; default 1).
      conv: taps of the short causal convolutions on q, k, v (0: none; default 4).
      output_gate: ``silu(x W_G)`` gate after the output RMS norm (default True).
      allow_neg_eigval: ``beta = 2 sigmoid(.)`` (eigenvalues of ``I - beta k k^T`` in ``[-1, 1]``;
        Grazzi et al. 2024). norm_eps: epsilon of the output RMS norm.
      chunk_size: chunk length of the exact chunked form (default 64).
      dtype, param_dtype: compute / parameter dtypes (the recurrence runs in float32).

    Parameters (logical axes): ``wq, wk [E, H, Dk]``, ``wv, wg [E, H, Dv]`` (embed, heads,
    head_dim); ``conv_q/k/v [conv, H, D]`` (None, heads, head_dim); ``w_beta [E, H]`` (embed,
    heads); ``out_norm.scale [Dv]`` (head_dim); ``wo [H, Dv, E]`` (heads, head_dim, embed);
    Gated DeltaNet adds ``w_a [E, H]`` (embed, heads), ``A_log``, ``dt_bias [H]`` (heads).
    """

    gated: bool = False
    l2_qk: bool = True  # l2-normalised q and k (the delta rule needs unit keys)
    silu_without_conv: bool = True  # SiLU on q, k, v also with conv=0

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int | None = None, expand_v: float = 1.0, conv: int = 4,
        output_gate: bool = True, allow_neg_eigval: bool = False, norm_eps: float = 1e-5, chunk_size: int = 64,
        dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        d_model = as_int("d_model", d_model, allow_none=False)
        num_heads = as_int("num_heads", num_heads, allow_none=False)
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model}) when head_dim is not given")
            head_dim = d_model // num_heads
        head_dim = as_int("head_dim", head_dim, allow_none=False)
        dv = head_dim * expand_v if isinstance(expand_v, (int, float)) and expand_v > 0 else None
        if dv is None or not math.isclose(dv, round(dv)) or round(dv) < 1:
            raise ValueError(f"expand_v must be a positive number making expand_v * head_dim an integer; "
                             f"got {expand_v!r}")
        dv = int(round(dv))
        conv = as_int("conv", conv, minimum=0, allow_none=False)
        chunk_size = as_int("chunk_size", chunk_size, allow_none=False)
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number; got {norm_eps!r}")

        e, h, dk, pd = d_model, num_heads, head_dim, param_dtype
        self.d_model, self.num_heads, self.head_dim, self.value_dim = e, h, dk, dv
        self.conv_width, self.output_gate, self.allow_neg_eigval = conv, output_gate, allow_neg_eigval
        self.chunk_size, self.dtype = chunk_size, dtype
        widths = {"q": dk, "k": dk, "v": dv}
        for n, d in widths.items():
            setattr(self, f"w{n}", param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd))
            if conv:
                kern = param(rngs, normal_init(conv), (conv, h, d), (None, "heads", "head_dim"), pd)
                setattr(self, f"conv_{n}", kern)
        self.init_gates(rngs, pd)
        self.out_norm = RMSNorm(dv, epsilon=norm_eps, dtype=dtype, param_dtype=pd, axis_name="head_dim", rngs=rngs)
        if output_gate:
            self.wg = param(rngs, normal_init(e), (e, h, dv), ("embed", "heads", "head_dim"), pd)
        self.wo = param(rngs, normal_init(h * dv), (h, dv, e), ("heads", "head_dim", "embed"), pd)

    # ------------------------------------------------------------------ what a subclass changes

    def init_gates(self, rngs: nnx.Rngs, pd: Any) -> None:
        """The gate parameters: ``w_beta``; Gated DeltaNet adds ``w_a``, ``A_log``, ``dt_bias``."""
        e, h = self.d_model, self.num_heads
        self.w_beta = param(rngs, normal_init(e), (e, h), ("embed", "heads"), pd)
        if self.gated:
            self.w_a = param(rngs, normal_init(e), (e, h), ("embed", "heads"), pd)
            a = jax.random.uniform(rngs.params(), (h,), jnp.float32, 1e-4, 16.0)  # A ~ U(0, 16)
            self.A_log = nnx.Param(jnp.log(a).astype(pd), **axes("heads"))
            lo, hi = math.log(1e-3), math.log(0.1)
            dt = jnp.maximum(jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32, lo, hi)), 1e-4)
            self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(pd), **axes("heads"))  # softplus^-1

    def init_memory(self, batch: int) -> Any:
        """The transform's zero state."""
        return za.deltanet_init_state(batch, self.num_heads, self.head_dim, self.value_dim)

    def mix(self, f: dict[str, Array], g: dict[str, Array], memory: Any) -> tuple[Array, Any]:
        """The transform over a sequence continuing from ``memory``: ``(o [B, T, H, Dv], memory)``."""
        return za.deltanet(f["q"], f["k"], f["v"], **g, scale=self.head_dim ** -0.5, causal=True,
                           chunk_size=self.chunk_size, initial_state=memory, return_state=True)

    def mix_step(self, f: dict[str, Array], g: dict[str, Array], memory: Any) -> tuple[Array, Any]:
        """The transform's one-token step (``f`` and ``g`` without the time axis)."""
        return za.deltanet_step(memory, f["q"], f["k"], f["v"], **g, scale=self.head_dim ** -0.5)

    # ------------------------------------------------------------------ pieces

    def project(self, x: Array, conv: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
        """``x [B, T, E]`` -> ``({q, k: [B, T, H, Dk], v: [B, T, H, Dv]}, new conv states)``:
        projection, causal conv continuing from ``conv``, SiLU, l2 norm of q and k."""
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        out, new = {}, dict(conv)
        for n in ("q", "k", "v"):
            y = jnp.einsum("bte,ehd->bthd", x, getattr(self, f"w{n}")[...].astype(dt))
            if self.conv_width:
                y, new[n] = causal_conv(y, getattr(self, f"conv_{n}")[...].astype(dt), conv[n])
            if self.conv_width or self.silu_without_conv:
                y = jax.nn.silu(y)
            out[n] = l2norm(y) if n != "v" and self.l2_qk else y
        return out, new

    def gates(self, x: Array) -> dict[str, Array]:
        """``{"beta": [B, T, H]}`` (and ``"decay"``: the rates, Gated DeltaNet), float32."""
        xf = x.astype(jnp.float32)
        beta = jax.nn.sigmoid(jnp.einsum("bte,eh->bth", xf, self.w_beta[...].astype(jnp.float32)))
        out = {"beta": 2.0 * beta if self.allow_neg_eigval else beta}
        if self.gated:
            z = jnp.einsum("bte,eh->bth", xf, self.w_a[...].astype(jnp.float32)) + self.dt_bias[...].astype(jnp.float32)
            out["decay"] = jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(z)
        return out

    def output(self, x: Array, o: Array) -> Array:
        """``o [B, T, H, Dv]`` -> ``[B, T, E]``: per-head RMS norm, gate ``silu(x W_G)``, ``W_O``."""
        dt = self.dtype or x.dtype
        y = self.out_norm(o.astype(dt))
        if self.output_gate:
            y = y * jax.nn.silu(jnp.einsum("bte,ehd->bthd", x.astype(dt), self.wg[...].astype(dt)))
        return cast(jnp.einsum("bthd,hde->bte", y, self.wo[...].astype(dt)), self.dtype)

    def _run(self, x: Array, state: DeltaNetLayerState) -> tuple[Array, DeltaNetLayerState]:
        f, conv = self.project(x, state.conv)
        o, mem = self.mix(f, self.gates(x), state.memory)
        return self.output(x, o), DeltaNetLayerState(mem, conv)

    # ------------------------------------------------------------------ mixer interface

    def __call__(self, x: Array, *, causal: bool = True) -> Array:
        """``x [B, T, E]`` -> ``[B, T, E]`` (causal only: a recurrence)."""
        if causal is not True:
            raise ValueError(f"causal must be True: {type(self).__name__} is a recurrence; got causal={causal!r}")
        check_input("x", x, self.d_model)
        return self._run(x, self.init_state(x.shape[0]))[0]

    def init_state(self, batch: int, max_len: int | None = None) -> DeltaNetLayerState:
        """Zero state and zero convolution history (constant size: ``max_len`` is unused)."""
        batch = as_int("batch", batch, allow_none=False)
        mem = self.init_memory(batch)
        dt = self.dtype or jnp.float32
        widths = {"q": self.head_dim, "k": self.head_dim, "v": self.value_dim}
        conv = {n: jnp.zeros((batch, self.conv_width - 1, self.num_heads, d), dt)
                for n, d in widths.items()} if self.conv_width else {}
        return DeltaNetLayerState(mem, conv)

    def prefill(self, x: Array, state: DeltaNetLayerState, position: Any = 0) -> tuple[Array, DeltaNetLayerState]:
        """A prompt ``x [B, T, E]`` in one chunked call continuing from ``state`` ->
        ``(y [B, T, E], state)``; equals ``T`` :meth:`decode_step` calls."""
        check_input("x", x, self.d_model)
        return self._run(x, state)

    def decode_step(self, x_t: Array, state: DeltaNetLayerState, position: Any = None
                    ) -> tuple[Array, DeltaNetLayerState]:
        """One token ``x_t [B, E]`` -> ``(y_t [B, E], state)`` (the transform's ``step``)."""
        check_input("x_t", x_t, self.d_model, rank=2)
        x = x_t[:, None]
        f, conv = self.project(x, state.conv)
        g = {n: a[:, 0] for n, a in self.gates(x).items()}
        o, mem = self.mix_step({n: a[:, 0] for n, a in f.items()}, g, state.memory)
        return self.output(x, o[:, None])[:, 0], DeltaNetLayerState(mem, conv)


class GatedDeltaNetLayer(DeltaNetLayer):
    """A Gated DeltaNet layer ``[B, T, E] -> [B, T, E]``: :class:`DeltaNetLayer` with the decay
    ``exp(-rate_t)``, ``rate_t = exp(A_log) softplus(x_t W_a + dt_bias)`` (module docstring).
    Arguments as :class:`DeltaNetLayer` (NVlabs uses ``expand_v=1.5`` with ``head_dim = 0.75 E / H``;
    fla ``expand_v=2``)."""

    gated = True


# ----------------------------------------------------------------------------- mixers


def deltanet_layer_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> DeltaNetLayer:
    """``zoo.nn.register_mixer`` factory of :class:`DeltaNetLayer` (mixer ``"deltanet_layer"``)."""
    return DeltaNetLayer(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         **kw)


def gated_deltanet_layer_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> GatedDeltaNetLayer:
    """``zoo.nn.register_mixer`` factory of :class:`GatedDeltaNetLayer` (mixer ``"gated_deltanet_layer"``)."""
    return GatedDeltaNetLayer(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs, **kw)


register_mixer(
    "deltanet_layer", deltanet_layer_mixer,
    description="DeltaNetLayer: DeltaNet with the paper's layer (short convs, SiLU, l2-normalised q/k, "
                "beta = sigmoid(x W), output norm and gate); the mixer 'deltanet' is the transform with a "
                "constant beta inside MultiHeadAttention",
)
register_mixer(
    "gated_deltanet_layer", gated_deltanet_layer_mixer,
    description="GatedDeltaNetLayer: Gated DeltaNet's layer (DeltaNetLayer plus the Mamba-2 style decay "
                "exp(-exp(A_log) softplus(x W_a + dt_bias))); the mixer 'gated_deltanet' is the transform with "
                "constant options inside MultiHeadAttention",
)

__all__ = ["DeltaNetLayer", "DeltaNetLayerState", "GatedDeltaNetLayer", "deltanet_layer_mixer",
           "gated_deltanet_layer_mixer"]
