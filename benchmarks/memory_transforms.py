"""Speed and memory of the test-time memory transforms (Titans, Miras presets), one run.

For Titans with a matrix memory (depth 1) and a 2-layer MLP memory (depth 2, hidden 4 * D) it
measures, at B=1, H=16 (B*H = 16), D=64, float32, per-token gates:
- tokens/s of the chunked dual form for chunk sizes 16..256 and of the sequential recurrence
  (``titans_naive``, a ``jax.lax.scan`` over tokens with ``jax.grad`` per token) with the same
  memory, and of causal ``jax.nn.dot_product_attention`` (run up to ``--max-dpa-t``);
- compiled temporary memory ``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``
  (compile only) and its growth per doubling of T;
- the Miras presets (Moneta, Yaad, Memora) at one length, chunked vs sequential;
and checks the issue's criteria at T=8192: chunked no slower than sequential (matrix and MLP),
both faster than ``dot_product_attention``, temp memory linear in T.

    python benchmarks/memory_transforms.py            # full run, rewrites its section of RESULTS.md
    python benchmarks/memory_transforms.py --quick    # T=1024/2048, 1 rep, prints only
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attention import median_time, temp_bytes, write_section  # noqa: E402 (benchmarks/attention.py helpers)

import zoo.attention as za  # noqa: E402

init_weights = importlib.import_module("zoo.attention.titans").init_weights

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
TITLE = "Titans / Miras memory transforms (issue 4)"
BEGIN, END = "<!-- BEGIN benchmarks/memory_transforms.py -->", "<!-- END benchmarks/memory_transforms.py -->"
DPA = "dot_product_attention (jax.nn, causal)"


def make_inputs(b: int, t: int, h: int, d: int):
    """l2-normalised q/k (as the Titans layer feeds its memory), unit-variance v, per-token gates."""
    ks = jax.random.split(jax.random.PRNGKey(t), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(jax.random.normal(ks[0], (b, t, h, d))), unit(jax.random.normal(ks[1], (b, t, h, d)))
    v = jax.random.normal(ks[2], (b, t, h, d))
    u = lambda kk, lo, hi: jax.random.uniform(kk, (b, t, h), minval=lo, maxval=hi)
    gates = dict(theta=u(ks[3], 0.05, 0.2), eta=u(ks[4], 0.5, 0.9), alpha=u(ks[5], 0.0, 0.01))
    return (q, k, v), gates


def titans_fns(h: int, d: int, chunks: list[int]):
    """name -> (depth, f(q, k, v, gates)); weights fixed per depth (closed over)."""
    out = {}
    for depth in (1, 2):
        w = init_weights(jax.random.PRNGKey(depth), h, d, depth=depth)
        if depth == 1:
            w = (0.1 * jax.random.normal(jax.random.PRNGKey(9), (h, d, d)),)
        tag = "matrix" if depth == 1 else "MLP-2"
        out[f"titans {tag} sequential"] = depth, (
            lambda q, k, v, g, w=w: za.titans_naive(q, k, v, causal=True, weights=w, chunk_size=1, **g))
        for c in chunks:
            out[f"titans {tag} chunked C={c}"] = depth, (
                lambda q, k, v, g, w=w, c=c: za.titans(q, k, v, causal=True, weights=w, chunk_size=c, **g))
    return out


def fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def run(args) -> tuple[str, bool]:
    b, h, d = 1, args.heads, args.head_dim
    ts, chunks = args.lengths, args.chunks
    fns = titans_fns(h, d, chunks)
    dpa = lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    times: dict[str, dict[int, float | None]] = {n: {} for n in list(fns) + [DPA]}
    mem: dict[str, dict[int, int | None]] = {n: {} for n in list(fns) + [DPA]}
    for t in ts:
        xs, g = make_inputs(b, t, h, d)
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
        gshapes = {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in g.items()}
        for name, f in [(n, f) for n, (_, f) in fns.items()] + [(DPA, dpa)]:
            compiled = jax.jit(f).lower(*shapes, gshapes).compile()  # compiled once: memory and timing
            mem[name][t] = int(compiled.memory_analysis().temp_size_in_bytes)
            run_it = name != DPA or t <= args.max_dpa_t
            times[name][t] = median_time(compiled, (*xs, g), args.reps) if run_it else None
            print(f"T={t:6d} {name:32s} {fmt(times[name][t] and times[name][t] * 1e3, '.1f'):>9s} ms "
                  f"{fmt(times[name][t] and b * t / times[name][t]):>9s} tok/s "
                  f"{mem[name][t] / 2**20:9.1f} MiB", flush=True)
    for t in args.memory_only_lengths:  # compile only
        xs, g = make_inputs(b, t, h, d)
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
        gshapes = {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in g.items()}
        for name in ("titans matrix sequential", "titans matrix chunked C=64", "titans MLP-2 sequential",
                     "titans MLP-2 chunked C=64"):
            if name in fns:
                mem[name][t] = temp_bytes(fns[name][1], shapes + [gshapes])
                times[name].setdefault(t, None)
    presets = run_presets(args, h, d) if args.preset_t else []

    dev = jax.devices()[0]
    lines = [
        f"Device: {dev.platform} / {dev.device_kind} ({platform.processor() or platform.machine()}, "
        f"{jax.device_count()} device(s) visible); jax {jax.__version__}; {datetime.date.today().isoformat()}; "
        f"B=1, H={h} (B*H={h}), D={d}, float32; l2-normalised q/k, per-token gates theta in [0.05, 0.2], "
        f"eta in [0.5, 0.9], alpha in [0, 0.01]; median of {args.reps} runs after a warm-up; all figures "
        f"from this one run. MLP-2 = 2-layer GELU MLP memory, hidden {4 * d}.",
        "",
        "Forms: *sequential* = `titans_naive` (the recurrence: one `jax.lax.scan` step per token, "
        "`jax.grad` of the loss at each step); *chunked C* = `titans(..., chunk_size=C)`, the dual "
        "form (gradients of a chunk at its start weights, one scan step per chunk, matmuls inside); "
        "*dot_product_attention* = `jax.nn.dot_product_attention(is_causal=True)` (materialises "
        "T x T scores on CPU). Command: `python benchmarks/memory_transforms.py`.",
        "",
        "Tokens/s (B*T / time; `-` = not run)",
        "",
        "| form | " + " | ".join(f"T={t}" for t in ts) + " |",
        "|---|" + "---|" * len(ts),
    ]
    for name in times:
        lines.append(f"| {name} | " + " | ".join(
            fmt(times[name].get(t) and b * t / times[name][t]) for t in ts) + " |")
    all_t = sorted(set(ts) | set(args.memory_only_lengths))
    lines += ["", "Compiled temporary memory (MiB) and growth per doubling of T (2.00 = linear)", "",
              "| form | " + " | ".join(f"T={t}" for t in all_t) + " | x per doubling |",
              "|---|" + "---|" * (len(all_t) + 1)]
    growth: dict[str, float] = {}
    for name in mem:
        pts = [(t, mem[name][t]) for t in all_t if mem[name].get(t)]
        if len(pts) >= 2:
            x, y = np.log2([p[0] for p in pts]), np.log2([p[1] for p in pts])
            growth[name] = float(2 ** np.polyfit(x, y, 1)[0])
        lines.append(f"| {name} | " + " | ".join(
            fmt(mem[name].get(t) and mem[name][t] / 2**20, ".1f") for t in all_t) + f" | "
            f"{fmt(growth.get(name), '.2f')} |")
    if presets:
        lines += ["", f"Miras presets at T={args.preset_t} (chunked C=64 vs sequential recurrence, tokens/s)", "",
                  "| preset | memory | chunked form | chunked | sequential | chunked / sequential |",
                  "|---|---|---|---|---|---|"]
        for name, tag, form, tc, tsq in presets:
            lines.append(f"| {name} | {tag} | {form} | {b * args.preset_t / tc:.0f} | {b * args.preset_t / tsq:.0f} | "
                         f"{tsq / tc:.2f} |")
    ok, verdict = criteria(times, growth, args)
    lines += ["", *verdict]
    return "\n".join(lines), ok


def criteria(times, growth, args) -> tuple[bool, list[str]]:
    t = 8192
    out, ok = ["Criteria at T=8192 (issue 4):", ""], True
    if t not in args.lengths:
        return False, out + ["- T=8192 not measured in this run"]
    dpa = times[DPA].get(t)
    for tag in ("matrix", "MLP-2"):
        seq = times[f"titans {tag} sequential"][t]
        chunked = {c: times[f"titans {tag} chunked C={c}"][t] for c in args.chunks}
        best_c = min(chunked, key=chunked.get)
        c64 = chunked.get(64)
        good = chunked[best_c] <= seq
        ok &= good
        out.append(f"- {tag}: chunked (best C={best_c}) {chunked[best_c] * 1e3:.0f} ms"
                   + (f", C=64 {c64 * 1e3:.0f} ms" if c64 else "")
                   + f" vs sequential {seq * 1e3:.0f} ms: chunked no slower: **{'yes' if good else 'NO'}**"
                   + f" ({seq / chunked[best_c]:.2f}x)")
        if dpa is None:
            ok = False
            out.append(f"- {tag}: dot_product_attention not run at T={t}")
        else:
            both = max(chunked[best_c], seq) < dpa
            ok &= both
            out.append(f"- {tag}: both faster than dot_product_attention ({dpa * 1e3:.0f} ms): "
                       f"**{'yes' if both else 'NO'}** (chunked {dpa / chunked[best_c]:.1f}x, "
                       f"sequential {dpa / seq:.1f}x)")
    for name in ("titans matrix sequential", "titans matrix chunked C=64", "titans MLP-2 sequential",
                 "titans MLP-2 chunked C=64"):
        gr = growth.get(name)
        lin = gr is not None and gr <= 2.2
        ok &= lin
        out.append(f"- {name}: temp memory x{fmt(gr, '.2f')} per doubling of T: linear: "
                   f"**{'yes' if lin else 'NO'}**")
    return ok, out


def run_presets(args, h, d):
    t = args.preset_t
    xs, g = make_inputs(1, t, h, d)
    gd = dict(theta=g["theta"] * 0.1, alpha=g["alpha"])
    out = []
    for depth in (1, 2):
        w = init_weights(jax.random.PRNGKey(depth), h, d, depth=depth)
        tag = "matrix" if depth == 1 else "MLP-2"
        for name in ("moneta", "yaad", "memora"):
            tr = za.get(name)
            gp = {**gd, **({"delta": jnp.ones_like(gd["theta"])} if name == "yaad" else {})}
            fc = jax.jit(lambda q, k, v, g, tr=tr, w=w: tr(q, k, v, causal=True, weights=w, chunk_size=64, **g))
            fs = jax.jit(lambda q, k, v, g, tr=tr, w=w: tr.reference(q, k, v, causal=True, weights=w,
                                                                 chunk_size=1, **g))
            tc, tsq = median_time(fc, (*xs, gp), args.reps), median_time(fs, (*xs, gp), args.reps)
            form = "dual" if name == "yaad" else "materialize"
            print(f"preset {name:7s} {tag:7s} chunked {tc * 1e3:8.1f} ms  sequential {tsq * 1e3:8.1f} ms", flush=True)
            out.append((name, tag, form, tc, tsq))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T=1024/2048, C=16/64, 1 rep, no presets, print only")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--memory-only-lengths", type=int, nargs="*", default=[32768],
                   help="lengths compiled for the memory table only (titans, C=64 and sequential)")
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-dpa-t", type=int, default=8192, help="longest T at which dot_product_attention runs")
    p.add_argument("--preset-t", type=int, default=2048, help="T of the Miras preset table (0: skip)")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.memory_only_lengths, args.chunks = [1024, 2048], [], [16, 64]
        args.reps, args.preset_t, args.no_write = 1, 0, True
    t0 = time.perf_counter()
    body, ok = run(args)
    print("\n" + body + f"\n\n(total {time.perf_counter() - t0:.0f} s; criteria {'met' if ok else 'NOT met'})")
    if not args.no_write:
        write_section(body, TITLE, BEGIN, END)
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
