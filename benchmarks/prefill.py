"""Prompt processing in DecoderLM: parallel prefill vs token-by-token decoding, one run.

For each mixer a small DecoderLM (d_model 128, 2 layers, 4 heads, float32) consumes a prompt of
T tokens three ways, each one ``jax.jit`` function timed after a warm-up (median of ``--reps``):
- ``forward``: ``model(tokens)``, the training forward (the baseline of the ratios);
- ``prefill``: ``model.prefill(tokens, max_len=T)``, one parallel call per layer that also returns
  every layer's decoding state (what ``generate`` uses for the prompt);
- ``token by token``: a ``lax.scan`` of ``model.decode_step`` over the prompt (what ``generate``
  did before).
Ratios are against ``forward`` in the same run.

    python benchmarks/prefill.py            # rewrites its section of RESULTS.md
    python benchmarks/prefill.py --quick    # T=256, prints only
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys

import jax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attention import median_time, write_section  # noqa: E402 (benchmarks/attention.py helpers)

from zoo.models import DecoderLM  # noqa: E402

TITLE = "DecoderLM prompt processing: prefill vs token by token (issue 10, defect 7)"
BEGIN, END = "<!-- prefill:begin -->", "<!-- prefill:end -->"
MIXERS = ("softmax", "sliding_window", "linear", "based", "titans")


def measure(mixer: str, t: int, reps: int) -> tuple[float, float, float]:
    model = DecoderLM(256, 128, 2, 4, mixers=mixer, max_len=t, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, t), 0, 256)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    def prefill(state, tokens):
        return nnx.merge(graphdef, state).prefill(tokens, max_len=t)

    def token_by_token(state, tokens):
        m = nnx.merge(graphdef, state)

        def body(st, tok):
            logits, st = m.decode_step(tok, st)
            return st, logits

        return jax.lax.scan(body, m.init_state(1, t), tokens.T)

    args = (state, tokens)
    return tuple(median_time(jax.jit(f), args, reps) for f in (forward, prefill, token_by_token))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    t = 256 if a.quick else a.length
    rows = ["| mixer | T | forward ms | prefill ms | prefill / forward | token by token ms | "
            "token by token / forward |", "|---|---|---|---|---|---|---|"]
    for mixer in MIXERS:
        f, pf, tok = measure(mixer, t, a.reps)
        rows.append(f"| {mixer} | {t} | {f * 1e3:.1f} | {pf * 1e3:.1f} | {pf / f:.2f} | {tok * 1e3:.1f} | "
                    f"{tok / f:.1f} |")
        print(rows[-1], flush=True)
    body = (f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()} "
            f"({jax.default_backend()}, {jax.device_count()} device(s), jax {jax.__version__}), one run, "
            f"median of {a.reps}; `python benchmarks/prefill.py`.\n\n" + "\n".join(rows) + "\n")
    if not a.quick:
        write_section(body, TITLE, BEGIN, END)


if __name__ == "__main__":
    main()
