"""The training and evaluation loops behind ``train.py`` and ``eval.py`` (config in, files out).

``train(config, workdir)``: validates the config (task parameters, model arguments, mixer
options, and one training step traced abstractly with ``jax.eval_shape``, so a bad value is a
:class:`ConfigError` before anything is written), builds the task data (``zoo.data``), the model,
the mesh and the optimizer; resumes from the newest readable checkpoint in ``workdir`` (an
unreadable newer one is reported in one line and moved to ``workdir/checkpoints_unreadable``);
trains with a progress bar; writes ``metrics.jsonl`` (one JSON object per log/eval event) and
orbax checkpoints (state + data-iterator state + the metrics accumulated since the last log +
config) every ``train.checkpoint_every`` steps, at the end and on SIGTERM. Same config and seed
give the same numbers; a run killed (SIGKILL) or preempted (SIGTERM) at any point resumes and
ends with the same parameters and metrics as an uninterrupted one.

``train.init_from`` (a run directory; relative: next to ``workdir``, so in a sweep another entry's
name) starts a new run from that run's trained parameters (``train.init_step``, default its newest
readable checkpoint) with a fresh optimizer: a fine-tune, e.g. at a longer length with a RoPE
scaling. Parameters the new model adds keep their initialisation; a resumed run continues from
its own checkpoints.

``tokens_per_s`` in the train records excludes the first step of each process (compilation),
whose time is ``compile_s`` in the first train record written by that process.

``evaluate(workdir)``: restores a run (config + newest readable checkpoint) and computes the
task metrics on every split in ``eval.splits`` (length / value-range sweeps are splits of the
task); with ``overrides`` it evaluates the trained parameters in a model rebuilt from a changed
config (``eval.variants``: a RoPE scaling or a re-weighting applied after training).
``load_model(workdir, overrides=...)`` returns such a model.
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
from zoo.checkpoint import Checkpointer, CheckpointError, one_line
from zoo.nn import check_mixer_spec

PREEMPTED_EXIT_CODE = 143  # train.py's exit status after SIGTERM (128 + 15, as a shell reports it)


class ConfigError(ValueError):
    """A bad config value, path or permission: reported as one line by train.py / eval.py (exit 2)."""


def config_to_dict(config: Any) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def _check_mixers(model_cfg: dict) -> None:
    """Every layer's mixer spec (``model.mixer`` with ``model.mixer_options``, combined as the model
    is built) passes the check ``zoo.nn.build_mixer`` applies (``check_mixer_spec``: a known mixer
    name, arguments the mixer takes, and transform options that pass
    ``zoo.attention.get(name).check_options``)."""
    if model_cfg.get("mixer") is None:
        return
    if model_cfg.get("name", "decoder_lm") not in train_lib.LAYERED_MIXERS:  # one attention transform
        check_mixer_spec({"transform": model_cfg["mixer"], **dict(model_cfg.get("mixer_options") or {})},
                         name="model.mixer")
        return
    kw = train_lib.model_kwargs({"num_layers": 1, **model_cfg})
    for i, spec in enumerate(kw["mixers"]):
        check_mixer_spec(spec, name="model.mixer" if isinstance(model_cfg["mixer"], str) else f"model.mixer[{i}]")


def validate(cfg: dict) -> None:
    """Checks the values a run depends on and raises :class:`ConfigError` naming the key."""
    task = cfg["task"]["name"]
    if task not in zdata.tasks():
        raise ConfigError(f"task.name={task!r} is not a task; valid: {', '.join(zdata.tasks())}")
    try:
        split_names = zdata.get_task(task).splits(**dict(cfg["task"]["params"]))
    except ValueError as e:
        raise ConfigError(f"task.params: {e}") from None
    unknown = [sp for sp in cfg["eval"]["splits"] if sp not in split_names]
    if unknown:
        raise ConfigError(f"eval.splits {unknown} are not splits of task {task!r}; its splits: "
                          f"{', '.join(sorted(split_names))}")
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
    if t.get("init_from") is not None and not isinstance(t["init_from"], str):
        raise ConfigError(f"train.init_from must be a run directory (a string) or None; got {t['init_from']!r}")
    if t.get("init_step") is not None and not (isinstance(t["init_step"], int) and t["init_step"] >= 0):
        raise ConfigError(f"train.init_step must be a checkpoint step (an int >= 0) or None; got {t['init_step']!r}")
    if t["compute_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"train.compute_dtype must be 'float32' or 'bfloat16'; got {t['compute_dtype']!r}")
    o = cfg["optim"]
    if not (isinstance(o["learning_rate"], (int, float)) and o["learning_rate"] > 0):
        raise ConfigError(f"optim.learning_rate must be > 0; got {o['learning_rate']!r}")
    if not (isinstance(o.get("warmup_steps", 0), int) and 0 <= o.get("warmup_steps", 0) < t["steps"]):
        raise ConfigError(f"optim.warmup_steps ({o.get('warmup_steps')!r}) must be an int in [0, train.steps="
                          f"{t['steps']})")


def _data(cfg: dict) -> zdata.Sources:
    task = cfg["task"]
    data_dir = os.path.expanduser(task["data_dir"])
    try:
        return zdata.build(task["name"], data_dir, seed=task.get("data_seed", 0), **dict(task["params"]))
    except ValueError as e:
        raise ConfigError(f"task.params: {e}") from None
    except OSError as e:
        raise ConfigError(f"task.data_dir={task['data_dir']!r}: cannot write the generated data "
                          f"({e.strerror or one_line(e)})") from None


def _setup(cfg: dict, *, check_step: bool = True):
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
    try:
        tx = train_lib.make_optimizer(cfg["optim"], cfg["train"]["steps"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    trainer = train_lib.Trainer(nnx.graphdef(model), tx, spec.kind, mesh, rules, dtype, spec.ignore_index or -100)
    if check_step:
        _check_step(trainer, model, spec, _per_host_batch(cfg, mesh))
    return sources, spec, model, trainer


def abstract_batch(spec: zdata.TaskSpec, batch_size: int) -> dict:
    """``jax.ShapeDtypeStruct`` s of one training batch of the task (``None`` dims = seq_len)."""
    return {k: jax.ShapeDtypeStruct((batch_size, *(spec.seq_len if d is None else d for d in shape)), np.dtype(dt))
            for k, (shape, dt) in spec.features.items()}


def _check_step(trainer, model, spec, batch_size: int) -> None:
    """Traces one training step abstractly (``jax.eval_shape``: no compilation, no FLOPs), so a
    model that cannot run on this task (a mixer missing a needed option, a shape mismatch) is a
    one-line ConfigError before any file is written."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    to_abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    state = {"params": jax.tree.map(to_abstract, params), "rest": jax.tree.map(to_abstract, rest),
             "opt_state": jax.eval_shape(trainer.tx.init, jax.tree.map(to_abstract, params)),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    try:
        with jax.set_mesh(trainer.mesh), nnx.logical_axis_rules(trainer.rules):
            jax.eval_shape(trainer.train_step, state, abstract_batch(spec, batch_size))
    except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as e:
        raise ConfigError(f"model: one training step on task {spec.name!r} fails: {one_line(e)}") from None


def _per_host_batch(cfg: dict, mesh) -> int:
    bs = cfg["train"]["batch_size"]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if bs % shards or bs % jax.process_count():
        raise ConfigError(
            f"train.batch_size={bs} must be divisible by the data*fsdp mesh size ({shards}) and the "
            f"number of hosts ({jax.process_count()})"
        )
    return bs // jax.process_count()


def _evaluate_split(trainer, eval_step, state, source, batch_size: int, max_batches: int,
                    timing: dict | None = None) -> dict:
    """Task metrics over up to ``max_batches`` batches of ``source``; ``timing`` (if given) gets
    the tokens and seconds of the batches after the first (the first one compiles)."""
    it = zdata.make_iterator(source, batch_size=min(batch_size, len(source)), seed=0, shuffle=False, num_epochs=1)
    total: dict[str, float] = {}
    for i, batch in enumerate(it):
        if i >= max_batches:
            break
        t = time.perf_counter()
        m = jax.device_get(eval_step(state, sharding.shard_batch(batch, trainer.mesh, trainer.rules)))
        if timing is not None and i > 0:
            timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - t
            timing["tokens"] = timing.get("tokens", 0) + int(np.prod(batch["inputs"].shape[:2]))
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


def check_dir(path: pathlib.Path, what: str) -> None:
    """Raises a one-line ConfigError unless ``path`` is (or can be created as) a writable
    directory; creates nothing (a probe file in the nearest existing ancestor is removed)."""
    path = pathlib.Path(path).absolute()
    node = path
    while not node.exists():
        if node.parent == node:
            break
        node = node.parent
    if not node.is_dir():
        if node == path:
            raise ConfigError(f"{what}={str(path)!r} exists and is not a directory")
        raise ConfigError(f"{what}={str(path)!r}: {str(node)!r} is a file, not a directory")
    try:
        probe = node / f".zoo_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}={str(path)!r} is not writable ({node}: {e.strerror or one_line(e)})") from None


def prepare_dir(path: pathlib.Path, what: str) -> pathlib.Path:
    """Creates ``path`` (and parents) after :func:`check_dir`; any OSError is a ConfigError."""
    check_dir(path, what)
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}={str(path)!r}: cannot create it ({e.strerror or one_line(e)})") from None
    return path


def train(config: Any, workdir: str | os.PathLike, *, on_step: Any = None) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the last logged train and eval metrics,
    ``state``, ``step`` and ``stopped`` (True when SIGTERM ended it before ``train.steps``: the
    checkpoint and the pending metrics are saved, the same call resumes).

    Everything is validated (including one abstract training step) before ``workdir`` is
    created. ``on_step(step)`` is called after every step (a hook for tests and tools).
    """
    cfg = config_to_dict(config)
    workdir = pathlib.Path(workdir)
    check_dir(workdir, "--workdir")
    sources, spec, model, trainer = _setup(cfg)
    if cfg["train"].get("init_from") and not (init_from_dir(cfg["train"], workdir) / "checkpoints").is_dir():
        raise ConfigError(f"train.init_from={cfg['train']['init_from']!r}: no run at "
                          f"{init_from_dir(cfg['train'], workdir)} (a directory with checkpoints/)")
    prepare_dir(workdir, "--workdir")
    tcfg = cfg["train"]
    state = trainer.init_state(model)
    del model
    # The generated datasets are small: decode once into memory (10x faster than reading records).
    it = zdata.make_iterator(zdata.to_memory(sources["train"]), batch_size=_per_host_batch(cfg, trainer.mesh),
                             seed=cfg["seed"])
    ckpt = Checkpointer(workdir, max_to_keep=tcfg["keep_checkpoints"], save_every=tcfg["checkpoint_every"])
    start = 0
    carry = {"acc": {}, "nsteps": 0}  # metrics of the steps since the last log record
    try:
        restored = ckpt.restore_readable(state, quarantine=workdir / "checkpoints_unreadable")
    except CheckpointError:
        ckpt.close()
        raise
    if restored is None and tcfg.get("init_from"):
        state["params"] = _init_from(tcfg, workdir, state["params"])
    if restored is not None:
        _, state, data_state, _ = restored
        if isinstance(data_state, dict) and set(data_state) == {"iterator", "pending"}:
            data_state, carry = data_state["iterator"], data_state["pending"]
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
    acc: dict[str, float] = dict(carry["acc"])
    nsteps = int(carry["nsteps"])
    pending: list = []
    compile_s = None  # the first step of this process: compilation + one step
    timed_tokens, excluded, t0 = 0, 0.0, 0.0
    step = start

    def fold() -> None:  # device metrics -> host sums, in step order (the same sums after a resume)
        nonlocal pending
        for mm in jax.device_get(pending):
            for k, v in mm.items():
                acc[k] = acc.get(k, 0.0) + float(v)
        pending = []

    saved = {"step": start if restored is not None else None}

    def save() -> None:
        if saved["step"] == step:  # e.g. SIGTERM right after a scheduled save
            return
        fold()
        data = {"iterator": it.get_state(), "pending": {"acc": dict(acc), "nsteps": nsteps}}
        ckpt.save(step, state, data, cfg, force=True)
        saved["step"] = step

    try:
        while step < tcfg["steps"] and not stop["flag"]:
            batch = next(it)
            t_step = time.perf_counter()
            state, m = train_step(state, sharding.shard_batch(batch, trainer.mesh, trainer.rules))
            step += 1
            nsteps += 1
            pending.append(m)  # fetched at log time only: no host sync per step
            if compile_s is None:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t_step
                t0, excluded, timed_tokens = time.perf_counter(), 0.0, 0
            else:
                timed_tokens += int(np.prod(batch["inputs"].shape[:2]))
            if step % tcfg["log_every"] == 0 or step == tcfg["steps"]:
                fold()
                jax.block_until_ready(state["step"])
                dt = time.perf_counter() - t0 - excluded
                rec = {"step": step, "split": "train", **train_lib.summarize(acc),
                       "grad_norm": acc["grad_norm"] / nsteps,
                       "tokens_per_s": timed_tokens / dt if timed_tokens and dt > 0 else None}
                if "compile_s" not in last:
                    rec["compile_s"] = last["compile_s"] = compile_s
                log.write(rec)
                last["train"] = rec
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('accuracy', float('nan')):.3f}",
                                    tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
                acc, nsteps, timed_tokens, excluded, t0 = {}, 0, 0, 0.0, time.perf_counter()
            t_other = time.perf_counter()
            if step % tcfg["eval_every"] == 0 or step == tcfg["steps"]:
                ev = _evaluate_split(trainer, eval_step, state, sources["test"], cfg["eval"]["batch_size"],
                                     tcfg["eval_batches"])
                rec = {"step": step, "split": "test", **ev}
                log.write(rec)
                last["test"] = rec
            if step == tcfg["steps"] or step % tcfg["checkpoint_every"] == 0:
                save()
            if on_step is not None:
                on_step(step)
            excluded += time.perf_counter() - t_other
            if bar is not None:
                bar.update(1)
        stopped = stop["flag"] and step < tcfg["steps"]
        if stopped and step > start:
            save()
    finally:
        ckpt.close()
        log.close()
        signal.signal(signal.SIGTERM, prev)
        if bar is not None:
            bar.close()
    last.pop("compile_s", None)
    last["state"] = state
    last["step"] = step
    last["stopped"] = stopped  # SIGTERM: the caller should stop too (e.g. a sweep)
    return last


def init_from_dir(tcfg: dict, workdir: pathlib.Path) -> pathlib.Path:
    """``train.init_from`` as a path: absolute, or relative to the run directory's parent (in a
    sweep, another entry's name)."""
    p = pathlib.Path(os.path.expanduser(str(tcfg["init_from"])))
    return p if p.is_absolute() else workdir.absolute().parent / p


def _init_from(tcfg: dict, workdir: pathlib.Path, params: nnx.State) -> nnx.State:
    """The parameters of a new run started from another run's checkpoint (``train.init_from``,
    its newest readable step or ``train.init_step``): every parameter at the same path is copied
    (one line lists those kept at their initialisation); the optimizer starts afresh."""
    src = init_from_dir(tcfg, workdir)
    state, _, _ = _restore(src, tcfg.get("init_step"))
    params, kept, unused = transfer_params(state["params"], params, what=f"train.init_from={tcfg['init_from']!r}")
    if jax.process_index() == 0:
        copied = f"all but {', '.join(unused)}" if unused else "every"
        new = f"; new, as initialised: {', '.join(kept)}" if kept else ""
        print(f"init_from {src} (step {int(state['step'])}): copied {copied} parameter{new}", flush=True)
    return params


def run_dirs(workdir: str | os.PathLike) -> list[pathlib.Path]:
    """``workdir`` if it holds a run, else its sub-directories that do (a sweep)."""
    w = pathlib.Path(workdir)
    if (w / "checkpoints").is_dir():
        return [w]
    return sorted(p for p in w.iterdir() if (p / "checkpoints").is_dir()) if w.is_dir() else []


def merge_overrides(cfg: dict, overrides: dict | None) -> dict:
    """A copy of the config dict ``cfg`` with ``overrides`` merged in: nested dicts
    (``{"model": {"rope_scaling": {...}}}``) or dotted keys (``{"model.rope_scaling": {...}}``);
    a dict value under a key that holds a dict is merged key by key, anything else replaces."""
    out = json.loads(json.dumps(cfg, default=str))

    def merge(node: dict, key: str, value: Any) -> None:
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        value = config_to_dict(value) if isinstance(value, ml_collections.ConfigDict) else value
        if isinstance(value, dict) and isinstance(node.get(leaf), dict) and leaf not in _REPLACED_WHOLE:
            for k, v in value.items():
                merge(node[leaf], k, v)
        else:
            node[leaf] = value

    for key, value in (config_to_dict(overrides) if overrides is not None else {}).items():
        merge(out, key, value)
    return out


# values that an override replaces whole instead of merging key by key (a RoPE scaling of another
# kind must not inherit the previous kind's options)
_REPLACED_WHOLE = ("rope_scaling",)


def transfer_params(source: nnx.State, target: nnx.State, *, what: str = "the source run") -> tuple[
        nnx.State, list[str], list[str]]:
    """``target`` with every parameter of ``source`` at the same path copied in (placed with the
    target's sharding); returns ``(state, kept, unused)``: the target's paths not in ``source``
    (left as initialised, e.g. CLEX's ODE weights added by a RoPE scaling) and the source's paths
    the target lacks. A parameter whose shape differs is a :class:`ConfigError` naming it."""
    from flax import traverse_util

    src = traverse_util.flatten_dict(nnx.to_pure_dict(source))
    dst = traverse_util.flatten_dict(nnx.to_pure_dict(target))
    name = lambda path: ".".join(map(str, path))  # noqa: E731
    out, kept = {}, []
    for path, leaf in dst.items():
        if path not in src:
            kept.append(name(path))
            out[path] = leaf
            continue
        if tuple(src[path].shape) != tuple(leaf.shape):
            raise ConfigError(f"parameter {name(path)}: shape {tuple(src[path].shape)} in {what}, "
                              f"{tuple(leaf.shape)} in the new model (only options that keep the shapes can change)")
        out[path] = jax.device_put(jnp.asarray(src[path], leaf.dtype), getattr(leaf, "sharding", None))
    nnx.replace_by_pure_dict(target, traverse_util.unflatten_dict(out))
    return target, sorted(kept), sorted(name(p) for p in set(src) - set(dst))


def _restore(workdir: str | os.PathLike, step: int | None) -> tuple[dict, dict, dict]:
    """``(state, config, built)``: the run's newest readable checkpoint (or ``step``), its own
    config, and ``{config key: _setup(config)}`` of the configs tried."""
    ckpt = Checkpointer(workdir, read_only=True)
    built: dict[str, tuple] = {}

    def template(config: dict):
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in built:
            built[key] = _setup(config, check_step=False)
        sources, spec, model, trainer = built[key]
        return trainer.init_state(model)  # a template with the right shapes and shardings

    try:
        restored = ckpt.restore_readable(template, step=step, propagate=(ConfigError,))
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}")
    _, state, _, cfg = restored
    return state, cfg, built


def _with_overrides(state: dict, cfg: dict, built: dict, overrides: dict | None, what: str) -> tuple:
    """``(state, config, (sources, spec, model, trainer))``: the restored run as is, or a model
    built from the config with ``overrides`` carrying the run's trained parameters."""
    if not overrides:
        return state, cfg, built[json.dumps(cfg, sort_keys=True, default=str)]
    cfg = merge_overrides(cfg, overrides)
    setup = _setup(cfg, check_step=False)
    _, params, rest = nnx.split(setup[2], nnx.Param, ...)
    params, _, unused = transfer_params(state["params"], params, what=what)
    if unused:
        raise ConfigError(f"{what}: parameters {unused} have no place in the model with overrides {overrides}")
    return {"params": params, "rest": rest, "opt_state": None, "step": state["step"]}, cfg, setup


def load_model(workdir: str | os.PathLike, *, step: int | None = None, overrides: dict | None = None) -> nnx.Module:
    """The trained model of the run in ``workdir`` (newest readable checkpoint, or ``step``),
    optionally rebuilt with config ``overrides`` (nested or dotted keys) and the trained
    parameters copied in: e.g. a context extension after training,
    ``load_model("runs/lm", overrides={"model.rope_scaling": {"kind": "yarn", "factor": 4,
    "original_max_len": 256}})``. Parameters the overrides add (CLEX's ODE weights) keep their
    initial values."""
    state, cfg, built = _restore(workdir, step)
    state, _, (_, _, _, trainer) = _with_overrides(state, cfg, built, overrides, str(workdir))
    return trainer.model(state)


def evaluate(workdir: str | os.PathLike, *, step: int | None = None, splits: list[str] | None = None,
             overrides: dict | None = None) -> dict:
    """Restores the run in ``workdir`` (``step``, or the newest readable checkpoint) and returns
    ``{"step", "task", "kind", "mixer", "seq_len", "task_params", "config", "eval_tokens_per_s",
    "splits": {split: metrics}, "model", "sources"}`` for ``eval.splits`` (or ``splits``).

    ``overrides``: config changes applied after training (nested or dotted keys, e.g. a RoPE
    scaling or LSSAR re-weighting): the model is rebuilt from the changed config and the trained
    parameters are copied in (:func:`load_model`); ``config`` is then the changed one.
    ``seq_len`` and ``task_params`` come from the resolved task (defaults filled in), not the
    config. ``eval_tokens_per_s``: evaluation throughput without each split's first batch
    (compilation). Reads only: a read-only run directory is fine.
    """
    state, cfg, built = _restore(workdir, step)
    state, cfg, (sources, spec, _, trainer) = _with_overrides(state, cfg, built, overrides, str(workdir))
    _, eval_step = trainer.jitted()
    splits = splits or list(cfg["eval"]["splits"])
    unknown = [s for s in splits if s not in sources]
    if unknown:
        raise ConfigError(f"eval.splits {unknown} not in the task's splits {sorted(sources)}")
    out = {"step": int(state["step"]), "task": spec.name, "kind": spec.kind, "mixer": cfg["model"].get("mixer"),
           "seq_len": spec.seq_len, "task_params": json.loads(json.dumps(sources.params, default=str)),
           "config": cfg, "splits": {}}
    tokens, seconds = 0, 0.0
    for s in splits:
        timing: dict = {}
        out["splits"][s] = _evaluate_split(trainer, eval_step, state, sources[s], cfg["eval"]["batch_size"],
                                           cfg["eval"]["max_batches"], timing=timing)
        tokens, seconds = tokens + timing.get("tokens", 0), seconds + timing.get("seconds", 0.0)
    out["eval_tokens_per_s"] = tokens / seconds if seconds > 0 else None
    out["model"] = trainer.model(state)
    out["sources"] = sources
    return out
