"""Figure and table of the length_extrapolation sweep (configs/repro/length_extrapolation.py).

    python docs/repro_length_extrapolation/make_report.py runs/repro_lenx docs/repro_length_extrapolation

Reads ``<run_dir>/results.json`` (written by ``eval.py``: runs ``softmax``, ``softmax+logn``,
``softmax+logn_sqrt``, ``lssa``, ``lssa+lssar``, ``lssar``, ``sigmoid``); writes ``results.json`` (a copy),
``loss_vs_length.png`` (held-out loss in bits per byte against the evaluation length, and the
same relative to each model's loss at the training length) and prints a Markdown table.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from eval import length_curve  # noqa: E402

LABELS = {
    "softmax": "softmax",
    "softmax+logn": "softmax + log-n (ratio), after training",
    "softmax+logn_sqrt": "softmax + log-n (sqrt), after training",
    "lssa": "LSSA (softplus)",
    "lssa+lssar": "LSSA re-weighted after training (LSSAR, p=15)",
    "lssar": "LSSAR (p=15) trained as such",
    "sigmoid": "sigmoid (no normalisation)",
}
STYLE = {"softmax": ("k", "-"), "softmax+logn": ("tab:grey", "--"), "softmax+logn_sqrt": ("tab:grey", ":"),
         "lssa": ("tab:blue", "-"), "lssa+lssar": ("tab:orange", "--"),
         "lssar": ("tab:orange", "-"), "sigmoid": ("tab:green", "-")}


def main(run_dir: str, out: str) -> None:
    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    if run_dir.resolve() != out.resolve():
        shutil.copy(run_dir / "results.json", out / "results.json")
    missing = sorted(set(results) - set(LABELS))
    if missing:
        raise SystemExit(f"runs without a label here: {missing}")
    bits = {n: {L: v / math.log(2) for L, v in length_curve(results[n]).items()} for n in LABELS if n in results}
    train_len = int(results["softmax"]["seq_len"])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, pts in bits.items():
        colour, ls = STYLE[name]
        xs = list(pts)
        axes[0].plot(xs, list(pts.values()), marker="o", ms=4, color=colour, ls=ls, label=LABELS[name])
        axes[1].plot(xs, [v / pts[train_len] for v in pts.values()], marker="o", ms=4, color=colour, ls=ls,
                     label=LABELS[name])
    for ax in axes:
        ax.axvline(train_len, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"held-out loss (bits per byte), trained at {train_len}")
    axes[1].set_ylabel(f"loss / loss at the training length {train_len}")
    axes[1].axhline(1.05, color="tab:orange", lw=0.8, ls="--")
    axes[1].text(axes[1].get_xlim()[0], 1.05, " +5% (the paper's 'nearly constant')", fontsize=8, va="bottom")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Length extrapolation: softmax vs softplus (LSSA / LSSAR), byte-level LM")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_length.png", dpi=130)
    plt.close(fig)

    lengths = sorted({n for pts in bits.values() for n in pts})
    print("| model | " + " | ".join(f"L={n}" + (" (train)" if n == train_len else "") for n in lengths)
          + f" | L={lengths[-1]} / L={train_len} |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for name, pts in bits.items():
        cells = [f"{pts[n]:.3f}" if n in pts else "-" for n in lengths]
        print(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {pts[lengths[-1]] / pts[train_len]:.2f}x |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
