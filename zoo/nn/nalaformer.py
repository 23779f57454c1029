"""NaLaFormer attention: the full norm-aware linear attention module (Meng et al. 2025).

As the official ``NormAwareLinearAttn`` (ZacharyMeng/NaLaFormer ``NaLaformer/NALA.py``), for
tokens ``x [B, N, C]`` on an ``H x W`` grid (token ``n = h W + w``), ``C = heads * D``:

    q, k, v, g = split_4(x W_qkvg + b_qkvg)                          one Linear(C, 4C)
    per head, in float32:
      phi_q = [relu(q^)^p, relu(-q^)^p],  q^ = q / ||q||,  p = 3 (0.5 + tanh ||q||)
      phi_k = [relu(k^3), relu(-k^3)]
      o_n = R(phi_q(q_n))^T [ (1/N) sum_m R(phi_k(k_m)) v_m^T ] / (phi_q(q_n) . mean_m phi_k(k_m) + 1e-6)
    y = W_out ( LayerNorm(o + LePE(v)) * SiLU(g) ) + b_out

``R`` is the 2-D rotary embedding applied to each half of the features (``theta_shift`` with
``sin, cos [N, D]``: angles ``10000^-linspace(0, 1, D/4)``, each used twice, the first ``D/2``
channels rotated by the row index ``h`` and the last ``D/2`` by the column index ``w``; pairs
``(x_{2i}, x_{2i+1}) -> (x_{2i} cos - x_{2i+1} sin, x_{2i+1} cos + x_{2i} sin)``). RoPE enters
the numerator only; the normaliser uses the unrotated features, so rows do not sum to 1.
LePE is a depthwise ``5 x 5`` convolution (padding 2, bias) of ``v`` as an image; LayerNorm
over ``C`` with ``eps = 1e-5``.

Causal variant (not in the official vision code; ``causal=True``, the default of every zoo.nn
mixer, for sequence models): the means over all ``N`` tokens become prefix means over
``m <= n``, computed with causal linear attention (``zoo.attention.linear``); LePE (a 2-D,
two-sided convolution) must be off (``lepe=False``; the vision module with LePE is called with
``causal=False``). Decoding (:meth:`init_state` / :meth:`prefill` / :meth:`decode_step`) keeps
the prefix sums ``S = sum R(phi_k) v^T``, ``z = sum phi_k`` and the count; positions are the
1-D grid ``(0, n)``.

Mixer ``"nalaformer_layer"`` (causal, LePE off): the whole module above. It differs from the
mixer ``"nalaformer"`` (``MultiHeadAttention`` with the ``nalaformer`` transform: linear
attention with the norm-aware feature maps and the mean normaliser only, no fused gate,
LayerNorm or 2-D RoPE).

Paper: Meng et al., "Norm x Direction: Restoring the Missing Query Norm in Vision Linear
Attention" (NaLaFormer, arXiv 2506.21137).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import zoo.attention as za
from zoo.attention import feature_maps as fmaps
from zoo.attention.common import check_float, shape_str
from zoo.nn.attention import check_input, register_mixer
from zoo.nn.layers import axes
from zoo.nn.layers import axis_init as _init

Array = jax.Array
EPS = 1e-6



class NalaState(NamedTuple):
    """Causal NaLa decoding state (float32): ``S [B, H, 2D, D]`` = ``sum R(phi_k) v^T``,
    ``z [B, H, 2D]`` = ``sum phi_k``, ``count [B]`` tokens consumed."""

    S: Array
    z: Array
    count: Array


def rope_angles(head_dim: int) -> Array:
    """``angle [D/2]``: ``10000^-linspace(0, 1, D/4)`` with every entry repeated twice."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4; got {head_dim}")
    a = 1.0 / (10000.0 ** jnp.linspace(0.0, 1.0, head_dim // 4))
    return jnp.repeat(a, 2)


def rope_2d(rows: Array, cols: Array, head_dim: int) -> tuple[Array, Array]:
    """``sin, cos [..., D]`` for tokens at grid ``(rows, cols)``: first ``D/2`` channels use the row
    index, the last ``D/2`` the column index (the official ``RoPE`` module)."""
    a = rope_angles(head_dim)
    th = jnp.concatenate([jnp.asarray(rows, jnp.float32)[..., None] * a, jnp.asarray(cols, jnp.float32)[..., None] * a],
                         axis=-1)
    return jnp.sin(th), jnp.cos(th)


def rope_grid(hw: tuple[int, int], head_dim: int) -> tuple[Array, Array]:
    """``sin, cos [H*W, D]`` for the row-major token grid ``hw``."""
    h, w = hw
    rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    return rope_2d(rows.reshape(-1), cols.reshape(-1), head_dim)


def theta_shift(x: Array, sin: Array, cos: Array) -> Array:
    """``x cos + rotate_every_two(x) sin`` with ``rotate_every_two: (x0, x1) -> (-x1, x0)`` per pair."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rot * sin


class NaLaFormerAttention(nnx.Module):
    """NaLaFormer's ``NormAwareLinearAttn`` ``[B, N, C] -> [B, N, C]`` (see the module docstring).

    Args:
      d_model: ``C``; num_heads: ``H`` (``D = C / H``, divisible by 4 when ``rope``).
      lepe: the depthwise ``lepe_kernel x lepe_kernel`` convolution of ``v`` (default 5).
      rope: 2-D rotary embedding of the numerator features.
      ln_eps: LayerNorm epsilon (``nn.LayerNorm`` default 1e-5).

    ``__call__(x, *, hw=None, causal=False)``: ``x [B, N, C]`` with the grid ``hw = (H, W)``
    (default ``(1, N)``: a 1-D sequence) or an image ``x [B, H, W, C]`` (output in the same layout).
    Parameters: ``qkvg`` (``C -> 4C``: q, k, v, g blocks), ``lepe`` (``nnx.Conv``, kernel
    ``[k, k, 1, C]``), ``ln``, ``out_proj``; PyTorch weights load by transposition.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, lepe: bool = True, lepe_kernel: int = 5, rope: bool = True,
        ln_eps: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        for name, val in (("d_model", d_model), ("num_heads", num_heads), ("lepe_kernel", lepe_kernel)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        d = d_model // num_heads
        if rope and d % 4:
            raise ValueError(f"rope needs head_dim = d_model / num_heads divisible by 4; got {d}")
        if lepe and lepe_kernel % 2 == 0:
            raise ValueError(f"lepe_kernel must be odd (same-size padding); got {lepe_kernel}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d
        self.use_rope, self.dtype = rope, dtype
        torch_default = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        zeros = nnx.initializers.zeros_init()
        self.qkvg = nnx.Linear(d_model, 4 * d_model, kernel_init=_init(torch_default, "embed", "heads"),
                               bias_init=_init(zeros, "heads"), param_dtype=param_dtype, rngs=rngs)
        self.lepe = (
            nnx.Conv(d_model, d_model, (lepe_kernel, lepe_kernel), padding=lepe_kernel // 2,
                     feature_group_count=d_model, kernel_init=_init(torch_default, None, None, None, "heads"),
                     bias_init=_init(zeros, "heads"), param_dtype=param_dtype, rngs=rngs)
            if lepe else None
        )
        self.ln = nnx.LayerNorm(d_model, epsilon=ln_eps, param_dtype=param_dtype, rngs=rngs,
                                scale_metadata=axes("heads"), bias_metadata=axes("heads"))
        self.out_proj = nnx.Linear(d_model, d_model, kernel_init=_init(torch_default, "heads", "embed"),
                                   bias_init=_init(zeros, "embed"), param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ pieces

    def _split(self, x: Array) -> tuple[Array, Array, Array, Array]:
        qkvg = self.qkvg(x.astype(self.dtype or x.dtype))
        b = x.shape[:-1]
        qkvg = qkvg.reshape(*b, 4, self.d_model)
        return tuple(qkvg[..., i, :] for i in range(4))  # type: ignore[return-value]

    def _heads(self, t: Array) -> Array:
        return t.reshape(*t.shape[:-1], self.num_heads, self.head_dim).astype(jnp.float32)

    def _features(self, q: Array, k: Array, sin: Array | None, cos: Array | None):
        """``phi_q, phi_k`` and their rotated versions (``[..., H, 2D]``)."""
        fq, fk = fmaps.nalaformer_query(q), fmaps.nalaformer_key(k)
        if not self.use_rope:
            return fq, fk, fq, fk
        d = self.head_dim
        rot = lambda f: jnp.concatenate([theta_shift(f[..., :d], sin, cos), theta_shift(f[..., d:], sin, cos)], -1)
        return fq, fk, rot(fq), rot(fk)

    def _finish(self, o: Array, v_img_lepe: Array | None, g: Array, dtype: Any) -> Array:
        o = o.reshape(*o.shape[:-2], self.d_model)
        if v_img_lepe is not None:
            o = o + v_img_lepe
        o = self.ln(o.astype(self.dtype or dtype)) * jax.nn.silu(g)
        return self.out_proj(o)

    def _prefix(self, fq: Array, fk: Array, rq: Array, rk: Array, v: Array, state: NalaState
                ) -> tuple[Array, NalaState]:
        """Causal prefix means continuing ``state``: ``o_n = R(phi_q)^T S_n / c_n / (phi_q . z_n / c_n
        + eps)`` with ``S_n = S_0 + sum_{m<=n} R(phi_k) v^T``, ``z_n = z_0 + sum phi_k``, ``c_n`` the
        token count; ``[B, N, H, D]`` and the state after the last token."""
        n = v.shape[1]
        lin = za.LinearState(state.S, jnp.zeros_like(state.z), state.count)
        num, st = za.linear(rq, rk, v, causal=True, feature_map="identity", normalize=False,
                            initial_state=lin, return_state=True)
        z = state.z[:, None] + jnp.cumsum(fk, axis=1)  # [B, N, H, 2D]
        cnt = (state.count[:, None] + jnp.arange(1, n + 1, dtype=jnp.int32)).astype(jnp.float32)[..., None]
        o = num / cnt[..., None] / (jnp.sum(fq * z, axis=-1) / cnt + EPS)[..., None]
        return o, NalaState(st.S, z[:, -1], state.count + n)

    def core(self, q: Array, k: Array, v: Array, *, hw: tuple[int, int], causal: bool = True) -> Array:
        """The norm-aware linear attention on per-head ``q, k, v [B, N, H, D]`` (float32), with the
        2-D RoPE of grid ``hw`` in the numerator; ``[B, N, H, D]``."""
        n = q.shape[1]
        sin = cos = None
        if self.use_rope:
            sin, cos = rope_grid(hw, self.head_dim)
            sin, cos = sin[None, :, None], cos[None, :, None]
        fq, fk, rq, rk = self._features(q, k, sin, cos)
        if causal:
            return self._prefix(fq, fk, rq, rk, v, self.init_state(q.shape[0]))[0]
        num = za.linear(rq, rk, v, causal=False, feature_map="identity", normalize=False)
        den = jnp.sum(fq * jnp.sum(fk, axis=1, keepdims=True), axis=-1)
        z = 1.0 / (den / n + EPS)
        return num / n * z[..., None]

    # ------------------------------------------------------------------ forward

    def __call__(self, x: Array, *, hw: tuple[int, int] | None = None, causal: bool = True,
                 mask: Array | None = None) -> Array:
        """``x [B, N, C]`` (grid ``hw``, default ``(1, N)``) or an image ``[B, H, W, C]`` ->
        the same layout. Causal by default (every zoo.nn mixer); the vision module (LePE on)
        is non-causal: call it with ``causal=False``."""
        image = getattr(x, "ndim", None) == 4
        if image:
            if hw is not None and tuple(hw) != tuple(x.shape[1:3]):
                raise ValueError(f"hw={hw!r} does not match the image x of shape {shape_str(x)}")
            hw = (x.shape[1], x.shape[2])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be [batch, N, d_model={self.d_model}] or [batch, H, W, d_model]; got {shape_str(x)}"
            )
        check_input("x", x, self.d_model)
        if mask is not None:
            raise ValueError("mask is not supported by NaLaFormerAttention; pass None")
        b, n, _ = x.shape
        if hw is None:
            hw = (1, n)
        if len(hw) != 2 or int(hw[0]) * int(hw[1]) != n:
            raise ValueError(f"hw must be (height, width) with height * width = N = {n}; got {hw!r}")
        hw = (int(hw[0]), int(hw[1]))
        if causal and self.lepe is not None:
            raise ValueError(
                "causal=True (the default) needs lepe=False (LePE is a two-sided 2-D convolution): call the "
                "vision module with causal=False, or build it with lepe=False"
            )
        q, k, v, g = self._split(x)
        lepe = None
        if self.lepe is not None:
            lepe = self.lepe(v.reshape(b, hw[0], hw[1], self.d_model)).reshape(b, n, self.d_model)
        o = self.core(self._heads(q), self._heads(k), self._heads(v), hw=hw, causal=causal)
        y = self._finish(o, lepe, g, x.dtype)
        return y.reshape(b, hw[0], hw[1], self.d_model) if image else y

    # ------------------------------------------------------------------ decoding (causal, lepe=False)

    def init_state(self, batch: int, max_len: int | None = None) -> NalaState:
        """Empty causal state (constant size)."""
        h, d = self.num_heads, self.head_dim
        return NalaState(jnp.zeros((batch, h, 2 * d, d), jnp.float32), jnp.zeros((batch, h, 2 * d), jnp.float32),
                         jnp.zeros((batch,), jnp.int32))

    def _check_decoding(self) -> None:
        if self.lepe is not None:
            raise ValueError("decoding needs lepe=False (LePE is a two-sided 2-D convolution)")

    def prefill(self, x: Array, state: NalaState, position: Any = 0) -> tuple[Array, NalaState]:
        """A prompt ``x [B, T, C]`` in one parallel call from ``state`` (1-D positions
        ``state.count ..``, grid ``(0, n)``) -> ``(y [B, T, C], state)``, equal to ``T`` calls of
        :meth:`decode_step` (``position`` is unused: the state counts its tokens)."""
        self._check_decoding()
        check_input("x", x, self.d_model)
        q, k, v, g = self._split(x)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, T, H, D]
        sin = cos = None
        if self.use_rope:
            cols = state.count[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)  # [B, T]
            sin, cos = rope_2d(jnp.zeros_like(cols), cols, self.head_dim)
            sin, cos = sin[:, :, None], cos[:, :, None]
        fq, fk, rq, rk = self._features(q, k, sin, cos)
        o, state = self._prefix(fq, fk, rq, rk, v, state)
        return self._finish(o, None, g, x.dtype), state

    def decode_step(self, x_t: Array, state: NalaState, position: Any = None) -> tuple[Array, NalaState]:
        """One causal token ``x_t [B, C]`` (or ``[B, 1, C]``) at 1-D position ``state.count``
        (grid ``(0, t)``) -> ``(y_t, state)``; equals ``__call__(x, causal=True)`` there."""
        self._check_decoding()
        squeeze = getattr(x_t, "ndim", None) == 2
        x = x_t if squeeze else (x_t[:, 0] if getattr(x_t, "ndim", None) == 3 and x_t.shape[1] == 1 else None)
        if x is None or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x_t must be [batch, d_model={self.d_model}] or [batch, 1, d_model]; got {shape_str(x_t)}"
            )
        check_float("x_t", x)
        q, k, v, g = self._split(x)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, H, D]
        sin = cos = None
        if self.use_rope:
            sin, cos = rope_2d(jnp.zeros_like(state.count), state.count, self.head_dim)  # [B, D]
            sin, cos = sin[:, None], cos[:, None]
        fq, fk, rq, rk = self._features(q, k, sin, cos)
        S = state.S + rk[..., :, None] * v[..., None, :]
        z = state.z + fk
        count = state.count + 1
        cnt = count.astype(jnp.float32)[:, None]
        num = jnp.einsum("bhf,bhfd->bhd", rq, S) / cnt[..., None]
        o = num / (jnp.sum(fq * z, axis=-1) / cnt + EPS)[..., None]
        y = self._finish(o, None, g, x.dtype)
        return (y if squeeze else y[:, None]), NalaState(S, z, count)


def nalaformer_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, dtype: Any = None, param_dtype: Any = jnp.float32, **kw: Any,
) -> NaLaFormerAttention:
    """``zoo.nn.register_mixer`` factory (mixer ``"nalaformer_layer"``): the causal variant, LePE off."""
    kw.setdefault("lepe", False)
    return NaLaFormerAttention(d_model, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)


register_mixer(
    "nalaformer_layer", nalaformer_mixer,
    description="NaLaFormerAttention (causal, LePE off): fused q/k/v/gate, norm-aware features, 2-D RoPE "
                "numerator, LayerNorm and SiLU gate (the mixer 'nalaformer' is only the feature-map linear "
                "attention inside MultiHeadAttention)",
)
