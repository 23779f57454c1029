"""zoo.attention.rope: RoPE scalings (PI, NTK, dynamic NTK, YaRN, ABF, Entropy-ABF, CLEX, Giraffe)
against the reference implementations (fixtures from HF transformers, abacusai/Long-Context,
GAIR-NLP/Entropy-ABF and DAMO-NLP-SG/CLEX + torchdiffeq, run with PyTorch: tests/fixtures/rope/),
the identities of wave2.md section 2.8, log-n scaling and bad input."""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, rand
from zoo.attention import rope

REF = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "rope" / "rope_reference.npz"
RTOL = 2e-6  # float32 frequencies: a few ulps between torch's float32 pow and our float64 -> float32


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF) as f:
        return {k: f[k] for k in f.files}


def freqs(d, **scaling):
    return rope.rope_frequencies(d, scaling=scaling or None)


# ----------------------------------------------------------------------------- reference numbers


@pytest.mark.parametrize("d", [16, 128])
def test_default_linear_ntk_match_hf(ref, d):
    assert_close(freqs(d)[0], ref[f"default_d{d}"], atol=0, rtol=RTOL, what="default")
    assert_close(freqs(d, kind="linear", factor=4.0)[0], ref[f"linear_d{d}_s4"], atol=0, rtol=RTOL, what="linear")
    assert_close(freqs(d, kind="ntk", factor=4.0)[0], ref[f"ntk_d{d}_s4"], atol=0, rtol=RTOL, what="ntk")


def test_dynamic_ntk_matches_hf(ref):
    s = {"kind": "ntk", "factor": 2.0, "dynamic": True, "original_max_len": 16}
    for n in (8, 16, 40):
        inv, ls = rope.rope_frequencies(16, scaling=s, length=n)
        assert_close(inv, ref[f"dynamic_ntk_d16_L16_s2_n{n}"], atol=0, rtol=RTOL, what=f"n={n}")
        assert ls == 1.0
    batch = rope.rope_frequencies(16, scaling=s, length=jnp.array([8, 40]))[0]
    assert batch.shape == (2, 8)
    assert_close(batch[1], ref["dynamic_ntk_d16_L16_s2_n40"], atol=0, rtol=RTOL, what="per-row length")
    jitted = jax.jit(lambda n: rope.rope_frequencies(16, scaling=s, length=n)[0])(jnp.int32(40))
    assert_close(jitted, ref["dynamic_ntk_d16_L16_s2_n40"], atol=0, rtol=RTOL, what="traced length")


@pytest.mark.parametrize("d,L,s", [(128, 4096, 16.0), (128, 4096, 1.0), (32, 64, 4.0)])
def test_yarn_matches_hf(ref, d, L, s):
    inv, ls = freqs(d, kind="yarn", factor=s, original_max_len=L)
    assert_close(inv, ref[f"yarn_d{d}_L{L}_s{s:g}"], atol=0, rtol=RTOL, what="yarn inv_freq")
    # HF multiplies cos and sin (of q and k) by attention_factor: logits scale by its square
    assert ls == pytest.approx(float(ref[f"yarn_d{d}_L{L}_s{s:g}_attention_factor"]) ** 2, rel=1e-12)


@pytest.mark.parametrize("s,p,T", [(4.0, 0.0, 0), (4.0, 0.5, 0), (1.0, 0.0, 64), (2.0, 1.0, 256)])
def test_giraffe_matches_long_context(ref, s, p, T):
    inv, ls = freqs(32, kind="giraffe", factor=s, power=p, truncate=T or None)
    assert_close(inv, ref[f"giraffe_d32_s{s:g}_p{p:g}_T{T}"], atol=0, rtol=RTOL, what="giraffe")
    assert ls == 1.0


def test_entropy_abf_matches_eabf(ref):
    s = {"kind": "entropy_abf", "original_max_len": 4096}
    assert_close(rope.query_scale(ref["eabf_positions"], s), ref["eabf_query_scale"], atol=0, rtol=1e-6,
                 what="query scale max(1, ln(m+1)/ln 4096)")
    inv, ls = freqs(16, **s)
    assert_close(inv, 500_000.0 ** -(np.arange(0, 16, 2) / 16), atol=0, rtol=RTOL, what="base 500000")
    assert ls == 1.0


def test_apply_rope_matches_hf_rotate_half(ref):
    q = np.transpose(ref["rotate_q"], (0, 2, 1, 3))  # HF [b, h, T, d] -> [b, T, h, d]
    out = rope.apply_rope(jnp.asarray(q), ref["rotate_positions"], ref["yarn_d32_L64_s4"])
    assert_close(out, np.transpose(ref["rotate_out"], (0, 2, 1, 3)), atol=2e-5, what="apply_rope vs HF")


@pytest.mark.parametrize("name,act", [("init", "tanh"), ("random", "tanh"), ("random_silu", "silu")])
def test_clex_matches_reference_ode(ref, name, act):
    params = {"up": ref[f"clex_{name}_up"], "down": ref[f"clex_{name}_down"]}
    want = ref[f"clex_{name}_freqs"]  # t = 1, 2, 3, 4
    grid = rope.clex_frequency_grid(params, 4, 16, act=act)
    assert_close(grid, want, atol=0, rtol=1e-5, what="grid")
    s = {"kind": "clex", "factor": 3.0, "act": act}
    assert_close(rope.rope_frequencies(16, scaling=s, params=params)[0], want[2], atol=0, rtol=1e-5, what="t=3")
    if name == "init":  # W_down = 0: the ODE is the NTK closed form with alpha = 2t - 1 (params=None)
        for t in (1, 2, 3, 4):
            closed = rope.rope_frequencies(16, scaling={"kind": "clex", "factor": float(t)})[0]
            assert_close(closed, want[t - 1], atol=0, rtol=1e-5, what=f"closed form t={t}")
            ntk = rope.rope_frequencies(16, scaling={"kind": "ntk", "factor": 2.0 * t - 1})[0]
            assert_close(closed, ntk, atol=0, rtol=1e-7, what="clex closed form == ntk(2t-1)")


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_factor_one_is_identity(kind):
    base = freqs(64)[0]
    inv, ls = freqs(64, kind=kind, factor=1.0, original_max_len=128)
    assert_close(inv, base, atol=0, rtol=1e-7, what=kind)
    assert ls == 1.0
    assert_close(freqs(64, kind="clex", factor=1.0)[0], base, atol=0, rtol=1e-7, what="clex t=1")
    assert_close(freqs(64, kind="giraffe", factor=1.0)[0], base, atol=0, rtol=1e-7, what="giraffe s=1")


STATIC = [
    {"kind": "linear", "factor": 4.0},
    {"kind": "ntk", "factor": 4.0},
    {"kind": "yarn", "factor": 4.0, "original_max_len": 32},
    {"kind": "abf", "base": 1e6},
    {"kind": "entropy_abf", "original_max_len": 32},
    {"kind": "clex", "factor": 2.0},
    {"kind": "giraffe", "factor": 2.0, "power": 0.5, "truncate": 40},
]


@pytest.mark.parametrize("scaling", STATIC, ids=[s["kind"] for s in STATIC])
def test_relative_position_invariance(scaling):
    d = 16
    params = None
    if scaling["kind"] == "clex":  # a non-trivial ODE (random W_down), not just its NTK start
        params = rope.clex_init(jax.random.key(1), d)
        params["down"] = jnp.asarray(rand(2, d, d // 2, scale=0.3))
    inv, _ = rope.rope_frequencies(d, scaling=scaling, params=params)
    assert scaling["kind"] != "giraffe" or bool(jnp.any(inv == 0)), "giraffe case must include zeroed pairs"
    q, k = jnp.asarray(rand(0, 1, 1, 1, d)), jnp.asarray(rand(1, 1, 1, 1, d))
    m = jnp.array([0, 3, 17, 40])
    n = jnp.array([0, 9, 2, 40])

    def scores(c):
        qr = rope.apply_rope(jnp.broadcast_to(q, (1, 4, 1, d)), m + c, inv)
        kr = rope.apply_rope(jnp.broadcast_to(k, (1, 4, 1, d)), n + c, inv)
        return jnp.sum(qr * kr, -1)

    s0 = scores(0)
    for c in (1, 7, 250):
        assert_close(scores(c), s0, atol=2e-4, what=f"shift {c}")
    # and the scores do depend on m - n (the test could fail)
    assert float(jnp.max(jnp.abs(s0[0, 1:] - s0[0, :1]))) > 1e-2


def test_ntk_endpoints():
    d, a = 64, 8.0
    base, inv = freqs(d)[0], freqs(d, kind="ntk", factor=a)[0]
    assert float(inv[0]) == float(base[0]) == 1.0
    assert_close(inv[-1], base[-1] / a, atol=0, rtol=1e-6, what="lowest frequency / alpha")


def test_yarn_regions_and_temperature():
    d, L, s = 128, 4096, 16.0
    base = np.asarray(freqs(d)[0])
    inv, ls = freqs(d, kind="yarn", factor=s, original_max_len=L)
    inv = np.asarray(inv)
    assert_close(inv[:20], base[:20], atol=0, rtol=1e-7, what="i < lo=20 unchanged")
    assert_close(inv[47:], base[47:] / s, atol=0, rtol=1e-6, what="i > hi=46 is PI")
    assert np.all((inv[20:47] <= base[20:47] * (1 + 1e-7)) & (inv[20:47] >= base[20:47] / s * (1 - 1e-6)))
    assert ls == pytest.approx((0.1 * math.log(s) + 1) ** 2)
    ramp = rope.yarn_ramp(d, theta=1e4, original_max_len=L)
    assert ramp[20] == 0 and ramp[46] == 1 and 0 < ramp[33] < 1
    assert freqs(d, kind="yarn", factor=s, original_max_len=L, attention_factor=1.0)[1] == 1.0


def test_pi_angle_at_scaled_position():
    inv = freqs(32, kind="linear", factor=4.0)[0]
    x = jnp.asarray(rand(3, 1, 5, 2, 32))
    m = jnp.array([0, 1, 5, 30, 100])
    assert_close(rope.apply_rope(x, m * 4, inv), rope.apply_rope(x, m, freqs(32)[0]), atol=1e-5,
                 what="PI at m*s == RoPE at m")


def test_giraffe_truncation_values():
    d, T = 64, 100
    base = np.asarray(freqs(d)[0], np.float64)
    inv = np.asarray(freqs(d, kind="giraffe", truncate=T)[0], np.float64)
    c = 2 * math.pi / T
    keep, low, zero = base >= c, (base >= c / 8) & (base < c), base < c / 8
    assert keep.any() and low.any() and zero.any()
    assert_close(inv[keep], base[keep], atol=0, rtol=1e-6, what="kept")
    assert_close(inv[low], np.full(low.sum(), c / 16), atol=0, rtol=1e-6, what="c/16")
    assert np.all(inv[zero] == 0)
    p = np.asarray(freqs(d, kind="giraffe", power=1.0)[0], np.float64)
    assert_close(p, base * (1 - np.arange(d // 2) / (d // 2)), atol=0, rtol=1e-6, what="power 1")


def test_dynamic_length_rules():
    ntk = {"kind": "ntk", "factor": 1.0, "dynamic": True, "original_max_len": 16}
    base = freqs(16)[0]
    for n in (1, 16):  # factor follows max(1, n / L): nothing changes up to L
        assert_close(rope.rope_frequencies(16, scaling=ntk, length=n)[0], base, atol=0, rtol=1e-6, what=f"n={n}")
    assert_close(rope.rope_frequencies(16, scaling=ntk, length=64)[0], freqs(16, kind="ntk", factor=4.0)[0],
                 atol=0, rtol=1e-6, what="n = 4L: static NTK alpha = 4")
    clex = {"kind": "clex", "dynamic": True, "original_max_len": 16, "max_factor": 3}
    for n, t in ((1, 1), (16, 1), (17, 2), (32, 2), (33, 3), (1000, 3)):  # t = clip(ceil(n/L), 1, max_factor)
        assert_close(rope.rope_frequencies(16, scaling=clex, length=n)[0],
                     freqs(16, kind="clex", factor=float(t))[0], atol=0, rtol=1e-6, what=f"clex n={n}")
    params = rope.clex_init(jax.random.key(0), 16)
    params["down"] = jnp.asarray(rand(4, 16, 8, scale=0.3))
    got = rope.rope_frequencies(16, scaling=clex, length=jnp.array([5, 40]), params=params)[0]
    assert_close(got[1], rope.clex_frequencies(params, 3.0, 16), atol=0, rtol=1e-5, what="clex grid row")


def test_clex_gradient_flows():
    params = rope.clex_init(jax.random.key(0), 8)
    loss = lambda p: jnp.sum(rope.clex_frequencies(p, 2.0, 8, time_dt=0.1) ** 2)  # noqa: E731
    g = jax.grad(loss)(params)
    assert np.all(np.isfinite(g["down"])) and float(jnp.abs(g["down"]).max()) > 0
    # finite difference on one entry of W_down
    e = jnp.zeros_like(params["down"]).at[3, 2].set(1e-2)
    fd = (loss({**params, "down": params["down"] + e}) - loss({**params, "down": params["down"] - e})) / 2e-2
    assert_close(g["down"][3, 2], fd, atol=1e-4, rtol=1e-2, what="d loss / d W_down")


# ----------------------------------------------------------------------------- log-n


def test_logn_scale_forms():
    T = 16
    n = jnp.array([1, 4, 16, 256, 65536])
    assert_close(rope.logn_scale(n, T), [1, 1, 1, 2, 4], atol=1e-6, what="log, clamped")
    assert_close(rope.logn_scale(n, T, clamp=False), [0, 0.5, 1, 2, 4], atol=1e-6, what="log, unclamped")
    assert_close(rope.logn_scale(n, T, "sqrt"), [0, math.sqrt(0.5), 1, math.sqrt(2), 2], atol=1e-6,
                 what="sqrt (Jin et al.), unclamped")
    assert_close(rope.logn_scale(n, T, "sqrt", clamp=True), [1, 1, 1, math.sqrt(2), 2], atol=1e-6, what="sqrt, clamped")


def test_entropy_abf_query_scale_is_softmax_logn():
    """q * query_scale(positions) in a causal softmax == zoo softmax(logn_train_length=L): the query
    at position m sees m + 1 keys (two independent implementations of the same factor)."""
    L, t = 4, 20
    q, k, v = (jnp.asarray(rand(i, 1, t, 2, 8)) for i in range(3))
    qs = rope.query_scale(jnp.arange(t), {"kind": "entropy_abf", "original_max_len": L})
    assert_close(za.softmax(q * qs[:, None, None], k, v, causal=True),
                 za.softmax(q, k, v, causal=True, logn_train_length=L), atol=1e-5, what="entropy_abf == logn")


# ----------------------------------------------------------------------------- input checks


def test_dict_and_dataclass_agree_and_hash():
    s = {"kind": "yarn", "factor": 4, "original_max_len": 64}
    a, b = freqs(32, **s), rope.rope_frequencies(32, scaling=rope.RopeScaling(**s))
    assert_close(a[0], b[0], atol=0, what="dict == dataclass")
    assert a[1] == b[1] > 1
    assert hash(rope.RopeScaling(**s)) == hash(rope.as_scaling(s))
    assert rope.RopeScaling("entropy_abf", original_max_len=64).logn == "ratio"
    ml_collections = pytest.importorskip("ml_collections")
    assert rope.as_scaling(ml_collections.ConfigDict(s)) == rope.as_scaling(s)  # a config's model.rope_scaling


@pytest.mark.parametrize("call,match", [
    (lambda: freqs(16, kind="nope"), r"kind must be one of 'linear', 'ntk', 'yarn'"),
    (lambda: freqs(16, kind="linear", factor=0.0), "factor must be a finite number > 0"),
    (lambda: freqs(16, kind="ntk", factor=-2.0), "factor must be a finite number > 0"),
    (lambda: rope.rope_frequencies(15), "head_dim"),
    (lambda: rope.rope_frequencies(15, scaling={"kind": "linear"}), "head_dim"),
    (lambda: freqs(16, kind="linear", scale=2.0), "unknown key.*'scale'.*valid: kind, factor"),
    (lambda: freqs(16, kind="yarn", factor=2.0), "original_max_len"),
    (lambda: freqs(16, kind="entropy_abf"), "original_max_len"),
    (lambda: freqs(16, kind="linear", dynamic=True, original_max_len=8), "dynamic=True is supported for kinds"),
    (lambda: freqs(16, kind="ntk", dynamic=True), "original_max_len"),
    (lambda: freqs(16, kind="linear", logn="ln", original_max_len=8), "logn must be None or one of"),
    (lambda: freqs(16, kind="giraffe", truncate=0), "truncate"),
    (lambda: freqs(16, kind="giraffe", power=-1.0), "power"),
    (lambda: freqs(16, kind="clex", factor=0.5), "ODE time"),
    (lambda: freqs(16, kind="clex", act="relu"), "act must be one of"),
    (lambda: rope.rope_frequencies(2, scaling={"kind": "ntk", "factor": 2.0}), "head_dim >= 4"),
    (lambda: rope.rope_frequencies(16, scaling={"factor": 2.0}), "needs a 'kind'"),
    (lambda: rope.rope_frequencies(16, scaling="yarn"), "scaling must be None, a RopeScaling or a dict"),
    (lambda: rope.rope_frequencies(16, scaling={"kind": "ntk", "factor": 2.0, "dynamic": True,
                                                "original_max_len": 8}, length=0), "length must be >= 1"),
    (lambda: rope.apply_rope(jnp.zeros((1, 2, 1, 16)), jnp.arange(2), jnp.zeros(4)), "inv_freq must be"),
    (lambda: rope.logn_scale(4, 1), "train_length"),
    (lambda: rope.logn_scale(4, 8, "cube"), "kind must be one of"),
    (lambda: rope.logn_scale(0, 8), "length must be >= 1"),
    (lambda: rope.rope_frequencies(16, scaling={"kind": "clex", "factor": 2.0}, params={"up": 1}),
     "params must be a dict with keys 'up' and 'down'"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
