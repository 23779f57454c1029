"""Baselines on the exact test splits of an ``icl_regression`` sweep and the combined figure.

    python docs/repro_icl_regression/make_report.py runs/repro_icl docs/repro_icl_regression

Reads ``<run_dir>/results.json`` (written by ``eval.py``), rebuilds the same task data (same
parameters and data seed, from the tfds cache), and computes on every evaluated split, prompt by
prompt, the errors of:

* Bayes / ridge (``zoo.data.icl_regression.baselines``: the posterior mean, the optimal predictor);
* one-step gradient descent from 0, ``x_q^T (eta / L) X^T y``, with the best scalar ``eta`` per
  context length (closed form on that split) and with the ``eta`` best at the training length;
* predicting 0.

Writes ``results.json`` (eval.py's), ``baselines.json`` and ``mse_vs_context.png`` to ``out``.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def gd_errors(inputs: np.ndarray, y_q: np.ndarray, eta: float | None = None) -> tuple[float, float]:
    """(mse, eta) of one-step GD from 0, ``x_q^T (eta / L) X^T y``; ``eta=None``: the best one."""
    a = np.asarray(inputs, np.float64)
    x, y, xq = a[:, :-1, :-1], a[:, :-1, -1], a[:, -1, :-1]
    g = np.einsum("bd,bnd,bn->b", xq, x, y) / x.shape[1]
    if eta is None:
        eta = float(np.dot(g, y_q) / np.dot(g, g))
    return float(np.mean((eta * g - y_q) ** 2)), eta


def main(run_dir: str, out: str) -> None:
    from zoo import data as zdata
    from zoo.data import icl_regression as icl

    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    first = next(iter(results.values()))
    cfg, params = first["config"], first["task_params"]
    build_params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()}
    sources = zdata.build("icl_regression", pathlib.Path(cfg["task"]["data_dir"]).expanduser(),
                          seed=cfg["task"].get("data_seed", 0), **build_params)
    n_eval = cfg["eval"]["batch_size"] * cfg["eval"]["max_batches"]
    splits = sorted(first["splits"], key=lambda s: int(re.sub(r"\D", "", s) or params["num_context"]))
    base = {}
    train_eta = None
    for s in ["test"] + [s for s in splits if s != "test"]:
        src = sources[s]
        rows = [src[i] for i in range(min(n_eval, len(src)))]  # the prompts eval.py scored, in order
        batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in ("inputs", "targets")}
        y_q = batch["targets"][:, -1, 0].astype(np.float64)
        b = icl.baselines(batch, noise_std=params["noise_std"], beta_scale=params["beta_scale"])
        b["gd_best_eta_mse"], eta = gd_errors(batch["inputs"], y_q)
        if s == "test":
            train_eta = eta
        b["gd_best_eta"] = eta
        b["gd_train_eta_mse"], _ = gd_errors(batch["inputs"], y_q, train_eta)
        b["context"] = batch["inputs"].shape[1] - 1
        b["prompts"] = int(len(y_q))
        base[s] = b
    (out / "baselines.json").write_text(json.dumps(base, indent=2))
    if run_dir.resolve() != out.resolve():
        shutil.copy(run_dir / "results.json", out / "results.json")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = sorted((base[s]["context"], s) for s in base)
    xs = [c for c, _ in ctx]
    fig, ax = plt.subplots(figsize=(7.5, 6))
    groups: dict[str, list[str]] = {}  # seeds of one setting share a colour
    for name in results:
        groups.setdefault(re.sub(r"_s\d+$", "", name), []).append(name)
    colours = {"softmax_h1": "tab:red", "softmax_h2": "tab:orange", "softmax_h4": "tab:blue",
               "linear_h4": "tab:purple", "linear_elu_h4": "tab:green"}
    labels = {"softmax_h1": "softmax, 1 head", "softmax_h2": "softmax, 2 heads", "softmax_h4": "softmax, 4 heads",
              "linear_h4": "linear (identity map, no normaliser), 4 heads",
              "linear_elu_h4": "linear (elu+1, normalised), 4 heads"}
    for g, names in groups.items():
        for i, name in enumerate(names):
            r = results[name]
            pts = [(base[s]["context"], r["splits"][s]["loss"]) for _, s in ctx if r["splits"].get(s)]
            label = labels.get(g, g) + (f" ({len(names)} seeds)" if len(names) > 1 else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if g.startswith("linear") else "-",
                    marker="o", ms=4, color=colours.get(g), alpha=0.85, label=label if i == 0 else None)
    ax.plot(xs, [base[s]["bayes_mse"] for _, s in ctx], "k-", lw=2, label="Bayes / ridge (optimal)")
    ax.plot(xs, [base[s]["gd_best_eta_mse"] for _, s in ctx], "k:", label="one-step GD, best step per L")
    ax.axvline(params["num_context"], color="grey", alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x}\n(train)" if x == params["num_context"] else str(x) for x in xs])
    ax.set_xlabel(f"context examples L at test (trained at L = {params['num_context']})")
    ax.set_ylabel("query MSE (label noise variance 0.1)")
    ax.set_title(f"In-context linear regression, d = {params['dim']}: error vs context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(out / "mse_vs_context.png", dpi=130)
    plt.close(fig)
    print(json.dumps(base, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
