"""Evaluate trained runs: metrics on every eval split, results.json, plots and a summary table.

    python eval.py --workdir=runs/mqar            # one run
    python eval.py --workdir=runs/mqar_sweep      # every run of a sweep, compared
    python eval.py --workdir=runs/mqar --step=500 --out=/tmp/mqar_eval

Length-extrapolation splits (``test_len{L}``), value-range splits (``test_c{c}``) and context
splits (``test_ctx{n}``) are plotted against L / c / n, one line per run (mechanism), with the
``test`` split at the training value (from the resolved task, defaults included). A sweep whose
runs differ in learning rate also gets the best learning rate per mechanism, width and task cell
(runs whose configs differ only in the learning rate; ``best_learning_rates.json``, chosen on the
``test`` split, as zoology reports).

A run whose config has ``eval.variants`` (name -> config changes, e.g. a RoPE scaling or LSSAR
re-weighting applied after training) is also evaluated as each variant: the trained parameters in
the changed model, reported as run ``<run>+<name>`` (``--variants`` picks some, ``none`` none).

Results go to ``--out``, by default the run directory; a read-only run directory is evaluated
all the same and the results go to ``./eval_<name>`` (one line says so). Exit status 2 with one
``config error:`` line for a bad flag, an unwritable ``--out``, a ``--step`` that is not a
checkpoint (the line lists those there are) or no readable checkpoint; an unreadable newest
checkpoint is reported in one line and the newest readable one is used.
"""

import json
import pathlib
import re
import sys

from absl import app, flags, logging

from zoo import run
from zoo.checkpoint import CheckpointError, one_line

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory or a sweep directory of runs.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to evaluate (default: the config's eval.splits).")
_VARIANTS = flags.DEFINE_list("variants", None, "Which eval.variants of the runs' configs to evaluate beside "
                                              "each run (default: all; 'none': none).")
_OUT = flags.DEFINE_string("out", None, "Where to write results.json and plots (default: workdir, or "
                                        "./eval_<name> when workdir is read-only).")


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


def train_x(r: dict, axis: str) -> float | None:
    """Where the ``test`` split (the training distribution) sits on a sweep axis."""
    params = r.get("task_params") or {}
    if axis == "sequence length":
        return float(r["seq_len"]) if r.get("seq_len") else None
    if axis == "value range c":
        return 1.0
    if axis == "context examples":
        return float(params["num_context"]) if "num_context" in params else None
    return None


def length_curve(r: dict, metric: str = "loss") -> dict[int, float]:
    """``{sequence length: metric}`` of one evaluate() result's ``test`` (at the run's own training
    length) and ``test_len{L}`` splits, sorted by length (the reproduction reports plot these)."""
    out = {}
    for split, m in r["splits"].items():
        if split == "test":
            out[int(r["seq_len"])] = m[metric]
        elif (sx := split_x(split, 0)) and sx[0] == "sequence length":
            out[int(sx[1])] = m[metric]
    return dict(sorted(out.items()))


def plot(results: dict, out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_axis: dict[str, dict[str, list]] = {}
    for name, r in results.items():
        axes = {sx[0] for s in r["splits"] if (sx := split_x(s, 0))}
        for split, m in r["splits"].items():
            if not m:
                continue
            metric = "accuracy" if "accuracy" in m else "loss"
            if split == "test":
                pts = [(a, train_x(r, a)) for a in axes]
            else:
                sx = split_x(split, 0)
                pts = [sx] if sx else []
            for axis, x in pts:
                if x is not None:
                    by_axis.setdefault(f"{axis}|{metric}", {}).setdefault(name, []).append((x, m[metric]))
    for key, lines in by_axis.items():
        axis, metric = key.split("|")
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        if metric == "loss":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0.0, 1.0)  # accuracy: always the whole range, so curves compare across plots
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
    values = [v for ent in runs.values() for heads in ent.values() for v in heads]
    vmin, vmax = min(values), max(values)  # one colour scale for every panel: comparable across runs
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5.0, 3.2 * len(runs)), 3.6), squeeze=False)
    im = None
    for ax, (name, ent) in zip(axes[0], sorted(runs.items())):
        layers = list(ent)
        grid = [ent[layer] for layer in layers]
        width = max(len(g) for g in grid)
        arr = [g + [float("nan")] * (width - len(g)) for g in grid]
        im = ax.imshow(arr, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_xticks(range(width), [str(i) for i in range(width)])
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(i) for i in range(len(layers))])
    fig.suptitle("attention entropy per head (one test batch)")
    fig.tight_layout()
    fig.colorbar(im, ax=list(axes[0]), label="entropy (nats), shared scale")
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


def best_learning_rates(results: dict) -> list[dict]:
    """Per group of runs whose configs differ only in ``optim.learning_rate`` (one mechanism,
    width and task cell of a zoology-style grid): the run with the best ``test`` metric (highest
    accuracy, else lowest loss) and its learning rate; only groups that tried several learning
    rates. ``task``: the task parameters that differ between the groups (the grid's cells)."""
    groups: dict[str, list] = {}
    for name, r in results.items():
        cfg, m = r.get("config") or {}, r["splits"].get("test") or {}
        if not m:
            continue
        rest = json.loads(json.dumps(cfg, default=str))
        lr = (rest.get("optim") or {}).pop("learning_rate", None)
        groups.setdefault(json.dumps([r["mixer"], rest], sort_keys=True, default=str), []).append((name, lr, m, r))
    params = [(g[0][3].get("config") or {}).get("task", {}).get("params") or {} for g in groups.values()]
    varying = sorted({k for p in params for k in p if len({json.dumps(q.get(k), default=str) for q in params}) > 1})
    out = []
    for runs in groups.values():
        if len({lr for _, lr, _, _ in runs}) < 2:
            continue
        metric = "accuracy" if all("accuracy" in m for _, _, m, _ in runs) else "loss"
        pick = max if metric == "accuracy" else min
        name, lr, m, r = pick(runs, key=lambda t: t[2][metric])
        mixer = r["mixer"] if isinstance(r["mixer"], str) else "/".join(map(str, r["mixer"] or []))
        task = {k: r["config"]["task"]["params"].get(k) for k in varying}
        out.append({"mixer": mixer, "d_model": r["config"].get("model", {}).get("d_model"), "task": task,
                    "learning_rate": lr, "run": name, "metric": metric, "test": m[metric],
                    "tried": sorted(lr for _, lr, _, _ in runs)})
    natural = lambda x: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", json.dumps(x, sort_keys=True))]  # noqa: E731
    return sorted(out, key=lambda b: natural([b["mixer"], b["d_model"], b["task"]]))


def with_entropy(r: dict) -> dict:
    """An evaluate() result with its model and sources replaced by the attention entropy."""
    model, sources = r.pop("model"), r.pop("sources")
    r["attention_entropy"] = attention_entropy(model, sources["test"])
    return r


def variants(cfg: dict, wanted: list[str] | None) -> list[tuple[str, dict]]:
    """The run's ``eval.variants`` (name -> config changes applied after training): all, or those
    of the ``--variants`` names it defines (``none``: none)."""
    defined = dict((cfg.get("eval") or {}).get("variants") or {})
    if wanted is None:
        return sorted(defined.items())
    return [(n, defined[n]) for n in wanted if n in defined]


def check_variants(dirs: list[pathlib.Path], wanted: list[str] | None) -> None:
    """A ``--variants`` name that no run's config (its config.json) defines is a config error."""
    if not wanted or wanted == ["none"]:
        return
    defined = set()
    for d in dirs:
        if (d / "config.json").exists():
            defined |= set((json.loads((d / "config.json").read_text()).get("eval") or {}).get("variants") or {})
    if set(wanted) - defined:
        raise run.ConfigError(f"--variants {sorted(set(wanted) - defined)} are not eval.variants of any run; "
                              f"defined: {', '.join(sorted(defined)) or 'none'}")


def output_dir(workdir: pathlib.Path, out: str | None) -> pathlib.Path:
    """``--out`` (must be writable), else the run directory, else (read-only run) ./eval_<name>."""
    if out:
        return run.prepare_dir(pathlib.Path(out), "--out")
    try:
        return run.prepare_dir(workdir, "--workdir")
    except run.ConfigError:
        alt = pathlib.Path.cwd() / f"eval_{workdir.resolve().name}"
        run.prepare_dir(alt, "the fallback output directory (give --out)")
        print(f"note: {workdir} is not writable; writing results to {alt} (choose with --out)", file=sys.stderr,
              flush=True)
        return alt


def main(argv):
    if len(argv) > 1:
        print(f"config error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.ERROR)  # orbax notes read-only checkpoint directories at WARNING
    results = {}
    try:
        if not _WORKDIR.value:
            raise run.ConfigError("--workdir is required (a run directory or a sweep directory)")
        workdir = pathlib.Path(_WORKDIR.value)
        dirs = run.run_dirs(workdir)
        if not dirs:
            raise run.ConfigError(f"--workdir={_WORKDIR.value}: no run (a directory with checkpoints/) there")
        out = output_dir(workdir, _OUT.value)  # before evaluating: an unwritable --out fails fast
        check_variants(dirs, _VARIANTS.value)
        for d in dirs:
            r = run.evaluate(d, step=_STEP.value, splits=_SPLITS.value)
            results[d.name] = with_entropy(r)
            for name, overrides in variants(r["config"], _VARIANTS.value):
                rv = run.evaluate(d, step=_STEP.value, splits=_SPLITS.value, overrides=overrides)
                rv["variant"] = {"name": name, "overrides": overrides}
                results[f"{d.name}+{name}"] = with_entropy(rv)
        best = best_learning_rates(results)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if best:
            (out / "best_learning_rates.json").write_text(json.dumps(best, indent=2))
        plots = plot(results, out)
        ent_plot = plot_entropy(results, out)
    except (run.ConfigError, CheckpointError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. the filesystem turned read-only or full while writing
        print(f"config error: cannot write the results ({one_line(e)})", file=sys.stderr)
        sys.exit(2)
    plots += [ent_plot] if ent_plot else []
    print(table(results))
    if best:
        print("\nbest learning rate per mechanism and width (test split):")
        print("| mixer | d_model | task | learning rate | test | run |\n|---|---|---|---|---|---|")
        for b in best:
            task = ", ".join(f"{k}={v}" for k, v in b["task"].items()) or "-"
            print(f"| {b['mixer']} | {b['d_model']} | {task} | {b['learning_rate']:g} | {b['test']:.4g} "
                  f"({b['metric']}) | {b['run']} |")
    print(f"\nwrote {out / 'results.json'}" + "".join(f"\nwrote {p}" for p in plots))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a bad flag as one ``config error:`` line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"config error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
