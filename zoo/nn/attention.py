"""Multi-head attention around any ``zoo.attention`` transform, and the mixer registry.

:class:`MultiHeadAttention` owns the parameters (q/k/v/o projections, optional biases, q/k
RMS norms, output gate, per-head sink logits, learnable feature maps) and calls a pure transform
from :mod:`zoo.attention` through its :class:`~zoo.attention.Transform` record: the parallel form
for training, ``prefill`` for a prompt and ``step`` for one token, with rotary embeddings at
absolute positions in all three. Its arguments follow ``flax.nnx.MultiHeadAttention``
(``MultiHeadAttention(num_heads, in_features, qkv_features, out_features, num_kv_heads,
in_kv_features, ...)``; ``m(x, context)`` is cross-attention as nnx's ``m(inputs_q, inputs_k)``).

Mixer modules (token mixers of the models) offer, one contract for all of them:

- ``__call__(x [B, T, E], *, causal=True) -> [B, T, E]`` (causal by default: decoder mixers);
- ``init_state(batch, max_len)``: an empty decoding state;
- ``prefill(x [B, T, E], state, position=0) -> (y [B, T, E], state)``: a prompt in one parallel
  call, equal to ``T`` calls of ``decode_step`` at positions ``position .. position + T - 1``;
- ``decode_step(x_t [B, E], state, position) -> (y_t [B, E], state)``.

The mixer registry: one namespace of names, one constructor signature
``factory(d_model, *, rngs, **kw)``, one check (:func:`check_mixer_spec`, used by
:func:`build_mixer` and by ``zoo.run.validate``). Naming policy:

1. Every ``zoo.attention`` transform name is a mixer name and always means
   ``MultiHeadAttention(transform=name)``: as a string (``"flow"``), as ``{"transform": name, **kw}``
   and as ``{"module": name, **kw}``. ``{"module": "attention", "transform": ..., **kw}`` is the
   generic form (``kw``: :class:`MultiHeadAttention` arguments or transform options).
2. A layer class is registered under one name (:func:`register_mixer`), never a transform name,
   with a description saying how it differs from the transform inside ``MultiHeadAttention``.
   Variants of one class are keyword arguments, not extra names
   (``{"module": "miras_memory", "preset": "moneta"}``).
3. A layer that computes what ``MultiHeadAttention`` computes with some transform and arguments
   is not registered (``FlowAttentionLayer`` is ``MultiHeadAttention(transform="flow",
   use_bias=True)``: use ``"flow"``), so no mechanism has two names.

:func:`mixer_names` lists every valid name (``kind="transform"`` or ``"layer"`` for one kind) and
:func:`describe_mixer` says what a name builds.

KV-cache capacity (softmax family): a cache holds ``max_len`` tokens (``init_state(batch,
max_len)``). With full attention, a token past it would silently evict the oldest one, so
:meth:`MultiHeadAttention.prefill` / :meth:`~MultiHeadAttention.decode_step` raise a ValueError
when that happens on concrete values (eager calls: the cache length, the position and the
prompt length are known; under ``jax.jit`` they are traced and cannot be checked here, which is
why ``zoo.models.generate`` checks its ``max_len`` up front). A sliding ``window`` (a ring buffer
by design) and StreamingLLM sinks (``num_sink_tokens > 0``) evict on purpose and are not checked.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo.attention as za
from zoo.attention import feature_maps as fmaps
from zoo.attention import rope as rope_lib
from zoo.attention.common import as_int, check_float, concrete, shape_str
from zoo.attention.registry import keyword_params
from zoo.attention.softmax import write as kv_write
from zoo.nn.diagnostics import attention_entropy, attention_weights, capturing, sink_scores
from zoo.nn.layers import RMSNorm, apply_rope, axes, cast, normal_init, param

Array = jax.Array

# Options of a parallel form that the module supplies itself (never in ``transform_kwargs``).
_MODULE_OPTIONS = frozenset({"causal", "mask", "initial_state", "return_state"})


class Constant(nnx.Variable):
    """A non-trainable array option of a transform (e.g. per-head ``decay`` rates)."""


class _Static:
    """Wraps an unhashable static value (a Transform, a dict option) so the graph stays hashable;
    compared by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:
        return f"_Static({self.value!r})"


def resolve_transform(transform: str | za.Transform | Callable) -> za.Transform:
    """A registry name, a :class:`zoo.attention.Transform` or a callable ``fn(q, k, v, causal=...,
    **kw)`` (wrapped as a Transform without decoding forms) -> Transform."""
    if isinstance(transform, str):
        try:
            return za.get(transform)
        except ValueError as e:
            raise ValueError(f"transform: {e}") from None
    if isinstance(transform, za.Transform):
        return transform
    if callable(transform):
        return za.Transform(getattr(transform, "__name__", "custom"), transform)
    raise ValueError(f"transform must be a registry name, a Transform or a callable; got {transform!r}")


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _positive(name: str, value: Any, default: int | None = None) -> int:
    """``value`` (Python or NumPy int >= 1) as int; ``default`` when None."""
    if value is None and default is not None:
        return default
    return as_int(name, value, allow_none=False)


def check_input(name: str, x: Any, features: int, *, rank: int = 3) -> None:
    """``x`` must be a float array ``[batch, length, features]`` (rank 3) or ``[batch, features]``
    (rank 2, one token) with ``length >= 1``; ValueError naming ``name`` otherwise."""
    layout = f"[batch, length, {features}]" if rank == 3 else f"[batch, {features}] (one token)"
    if getattr(x, "ndim", None) != rank or x.shape[-1] != features:
        raise ValueError(f"{name} must be {layout}; got shape {getattr(x, 'shape', type(x).__name__)}")
    check_float(name, x)
    if rank == 3 and x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token (length >= 1); got shape {x.shape}")


def positions_from(position: Any, length: int, what: str = "position") -> Array:
    """Absolute positions ``position + [0, length)``: ``[length]`` for a scalar ``position``,
    ``[batch, length]`` for ``position [batch]`` (int32). Float positions are a ValueError."""
    pos = jnp.asarray(position)
    if not jnp.issubdtype(pos.dtype, jnp.integer) or pos.ndim > 1:
        raise ValueError(f"{what} must be an integer scalar or [batch] array; got {pos.dtype} {shape_str(pos)}")
    pos = pos.astype(jnp.int32)
    return pos[..., None] + jnp.arange(length, dtype=jnp.int32)


def check_kv_capacity(state: Any, new_tokens: int, position: Any, *, streaming: bool, what: str) -> None:
    """Raises a ValueError when ``new_tokens`` more tokens would overflow a full-attention KV cache.

    ``state``: a :class:`zoo.attention.KVCache` (other states pass: constant size). ``streaming``:
    the cache evicts on purpose (sliding window, StreamingLLM sinks). Checked: the prompt length
    against the capacity (always known), the cache's token count and the absolute ``position``
    when they are concrete (not traced under ``jax.jit``).
    """
    if streaming or not isinstance(state, za.KVCache):
        return
    cap = int(state.pos.shape[0])
    hint = ("init_state with a larger max_len, or use a sliding window (window=...) or StreamingLLM "
            "sinks (num_sink_tokens) to evict on purpose")
    if new_tokens > cap:
        raise ValueError(f"{what}: {new_tokens} tokens exceed the KV cache of max_len={cap} tokens; {hint}")
    for label, value in (("the cache already holds", state.length), ("position", position)):
        a = concrete(value)
        if a is not None and a.size and int(np.max(a)) + new_tokens > cap:
            raise ValueError(
                f"{what}: {label} {int(np.max(a))} + {new_tokens} new tokens > max_len={cap}: full attention "
                f"would silently evict the oldest tokens; {hint}"
            )


def spectral_norm(w: Array, fan_in_axes: int = 1, *, squarings: int = 10) -> Array:
    """``sigma(W)``: the largest singular value of a kernel seen as the matrix of its linear map,
    ``[prod(shape[:fan_in_axes]), prod(shape[fan_in_axes:])]`` (``[E, H, D] -> [E, H D]`` with
    ``fan_in_axes=1``, ``[H, D, E] -> [H D, E]`` with 2); float32.

    The top singular vector ``u`` comes from the Gram matrix ``G = W^T W`` (the smaller side)
    raised to the power ``2^squarings`` by repeated squaring (normalised by its trace each time):
    power iteration with ``2^squarings`` steps (1024 by default, converged to float32 unless the
    top two singular values are within about 2% of each other, where any vector of their span gives
    ``sigma`` within the same margin) for ``squarings`` small matrix products, much cheaper on CPU
    than an SVD. ``u`` is stop-gradient and ``sigma = ||W u||``, whose gradient at the top
    singular vector is the exact ``d sigma = v_1^T dW u_1`` (the derivative through ``u``
    vanishes there), as the paper's ``sigma = v^T W u`` with stop-gradient ``u, v``.
    """
    w = jnp.asarray(w, jnp.float32)
    if not 1 <= fan_in_axes < w.ndim:
        raise ValueError(f"fan_in_axes must be in [1, {w.ndim - 1}] for a kernel of shape {w.shape}; got {fan_in_axes}")
    m = w.reshape(math.prod(w.shape[:fan_in_axes]), -1)
    if m.shape[0] < m.shape[1]:
        m = m.T
    g = jax.lax.stop_gradient(m.T @ m)  # [n, n], n = min(fan_in, fan_out)
    for _ in range(squarings):
        g = g / jnp.maximum(jnp.trace(g), 1e-30)
        g = g @ g
    norms = jnp.linalg.norm(g, axis=0)
    col = g[:, jnp.argmax(norms)]  # every column of G^(2^k) is ~ a multiple of u_1
    u = jax.lax.stop_gradient(col / jnp.maximum(jnp.linalg.norm(col), 1e-30))
    return jnp.linalg.norm(m @ u)


class MultiHeadAttention(nnx.Module):
    """Multi-head (grouped-query) attention whose core is a ``zoo.attention`` transform.

    ``q = x W_q [B, T, H, D]``, ``k = c W_k``, ``v = c W_v [B, S, Hkv, D]`` with ``c = x``
    (self-attention) or ``c = context`` (cross-attention), optionally RMS-normed per head
    ("QK-norm") and rotated by RoPE at absolute positions, ``y = transform(q, k, v)``, optionally
    gated ``y * sigmoid(x W_g)`` (gated attention, Qiu et al. 2025), and ``out = y W_o [B, T, E_out]``.

    Arguments in ``flax.nnx.MultiHeadAttention``'s order:

      num_heads: query heads ``H``.
      in_features: width ``E`` of ``x``.
      qkv_features: ``H * D`` (default ``in_features``; or give ``head_dim``).
      out_features: output width (default ``in_features``).
      num_kv_heads: k/v heads (default ``H``; must divide ``H``: grouped-query attention).
      in_kv_features: width of ``context`` (default ``in_features``).

    Keyword arguments:

      transform: a ``zoo.attention`` registry name, a ``Transform`` or a callable
        ``fn(q, k, v, causal=..., **kw)`` (no decoding for a bare callable).
      transform_kwargs: options of the transform (e.g. ``window``, ``feature_map``, ``decay``),
        checked here against :attr:`Transform.option_names` (a typo is a ValueError now, not at
        the first call). Passed to every form (the registry drops those a form does not take).
        Array options are kept as non-trainable :class:`Constant` variables.
      head_dim: ``D`` (default ``qkv_features // H``).
      qk_norm: RMS-normalise q and k over ``head_dim`` (learned scale) before RoPE.
      rope: ``True`` (base ``rope_theta``) or a float base: rotary embeddings on q and k.
      rope_scaling: a length-extrapolation scaling of the rotary frequencies
        (:class:`zoo.attention.rope.RopeScaling` or a dict with its keys: ``{"kind": "yarn",
        "factor": 4, "original_max_len": 256}``; needs ``rope``). Its logit scale (YaRN's
        ``mscale^2``, log-n factors of ``entropy_abf`` / ``logn``) multiplies q. ``kind="clex"``
        makes the ODE weights ``clex_up``/``clex_down`` parameters (CLEX init: equal to NTK).
        ``dynamic=True`` (``ntk``, ``clex``) recomputes the frequencies from the current length
        ``n`` (the forward's length; ``position + T`` in :meth:`prefill` / :meth:`decode_step`);
        the KV cache then holds keys *before* RoPE, rotated at every call with the current
        frequencies, so decoding equals the forward at every length (HF's dynamic NTK keeps the
        old rotations in its cache and does not). A prefill of a prompt longer than
        ``original_max_len`` therefore equals the forward over the whole prefix, not ``T`` decode
        steps (each of which sees its own length). This holds per layer: in a stack, past
        ``original_max_len`` the forward recomputes every earlier token's hidden state with the
        new length's frequencies, which a cache of earlier steps cannot.
      output_gate: sigmoid gate on the attention output per head and channel.
      use_bias: biases on the projections.
      sink: a learned per-head sink logit (zeros at init) passed as ``sink_logit`` (transforms
        whose options include it: the softmax family).
      tie_feature_map: with a learnable feature map (``feature_map="hedgehog"``), share one map
        between q and k instead of one each.
      sigma_reparam: sigmaReparam on every projection of the layer (q, k, v, o and the output
        gate): each kernel ``W`` is used as ``W_hat = (gamma / sigma(W)) W`` with ``sigma(W)``
        its largest singular value (the kernel seen as a ``[fan_in, fan_out]`` matrix) and a
        learnable scalar ``gamma`` per projection initialised to ``sigma(W_0)`` (so
        ``W_hat = W`` at init, as the reference vision code). Zhai, Likhomanenko, Littwin,
        Busbridge, Ramapuram, Zhang, Gu, Susskind, "Stabilizing Transformer Training by
        Preventing Attention Entropy Collapse" (ICML 2023): the attention entropy is bounded
        below by a quantity decreasing in ``sigma(W_K W_Q^T)``, and the reparametrisation keeps
        that spectral norm from growing by itself. The paper estimates ``sigma`` with one
        power-iteration step per training step from a persistent vector (which tracks the top
        singular vector; :class:`zoo.nn.SigmaReparamDense`); here ``sigma`` is computed to
        float32 precision at every call (:func:`spectral_norm`: a converged power iteration),
        which the persistent estimate converges to; it needs no state (the trainer does not
        write back non-parameter state) and makes decoding equal the forward. The gradient
        flows through ``sigma`` as in the paper.
      dtype: compute dtype (default: the input's); param_dtype: parameter dtype.

    Learnable feature maps: when the options name a learnable map (``hedgehog``,
    ``hedgehog_lolcats``) and give no ``feature_map_params``, per-head identity-initialised weights
    ``[H, D, D]`` and biases ``[H, D]`` (``feature_maps.hedgehog_init``) are created as
    ``nnx.Param`` s; :meth:`feature_map_params` returns what is passed to the transform.

    Decoding: :meth:`init_state`, :meth:`prefill` and :meth:`decode_step` (causal, self-attention).
    The softmax family decodes on a KV cache of ``max_len`` tokens (``window`` slots, a ring
    buffer, for a sliding window; overflowing a full-attention cache is a ValueError on concrete
    values, see the module docstring). Options listed in ``Transform.step_exact`` must be given
    explicitly for decoding to equal the parallel form (``sigmoid``'s ``bias``, whose parallel
    default ``-log(k_length)`` depends on the key count): :meth:`init_state` raises a ValueError
    asking for them (e.g. ``transform_kwargs={"bias": -math.log(max_len)}``).

    Cross-attention ``m(x, context)``: keys and values from ``context [B, S, in_kv_features]``.
    Non-causal for any transform that is not causal-only and takes keys of another length
    (the softmax family, the linear family, flow, positional); ``causal=True`` with a context is
    the aligned pattern (query ``i`` sees context positions ``j <= i``), which needs ``S == T``
    for every transform (none defines a causal mask between sequences of different lengths).
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        transform: str | za.Transform | Callable = "softmax",
        transform_kwargs: Mapping[str, Any] | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        rope: bool | float = False,
        rope_theta: float = 10_000.0,
        rope_scaling: Any = None,
        output_gate: bool = False,
        use_bias: bool = False,
        sink: bool = False,
        tie_feature_map: bool = False,
        sigma_reparam: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(sigma_reparam, (bool, np.bool_)):
            raise ValueError(f"sigma_reparam must be a bool; got {sigma_reparam!r}")
        num_heads = _positive("num_heads", num_heads)
        in_features = _positive("in_features", in_features)
        out_features = _positive("out_features", out_features, in_features)
        in_kv_features = _positive("in_kv_features", in_kv_features, in_features)
        if head_dim is not None:
            head_dim = _positive("head_dim", head_dim)
            if qkv_features is not None and _positive("qkv_features", qkv_features) != num_heads * head_dim:
                raise ValueError(
                    f"qkv_features ({qkv_features}) must equal num_heads * head_dim = {num_heads * head_dim}"
                )
        else:
            qkv = _positive("qkv_features", qkv_features, in_features)
            if qkv % num_heads:
                raise ValueError(
                    f"num_heads ({num_heads}) must divide qkv_features ({qkv}; default in_features) "
                    "when head_dim is not given"
                )
            head_dim = qkv // num_heads
        kvh = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(kvh, (int, np.integer)) or isinstance(kvh, bool) or kvh <= 0 or num_heads % kvh:
            raise ValueError(f"num_kv_heads ({num_kv_heads!r}) must be a positive int dividing num_heads ({num_heads})")
        kvh = int(kvh)
        if rope is not False and rope is not None and not isinstance(rope, bool):
            rope_theta, rope = float(rope), True
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim; got {head_dim}")
        try:
            scaling = rope_lib.as_scaling(rope_scaling)
            if scaling is not None:
                rope_lib.rope_frequencies(head_dim, theta=float(rope_theta), scaling=scaling)
        except ValueError as e:
            raise ValueError(f"rope_scaling: {e}") from None
        if scaling is not None and not rope:
            raise ValueError("rope_scaling needs rotary embeddings (rope=True or a float base)")

        t = resolve_transform(transform)
        if not t.gqa and kvh != num_heads:
            raise ValueError(f"num_kv_heads: transform {t.name!r} does not support grouped-query attention")
        user = dict(transform_kwargs or {})
        managed = sorted(set(user) & _MODULE_OPTIONS)
        if managed:
            raise ValueError(
                f"transform_kwargs must not set {', '.join(map(repr, managed))}: the module passes it "
                "(causal and mask are arguments of __call__, the state of init_state/prefill)"
            )
        t.check_options(user, what="transform_kwargs")
        if sink and "sink_logit" not in t.option_names:
            raise ValueError(f"sink=True needs a transform that takes sink_logit (softmax family); got {t.name!r}")
        kw = {**t.defaults, **user}
        self._transform_ref: str | _Static = transform if isinstance(transform, str) else _Static(t)
        self.transform_name = t.name
        self._explicit_options = tuple(sorted(user))

        self.in_features, self.num_heads, self.num_kv_heads, self.head_dim = in_features, num_heads, kvh, head_dim
        self.out_features, self.in_kv_features = out_features, in_kv_features
        self.qk_norm, self.rope, self.rope_theta = qk_norm, bool(rope), float(rope_theta)
        self.rope_scaling = scaling
        self.output_gate, self.use_bias, self.sink, self.dtype = output_gate, use_bias, sink, dtype
        self.tie_feature_map = tie_feature_map
        self.sigma_reparam = bool(sigma_reparam)

        # Options: arrays become non-trainable variables, the rest static (hashable) values.
        arrays = {k: Constant(jnp.asarray(v)) for k, v in kw.items() if _is_array(v)}
        self.transform_arrays = nnx.Dict(arrays)
        static = []
        for k, v in sorted(kw.items()):
            if k in arrays:
                continue
            try:
                hash(v)
            except TypeError:
                v = _Static(v)
            static.append((k, v))
        self._static_options = tuple(static)

        e, ekv, h, d, pd = in_features, in_kv_features, num_heads, head_dim, param_dtype
        self.q_proj = param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, normal_init(ekv), (ekv, kvh, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, normal_init(ekv), (ekv, kvh, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, normal_init(h * d), (h, d, out_features), ("heads", "head_dim", "embed"), pd)
        if use_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (h, d), ("heads", "head_dim"), pd)
            self.k_bias = param(rngs, zeros, (kvh, d), ("kv_heads", "head_dim"), pd)
            self.v_bias = param(rngs, zeros, (kvh, d), ("kv_heads", "head_dim"), pd)
            self.o_bias = param(rngs, zeros, (out_features,), ("embed",), pd)
        if output_gate:
            self.gate_proj = param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd)
        if self.sigma_reparam:  # gamma = sigma(W_0): W_hat = W at init
            self.sigma_gamma = nnx.Dict({
                name: nnx.Param(jnp.asarray(spectral_norm(getattr(self, name)[...], self._fan_in_axes(name)), pd),
                                 **axes())
                for name in self._projections()})
        if qk_norm:
            self.q_norm = RMSNorm(d, dtype=dtype, param_dtype=pd, axis_name="head_dim", rngs=rngs)
            self.k_norm = RMSNorm(d, dtype=dtype, param_dtype=pd, axis_name="head_dim", rngs=rngs)
        if sink:
            self.sink_logit = param(rngs, nnx.initializers.zeros, (h,), ("heads",), pd)
        if scaling is not None and scaling.kind == "clex":
            init = rope_lib.clex_init(rngs.params(), d, param_factor=scaling.param_factor, dtype=pd)
            self.clex_up = nnx.Param(init["up"], **axes(None, None))
            self.clex_down = nnx.Param(init["down"], **axes(None, None))

        fm = kw.get("feature_map")
        self.learned_feature_map = (
            fm is not None and "feature_map_params" not in kw and fmaps.get(fm).learnable
        )
        if self.learned_feature_map:
            init = fmaps.hedgehog_init(None, d, d, heads=h, dtype=pd)
            self.fm_q_weight = nnx.Param(init["weight"], **axes("heads", None, None))
            self.fm_q_bias = nnx.Param(init["bias"], **axes("heads", None))
            if not tie_feature_map:
                self.fm_k_weight = nnx.Param(init["weight"], **axes("heads", None, None))
                self.fm_k_bias = nnx.Param(init["bias"], **axes("heads", None))

        # The transform's own learned parameters (Transform.init_params), unless given as options.
        learned = {} if t.init_params is None else {
            k: v for k, v in t.init_params(rngs.params(), h, d, d, **kw).items() if k not in kw}
        self._learned_layout = tuple(
            (k, len(v) if isinstance(v, (tuple, list)) else None) for k, v in sorted(learned.items()))
        flat = {}
        for k, v in learned.items():
            for i, a in enumerate(v) if isinstance(v, (tuple, list)) else [(None, v)]:
                a = jnp.asarray(a, pd)
                flat[k if i is None else f"{k}_{i}"] = nnx.Param(a, **axes("heads", *([None] * (a.ndim - 1))))
        self.transform_params = nnx.Dict(flat)

    # ------------------------------------------------------------------ helpers

    @property
    def transform(self) -> za.Transform:
        """The :class:`zoo.attention.Transform` this module calls."""
        ref = self._transform_ref
        return za.get(ref) if isinstance(ref, str) else ref.value

    def feature_map_params(self) -> Any:
        """Parameters of the learnable feature map passed as ``feature_map_params`` (None when
        the map has none): a pair ``(params_q, params_k)``, or one dict when tied."""
        if not self.learned_feature_map:
            return None
        pq = {"weight": self.fm_q_weight[...], "bias": self.fm_q_bias[...]}
        if self.tie_feature_map:
            return pq
        return pq, {"weight": self.fm_k_weight[...], "bias": self.fm_k_bias[...]}

    def learned_options(self) -> dict[str, Any]:
        """The transform's learned parameters (``Transform.init_params``, e.g. TTT's initial inner
        model) as the options they initialise: arrays, or tuples of arrays."""
        p = self.transform_params
        return {k: p[k][...] if n is None else tuple(p[f"{k}_{i}"][...] for i in range(n))
                for k, n in self._learned_layout}

    def options(self, *, for_step: bool = False) -> dict[str, Any]:
        """The keyword options of the transform call (``for_step``: those its ``step`` takes)."""
        opts = {k: (v.value if isinstance(v, _Static) else v) for k, v in self._static_options}
        opts.update({k: v[...] for k, v in self.transform_arrays.items() if not k.startswith("__")})
        opts.update(self.learned_options())
        fmp = self.feature_map_params()
        if fmp is not None:
            opts["feature_map_params"] = fmp
        if self.sink:
            opts["sink_logit"] = self.sink_logit[...].astype(jnp.float32)
        if for_step:
            opts = self.transform.step_options(opts)
        return opts

    def _streaming(self) -> bool:
        """Whether the KV cache evicts on purpose (a sliding window or StreamingLLM sinks)."""
        opts = dict(self._static_options)
        return opts.get("window") is not None or bool(opts.get("num_sink_tokens") or 0)

    def _projections(self) -> tuple[str, ...]:
        """Names of the projection kernels (the linear layers sigmaReparam applies to)."""
        return ("q_proj", "k_proj", "v_proj", "o_proj") + (("gate_proj",) if self.output_gate else ())

    def kernel(self, name: str) -> Array:
        """The projection kernel ``name`` (``"q_proj"``, ``"k_proj"``, ``"v_proj"``, ``"o_proj"``,
        ``"gate_proj"``) as used: the parameter, or with ``sigma_reparam`` the reparametrised
        ``(gamma / sigma(W)) W`` (float32)."""
        if name not in self._projections():
            raise ValueError(f"name must be one of {self._projections()}; got {name!r}")
        w = getattr(self, name)[...]
        if not self.sigma_reparam:
            return w
        w = w.astype(jnp.float32)
        return self.sigma_gamma[name][...].astype(jnp.float32) * w / spectral_norm(w, self._fan_in_axes(name))

    @staticmethod
    def _fan_in_axes(name: str) -> int:
        return 2 if name == "o_proj" else 1  # o_proj [H, D, E_out]; the others [E, H, D]

    def _heads(self, x: Array, w: Array, b: str) -> Array:
        dt = self.dtype or x.dtype
        y = jnp.einsum("bte,ehd->bthd", x.astype(dt), w.astype(dt))
        return y + getattr(self, b)[...].astype(dt) if self.use_bias else y

    def _dynamic_rope(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling.dynamic

    def inv_freq(self, length: Any = None) -> Array | None:
        """Rotary inverse frequencies ``[D/2]`` (``[B, D/2]`` for a dynamic scaling with
        ``length [B]``) at current length ``length`` (dynamic scalings only); None without rope."""
        if not self.rope:
            return None
        params = None
        if self.rope_scaling is not None and self.rope_scaling.kind == "clex":
            params = {"up": self.clex_up[...], "down": self.clex_down[...]}
        return rope_lib.rope_frequencies(self.head_dim, theta=self.rope_theta, scaling=self.rope_scaling,
                                         length=length, params=params)[0]

    def _query(self, x: Array, positions: Array, inv_freq: Array | None) -> Array:
        """``x [B, T, E]`` -> ``q [B, T, H, D]`` (norm, RoPE and the scaling's logit scale applied)."""
        q = self._heads(x, self.kernel("q_proj"), "q_bias")
        if self.qk_norm:
            q = self.q_norm(q)
        if not self.rope:
            return q
        q = apply_rope(q, positions, inv_freq=inv_freq)
        qs = rope_lib.query_scale(positions, self.rope_scaling)
        if isinstance(qs, float):
            return q if qs == 1.0 else (q * qs).astype(q.dtype)
        return (q * qs[..., None, None]).astype(q.dtype)

    def _keys_values(self, c: Array, positions: Array, inv_freq: Array | None) -> tuple[Array, Array]:
        """``c [B, S, E_kv]`` -> ``k, v [B, S, Hkv, D]`` (norm and RoPE on k; none when
        ``inv_freq`` is None)."""
        k = self._heads(c, self.kernel("k_proj"), "k_bias")
        v = self._heads(c, self.kernel("v_proj"), "v_bias")
        if self.qk_norm:
            k = self.k_norm(k)
        return (apply_rope(k, positions, inv_freq=inv_freq) if inv_freq is not None else k), v

    def _project(self, x: Array, positions: Array, inv_freq: Array | None) -> tuple[Array, Array, Array]:
        """Self-attention projections: q ``[B, T, H, D]``, k, v ``[B, T, Hkv, D]``."""
        return (self._query(x, positions, inv_freq), *self._keys_values(x, positions, inv_freq))

    def _decode_dynamic(self, x: Array, state: Any, position: Any, *, one: bool) -> tuple[Array, Any]:
        """Prefill (``one=False``) or one step under a dynamic rope scaling: frequencies of the
        current length ``position + T``; the cache keeps keys before RoPE and they are rotated at
        their absolute positions with the current frequencies for this call."""
        t = self.transform
        if not isinstance(state, za.KVCache):
            raise ValueError(f"rope_scaling with dynamic=True decodes on a KV cache (softmax family); "
                             f"transform {t.name!r} has state {type(state).__name__}")
        length = x.shape[1]
        positions = positions_from(position, length)
        pos0 = jnp.asarray(position, jnp.int32)
        inv = self.inv_freq(pos0 + length)
        q = self._query(x, positions, inv)
        k_raw, v = self._keys_values(x, positions, None)
        k = apply_rope(k_raw, positions, inv_freq=inv)
        cached = state._replace(k=apply_rope(state.k, state.pos + (pos0 - state.length)[..., None], inv_freq=inv))
        opts = self.options()
        if one:
            y, _ = t.step(cached, q[:, 0], k[:, 0], v[:, 0], **opts)
            y = y[:, None]
        else:
            y, _ = t.prefill(cached, q, k, v, **opts)
        new = kv_write(state, k_raw, v, num_sink_tokens=opts.get("num_sink_tokens") or 0)
        return y, new

    def _output(self, x: Array, y: Array) -> Array:
        """Gate and output projection: ``y [B, T, H, D]`` -> ``[B, T, E_out]``."""
        dt = self.dtype or x.dtype
        y = y.astype(dt)
        if self.output_gate:
            g = jnp.einsum("bte,ehd->bthd", x.astype(dt), self.kernel("gate_proj").astype(dt))
            y = y * jax.nn.sigmoid(g)
        out = jnp.einsum("bthd,hde->bte", y, self.kernel("o_proj").astype(dt))
        if self.use_bias:
            out = out + self.o_bias[...].astype(dt)
        return cast(out, self.dtype)

    # ------------------------------------------------------------------ forms

    def __call__(
        self, x: Array, context: Array | None = None, *, causal: bool = True, mask: Array | None = None,
    ) -> Array:
        """Parallel form: ``x [B, T, E]`` -> ``[B, T, E_out]``.

        ``context [B, S, E_kv]``: cross-attention (keys/values from ``context``; with
        ``causal=True`` query ``i`` sees context positions ``j <= i``, which needs ``S == T``).
        ``mask``: bool key-padding mask ``[B, S]`` (True = real token) or a mask broadcastable
        to ``[B, H, T, S]`` (True = visible), for transforms that take ``mask``.
        """
        check_input("x", x, self.in_features)
        t = self.transform
        t.check_causal(causal)
        positions = jnp.arange(x.shape[1])
        length = x.shape[1] if context is None else max(x.shape[1], context.shape[1])
        inv = self.inv_freq(length)
        if context is None:
            if self.in_kv_features != self.in_features:
                raise ValueError(
                    f"context: in_kv_features={self.in_kv_features} != in_features={self.in_features}, "
                    "so this module needs a context (cross-attention)"
                )
            q, k, v = self._project(x, positions, inv)
        else:
            check_input("context", context, self.in_kv_features)
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch {context.shape[0]} != x batch {x.shape[0]}")
            if causal and context.shape[1] != x.shape[1]:
                raise ValueError(
                    f"context: causal cross-attention (query i sees context positions j <= i) needs the context "
                    f"length ({context.shape[1]}) to equal x's ({x.shape[1]}); pass causal=False for full "
                    "cross-attention"
                )
            q = self._query(x, positions, inv)
            k, v = self._keys_values(context, jnp.arange(context.shape[1]), inv)
        opts = self.options()
        if mask is not None:
            if "mask" not in t.option_names:
                raise ValueError(f"mask: transform {t.name!r} takes no mask")
            mask = jnp.asarray(mask, bool)
            opts["mask"] = mask[:, None, None, :] if mask.ndim == 2 else mask
        y = t.fn(q, k, v, causal=causal, **opts)
        if capturing(self) and t.linear_in_v:
            # Diagnostics, only under ``nnx.capture(model, nnx.Intermediate)``: outputs unchanged.
            w = attention_weights(lambda q, k, v: t.fn(q, k, v, causal=causal, **opts), q, k)
            self.sow(nnx.Intermediate, "attention_entropy", attention_entropy(w))
            if context is None:
                self.sow(nnx.Intermediate, "sink_scores", sink_scores(w))
        return self._output(x, y)

    def init_state(self, batch: int, max_len: int, dtype: Any = None) -> Any:
        """The transform's empty decoding state for ``batch`` sequences of up to ``max_len`` tokens
        (``Transform.init_state``; a KV cache holds ``max_len`` tokens, or ``window`` for a sliding
        window) in ``dtype`` (default: the compute dtype, else float32).

        Raises a ValueError when an option of ``Transform.step_exact`` was not given explicitly
        (decoding would differ from the parallel form)."""
        t = self.transform
        missing = sorted(set(t.step_exact) - set(self._explicit_options))
        if missing:
            example = " (e.g. transform_kwargs={'bias': -math.log(max_len)})" if missing == ["bias"] else ""
            raise ValueError(
                f"transform {t.name!r} decodes exactly as its parallel form only when "
                f"{', '.join(map(repr, missing))} is given explicitly (its parallel default depends on the "
                f"key count): set it in transform_kwargs{example}"
            )
        dt = dtype or self.dtype or jnp.float32
        return t.init_state(batch, self.num_heads, self.head_dim, self.head_dim, kv_heads=self.num_kv_heads,
                            max_len=max_len, dtype=dt, **self.options())

    def prefill(self, x: Array, state: Any, position: Any = 0) -> tuple[Array, Any]:
        """A prompt ``x [B, T, E]`` at absolute positions ``position .. position + T - 1``
        (``position`` a scalar or ``[B]``) in one parallel call of ``Transform.prefill``:
        ``(y [B, T, E_out], state)``, equal to ``T`` calls of :meth:`decode_step`."""
        check_input("x", x, self.in_features)
        t = self.transform
        positions = positions_from(position, x.shape[1])
        check_kv_capacity(state, x.shape[1], position, streaming=self._streaming(), what="prefill")
        if self._dynamic_rope():
            y, state = self._decode_dynamic(x, state, position, one=False)
            return self._output(x, y), state
        q, k, v = self._project(x, positions, self.inv_freq())
        y, state = t.prefill(state, q, k, v, **self.options())
        return self._output(x, y), state

    def decode_step(self, x_t: Array, state: Any, position: Any) -> tuple[Array, Any]:
        """One token: ``x_t [B, E]`` at absolute ``position`` (scalar or ``[B]``) ->
        ``(y_t [B, E_out], state)``; equal to the causal parallel form at that position."""
        check_input("x_t", x_t, self.in_features, rank=2)
        t = self.transform
        positions = positions_from(position, 1)
        check_kv_capacity(state, 1, position, streaming=self._streaming(), what="decode_step")
        x = x_t[:, None]
        if self._dynamic_rope():
            y, state = self._decode_dynamic(x, state, position, one=True)
            return self._output(x, y)[:, 0], state
        q, k, v = self._project(x, positions, self.inv_freq())
        y, state = t.step(state, q[:, 0], k[:, 0], v[:, 0], **self.options())
        return self._output(x, y[:, None])[:, 0], state


# ----------------------------------------------------------------------------- mixer registry

# Model-level defaults that build_mixer passes to a factory naming them.
MODEL_DEFAULTS = ("num_heads", "num_kv_heads", "head_dim", "rope", "rope_scaling", "dtype", "param_dtype")
# MultiHeadAttention arguments a mixer spec may set (every other key is a transform option).
MHA_ARGUMENTS = frozenset({
    "num_heads", "qkv_features", "out_features", "num_kv_heads", "in_kv_features", "transform", "transform_kwargs",
    "head_dim", "qk_norm", "rope", "rope_theta", "rope_scaling", "output_gate", "use_bias", "sink", "tie_feature_map",
    "sigma_reparam", "dtype", "param_dtype",
})


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    """A registered layer mixer: its factory, the keywords it names (read once, at registration),
    whether it takes ``**kwargs`` and a one-line description."""

    name: str
    factory: Callable[..., nnx.Module]
    keywords: frozenset[str]
    any_keyword: bool
    description: str


_MIXERS: dict[str, MixerEntry] = {}


def register_mixer(
    name: str, factory: Callable[..., nnx.Module], *, description: str = "", overwrite: bool = False,
) -> Callable:
    """Registers a layer mixer ``factory(d_model, *, rngs, **kw) -> nnx.Module`` under ``name``.

    The module offers the mixer contract (module docstring): ``__call__(x, *, causal=True)``,
    ``init_state(batch, max_len)``, ``prefill(x, state, position=0)`` and
    ``decode_step(x_t, state, position)``. ``name`` must not be a ``zoo.attention`` transform
    name (those always mean :class:`MultiHeadAttention`). Model-level defaults
    (:data:`MODEL_DEFAULTS`) are passed when the factory names them as parameters.
    ``description``: what the layer is and how it differs from the transform of the same
    mechanism inside ``MultiHeadAttention`` (default: the factory's docstring's first line).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"mixer name must be a non-empty string; got {name!r}")
    if name in za.names():
        raise ValueError(
            f"mixer name {name!r} is a zoo.attention transform name, which always means "
            f"MultiHeadAttention(transform={name!r}); register the layer under another name"
        )
    if name in _MIXERS and not overwrite:
        raise ValueError(f"mixer {name!r} is already registered")
    if not callable(factory):
        raise ValueError(f"factory must be callable; got {factory!r}")
    keywords, any_kw = keyword_params(factory)
    if "rngs" not in keywords and not any_kw:
        raise ValueError(f"factory for mixer {name!r} must take rngs as a keyword: factory(d_model, *, rngs, **kw)")
    if not description:
        description = (inspect.getdoc(factory) or "").strip().split("\n")[0]
    _MIXERS[name] = MixerEntry(name, factory, keywords, any_kw, description)
    return factory


MIXER_KINDS = ("transform", "layer")


def mixer_names(kind: str | None = None) -> list[str]:
    """Sorted names a mixer spec may use: every ``zoo.attention`` transform name
    (``kind="transform"``: ``MultiHeadAttention(transform=name)``) and every registered layer
    (``kind="layer"``, ``"attention"`` included); both kinds when ``kind`` is None."""
    if kind is not None and kind not in MIXER_KINDS:
        raise ValueError(f"kind must be None or one of {MIXER_KINDS}; got {kind!r}")
    out = set()
    if kind in (None, "transform"):
        out |= set(za.names())
    if kind in (None, "layer"):
        out |= set(_MIXERS)
    return sorted(out)


def _entry(name: str) -> MixerEntry:
    if name in za.names() and name in _MIXERS:
        raise ValueError(f"mixer name {name!r} is both a transform and a registered layer; rename the layer")
    if name in za.names():
        return _MIXERS["attention"]
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid: {', '.join(mixer_names())}")
    return _MIXERS[name]


def get_mixer(name: str) -> Callable[..., nnx.Module]:
    """The factory ``factory(d_model, *, rngs, **kw)`` of mixer ``name`` (for a transform name:
    :func:`attention_mixer` with that transform)."""
    entry = _entry(name)
    return functools.partial(entry.factory, transform=name) if name in za.names() else entry.factory


def describe_mixer(name: str) -> str:
    """One line saying what mixer ``name`` builds."""
    entry = _entry(name)
    if name in za.names():
        return f"MultiHeadAttention(transform={name!r}): {za.get(name).description}"
    return entry.description


def split_attention_kwargs(kw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kw`` of an attention mixer spec -> (MultiHeadAttention arguments, transform options);
    ``transform_kwargs`` is merged into the options."""
    mha, opts = {}, {}
    for k, v in kw.items():
        (mha if k in MHA_ARGUMENTS else opts)[k] = v
    extra = mha.pop("transform_kwargs", None) or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"transform_kwargs must be a dict; got {extra!r}")
    return mha, {**dict(extra), **opts}


def attention_mixer(
    d_model: int, *, rngs: nnx.Rngs, num_heads: int, transform: Any = "softmax",
    transform_kwargs: Mapping[str, Any] | None = None, num_kv_heads: int | None = None,
    head_dim: int | None = None, rope: bool | float = False, rope_scaling: Any = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> MultiHeadAttention:
    """Factory of :class:`MultiHeadAttention` (mixer ``"attention"`` and every transform name):
    keywords that are not constructor arguments are transform options
    (``{"transform": "sliding_window", "window": 8}``)."""
    mha, opts = split_attention_kwargs({**kw, "transform_kwargs": transform_kwargs})
    return MultiHeadAttention(
        num_heads, d_model, num_kv_heads=num_kv_heads, transform=transform, transform_kwargs=opts,
        head_dim=head_dim, rope=rope, rope_scaling=rope_scaling, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        **mha,
    )


register_mixer(
    "attention", attention_mixer,
    description="MultiHeadAttention with transform= (default softmax) and MultiHeadAttention arguments",
)


def check_mixer_spec(spec: Any, *, name: str = "mixers") -> dict[str, Any]:
    """Validates one mixer spec without building it; returns it normalised as
    ``{"module": layer_name, **kwargs}`` (``{"module": "attention", "transform": ..., **kwargs}``
    for attention). Raises a ValueError starting with ``name`` (the config key) otherwise.

    ``spec``: a mixer name (:func:`mixer_names`), a ``Transform`` or callable (attention), or a
    dict ``{"transform": name_or_transform, **kw}`` / ``{"module": name, **kw}``. For attention,
    ``kw`` are :class:`MultiHeadAttention` arguments (:data:`MHA_ARGUMENTS`) or transform options,
    which are checked against the transform (a typo is an error here); for a layer whose factory
    takes no ``**kwargs``, ``kw`` must be names it takes.
    """
    if isinstance(spec, str):
        spec = {"module": spec}
    elif isinstance(spec, za.Transform) or (callable(spec) and not isinstance(spec, Mapping)):
        spec = {"module": "attention", "transform": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{name}: a mixer must be a name, a Transform or a dict; got {spec!r}")
    kw = dict(spec)
    if "module" in kw:
        mod = kw.pop("module")
        if not isinstance(mod, str):
            raise ValueError(f"{name}: module must be a mixer name; got {mod!r}")
        if mod in za.names():
            if "transform" in kw:
                raise ValueError(f"{name}: module={mod!r} is a transform; give 'transform' or 'module', not both")
            kw["transform"] = mod
            mod = "attention"
    elif "transform" in kw:
        mod = "attention"
    else:
        raise ValueError(f"{name}: a mixer dict needs a 'transform' or a 'module' key; got {spec!r}")
    try:
        entry = _entry(mod)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if entry.name == "attention":
        try:
            t = resolve_transform(kw.get("transform", "softmax"))
            _, opts = split_attention_kwargs(kw)
            managed = sorted(set(opts) & _MODULE_OPTIONS)
            if managed:
                raise ValueError(f"{', '.join(map(repr, managed))} cannot be set in a mixer spec (passed per call)")
            t.check_options(opts, what="transform options")
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    elif not entry.any_keyword:
        bad = sorted(set(kw) - entry.keywords - {"rngs"})
        if bad:
            raise ValueError(
                f"{name}: mixer {mod!r} takes no argument {', '.join(map(repr, bad))}; valid: "
                f"{', '.join(sorted(entry.keywords - {'rngs'}))}"
            )
    return {"module": entry.name, **kw}


def build_mixer(spec: Any, d_model: int, *, rngs: nnx.Rngs, name: str = "mixers", **defaults: Any) -> nnx.Module:
    """Builds one token mixer from a spec (:func:`check_mixer_spec`): ``defaults`` (model-level
    ``num_heads``, ``dtype``, ...) are used where the spec does not set them and the factory names
    them. ``name`` names the argument in error messages."""
    kw = check_mixer_spec(spec, name=name)
    entry = _MIXERS[kw.pop("module")]
    for k, v in defaults.items():
        if k not in kw and k in entry.keywords:
            kw[k] = v
    return entry.factory(d_model, rngs=rngs, **kw)
