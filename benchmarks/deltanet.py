"""Speed and memory of DeltaNet / Gated DeltaNet (issue 12), one run.

Forward + backward (the gradient of ``sum(w * o)`` w.r.t. q, k, v, beta and the decay rates) at
B=1, H=4, D=64 (key and value width), float32, l2-normalised q/k, beta = sigmoid(randn), rates
``exp(A) * softplus(randn)`` (Gated DeltaNet's parametrisation), for:

- the exact chunked WY/UT form (``zoo.attention.deltanet(impl="chunked", chunk_size=64)``);
- the token recurrence (``impl="scan"``: ``jax.lax.scan`` over tokens, the reference's scan);
- the frozen-gradient Titans form at the same chunk size (``zoo.attention.titans``, matrix memory,
  ``eta = alpha = 0``, ``theta = beta / 2``: the delta rule with gradients frozen at each chunk
  start, inexact for C > 1; the issue's speed yardstick);

the compiled temporary memory of the chunked form per doubling of T, and the issue's criteria at
T=8192 (chunked >= 3x faster than the token recurrence; within 1.5x of Titans at C=64).

    python benchmarks/deltanet.py            # T = 2048, 4096, 8192; rewrites its RESULTS.md section
    python benchmarks/deltanet.py --quick    # T = 512, 1024; prints only
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attention import median_time, temp_bytes, write_section  # noqa: E402 (benchmarks/attention.py helpers)

import zoo.attention as za  # noqa: E402

TITLE = "DeltaNet / Gated DeltaNet: exact chunked form vs token recurrence (issue 12)"
BEGIN, END = "<!-- BEGIN benchmarks/deltanet.py -->", "<!-- END benchmarks/deltanet.py -->"
C = 64


def make_inputs(b: int, t: int, h: int, d: int):
    ks = jax.random.split(jax.random.PRNGKey(t), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(jax.random.normal(ks[0], (b, t, h, d))), unit(jax.random.normal(ks[1], (b, t, h, d)))
    v = jax.random.normal(ks[2], (b, t, h, d))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    rate = jnp.exp(jax.random.uniform(ks[4], (h,), minval=-2.0, maxval=0.0)) * jax.nn.softplus(
        jax.random.normal(ks[5], (b, t, h)))
    w = jax.random.normal(jax.random.PRNGKey(7), (b, t, h, d))
    return q, k, v, beta, rate, w


def fwd_bwd(f):
    """``(q, k, v, beta, rate, w) -> grads`` of ``sum(w * f(q, k, v, beta, rate))``."""
    return jax.grad(lambda q, k, v, beta, rate, w: jnp.sum(w * f(q, k, v, beta, rate)), argnums=(0, 1, 2, 3, 4))


def forms(h: int, d: int) -> dict:
    zeros = (jnp.zeros((h, d, d), jnp.float32),)
    return {
        "deltanet chunked C=64": lambda q, k, v, b, r: za.deltanet(q, k, v, beta=b, causal=True, chunk_size=C,
                                                                   impl="chunked"),
        "deltanet token recurrence": lambda q, k, v, b, r: za.deltanet(q, k, v, beta=b, causal=True, impl="scan"),
        "gated_deltanet chunked C=64": lambda q, k, v, b, r: za.deltanet(q, k, v, beta=b, decay=r, causal=True,
                                                                         chunk_size=C, impl="chunked"),
        "gated_deltanet token recurrence": lambda q, k, v, b, r: za.deltanet(q, k, v, beta=b, decay=r, causal=True,
                                                                             impl="scan"),
        "titans matrix frozen-gradient C=64": lambda q, k, v, b, r: za.titans(
            q, k, v, theta=b / 2, eta=0.0, alpha=0.0, weights=zeros, causal=True, chunk_size=C),
    }


def run(args) -> tuple[str, bool]:
    b, h, d = 1, args.heads, args.head_dim
    fns = forms(h, d)
    times: dict[str, dict[int, float]] = {n: {} for n in fns}
    mem: dict[str, dict[int, int | None]] = {n: {} for n in fns}
    for t in args.lengths:
        xs = make_inputs(b, t, h, d)
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
        for name, f in fns.items():
            g = fwd_bwd(f)
            compiled = jax.jit(g).lower(*shapes).compile()
            ma = compiled.memory_analysis()
            mem[name][t] = None if ma is None else int(ma.temp_size_in_bytes)
            times[name][t] = median_time(compiled, xs, args.reps)
            print(f"T={t:6d} {name:36s} {times[name][t] * 1e3:9.1f} ms  "
                  f"{(mem[name][t] or 0) / 2**20:9.1f} MiB temp", flush=True)
    for t in args.memory_only_lengths:
        xs = make_inputs(b, t, h, d)
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]
        for name in ("deltanet chunked C=64", "gated_deltanet chunked C=64"):
            mem[name][t] = temp_bytes(fwd_bwd(fns[name]), shapes)

    ts = args.lengths
    dev = jax.devices()[0]
    lines = [
        f"Device: {dev.platform} ({platform.processor() or platform.machine()}, {jax.device_count()} device(s) "
        f"visible, a 2-core machine shared with other jobs: absolute times are noisy, ratios less so); "
        f"jax {jax.__version__}; {datetime.date.today().isoformat()}; one run, median of {args.reps} after a "
        f"warm-up. B=1, H={h}, key = value width {d}, float32; forward + backward (gradient w.r.t. q, k, v, beta, "
        f"rates). Command: `python benchmarks/deltanet.py`.",
        "",
        "Forms: *chunked* = `deltanet(impl=\"chunked\", chunk_size=64)` (exact WY/UT form, one scan step per "
        "chunk); *token recurrence* = `impl=\"scan\"` (one scan step per token; its autodiff stores a state per "
        "token); *titans frozen-gradient* = `titans(depth-1 matrix memory, eta=0, alpha=0, theta=beta/2, "
        "chunk_size=64)`, the delta rule with gradients frozen at chunk starts (not exact for C > 1).",
        "",
        "Forward + backward time (ms)",
        "",
        "| form | " + " | ".join(f"T={t}" for t in ts) + " |",
        "|---|" + "---|" * len(ts),
    ]
    for name in fns:
        lines.append(f"| {name} | " + " | ".join(f"{times[name][t] * 1e3:.1f}" for t in ts) + " |")
    lines += ["", "Token recurrence / chunked (speed-up of the chunked form)", "",
              "| | " + " | ".join(f"T={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for tag in ("deltanet", "gated_deltanet"):
        lines.append(f"| {tag} | " + " | ".join(
            f"{times[f'{tag} token recurrence'][t] / times[f'{tag} chunked C=64'][t]:.1f}x" for t in ts) + " |")
    all_t = sorted(set(ts) | set(args.memory_only_lengths))
    lines += ["", "Compiled temporary memory of forward + backward (MiB) and growth per doubling of T "
              "(2.00 = linear)", "",
              "| form | " + " | ".join(f"T={t}" for t in all_t) + " | x per doubling |",
              "|---|" + "---|" * (len(all_t) + 1)]
    growth = {}
    for name in fns:
        pts = [(t, mem[name][t]) for t in all_t if mem[name].get(t)]
        if len(pts) >= 2:
            x, y = np.log2([p[0] for p in pts]), np.log2([p[1] for p in pts])
            growth[name] = float(2 ** np.polyfit(x, y, 1)[0])
        lines.append(f"| {name} | " + " | ".join(
            "-" if not mem[name].get(t) else f"{mem[name][t] / 2**20:.1f}" for t in all_t) + " | "
            + ("-" if name not in growth else f"{growth[name]:.2f}") + " |")
    ok, verdict = criteria(times, growth, ts)
    return "\n".join(lines + ["", *verdict]), ok


def criteria(times, growth, ts) -> tuple[bool, list[str]]:
    t = 8192
    out, ok = [f"Criteria at T={t} (issue 12):", ""], True
    if t not in ts:
        return False, out + [f"- T={t} not measured in this run"]
    for tag in ("deltanet", "gated_deltanet"):
        ch, rec = times[f"{tag} chunked C=64"][t], times[f"{tag} token recurrence"][t]
        good = rec / ch >= 3.0
        ok &= good
        out.append(f"- {tag}: chunked {ch * 1e3:.0f} ms vs token recurrence {rec * 1e3:.0f} ms: {rec / ch:.1f}x, "
                   f">= 3x: **{'yes' if good else 'NO'}**")
    ch, ti = times["deltanet chunked C=64"][t], times["titans matrix frozen-gradient C=64"][t]
    good = ch / ti <= 1.5
    ok &= good
    out.append(f"- deltanet chunked vs Titans frozen-gradient at C=64 ({ti * 1e3:.0f} ms): {ch / ti:.2f}x, "
               f"within 1.5x: **{'yes' if good else 'NO'}**")
    for name in ("deltanet chunked C=64", "gated_deltanet chunked C=64"):
        gr = growth.get(name)
        lin = gr is not None and gr <= 2.2
        ok &= lin
        out.append(f"- {name}: temp memory x{'-' if gr is None else f'{gr:.2f}'} per doubling of T: linear: "
                   f"**{'yes' if lin else 'NO'}**")
    return ok, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T = 512, 1024, 1 rep, print only")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--memory-only-lengths", type=int, nargs="*", default=[16384, 32768])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.memory_only_lengths, args.reps = [512, 1024], [], 1
    body, ok = run(args)
    print(body)
    if not args.quick:
        write_section(body, TITLE, BEGIN, END)
    print("criteria met" if ok else "criteria NOT met")


if __name__ == "__main__":
    main()
