"""impl="pallas" of the softmax family: zoo.attention.softmax / sigmoid / softplus reach
kernels_pallas.flash_attention (Pallas interpret mode on CPU, inside shard_map over the active
mesh) and equal the naive references; what the kernel cannot take is refused with its reason.

Tiny shapes (interpret mode is slow). Tolerances (float32): 1e-5 abs + 1e-5 rel on outputs,
1e-4 on gradients (blockwise recomputation sums in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import zoo.attention as za
from tests.helpers import assert_close, rand
from zoo import sharding

B, T, H, HKV, D = 2, 20, 4, 2, 8


def _qkv(seed=0):
    return rand(seed, B, T, H, D), rand(seed + 1, B, T, HKV, D), rand(seed + 2, B, T, HKV, D)


@pytest.mark.parametrize("name,opts", [
    ("softmax", {"sink_logit": jnp.linspace(-1.0, 1.0, H), "logn_train_length": 8}),
    ("sliding_window", {"window": 6}),
    ("sigmoid", {"bias": -2.0}),
])
def test_pallas_impl_equals_reference(name, opts):
    t = za.get(name)
    q, k, v = _qkv()
    want = t.reference(q, k, v, causal=True, **opts)
    got = t(q, k, v, causal=True, impl="pallas", **opts)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what=name)
    loss = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)
    g_got = loss(lambda q, k, v: t(q, k, v, causal=True, impl="pallas", **opts))
    g_want = loss(lambda q, k, v: t.reference(q, k, v, causal=True, **opts))
    for a, b, n in zip(g_got, g_want, "qkv"):
        assert_close(a, b, atol=1e-4, rtol=1e-4, what=f"{name} d{n}")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the simulated CPU devices")
def test_pallas_impl_under_a_mesh():
    """Under jax.set_mesh on a (data, fsdp, tensor) mesh: one shard_map around the kernel."""
    q, k, v = _qkv(3)
    f = jax.jit(lambda q, k, v: za.softmax(q, k, v, causal=True, impl="pallas"))
    with jax.set_mesh(sharding.make_mesh(2, 1, 2)):
        got = f(q, k, v)
        assert "shard_map" in str(f.trace(q, k, v).jaxpr)
    assert_close(got, za.softmax_naive(q, k, v, causal=True), atol=1e-5, rtol=1e-5, what="sharded")


def test_pallas_impl_refuses_with_the_reason():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mask"):
        za.softmax(q, k, v, mask=jnp.ones((T, T), bool), impl="pallas")
    with pytest.raises(ValueError, match="LSSAR"):
        za.softplus(q, k, v, causal=True, reweight=True, impl="pallas")
