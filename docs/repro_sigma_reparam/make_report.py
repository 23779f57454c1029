"""Attention entropy and training loss over training for the sigma_reparam sweep (Zhai et al.,
ICML 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse").

    python docs/repro_sigma_reparam/make_report.py runs/repro_sigma_reparam docs/repro_sigma_reparam

For every run under ``RUN_DIR`` and every kept checkpoint (plus the initialisation, step 0, rebuilt
from the run's config and seed), the model (``zoo.run.load_model(run, step=s)``) is run under
``nnx.capture(model, nnx.Intermediate)`` on the first ``SEQUENCES`` = 64 windows of the test
split; each attention layer sows its per-head entropy (``zoo.nn.diagnostics.attention_entropy``:
``Ent(A_i) = -sum_j A_ij log A_ij`` averaged over queries and sequences; causal, so query ``i``
has ``i + 1`` keys and the uniform row has entropy ``log(i + 1)``). Reported per layer: the
minimum and the mean over its heads. The training loss comes from ``<run>/metrics.jsonl`` (mean
over each logging interval); a "spike" is a logged loss more than ``SPIKE`` nats above the lowest
loss logged before it.

Writes ``results.json``, ``entropy_and_loss.png`` (one column per learning rate; top: the minimum
and mean head entropy of the whole model against the step, per run; bottom: the training loss)
and prints Markdown tables.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SEQUENCES = 64
SPIKE = 0.1


def held_out(cfg: dict) -> np.ndarray:
    """The inputs of the first ``SEQUENCES`` test windows: int32 ``[N, T]``."""
    from zoo import data as zdata
    from zoo import run

    sources = run._data(cfg)
    it = zdata.make_iterator(sources["test"], batch_size=min(SEQUENCES, len(sources["test"])), seed=0,
                             shuffle=False, num_epochs=1)
    return np.asarray(next(iter(it))["inputs"]).astype(np.int32)


def head_entropy(model, tokens: np.ndarray) -> np.ndarray:
    """Per-layer, per-head attention entropy (nats): ``[layers, heads]`` in model order."""
    import jax
    from flax import nnx

    _, stats = nnx.capture(model, nnx.Intermediate)(jax.numpy.asarray(tokens))
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(stats):
        ks = jax.tree_util.keystr(path)
        if "attention_entropy" in ks:
            layer = int(ks.split("['blocks']")[1].split("[")[1].split("]")[0])
            rows.append((layer, np.asarray(x).reshape(-1)))
    if not rows:
        raise ValueError("the model sowed no attention_entropy (no attention layer with explicit weights)")
    return np.stack([e for _, e in sorted(rows, key=lambda r: r[0])])


def train_curve(run_dir: pathlib.Path) -> tuple[list[int], list[float], list[float]]:
    """``(steps, train loss, grad norm)`` from ``metrics.jsonl``."""
    steps, loss, gn = [], [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            steps.append(r["step"])
            loss.append(r["loss"])
            gn.append(r.get("grad_norm", float("nan")))
    return steps, loss, gn


def spikes(loss: list[float]) -> int:
    """Logged losses more than ``SPIKE`` nats above the lowest loss logged before them."""
    best, n = math.inf, 0
    for v in loss:
        if not math.isfinite(v) or v > best + SPIKE:
            n += 1
        best = min(best, v) if math.isfinite(v) else best
    return n


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
    t = tokens.shape[1]
    uniform = float(np.mean(np.log(np.arange(1, t + 1))))  # entropy of uniform causal attention
    tr_steps, tr_loss, tr_gn = train_curve(run_dir)
    test_loss = {json.loads(ln)["step"]: json.loads(ln)["loss"]
                 for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["split"] == "test"}
    out = {"config": {"seed": cfg["seed"], "mixer_options": cfg["model"]["mixer_options"],
                      "learning_rate": cfg["optim"]["learning_rate"]},
           "uniform_entropy": uniform, "sequences": int(tokens.shape[0]), "seq_len": int(t),
           "train": {"steps": tr_steps, "loss": tr_loss, "grad_norm": tr_gn}, "spikes": spikes(tr_loss),
           "final_train_loss": tr_loss[-1], "final_test_loss": test_loss.get(max(test_loss)) if test_loss else None,
           "steps": {}}
    for s in [0, *steps]:
        if s == 0:
            _, _, model, _ = run._setup(cfg, check_step=False)
        else:
            model = run.load_model(run_dir, step=s)
        ent = head_entropy(model, tokens)
        out["steps"][s] = {"min_per_layer": ent.min(1).round(4).tolist(),
                           "mean_per_layer": ent.mean(1).round(4).tolist(), "min": float(ent.min()),
                           "mean": float(ent.mean()), "heads": ent.round(4).tolist()}
        print(f"{run_dir.name} step {s}: entropy min {ent.min():.3f} mean {ent.mean():.3f} "
              f"(uniform {uniform:.3f})", flush=True)
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

    lrs = sorted({r["config"]["learning_rate"] for r in results.values()})
    fig, axes = plt.subplots(2, len(lrs), figsize=(6.5 * len(lrs), 7.5), sharex=True, squeeze=False)
    colours = {"baseline": "tab:red", "sigma_reparam": "tab:blue"}
    styles = ["-", "--", ":", "-."]
    u = next(iter(results.values()))["uniform_entropy"]
    for col, lr in enumerate(lrs):
        top, bottom = axes[0, col], axes[1, col]
        for _, r in sorted(results.items()):
            if r["config"]["learning_rate"] != lr:
                continue
            kind = "sigma_reparam" if r["config"]["mixer_options"].get("sigma_reparam") else "baseline"
            colour, ls = colours[kind], styles[int(r["config"]["seed"]) % len(styles)]
            steps = sorted(int(s) for s in r["steps"])
            top.plot(steps, [r["steps"][s]["min"] for s in steps], marker="o", ms=3, color=colour, ls=ls,
                     label=f"{kind} seed {r['config']['seed']}: min over heads")
            top.plot(steps, [r["steps"][s]["mean"] for s in steps], color=colour, ls=ls, lw=0.8, alpha=0.5)
            bottom.plot(r["train"]["steps"], r["train"]["loss"], color=colour, ls=ls,
                        label=f"{kind} seed {r['config']['seed']}")
        top.axhline(u, color="grey", lw=1, ls=":")
        top.text(0, u, " uniform attention", va="bottom", fontsize=8, color="grey")
        top.set_ylim(bottom=0)
        top.set_title(f"Adam, constant learning rate {lr:g}, no warmup")
        bottom.set_xlabel("training step")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("attention entropy (nats)\nmarkers: min over layers and heads; thin: mean")
    axes[1, 0].set_ylabel("training loss (nats/byte)")
    fig.suptitle("Attention entropy and training loss at high learning rates: baseline vs sigmaReparam")
    fig.tight_layout()
    fig.savefig(out / "entropy_and_loss.png", dpi=130)
    plt.close(fig)

    names = sorted(results)
    print("\n| run | final train loss | final test loss | loss spikes (> 0.1 nats above the best so far) | "
          "min head entropy: init / lowest over training (step) / final | mean entropy final |")
    print("|---|---|---|---|---|---|")
    for n in names:
        r = results[n]
        st = r["steps"]
        low = min(st, key=lambda s: st[s]["min"])
        last = max(st, key=int)
        print(f"| {n} | {r['final_train_loss']:.3f} | {r['final_test_loss']:.3f} | {r['spikes']} | "
              f"{st[0]['min'] if 0 in st else st['0']['min']:.3f} / {st[low]['min']:.3f} ({low}) / "
              f"{st[last]['min']:.3f} | {st[last]['mean']:.3f} |")
    print("\nMinimum head entropy per layer at the last step:\n")
    print("| run | " + " | ".join(f"layer {i}" for i in range(len(results[names[0]]["steps"][0]["min_per_layer"])))
          + " |")
    print("|---|" + "---|" * len(results[names[0]]["steps"][0]["min_per_layer"]))
    for n in names:
        st = results[n]["steps"]
        print(f"| {n} | " + " | ".join(f"{v:.3f}" for v in st[max(st, key=int)]["min_per_layer"]) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
