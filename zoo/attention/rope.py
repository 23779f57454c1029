"""Rotary position embeddings (RoPE) and their length-extrapolation scalings, as pure functions.

RoPE (Su et al. 2021, "RoFormer") in the split-half (GPT-NeoX / HF Llama) layout: the pair
``(x_i, x_{i + D/2})`` of a head vector at position ``m`` is rotated by the angle ``m theta_i``,
``theta_i = b^(-2i/D)``, ``i < D/2`` (``b`` = ``theta``, default 10000). Then
``rope(q, m) . rope(k, n)`` depends only on ``m - n`` for *any* inverse frequencies ``theta_i``,
which is why every scaling below is a change of ``theta_i`` (plus, for some, a logit scale).

:func:`rope_frequencies` ``(head_dim, *, theta, scaling) -> (inv_freq [D/2], logit_scale)`` and
:func:`apply_rope` ``(x, positions, inv_freq)`` (a pure rotation). ``scaling`` is a dict or a
:class:`RopeScaling` with ``kind`` one of :data:`KINDS` (``s`` = ``factor``, ``L`` =
``original_max_len``, the training length):

- ``"linear"``: position interpolation (Chen et al. 2023, "Extending Context Window of LLMs via
  Positional Interpolation"): ``theta_i / s`` (positions ``m -> m / s``).
- ``"ntk"``: NTK-aware base change (bloc97 2023, no paper; code jquesnelle/yarn @995db5b5
  ``LlamaNTKScaledRotaryEmbedding``): ``b' = b s^(D/(D-2))``, so ``theta_0`` is unchanged and
  ``theta_{D/2-1}`` is divided by exactly ``s``. ``dynamic=True`` (``LlamaDynamicScaled-
  RotaryEmbedding``, HF ``_compute_dynamic_ntk_parameters``): ``b' = b (s n/L - (s - 1))^(D/(D-2))``
  with ``n = max(current length, L)``: recomputed from the current length ``length``.
- ``"yarn"``: YaRN (Peng, Quesnelle, Fan, Shippole, ICLR 2024; code jquesnelle/yarn @995db5b5
  ``LlamaYaRNScaledRotaryEmbedding``, HF ``_compute_yarn_parameters``): NTK-by-parts,
  ``theta'_i = (theta_i / s) r_i + theta_i (1 - r_i)``, ``r_i = clip((i - lo) / (hi - lo), 0, 1)``,
  ``lo = max(floor(c(beta_fast)), 0)``, ``hi = min(ceil(c(beta_slow)), D - 1)``,
  ``c(r) = D ln(L / (2 pi r)) / (2 ln b)`` (defaults ``beta_fast=32``, ``beta_slow=1``);
  attention temperature ``sqrt(1/t) = mscale = 0.1 ln s + 1`` (1 for ``s <= 1``): the code
  multiplies cos and sin of q *and* k by ``mscale``, so the logits scale by ``mscale^2``, which is
  the returned ``logit_scale``.
- ``"abf"``: adjusted base frequency (Xiong et al. 2023, "Effective Long-Context Scaling of
  Foundation Models"): ``b -> base`` (default 500000); ``factor`` is unused.
- ``"entropy_abf"``: ABF with base 500000 plus the entropy-aware dynamic attention scalar of
  "Extending LLMs' Context Window with 100 Samples" (Zhang et al. 2024; code GAIR-NLP/Entropy-ABF
  @a5e91077 ``patch/EABF.py``: ``apply_rotary_pos_emb_scale``): the query at 0-based position
  ``m`` is multiplied by ``max(1, ln(m + 1) / ln L)`` (the code hard-codes ``L = 4096``, Llama-2's
  length). That factor depends on the position, so it is not in ``logit_scale``: it is
  :func:`logn_scale` ``(m + 1, L, "ratio")``, given by :func:`query_scale`.
- ``"clex"``: CLEX (Chen et al., ICLR 2024; code DAMO-NLP-SG/CLEX @023709d9 ``CLEX/clex_layer.py``):
  ``z(t) = log theta(t)`` follows the neural ODE
  ``dz/dt = act((z + log theta^N(t)) W_up) W_down + d log theta^N(t)/dt`` from ``z(1) = log theta``,
  with ``theta^N(t)`` the NTK frequencies at ``alpha = 2t - 1``; ``t = factor``. The ODE weights
  are passed in (``params``, :func:`clex_init`: ``W_down = 0``, so at init ``z(t)`` is exactly the
  NTK closed form ``log theta^N(t)``; with ``params=None`` that closed form is returned).
  :func:`clex_frequencies` solves it with fixed-step RK4 (differentiable, ``lax.scan``).
  ``dynamic=True``: ``t = clip(ceil(n / L), 1, max_factor)`` from the current length (the
  code's inference rule). Code defaults (``train/argument.py``): ``max_factor=16``,
  ``param_factor=1``, ``act="tanh"``, ``time_dt=0.01``.
- ``"giraffe"``: Giraffe (Pal et al. 2023; code abacusai/Long-Context @c2a90d1f
  ``python/models/interpolate.py``): linear ``theta_i / s``, then power
  ``theta_i (1 - i/(D/2))^power`` (``power > 0``; lowers low frequencies most, the last pair by
  ``(2/D)^power``, never to 0: ``i < D/2``), then
  the truncated basis (``truncate = T``, ``c = 2 pi / T``): ``theta_i`` kept if ``>= c``,
  ``c / 16`` if ``c/8 <= theta_i < c``, 0 (no rotation) if ``< c/8``. Code defaults
  ``power=0``, ``truncate=0`` (off). The code applies the scale only when ``s > 1``; here any
  ``s`` divides (the same for ``s >= 1``).

Every kind may add log-n query scaling (``logn="ratio"`` or ``"sqrt"``, see :func:`logn_scale`;
``entropy_abf`` uses ``"ratio"``). The logit scale is *returned*, never applied: multiply q by it
(or pass it into the softmax scale); putting ``sqrt(logit_scale)`` on the cos/sin of both q and
k, as the YaRN code does, is the same for a dot product only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo.attention.common import concrete

Array = jax.Array

KINDS = ("linear", "ntk", "yarn", "abf", "entropy_abf", "clex", "giraffe")
DYNAMIC_KINDS = ("ntk", "clex")
LOGN_KINDS = ("ratio", "sqrt")
CLEX_ACTS = ("tanh", "silu")
_NEEDS_LENGTH = ("yarn", "entropy_abf")


def _number(name: str, value: Any, *, lo: float | None = None, strict: bool = True, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value):
        if lo is None or (value > lo if strict else value >= lo):
            return float(value)
    rel = "" if lo is None else f" {'>' if strict else '>='} {lo}"
    raise ValueError(f"{name} must be a finite number{rel}{' or None' if allow_none else ''}; got {value!r}")


def _int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= minimum:
        return int(value)
    raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling (module docstring for the equations); frozen and hashable, so it can be a
    static option. A dict with the same keys is accepted everywhere (:func:`as_scaling`).

    Fields (papers' / reference code's defaults):
      kind: one of :data:`KINDS`.
      factor: ``s`` (> 0): the extension factor (``clex``: the ODE time ``t >= 1``).
      original_max_len: ``L``, the training length (needed by ``yarn``, ``entropy_abf``,
        ``logn`` and ``dynamic``).
      dynamic: recompute the scaling from the current length (``ntk``, ``clex``).
      logn: log-n query scaling, None, ``"ratio"`` or ``"sqrt"`` (:func:`logn_scale`); forced to
        ``"ratio"`` for ``entropy_abf``.
      beta_fast, beta_slow, attention_factor, extrapolation_factor: YaRN (32, 1, ``mscale`` =
        ``0.1 ln s + 1`` when None, 1).
      base: new base of ``abf`` / ``entropy_abf`` (500000).
      power, truncate: Giraffe (0 = off, None = off).
      max_factor, param_factor, time_dt, act: CLEX (16, 1, 0.01, ``"tanh"``).
    """

    kind: str
    factor: float = 1.0
    original_max_len: int | None = None
    dynamic: bool = False
    logn: str | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    extrapolation_factor: float = 1.0
    base: float = 500_000.0
    power: float = 0.0
    truncate: int | None = None
    max_factor: int = 16
    param_factor: int = 1
    time_dt: float = 0.01
    act: str = "tanh"

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.kind not in KINDS:
            raise ValueError(f"scaling kind must be one of {', '.join(map(repr, KINDS))}; got {self.kind!r}")
        put("factor", _number("scaling factor", self.factor, lo=0.0))
        put("original_max_len", _int("original_max_len", self.original_max_len, 2, allow_none=True))
        if not isinstance(self.dynamic, (bool, np.bool_)):
            raise ValueError(f"dynamic must be a bool; got {self.dynamic!r}")
        put("dynamic", bool(self.dynamic))
        if self.kind == "entropy_abf":
            put("logn", "ratio")
        if self.logn is not None and self.logn not in LOGN_KINDS:
            raise ValueError(f"logn must be None or one of {', '.join(map(repr, LOGN_KINDS))}; got {self.logn!r}")
        if self.dynamic and self.kind not in DYNAMIC_KINDS:
            raise ValueError(f"dynamic=True is supported for kinds {', '.join(map(repr, DYNAMIC_KINDS))}; "
                             f"got kind {self.kind!r}")
        if self.original_max_len is None and (self.kind in _NEEDS_LENGTH or self.dynamic or self.logn):
            what = "dynamic scaling" if self.dynamic else ("log-n scaling" if self.logn else f"kind {self.kind!r}")
            raise ValueError(f"original_max_len (the training length L, an integer >= 2) is needed by {what}")
        put("beta_fast", _number("beta_fast", self.beta_fast, lo=0.0))
        put("beta_slow", _number("beta_slow", self.beta_slow, lo=0.0))
        put("attention_factor", _number("attention_factor", self.attention_factor, lo=0.0, allow_none=True))
        put("extrapolation_factor", _number("extrapolation_factor", self.extrapolation_factor, lo=0.0, strict=False))
        put("base", _number("base", self.base, lo=1.0))
        put("power", _number("power", self.power, lo=0.0, strict=False))
        put("truncate", _int("truncate", self.truncate, 1, allow_none=True))
        put("max_factor", _int("max_factor", self.max_factor, 1))
        put("param_factor", _int("param_factor", self.param_factor, 1))
        put("time_dt", _number("time_dt", self.time_dt, lo=0.0))
        if self.act not in CLEX_ACTS:
            raise ValueError(f"act must be one of {', '.join(map(repr, CLEX_ACTS))}; got {self.act!r}")
        if self.kind == "clex" and self.factor < 1:
            raise ValueError(f"scaling factor of kind 'clex' is the ODE time t and must be >= 1; got {self.factor!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(RopeScaling))


def as_scaling(scaling: RopeScaling | Mapping[str, Any] | None) -> RopeScaling | None:
    """``scaling`` (None, a :class:`RopeScaling`, a dict with its keys or a config object with
    ``to_dict()``) -> RopeScaling or None;
    unknown keys, a missing ``kind`` or bad values are a ValueError naming them."""
    if scaling is None or isinstance(scaling, RopeScaling):
        return scaling
    if not isinstance(scaling, Mapping) and callable(getattr(scaling, "to_dict", None)):
        scaling = scaling.to_dict()  # an ml_collections.ConfigDict (a config's model.rope_scaling)
    if not isinstance(scaling, Mapping):
        raise ValueError(f"scaling must be None, a RopeScaling or a dict; got {scaling!r}")
    bad = sorted(set(scaling) - set(FIELDS))
    if bad:
        raise ValueError(f"scaling: unknown key(s) {', '.join(map(repr, bad))}; valid: {', '.join(FIELDS)}")
    if "kind" not in scaling:
        raise ValueError(f"scaling needs a 'kind', one of {', '.join(map(repr, KINDS))}")
    return RopeScaling(**scaling)


# ----------------------------------------------------------------------------- frequencies


def _head_dim(head_dim: Any) -> int:
    if not isinstance(head_dim, numbers.Integral) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim >= 2; got head_dim={head_dim!r}")
    return int(head_dim)


def _exponents(d: int) -> np.ndarray:
    """``2i / D`` for ``i < D/2`` (float64)."""
    return np.arange(0, d, 2, dtype=np.float64) / d


def yarn_ramp(head_dim: int, *, theta: float, original_max_len: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0) -> np.ndarray:
    """YaRN's ramp ``r_i`` ``[D/2]`` (float64): 0 for pairs with more than ``beta_fast`` rotations
    over ``L`` (kept), 1 for fewer than ``beta_slow`` (interpolated), linear between
    (``find_correction_range`` / ``linear_ramp_mask`` of jquesnelle/yarn @995db5b5)."""
    d = _head_dim(head_dim)

    def dim(rot: float) -> float:
        return d * math.log(original_max_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(dim(beta_fast)), 0)
    hi = min(math.ceil(dim(beta_slow)), d - 1)
    if lo == hi:
        hi += 0.001  # the reference's guard against a zero-width ramp
    return np.clip((np.arange(d // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def yarn_mscale(factor: float) -> float:
    """YaRN's ``mscale = 0.1 ln s + 1`` (1 for ``s <= 1``): ``sqrt(1/t)`` in the paper."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _logit_scale(s: RopeScaling | None) -> float:
    if s is None or s.kind != "yarn":
        return 1.0
    m = s.attention_factor if s.attention_factor is not None else yarn_mscale(s.factor)
    return float(m * m)


def _static(d: int, theta: float, s: RopeScaling | None) -> np.ndarray:
    e = _exponents(d)
    base = theta ** -e
    if s is None:
        return base
    if s.kind == "linear":
        return base / s.factor
    if s.kind == "ntk":
        _ntk_head_dim(d)
        return (theta * s.factor ** (d / (d - 2))) ** -e
    if s.kind == "clex":
        _ntk_head_dim(d)
        return (theta * (2 * s.factor - 1) ** (d / (d - 2))) ** -e
    if s.kind == "yarn":
        keep = (1 - yarn_ramp(d, theta=theta, original_max_len=s.original_max_len, beta_fast=s.beta_fast,
                              beta_slow=s.beta_slow)) * s.extrapolation_factor
        return base / s.factor * (1 - keep) + base * keep
    if s.kind in ("abf", "entropy_abf"):
        return s.base ** -e
    # giraffe
    f = base / s.factor
    if s.power > 0:
        f = f * (1.0 - np.arange(d // 2) / (d // 2)) ** s.power
    if s.truncate:
        c = 2 * math.pi / s.truncate
        f = np.where(f < c / 8, 0.0, np.where(f < c, c / 16, f))
    return f


def _ntk_head_dim(d: int) -> None:
    if d < 4:
        raise ValueError(f"NTK-style scaling (base * s^(D/(D-2))) needs head_dim >= 4; got head_dim={d}")


def rope_frequencies(
    head_dim: int, *, theta: float = 10_000.0, scaling: RopeScaling | Mapping[str, Any] | None = None,
    length: Any = None, params: Mapping[str, Array] | None = None,
) -> tuple[Array, float]:
    """Inverse frequencies and logit scale of (scaled) RoPE: ``(inv_freq, logit_scale)``.

    Args:
      head_dim: ``D`` (even).
      theta: the base ``b``: ``inv_freq_i = b^(-2i/D)`` without scaling.
      scaling: None, a :class:`RopeScaling` or a dict with its keys (module docstring).
      length: current sequence length ``n`` (int, or int array ``[batch]``), for
        ``dynamic=True`` only (None: ``L``, i.e. no extension); ignored otherwise.
      params: CLEX ODE weights (:func:`clex_init`); None: the closed form the ODE starts from.

    Returns:
      ``inv_freq``: float32 ``[D/2]`` (``[batch, D/2]`` for a dynamic scaling with ``length
      [batch]``); ``logit_scale``: a Python float (YaRN ``mscale^2``, else 1.0) by which the
      caller multiplies the logits (e.g. q). Position-dependent log-n factors: :func:`query_scale`.
    """
    d = _head_dim(head_dim)
    theta = _number("theta", theta, lo=1.0)
    s = as_scaling(scaling)
    if s is not None and s.dynamic:
        return _dynamic(d, theta, s, length, params), 1.0
    if s is not None and s.kind == "clex" and params is not None:
        return clex_frequencies(params, s.factor, d, theta=theta, time_dt=s.time_dt, act=s.act), 1.0
    return jnp.asarray(_static(d, theta, s), jnp.float32), _logit_scale(s)


def _dynamic(d: int, theta: float, s: RopeScaling, length: Any, params: Any) -> Array:
    L = s.original_max_len
    n = jnp.asarray(L if length is None else length)
    c = concrete(n)
    if not jnp.issubdtype(n.dtype, jnp.integer) or n.ndim > 1:
        raise ValueError(f"length must be an integer scalar or [batch] array; got {n.dtype} of shape {n.shape}")
    if c is not None and c.size and c.min() < 1:
        raise ValueError(f"length must be >= 1; got {c.min()}")
    _ntk_head_dim(d)
    e = jnp.asarray(_exponents(d), jnp.float32)
    if s.kind == "ntk":
        alpha = s.factor * jnp.maximum(n, L).astype(jnp.float32) / L - (s.factor - 1)
        log_base = math.log(theta) + d / (d - 2) * jnp.log(alpha)
        return jnp.exp(-log_base[..., None] * e)
    # clex: t = clip(ceil(n / L), 1, max_factor) (CLEXScalingRotaryEmbedding.forward at inference)
    t = jnp.clip((n + L - 1) // L, 1, s.max_factor)
    if params is None:
        log_base = math.log(theta) + d / (d - 2) * jnp.log(2.0 * t.astype(jnp.float32) - 1.0)
        return jnp.exp(-log_base[..., None] * e)
    grid = clex_frequency_grid(params, s.max_factor, d, theta=theta, time_dt=s.time_dt, act=s.act)
    return grid[t - 1]


def apply_rope(x: Array, positions: Any, inv_freq: Array) -> Array:
    """Rotates ``x [..., length, heads, head_dim]`` (layout ``[batch, length, heads, head_dim]``).

    ``positions``: ``[length]``, ``[batch, length]`` or a scalar (int or float: interpolated or
    randomised positions are allowed); ``inv_freq``: ``[head_dim/2]`` or ``[batch, head_dim/2]``
    (e.g. a dynamic scaling per sequence). The pair ``(x_i, x_{i+D/2})`` is rotated by
    ``pos * inv_freq_i`` (angles, cos and sin in float32), so ``rope(q, m) . rope(k, n)`` depends
    only on ``m - n``. Returns ``x``'s shape and dtype.
    """
    d = x.shape[-1]
    inv = jnp.asarray(inv_freq, jnp.float32)
    if d % 2 or inv.ndim not in (1, 2) or inv.shape[-1] * 2 != d:
        raise ValueError(f"inv_freq must be [head_dim/2] or [batch, head_dim/2] for x of head_dim {d}; "
                         f"got shape {inv.shape}")
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 0:
        pos = pos[None]
    if pos.ndim > 2:
        raise ValueError(f"positions must be a scalar, [length] or [batch, length]; got shape {pos.shape}")
    ang = pos[..., None] * (inv if inv.ndim == 1 else inv[:, None, :])  # [..., T, D/2]
    cos, sin = jnp.cos(ang)[..., None, :], jnp.sin(ang)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- log-n scaling


def logn_scale(length: Any, train_length: int, kind: str = "ratio", *, clamp: bool | None = None) -> Array:
    """Entropy-invariant logit factor for ``length`` keys (n >= 1) of a model trained at
    ``train_length`` (T >= 2); float32, ``length``'s shape.

    - ``kind="ratio"``: ``log_T n = ln n / ln T``, clamped below at 1 by default: Chiang & Cholak
      2022 ("Overcoming a Theoretical Limitation of Self-Attention", log-n scaled logits) as used
      by Entropy-ABF (Zhang et al. 2024, ``max(1, ln(m+1)/ln 4096)`` per query position ``m``)
      and by ``zoo.attention.softmax(logn_train_length=T)`` (``n`` = keys the query sees).
    - ``kind="sqrt"``: ``sqrt(log_T N)``, not clamped by default: Jin, Shen, Li, Xue, NeurIPS 2023
      ("Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis"),
      self-attention scale ``sqrt(log_T N) / sqrt(d)`` with ``N`` the layer's token count; for
      ``N < T`` it is < 1 (flatter attention), which the clamped log form never gives.

    ``clamp``: override the paper's choice (``max(1, .)``).
    """
    if kind not in LOGN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, LOGN_KINDS))}; got {kind!r}")
    t = _int("train_length", train_length, 2)
    c = concrete(length)
    if c is not None and c.size and c.min() < 1:
        raise ValueError(f"length must be >= 1 (a count of keys); got {c.min()}")
    n = jnp.maximum(jnp.asarray(length, jnp.float32), 1.0)
    f = jnp.log(n) / math.log(t)
    if kind == "sqrt":
        f = jnp.sqrt(f)
    if clamp if clamp is not None else kind == "ratio":
        f = jnp.maximum(f, 1.0)
    return f


def query_scale(positions: Any, scaling: RopeScaling | Mapping[str, Any] | None) -> Array | float:
    """Factor by which a causal decoder multiplies the query at 0-based ``positions``:
    ``logit_scale * logn_scale(positions + 1, L, scaling.logn)`` (the query at ``m`` sees
    ``m + 1`` keys; ``entropy_abf``: ``max(1, ln(m + 1) / ln L)`` as in its code). A float (no
    position dependence) or float32 ``positions``-shaped array."""
    s = as_scaling(scaling)
    ls = _logit_scale(s)
    if s is None or s.logn is None:
        return ls
    return ls * logn_scale(jnp.asarray(positions) + 1, s.original_max_len, s.logn)


# ----------------------------------------------------------------------------- CLEX


def clex_init(key: Array, head_dim: int, *, param_factor: int = 1, dtype: Any = jnp.float32) -> dict[str, Array]:
    """CLEX ODE weights as ``ODELinear.reset_parameters``: ``up [D/2, param_factor D]``
    Kaiming-uniform (``a = sqrt(5)``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, torch's fan_in =
    ``param_factor D``) and ``down [param_factor D, D/2]`` zeros (so the ODE starts as NTK)."""
    d = _head_dim(head_dim)
    f = _int("param_factor", param_factor, 1)
    bound = 1.0 / math.sqrt(f * d)
    return {"up": jax.random.uniform(key, (d // 2, f * d), dtype, -bound, bound),
            "down": jnp.zeros((f * d, d // 2), dtype)}


def _check_clex_params(params: Any, d: int) -> tuple[Array, Array]:
    if not isinstance(params, Mapping) or set(params) != {"up", "down"}:
        raise ValueError(f"params must be a dict with keys 'up' and 'down' (clex_init); got {params!r}")
    up, down = jnp.asarray(params["up"], jnp.float32), jnp.asarray(params["down"], jnp.float32)
    if up.ndim != 2 or up.shape[0] != d // 2 or down.shape != (up.shape[1], d // 2):
        raise ValueError(f"params must be up [{d // 2}, F], down [F, {d // 2}]; got {up.shape}, {down.shape}")
    return up, down


def clex_velocity(params: Mapping[str, Array], t: Array, z: Array, head_dim: int, *, theta: float = 10_000.0,
                  act: str = "tanh") -> Array:
    """CLEX's ODE right-hand side ``dz/dt`` at time ``t`` for ``z = log inv_freq [D/2]``
    (``ODELinear.forward``): ``act((z + log theta^N(t)) W_up) W_down + d log theta^N(t)/dt``,
    ``log theta^N_i(t) = -(2i/D) ln b - (2i/(D-2)) ln alpha``, ``alpha = max(2t - 1, 1)``,
    ``d log theta^N_i/dt = -4i / ((D-2) alpha)``. (The reference computes ``theta^N`` with base
    10000 whatever the model's base; here it uses ``theta``: the same for base 10000.)"""
    d = _head_dim(head_dim)
    up, down = _check_clex_params(params, d)
    if act not in CLEX_ACTS:
        raise ValueError(f"act must be one of {', '.join(map(repr, CLEX_ACTS))}; got {act!r}")
    idx = jnp.arange(0, d, 2, dtype=jnp.float32)
    alpha = jnp.where(t < 1, 1.0, 2.0 * t - 1.0)
    log_ntk = -idx / d * math.log(theta) - idx / (d - 2) * jnp.log(alpha)
    dlog_ntk = -2.0 * idx / ((d - 2) * alpha)
    h = (z + log_ntk) @ up
    h = jnp.tanh(h) if act == "tanh" else jax.nn.silu(h)
    return h @ down + dlog_ntk


def _rk4(f: Any, z: Array, t0: Array, h: Array, n: int) -> Array:
    """``n`` fixed steps of size ``h`` from ``t0`` (torchdiffeq's ``rk4``: the 3/8 rule)."""

    def body(z, k):
        t = t0 + k * h
        k1 = f(t, z)
        k2 = f(t + h / 3, z + h * k1 / 3)
        k3 = f(t + 2 * h / 3, z + h * (k2 - k1 / 3))
        k4 = f(t + h, z + h * (k1 - k2 + k3))
        return z + (k1 + 3 * (k2 + k3) + k4) * h / 8, None

    return jax.lax.scan(body, z, jnp.arange(n, dtype=jnp.float32))[0]


def clex_frequencies(params: Mapping[str, Array], t: float, head_dim: int, *, theta: float = 10_000.0,
                     time_dt: float = 0.01, act: str = "tanh") -> Array:
    """CLEX inverse frequencies ``exp(z(t))`` ``[D/2]`` float32 at scaling time ``t >= 1`` (static),
    solving :func:`clex_velocity` from ``z(1) = log theta^(-2i/D)`` with ``round((t-1)/time_dt)``
    RK4 steps (differentiable in ``params``)."""
    d = _head_dim(head_dim)
    _ntk_head_dim(d)
    t = _number("t", t, lo=1.0, strict=False)
    z0 = jnp.asarray(-_exponents(d) * math.log(theta), jnp.float32)
    n = max(1, round((t - 1) / _number("time_dt", time_dt, lo=0.0)))
    f = lambda tt, z: clex_velocity(params, tt, z, d, theta=theta, act=act)  # noqa: E731
    return jnp.exp(_rk4(f, z0, jnp.float32(1.0), jnp.float32((t - 1) / n), n))


def clex_frequency_grid(params: Mapping[str, Array], max_factor: int, head_dim: int, *, theta: float = 10_000.0,
                        time_dt: float = 0.01, act: str = "tanh") -> Array:
    """CLEX inverse frequencies at ``t = 1, 2, ..., max_factor``: ``[max_factor, D/2]`` float32
    (one ODE solve over the integer grid, as the reference caches it for inference)."""
    d = _head_dim(head_dim)
    _ntk_head_dim(d)
    m = _int("max_factor", max_factor, 1)
    z0 = jnp.asarray(-_exponents(d) * math.log(theta), jnp.float32)
    n = max(1, round(1 / _number("time_dt", time_dt, lo=0.0)))
    f = lambda tt, z: clex_velocity(params, tt, z, d, theta=theta, act=act)  # noqa: E731

    def body(z, t0):
        z = _rk4(f, z, t0, jnp.float32(1.0 / n), n)
        return z, z

    _, zs = jax.lax.scan(body, z0, jnp.arange(1, m, dtype=jnp.float32))
    return jnp.exp(jnp.concatenate([z0[None], zs], axis=0))


__all__ = [
    "CLEX_ACTS", "DYNAMIC_KINDS", "FIELDS", "KINDS", "LOGN_KINDS", "RopeScaling", "apply_rope", "as_scaling",
    "clex_frequencies", "clex_frequency_grid", "clex_init", "clex_velocity", "logn_scale", "query_scale",
    "rope_frequencies", "yarn_mscale", "yarn_ramp",
]
