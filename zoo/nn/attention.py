"""Multi-head attention around any ``zoo.attention`` transform, and the mixer registry.

:class:`MultiHeadAttention` owns the parameters (q/k/v/o projections, optional biases, q/k
RMS norms, output gate, per-head sink logits, learnable feature maps) and calls a pure transform
from :mod:`zoo.attention`: the parallel form for training and the transform's
``init_state`` / ``step`` for decoding, with rotary embeddings at absolute positions in both.

The mixer registry lets models address token mixers by name: ``register_mixer(name, factory)``
with ``factory(d_model, rngs, **kw) -> nnx.Module`` whose module offers
``__call__(x, *, causal=True)``, ``init_state(batch, max_len)`` and
``decode_step(x_t, state, position) -> (y_t, state)``. ``"attention"`` (this module) is
registered; :func:`build_mixer` turns a model's per-layer mixer spec into a module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo.attention as za
from zoo.attention import feature_maps as fmaps
from zoo.nn.diagnostics import attention_entropy, attention_weights, capturing, sink_scores
from zoo.nn.layers import RMSNorm, apply_rope, axes, cast, normal_init, param

# Transforms whose output is not a weighted sum of values (test-time memories): no attention
# weights to report under ``nnx.capture``.
NOT_LINEAR_IN_V = frozenset({"titans", "miras", "moneta", "yaad", "memora"})

Array = jax.Array

# Options of a parallel form that a one-token step never takes.
_PARALLEL_ONLY = frozenset({"chunk_size", "impl", "form", "initial_state", "return_state", "mask", "causal"})


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


def _params_of(fn: Callable) -> tuple[set[str], bool]:
    """Named parameters of ``fn`` and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD}
    var = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var


def _accepts(fn: Callable, name: str) -> bool:
    names, var = _params_of(fn)
    return name in names or var


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


class MultiHeadAttention(nnx.Module):
    """Multi-head (grouped-query) attention whose core is a ``zoo.attention`` transform.

    ``q = x W_q [B, T, H, D]``, ``k = x W_k``, ``v = x W_v [B, T, Hkv, D]`` (optionally RMS-normed
    per head, "QK-norm", and rotated by RoPE at absolute positions), ``y = transform(q, k, v)``,
    optionally gated ``y * sigmoid(x W_g)`` (gated attention, Qiu et al. 2025), and
    ``out = y W_o [B, T, E]``.

    Args:
      in_features: model width ``E``.
      num_heads: query heads ``H``; num_kv_heads: k/v heads (default ``H``; must divide ``H``).
      transform: a ``zoo.attention`` registry name, a ``Transform`` or a callable
        ``fn(q, k, v, causal=..., **kw)`` (no decoding for a bare callable).
      transform_kwargs: options passed to both the parallel form and ``step`` (e.g. ``window``,
        ``feature_map``, ``decay``); options only a parallel form takes (``chunk_size``,
        ``impl``, ``form``) are not passed to ``step``. Array options are kept as non-trainable
        :class:`Constant` variables.
      head_dim: ``D`` (default ``E // H``, which then must divide).
      qk_norm: RMS-normalise q and k over ``head_dim`` (learned scale) before RoPE.
      rope: ``True`` (base 10000) or a float base: rotary embeddings on q and k.
      output_gate: sigmoid gate on the attention output per head and channel.
      use_bias: biases on the projections.
      sink: a learned per-head sink logit (zeros at init) passed as ``sink_logit`` (softmax family).
      tie_feature_map: with a learnable feature map (``feature_map="hedgehog"``), share one map
        between q and k instead of one each.
      dtype: compute dtype (default: the input's); param_dtype: parameter dtype.

    Learnable feature maps: when the options name a learnable map (``hedgehog``,
    ``hedgehog_lolcats``) and give no ``feature_map_params``, per-head identity-initialised weights
    ``[H, D, D]`` and biases ``[H, D]`` (``feature_maps.hedgehog_init``) are created as
    ``nnx.Param`` s; :meth:`feature_map_params` returns what is passed to the transform
    (override it to provide other parameters).

    Decoding: :meth:`init_state` and :meth:`decode_step`. The softmax family decodes on a KV cache
    (``capacity = max_len``, or ``window`` for a sliding window: a ring buffer); note that
    ``sigmoid``'s default bias is ``-log(length)`` in the parallel form and ``-log(capacity)`` in
    ``step`` (pass ``transform_kwargs={"bias": b}`` to fix it).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        transform: str | za.Transform | Callable = "softmax",
        transform_kwargs: Mapping[str, Any] | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        rope: bool | float = False,
        rope_theta: float = 10_000.0,
        output_gate: bool = False,
        use_bias: bool = False,
        sink: bool = False,
        tie_feature_map: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, n in (("in_features", in_features), ("num_heads", num_heads)):
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"{name} must be a positive int; got {n!r}")
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(
                    f"num_heads ({num_heads}) must divide in_features ({in_features}) when head_dim is not given"
                )
            head_dim = in_features // num_heads
        elif not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
        kvh = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(kvh, int) or kvh <= 0 or num_heads % kvh:
            raise ValueError(f"num_kv_heads ({num_kv_heads!r}) must be a positive int dividing num_heads ({num_heads})")
        if rope is not False and rope is not None and not isinstance(rope, bool):
            rope_theta, rope = float(rope), True
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim; got {head_dim}")

        t = resolve_transform(transform)
        self._transform_ref: str | _Static = transform if isinstance(transform, str) else _Static(t)
        self.transform_name = t.name
        kw = {**t.defaults, **dict(transform_kwargs or {})}
        if "causal" in kw:
            raise ValueError("transform_kwargs must not set 'causal' (it is an argument of __call__)")
        if sink and not _accepts(t.fn, "sink_logit"):
            raise ValueError(f"sink=True needs a transform that takes sink_logit (softmax family); got {t.name!r}")

        self.in_features, self.num_heads, self.num_kv_heads, self.head_dim = in_features, num_heads, kvh, head_dim
        self.qk_norm, self.rope, self.rope_theta = qk_norm, bool(rope), float(rope_theta)
        self.output_gate, self.use_bias, self.sink, self.dtype = output_gate, use_bias, sink, dtype
        self.tie_feature_map = tie_feature_map

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

        e, h, d, pd = in_features, num_heads, head_dim, param_dtype
        self.q_proj = param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, normal_init(e), (e, kvh, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, normal_init(e), (e, kvh, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, normal_init(h * d), (h, d, e), ("heads", "head_dim", "embed"), pd)
        if use_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (h, d), ("heads", "head_dim"), pd)
            self.k_bias = param(rngs, zeros, (kvh, d), ("kv_heads", "head_dim"), pd)
            self.v_bias = param(rngs, zeros, (kvh, d), ("kv_heads", "head_dim"), pd)
            self.o_bias = param(rngs, zeros, (e,), ("embed",), pd)
        if output_gate:
            self.gate_proj = param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd)
        if qk_norm:
            self.q_norm = RMSNorm(d, dtype=dtype, param_dtype=pd, axis_name="head_dim", rngs=rngs)
            self.k_norm = RMSNorm(d, dtype=dtype, param_dtype=pd, axis_name="head_dim", rngs=rngs)
        if sink:
            self.sink_logit = param(rngs, nnx.initializers.zeros, (h,), ("heads",), pd)

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

    def options(self, *, for_step: bool = False) -> dict[str, Any]:
        """The keyword options of the transform call (``for_step``: of its ``step``)."""
        opts = {k: (v.value if isinstance(v, _Static) else v) for k, v in self._static_options}
        opts.update({k: v[...] for k, v in self.transform_arrays.items() if not k.startswith("__")})
        fmp = self.feature_map_params()
        if fmp is not None:
            opts["feature_map_params"] = fmp
        if self.sink:
            opts["sink_logit"] = self.sink_logit[...].astype(jnp.float32)
        if for_step:
            opts = self.transform.step_options(opts)
        return opts

    def _project(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """``x [B, T, E]`` -> q ``[B, T, H, D]``, k, v ``[B, T, Hkv, D]`` (norms and RoPE applied)."""
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bte,ehd->bthd", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bte,ehd->bthd", x, self.v_proj[...].astype(dt))
        if self.use_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        return q, k, v

    def _output(self, x: Array, y: Array) -> Array:
        """Gate and output projection: ``y [B, T, H, D]`` -> ``[B, T, E]``."""
        dt = self.dtype or x.dtype
        y = y.astype(dt)
        if self.output_gate:
            g = jnp.einsum("bte,ehd->bthd", x.astype(dt), self.gate_proj[...].astype(dt))
            y = y * jax.nn.sigmoid(g)
        out = jnp.einsum("bthd,hde->bte", y, self.o_proj[...].astype(dt))
        if self.use_bias:
            out = out + self.o_bias[...].astype(dt)
        return out

    # ------------------------------------------------------------------ forms

    def __call__(self, x: Array, *, causal: bool = True, mask: Array | None = None) -> Array:
        """Parallel form: ``x [B, T, E]`` -> ``[B, T, E]``.

        ``mask``: bool key-padding mask ``[B, T]`` (True = real token) or a mask broadcastable to
        ``[B, H, T, T]`` (True = visible), for transforms that take ``mask``.
        """
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [batch, length, {self.in_features}]; got shape {x.shape}")
        t = self.transform
        if t.causal_only and not causal:
            raise ValueError(f"transform {t.name!r} is causal only; got causal=False")
        opts = self.options()
        if mask is not None:
            if not _accepts(t.fn, "mask"):
                raise ValueError(f"mask: transform {t.name!r} takes no mask")
            mask = jnp.asarray(mask, bool)
            opts["mask"] = mask[:, None, None, :] if mask.ndim == 2 else mask
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        y = t.fn(q, k, v, causal=causal, **opts)
        if capturing(self) and t.name not in NOT_LINEAR_IN_V:
            # Diagnostics, only under ``nnx.capture(model, nnx.Intermediate)``: outputs unchanged.
            w = attention_weights(lambda q, k, v: t.fn(q, k, v, causal=causal, **opts), q, k)
            self.sow(nnx.Intermediate, "attention_entropy", attention_entropy(w))
            if w.shape[-1] == w.shape[-2]:
                self.sow(nnx.Intermediate, "sink_scores", sink_scores(w))
        return cast(self._output(x, y), self.dtype)

    def init_state(self, batch: int, max_len: int, dtype: Any = None) -> Any:
        """Empty decoding state of the transform for ``batch`` sequences of up to ``max_len`` tokens.

        Softmax family (``init_state`` with a ``capacity``): a ``KVCache`` of ``max_len`` slots (or
        ``window`` slots, a ring buffer, for a sliding window) in ``dtype`` (default: the compute
        dtype, else float32). Others: ``init_state(batch, heads, head_dim, value_dim, **opts)``
        with the options its signature names (``feature_map``, ``feature_map_params``, ...).
        """
        t = self.transform
        dt = dtype or self.dtype or jnp.float32
        return t.init_state(batch, self.num_heads, self.head_dim, self.head_dim, kv_heads=self.num_kv_heads,
                            max_len=max_len, dtype=dt, **self.options())

    def decode_step(self, x_t: Array, state: Any, position: Array | int) -> tuple[Array, Any]:
        """One token: ``x_t [B, E]`` at absolute ``position`` (scalar or ``[B]``) ->
        ``(y_t [B, E], state)``; equal to the causal parallel form at that position."""
        t = self.transform
        pos = jnp.asarray(position, jnp.int32)
        pos = pos[None] if pos.ndim == 0 else pos[:, None]
        x = x_t[:, None]
        q, k, v = self._project(x, pos)
        y, state = t.step(state, q[:, 0], k[:, 0], v[:, 0], **self.options())
        return cast(self._output(x, y[:, None]), self.dtype)[:, 0], state


# ----------------------------------------------------------------------------- mixer registry

_MIXERS: dict[str, Callable[..., nnx.Module]] = {}


def register_mixer(name: str, factory: Callable[..., nnx.Module], *, overwrite: bool = False) -> Callable:
    """Registers a token-mixer factory ``factory(d_model, rngs, **kw) -> nnx.Module``.

    The module must offer ``__call__(x [B, T, E], *, causal=True) -> [B, T, E]``,
    ``init_state(batch, max_len)`` and ``decode_step(x_t [B, E], state, position) -> (y_t, state)``.
    Model-level defaults (``num_heads``, ``num_kv_heads``, ``head_dim``, ``rope``, ``dtype``,
    ``param_dtype``) are passed when the factory names them as parameters.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"mixer name must be a non-empty string; got {name!r}")
    if name in _MIXERS and not overwrite:
        raise ValueError(f"mixer {name!r} is already registered")
    _MIXERS[name] = factory
    return factory


def mixer_names() -> list[str]:
    """Sorted names of the registered mixer modules."""
    return sorted(_MIXERS)


def get_mixer(name: str) -> Callable[..., nnx.Module]:
    """The factory registered as ``name``."""
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer module {name!r}; valid names: {', '.join(mixer_names())}")
    return _MIXERS[name]


_MHA_ARGS = frozenset(inspect.signature(MultiHeadAttention.__init__).parameters) - {"self", "in_features", "rngs"}


def attention_mixer(
    d_model: int, rngs: nnx.Rngs, *, num_heads: int, transform: Any = "softmax",
    transform_kwargs: Mapping[str, Any] | None = None, num_kv_heads: int | None = None,
    head_dim: int | None = None, rope: bool | float = False, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> MultiHeadAttention:
    """Factory of :class:`MultiHeadAttention` (mixer ``"attention"``): keywords that are not
    constructor arguments are transform options (``{"transform": "sliding_window", "window": 8}``)."""
    tkw = dict(transform_kwargs or {})
    mha = {}
    for k, v in kw.items():
        (mha if k in _MHA_ARGS else tkw)[k] = v
    return MultiHeadAttention(
        d_model, num_heads, transform=transform, transform_kwargs=tkw, num_kv_heads=num_kv_heads,
        head_dim=head_dim, rope=rope, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **mha,
    )


register_mixer("attention", attention_mixer)


def build_mixer(spec: Any, d_model: int, *, rngs: nnx.Rngs, name: str = "mixers", **defaults: Any) -> nnx.Module:
    """Builds one token mixer from a spec.

    ``spec``: a ``zoo.attention`` registry name, a Transform or callable (all -> attention), a
    registered mixer name, or a dict ``{"transform": name, **kw}`` (attention; ``kw`` are
    :class:`MultiHeadAttention` arguments or transform options) or ``{"module": name, **kw}`` (a
    registered mixer). ``defaults`` (model-level ``num_heads``, ``dtype``, ...) are used where the
    spec does not set them. ``name`` names the argument in error messages.
    """
    if isinstance(spec, str):
        if spec in za.names():
            spec = {"transform": spec}
        elif spec in _MIXERS:
            spec = {"module": spec}
        else:
            raise ValueError(
                f"{name}: unknown mixer {spec!r}; valid: attention transforms {', '.join(za.names())} "
                f"or mixer modules {', '.join(mixer_names())}"
            )
    elif isinstance(spec, za.Transform) or callable(spec):
        spec = {"transform": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{name}: a mixer must be a name, a Transform or a dict; got {spec!r}")
    kw = dict(spec)
    if "module" in kw:  # other keys (a "transform" too) are the factory's arguments
        mod = kw.pop("module")
        if not isinstance(mod, str) or mod not in _MIXERS:
            raise ValueError(f"{name}: unknown mixer module {mod!r}; valid: {', '.join(mixer_names())}")
        factory = _MIXERS[mod]
    elif "transform" in kw:
        tr = kw["transform"]
        if isinstance(tr, str) and tr not in za.names():
            raise ValueError(f"{name}: unknown attention transform {tr!r}; valid: {', '.join(za.names())}")
        factory = attention_mixer
    else:
        raise ValueError(f"{name}: a mixer dict needs a 'transform' or a 'module' key; got {spec!r}")
    names, _ = _params_of(factory)
    for k, v in defaults.items():
        if k not in kw and k in names:
            kw[k] = v
    return factory(d_model, rngs=rngs, **kw)
