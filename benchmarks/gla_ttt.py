"""GLA (per-channel gates) and TTT-Linear/MLP: fast forms vs their references, one run.

At B=1, H=4, D=64, float32, for each length: forward and forward+backward time and compiled
temporary memory of
- GLA: ``linear(..., decay=[B, T, H, D], impl="chunked")`` (secondary chunking) vs
  ``impl="scan"`` (the token recurrence) vs the quadratic ``linear_naive`` (O(T^3 D) memory: up to
  ``--max-naive-t``);
- TTT-Linear / TTT-MLP: ``ttt`` (mini-batch dual form, mini-batch 16) vs ``ttt_naive`` (a scan
  over tokens with ``jax.grad`` per token).
Ratios are against the reference of the same run.

    python benchmarks/gla_ttt.py           # rewrites its section of RESULTS.md
    python benchmarks/gla_ttt.py --quick   # T=512/1024, prints only
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attention import median_time, write_section  # noqa: E402 (benchmarks/attention.py helpers)

import zoo.attention as za  # noqa: E402

TITLE = "GLA per-channel gates and TTT (issue 12)"
BEGIN, END = "<!-- BEGIN benchmarks/gla_ttt.py -->", "<!-- END benchmarks/gla_ttt.py -->"


def inputs(t: int, h: int, d: int):
    ks = jax.random.split(jax.random.PRNGKey(t), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(jax.random.normal(ks[0], (1, t, h, d))), unit(jax.random.normal(ks[1], (1, t, h, d)))
    v = jax.random.normal(ks[2], (1, t, h, d))
    rates = -jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, t, h, d)) + 3.0)  # gates near 0.95, as GLA's
    return q, k, v, rates


def forms(h: int, d: int) -> dict[str, tuple[str, callable]]:
    """name -> (reference name, f(q, k, v, rates))."""
    gla = dict(causal=True, feature_map="identity", normalize=False)
    out = {
        "gla naive (quadratic)": (None, lambda q, k, v, r: za.linear_naive(q, k, v, decay=r, **gla)),
        "gla scan": (None, lambda q, k, v, r: za.linear(q, k, v, decay=r, impl="scan", **gla)),
    }
    for c in (16, 64):
        out[f"gla chunked C={c}"] = ("gla scan", lambda q, k, v, r, c=c: za.linear(
            q, k, v, decay=r, impl="chunked", chunk_size=c, **gla))
    for depth, tag in ((1, "ttt_linear"), (2, "ttt_mlp")):
        opts = dict(causal=True, depth=depth, key=jax.random.PRNGKey(depth), chunk_size=16, scale=d ** -0.5)
        out[f"{tag} naive (token scan)"] = (None, lambda q, k, v, r, o=opts: za.ttt_naive(q, k, v, **o))
        out[f"{tag} dual b=16"] = (f"{tag} naive (token scan)", lambda q, k, v, r, o=opts: za.ttt(q, k, v, **o))
    return out


def run(args) -> str:
    h, d = args.heads, args.head_dim
    fs = forms(h, d)
    rows = []
    for t in args.lengths:
        q, k, v, r = inputs(t, h, d)
        times = {}
        for name, (ref, f) in fs.items():
            if name.startswith("gla naive") and t > args.max_naive_t:
                continue
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda q, k, v, r, f=f: jnp.sum(f(q, k, v, r) ** 2), argnums=(0, 1, 2)))
            mem = fwd.lower(q, k, v, r).compile().memory_analysis().temp_size_in_bytes
            tf, tb = median_time(fwd, (q, k, v, r), args.reps), median_time(grad, (q, k, v, r), args.reps)
            times[name] = (tf, tb)
            ratio = "-" if ref not in times else f"{times[ref][0] / tf:.1f} / {times[ref][1] / tb:.1f}"
            rows.append(f"| {name} | {t} | {tf * 1e3:.1f} | {tb * 1e3:.1f} | {mem / 2**20:.1f} | {ratio} |")
            print(rows[-1], flush=True)
    dev = jax.devices()[0]
    head = (
        f"Device: {dev.platform} / {dev.device_kind} ({platform.processor() or platform.machine()}); jax "
        f"{jax.__version__}; {datetime.date.today().isoformat()}; B=1, H={h}, D={d}, float32, median of "
        f"{args.reps} after a warm-up, one run. GLA gates `exp(-rate)` around 0.95 per channel; TTT q/k "
        f"l2-normalised, q scaled by D^-0.5. Command: `python benchmarks/gla_ttt.py`.\n\n"
        "| form | T | forward ms | fwd+bwd ms | fwd temp MiB | speed-up vs reference (fwd / fwd+bwd) |\n"
        "|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-naive-t", type=int, default=512)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.reps = [512], 1
    body = run(args)
    if not args.quick:
        write_section(body, TITLE, BEGIN, END)


if __name__ == "__main__":
    main()
