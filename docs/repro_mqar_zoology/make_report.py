"""Figure and table of the mqar_zoology sweep (configs/repro/mqar_zoology.py).

    python docs/repro_mqar_zoology/make_report.py runs/repro_mqar_zoology docs/repro_mqar_zoology

Reads ``<run_dir>/results.json`` and ``best_learning_rates.json`` (written by ``eval.py``: the
best learning rate per mechanism, width and (T, kv) cell, chosen on the test split); writes
copies of both, ``accuracy_by_mechanism.png`` (best test accuracy per mechanism, one bar per
cell) and prints a Markdown table (best accuracy and its learning rate, and every learning
rate's accuracy).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

ORDER = ("softmax", "based", "deltanet_layer", "gla_layer", "titans", "linear", "flow", "aaren")


def main(run_dir: str, out: str) -> None:
    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    best = json.loads((run_dir / "best_learning_rates.json").read_text())
    if run_dir.resolve() != out.resolve():
        for f in ("results.json", "best_learning_rates.json"):
            shutil.copy(run_dir / f, out / f)
    cell = lambda task: f"T={task['seq_len']}, kv={task['num_kv_pairs']}"  # noqa: E731
    cells = sorted({(r["config"]["task"]["params"]["seq_len"], r["config"]["task"]["params"]["num_kv_pairs"])
                    for r in results.values()})
    names = [f"T={t}, kv={kv}" for t, kv in cells]
    tried: dict = {}  # (mixer, cell) -> {lr: accuracy}
    for r in results.values():
        p = r["config"]["task"]["params"]
        tried.setdefault((r["mixer"], cell(p)), {})[r["config"]["optim"]["learning_rate"]] = \
            r["splits"]["test"]["accuracy"]
    top = {(b["mixer"], cell({**results[b["run"]]["config"]["task"]["params"]})): b for b in best}
    mixers = [m for m in ORDER if any(k[0] == m for k in tried)] + sorted({k[0] for k in tried} - set(ORDER))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(names)
    for i, c in enumerate(names):
        acc = [top[(m, c)]["test"] if (m, c) in top else np.nan for m in mixers]
        bars = ax.bar(np.arange(len(mixers)) + (i - (len(names) - 1) / 2) * width, acc, width, label=c)
        for b, a in zip(bars, acc):
            ax.text(b.get_x() + b.get_width() / 2, a + 0.01, f"{a:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(mixers)), mixers)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy on query positions\n(best learning rate per cell)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(title="cell (V=256, d_model=64, 2 layers)", fontsize=8, loc="upper right")
    ax.set_title("MQAR in a zoology stack (gated short convolution before each mixer)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_mechanism.png", dpi=130)
    plt.close(fig)

    lrs = sorted({lr for v in tried.values() for lr in v})
    print("| mechanism | " + " | ".join(f"{c}: best (lr)" for c in names) + " | "
          + " | ".join(f"{c}: lr {lr:g}" for c in names for lr in lrs) + " |")
    print("|---|" + "---|" * (len(names) * (1 + len(lrs))))
    for m in mixers:
        bests = [f"**{top[(m, c)]['test']:.3f}** ({top[(m, c)]['learning_rate']:g})" if (m, c) in top else "-"
                 for c in names]
        every = [f"{tried[(m, c)][lr]:.3f}" if lr in tried.get((m, c), {}) else "-" for c in names for lr in lrs]
        print(f"| {m} | " + " | ".join(bests + every) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
