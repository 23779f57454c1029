"""Figure and table of the context_extension sweep (configs/repro/context_extension.py).

    python docs/repro_context_extension/make_report.py runs/repro_ctx docs/repro_context_extension

Reads ``<run_dir>/results.json`` (written by ``eval.py``: runs ``base``, ``base+<scaling>`` for
the scalings applied after training, ``ft_<scaling>`` for the fine-tunes); writes
``results.json`` (a copy), ``ppl_vs_length.png`` (per-byte perplexity against the evaluation
length: training-free on the left, after the 100-sample fine-tune on the right, the plain model
in both) and prints a Markdown table of per-byte perplexity per length.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys

# display names and the order of the rows
LABELS = {
    "base": "no scaling (RoPE as trained)",
    "base+pi": "PI (linear)",
    "base+ntk": "NTK-aware",
    "base+ntk_dynamic": "dynamic NTK",
    "base+yarn": "YaRN",
    "base+abf": "ABF (base 5e5)",
    "base+entropy_abf": "Entropy-ABF",
    "base+clex_dynamic": "CLEX (untrained ODE = dynamic NTK, 2t-1)",
    "base+giraffe_truncate": "Giraffe truncated basis",
    "ft_pi": "PI, fine-tuned",
    "ft_yarn": "YaRN, fine-tuned",
    "ft_entropy_abf": "Entropy-ABF, fine-tuned",
    "ft_clex_dynamic": "CLEX, fine-tuned",
}


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from eval import length_curve  # noqa: E402


def curve(r: dict) -> dict[int, float]:
    """``{evaluation length: per-byte perplexity exp(loss)}`` of one run's splits."""
    return {n: math.exp(loss) for n, loss in length_curve(r).items()}


def main(run_dir: str, out: str) -> None:
    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    if run_dir.resolve() != out.resolve():
        shutil.copy(run_dir / "results.json", out / "results.json")
    curves = {name: curve(results[name]) for name in LABELS if name in results}
    missing = sorted(set(results) - set(LABELS))
    if missing:
        raise SystemExit(f"runs without a label here: {missing}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_len = int(results["base"]["seq_len"])
    ft_len = max((int(r["seq_len"]) for n, r in results.items() if n.startswith("ft_")), default=None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    cmap = plt.get_cmap("tab10")
    colours = {}
    for name in (k.split("+")[-1].removeprefix("ft_") for k in LABELS):
        colours.setdefault(name, cmap(len(colours) % 10))
    for ax, fine_tuned in zip(axes, (False, True)):
        for name, pts in curves.items():
            if name != "base" and name.startswith("ft_") != fine_tuned:
                continue
            key = name.split("+")[-1].removeprefix("ft_")
            style = dict(color="k", lw=2.2) if name == "base" else dict(color=colours[key])
            ax.plot(list(pts), list(pts.values()), marker="o", ms=4, label=LABELS[name], **style)
        ax.axvline(train_len, color="grey", ls=":", lw=1)
        ax.text(train_len, 0.98, " trained", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        if fine_tuned and ft_len:
            ax.axvline(ft_len, color="grey", ls="--", lw=1)
            ax.text(ft_len, 0.98, " fine-tuned", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation length (bytes)")
        ax.set_title(f"after a 100-sample fine-tune at {ft_len}" if fine_tuned
                     else "training-free (scaling applied after training)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    axes[0].set_ylabel(f"held-out per-byte perplexity (trained at {train_len})")
    fig.suptitle("Extending a byte-level RoPE LM's context: perplexity vs evaluation length")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_length.png", dpi=130)
    plt.close(fig)

    lengths = sorted({n for pts in curves.values() for n in pts})
    print("| model | " + " | ".join(f"L={n}" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, pts in curves.items():
        cells = [(f"**{pts[n]:.3g}**" if n in (train_len, ft_len) and (n == train_len) != name.startswith("ft_")
                  else f"{pts[n]:.3g}") if n in pts else "-" for n in lengths]
        print(f"| {LABELS[name]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
