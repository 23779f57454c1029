"""Speed of the causal linear attention Pallas kernel vs the XLA chunked form vs softmax attention.

For T = 1k..64k, B*H = 32 (B=4, H=8), D = 64 and 128, bfloat16 inputs, per-head ALiBi decay
(``--no-decay`` to drop it), one run measures the median wall time (``block_until_ready``, after
a compile + warm-up call) of the forward and of forward+backward (``jax.vjp`` with a fixed
cotangent, all inputs differentiated) for

- ``pallas``: ``kernels_pallas.causal_linear_attention`` (Mosaic TPU / Triton GPU kernels),
- ``xla_chunked``: ``zoo.attention.linear._core_chunked`` (Lightning-2 chunked form in plain XLA),
- ``dpa``: ``jax.nn.dot_product_attention(is_causal=True)`` (cuDNN flash attention on GPU where
  available, XLA elsewhere; out-of-memory at long T is reported as such),

and the achieved TFLOP/s and fraction of the device's dense bf16 peak from the FLOP formulas in
``shared/design/benchmarks.md`` section 2: linear fwd ``4BHTD(C+D)``, bwd ``8BHTCD + 10BHTD^2``;
causal softmax fwd ``2BHT^2 D``, bwd ``2.5 x fwd``.

Pallas on CPU runs only in interpret mode, which says nothing about kernel speed: the script
refuses to time it (exit status 2) and says so.

    python benchmarks/linear_attention_kernel.py            # full sweep
    python benchmarks/linear_attention_kernel.py --quick    # T in {1k, 4k}, D=64, fewer reps
    python benchmarks/linear_attention_kernel.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import BlockSizes, causal_linear_attention  # noqa: E402

zl = importlib.import_module("zoo.attention.linear")  # the module (zoo.attention.linear is a function)

# Dense bf16 peak TFLOP/s by device_kind substring (shared/design/benchmarks.md section 2).
PEAKS = (
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("v5", 459.0),
)


def device_peak(kind: str) -> float | None:
    for key, peak in PEAKS:
        if key.lower() in kind.lower():
            return peak
    return None


def linear_flops(b: int, h: int, t: int, d: int, c: int, backward: bool) -> float:
    fwd = 4.0 * b * h * t * d * (c + d)
    return fwd + (8.0 * b * h * t * c * d + 10.0 * b * h * t * d * d if backward else 0.0)


def softmax_flops(b: int, h: int, t: int, d: int, backward: bool) -> float:
    fwd = 4.0 * b * h * t * t * d / 2  # causal
    return fwd * (3.5 if backward else 1.0)


def time_fn(fn: Callable, args: tuple, reps: int) -> float:
    """Median seconds of ``reps`` calls after one compile and one warm-up call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def impls(h: int, chunk: int, decay: bool, platform: str) -> dict[str, Callable]:
    """name -> f(q, k, v) -> output (causal, [B, T, H, D] bf16)."""
    rate = zl.alibi_slopes(h) if decay else None
    bs = BlockSizes.get_default("gpu" if platform == "gpu" else "tpu")
    bs = BlockSizes(block_t=chunk, block_e=bs.block_e, num_warps=bs.num_warps, num_stages=bs.num_stages)

    def pallas(q, k, v):
        return causal_linear_attention(q, k, v, rate, block_sizes=bs)[0]

    def xla_chunked(q, k, v):
        b, t = q.shape[:2]
        g = None if rate is None else jnp.broadcast_to(-rate, (b, t, h))
        s0 = jnp.zeros((b, h, q.shape[-1], v.shape[-1]), jnp.float32)
        return zl._core_chunked(q, k, v, g, s0, chunk)[0].astype(q.dtype)

    dpa_impl = "cudnn" if platform == "gpu" else None

    def dpa(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dpa_impl)

    return {"pallas": pallas, "xla_chunked": xla_chunked, f"dpa ({dpa_impl or 'xla'})": dpa}


def with_backward(f: Callable) -> Callable:
    def run(q, k, v, ct):
        out, pull = jax.vjp(f, q, k, v)
        return out, pull(ct)

    return run


def check_kernel(platform: str, chunk: int, decay: bool) -> float:
    """Max relative error of the kernel vs the XLA chunked form at a small shape (timing a wrong
    kernel is pointless)."""
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 1000, 4, 64
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)) * 0.3, jnp.bfloat16) for _ in range(3))
    fns = impls(h, chunk, decay, platform)
    got = jax.jit(fns["pallas"])(q, k, v).astype(jnp.float32)
    want = jax.jit(fns["xla_chunked"])(*(x.astype(jnp.float32) for x in (q, k, v)))
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in {1k, 4k}, D=64, 3 reps")
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--dims", type=int, nargs="*", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--chunk", type=int, default=None, help="block length C (default: per backend)")
    p.add_argument("--no-decay", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    platform = jax.default_backend()
    if platform == "cpu":
        print(
            "refusing to benchmark: the default backend is CPU, where Pallas runs only in interpret "
            "mode (a Python-level emulation whose timings say nothing about the kernel). Run on a "
            "GPU or TPU.",
            file=sys.stderr,
        )
        return 2
    dev = jax.devices()[0]
    peak = args.peak_tflops or device_peak(dev.device_kind)
    lengths = args.lengths or ([1024, 4096] if args.quick else [1024 * 2**i for i in range(7)])
    dims = args.dims or ([64] if args.quick else [64, 128])
    reps = args.reps or (3 if args.quick else 10)
    chunk = args.chunk or BlockSizes.get_default("gpu" if platform == "gpu" else "tpu").block_t
    decay = not args.no_decay
    b, h = args.batch, args.heads

    err = check_kernel(platform, chunk, decay)
    print(f"# device: {dev.device_kind} ({platform}), peak bf16 {peak or 'unknown'} TFLOP/s, "
          f"jax {jax.__version__}, B={b} H={h} C={chunk} decay={decay} bf16, reps={reps}")
    print(f"# kernel vs XLA chunked at B2 T1000 H4 D64: max rel err {err:.2e}")
    if err > 5e-2:
        print("kernel output is wrong on this device: not timing it", file=sys.stderr)
        return 1

    rows: list[dict[str, Any]] = []
    header = f"{'impl':<18}{'D':>5}{'T':>7}  {'mode':<8}{'ms':>10}{'TFLOP/s':>10}{'% peak':>8}"
    print(header)
    print("-" * len(header))
    for d in dims:
        for t in lengths:
            rng = np.random.default_rng(t + d)
            q, k, v, ct = (jnp.asarray(rng.standard_normal((b, t, h, d)) * 0.3, jnp.bfloat16) for _ in range(4))
            for name, f in impls(h, chunk, decay, platform).items():
                for mode in ("fwd", "fwd+bwd"):
                    fn = jax.jit(f) if mode == "fwd" else jax.jit(with_backward(f))
                    call_args = (q, k, v) if mode == "fwd" else (q, k, v, ct)
                    try:
                        sec = time_fn(fn, call_args, reps)
                    except Exception as exc:  # OOM or unsupported (e.g. cuDNN shape limits)
                        msg = str(exc).splitlines()[0][:60]
                        print(f"{name:<18}{d:>5}{t:>7}  {mode:<8}{'failed: ' + msg:>36}")
                        rows.append(dict(impl=name, d=d, t=t, mode=mode, error=msg))
                        continue
                    bwd = mode != "fwd"
                    if name.startswith("dpa"):
                        fl = softmax_flops(b, h, t, d, bwd)
                    else:
                        fl = linear_flops(b, h, t, d, chunk, bwd)
                    tflops = fl / sec / 1e12
                    frac = 100 * tflops / peak if peak else float("nan")
                    print(f"{name:<18}{d:>5}{t:>7}  {mode:<8}{sec * 1e3:>10.3f}{tflops:>10.1f}{frac:>8.1f}")
                    rows.append(dict(impl=name, d=d, t=t, mode=mode, ms=sec * 1e3, tflops=tflops, pct_peak=frac))
    if args.json:
        args.json.write_text(json.dumps(dict(
            device=dev.device_kind, platform=platform, jax=jax.__version__, peak_tflops=peak,
            batch=b, heads=h, chunk=chunk, decay=decay, kernel_check_rel_err=err, rows=rows,
        ), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
