"""Feature maps: fixture parity (float64 oracles, our float32 at 1e-5) and exact identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close, f32, fixture, rand
from zoo.attention import feature_maps as fm


def test_taylor_matches_based_fixture():
    fx = fixture("based_taylor_feature_map")
    assert_close(fm.taylor(f32(fx["x"])), fx["phi_x"], atol=1e-5, rtol=1e-5)


def test_taylor_kernel_identity():
    # phi(q).phi(k) = 1 + s + s^2/2 with s = q.k / sqrt(d), and 1 + d + d^2 features.
    q, k = rand(0, 5, 16), rand(1, 5, 16)
    s = np.sum(q * k, -1) / 4.0
    got = jnp.sum(fm.taylor(q) * fm.taylor(k), -1)
    assert fm.taylor(q).shape == (5, 273)
    assert_close(got, 1 + s + s**2 / 2, atol=1e-5, rtol=1e-5)


def test_hedgehog_matches_fla_fixture():
    fx = fixture("hedgehog_feature_map_fla")
    params = {"weight": f32(fx["weight"]).T, "bias": f32(fx["bias"])}
    assert_close(fm.hedgehog(f32(fx["x"]), params), fx["phi_x"], atol=1e-5, rtol=1e-5)


def test_hedgehog_matches_lolcats_fixture():
    fx = fixture("hedgehog_feature_map_lolcats")
    phi = fm.hedgehog_lolcats(f32(fx["x"]), {"weight": f32(fx["layer"])}, eps=float(fx["eps"]))
    assert_close(phi, fx["phi_x"], atol=1e-5, rtol=1e-5)


def test_hedgehog_identity_init_and_rows():
    p = fm.hedgehog_init(None, 8)
    x = rand(0, 3, 8)
    phi = fm.hedgehog(x, p)
    assert phi.shape == (3, 16)
    assert_close(jnp.sum(phi, -1), np.ones(3), atol=1e-6)  # one joint softmax
    expected = jax.nn.softmax(np.concatenate([2 * x, -2 * x], -1), -1)
    assert_close(phi, expected, atol=1e-6)


def test_nalaformer_maps_match_fixture():
    fx = fixture("nala_core_noncausal")
    assert_close(fm.nalaformer_query(f32(fx["q"])), fx["phi_q"], atol=1e-5, rtol=1e-5)
    assert_close(fm.nalaformer_key(f32(fx["k"])), fx["phi_k"], atol=1e-5, rtol=1e-5)


def test_nalaformer_power_range_and_zero_query():
    # p(0) = 1.5; a zero query gives finite (zero) features, not NaN as in the official code.
    phi = fm.nalaformer_query(jnp.zeros((2, 4)))
    assert np.all(np.isfinite(np.asarray(phi)))
    g = jax.grad(lambda x: jnp.sum(fm.nalaformer_query(x)))(jnp.zeros((4,)))
    assert np.all(np.isfinite(np.asarray(g)))
    # One-hot query of norm r: the only non-zero feature is 1^p = 1, whatever p.
    x = jnp.array([0.0, 2.0, 0.0])
    assert_close(fm.nalaformer_query(x), np.array([0, 1, 0, 0, 0, 0.0]), atol=1e-6)
    # Power: for q = r e1 + r e2, features are (1/sqrt2)^p with p = 3 (0.5 + tanh(r sqrt2)).
    r = 0.3
    p = 3 * (0.5 + np.tanh(r * np.sqrt(2)))
    got = fm.nalaformer_query(jnp.array([r, r]))
    assert_close(got[:2], np.full(2, (1 / np.sqrt(2)) ** p), atol=1e-6)


def test_get_and_errors():
    assert fm.get("elu").name == "elu"
    assert "taylor" in fm.names()
    with pytest.raises(ValueError, match="valid names"):
        fm.get("softmaxx")
    with pytest.raises(ValueError, match="weight"):
        fm.hedgehog(rand(0, 2, 4), {"weight": np.zeros((5, 4), np.float32)})
    pair = fm.get((jnp.exp, jnp.abs))
    assert_close(pair.key(jnp.array([-1.0]), None), np.array([1.0]), atol=0)
