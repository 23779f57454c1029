"""Train a model from a config file (ml_collections), resuming from the workdir's last checkpoint.

    python train.py --config=configs/mqar.py --workdir=runs/mqar
    python train.py --config=configs/mqar.py --config.model.mixer=flow --workdir=runs/mqar_flow
    python train.py --config=configs/mqar.py --sweep --workdir=runs/mqar_sweep   # every get_sweep() entry
"""

import copy
import importlib.util
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from zoo import run, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl).", required=True)
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every entry of the config file's get_sweep() in workdir/<name>.")


def sweep_configs(config_path: str, base):
    """``[(name, config)]`` from the config file's ``get_sweep()`` applied on top of ``base``."""
    spec = importlib.util.spec_from_file_location("_zoo_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise run.ConfigError(f"{config_path} defines no get_sweep()")
    out = []
    for name, overrides in module.get_sweep().items():
        cfg = copy.deepcopy(base)
        with cfg.unlocked():
            for key, value in overrides.items():
                node = cfg
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node[p]
                if leaf not in node:
                    raise run.ConfigError(f"get_sweep()[{name!r}]: unknown config key {key!r}")
                node[leaf] = value
        out.append((name, cfg))
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.maybe_initialize_distributed()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    try:
        if _SWEEP.value:
            for name, cfg in sweep_configs(config_flags.get_config_filename(flags.FLAGS["config"]), config):
                print(f"== sweep run {name}", flush=True)
                if run.train(cfg, f"{_WORKDIR.value}/{name}")["stopped"]:
                    print("stopped by SIGTERM (checkpoint saved); rerun the same command to resume", flush=True)
                    break
        else:
            run.train(config, _WORKDIR.value)
    except run.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
