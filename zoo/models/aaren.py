"""AarenStack: a stack of Aaren layers for sequence regression and classification.

    h_0 = input projection (Linear(in_dim, d_model), or a token embedding)
    h_l = h_{l-1} + Aaren_l(RMSNorm(h_{l-1}));  h_l = h_l + MLP_l(RMSNorm(h_l))     l = 1..L
    regression:      y_t = W RMSNorm(h_L)_t                 per-step outputs [B, T, out_dim]
    classification:  logits = W pool(RMSNorm(h_L))          [B, num_classes]

Aaren is causal, so the output at step ``t`` depends on ``x_1..x_t`` only: the model makes a
prediction after every new input (time-series forecasting, event forecasting, reinforcement
learning in the paper) and can be run *online* with O(1) memory per layer through
:meth:`init_state` / :meth:`decode_step` (each Aaren layer carries its ``(m, u, w)`` prefix
summary; the MLP and norms are per-token), a stretch of inputs at once with :meth:`prefill`.
Classification pools with ``"last"`` (the last real token: it has seen the whole sequence) or
``"mean"`` over real tokens. Residual, norm and MLP placement follow the paper's "drop-in for
the attention sub-layer" description (pre-norm, as ``zoo.models.DecoderLM``).

Paper: Feng, Tung, Hajimirsadeghi, Bengio, Ahmed, "Attention as an RNN" (arXiv 2405.13956).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention.common import shape_str
from zoo.models.lm import prefill_module
from zoo.nn.aaren import AarenLayer
from zoo.nn.layers import MLP, Embed, RMSNorm, axes

Array = jax.Array
TASKS = ("regression", "classification")
POOLING = ("last", "mean")


def _dense(din: int, dout: int, names: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din, dout, kernel_init=nnx.with_metadata(nnx.initializers.lecun_normal(), **axes(*names)),
        bias_init=nnx.with_metadata(nnx.initializers.zeros_init(), **axes(names[1])), rngs=rngs,
    )


class AarenBlock(nnx.Module):
    """Pre-norm residual block ``x + Aaren(norm(x))``, then ``x + MLP(norm(x))`` (MLP optional)."""

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None, mlp_hidden: int = 0,
                 mlp: str | None = "gelu", rngs: nnx.Rngs, **aaren_kw: Any):
        self.norm1 = RMSNorm(d_model, rngs=rngs)
        self.aaren = AarenLayer(d_model, num_heads, head_dim=head_dim, rngs=rngs, **aaren_kw)
        self.norm2 = RMSNorm(d_model, rngs=rngs) if mlp else None
        self.mlp = MLP(d_model, mlp_hidden or 4 * d_model, kind=mlp, rngs=rngs) if mlp else None

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        x = x + self.aaren(self.norm1(x), mask=mask)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def decode_step(self, x_t: Array, state: Any) -> tuple[Array, Any]:
        y, state = self.aaren.decode_step(self.norm1(x_t), state)
        x_t = x_t + y
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.norm2(x_t))
        return x_t, state

    def prefill(self, x: Array, state: Any) -> tuple[Array, Any]:
        """``x [B, T, E]`` continuing from ``state`` in one parallel call; equals ``T`` :meth:`decode_step`."""
        y, state = prefill_module(self.aaren, self.norm1(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state


class AarenStack(nnx.Module):
    """Aaren sequence model (see the module docstring).

    Args:
      in_dim: input features (inputs ``[B, T, in_dim]``), or None with ``vocab_size``.
      vocab_size: token inputs ``[B, T]`` (int) through an embedding.
      task: ``"regression"`` (per-step ``[B, T, out_dim]``) or ``"classification"``
        (``[B, num_classes]``).
      out_dim / num_classes: head size for the task.
      d_model, num_layers, num_heads, head_dim, mlp_hidden (default ``4 d_model``), mlp
        (``"gelu"``, ``"swiglu"`` or None): sizes.
      pooling: classification pooling, ``"last"`` (default) or ``"mean"``.
      aaren_kw: extra :class:`AarenLayer` options (``scale``, ``activation``, ``impl``).

    ``__call__(x, *, mask=None)``: ``mask [B, T]`` bool (True = real token; padding is skipped by
    the scans and by pooling).
    """

    def __init__(
        self, in_dim: int | None = None, *, vocab_size: int | None = None, task: str = "regression",
        out_dim: int = 1, num_classes: int | None = None, d_model: int = 64, num_layers: int = 2,
        num_heads: int = 4, head_dim: int | None = None, mlp_hidden: int = 0, mlp: str | None = "gelu",
        pooling: str = "last", rngs: nnx.Rngs, **aaren_kw: Any,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {task!r}")
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}; got {pooling!r}")
        if (in_dim is None) == (vocab_size is None):
            raise ValueError(f"give exactly one of in_dim (features) and vocab_size (tokens); got {in_dim!r}, "
                             f"{vocab_size!r}")
        for name, val in (("in_dim", in_dim or 1), ("vocab_size", vocab_size or 1), ("num_layers", num_layers),
                          ("d_model", d_model), ("out_dim", out_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if task == "classification" and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer for classification; got {num_classes!r}")
        self.in_dim, self.vocab_size, self.task, self.pooling = in_dim, vocab_size, task, pooling
        self.d_model, self.num_layers = d_model, num_layers
        if vocab_size is not None:
            self.embed = Embed(vocab_size, d_model, rngs=rngs)
        else:
            self.embed = _dense(in_dim, d_model, (None, "embed"), rngs)
        self.blocks = nnx.List([
            AarenBlock(d_model, num_heads, head_dim=head_dim, mlp_hidden=mlp_hidden, mlp=mlp, rngs=rngs, **aaren_kw)
            for _ in range(num_layers)
        ])
        self.norm = RMSNorm(d_model, rngs=rngs)
        self.head = _dense(d_model, out_dim if task == "regression" else num_classes, ("embed", None), rngs)

    def _embed(self, x: Array, per_token: bool) -> Array:
        want = (1 if per_token else 2) + (0 if self.vocab_size is not None else 1)
        if getattr(x, "ndim", None) != want or (self.in_dim is not None and x.shape[-1] != self.in_dim):
            feat = "]" if self.vocab_size else f", in_dim={self.in_dim}]"
            layout = "[batch" + ("" if per_token else ", length") + feat
            raise ValueError(f"x must be {layout}; got {shape_str(x)}")
        if self.vocab_size is not None:
            return self.embed(x)
        return self.embed(x.astype(jnp.float32))

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        h = self._embed(x, per_token=False)
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape != h.shape[:2]:
                raise ValueError(f"mask must be [batch, length] = {list(h.shape[:2])}; got {shape_str(mask)}")
        for blk in self.blocks:
            h = blk(h, mask=mask)
        h = self.norm(h)
        if self.task == "regression":
            return self.head(h)
        if self.pooling == "mean":
            m = jnp.ones(h.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
            pooled = jnp.sum(h * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None]
        else:
            t = h.shape[1]
            last = jnp.full((h.shape[0],), t - 1) if mask is None else t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
            pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return self.head(pooled).astype(jnp.float32)

    def init_state(self, batch: int, max_len: int | None = None) -> list[Any]:
        """One Aaren prefix state per layer (constant size)."""
        return [blk.aaren.init_state(batch) for blk in self.blocks]

    def decode_step(self, x_t: Array, state: list[Any], position: Any = None) -> tuple[Array, list[Any]]:
        """Online step: ``x_t [B, in_dim]`` (or token ids ``[B]``) -> the step's output
        (regression ``[B, out_dim]``; classification: the logits of the ``"last"`` pooling after
        this step, ``[B, num_classes]``) and the new state: :meth:`prefill` of one step. Equals
        ``__call__`` at that position."""
        y, state = self.prefill(x_t[:, None], state)
        return y[:, 0], state

    def prefill(self, x: Array, state: list[Any]) -> tuple[Array, list[Any]]:
        """Online steps for a stretch ``x [B, T, in_dim]`` (or token ids ``[B, T]``) in one parallel
        call per layer: the outputs after each step (regression ``[B, T, out_dim]``;
        classification: the ``"last"``-pooling logits after each step, ``[B, T, num_classes]``)
        and the new state; equals ``T`` :meth:`decode_step` calls."""
        if self.task == "classification" and self.pooling != "last":
            raise ValueError("online classification needs pooling='last'")
        h = self._embed(x, per_token=False)
        new = []
        for blk, s in zip(self.blocks, state):
            h, s = blk.prefill(h, s)
            new.append(s)
        y = self.head(self.norm(h))
        return (y if self.task == "regression" else y.astype(jnp.float32)), new
