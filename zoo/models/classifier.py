"""Non-causal encoder with a pooled classification head (LRA-style tasks, MQAR as classification).

``inputs`` (tokens ``[B, T]`` or features ``[B, T, input_dim]``) -> embedding (+ learned
positions) -> pre-norm residual blocks with bidirectional mixers -> final RMS norm -> pooling
(masked mean, or a learned ``[CLS]`` token prepended to the sequence) -> ``logits [B, C]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models.lm import POS, _check_choice, _check_int, build_blocks, check_tokens
from zoo.nn.attention import MultiHeadAttention
from zoo.nn.layers import Embed, RMSNorm, normal_init, param

Array = jax.Array
POOLING = ("mean", "cls")


class EncoderClassifier(nnx.Module):
    """Bidirectional encoder + pooled linear classifier ``[B, T] or [B, T, input_dim] -> [B, C]``.

    Args:
      vocab_size: token vocabulary (inputs ``[B, T]`` int); or None with ``input_dim``
        (inputs ``[B, T, input_dim]`` float, linearly projected to ``d_model``).
      num_classes, d_model, num_layers, num_heads: sizes.
      mixers, num_kv_heads, head_dim, mlp, mlp_ratio, short_conv: as :class:`DecoderLM`; mixers
        run with ``causal=False`` (causal-only transforms such as ``aaren`` are refused).
      pos: ``"learned"`` (default), ``"rope"`` or ``"none"``; max_len: longest input (+1 with cls).
      pooling: ``"mean"`` over real tokens (``mask``) or ``"cls"`` (a learned token prepended;
        its final state is classified).
      dtype, param_dtype: compute / parameter dtypes; logits are float32.

    ``__call__(inputs, mask=None)``: ``mask [B, T]`` bool, True = real token; it is passed to
    the mixers as a key-padding mask (softmax-family transforms take it; a transform without a
    ``mask`` option raises) and excludes padding from mean pooling.
    """

    def __init__(
        self,
        vocab_size: int | None,
        num_classes: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        *,
        input_dim: int | None = None,
        mixers: Any = "softmax",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mlp: str | None = "swiglu",
        mlp_ratio: float = 4,
        short_conv: int = 0,
        pos: str = "learned",
        max_len: int = 2048,
        pooling: str = "mean",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(
                f"give exactly one of vocab_size (token inputs) and input_dim (feature inputs); "
                f"got vocab_size={vocab_size!r}, input_dim={input_dim!r}"
            )
        _check_int("num_classes", num_classes)
        _check_int("max_len", max_len)
        _check_choice("pos", pos, POS)
        _check_choice("pooling", pooling, POOLING)
        self.vocab_size, self.input_dim, self.num_classes = vocab_size, input_dim, num_classes
        self.d_model, self.pos, self.max_len, self.pooling, self.dtype = d_model, pos, max_len, pooling, dtype
        self.blocks = build_blocks(
            d_model=d_model, num_layers=num_layers, num_heads=num_heads, mixers=mixers,
            num_kv_heads=num_kv_heads, head_dim=head_dim, mlp=mlp, mlp_ratio=mlp_ratio,
            short_conv=short_conv, rope=pos == "rope", dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        for i, blk in enumerate(self.blocks):
            if isinstance(blk.mixer, MultiHeadAttention) and blk.mixer.transform.causal_only:
                raise ValueError(f"mixers[{i}]: transform {blk.mixer.transform_name!r} is causal only")
        if vocab_size is not None:
            _check_int("vocab_size", vocab_size)
            self.embed = Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            _check_int("input_dim", input_dim)
            self.input_proj = param(rngs, normal_init(input_dim), (input_dim, d_model), (None, "embed"), param_dtype)
            self.input_bias = param(rngs, nnx.initializers.zeros, (d_model,), ("embed",), param_dtype)
        n_pos = max_len + (pooling == "cls")
        if pos == "learned":
            self.pos_embed = param(rngs, normal_init(d_model), (n_pos, d_model), (None, "embed"), param_dtype)
        if pooling == "cls":
            self.cls_token = param(rngs, normal_init(d_model), (d_model,), ("embed",), param_dtype)
        self.final_norm = RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = param(rngs, normal_init(d_model), (d_model, num_classes), ("embed", None), param_dtype)
        self.head_bias = param(rngs, nnx.initializers.zeros, (num_classes,), (None,), param_dtype)

    def __call__(self, inputs: Array, mask: Array | None = None) -> Array:
        """``inputs`` ``[B, T]`` tokens (ids in ``[0, vocab_size)``, checked when concrete) or
        ``[B, T, input_dim]`` features -> logits ``[B, C]`` float32."""
        if self.vocab_size is not None:
            x = self.embed(check_tokens("inputs", inputs, self.vocab_size))
        else:
            inputs = jnp.asarray(inputs)
            if inputs.ndim != 3 or inputs.shape[-1] != self.input_dim:
                raise ValueError(f"inputs must be [batch, length, {self.input_dim}]; got {inputs.shape}")
            dt = self.dtype or jnp.result_type(inputs.dtype, jnp.float32)
            x = inputs.astype(dt) @ self.input_proj[...].astype(dt) + self.input_bias[...].astype(dt)
        b, t = x.shape[:2]
        if t > self.max_len:
            raise ValueError(f"inputs length {t} > max_len {self.max_len}")
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape != (b, t):
                raise ValueError(f"mask must be bool [batch, length] = [{b}, {t}]; got {mask.shape}")
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, self.d_model))
            x = jnp.concatenate([cls, x], axis=1)
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        if self.pos == "learned":
            x = x + self.pos_embed[...][: x.shape[1]].astype(x.dtype)
        for blk in self.blocks:
            x = blk(x, causal=False, mask=mask)
        x = self.final_norm(x)
        if self.pooling == "cls":
            pooled = x[:, 0]
        elif mask is None:
            pooled = jnp.mean(x, axis=1)
        else:
            w = mask.astype(x.dtype)[..., None]
            pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        logits = pooled @ self.head[...].astype(pooled.dtype) + self.head_bias[...].astype(pooled.dtype)
        return logits.astype(jnp.float32)
