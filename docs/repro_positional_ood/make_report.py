"""Figure and table of the positional_ood sweep, with the paper's numbers beside ours.

    python docs/repro_positional_ood/make_report.py runs/repro_positional docs/repro_positional_ood

Reads ``<run_dir>/results.json`` (written by ``eval.py``); writes ``results.json`` (a copy),
``mse_vs_range.png`` (one panel per task: test MSE against the value-range factor c, positional
vs standard, the paper's medians at c = 10 as stars) and prints a Markdown table.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys

# Median MSE at the 10x range, positional vs standard (Back de Luca et al., ICML'25; the official
# repository's results, as collected in the design notes, wave2 section 5.1).
PAPER_C10 = {"sum": (0.059, 87.6), "min": (0.043, 19.7), "sort": (0.146, 54.5)}


def curves(results: dict) -> dict:
    """``{op: {attention: [(c, mse), ...]}}`` from eval.py's results (``test`` is c = 1)."""
    out: dict = {}
    for name, r in results.items():
        op, att = name.rsplit("_", 1)
        pts = []
        for split, m in r["splits"].items():
            c = 1 if split == "test" else int(re.fullmatch(r"test_c(\d+)", split).group(1))
            pts.append((c, m["loss"]))
        out.setdefault(op, {})[att] = sorted(pts)
    return out


def main(run_dir: str, out: str) -> None:
    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    if run_dir.resolve() != out.resolve():
        shutil.copy(run_dir / "results.json", out / "results.json")
    cur = curves(results)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in ("sum", "min", "sort", "median", "max_subarray") if op in cur]
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 4), sharey=True)
    colours = {"positional": "tab:blue", "standard": "tab:red"}
    for ax, op in zip(axes, ops):
        for att, pts in sorted(cur[op].items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, color=colours[att],
                    label=f"{att} (ours)")
        if op in PAPER_C10:
            for att, v in zip(("positional", "standard"), PAPER_C10[op]):
                ax.plot([10], [v], marker="*", ms=14, ls="none", color=colours[att], mec="k",
                        label=f"{att} (paper, c=10)")
        ax.set_yscale("log")
        ax.set_xticks(range(1, 11))
        ax.set_xlabel("value range factor c (test values in [-2c, 2c])")
        ax.set_title(f"{op}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test MSE (trained at c = 1)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Positional attention vs standard transformer: out-of-distribution value ranges")
    fig.tight_layout()
    fig.savefig(out / "mse_vs_range.png", dpi=130)
    plt.close(fig)

    print("| task | model | c=1 (train range) | c=2 | c=5 | c=10 | paper, c=10 |")
    print("|---|---|---|---|---|---|---|")
    for op in ops:
        for i, att in enumerate(("positional", "standard")):
            d = dict(cur[op].get(att, []))
            paper = f"{PAPER_C10[op][i]:g}" if op in PAPER_C10 else "-"
            print(f"| {op} | {att} | " + " | ".join(f"{d[c]:.3g}" if c in d else "-" for c in (1, 2, 5, 10))
                  + f" | {paper} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
