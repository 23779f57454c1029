"""Shared checks and numerical primitives of the attention transforms (public: models, layers
and kernels import it too).

Every transform in ``zoo.attention`` uses the layout ``[batch, length, heads, head_dim]`` (as
``jax.nn.dot_product_attention``) and validates its inputs here, so a bad call fails with a
``ValueError`` that names the argument and the expected shape or value instead of an opaque
error deep inside XLA. The rules, the same for every mechanism:

- q/k/v (and one-token ``q_t``/``k_t``/``v_t``) must be floating point arrays of rank 4 (rank 3
  for one token); integer or boolean inputs are a ``ValueError`` (they would be truncated).
- Sequences must hold at least one token: length 0 is a ``ValueError`` naming the argument.
- Integer options (``chunk_size``, ``window``, ...) accept Python and NumPy integers.
- Gates and decays given as concrete values are range-checked (:func:`check_range`); traced
  values cannot be inspected and are used as given.

Numerical primitives shared by the recurrent forms: :func:`affine_scan` (prefix composition of
``x -> a x + b`` maps by ``jax.lax.associative_scan``) and :func:`chunk` / :func:`unchunk`
(split a length into chunks with a zero-padded ragged last chunk).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LAYOUT = "[batch, length, heads, head_dim]"
TOKEN_LAYOUT = "[batch, heads, head_dim]"


def shape_str(x: Any) -> str:
    return "x".join(str(d) for d in getattr(x, "shape", ())) or "scalar"


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if getattr(x, "ndim", None) != rank:
        raise ValueError(
            f"{name} must have rank {rank} with layout {layout}; got shape "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )


def check_float(name: str, x: Any) -> None:
    """``x`` must be a floating point array (ints/bools would be silently truncated)."""
    dt = getattr(x, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{name} must be a floating point array (float32, bfloat16, float16, ...); got dtype {dt}"
        )


def check_qkv(q: Array, k: Array, v: Array, *, causal: bool = False) -> tuple[int, int, int]:
    """Validates ``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``.

    Returns ``(heads, kv_heads, groups)`` with ``heads == kv_heads * groups``. Raises
    ``ValueError`` naming the argument and the expected shape (or dtype, or length >= 1).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, LAYOUT)
        check_float(name, x)
    b, tq, h, d = q.shape
    bk, tk, hk, dk = k.shape
    if tq == 0 or tk == 0:
        raise ValueError(
            f"q and k must hold at least one token (length >= 1); got q length {tq}, k length {tk}"
        )
    if bk != b:
        raise ValueError(f"k batch size {bk} != q batch size {b}: k must be [{b}, length, kv_heads, {d}]")
    if dk != d:
        raise ValueError(f"k head_dim {dk} != q head_dim {d}: k must be [{b}, length, kv_heads, {d}]")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [{bk}, {tk}, {hk}, value_dim] to match k {shape_str(k)}; got {shape_str(v)}"
        )
    if hk == 0 or h % hk != 0:
        raise ValueError(
            f"q heads ({h}) must be a multiple of k/v heads ({hk}) for grouped-query attention"
        )
    if causal and tq != tk:
        raise ValueError(
            f"causal attention needs q and k of the same length; got q length {tq}, k length {tk}"
        )
    return h, hk, h // hk


def check_token(q_t: Array, k_t: Array, v_t: Array) -> tuple[int, int, int]:
    """Validates one decoding token ``q_t [B, H, D]``, ``k_t [B, Hkv, D]``, ``v_t [B, Hkv, Dv]``;
    returns ``(heads, kv_heads, groups)`` as :func:`check_qkv`."""
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"{name} must be {TOKEN_LAYOUT} (one token); got {shape_str(x)}")
        check_float(name, x)
    return check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])


def check_state(state: Any, cls: type, shapes: Any, *, cast: Any = jnp.float32) -> Any:
    """``state`` must be a ``cls`` (a NamedTuple of arrays) whose fields have ``shapes`` (a ``cls``
    of shape tuples, None = any); returns it with every field cast to ``cast`` (None: as is).
    Raises a ValueError naming ``initial_state/state`` and listing expected and actual shapes."""
    if not isinstance(state, cls):
        raise ValueError(f"initial_state/state must be a {cls.__name__}; got {type(state).__name__}")
    got = tuple(tuple(getattr(x, "shape", ())) for x in state)
    if any(w is not None and tuple(w) != g for w, g in zip(shapes, got)):
        fmt = lambda ss: ", ".join(f"{n} {list(s) if s is not None else 'any'}" for n, s in zip(cls._fields, ss))
        raise ValueError(f"state must have shapes {fmt(shapes)}; got {fmt(got)}")
    return state if cast is None else cls(*(jnp.asarray(x, cast) for x in state))


def repeat_kv(x: Array, groups: int) -> Array:
    """Repeats k/v heads ``[B, T, Hkv, D] -> [B, T, Hkv * groups, D]`` (head h uses kv head h // groups)."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


def per_head(name: str, x: Any, heads: int, dtype: Any = jnp.float32) -> Array:
    """Broadcasts a scalar or ``[heads]`` array to ``[heads]``; raises naming ``name`` otherwise."""
    x = jnp.asarray(x, dtype)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (heads,))
    if x.shape != (heads,):
        raise ValueError(f"{name} must be a scalar or have shape [{heads}] (one per head); got {shape_str(x)}")
    return x


def causal_mask(tq: int, tk: int, window: int | None = None, q_offset: int = 0) -> Array:
    """Boolean ``[tq, tk]``: query i (at absolute position i + q_offset) sees key j iff j <= pos_i and,
    with a window, pos_i - j < window (``window`` keys including the query's own)."""
    qi = jnp.arange(tq)[:, None] + q_offset
    kj = jnp.arange(tk)[None, :]
    m = kj <= qi
    if window is not None:
        m = m & (qi - kj < window)
    return m


def broadcast_to_shape(name: str, x: Any, shape: tuple[int, ...], layout: str) -> Array:
    """Broadcasts ``x`` to ``shape``; a ValueError naming ``name`` and ``layout`` otherwise."""
    x = jnp.asarray(x)
    try:
        return jnp.broadcast_to(x, shape)
    except ValueError:
        dims = ", ".join(f"{n}" for n in shape)
        raise ValueError(f"{name} must broadcast to {layout} = [{dims}]; got {shape_str(x)}") from None


def broadcast_mask(name: str, mask: Any, b: int, h: int, tq: int, tk: int) -> Array:
    """Checks a user mask broadcastable to ``[batch, heads, q_length, k_length]`` and returns it as bool."""
    return broadcast_to_shape(
        name, jnp.asarray(mask).astype(bool), (b, h, tq, tk), "[batch, heads, q_length, k_length]"
    )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, choices))}")


def as_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = True) -> int | None:
    """A Python or NumPy integer ``>= minimum`` as ``int`` (None passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= minimum:
        return int(value)
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}; got {value!r}")


def check_positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    as_int(name, value, allow_none=allow_none)


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known now (not a tracer under jit/grad), else None."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_range(
    name: str, x: Any, lo: float | None = None, hi: float | None = None, *, inf_ok: bool = False,
) -> None:
    """Raises a ValueError naming ``name`` when a concrete ``x`` is NaN or outside ``[lo, hi]``
    (``+inf`` allowed with ``inf_ok``: a decay rate of inf is a hard reset). Traced values pass."""
    a = concrete(x)
    if a is None or a.size == 0:
        return
    a = a.astype(np.float64)
    bad = np.isnan(a)
    if lo is not None:
        bad |= a < lo
    if hi is not None:
        bad |= a > hi
    if not inf_ok:
        bad |= np.isinf(a)
    if bad.any():
        rng = f"[{'-inf' if lo is None else lo}, {('inf' if inf_ok else 'finite') if hi is None else hi}]"
        raise ValueError(f"{name} must lie in {rng}; got {a[bad].flat[0]!r} (and {int(bad.sum()) - 1} more)")


# ----------------------------------------------------------------------------- primitives


def affine_scan(a: Array, b: Array, axis: int = 0) -> tuple[Array, Array]:
    """Prefix composition of the affine maps ``x -> a_n x + b_n`` along ``axis``.

    ``a`` has ``b``'s leading dims up to ``axis`` plus any trailing dims that broadcast against
    ``b`` once expanded on the right (e.g. ``a [N, B, H]``, ``b [N, B, H, F, E]``). Returns
    ``(A_n, B_n)`` with ``x_n = A_n x_0 + B_n``: exact (no division, no exp of cumulative sums),
    differentiable at ``a = 0``, by ``jax.lax.associative_scan``.
    """

    def expand(x, like):
        return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))

    def combine(x, y):
        a1, b1 = x
        a2, b2 = y
        return a1 * a2, expand(a2, b1) * b1 + b2

    return jax.lax.associative_scan(combine, (a, b), axis=axis)


def chunk(x: Array, size: int, axis: int = 1, pad_value: float = 0.0) -> tuple[Array, int]:
    """Splits ``axis`` (length T) into ``n = ceil(T / size)`` chunks: ``[..., T, ...] ->
    [..., n, size, ...]``, the ragged last chunk padded at the end with ``pad_value``; returns the
    chunked array and the padding length."""
    t = x.shape[axis]
    n = -(-t // size)
    pad = n * size - t
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=pad_value)
    return x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:]), pad


def unchunk(x: Array, length: int, axis: int = 1) -> Array:
    """Inverse of :func:`chunk`: ``[..., n, size, ...] -> [..., length, ...]``."""
    y = x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(y, 0, length, axis=axis)
