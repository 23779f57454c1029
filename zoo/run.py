"""The training and evaluation loops behind ``train.py`` and ``eval.py`` (config in, files out).

``train(config, workdir)``: builds the task data (``zoo.data``), the model, the mesh and the
optimizer; resumes from the latest checkpoint in ``workdir`` if there is one; trains with a
progress bar; writes ``metrics.jsonl`` (one JSON object per log/eval event) and orbax
checkpoints (state + data-iterator state + config) every ``train.checkpoint_every`` steps, at
the end and on SIGTERM. Same config and seed give the same numbers; a run killed at any point
resumes from its last checkpoint and ends with the same parameters and metrics as an
uninterrupted one.

``evaluate(workdir)``: restores a run (config + checkpoint) and computes the task metrics on
every split in ``eval.splits`` (length / value-range sweeps are splits of the task).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import zoo.models  # noqa: F401  (registers the model-level mixers: titans_mac, ...)
from zoo import data as zdata
from zoo import sharding, train_lib
from zoo.checkpoint import Checkpointer
from zoo.nn import check_mixer_spec


class ConfigError(ValueError):
    """A bad config value: reported as one line by train.py / eval.py."""


def config_to_dict(config: Any) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def _check_mixers(model_cfg: dict) -> None:
    """Every layer's mixer spec (``model.mixer`` with ``model.mixer_options``, combined as the model
    is built) passes the check ``zoo.nn.build_mixer`` applies (``check_mixer_spec``: a known mixer
    name, arguments the mixer takes, and transform options that pass
    ``zoo.attention.get(name).check_options``)."""
    if model_cfg.get("mixer") is None:
        return
    kw = train_lib.model_kwargs({"num_layers": 1, **model_cfg})
    for i, spec in enumerate(kw["mixers"]):
        check_mixer_spec(spec, name="model.mixer" if isinstance(model_cfg["mixer"], str) else f"model.mixer[{i}]")


def validate(cfg: dict) -> None:
    """Checks the values a run depends on and raises :class:`ConfigError` naming the key."""
    task = cfg["task"]["name"]
    if task not in zdata.tasks():
        raise ConfigError(f"task.name={task!r} is not a task; valid: {', '.join(zdata.tasks())}")
    m = cfg["model"]
    if m.get("name", "decoder_lm") not in train_lib.MODELS:
        raise ConfigError(f"model.name={m.get('name')!r} is not valid; valid: {', '.join(sorted(train_lib.MODELS))}")
    try:
        _check_mixers(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg["train"]
    for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "eval_batches"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer; got {t[key]!r}")
    if t["checkpoint_every"] % t["log_every"]:
        raise ConfigError(
            f"train.checkpoint_every ({t['checkpoint_every']}) must be a multiple of train.log_every "
            f"({t['log_every']}) so a resumed run logs the same metrics"
        )
    if t["compute_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"train.compute_dtype must be 'float32' or 'bfloat16'; got {t['compute_dtype']!r}")
    o = cfg["optim"]
    if not (isinstance(o["learning_rate"], (int, float)) and o["learning_rate"] > 0):
        raise ConfigError(f"optim.learning_rate must be > 0; got {o['learning_rate']!r}")


def _data(cfg: dict) -> zdata.Sources:
    task = cfg["task"]
    data_dir = os.path.expanduser(task["data_dir"])
    try:
        return zdata.build(task["name"], data_dir, seed=task.get("data_seed", 0), **dict(task["params"]))
    except ValueError as e:
        raise ConfigError(f"task.params: {e}") from None


def _setup(cfg: dict):
    validate(cfg)
    sources = _data(cfg)
    spec = sources.spec
    mc = cfg["mesh"]
    try:
        mesh = sharding.make_mesh(mc["data"], mc["fsdp"], mc["tensor"])
        rules = sharding.rules_from(mc.get("logical_axis_rules"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        # Parameters are created (and eagerly sharded) under the mesh and the logical-axis rules.
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            model = train_lib.build_model(cfg["model"], spec, seed=cfg["seed"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    dtype = jnp.bfloat16 if cfg["train"]["compute_dtype"] == "bfloat16" else jnp.float32
    tx = train_lib.make_optimizer(cfg["optim"], cfg["train"]["steps"])
    trainer = train_lib.Trainer(nnx.graphdef(model), tx, spec.kind, mesh, rules, dtype, spec.ignore_index or -100)
    return sources, spec, model, trainer


def _per_host_batch(cfg: dict, mesh) -> int:
    bs = cfg["train"]["batch_size"]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if bs % shards or bs % jax.process_count():
        raise ConfigError(
            f"train.batch_size={bs} must be divisible by the data*fsdp mesh size ({shards}) and the "
            f"number of hosts ({jax.process_count()})"
        )
    return bs // jax.process_count()


def _evaluate_split(trainer, eval_step, state, source, batch_size: int, max_batches: int) -> dict:
    it = zdata.make_iterator(source, batch_size=min(batch_size, len(source)), seed=0, shuffle=False, num_epochs=1)
    total: dict[str, float] = {}
    for i, batch in enumerate(it):
        if i >= max_batches:
            break
        m = jax.device_get(eval_step(state, sharding.shard_batch(batch, trainer.mesh, trainer.rules)))
        for k, v in m.items():
            total[k] = total.get(k, 0.0) + float(v)
    return train_lib.summarize(total) if total else {}


class _Log:
    """Appends JSON lines to ``metrics.jsonl`` (on resume, lines past the restored step are
    dropped) and, when ``tensorboardX`` is installed, the same scalars to ``<workdir>/tensorboard``
    (tag ``split/metric``)."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.tb = None
        if jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for k, v in record.items():
                    if k not in ("step", "split") and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(config: Any, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the last logged train and eval metrics."""
    cfg = config_to_dict(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sources, spec, model, trainer = _setup(cfg)
    tcfg = cfg["train"]
    state = trainer.init_state(model)
    del model
    # The generated datasets are small: decode once into memory (10x faster than reading records).
    it = zdata.make_iterator(zdata.to_memory(sources["train"]), batch_size=_per_host_batch(cfg, trainer.mesh),
                             seed=cfg["seed"])
    ckpt = Checkpointer(workdir, max_to_keep=tcfg["keep_checkpoints"], save_every=tcfg["checkpoint_every"])
    start = 0
    if ckpt.latest_step() is not None:
        state, data_state, _ = ckpt.restore(None, state)
        it.set_state(data_state)
        start = int(state["step"])
    log = _Log(workdir / "metrics.jsonl", start)
    (workdir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    train_step, eval_step = trainer.jitted()

    stop = {"flag": False}
    prev = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    bar = None
    if tcfg.get("progress_bar", True) and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg["steps"], initial=start, desc=workdir.name, dynamic_ncols=True)
    last: dict = {}
    pending: list = []
    tokens = nsteps = 0
    t0 = time.perf_counter()
    step = start
    try:
        while step < tcfg["steps"] and not stop["flag"]:
            batch = next(it)
            state, m = train_step(state, sharding.shard_batch(batch, trainer.mesh, trainer.rules))
            step += 1
            nsteps += 1
            tokens += int(np.prod(batch["inputs"].shape[:2]))
            pending.append(m)  # fetched at log time only: no host sync per step
            if step % tcfg["log_every"] == 0 or step == tcfg["steps"]:
                acc: dict[str, float] = {}
                for mm in jax.device_get(pending):
                    for k, v in mm.items():
                        acc[k] = acc.get(k, 0.0) + float(v)
                dt = time.perf_counter() - t0
                rec = {"step": step, "split": "train", **train_lib.summarize(acc),
                       "grad_norm": acc["grad_norm"] / nsteps, "tokens_per_s": tokens / dt}
                log.write(rec)
                last["train"] = rec
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('accuracy', float('nan')):.3f}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                pending, tokens, nsteps, t0 = [], 0, 0, time.perf_counter()
            if step % tcfg["eval_every"] == 0 or step == tcfg["steps"]:
                ev = _evaluate_split(trainer, eval_step, state, sources["test"], cfg["eval"]["batch_size"],
                                     tcfg["eval_batches"])
                rec = {"step": step, "split": "test", **ev}
                log.write(rec)
                last["test"] = rec
            ckpt.save(step, state, it.get_state(), cfg, force=step == tcfg["steps"])
            if bar is not None:
                bar.update(1)
        if stop["flag"]:
            ckpt.save(step, state, it.get_state(), cfg, force=True)
    finally:
        ckpt.close()
        log.close()
        signal.signal(signal.SIGTERM, prev)
        if bar is not None:
            bar.close()
    last["state"] = state
    last["stopped"] = stop["flag"]  # SIGTERM: the caller should stop too (e.g. a sweep)
    return last


def run_dirs(workdir: str | os.PathLike) -> list[pathlib.Path]:
    """``workdir`` if it holds a run, else its sub-directories that do (a sweep)."""
    w = pathlib.Path(workdir)
    if (w / "checkpoints").is_dir():
        return [w]
    return sorted(p for p in w.iterdir() if (p / "checkpoints").is_dir()) if w.is_dir() else []


def evaluate(workdir: str | os.PathLike, *, step: int | None = None, splits: list[str] | None = None) -> dict:
    """Restores the run in ``workdir`` and returns ``{split: metrics}`` for ``eval.splits``."""
    ckpt = Checkpointer(workdir)
    try:
        cfg = ckpt.restore_config(step)
        sources, spec, model, trainer = _setup(cfg)
        abstract = trainer.init_state(model)  # a template with the right shapes and shardings
        state, _, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    _, eval_step = trainer.jitted()
    splits = splits or list(cfg["eval"]["splits"])
    unknown = [s for s in splits if s not in sources]
    if unknown:
        raise ConfigError(f"eval.splits {unknown} not in the task's splits {sorted(sources)}")
    out = {"step": int(state["step"]), "task": spec.name, "kind": spec.kind, "mixer": cfg["model"].get("mixer"),
           "splits": {}}
    for s in splits:
        out["splits"][s] = _evaluate_split(trainer, eval_step, state, sources[s], cfg["eval"]["batch_size"],
                                           cfg["eval"]["max_batches"])
    out["model"] = trainer.model(state)
    out["sources"] = sources
    return out
