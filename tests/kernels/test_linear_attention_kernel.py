"""kernels_pallas.causal_linear_attention vs the token scan of zoo.attention.linear (oracle).

Interpret mode on CPU for both programs (``backend="tpu"``: grid with a sequential block axis and
VMEM scratch; ``backend="gpu"``: Triton-style in-kernel block loop with value tiles), forward,
final state and the gradients of q, k, v and the initial state. Tolerances (relative to the
largest reference magnitude, plus the same relative term elementwise): float32 1e-4; bfloat16 2e-2
against the oracle run in float32 on the bf16-rounded inputs. Real-hardware runs are marked
``gpu`` / ``tpu`` and skipped where that backend is absent.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

import kernels_pallas
from kernels_pallas import BlockSizes, causal_linear_attention
from kernels_pallas.linear_attention import common as la
from tests.helpers import assert_close, rand
from zoo.attention import dispatch

# zoo.attention re-exports the function `linear`, which shadows the module attribute.
zl = importlib.import_module("zoo.attention.linear")

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _oracle(q, k, v, rate, s0):
    """zoo.attention.linear._core_scan in float32 (independent token recurrence)."""
    b, t, h, _ = q.shape
    g = None if rate is None else jnp.broadcast_to(-jnp.asarray(rate, jnp.float32), (b, t, h))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        return zl._core_scan(f32(q), f32(k), f32(v), g, f32(s0))


def _inputs(seed, b, t, h, f, e, dtype, decay):
    q = rand(seed, b, t, h, f, scale=0.5)
    k = rand(seed + 1, b, t, h, f, scale=0.5)
    v = rand(seed + 2, b, t, h, e)
    s0 = rand(seed + 3, b, h, f, e)
    do = rand(seed + 4, b, t, h, e)
    dst = rand(seed + 5, b, h, f, e)
    rate = np.linspace(0.02, 0.6, h).astype(np.float32) if decay else None
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), rate, jnp.asarray(s0), cast(do), jnp.asarray(dst)


def _vjp(fn, q, k, v, s0, do, dst):
    (o, st), pull = jax.vjp(fn, q, k, v, s0)
    return (o, st), pull((do, dst))


def _check(fn, q, k, v, rate, s0, do, dst, tol, what):
    (o, st), grads = jax.jit(lambda *a: _vjp(fn, *a))(q, k, v, s0, do, dst)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    (o_r, st_r), grads_r = _vjp(lambda *a: _oracle(*a[:3], rate, a[3]), f32(q), f32(k), f32(v), s0, f32(do), dst)
    assert o.dtype == q.dtype and st.dtype == jnp.float32
    names = ("out", "final_state", "dq", "dk", "dv", "d_initial_state")
    for name, a, e in zip(names, (o, st, *grads), (o_r, st_r, *grads_r)):
        scale = float(jnp.abs(e).max())
        assert_close(f32(a), e, atol=tol * scale, rtol=tol, what=f"{what} {name}")


CASES = [
    # backend, dtype, (b, t, h, f, e), chunk, decay, block_e
    ("tpu", jnp.float32, (1, 37, 2, 16, 9), 16, True, None),  # ragged last block, tiny head dims
    ("tpu", jnp.float32, (1, 24, 1, 128, 65), 8, False, None),  # head dim 128, zoo's E = D + 1
    ("tpu", jnp.bfloat16, (1, 33, 2, 64, 64), 16, True, None),
    ("gpu", jnp.float32, (1, 45, 2, 64, 40), 16, True, 16),  # 3 value tiles, ragged
    ("gpu", jnp.bfloat16, (1, 30, 1, 32, 17), 16, False, None),
]


@pytest.mark.parametrize("backend,dtype,shape,chunk,decay,block_e", CASES)
def test_matches_oracle(backend, dtype, shape, chunk, decay, block_e):
    q, k, v, rate, s0, do, dst = _inputs(0, *shape, dtype, decay)
    bs = BlockSizes(block_t=chunk, block_e=block_e)

    def fn(q, k, v, s0):
        return causal_linear_attention(
            q, k, v, rate, initial_state=s0, backend=backend, block_sizes=bs, interpret=True
        )

    _check(fn, q, k, v, rate, s0, do, dst, TOL[dtype], f"{backend}/{jnp.dtype(dtype).name}/{shape}")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_rates_zero_and_inf_are_exact(backend):
    """Rates 0 (no decay) and +inf (lambda = 0: a reset every token) in one call, ragged last
    block: finite and equal to the oracle, values and gradients (float32 1e-4)."""
    q, k, v, _, s0, do, dst = _inputs(21, 1, 19, 3, 16, 8, jnp.float32, False)
    rate = np.array([0.0, np.inf, 0.7], np.float32)

    def fn(q, k, v, s0):
        return causal_linear_attention(
            q, k, v, rate, initial_state=s0, chunk_size=8, backend=backend, interpret=True
        )

    _check(fn, q, k, v, rate, s0, do, dst, 1e-4, f"{backend} rates 0/inf")


def test_tpu_interpret_params():
    """The TPU program under the TPU simulator (randomised parallel grid order, NaN-filled
    uninitialised memory): catches reliance on the order of parallel grid steps or unwritten
    scratch."""
    q, k, v, rate, s0, do, dst = _inputs(7, 1, 20, 2, 16, 8, jnp.float32, True)
    params = pltpu.InterpretParams(random_seed=3, uninitialized_memory="nan")

    def fn(q, k, v, s0):
        return causal_linear_attention(
            q, k, v, rate, initial_state=s0, chunk_size=8, backend="tpu", interpret=params
        )

    _check(fn, q, k, v, rate, s0, do, dst, 1e-4, "tpu InterpretParams")


def test_no_initial_state_and_decay_not_differentiated():
    q, k, v, rate, s0, _, _ = _inputs(3, 1, 12, 2, 8, 8, jnp.float32, True)
    out, st = causal_linear_attention(q, k, v, rate, chunk_size=8)
    o_r, st_r = _oracle(q, k, v, rate, jnp.zeros_like(s0))
    assert_close(out, o_r, atol=1e-4 * float(jnp.abs(o_r).max()), what="out")
    assert_close(st, st_r, atol=1e-4 * float(jnp.abs(st_r).max()), what="state")
    g = jax.grad(lambda r: causal_linear_attention(q, k, v, r, chunk_size=8)[0].sum())(jnp.asarray(rate))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_through_zoo_linear_elu_normalized():
    """zoo.attention.linear(impl="pallas") == linear_naive (elu feature map, normaliser through
    the appended ones column), values and input gradients, with ALiBi decay."""
    b, t, h, d = 1, 21, 2, 16
    q, k, v = (jnp.asarray(rand(i, b, t, h, d)) for i in (10, 11, 12))
    kw = dict(causal=True, feature_map="elu", normalize=True, decay=zl.alibi_slopes(h))

    def pallas(q, k, v):
        return zl.linear(q, k, v, impl="pallas", chunk_size=8, **kw)

    y, pull = jax.vjp(jax.jit(pallas), q, k, v)
    y_r, pull_r = jax.vjp(lambda q, k, v: zl.linear_naive(q, k, v, **kw), q, k, v)
    assert_close(y, y_r, atol=1e-4, rtol=1e-4, what="zoo linear pallas vs naive")
    dy = jnp.asarray(rand(13, b, t, h, d))
    for name, a, e in zip("qkv", pull(dy), pull_r(dy)):
        assert_close(a, e, atol=1e-4 * float(jnp.abs(e).max()), rtol=1e-4, what=f"d{name}")


def test_sharded_batch_and_heads():
    """zoo.attention.dispatch.kernel_call: the kernel under shard_map over a (2 batch) x (4 heads)
    mesh of the simulated CPU devices (explicit mesh and rules) equals the oracle, values and
    gradients."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 simulated CPU devices)")
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    q, k, v, rate, s0, do, dst = _inputs(5, 2, 12, 4, 8, 8, jnp.float32, True)
    x, st = ("batch", None, "heads", None), ("batch", "heads", None, None)

    def fn(q, k, v, s0):
        def local(q, k, v, r, s0):
            assert q.shape == (1, 12, 1, 8), q.shape  # one batch element and one head per device
            return causal_linear_attention(q, k, v, r, initial_state=s0, chunk_size=8)

        return dispatch.kernel_call(
            local, (q, k, v, jnp.asarray(rate), s0), in_axes=(x, x, x, ("heads",), st), out_axes=(x, st),
            mesh=mesh, rules=(("batch", "data"), ("heads", "model")),
        )

    _check(fn, q, k, v, rate, s0, do, dst, 1e-4, "sharded")


def test_reference_matches_zoo_chunked():
    q, k, v, rate, s0, _, _ = _inputs(9, 2, 19, 3, 8, 5, jnp.float32, True)
    g = jnp.broadcast_to(-jnp.asarray(rate), (2, 19, 3))
    with jax.default_matmul_precision("highest"):
        o_c, st_c = zl._core_chunked(q, k, v, g, s0, 8)
    o, st = kernels_pallas.causal_linear_attention_reference(q, k, v, rate, initial_state=s0)
    assert_close(o, o_c, atol=1e-4 * float(jnp.abs(o_c).max()), what="out")
    assert_close(st, st_c, atol=1e-4 * float(jnp.abs(st_c).max()), what="state")


def test_block_plans():
    """Padding rules: Triton tiles are powers of two, Mosaic blocks (8k, 128m)."""
    gpu = la.make_plan(
        100, 65, 65, jnp.bfloat16, backend="gpu", interpret=True, chunk_size=48, block_sizes=None,
        has_decay=True, precision=None,
    )
    assert (gpu.bt, gpu.nb, gpu.fp, gpu.be, gpu.ep) == (64, 2, 128, 64, 128)
    assert gpu.precision is None
    tpu = la.make_plan(
        100, 65, 65, jnp.float32, backend="tpu", interpret=True, chunk_size=None, block_sizes=None,
        has_decay=False, precision=None,
    )
    assert (tpu.bt, tpu.nb, tpu.fp, tpu.be, tpu.ep) == (104, 1, 128, 128, 128)
    assert tpu.precision == jax.lax.Precision.HIGHEST
    tiny = la.make_plan(
        5, 8, 3, jnp.bfloat16, backend="tpu", interpret=True, chunk_size=64, block_sizes=None,
        has_decay=False, precision=None,
    )
    assert tiny.bt == 16 and tiny.nb == 1
    assert BlockSizes.get_default("gpu").block_e == 64 and BlockSizes.get_default("tpu").block_t == 128


def test_validation_errors():
    q = jnp.zeros((1, 8, 2, 4))
    v = jnp.zeros((1, 8, 2, 3))
    with pytest.raises(ValueError, match="k must have the shape of q"):
        causal_linear_attention(q, jnp.zeros((1, 8, 2, 5)), v)
    with pytest.raises(ValueError, match="decay_rate"):
        causal_linear_attention(q, q, v, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="initial_state"):
        causal_linear_attention(q, q, v, initial_state=jnp.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="chunk_size"):
        causal_linear_attention(q, q, v, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        causal_linear_attention(q, q, v, backend="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret"):
            causal_linear_attention(q, q, v, interpret=False)  # backend=None resolves to CPU
    with pytest.raises(ValueError, match="InterpretParams"):
        causal_linear_attention(q, q, v, backend="gpu", interpret=pltpu.InterpretParams())


# ----------------------------------------------------------------------------- lowering on a CPU host


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_hardware(platform):
    """Cross-platform export runs the real Pallas -> Mosaic TPU / Pallas -> Triton lowering (block
    shape rules, Triton power-of-two tiles, supported ops) for forward and backward on this CPU
    host. It does not run Mosaic's / Triton's own compilers: the marked tests below do that."""
    from jax import export

    backend = "tpu" if platform == "tpu" else "gpu"
    q = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 200, 2, 65), jnp.bfloat16)
    s0 = jax.ShapeDtypeStruct((1, 2, 64, 65), jnp.float32)
    rate = jnp.asarray([0.1, 0.4])

    def fwd_bwd(q, k, v, s0):
        def f(q, k, v, s0):
            return causal_linear_attention(q, k, v, rate, initial_state=s0, backend=backend, interpret=False)

        (o, st), pull = jax.vjp(f, q, k, v, s0)
        return o, st, pull((o, st))

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)(q, q, v, s0)
    text = exp.mlir_module()
    target = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    assert text.count(target) >= 4, f"expected 4 {platform} kernels (fwd, intra, dq, dkv)"


# ----------------------------------------------------------------------------- real hardware


def _has(platform: str) -> bool:
    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


HW_CASES = [
    (jnp.float32, (2, 1000, 4, 64, 65), True),
    (jnp.bfloat16, (2, 2048, 4, 128, 128), True),
    (jnp.bfloat16, (1, 777, 2, 64, 64), False),
]


def _hardware_check(platform, dtype, shape, decay):
    dev = jax.devices(platform)[0]
    q, k, v, rate, s0, do, dst = jax.device_put(_inputs(1, *shape, dtype, decay), dev)

    def fn(q, k, v, s0):
        return causal_linear_attention(q, k, v, rate, initial_state=s0, interpret=False)

    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # real MXU / tensor-core accumulation order
    _check(fn, q, k, v, rate, s0, do, dst, tol, f"{platform} {shape}")


@pytest.mark.gpu
@pytest.mark.skipif(not _has("gpu"), reason="no GPU backend")
@pytest.mark.parametrize("dtype,shape,decay", HW_CASES)
def test_gpu_triton_kernel(dtype, shape, decay):
    _hardware_check("gpu", dtype, shape, decay)


@pytest.mark.tpu
@pytest.mark.skipif(not _has("tpu"), reason="no TPU backend")
@pytest.mark.parametrize("dtype,shape,decay", HW_CASES)
def test_tpu_mosaic_kernel(dtype, shape, decay):
    _hardware_check("tpu", dtype, shape, decay)
