"""Feature maps phi for linear attention: ``sim(q, k) = phi_q(q) . phi_k(k)``.

A :class:`FeatureMap` holds a query map and a key map (they differ for NaLaFormer) and, for
learnable maps (Hedgehog), takes its parameters as an explicit argument so that every
transform stays a pure function. Inputs are ``[..., head_dim]`` (``[batch, length, heads,
head_dim]`` in practice); outputs ``[..., feature_dim]``.

Maps:
- ``elu``: elu(x) + 1 (Katharopoulos et al. 2020, "Transformers are RNNs").
- ``relu``: relu(x).
- ``identity``: x (Lightning Attention / TransNormer kernels take activations from the caller).
- ``taylor``: BASED's 2nd-order Taylor map (Arora et al. 2024) with the full outer product,
  ``[1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]``, 1 + d + d^2 features, so that
  ``phi(q).phi(k) = 1 + s + s^2/2`` with ``s = q.k / sqrt(d)``.
- ``hedgehog``: Hedgehog (Zhang et al. ICLR'24) as in flash-linear-attention:
  ``z = x W + b``, ``phi = softmax([2z, -2z])`` taken jointly over the 2F features.
- ``hedgehog_lolcats``: Hedgehog as in LoLCATs' ``softmax_dim`` map: per-head ``z = x W_h``,
  ``phi = [softmax(z), softmax(-z)]`` (two softmaxes), clamped at ``eps``.
- ``nalaformer``: NaLaFormer's norm-aware map (Meng et al. 2025): query
  ``[relu(q^)^p, relu(-q^)^p]`` with ``q^ = q/||q||`` and ``p = 3 (0.5 + tanh ||q||)``; key
  ``[relu(k^3), relu(-k^3)]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from zoo.attention.common import shape_str

Array = jax.Array
MapFn = Callable[[Array, Any], Array]


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """A named pair of feature maps. ``query(x, params)`` / ``key(x, params)``; ``dim(d)`` the
    feature dimension for head dim ``d`` (``None`` when it depends on the parameters)."""

    name: str
    query: MapFn
    key: MapFn
    dim: Callable[[int], int | None]
    learnable: bool = False

    def __call__(self, x: Array, params: Any = None) -> Array:
        """Applies the query map (identical to the key map except for ``nalaformer``)."""
        return self.query(x, params)


def _no_params(fn: Callable[[Array], Array]) -> MapFn:
    return lambda x, params=None: fn(x)


def elu(x: Array) -> Array:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020)."""
    return jax.nn.elu(x) + 1.0


def relu(x: Array) -> Array:
    """phi(x) = max(x, 0)."""
    return jax.nn.relu(x)


def identity(x: Array) -> Array:
    """phi(x) = x."""
    return x


def taylor(x: Array) -> Array:
    """BASED TaylorExp map: ``[1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]``, ``[..., 1 + d + d^2]``.

    The full row-major outer product (index ``1 + d + i*d + j`` holds ``x_i x_j``), exactly as
    ``HazyResearch/based`` ``TaylorExp``; ``phi(q).phi(k) = 1 + s + s^2 / 2`` with
    ``s = q.k / sqrt(d)``, which is >= 1/2, so normalised attention never divides by ~0.
    """
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    one = jnp.ones((*x.shape[:-1], 1), x.dtype)
    return jnp.concatenate([one, x / d**0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], axis=-1)


def _hedgehog_projection(x: Array, params: Any, name: str) -> Array:
    if not isinstance(params, dict) or "weight" not in params:
        raise ValueError(
            f"feature map {name!r} is learnable: pass feature_map_params={{'weight': [head_dim, F] "
            f"or [heads, head_dim, F], 'bias': optional [F] or [heads, F]}} (see hedgehog_init)"
        )
    w = jnp.asarray(params["weight"])
    d = x.shape[-1]
    if w.ndim == 2:
        if w.shape[0] != d:
            raise ValueError(f"{name} weight must be [head_dim={d}, F]; got {shape_str(w)}")
        z = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))
    elif w.ndim == 3:
        if x.ndim < 2 or w.shape[0] != x.shape[-2] or w.shape[1] != d:
            raise ValueError(
                f"{name} per-head weight must be [heads={x.shape[-2] if x.ndim >= 2 else '?'}, "
                f"head_dim={d}, F]; got {shape_str(w)}"
            )
        z = jnp.einsum("...hd,hdf->...hf", x, w.astype(x.dtype))
    else:
        raise ValueError(f"{name} weight must be [head_dim, F] or [heads, head_dim, F]; got {shape_str(w)}")
    b = params.get("bias")
    if b is not None:
        z = z + jnp.asarray(b, x.dtype)
    return z


def hedgehog(x: Array, params: Any) -> Array:
    """Hedgehog map as in fla ``HedgehogFeatureMap``: ``z = x W + b``; ``softmax([2z, -2z])``.

    One softmax taken jointly over all 2F entries (so features sum to 1 per token).
    ``params = {"weight": [D, F] or [H, D, F], "bias": [F] or [H, F] (optional)}``; returns
    ``[..., 2F]``. (fla stores ``W`` as torch ``Linear.weight``, i.e. our ``weight.T``.)
    """
    z = _hedgehog_projection(x, params, "hedgehog")
    return jax.nn.softmax(jnp.concatenate([2.0 * z, -2.0 * z], axis=-1), axis=-1)


def hedgehog_lolcats(x: Array, params: Any, eps: float = 1e-12) -> Array:
    """Hedgehog map as in LoLCATs ``softmax_dim``: ``[softmax(z), softmax(-z)]`` clamped at ``eps``.

    Two separate softmaxes over F (no factor 2), ``z = x W_h`` with per-head ``W [H, D, F]``
    (or shared ``[D, F]``); returns ``[..., 2F]``.
    """
    z = _hedgehog_projection(x, params, "hedgehog_lolcats")
    phi = jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)
    return jnp.maximum(phi, eps)


def hedgehog_init(
    key: Array | None, head_dim: int, feature_dim: int | None = None, heads: int | None = None,
    *, identity_init: bool = True, dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Parameters for :func:`hedgehog`: identity weight / zero bias (fla's init) or, with
    ``identity_init=False``, ``N(0, 1/head_dim)`` weights (needs ``key``)."""
    f = feature_dim or head_dim
    shape = (head_dim, f) if heads is None else (heads, head_dim, f)
    if identity_init:
        w = jnp.broadcast_to(jnp.eye(head_dim, f, dtype=dtype), shape)
    else:
        if key is None:
            raise ValueError("key must be a PRNG key when identity_init=False")
        w = jax.random.normal(key, shape, dtype) / math.sqrt(head_dim)
    b = jnp.zeros(shape[:-2] + (f,), dtype)
    return {"weight": w, "bias": b}


def _safe_norm(x: Array) -> Array:
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    # Guarded sqrt: NaLaFormer's official code has no epsilon on ||q|| (NaN at q = 0).
    tiny = jnp.finfo(x.dtype).tiny
    return jnp.sqrt(jnp.maximum(sq, tiny))


def nalaformer_query(x: Array) -> Array:
    """NaLaFormer query map ``[relu(q^)^p, relu(-q^)^p]``, ``q^ = q / ||q||``, ``p = 3 (0.5 + tanh ||q||)``.

    The power ``p in [1.5, 4.5)`` grows with the query norm (norm-aware spikiness); ``[..., 2D]``.
    """
    n = _safe_norm(x)
    p = 3.0 * (0.5 + jnp.tanh(n))
    xh = x / n
    return jnp.concatenate([jax.nn.relu(xh) ** p, jax.nn.relu(-xh) ** p], axis=-1)


def nalaformer_key(x: Array) -> Array:
    """NaLaFormer key map ``[relu(k^3), relu(-k^3)]`` (the odd power keeps the sign), ``[..., 2D]``."""
    k3 = x * x * x
    return jnp.concatenate([jax.nn.relu(k3), jax.nn.relu(-k3)], axis=-1)


_MAPS: dict[str, FeatureMap] = {
    "elu": FeatureMap("elu", _no_params(elu), _no_params(elu), lambda d: d),
    "relu": FeatureMap("relu", _no_params(relu), _no_params(relu), lambda d: d),
    "identity": FeatureMap("identity", _no_params(identity), _no_params(identity), lambda d: d),
    "taylor": FeatureMap("taylor", _no_params(taylor), _no_params(taylor), lambda d: 1 + d + d * d),
    "hedgehog": FeatureMap("hedgehog", hedgehog, hedgehog, lambda d: None, learnable=True),
    "hedgehog_lolcats": FeatureMap(
        "hedgehog_lolcats", hedgehog_lolcats, hedgehog_lolcats, lambda d: None, learnable=True
    ),
    "nalaformer": FeatureMap(
        "nalaformer", _no_params(nalaformer_query), _no_params(nalaformer_key), lambda d: 2 * d
    ),
}


def names() -> list[str]:
    """The registered feature-map names."""
    return sorted(_MAPS)


def get(feature_map: str | FeatureMap | Callable | tuple | None) -> FeatureMap:
    """Resolves a feature map: a name, a :class:`FeatureMap`, one callable ``phi(x)`` applied to
    both q and k, a pair ``(phi_q, phi_k)`` of callables, or ``None`` (identity)."""
    if feature_map is None:
        return _MAPS["identity"]
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map not in _MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; valid names: {', '.join(names())}")
        return _MAPS[feature_map]
    if callable(feature_map):
        fn = _no_params(feature_map)
        return FeatureMap(getattr(feature_map, "__name__", "custom"), fn, fn, lambda d: None)
    if isinstance(feature_map, tuple) and len(feature_map) == 2 and all(map(callable, feature_map)):
        fq, fk = feature_map
        return FeatureMap("custom", _no_params(fq), _no_params(fk), lambda d: None)
    raise ValueError(
        f"feature_map must be a name ({', '.join(names())}), a FeatureMap, a callable or a pair of "
        f"callables; got {feature_map!r}"
    )


def apply(feature_map: Any, q: Array, k: Array, params: Any = None) -> tuple[Array, Array]:
    """Returns ``(phi_q(q), phi_k(k))``. ``params`` is shared, or a pair ``(params_q, params_k)``
    for untied maps (fla's default ``tie_feature_map_qk=False``)."""
    fm = get(feature_map)
    if isinstance(params, tuple) and len(params) == 2:
        pq, pk = params
    else:
        pq = pk = params
    return fm.query(q, pq), fm.key(k, pk)
