"""Attention-sink metric over training for the sink_emergence sweep (Gu et al., ICLR 2025).

    python docs/repro_sink_emergence/make_report.py runs/repro_sink_emergence docs/repro_sink_emergence

For every run under ``RUN_DIR`` and every kept checkpoint (plus the initialisation, step 0, rebuilt
from the run's config and seed), the model (``zoo.run.load_model(run, step=s)``) is run under
``nnx.capture(model, nnx.Intermediate)`` on a fixed set of held-out sequences: the first
``TOKENS`` = 64 bytes of the first ``SEQUENCES`` = 100 windows of the test split, as the paper's
``eval_sink_pretrain.py``. Each attention layer sows ``sink_scores``
(``alpha_k = mean_{t >= k} A_tk``, averaged over the sequences; ``zoo.nn.diagnostics``), and

    Sink_1^eps = 100 * #{(layer, head): alpha_1 > eps} / #(layer, head),   eps = 0.3

(``alpha_1`` is the score of the first token). Writes ``results.json`` (per run and step:
``sink_rate``, the per-layer per-head ``alpha_1``, the mean ``alpha_1``, the test loss logged at
that step), ``sink_vs_step.png`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TOKENS = 64
SEQUENCES = 100
EPS = 0.3


def held_out(cfg: dict) -> np.ndarray:
    """The first ``TOKENS`` inputs of the first ``SEQUENCES`` test windows: int32 ``[N, TOKENS]``."""
    from zoo import data as zdata
    from zoo import run

    sources = run._data(cfg)
    it = zdata.make_iterator(sources["test"], batch_size=min(SEQUENCES, len(sources["test"])), seed=0,
                             shuffle=False, num_epochs=1)
    return np.asarray(next(iter(it))["inputs"])[:, :TOKENS].astype(np.int32)


def alpha_first(model, tokens: np.ndarray) -> np.ndarray:
    """``alpha_1`` per (layer, head): ``[layers, heads]`` (layers in model order)."""
    import jax
    from flax import nnx

    _, stats = nnx.capture(model, nnx.Intermediate)(jax.numpy.asarray(tokens))
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(stats):
        if "sink_scores" in jax.tree_util.keystr(path):
            rows.append((jax.tree_util.keystr(path), np.asarray(x)[..., 0]))  # [H, T] -> alpha_1 [H]
    if not rows:
        raise ValueError("the model sowed no sink_scores (no attention layer with explicit weights)")
    order = sorted(rows, key=lambda r: int(r[0].split("['blocks']")[1].split("[")[1].split("]")[0]))
    return np.stack([a.reshape(-1) for _, a in order])


def initial_model(cfg: dict):
    """The run's model at initialisation (its config and seed)."""
    from zoo import run

    _, _, model, _ = run._setup(cfg, check_step=False)
    return model


def measure(run_dir: pathlib.Path) -> dict:
    from zoo import run
    from zoo.checkpoint import Checkpointer

    cfg = json.loads((run_dir / "config.json").read_text())
    tokens = held_out(cfg)
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        steps = sorted(ckpt.all_steps())
    finally:
        ckpt.close()
    test_loss = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "test":
            test_loss[r["step"]] = r["loss"]
    out = {"config": {"mixer": cfg["model"]["mixer"], "mixer_options": cfg["model"]["mixer_options"],
                      "learning_rate": cfg["optim"]["learning_rate"]},
           "sequences": int(tokens.shape[0]), "tokens": int(tokens.shape[1]), "steps": {}}
    for s in [0, *steps]:
        model = initial_model(cfg) if s == 0 else run.load_model(run_dir, step=s)
        a1 = alpha_first(model, tokens)
        out["steps"][s] = {"sink_rate": float(100.0 * np.mean(a1 > EPS)), "alpha_1_mean": float(a1.mean()),
                           "alpha_1": a1.round(4).tolist(), "test_loss": test_loss.get(s)}
        print(f"{run_dir.name} step {s}: Sink_1^{EPS} = {out['steps'][s]['sink_rate']:.1f}%, "
              f"mean alpha_1 = {a1.mean():.3f}", flush=True)
    return out


def main(run_dir: str, out: str) -> None:
    from zoo import run

    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {d.name: measure(d) for d in run.run_dirs(run_dir)}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in sorted(results.items()):
        steps = sorted(int(s) for s in r["steps"])
        axes[0].plot(steps, [r["steps"][s]["sink_rate"] for s in steps], marker="o", ms=4, label=name)
        axes[1].plot(steps, [r["steps"][s]["alpha_1_mean"] for s in steps], marker="o", ms=4, label=name)
    axes[0].set_ylabel(f"Sink$_1^{{{EPS}}}$ (% of layer-head pairs with $\\alpha_1 > {EPS}$)")
    axes[0].set_ylim(-3, 103)
    axes[1].set_ylabel("mean $\\alpha_1$ over layers and heads")
    axes[1].axhline(EPS, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Attention sink on the first token over training (first {TOKENS} bytes of "
                 f"{next(iter(results.values()))['sequences']} held-out windows)")
    fig.tight_layout()
    fig.savefig(out / "sink_vs_step.png", dpi=130)
    plt.close(fig)

    names = sorted(results)
    steps = sorted({int(s) for r in results.values() for s in r["steps"]})
    print("\n| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for s in steps:
        cells = []
        for n in names:
            st = results[n]["steps"].get(s)
            cells.append("-" if st is None else f"{st['sink_rate']:.0f}% ({st['alpha_1_mean']:.2f})")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("\n| run | final test loss (nats/byte) |")
    print("|---|---|")
    for n in names:
        last = results[n]["steps"][max(results[n]["steps"], key=int)]
        print(f"| {n} | {last['test_loss']:.3f} |" if last["test_loss"] is not None else f"| {n} | - |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
