"""Speed of the Pallas flash-attention kernels (every variant) vs cuDNN / XLA dot_product_attention.

For T = 4k..32k (``--lengths``), B=2, H=16 query heads on 16 (``--kv-heads`` for GQA) key/value
heads, D = 128, bfloat16 inputs, causal, one run measures the median wall time
(``block_until_ready``, after a compile + warm-up call) of the forward and of forward+backward
(``jax.vjp`` with a fixed cotangent, q/k/v differentiated) for

- ``pallas <variant>``: ``kernels_pallas.flash_attention`` with plain softmax, learned sinks,
  log-n scaling, ALiBi, a sliding window (``--window``, 512), sigmoid and softplus (LSSA);
- ``dpa``: ``jax.nn.dot_product_attention(is_causal=True)`` (``implementation="cudnn"`` on GPU,
  XLA on TPU), the library kernel that plain softmax dispatches to;

and the achieved TFLOP/s and fraction of the device's dense bf16 peak: causal attention forward
``2 B H T^2 D`` (half of ``4 B H T^2 D``), a window ``4 B H T w D``; forward+backward 3.5x the
forward (FlashAttention-2's accounting: the backward does 2.5x the forward's matmuls).

Before timing, each variant is checked against the dense oracle
(``kernels_pallas.flash_attention_reference`` in float32 on the bf16-rounded inputs) at B=1,
T=1000 (a wrong kernel is not timed).

Pallas on CPU runs only in interpret mode, a Python-level emulation whose timings measure
nothing meaningful about the kernel: on CPU the script says so and exits (status 2).

    python benchmarks/flash_attention_kernel.py            # full sweep
    python benchmarks/flash_attention_kernel.py --quick    # T in {4k, 8k}, 3 reps
    python benchmarks/flash_attention_kernel.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas.flash_attention import flash_attention, flash_attention_reference  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from linear_attention_kernel import device_peak, time_fn, with_backward  # noqa: E402 (one copy of the timing code)


def variants(h: int, window: int) -> dict[str, dict[str, Any]]:
    """name -> flash_attention options (all causal)."""
    slopes = jnp.asarray([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], jnp.float32)
    return {
        "softmax": dict(variant="softmax"),
        "softmax+sinks": dict(variant="softmax", sink_logit=jnp.zeros((h,), jnp.float32)),
        "softmax+logn": dict(variant="softmax", logn_train_length=2048),
        "softmax+alibi": dict(variant="softmax", alibi_slopes=slopes),
        f"softmax+window{window}": dict(variant="softmax", window=window),
        "sigmoid": dict(variant="sigmoid"),
        "softplus": dict(variant="softplus"),
    }


def attention_flops(b: int, h: int, t: int, d: int, window: int | None, backward: bool) -> float:
    fwd = 4.0 * b * h * t * min(window, t) * d if window else 2.0 * b * h * t * t * d
    return fwd * (3.5 if backward else 1.0)


def check(opts: dict[str, Any], hkv: int) -> float:
    """Max error of the kernel (bf16) vs the dense oracle (float32), relative to its max."""
    rng = np.random.default_rng(0)
    b, t, h, d = 1, 1000, 4, 64
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, t, min(hkv, h), d)), jnp.bfloat16) for _ in range(2))
    opts = {**opts, **({"sink_logit": opts["sink_logit"][:h]} if "sink_logit" in opts else {})}
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = opts["alibi_slopes"][:h]
    got = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, **opts))(q, k, v).astype(jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda q, k, v: flash_attention_reference(q, k, v, causal=True, **opts))(f32(q), f32(k), f32(v))
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in {4k, 8k}, 3 reps")
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    platform = jax.default_backend()
    if platform == "cpu":
        print(
            "not benchmarking: the default backend is CPU, where Pallas runs only in interpret mode "
            "(a Python-level emulation); its timings measure nothing meaningful about the kernels. "
            "Run on a GPU or TPU.",
            file=sys.stderr,
        )
        return 2
    dev = jax.devices()[0]
    peak = args.peak_tflops or device_peak(dev.device_kind)
    lengths = args.lengths or ([4096, 8192] if args.quick else [4096, 8192, 16384, 32768])
    reps = args.reps or (3 if args.quick else 10)
    b, h, d = args.batch, args.heads, args.dim
    hkv = args.kv_heads or h
    blocks = dict(block_q=args.block_q, block_k=args.block_k)
    table = variants(h, args.window)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only}
    print(f"# device: {dev.device_kind} ({platform}), peak bf16 {peak or 'unknown'} TFLOP/s, jax {jax.__version__}, "
          f"B={b} H={h} Hkv={hkv} D={d} causal bf16, reps={reps}")
    errs = {name: check(opts, hkv) for name, opts in table.items()}
    for name, err in errs.items():
        print(f"# {name}: kernel vs dense oracle at B1 T1000 H4 D64: max rel err {err:.2e}")
    bad = [n for n, e in errs.items() if not e < 5e-2]
    if bad:
        print(f"kernel output is wrong on this device for {bad}: not timing them", file=sys.stderr)
        table = {k: v for k, v in table.items() if k not in bad}

    dpa_impl = "cudnn" if platform == "gpu" else None
    impls: dict[str, tuple[Callable, int | None]] = {
        f"dpa ({dpa_impl or 'xla'})": (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dpa_impl), None,
        )
    }
    for name, opts in table.items():
        impls[f"pallas {name}"] = (
            lambda q, k, v, opts=opts: flash_attention(q, k, v, causal=True, **opts, **blocks), opts.get("window"),
        )

    rows: list[dict[str, Any]] = []
    header = f"{'impl':<28}{'T':>7}  {'mode':<8}{'ms':>10}{'TFLOP/s':>10}{'% peak':>8}"
    print(header)
    print("-" * len(header))
    for t in lengths:
        rng = np.random.default_rng(t)
        q, ct = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16) for _ in range(2))
        k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.bfloat16) for _ in range(2))
        for name, (f, window) in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                fn = jax.jit(f) if mode == "fwd" else jax.jit(with_backward(f))
                call_args = (q, k, v) if mode == "fwd" else (q, k, v, ct)
                try:
                    sec = time_fn(fn, call_args, reps)
                except Exception as exc:  # OOM or unsupported (e.g. cuDNN shape limits)
                    msg = str(exc).splitlines()[0][:60]
                    print(f"{name:<28}{t:>7}  {mode:<8}{'failed: ' + msg:>36}")
                    rows.append(dict(impl=name, t=t, mode=mode, error=msg))
                    continue
                tflops = attention_flops(b, h, t, d, window, mode != "fwd") / sec / 1e12
                frac = 100 * tflops / peak if peak else float("nan")
                print(f"{name:<28}{t:>7}  {mode:<8}{sec * 1e3:>10.3f}{tflops:>10.1f}{frac:>8.1f}")
                rows.append(dict(impl=name, t=t, mode=mode, ms=sec * 1e3, tflops=tflops, pct_peak=frac))
    if args.json:
        args.json.write_text(json.dumps(dict(
            device=dev.device_kind, platform=platform, jax=jax.__version__, peak_tflops=peak, batch=b, heads=h,
            kv_heads=hkv, dim=d, window=args.window, check_rel_err=errs, rows=rows,
        ), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
