"""Speed and memory of the attention transforms, as ratios against baselines from the same run.

For every transform and sequence length T (B=1, H=4, D=64, float32 by default) it measures
- the median wall time of ``--reps`` runs after a warm-up (``block_until_ready``),
- the compiled temporary memory ``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``
  (compile only, so it is reported even where running would not fit),
and reports them as ratios against ``jax.nn.dot_product_attention`` and the naive quadratic form
measured in the same run, the time exponent (least-squares slope of log time vs log T), and the
achieved fraction of this machine's float32 matmul throughput (a large ``jnp.dot`` timed in the
same run) from the FLOP formulas in ``shared/design/benchmarks.md`` section 2.

    python benchmarks/attention.py            # full run, rewrites its section of RESULTS.md
    python benchmarks/attention.py --quick    # small T, prints the tables only
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import zoo.attention as za
from zoo.attention import feature_maps
from zoo.attention.linear import resolve_impl

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- BEGIN benchmarks/attention.py -->", "<!-- END benchmarks/attention.py -->"


def _call(tr, kw, q, k, v):
    return tr(q, k, v, **kw)


def transforms(d: int) -> dict[str, tuple[Callable, str]]:
    """name -> (f(q, k, v) causal, complexity class "linear" | "quadratic")."""
    hh = feature_maps.hedgehog_init(None, d)
    out = {
        "dot_product_attention (jax.nn, causal)": (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), "quadratic"),
        "linear naive (masked quadratic)": (
            lambda q, k, v: za.linear_naive(q, k, v, causal=True), "quadratic"),
        "linear impl=auto": (lambda q, k, v: za.linear(q, k, v, causal=True), "linear"),
        "linear impl=chunked (C=64)": (
            lambda q, k, v: za.linear(q, k, v, causal=True, impl="chunked", chunk_size=64), "linear"),
        "linear impl=scan": (lambda q, k, v: za.linear(q, k, v, causal=True, impl="scan"), "linear"),
        "linear + decay, chunked": (
            lambda q, k, v: za.linear(q, k, v, causal=True, impl="chunked", decay=za.alibi_slopes(q.shape[2])),
            "linear"),
        "hedgehog, chunked": (
            lambda q, k, v: za.linear(q, k, v, causal=True, feature_map="hedgehog", feature_map_params=hh,
                                      impl="chunked"), "linear"),
        "softmax (zoo, causal)": (lambda q, k, v: za.softmax(q, k, v, causal=True), "quadratic"),
        "sigmoid (causal)": (lambda q, k, v: za.sigmoid(q, k, v, causal=True), "quadratic"),
        "softplus LSSAR (causal)": (lambda q, k, v: za.softplus(q, k, v, causal=True, reweight=True), "quadratic"),
    }
    # Transforms registered by later issues (aaren, flow, titans, ...) join with their defaults.
    for name in za.names():
        if name in ("softmax", "sigmoid", "softplus", "linear", "hedgehog", "sliding_window", "based",
                    "nalaformer", "positional"):
            continue
        out[f"{name} (registry default)"] = functools.partial(_call, za.get(name), {"causal": True}), "linear"
    return out


def flops(name: str, b: int, h: int, t: int, d: int) -> float | None:
    """Forward FLOPs (benchmarks.md section 2); None where no formula is recorded."""
    if name.startswith(("dot_product_attention", "softmax", "sigmoid", "linear naive")):
        return 4.0 * b * h * t * t * d  # XLA on CPU computes the full T x T (no causal halving)
    if name.startswith("linear impl=chunked") or name.startswith("linear + decay"):
        return 4.0 * b * h * t * d * (64 + d)
    if name.startswith("linear impl=auto"):
        name = f"linear impl={resolve_impl('auto')}"
    if name.startswith("linear impl=scan"):
        return 4.0 * b * h * t * d * d
    return None


def median_time(f: Callable, args, reps: int) -> float:
    jax.block_until_ready(f(*args))  # warm-up (compile + first run)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def temp_bytes(f: Callable, shapes) -> int | None:
    ma = jax.jit(f).lower(*shapes).compile().memory_analysis()
    return None if ma is None else int(ma.temp_size_in_bytes)


def matmul_gflops(reps: int) -> float:
    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2.0 * n**3 / median_time(f, (a,), reps) / 1e9


def slope(ts: list[int], ys: list[float]) -> float:
    x, y = np.log(np.asarray(ts, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(x, y, 1)[0])


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def run(args) -> str:
    b, h, d = args.batch, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    ts = args.lengths
    fns = transforms(d)
    if args.only:
        fns = {k: v for k, v in fns.items() if any(o in k for o in args.only)}
    peak = matmul_gflops(max(args.reps, 5))
    times: dict[str, dict[int, float | None]] = {n: {} for n in fns}
    mem: dict[str, dict[int, int | None]] = {n: {} for n in fns}
    for t in ts:
        key = jax.random.PRNGKey(t)
        q, k, v = (jax.random.normal(kk, (b, t, h, d), dtype) for kk in jax.random.split(key, 3))
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
        for name, (f, kind) in fns.items():
            try:
                mem[name][t] = temp_bytes(f, shapes)
            except Exception as e:  # noqa: BLE001 - report, do not hide
                print(f"  {name} T={t}: compile failed: {type(e).__name__}: {e}", file=sys.stderr)
                mem[name][t] = None
            baseline = name.startswith(("dot_product_attention", "linear naive"))
            run_it = kind == "linear" or baseline or t <= args.max_quadratic_t
            if run_it and mem[name][t] is not None:
                times[name][t] = median_time(jax.jit(f), (q, k, v), args.reps)
            else:
                times[name][t] = None
            print(f"T={t:6d} {name:45s} {fmt_ms(times[name][t]):>10s} ms  {fmt_mib(mem[name][t]):>9s} MiB",
                  flush=True)

    base = "dot_product_attention (jax.nn, causal)"
    naive = "linear naive (masked quadratic)"
    lines = []
    dev = jax.devices()[0]
    lines.append(f"Device: {dev.platform} / {dev.device_kind} ({platform.processor() or platform.machine()}, "
                 f"{jax.device_count()} device(s) visible); jax {jax.__version__}; "
                 f"{datetime.date.today().isoformat()}; B={b}, H={h}, D={d}, {dtype.name}; median of "
                 f"{args.reps} runs after a warm-up. Measured f32 matmul throughput (2048^3 jnp.dot): "
                 f"**{peak:.1f} GFLOP/s**.")
    lines.append("")
    lines.append("Time (ms; `-` = not run: quadratic forms other than the two baselines are only run up to "
                 f"T={args.max_quadratic_t}, their memory is still compiled)")
    lines.append("")
    lines.append("| transform | " + " | ".join(f"T={t}" for t in ts) + " | exponent |")
    lines.append("|---|" + "---|" * (len(ts) + 1))
    for name in fns:
        row = [fmt_ms(times[name][t]) for t in ts]
        pts = [(t, times[name][t]) for t in ts if times[name][t] is not None and t >= min(2048, ts[-1])]
        ex = f"{slope(*zip(*pts)):.2f}" if len(pts) >= 2 else "-"
        lines.append(f"| {name} | " + " | ".join(row) + f" | {ex} |")
    lines.append("")
    lines.append("Compiled temporary memory (MiB) and growth per doubling of T")
    lines.append("")
    lines.append("| transform | " + " | ".join(f"T={t}" for t in ts) + " | x per doubling |")
    lines.append("|---|" + "---|" * (len(ts) + 1))
    for name in fns:
        row = [fmt_mib(mem[name][t]) for t in ts]
        ms = [mem[name][t] for t in ts]
        growth = "-"
        if len(ts) >= 2 and all(m for m in ms[-2:]):
            growth = f"{(ms[-1] / ms[-2]) ** (1 / math.log2(ts[-1] / ts[-2])):.2f}"
        lines.append(f"| {name} | " + " | ".join(row) + f" | {growth} |")
    lines.append("")
    lines.append(f"Speed-up vs `{base}` (time ratio, same run) and vs the naive form; achieved fraction "
                 "of the measured matmul throughput")
    lines.append("")
    lines.append("| transform | T | time (ms) | x faster than dot_product_attention | x faster than naive | "
                 "GFLOP/s | fraction of matmul |")
    lines.append("|---|---|---|---|---|---|---|")
    for name in fns:
        for t in ts:
            tt = times[name][t]
            if tt is None:
                continue
            tb, tn = times.get(base, {}).get(t), times.get(naive, {}).get(t)
            fl = flops(name, b, h, t, d)
            gf = None if fl is None else fl / tt / 1e9
            lines.append(
                f"| {name} | {t} | {tt * 1e3:.1f} | {'-' if tb is None else f'{tb / tt:.1f}'} | "
                f"{'-' if tn is None else f'{tn / tt:.1f}'} | {'-' if gf is None else f'{gf:.1f}'} | "
                f"{'-' if gf is None else f'{gf / peak:.3f}'} |"
            )
    return "\n".join(lines)


def write_section(body: str, title: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces (or appends) the RESULTS.md section between the ``begin``/``end`` markers."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{begin}\n## {title}\n\n{body}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in 256..1024, 3 reps, print only")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-quadratic-t", type=int, default=8192,
                   help="run the non-baseline quadratic forms only up to this T (their memory is always "
                        "compiled; the two baselines always run)")
    p.add_argument("--only", nargs="*", help="substrings of transform names to run")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.reps, args.no_write = [256, 512, 1024], 3, True
    body = run(args)
    print()
    print(body)
    if not args.no_write:
        write_section(body, "Attention transforms (benchmarks/attention.py)")
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
