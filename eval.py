"""Evaluate trained runs: metrics on every eval split, results.json, plots and a summary table.

    python eval.py --workdir=runs/mqar            # one run
    python eval.py --workdir=runs/mqar_sweep      # every run of a sweep, compared

Length-extrapolation splits (``test_len{L}``), value-range splits (``test_c{c}``) and context
splits (``test_ctx{n}``) are plotted against L / c / n, one line per run (mechanism).
"""

import json
import pathlib
import re
import sys

from absl import app, flags, logging

from zoo import run

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory or a sweep directory of runs.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to evaluate (default: the config's eval.splits).")
_OUT = flags.DEFINE_string("out", None, "Where to write results.json and plots (default: workdir).")


def split_x(split: str, seq_len: int) -> tuple[str, float] | None:
    """(axis label, x) of a sweep split: test_len{L} -> length, test_c{c} -> value range, ..."""
    if split == "test":
        return None
    for pat, label in ((r"test_len(\d+)", "sequence length"), (r"test_c(\d+)", "value range c"),
                       (r"test_ctx(\d+)", "context examples")):
        m = re.fullmatch(pat, split)
        if m:
            return label, float(m.group(1))
    return None


def plot(results: dict, out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_axis: dict[str, dict[str, list]] = {}
    for name, r in results.items():
        for split, m in r["splits"].items():
            sx = split_x(split, r.get("seq_len", 0))
            if split == "test" and r.get("seq_len"):
                label = "sequence length" if any("test_len" in s for s in r["splits"]) else None
                sx = (label, float(r["seq_len"]) if label == "sequence length" else 1.0) if label else None
                if sx is None and any("test_c" in s for s in r["splits"]):
                    sx = ("value range c", 1.0)
            if sx is None:
                continue
            metric = "accuracy" if "accuracy" in m else "loss"
            by_axis.setdefault(f"{sx[0]}|{metric}", {}).setdefault(name, []).append((sx[1], m[metric]))
    for key, lines in by_axis.items():
        axis, metric = key.split("|")
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        if metric == "loss":
            ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel(metric if metric == "accuracy" else "test loss (MSE / cross-entropy)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"{metric} vs {axis}")
        path = out / f"{metric}_vs_{axis.replace(' ', '_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def attention_entropy(model, source, batch_size: int = 16) -> dict[str, list[float]]:
    """Per-layer, per-head attention entropy (nats) on one test batch, recorded by the attention
    modules under ``nnx.capture`` (mechanisms without attention weights are absent)."""
    import jax
    import numpy as np
    from flax import nnx

    from zoo import data as zdata

    batch = next(iter(zdata.make_iterator(source, batch_size=min(batch_size, len(source)), seed=0, shuffle=False,
                                          num_epochs=1)))
    _, stats = nnx.capture(model, nnx.Intermediate)(jax.numpy.asarray(batch["inputs"]))
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(stats):
        ks = jax.tree_util.keystr(path)
        if "attention_entropy" in ks:
            layer = ks.split("['attention_entropy']")[0]
            out[layer] = [float(v) for v in np.asarray(x)]
    return out


def plot_entropy(results: dict, out: pathlib.Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {n: r["attention_entropy"] for n, r in results.items() if r.get("attention_entropy")}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5.0, 3.2 * len(runs)), 3.6), squeeze=False)
    for ax, (name, ent) in zip(axes[0], sorted(runs.items())):
        layers = list(ent)
        grid = [ent[layer] for layer in layers]
        width = max(len(g) for g in grid)
        arr = [g + [float("nan")] * (width - len(g)) for g in grid]
        im = ax.imshow(arr, aspect="auto", cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_xticks(range(width), [str(i) for i in range(width)])
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(i) for i in range(len(layers))])
        fig.colorbar(im, ax=ax, label="entropy (nats)")
    fig.suptitle("attention entropy per head (one test batch)")
    fig.tight_layout()
    path = out / "attention_entropy_per_head.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def table(results: dict) -> str:
    splits = sorted({s for r in results.values() for s in r["splits"]}, key=lambda s: (s != "test", s))
    head = "| run | mixer | step | " + " | ".join(splits) + " |"
    lines = [head, "|" + "---|" * (len(splits) + 3)]
    for name, r in results.items():
        cells = []
        for s in splits:
            m = r["splits"].get(s)
            if not m:
                cells.append("-")
            elif "accuracy" in m:
                cells.append(f"{m['accuracy']:.4f}")
            else:
                cells.append(f"{m['loss']:.4g} (mse)")
        mixer = r["mixer"] if isinstance(r["mixer"], str) else "/".join(map(str, r["mixer"] or []))
        lines.append(f"| {name} | {mixer} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    dirs = run.run_dirs(_WORKDIR.value)
    if not dirs:
        print(f"no run (a directory with checkpoints/) in {_WORKDIR.value}", file=sys.stderr)
        sys.exit(2)
    out = pathlib.Path(_OUT.value or _WORKDIR.value)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for d in dirs:
            r = run.evaluate(d, step=_STEP.value, splits=_SPLITS.value)
            model = r.pop("model")
            sources = r.pop("sources")
            r["attention_entropy"] = attention_entropy(model, sources["test"])
            r["seq_len"] = json.loads((d / "config.json").read_text())["task"]["params"].get("seq_len") \
                if (d / "config.json").exists() else None
            results[d.name] = r
    except run.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plots = plot(results, out)
    ent_plot = plot_entropy(results, out)
    plots += [ent_plot] if ent_plot else []
    print(table(results))
    print(f"\nwrote {out / 'results.json'}" + "".join(f"\nwrote {p}" for p in plots))


if __name__ == "__main__":
    app.run(main)
