"""Hedgehog learnable feature map and its attention-distillation loss (Zhang et al., ICLR 2024).

Feature map, per head ``h`` (``x [..., heads, head_dim]``):

    z = x W_h + b_h                                   W_h [head_dim, F], identity init, zero bias
    fla:     phi(x) = softmax([2z, -2z])                one softmax over the 2F features
    lolcats: phi(x) = [softmax(z), softmax(-z)]          two softmaxes, clamped >= 1e-12

so that the linear attention ``a_ij = phi(q_i).phi(k_j) / sum_{j'(<=i)} phi(q_i).phi(k_j')``
mimics softmax attention (the ``exp(+-z)`` features make ``phi(q).phi(k)`` a sum of
exponentials; the softmax is a per-token rescaling of ``phi(q)``, which cancels, and of
``phi(k)``, which does not; see attention.md 4 and 11.7).

Distillation (attention transfer, the teacher frozen): the cross-entropy between the softmax
attention rows and the Hedgehog rows,

    L = mean_{batch, heads, queries i} ( - sum_j a^soft_ij log a^hh_ij ),
    a^soft = softmax(q_i k_j / sqrt(d) + causal mask)  (stop-gradient),

with the Hedgehog weights computed on the quadratic path where masked entries are *zeroed*
(not ``-inf``) and ``log`` clamped at ``1e-12`` (lolcats ``distill_attention_xent_mse.py``).
``L >= mean entropy of the teacher rows``, with equality iff the rows match (Gibbs).

Papers: Zhang, Bhatia, Kumbong, Re, "The Hedgehog & the Porcupine: Expressive Linear Attentions
with Softmax Mimicry" (ICLR 2024); Zhang et al., "LoLCATs" (2024).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention import feature_maps as fmaps
from zoo.attention.common import shape_str
from zoo.nn.diagnostics import softmax_weights
from zoo.nn.layers import axis_init as _init

Array = jax.Array
VARIANTS = ("fla", "lolcats")
_MAP = {"fla": "hedgehog", "lolcats": "hedgehog_lolcats"}



class HedgehogFeatureMap(nnx.Module):
    """Learnable Hedgehog feature map ``[..., heads, head_dim] -> [..., heads, 2 * feature_dim]``.

    Args:
      heads, head_dim: input layout; ``feature_dim`` defaults to ``head_dim``.
      variant: ``"fla"`` (joint ``softmax([2z, -2z])``, fla ``HedgehogFeatureMap``) or
        ``"lolcats"`` (``[softmax(z), softmax(-z)]`` clamped, lolcats ``softmax_dim``).
      per_head: one ``W_h`` per head (``weight [heads, head_dim, F]``, lolcats) or one shared
        ``weight [head_dim, F]`` (fla, one map per layer).
      identity_init: ``W = I`` (truncated/padded to ``[head_dim, F]``), zero bias (fla's init);
        otherwise ``N(0, 1/head_dim)``.
      use_bias: learn ``b`` (fla: yes; lolcats default config: no).

    ``params()`` returns the ``feature_map_params`` dict of ``zoo.attention.linear`` (use with
    ``feature_map=self.feature_map_name``).
    """

    def __init__(
        self, heads: int, head_dim: int, feature_dim: int | None = None, *, variant: str = "fla",
        per_head: bool = True, identity_init: bool = True, use_bias: bool = True,
        eps: float = 1e-12, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        for name, val in (("heads", heads), ("head_dim", head_dim), ("feature_dim", feature_dim or 1)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        f = feature_dim or head_dim
        self.heads, self.head_dim, self.feature_dim = heads, head_dim, f
        self.variant, self.per_head, self.eps = variant, per_head, eps
        self.feature_map_name = _MAP[variant]
        p = fmaps.hedgehog_init(
            None if identity_init else rngs.params(), head_dim, f, heads if per_head else None,
            identity_init=identity_init, dtype=param_dtype,
        )
        w_axes = ("heads", "head_dim", None) if per_head else ("head_dim", None)
        self.weight = nnx.Param(_init(lambda *_: p["weight"], *w_axes)(None, None))
        self.bias = (
            nnx.Param(_init(lambda *_: p["bias"], *w_axes[:-2], None)(None, None)) if use_bias else None
        )

    def params(self) -> dict[str, Array]:
        """``{"weight": ..., "bias": ...}`` for ``zoo.attention.linear(feature_map_params=...)``."""
        out = {"weight": self.weight[...]}
        if self.bias is not None:
            out["bias"] = self.bias[...]
        return out

    def __call__(self, x: Array) -> Array:
        """``x [..., heads, head_dim] -> phi [..., heads, 2 * feature_dim]``."""
        if getattr(x, "ndim", 0) < 2 or x.shape[-2:] != (self.heads, self.head_dim):
            raise ValueError(
                f"x must be [..., heads={self.heads}, head_dim={self.head_dim}]; got {shape_str(x)}"
            )
        if self.variant == "fla":
            return fmaps.hedgehog(x, self.params())
        return fmaps.hedgehog_lolcats(x, self.params(), eps=self.eps)


def hedgehog_weights(
    q: Array, k: Array, feature_map_params: Any, *, causal: bool = True,
    feature_map: str = "hedgehog", eps: float = 1e-12,
) -> Array:
    """Hedgehog linear-attention weights on the quadratic path ``[B, H, Tq, Tk]``.

    ``A_ij = phi(q_i).phi(k_j) M_ij / (sum_j' phi(q_i).phi(k_j') M_ij' + eps)`` with the causal
    mask ``M`` multiplying (masked entries are exactly 0, never ``-inf``). ``feature_map_params``
    may be one dict (tied q/k maps) or a pair ``(params_q, params_k)``; ``k`` may have fewer heads.
    """
    for name, x in (("q", q), ("k", k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, length, heads, head_dim]; got {shape_str(x)}")
    h, hk = q.shape[2], k.shape[2]
    if hk == 0 or h % hk:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({hk})")
    k = jnp.repeat(k, h // hk, axis=2)
    fq, fk = fmaps.apply(feature_map, q.astype(jnp.float32), k.astype(jnp.float32), feature_map_params)
    a = jnp.einsum("bihf,bjhf->bhij", fq, fk)
    if causal:
        tq, tk = q.shape[1], k.shape[1]
        if tq != tk:
            raise ValueError(f"causal attention needs q and k of the same length; got {tq} and {tk}")
        a = a * jnp.tril(jnp.ones((tq, tk), a.dtype))
    return a / (jnp.sum(a, axis=-1, keepdims=True) + eps)


def hedgehog_distillation_loss(
    q: Array, k: Array, feature_map_params: Any, causal: bool = True, *,
    feature_map: str = "hedgehog", scale: float | None = None, clamp: float = 1e-12,
    return_teacher_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention-transfer loss ``mean_{b,h,i} -sum_j a^soft_ij log max(a^hh_ij, clamp)``.

    Args:
      q, k: ``[batch, length, heads, head_dim]`` (k may have fewer heads) of the frozen teacher.
      feature_map_params: Hedgehog parameters (``HedgehogFeatureMap.params()`` or
        ``feature_maps.hedgehog_init``), one dict or a pair ``(params_q, params_k)``.
      causal: causal teacher and student.
      feature_map: ``"hedgehog"`` (fla) or ``"hedgehog_lolcats"``.
      scale: teacher logit scale, default ``1/sqrt(head_dim)``.
      return_teacher_entropy: also return the mean teacher row entropy (a lower bound).

    The teacher weights are stop-gradient; the loss is differentiable in ``feature_map_params``.
    """
    teacher = jax.lax.stop_gradient(softmax_weights(q, k, causal=causal, scale=scale))
    student = hedgehog_weights(q, k, feature_map_params, causal=causal, feature_map=feature_map)
    xent = -jnp.sum(teacher * jnp.log(jnp.maximum(student, clamp)), axis=-1)
    loss = jnp.mean(xent)
    if not return_teacher_entropy:
        return loss
    pos = teacher > 0
    ent = -jnp.sum(jnp.where(pos, teacher * jnp.log(jnp.where(pos, teacher, 1.0)), 0.0), axis=-1)
    return loss, jnp.mean(ent)
