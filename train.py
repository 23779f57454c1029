"""Train a model from a config file (ml_collections), resuming from the workdir's last checkpoint.

    python train.py --config=configs/mqar.py --workdir=runs/mqar
    python train.py --config=configs/mqar.py --config.model.mixer=flow --workdir=runs/mqar_flow
    python train.py --config=configs/mqar.py --config.task.params.seq_len=128 --workdir=runs/mqar_128
    python train.py --config=configs/mqar.py --config.model.mixer=sliding_window \\
        --config.model.mixer_options.window=8 --workdir=runs/mqar_swa
    python train.py --config=configs/positional.py:sort --workdir=runs/sort   # config string argument
    python train.py --config=configs/mqar.py --sweep --workdir=runs/mqar_sweep   # every get_sweep() entry
    python train.py --config=configs/mqar.py --sweep_list                        # the entries' names
    python train.py --config=configs/mqar.py --sweep_run=flow --workdir=runs/mqar_sweep  # one entry

Any key of the config can be overridden; under ``task.params`` and ``model.mixer_options`` new
keys may be given too (every task parameter, every mixer option), checked against the task's
declared parameters and the mixer's options. Exit status: 0 done, 2 a bad config, path,
permission or checkpoint (one ``config error: ...`` line on stderr, nothing written), 143
preempted by SIGTERM (checkpoint and pending metrics saved; rerun the same command to resume).
"""

import copy
import importlib.util
import os
import signal
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

# zoo.run (jax, flax, orbax, tfds) is imported once the command line has been checked, so a bad
# flag or key is reported at once.
PREEMPTED_EXIT_CODE = 143  # = zoo.run.PREEMPTED_EXIT_CODE (128 + SIGTERM, as a shell reports it)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (get_config()), optionally path:argument.", lock_config=False,
    accept_new_attributes=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every entry of the config file's get_sweep() in workdir/<name>.")
_SWEEP_LIST = flags.DEFINE_bool("sweep_list", False, "Print the names of the get_sweep() entries and exit.")
_SWEEP_RUN = flags.DEFINE_string("sweep_run", None, "Run only this get_sweep() entry, in workdir/<name>.")
_SWEEP_PROCS = flags.DEFINE_integer(
    "sweep_procs", 1, "With --sweep: entries run at once, one process each (0: one per local GPU, each "
    "process seeing one GPU through CUDA_VISIBLE_DEVICES).")

# Keys under which new names are accepted on the command line and in get_sweep() (checked later
# against the task's declared parameters / the mixer's options).
OPEN_KEYS = ("task.params", "model.mixer_options")


class ConfigError(ValueError):
    """A bad command line or config file (before zoo.run is imported)."""


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _config_path() -> str:
    return config_flags.get_config_filename(flags.FLAGS["config"])


def _load_module(config_arg: str):
    path = config_arg.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("_zoo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _original_config(config_arg: str):
    module = _load_module(config_arg)
    args = config_arg.split(":", 1)[1:]
    return module.get_config(*args)


def _has_key(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def check_key(original, key: str, where: str) -> None:
    """A key of the config file's config, or one under ``task.params`` / ``model.mixer_options``."""
    if _has_key(original, key) or any(key.startswith(p + ".") and key.count(".") == p.count(".") + 1
                                      for p in OPEN_KEYS):
        return
    *parents, leaf = key.split(".")
    node, valid_at = original, []
    for p in parents:
        if hasattr(node, "keys") and p in node:
            node, valid_at = node[p], valid_at + [p]
        else:
            break
    prefix = ".".join(valid_at)
    valid = sorted(node.keys()) if hasattr(node, "keys") else []
    raise ConfigError(
        f"{where}: unknown config key {key!r}; valid keys{' under ' + prefix if prefix else ''}: "
        f"{', '.join(valid)}"
    )


def sweep_configs(config_path: str, base) -> list:
    """``[(name, config)]`` from the config file's ``get_sweep()`` applied on top of ``base``."""
    module = _load_module(config_path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{config_path} defines no get_sweep()")
    original = _original_config(config_path)
    out = []
    for name, overrides in module.get_sweep().items():
        cfg = copy.deepcopy(base)
        with cfg.unlocked():
            for key, value in overrides.items():
                check_key(original, key, f"get_sweep()[{name!r}]")
                node = cfg
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node[p]
                node[leaf] = value
        out.append((name, cfg))
    return out


def _config():
    config = _CONFIG.value
    if config is None:
        raise ConfigError("--config is required (a config file under configs/)")
    path = _config_path()
    if not os.path.isfile(path.split(":", 1)[0]):
        raise ConfigError(f"--config={path}: no such file")
    if not hasattr(config, "keys"):  # ml_collections' stand-in for a file that failed to load
        try:
            config.keys()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--config={path}: {one_line(e.__cause__ or e)}") from None
    original = _original_config(path)
    for key in flags.FLAGS["config"].override_values:
        check_key(original, key, "command line")
    return config


def _local_gpus() -> list[str]:
    """The local GPU ids, found without starting JAX here (a parent holding GPU memory would
    starve its children): ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``; none on CPU/TPU hosts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def _sweep_parallel(entries: list, procs: int) -> bool:
    """Runs each entry as ``train.py ... --sweep_run=NAME`` in its own process, ``procs`` at once
    (``0``: one per local GPU; on GPUs each process sees one device through
    ``CUDA_VISIBLE_DEVICES``); SIGTERM is passed on to them. Returns whether any was preempted."""
    argv = [a for a in sys.argv if not a.startswith(("--sweep", "--nosweep"))]
    gpus = _local_gpus()
    procs = procs if procs > 0 else max(1, len(gpus))
    todo, running, preempted, failed = list(entries), {}, False, []
    free = list(range(procs))

    def forward(*_):  # SIGTERM: pass it on to the running entries and start no more
        nonlocal preempted
        preempted = True
        todo.clear()
        for _, proc in running.values():
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    while todo or running:
        while todo and free:
            name, slot = todo.pop(0), free.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            running[slot] = (name, subprocess.Popen([sys.executable, *argv, f"--sweep_run={name}"], env=env))
        done = None
        while done is None:
            for slot, (_, proc) in list(running.items()):
                if proc.poll() is not None:
                    done = slot
                    break
            else:
                time.sleep(0.5)
        name, proc = running.pop(done)
        free.append(done)
        preempted |= proc.returncode == PREEMPTED_EXIT_CODE
        if proc.returncode not in (0, PREEMPTED_EXIT_CODE):
            failed.append(f"{name} (exit {proc.returncode})")
    if failed:
        raise ConfigError(f"sweep entries failed: {', '.join(failed)} (their own output says why)")
    return preempted


def main(argv):
    if len(argv) > 1:
        print(f"config error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    errors: tuple = (ConfigError,)
    try:
        config = _config()
        sweep_wanted = _SWEEP.value or _SWEEP_LIST.value or _SWEEP_RUN.value
        entries = sweep_configs(_config_path(), config) if sweep_wanted else []
        if _SWEEP_LIST.value:
            try:
                print("\n".join(name for name, _ in entries), flush=True)
            except BrokenPipeError:  # e.g. piped into head / sed -n
                pass
            return
        if not _WORKDIR.value:
            raise ConfigError("--workdir is required (the run directory)")
        if _SWEEP_RUN.value:
            chosen = [(n, c) for n, c in entries if n == _SWEEP_RUN.value]
            if not chosen:
                raise ConfigError(f"--sweep_run={_SWEEP_RUN.value!r} is not a get_sweep() entry; entries: "
                                  f"{', '.join(n for n, _ in entries)}")
            entries = chosen
        elif not _SWEEP.value:
            entries = [(None, config)]
        if _SWEEP.value and _SWEEP_PROCS.value != 1:  # before JAX starts in this process
            if _sweep_parallel([n for n, _ in entries], _SWEEP_PROCS.value):
                print("preempted (SIGTERM): rerun the same command to resume", file=sys.stderr, flush=True)
                sys.exit(PREEMPTED_EXIT_CODE)
            return
        from zoo import run, sharding
        from zoo.checkpoint import CheckpointError

        errors = (ConfigError, run.ConfigError, CheckpointError)
        sharding.maybe_initialize_distributed()
        for name, cfg in entries:
            if _SWEEP.value:
                print(f"== sweep run {name}", flush=True)
            out = run.train(cfg, _WORKDIR.value if name is None else os.path.join(_WORKDIR.value, name))
            if out["stopped"]:
                print(f"preempted (SIGTERM) at step {out['step']}: checkpoint and pending metrics saved; rerun the "
                      f"same command to resume (exit {PREEMPTED_EXIT_CODE})", file=sys.stderr, flush=True)
                sys.exit(PREEMPTED_EXIT_CODE)
    except errors as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with every error (unknown flag, bad value, config file that raises) as
    one ``config error:`` line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (flag errors, and whatever the config file raises)
        msg = str(e) if isinstance(e, flags.Error) else one_line(e)
        given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
        if given and not os.path.isfile(given[-1].split(":", 1)[0]):
            msg = f"--config={given[-1]}: no such file"
        elif given:  # a key under a missing section fails inside ml_collections: name it as check_key does
            try:
                original = _original_config(given[-1])
                for a in argv:
                    if a.startswith("--config."):
                        check_key(original, a[len("--config."):].split("=", 1)[0], "command line")
            except ConfigError as ce:
                msg = str(ce)
            except Exception:  # noqa: BLE001  (the config file itself fails: keep the first message)
                pass
        if "Error whilst parsing config file" in msg:  # the config file raised: its last line says why
            lines = [ln for ln in msg.splitlines() if ln.strip()]
            msg = f"--config: the config file raised {lines[-1].strip()}"
        print(f"config error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
