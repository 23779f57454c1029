"""The oracle of the linear-attention kernels: the token recurrence as one ``lax.scan``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
F32 = jnp.float32


def causal_linear_attention_reference(
    q: Array, k: Array, v: Array, decay_rate: Array | None = None, *,
    initial_state: Array | None = None,
) -> tuple[Array, Array]:
    """Token recurrence ``S_t = lambda S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` with
    ``lambda_h = exp(-decay_rate_h)`` as one ``lax.scan`` in float32 (O(T) sequential steps; a
    rate of ``+inf`` is a reset, ``lambda = 0``). Same shapes and returns as
    :func:`kernels_pallas.causal_linear_attention`: ``q, k [B, T, H, F]``, ``v [B, T, H, E]``,
    ``decay_rate [H]`` or None, ``initial_state [B, H, F, E]`` -> ``(o [B, T, H, E],
    S_T [B, H, F, E] float32)`` (Katharopoulos et al. 2020, with the per-head decay of Qin et al.
    2024)."""
    b, t, h, f = q.shape
    e = v.shape[-1]
    s0 = jnp.zeros((b, h, f, e), F32) if initial_state is None else initial_state.astype(F32)
    lam = None if decay_rate is None else jnp.exp(-jnp.broadcast_to(jnp.asarray(decay_rate, F32), (h,)))

    def step(s, xs):
        q_t, k_t, v_t = xs
        if lam is not None:
            s = lam[:, None, None] * s
        s = s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhf,bhfe->bhe", q_t, s, precision=lax.Precision.HIGHEST)

    xs = tuple(jnp.moveaxis(x.astype(F32), 1, 0) for x in (q, k, v))
    s_t, o = lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(jnp.result_type(q.dtype, k.dtype, v.dtype)), s_t
