"""Softmax family at long context: quadratic vs blockwise, memory and time, one run (issue 11).

For each T (B=1, H=4, D=64, float32, causal): XLA's compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) and wall time (median of ``--reps`` after a warm-up)
of the forward and of forward+backward (grad of a weighted sum w.r.t. q, k, v) for
``jax.nn.dot_product_attention`` (the baseline of the ratios), ``zoo.attention.softmax`` with
``impl="xla"`` (the quadratic form) and ``impl="blockwise"``, a sliding window (512 and 256) in
both forms, and the sigmoid / softplus (LSSA) variants blockwise. Quadratic forms above
``--max-quadratic-t`` are compiled (memory) but not run.

    python benchmarks/softmax_long.py                 # rewrites its section of RESULTS.md
    python benchmarks/softmax_long.py --quick         # T=1024, prints only
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
from attention import median_time, temp_bytes, write_section  # noqa: E402 (benchmarks/attention.py helpers)

import zoo.attention as za  # noqa: E402

TITLE = "Softmax family at long context: quadratic vs blockwise (issue 11)"
BEGIN, END = "<!-- softmax_long:begin -->", "<!-- softmax_long:end -->"
MIB = 2.0**20


def forms():
    """(name, f(q, k, v), quadratic?)."""
    sdpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return [
        ("jax.nn.dot_product_attention", sdpa, True),
        ("softmax xla (quadratic)", lambda q, k, v: za.softmax(q, k, v, causal=True, impl="xla"), True),
        ("softmax blockwise", lambda q, k, v: za.softmax(q, k, v, causal=True, impl="blockwise"), False),
        ("softmax auto", lambda q, k, v: za.softmax(q, k, v, causal=True), False),
        ("window 512 xla", lambda q, k, v: za.softmax(q, k, v, causal=True, window=512, impl="xla"), True),
        ("window 512 blockwise", lambda q, k, v: za.softmax(q, k, v, causal=True, window=512, impl="blockwise"), False),
        ("window 256 blockwise", lambda q, k, v: za.softmax(q, k, v, causal=True, window=256, impl="blockwise"), False),
        ("sinks + log-n blockwise", lambda q, k, v: za.softmax(
            q, k, v, causal=True, sink_logit=jnp.zeros(q.shape[2]), logn_train_length=1024, impl="blockwise"), False),
        ("sigmoid blockwise", lambda q, k, v: za.sigmoid(q, k, v, causal=True, impl="blockwise"), False),
        ("softplus LSSA blockwise", lambda q, k, v: za.softplus(q, k, v, causal=True, impl="blockwise"), False),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--max-quadratic-t", type=int, default=8192)
    p.add_argument("--max-variant-t", type=int, default=8192, help="run the variants only up to this T")
    p.add_argument("--only", nargs="*")
    a = p.parse_args(argv)
    lengths = [1024] if a.quick else a.lengths
    b, h, d = 1, 4, 64
    rows = []
    for t in lengths:
        key = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, w = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in key)
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
        base = None
        for name, f, quadratic in forms():
            if a.only and not any(s in name for s in a.only):
                continue
            fb = lambda q, k, v, f=f, w=w: jax.grad(lambda q, k, v: jnp.sum(w * f(q, k, v)), argnums=(0, 1, 2))(q, k, v)
            m_f, m_fb = temp_bytes(f, shapes), temp_bytes(fb, shapes)
            run = (not quadratic or t <= a.max_quadratic_t) and (
                name.startswith(("softmax", "window", "jax")) or t <= a.max_variant_t)
            t_f = t_fb = None
            if run:
                t_f = median_time(jax.jit(f), (q, k, v), a.reps)
                t_fb = median_time(jax.jit(fb), (q, k, v), a.reps)
            if name.startswith("jax.nn"):
                base = (t_f, t_fb)
            ratio = lambda x, y: "-" if x is None or y is None else f"{x / y:.2f}"
            fmt = lambda x: "-" if x is None else f"{x * 1e3:.0f}"
            row = (f"| {name} | {t} | {m_f / MIB:.0f} | {m_fb / MIB:.0f} | {fmt(t_f)} | {fmt(t_fb)} | "
                   f"{ratio(t_f, base[0] if base else None)} | {ratio(t_fb, base[1] if base else None)} |")
            print(row, flush=True)
            rows.append(row)
    head = ("| form | T | temp MiB fwd | temp MiB fwd+bwd | fwd ms | fwd+bwd ms | fwd / jax.nn | fwd+bwd / jax.nn |\n"
            "|---|---|---|---|---|---|---|---|")
    if a.quick:
        return
    now = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    body = (f"Measured {now} on {cpu} ({jax.default_backend()}, {jax.device_count()} device(s), jax {jax.__version__}; "
            f"a 2-core CPU shared with other jobs, so times are noisy), one run, median of {a.reps} after a warm-up; "
            f"B=1, H=4, D=64, float32, causal; `python benchmarks/softmax_long.py`. Blocks: "
            f"`BlockSizes.get_default()` = {za.BlockSizes.get_default()}. '-' = not run (memory compiled only).\n\n"
            + head + "\n" + "\n".join(rows) + "\n")
    write_section(body, TITLE, BEGIN, END)


if __name__ == "__main__":
    main()
