"""kernels_pallas.flash_attention vs the quadratic references of zoo.attention.softmax.

Interpret mode on CPU for both programs (``backend="tpu"``: grids with a sequential key/query axis
and VMEM scratch; ``backend="gpu"``: Triton-style loops inside each program), float32, forward and
the gradients of q, k, v (and the sink logits). References: ``zoo.attention.softmax`` /
``sliding_window`` (with the ALiBi / bias-function terms passed as a ``[B, H, Tq, Tk]`` bias array
built here in numpy), ``sigmoid_naive`` and ``softplus_naive``. Tolerance: 1e-4 relative to the
largest reference magnitude plus 1e-4 elementwise (float32 everywhere, HIGHEST matmul precision;
the kernels sum in another order). Lengths are ragged against the blocks (37 vs 16); grouped-query
heads (4 query heads on 2 key/value heads). Real-hardware runs are marked ``gpu`` / ``tpu``.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from kernels_pallas import flash_attention as fa
from kernels_pallas.flash_attention import common as cm
from tests.helpers import assert_close, rand

# zoo.attention re-exports the function `softmax`, which shadows the module attribute.
zs = importlib.import_module("zoo.attention.softmax")

TOL = 1e-4
H, HKV, D = 4, 2, 16
SINKS = np.array([-0.5, 0.3, 1.2, 0.0], np.float32)
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)


def rel_bias(q_pos, k_pos, head):
    """A bias function of positions (T5-like log distance, per-head strength): elementwise."""
    dist = jnp.abs(q_pos - k_pos).astype(jnp.float32)
    return -0.1 * (head + 1).astype(jnp.float32) * jnp.log1p(dist)


def table_bias(q_pos, k_pos):
    """zoo.attention.blockwise's bias_fn form: 1-D positions -> a per-head table [H, n, m]."""
    dist = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
    strength = (jnp.arange(H)[:, None, None] + 1).astype(jnp.float32)  # (Mosaic has no float iota)
    return -0.02 * strength * jnp.sqrt(dist)


def _bias_array(tq, tk, *, alibi=False, fn=None, scalar=0.0):
    """The same terms as a ``[1, H, Tq, Tk]`` array for the zoo references (numpy, not the kernel)."""
    i = np.arange(tq)[:, None]
    j = np.arange(tk)[None, :]
    out = np.full((1, H, tq, tk), scalar, np.float32)
    for h in range(H):
        if alibi:
            out[0, h] -= SLOPES[h] * np.abs(i - j)
        if fn is rel_bias:
            out[0, h] += -0.1 * (h + 1) * np.log1p(np.abs(i - j))
        elif fn is table_bias:
            out[0, h] += -0.02 * (h + 1) * np.sqrt(np.abs(i - j))
    return jnp.asarray(out)


def _reference(variant, tq, tk, opts):
    """The zoo reference for ``opts`` (kernel options) as ``fn(q, k, v, sink)``."""
    causal, window = opts.get("causal", False), opts.get("window")
    alibi, fn = "alibi_slopes" in opts, opts.get("bias_fn")
    if variant == "softmax":
        bias = _bias_array(tq, tk, alibi=alibi, fn=fn) if (alibi or fn) else None
        kw = dict(causal=causal, bias=bias, logn_train_length=opts.get("logn_train_length"),
                  logn_kind=opts.get("logn_kind", "ratio"))
        if window is not None:
            return lambda q, k, v, s: zs.sliding_window(q, k, v, window=window, sink_logit=s, **kw)
        return lambda q, k, v, s: zs.softmax(q, k, v, sink_logit=s, **kw)
    if variant == "sigmoid":
        b = opts.get("sigmoid_bias", -np.log(tk))
        bias = _bias_array(tq, tk, alibi=alibi, fn=fn, scalar=b) if (alibi or fn) else b
        return lambda q, k, v, s: zs.sigmoid_naive(q, k, v, causal=causal, window=window, bias=bias)
    return lambda q, k, v, s: zs.softplus_naive(q, k, v, causal=causal, window=window)


def _inputs(seed, tq, tk):
    q = jnp.asarray(rand(seed, 1, tq, H, D))
    k = jnp.asarray(rand(seed + 1, 1, tk, HKV, D))
    v = jnp.asarray(rand(seed + 2, 1, tk, HKV, D))
    dy = jnp.asarray(rand(seed + 3, 1, tq, H, D))
    return q, k, v, dy


def _check(variant, tq, tk, opts, *, what, backend="tpu", interpret=True, seed=0, block=(16, 16), tol=TOL):
    q, k, v, dy = _inputs(seed, tq, tk)
    kopts = dict(opts)
    if "alibi_slopes" in kopts:
        kopts["alibi_slopes"] = jnp.asarray(SLOPES)
    has_sink = kopts.pop("sink", False)
    sink = jnp.asarray(SINKS) if has_sink else None

    def kern(q, k, v, s):
        return fa.flash_attention(
            q, k, v, variant=variant, sink_logit=s, block_q=block[0], block_k=block[1], backend=backend,
            interpret=interpret, **kopts,
        )

    def vjp(fn, *args):
        y, pull = jax.vjp(fn, *args)
        return y, pull(dy)

    y, grads = jax.jit(lambda *a: vjp(kern, *a))(q, k, v, sink)
    with jax.default_matmul_precision("highest"):
        y_r, grads_r = jax.jit(lambda *a: vjp(_reference(variant, tq, tk, opts), *a))(q, k, v, sink)
    assert_close(y, y_r, atol=tol * float(jnp.abs(y_r).max()), rtol=tol, what=f"{what} out")
    for name, a, e in zip(("dq", "dk", "dv", "dsink"), grads, grads_r):
        if e is None:
            continue
        assert_close(a, e, atol=tol * float(jnp.abs(e).max()), rtol=tol, what=f"{what} {name}")


CASES = [
    # backend, variant, (tq, tk), options, (block_q, block_k)
    ("tpu", "softmax", (37, 37), dict(causal=True, sink=True, logn_train_length=8), (16, 16)),
    ("tpu", "softmax", (21, 37), dict(alibi_slopes=True, bias_fn=rel_bias), (16, 16)),  # cross lengths
    # (the window case runs under the TPU simulator: see test_matches_zoo_reference)
    ("tpu", "softmax", (40, 40), dict(causal=True, window=9, alibi_slopes=True, sink=True), (8, 16)),
    ("tpu", "sigmoid", (37, 37), dict(causal=True, alibi_slopes=True), (16, 16)),
    ("tpu", "softplus", (40, 40), dict(causal=True, window=11), (16, 16)),
    ("gpu", "softmax", (37, 37), dict(causal=True, window=12, logn_train_length=16, logn_kind="sqrt", sink=True,
                                      bias_fn=table_bias), (16, 16)),
    ("gpu", "sigmoid", (21, 37), dict(sigmoid_bias=-1.5, bias_fn=rel_bias), (16, 16)),
    ("gpu", "softplus", (19, 37), {}, (16, 16)),  # LSSA over every key: n_i = k_length
]


@pytest.mark.parametrize("backend,variant,lengths,opts,block", CASES)
def test_matches_zoo_reference(backend, variant, lengths, opts, block):
    """The TPU window case runs under the TPU simulator (randomised order of the parallel grid
    axes, NaN-filled uninitialised memory): catches reliance on the order of parallel grid steps or
    on unwritten scratch."""
    interpret = True
    if backend == "tpu" and "window" in opts and variant == "softmax":
        interpret = pltpu.InterpretParams(random_seed=3, uninitialized_memory="nan")
    _check(variant, *lengths, opts, what=f"{backend}/{variant}/{sorted(opts)}", backend=backend, block=block,
           interpret=interpret)


def test_reference_module_matches_zoo():
    """kernels_pallas.flash_attention_reference (the benchmarks' oracle) equals the zoo references."""
    q, k, v, _ = _inputs(8, 13, 13)
    sink = jnp.asarray(SINKS)
    sink = jnp.asarray(SINKS)
    kw = dict(causal=True, window=5, sink_logit=sink, logn_train_length=4)

    @jax.jit
    def both(q, k, v):
        a = [fa.flash_attention_reference(q, k, v, alibi_slopes=jnp.asarray(SLOPES), bias_fn=rel_bias, **kw)]
        e = [zs.sliding_window(q, k, v, bias=_bias_array(13, 13, alibi=True, fn=rel_bias), **kw)]
        for variant, ref in (("sigmoid", zs.sigmoid_naive), ("softplus", zs.softplus_naive)):
            a.append(fa.flash_attention_reference(q, k, v, variant=variant, causal=True))
            e.append(ref(q, k, v, causal=True))
        return a, e

    with jax.default_matmul_precision("highest"):
        a, e = both(q, k, v)
    for name, x, y in zip(("softmax", "sigmoid", "softplus"), a, e):
        assert_close(x, y, atol=1e-5, what=f"reference {name}")


def test_window_grid_is_proportional_to_the_window():
    """A sliding window's key axis has O(window / block) steps, not O(T / block): T=8192,
    window 256, blocks 128 -> 4 key steps per query block (and 4 query steps per key block)."""
    plan = cm.make_plan(
        8192, 8192, 64, 64, 1, jnp.bfloat16, backend="tpu", interpret=False, variant="softmax", causal=True,
        window=256, scale=0.125, sigmoid_bias=0.0, logn=None, has_sink=False, has_alibi=False, bias_fn=None,
        eps=1e-8, block_q=128, block_k=128, block_sizes=None, precision=None,
    )
    assert (plan.nq, plan.nk, plan.kv_steps, plan.q_steps) == (64, 64, 4, 4)
    # Every visible (query, key) pair lies in the visited blocks and nothing is visited twice.
    for i in range(plan.nq):
        lo, hi = (int(x) for x in cm.kv_range(plan, i))
        assert hi - lo <= plan.kv_steps
        assert lo * 128 <= max(0, i * 128 - 255) and hi * 128 >= i * 128 + 128
    for j in range(plan.nk):
        lo, hi = (int(x) for x in cm.q_range(plan, j))
        assert hi - lo <= plan.q_steps and lo * 128 <= j * 128 and hi * 128 >= min(8192, j * 128 + 127 + 256)


def test_sharded_batch_and_kv_heads():
    """flash_attention_sharded under shard_map over a (2 batch) x (2 heads) mesh of simulated CPU
    devices (GQA: whole groups per device, sinks following their heads) equals the zoo reference,
    values and gradients."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 simulated CPU devices)")
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    q, k, v, dy = (jnp.concatenate([x, 2 * x], axis=0) for x in _inputs(5, 16, 16))
    sink = jnp.asarray(SINKS)

    def kern(q, k, v, s):
        return fa.flash_attention_sharded(
            q, k, v, mesh=mesh, rules=(("batch", "data"), ("heads", "model")), causal=True, sink_logit=s,
            block_q=8, block_k=8,
        )

    def vjp(fn, *args):
        y, pull = jax.vjp(fn, *args)
        return y, pull(dy)

    y, grads = jax.jit(lambda *a: vjp(kern, *a))(q, k, v, sink)
    with jax.default_matmul_precision("highest"):
        ref = lambda q, k, v, s: zs.softmax(q, k, v, causal=True, sink_logit=s)  # noqa: E731
        y_r, grads_r = jax.jit(lambda *a: vjp(ref, *a))(q, k, v, sink)
    assert_close(y, y_r, atol=TOL * float(jnp.abs(y_r).max()), rtol=TOL, what="sharded out")
    for name, a, e in zip(("dq", "dk", "dv", "dsink"), grads, grads_r):
        assert_close(a, e, atol=TOL * float(jnp.abs(e).max()), rtol=TOL, what=f"sharded {name}")


def test_supports_reasons():
    assert fa.supports(variant="softmax", causal=True, window=4, sink_logit=1) is None
    assert "LSSAR" in fa.supports(variant="softplus", reweight=True)
    assert "mask" in fa.supports(mask=jnp.ones((1, 1, 4, 4), bool))
    assert "bias array" in fa.supports(bias=jnp.zeros((1, 1, 4, 4)))
    assert fa.supports(variant="sigmoid", bias=-2.0) is None
    assert "segment" in fa.supports(segment_ids=jnp.zeros((1, 4), jnp.int32))
    assert "softmax" in fa.supports(variant="sigmoid", sink_logit=jnp.zeros(4))
    assert "variant" in fa.supports(variant="relu")
    assert "logn_kind" in fa.supports(logn_kind="cube")
    assert "learned ALiBi" in fa.supports(alibi_slopes=jnp.ones(4), learn_alibi=True)


def test_validation_errors():
    q = jnp.zeros((1, 8, 4, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    bad = [
        (dict(window=0, causal=True), "window"),
        (dict(window=4), "causal=True"),
        (dict(block_q=0), "block_q"),
        (dict(block_k=-4), "block_k"),
        (dict(sink_logit=jnp.zeros(3)), "sink_logit must be \\[heads=4\\]"),
        (dict(alibi_slopes=jnp.zeros(2)), "alibi_slopes"),
        (dict(logn_train_length=1), "logn_train_length"),
        (dict(variant="relu"), "variant"),
        (dict(variant="softplus", alibi_slopes=jnp.zeros(4)), "no additive bias"),
        (dict(backend="cuda"), "backend"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fa.flash_attention(q, kv, kv, **kw)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        fa.flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)))
    with pytest.raises(ValueError, match="same length"):
        fa.flash_attention(q, jnp.zeros((1, 9, 2, 16)), jnp.zeros((1, 9, 2, 16)), causal=True)
    with pytest.raises(ValueError, match="v must be"):
        fa.flash_attention(q, kv, jnp.zeros((1, 7, 2, 16)))


# ----------------------------------------------------------------------------- lowering on a CPU host


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_hardware(platform):
    """Cross-platform export runs the real Pallas -> Mosaic TPU / Pallas -> Triton lowering (block
    shape rules, Triton power-of-two tiles, supported ops) of forward, dQ and dK/dV for every
    variant (bfloat16, GQA, causal window, ragged length). It does not run Mosaic's / Triton's own
    compilers: the marked tests below do that on hardware."""
    from jax import export

    backend = "tpu" if platform == "tpu" else "gpu"
    q = jax.ShapeDtypeStruct((1, 300, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
    extra = {
        "softmax": dict(sink_logit=jnp.zeros(4), logn_train_length=128, logn_kind="sqrt", alibi_slopes=jnp.ones(4),
                        bias_fn=rel_bias),
        "sigmoid": dict(alibi_slopes=jnp.ones(4), bias_fn=table_bias),
        "softplus": {},
    }

    def fwd_bwd(q, k, v):
        outs = []
        for variant, kw in extra.items():
            def f(q, k, v, variant=variant, kw=kw):
                return fa.flash_attention(
                    q, k, v, variant=variant, causal=True, window=200, backend=backend, interpret=False, **kw
                )

            o, pull = jax.vjp(f, q, k, v)
            outs.append((o, pull(o)))
        return outs

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)(q, k, k)
    target = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    assert exp.mlir_module().count(target) >= 9, f"expected 3 {platform} kernels per variant"


# ----------------------------------------------------------------------------- real hardware


def _has(platform: str) -> bool:
    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


HW_CASES = [
    ("softmax", (1000, 1000), dict(causal=True, sink=True, logn_train_length=512)),
    ("softmax", (777, 1000), dict(alibi_slopes=True)),
    ("softmax", (1000, 1000), dict(causal=True, window=300, alibi_slopes=True)),
    ("sigmoid", (1000, 1000), dict(causal=True)),
    ("softplus", (1000, 1000), dict(causal=True)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _has("gpu"), reason="no GPU backend")
@pytest.mark.parametrize("variant,lengths,opts", HW_CASES)
def test_gpu_triton_kernel(variant, lengths, opts):
    with jax.default_device(jax.devices("gpu")[0]):
        _check(variant, *lengths, opts, what=f"gpu {variant}", backend="gpu", interpret=False, block=(64, 64),
               tol=2e-3)  # real tensor-core accumulation order


@pytest.mark.tpu
@pytest.mark.skipif(not _has("tpu"), reason="no TPU backend")
@pytest.mark.parametrize("variant,lengths,opts", HW_CASES)
def test_tpu_mosaic_kernel(variant, lengths, opts):
    with jax.default_device(jax.devices("tpu")[0]):
        _check(variant, *lengths, opts, what=f"tpu {variant}", backend="tpu", interpret=False, block=(128, 128),
               tol=2e-3)  # real MXU accumulation order
