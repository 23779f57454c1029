"""Mixture-of-Head attention (MoH; Jin, Zhu, Yan, Yuan, 2024, arXiv 2410.11842).

Multi-head attention whose heads are treated as experts: every head is computed, and each
token scales each head's output by a gate before the concatenation and ``W_o``. With ``h_s``
shared heads (always on) and ``E = h - h_s`` routed heads of which each token activates top-K:

    p      = softmax(W_r x)                              [E]   router probabilities
    g^r_i  = K p_i 1[i in topK(p)] / sum_{j in topK} p_j       routed gates (sum to K)
    g^s    = h_s softmax(W_s x)   (the constant 1 when h_s = 1)        shared gates
    [a_s, a_r] = 2 softmax(W_0 x)                                       mixing weights
    gates  = [a_s g^s, a_r g^r]            (shared heads first; gates = g^r when h_s = 0)
    y      = W_o concat_h(gates_h * head_h(x)) + b_o

Load-balance loss over the routed heads (``P_i`` = mean router probability of head ``i`` over
all tokens of the batch, ``f_i`` = fraction of tokens routing to ``i``):

    L_b = E^2 mean_i(P_i f_i)        (= K for perfectly balanced routing)

returned with ``return_aux=True`` and, under ``nnx.capture(model, nnx.Intermediate)``, sown as
``nnx.Intermediate`` ``"load_balance_loss"`` (so a whole model's losses are collected in one
call; the paper adds ``0.01`` times their mean over layers to the task loss).

The head attention is either plain scaled dot-product softmax (``attention="softmax"``, for
language models; causal, with a KV-cache decode) or the TransNeXt-style cosine attention of
the MoH-ViT models (``attention="cosine"``):

    A = softmax( ((q/||q|| + e_h) softplus(t_h) log N) (k/||k||)^T + B_rel )

with a learned per-head query embedding ``e_h [head_dim]``, temperature ``t_h`` (initialised so
``softplus(t_h) = 1/0.24``), ``N`` the token count of the configured input resolution
(``seq_length``; default the key count of the call) and an optional continuous relative
position bias ``B_rel`` from a 2-layer MLP (CPB, ``2 -> 512 -> heads``) over log-spaced relative
coordinates (:func:`relative_position_cpb`).

Causal by default (``causal=True``, the rule of every zoo.nn mixer), so the forward equals
:meth:`MoHAttention.decode_step` / :meth:`~MoHAttention.prefill`; the vision models call it
with ``causal=False``. Mixer ``"moh"`` (softmax heads, KV-cache decoding; the cache holds
``max_len`` tokens and overflowing it is a ValueError on concrete values, as for
``zoo.nn.MultiHeadAttention``).

Reference code: SkyworkAI/MoH ``MoH-ViT/attention.py`` (``Attention``), ``transnext.py``
(``get_relative_position_cpb``); papers: MoH (Jin et al. 2024), TransNeXt (Shi, CVPR 2024).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo.attention as za
from zoo.attention.common import check_float, shape_str
from zoo.nn.attention import check_input, check_kv_capacity, positions_from, register_mixer
from zoo.nn.diagnostics import capturing, softmax_weights
from zoo.nn.layers import apply_rope
from zoo.nn.layers import axis_init as _init

Array = jax.Array
ATTENTIONS = ("softmax", "cosine")



def _dense(din: int, dout: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs, *,
           use_bias: bool = True, kernel_init: Any = None) -> nnx.Linear:
    kernel_init = nnx.initializers.truncated_normal(0.02) if kernel_init is None else kernel_init
    return nnx.Linear(
        din, dout, use_bias=use_bias, kernel_init=_init(kernel_init, *axes),
        bias_init=_init(nnx.initializers.zeros_init(), axes[1]), rngs=rngs,
    )


def _normalize(x: Array, eps: float = 1e-12) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _adaptive_avg_pool_1d(x: np.ndarray, size: int) -> np.ndarray:
    """``torch.nn.functional.adaptive_avg_pool1d`` on a vector: bin ``i`` averages
    ``x[floor(i L / size) : ceil((i + 1) L / size)]``."""
    n = x.shape[0]
    return np.array([x[(i * n) // size: -((-(i + 1) * n) // size)].mean() for i in range(size)], x.dtype)


def relative_position_cpb(
    query_size: tuple[int, int], key_size: tuple[int, int] | None = None,
    pretrain_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """TransNeXt's relative coordinates for the continuous position bias (float32, as the source).

    For query grid ``query_size = (Hq, Wq)`` and key grid ``key_size`` (the query grid
    average-pooled; default equal), relative offsets ``8 (q - k) / (pretrain - 1)`` per axis are
    de-duplicated into ``table [T, 2]`` (sorted rows) mapped through
    ``sign(x) log2(|x| + 1) / log2(8)``; ``index [Nq * Nk]`` maps each (query, key) pair (row-major,
    token ``n = h W + w``) to its table row. Returns ``(index, table)``.
    """
    for name, s in (("query_size", query_size), ("key_size", key_size), ("pretrain_size", pretrain_size)):
        if s is not None and (len(s) != 2 or any(int(v) < 1 for v in s)):
            raise ValueError(f"{name} must be a pair of positive integers (height, width); got {s!r}")
    key_size = key_size or query_size
    pretrain_size = pretrain_size or query_size
    if min(pretrain_size) < 2:
        raise ValueError(
            f"pretrain_size (default query_size) must be at least 2 x 2 (offsets are divided by size - 1); "
            f"got {pretrain_size!r}"
        )
    f32 = np.float32
    qh, qw = np.arange(query_size[0], dtype=f32), np.arange(query_size[1], dtype=f32)
    kh, kw = _adaptive_avg_pool_1d(qh, key_size[0]), _adaptive_avg_pool_1d(qw, key_size[1])
    kh, kw = (a.reshape(-1) for a in np.meshgrid(kh, kw, indexing="ij"))
    qh, qw = (a.reshape(-1) for a in np.meshgrid(qh, qw, indexing="ij"))
    rel_h = (qh[:, None] - kh[None, :]) / f32(pretrain_size[0] - 1) * f32(8)
    rel_w = (qw[:, None] - kw[None, :]) / f32(pretrain_size[1] - 1) * f32(8)
    rel = np.stack([rel_h, rel_w], axis=-1).reshape(-1, 2).astype(f32)
    table, index = np.unique(rel, axis=0, return_inverse=True)
    table = (np.sign(table) * np.log2(np.abs(table) + f32(1.0)) / np.log2(f32(8))).astype(f32)
    return index.reshape(-1).astype(np.int32), table


def routing_gates(
    router_logits: Array | None, top_k: int, *, shared_logits: Array | None = None,
    mix_logits: Array | None = None, num_shared: int = 0,
) -> dict[str, Array]:
    """MoH head gates from the router logits (see the module docstring); float32.

    Args:
      router_logits: ``[..., E]`` (``None`` when ``top_k == 0``: all heads shared).
      top_k: ``K`` routed heads per token.
      shared_logits: ``[..., h_s]`` (needed when ``h_s > 1``).
      mix_logits: ``[..., 2]`` (needed when ``h_s > 0`` and ``K > 0``).
      num_shared: ``h_s``.

    Returns ``{"head_gates" [..., h_s + E], "router_probs" [..., E], "routed_mask" [..., E],
    "load_balance_loss" []}`` (the last three only when routing).
    """
    out: dict[str, Array] = {}
    lead = None
    if num_shared > 1:
        shared = jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1) * num_shared
        lead = shared.shape[:-1]
    if top_k == 0:
        if num_shared > 1:
            out["head_gates"] = shared
        return out
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    e = probs.shape[-1]
    lead = probs.shape[:-1]
    _, idx = jax.lax.top_k(probs, top_k)
    mask = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=-2)
    routed = probs * mask
    routed = routed / jnp.maximum(jnp.sum(routed, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    routed = routed * top_k
    me = jnp.mean(probs.reshape(-1, e), axis=0)
    ce = jnp.mean(mask.reshape(-1, e), axis=0)
    out.update(router_probs=probs, routed_mask=mask, load_balance_loss=jnp.mean(me * ce) * e * e)
    if num_shared == 0:
        out["head_gates"] = routed
        return out
    if num_shared == 1:
        shared = jnp.ones((*lead, 1), jnp.float32)
    w0 = jax.nn.softmax(mix_logits.astype(jnp.float32), axis=-1) * 2.0
    out["shared_weight_0"] = w0
    out["head_gates"] = jnp.concatenate([w0[..., :1] * shared, w0[..., 1:] * routed], axis=-1)
    return out


class MoHAttention(nnx.Module):
    """Mixture-of-Head attention ``[B, N, C] -> [B, N, C]`` (see the module docstring).

    Args:
      d_model: ``C`` (divisible by ``num_heads``).
      num_heads: ``h``.
      num_shared: ``h_s`` always-active heads (the first ``h_s`` heads).
      top_k: ``K`` routed heads activated per token among the ``E = h - h_s`` others
        (``top_k = 0`` needs ``num_shared == num_heads``: every head shared, softmax gates).
      attention: ``"softmax"`` (``q k^T / sqrt(head_dim)``) or ``"cosine"`` (TransNeXt).
      qkv_bias: bias of the fused ``qkv`` projection (the proj always has one).
      cpb: learn the continuous relative position bias MLP (``cpb_hidden`` wide).
      seq_length: ``N`` of the cosine attention's ``log N`` scale (the source's input
        resolution ``H * W``); default the key count of each call.
      rope: rotary embeddings on q and k (``attention="softmax"`` only; ``True`` = base 10000
        or a float base), for language models.

    Parameters (fused layouts as the reference, so its weights load by transposition): ``qkv``
    (``C -> 3C``: q, k, v blocks, head-major inside each), ``proj``, ``wg`` (router, no bias),
    ``wg_0`` (mixing, no bias), ``wg_1`` (shared gates, no bias), and for cosine attention
    ``temperature [h]``, ``query_embedding [h, head_dim]``, ``cpb_fc1``, ``cpb_fc2``.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_shared: int = 0, top_k: int = 1,
        attention: str = "softmax", qkv_bias: bool = True, cpb: bool = False, cpb_hidden: int = 512,
        seq_length: int | None = None, rope: bool | float = False, rngs: nnx.Rngs,
    ):
        for name, val in (("d_model", d_model), ("num_heads", num_heads)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if not isinstance(num_shared, int) or not 0 <= num_shared <= num_heads:
            raise ValueError(f"num_shared must be an int in [0, num_heads={num_heads}]; got {num_shared!r}")
        e = num_heads - num_shared
        if not isinstance(top_k, int) or not 0 <= top_k <= e:
            raise ValueError(f"top_k must be an int in [0, num_heads - num_shared = {e}]; got {top_k!r}")
        if top_k == 0 and num_shared != num_heads:
            raise ValueError(
                f"top_k=0 (no routing) needs num_shared == num_heads ({num_heads}); got num_shared={num_shared}"
            )
        if top_k > 0 and e == 0:
            raise ValueError("top_k > 0 needs routed heads (num_shared < num_heads)")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}; got {attention!r}")
        if cpb and attention != "cosine":
            raise ValueError("cpb (continuous relative position bias) needs attention='cosine'")
        if seq_length is not None and (not isinstance(seq_length, int) or seq_length < 2):
            raise ValueError(f"seq_length must be an integer >= 2 or None; got {seq_length!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.num_shared, self.num_routed, self.top_k = num_shared, e, top_k
        self.attention, self.seq_length = attention, seq_length
        if rope is not False and rope is not None:
            if attention != "softmax":
                raise ValueError("rope needs attention='softmax'")
            if self.head_dim % 2:
                raise ValueError(f"rope needs an even head_dim; got {self.head_dim}")
        self.rope_theta = None if rope is False or rope is None else (10_000.0 if rope is True else float(rope))
        self.qkv = _dense(d_model, 3 * d_model, ("embed", "heads"), rngs, use_bias=qkv_bias)
        self.proj = _dense(d_model, d_model, ("heads", "embed"), rngs)
        normal = nnx.initializers.normal(1.0 / math.sqrt(d_model))
        self.wg = _dense(d_model, e, ("embed", None), rngs, use_bias=False, kernel_init=normal) if top_k else None
        self.wg_0 = (
            _dense(d_model, 2, ("embed", None), rngs, use_bias=False, kernel_init=normal)
            if top_k and num_shared else None
        )
        self.wg_1 = (
            _dense(d_model, num_shared, ("embed", None), rngs, use_bias=False, kernel_init=normal)
            if num_shared > 1 else None
        )
        if attention == "cosine":
            t0 = math.log(math.expm1(1.0 / 0.24))  # softplus(t0) = 1 / 0.24
            self.temperature = nnx.Param(_init(nnx.initializers.constant(t0), "heads")(rngs.params(), (num_heads,)))
            self.query_embedding = nnx.Param(
                _init(nnx.initializers.truncated_normal(0.02), "heads", "head_dim")(
                    rngs.params(), (num_heads, self.head_dim))
            )
        else:
            self.temperature = self.query_embedding = None
        if cpb:
            self.cpb_fc1 = _dense(2, cpb_hidden, (None, "mlp"), rngs)
            self.cpb_fc2 = _dense(cpb_hidden, num_heads, ("mlp", "heads"), rngs)
        else:
            self.cpb_fc1 = self.cpb_fc2 = None

    # ------------------------------------------------------------------ pieces

    def gates(self, x: Array) -> dict[str, Array]:
        """Head gates and routing statistics for tokens ``x [..., C]`` (:func:`routing_gates`)."""
        return routing_gates(
            self.wg(x) if self.wg is not None else None, self.top_k,
            shared_logits=self.wg_1(x) if self.wg_1 is not None else None,
            mix_logits=self.wg_0(x) if self.wg_0 is not None else None, num_shared=self.num_shared,
        )

    def relative_bias(self, relative_pos_index: Any, relative_coords_table: Any, nq: int, nk: int) -> Array:
        """CPB bias ``[h, Nq, Nk] = (fc2(relu(fc1(table)))^T)[:, index]``."""
        if self.cpb_fc1 is None:
            raise ValueError("relative position inputs need cpb=True")
        table = jnp.asarray(relative_coords_table, jnp.float32)
        index = jnp.asarray(relative_pos_index).reshape(-1)
        if table.ndim != 2 or table.shape[1] != 2:
            raise ValueError(f"relative_coords_table must be [T, 2]; got {shape_str(table)}")
        if index.shape != (nq * nk,):
            raise ValueError(f"relative_pos_index must have Nq * Nk = {nq * nk} entries; got {shape_str(index)}")
        b = self.cpb_fc2(jax.nn.relu(self.cpb_fc1(table)))  # [T, h]
        return jnp.take(b.T, index, axis=1).reshape(self.num_heads, nq, nk)

    def _qkv(self, x: Array, positions: Array | None = None) -> tuple[Array, Array, Array]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.rope_theta is not None:
            pos = jnp.arange(n)[None] if positions is None else positions
            q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        return q, k, v

    def _scaled(self, q: Array, k: Array, n_keys: int) -> tuple[Array, Array, float]:
        """The (q, k, scale) fed to softmax attention."""
        if self.attention == "softmax":
            return q, k, 1.0 / math.sqrt(self.head_dim)
        n = self.seq_length or n_keys
        qe = self.query_embedding[...].astype(jnp.float32)
        t = jax.nn.softplus(self.temperature[...].astype(jnp.float32))
        qs = (_normalize(q.astype(jnp.float32)) + qe) * t[:, None] * math.log(n)
        return qs, _normalize(k.astype(jnp.float32)), 1.0

    def _bias(self, x: Array, hw, rel_bias, relative_pos_index, relative_coords_table) -> Array | None:
        n = x.shape[1]
        if rel_bias is not None:
            rb = jnp.asarray(rel_bias, jnp.float32)
            if rb.shape != (self.num_heads, n, n):
                raise ValueError(f"rel_bias must be [heads={self.num_heads}, {n}, {n}]; got {shape_str(rb)}")
            return rb
        if relative_pos_index is not None or relative_coords_table is not None:
            if relative_pos_index is None or relative_coords_table is None:
                raise ValueError("relative_pos_index and relative_coords_table must be given together")
            return self.relative_bias(relative_pos_index, relative_coords_table, n, n)
        if self.cpb_fc1 is not None:
            if hw is None:
                raise ValueError("cpb=True needs hw=(height, width) of the token grid (or the relative inputs)")
            if len(hw) != 2 or int(hw[0]) * int(hw[1]) != n:
                raise ValueError(f"hw must be (height, width) with height * width = {n} tokens; got {hw!r}")
            index, table = relative_position_cpb((int(hw[0]), int(hw[1])))
            return self.relative_bias(index, table, n, n)
        return None

    def attention_weights(
        self, x: Array, *, causal: bool = True, hw: tuple[int, int] | None = None, rel_bias: Array | None = None,
        relative_pos_index: Any = None, relative_coords_table: Any = None,
    ) -> Array:
        """The head attention weights ``[B, h, N, N]`` (explicit; for diagnostics and tests)."""
        q, k, _ = self._qkv(x)
        qs, ks, scale = self._scaled(q, k, x.shape[1])
        bias = self._bias(x, hw, rel_bias, relative_pos_index, relative_coords_table)
        return softmax_weights(qs, ks, causal=causal, scale=scale, bias=None if bias is None else bias[None])

    # ------------------------------------------------------------------ forward

    def __call__(
        self, x: Array, *, causal: bool = True, mask: Array | None = None, hw: tuple[int, int] | None = None,
        rel_bias: Array | None = None, relative_pos_index: Any = None, relative_coords_table: Any = None,
        return_aux: bool = False,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """``x [B, N, C] -> [B, N, C]``.

        ``causal``: causal attention (the default; ``False`` for the vision models). ``mask``: bool, broadcastable to
        ``[B, h, N, N]`` (True = visible). Relative bias (cosine attention): ``rel_bias [h, N, N]``
        directly, or the CPB inputs ``relative_pos_index [N*N]`` + ``relative_coords_table [T, 2]``,
        or ``hw`` (the token grid; the inputs are then built by :func:`relative_position_cpb`).
        ``return_aux``: also return ``{"head_gates", "router_probs", "routed_mask",
        "load_balance_loss", "head_out"}``.
        """
        check_input("x", x, self.d_model)
        b, n, _ = x.shape
        aux = self.gates(x)
        q, k, v = self._qkv(x)
        qs, ks, scale = self._scaled(q, k, n)
        bias = self._bias(x, hw, rel_bias, relative_pos_index, relative_coords_table)
        heads = za.softmax(
            qs, ks, v, causal=causal, mask=mask, scale=scale, bias=None if bias is None else bias[None],
        )
        gated = heads.astype(jnp.float32)
        if "head_gates" in aux:
            gated = aux["head_gates"][..., None] * gated
        out = self.proj(gated.astype(x.dtype).reshape(b, n, self.d_model))
        if "load_balance_loss" in aux and capturing(self):
            # Recorded only under ``nnx.capture(model, nnx.Intermediate)`` (sowing outside it would
            # grow the module's state on every call).
            self.sow(nnx.Intermediate, "load_balance_loss", aux["load_balance_loss"])
        if return_aux:
            return out, {**aux, "head_out": heads}
        return out

    # ------------------------------------------------------------------ decoding (causal LM mixer)

    def init_state(self, batch: int, max_len: int) -> za.KVCache:
        """An empty KV cache for ``max_len`` tokens (``zoo.attention`` softmax ``init_state``)."""
        return za.get("softmax").init_state(batch, self.num_heads, self.head_dim, max_len=max_len)

    def _check_decoding(self, position: Any) -> None:
        if self.rope_theta is not None and position is None:
            raise ValueError("position (the token's absolute position) is needed with rope")
        if self.attention == "cosine" and self.seq_length is None:
            raise ValueError("decoding with attention='cosine' needs seq_length (the log N scale)")
        if self.cpb_fc1 is not None:
            raise ValueError("decoding does not support the CPB relative position bias (cpb=True)")

    def _decode(self, x: Array, state: za.KVCache, position: Any) -> tuple[Array, za.KVCache]:
        """``x [B, T, C]`` at positions ``position ..`` through the cache (one parallel prefill)."""
        check_kv_capacity(state, x.shape[1], position, streaming=False, what="decoding")
        aux = self.gates(x)
        q, k, v = self._qkv(x, positions_from(0 if position is None else position, x.shape[1]))
        qs, ks, scale = self._scaled(q, k, 1)
        y, state = za.get("softmax").prefill(state, qs, ks, v, scale=scale)
        gated = y.astype(jnp.float32)
        if "head_gates" in aux:
            gated = aux["head_gates"][..., None] * gated
        return self.proj(gated.astype(x.dtype).reshape(*x.shape[:2], self.d_model)), state

    def prefill(self, x: Array, state: za.KVCache, position: Any = 0) -> tuple[Array, za.KVCache]:
        """A prompt ``x [B, T, C]`` at positions ``position ..`` in one parallel call on the cache:
        ``(y [B, T, C], state)``, equal to ``T`` calls of :meth:`decode_step`."""
        self._check_decoding(position)
        check_input("x", x, self.d_model)
        return self._decode(x, state, position)

    def decode_step(self, x_t: Array, state: za.KVCache, position: Any = None) -> tuple[Array, za.KVCache]:
        """One causal decoding step: ``x_t [B, C]`` (or ``[B, 1, C]``) -> ``(y_t, state)``; equals
        the causal forward at that position (cosine attention needs ``seq_length`` for that;
        the CPB bias is not supported when decoding)."""
        squeeze = getattr(x_t, "ndim", None) == 2
        x = x_t[:, None] if squeeze else x_t
        if getattr(x, "ndim", None) != 3 or x.shape[1:] != (1, self.d_model):
            raise ValueError(
                f"x_t must be [batch, d_model={self.d_model}] or [batch, 1, d_model]; got {shape_str(x_t)}"
            )
        check_float("x_t", x)
        self._check_decoding(position)
        out, state = self._decode(x, state, position)
        return (out[:, 0] if squeeze else out), state


def moh_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, rope: bool | float = False, num_shared: int | None = None,
    top_k: int | None = None, **kw: Any,
) -> MoHAttention:
    """``zoo.nn.register_mixer`` factory (mixer ``"moh"``): causal softmax MoH attention, by default
    half the heads shared and a quarter of them routed per token (the MoH-LLaMA3 ratios, 75%
    active), at least one routed."""
    if num_shared is None:
        num_shared = num_heads // 2
    if top_k is None:
        top_k = max(1, num_heads // 4) if num_heads > num_shared else 0
    return MoHAttention(d_model, num_heads, num_shared=num_shared, top_k=top_k, rope=rope, rngs=rngs, **kw)


register_mixer(
    "moh", moh_mixer,
    description="MoHAttention: mixture-of-head softmax attention (shared + top-K routed heads gated per token)",
)
