"""train.py / eval.py: learning, exact resume after SIGKILL, reproducibility, sharding, config errors."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import mqar  # noqa: E402
from zoo import run, sharding, train_lib  # noqa: E402
from zoo.checkpoint import Checkpointer  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


TINY = {
    "task.params.vocab_size": 64, "task.params.seq_len": 16, "task.params.num_kv_pairs": 2,
    "task.params.num_train": 512, "task.params.num_test": 64, "task.params.test_lengths": (32,),
    "model.d_model": 16, "model.num_heads": 2, "model.max_len": 32,
    "train.steps": 20, "train.batch_size": 16, "train.log_every": 5, "train.eval_every": 10,
    "train.eval_batches": 2, "train.checkpoint_every": 10, "train.progress_bar": False,
    "eval.splits": ("test", "test_len32"), "eval.batch_size": 16, "eval.max_batches": 2,
    "optim.warmup_steps": 2,
}


def _set(c, key, value):
    *parents, leaf = key.split(".")
    for p in parents:
        c = c[p]
    c[leaf] = value


def tiny(data_dir: str, **train):
    """A tiny MQAR run (seconds): the same settings as the command-line overrides below."""
    c = mqar.get_config()
    c.task.data_dir = data_dir
    for k, v in {**TINY, **{f"train.{k}": v for k, v in train.items()}}.items():
        _set(c, k, v)
    return c


TIMING_KEYS = ("tokens_per_s", "compile_s")  # wall-clock measurements: differ between runs


def read_metrics(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS} for ln in lines]


def final_params(workdir, cfg) -> list[np.ndarray]:
    sources, spec, model, trainer = run._setup(run.config_to_dict(cfg))
    ckpt = Checkpointer(workdir)
    try:
        state, _, _ = ckpt.restore(None, trainer.init_state(model))
    finally:
        ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_loss_decreases_and_eval(data_dir, tmp_path):
    cfg = tiny(data_dir, steps=20)
    run.train(cfg, tmp_path / "r")
    m = [r for r in read_metrics(tmp_path / "r") if r["split"] == "train"]
    assert m[-1]["loss"] < m[0]["loss"] - 0.1, m
    res = run.evaluate(tmp_path / "r")
    assert set(res["splits"]) == {"test", "test_len32"}
    assert 0.0 <= res["splits"]["test_len32"]["accuracy"] <= 1.0


def _tb_scalars(logdir) -> dict[tuple[str, int], float]:
    """Reads scalar summaries from tensorboardX event files (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in pathlib.Path(logdir).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_scalars_match_metrics_jsonl(data_dir, tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is optional (extra 'tensorboard')")
    run.train(tiny(data_dir, steps=10), tmp_path / "tb")
    scalars = _tb_scalars(tmp_path / "tb" / "tensorboard")
    records = read_metrics(tmp_path / "tb")
    assert records
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split"):
                np.testing.assert_allclose(scalars[(f"{r['split']}/{k}", r["step"])], v, rtol=1e-6)


def test_same_seed_same_metrics(data_dir, tmp_path):
    cfg = tiny(data_dir, steps=10)
    run.train(cfg, tmp_path / "a")
    run.train(cfg, tmp_path / "b")
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    for x, y in zip(final_params(tmp_path / "a", cfg), final_params(tmp_path / "b", cfg)):
        np.testing.assert_array_equal(x, y)


def _train_cmd(cfg_overrides: list[str], workdir) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'mqar.py'}",
            f"--workdir={workdir}", *cfg_overrides]


def _overrides(data_dir: str, steps: int) -> list[str]:
    flat = {**TINY, "task.data_dir": data_dir, "train.steps": steps}
    return [f"--config.{k}={v}" for k, v in flat.items()]


@pytest.mark.slow  # CI time; run with -m slow
def test_sigkill_then_resume_equals_uninterrupted(data_dir, tmp_path):
    steps = 150
    ref_cfg = tiny(data_dir, steps=steps)
    run.train(ref_cfg, tmp_path / "ref")

    work = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_train_cmd(_overrides(data_dir, steps), work), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckdir = work / "checkpoints"
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
        if done and max(done) >= 20:
            killed_after = max(done)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_after is not None, f"run ended or timed out before a checkpoint: {proc.stderr.read()[-2000:]}"
    assert killed_after < steps, "the run finished before it could be killed"
    # Resume in a fresh process: same command.
    res = subprocess.run(_train_cmd(_overrides(data_dir, steps), work), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(work) == read_metrics(tmp_path / "ref")
    for x, y in zip(final_params(work, ref_cfg), final_params(tmp_path / "ref", ref_cfg)):
        np.testing.assert_array_equal(x, y)


def test_sharded_2x2x2_matches_single_device(data_dir, tmp_path):
    assert jax.device_count() == 8
    losses = {}
    for name, (d, f, t) in {"single": (1, 1, 1), "mesh": (2, 2, 2)}.items():
        cfg = tiny(data_dir, steps=5, log_every=5, checkpoint_every=5, eval_every=5)
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = d, f, t
        out = run.train(cfg, tmp_path / name)
        losses[name] = out["train"]["loss"]
        if name == "mesh":
            state = out["state"]
            rules = sharding.rules_from(cfg.mesh.logical_axis_rules)
            with nnx.logical_axis_rules(rules):
                specs = nnx.get_partition_spec(state["params"])
            leaves = jax.tree.leaves(state["params"])
            spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
            axes_used = set()
            for arr, spec in zip(leaves, spec_leaves):
                pad = lambda p, n=arr.ndim: tuple(p) + (None,) * (n - len(p))  # noqa: E731
                assert pad(arr.sharding.spec) == pad(spec), (arr.shape, arr.sharding.spec, spec)
                for a in spec:
                    axes_used.update(a if isinstance(a, tuple) else (a,))
            assert {"fsdp", "tensor"} <= axes_used, f"parameters are not sharded as intended: {axes_used}"
    np.testing.assert_allclose(losses["mesh"], losses["single"], rtol=1e-4)


def test_bad_config_is_one_clear_line(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        _train_cmd([*_overrides(data_dir, 5), "--config.model.mixer=softmaxx"], tmp_path / "bad"),
        env=env, capture_output=True, text=True,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "WARNING" not in ln and "absl" not in ln]
    assert lines[-1].startswith("config error: model.mixer: unknown mixer 'softmaxx'"), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "mixer, options, error",
    [
        ("titans_memory", {}, None),  # a mixer layer, not a transform: validate used to refuse it
        ("titans_mac", {"segment_len": 8}, None),
        ("titans_mac", {"segment_lenn": 8}, "segment_lenn"),
        ("sliding_window", {"window": 8}, None),
        ("sliding_window", {"windw": 8}, "windw"),  # a transform option typo, caught by check_options
        ("softmax", {"transform_kwargs": {"wndow": 3}}, "wndow"),
        ("softmax", {"qk_norm": True}, None),  # a MultiHeadAttention argument
        (["softmax", {"transform": "linear", "feature_mapp": "elu"}], {}, r"model\.mixer\[1\].*feature_mapp"),
        ("softmaxx", {}, "unknown mixer 'softmaxx'"),
        ("flow_layerr", {}, "unknown mixer"),
    ],
)
def test_validate_uses_the_build_mixer_check(mixer, options, error):
    """run.validate accepts a mixer spec iff building the model accepts it (one check: zoo.nn's
    check_mixer_spec, which validates transform options with Transform.check_options)."""
    from zoo import data as zdata

    d = run.config_to_dict(mqar.get_config())
    d["model"].update(mixer=mixer, mixer_options=options)
    tspec = zdata.get_task("mqar").spec(**dict(d["task"]["params"]))
    build = lambda: nnx.eval_shape(lambda: train_lib.build_model(d["model"], tspec, seed=0))  # noqa: E731
    if error is None:
        run.validate(d)
        build()
    else:
        with pytest.raises(run.ConfigError, match=error):
            run.validate(d)
        with pytest.raises(ValueError):
            build()


def config_variants() -> list:
    """(file, config-string argument) of every config file (positional.py: every operation)."""
    out = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        args = [None]
        if path.stem == "positional":
            args = ["sum", "min", "median", "sort", "max_subarray"]
        out += [(path, a) for a in args]
    return out


def load_config_module(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path, arg", config_variants(), ids=lambda v: getattr(v, "name", v))
def test_every_config_loads_and_builds(path, arg, data_dir):
    module = load_config_module(path)
    cfg = module.get_config(*([arg] if arg else []))
    cfgs = [cfg]
    if hasattr(module, "get_sweep"):
        import copy

        seen = set()
        for overrides in module.get_sweep().values():
            c = copy.deepcopy(cfg)
            for key, value in overrides.items():
                node = c
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node[p]
                node[leaf] = value
            # a product grid (mqar_grid.py) repeats models across learning rates: build each once
            key = json.dumps(run.config_to_dict(c)["model"], sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                cfgs.append(c)
    from zoo import data as zdata

    for c in cfgs:
        d = run.config_to_dict(c)
        run.validate(d)
        tspec = zdata.get_task(d["task"]["name"]).spec(**dict(d["task"]["params"]))
        mesh = sharding.make_mesh(1, 1, 1)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_from(d["mesh"]["logical_axis_rules"])):
            model = nnx.eval_shape(lambda d=d, tspec=tspec: train_lib.build_model(d["model"], tspec, seed=0))
        assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
