"""train.py / eval.py surface (issue 13): every task and config file trains, task parameters and
mixer options from the command line, one-line errors with exit 2, unreadable checkpoints,
SIGTERM (exit 143, exact resume), eval outputs and plots, sweeps, the ICL-regression setup."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_train import _overrides, config_variants, load_config_module, read_metrics, tiny  # noqa: E402
from zoo import data as zdata  # noqa: E402
from zoo import run, train_lib  # noqa: E402
from zoo.checkpoint import Checkpointer, CheckpointError  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _cli(script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


def _error_lines(stderr: str) -> list[str]:
    """stderr without absl/tfds log lines and progress bars."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith(("W1", "I1", "WARNING", "Downloading", "Dataset ", "Generating",
                                                 "Shuffling", "\r"))]


# ----------------------------------------------------------------------------- every task / config


SMALL_TASK = {"num_train": 64, "num_test": 16}


def _small(c, data_dir):
    """A config shrunk to seconds: 2 steps, tiny batches and model, the test split only."""
    c.task.data_dir = data_dir
    params = zdata.get_task(c.task.name).params
    for k, v in SMALL_TASK.items():
        if k in params:
            c.task.params[k] = v
    if c.task.name == "niah":
        c.task.params.test_lengths = (128,)
    for k, v in {"d_model": 16, "num_layers": 1, "mlp_hidden": 16}.items():
        if k in c.model:
            c.model[k] = v
    if "num_heads" in c.model and c.model.name != "icl_attention":
        c.model.num_heads = 2
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 8, 1, 2
    c.train.checkpoint_every, c.train.eval_batches, c.train.progress_bar = 2, 1, False
    c.optim.warmup_steps = 0
    c.eval.batch_size, c.eval.max_batches, c.eval.splits = 8, 1, ("test",)
    return c


TRAINED_HERE = ("selective_copying", "niah", "icl_regression", "positional", "bytes_lm")  # mqar: tests/test_train.py


@pytest.mark.parametrize("path, arg", [
    v if v[0].stem not in ("bytes_lm", "niah") else pytest.param(*v, marks=pytest.mark.slow)  # CI time
    for v in config_variants() if v[0].stem in TRAINED_HERE and v[1] in (None, "sort")],
    ids=lambda v: getattr(v, "stem", v))
def test_every_config_file_trains(path, arg, data_dir, tmp_path):
    """Each task's config file (positional.py once, with sort) builds, trains 2 steps and logs;
    the first record's throughput leaves out the compiling first step (``compile_s``)."""
    c = _small(load_config_module(path).get_config(*([arg] if arg else [])), data_dir)
    out = run.train(c, tmp_path / "r")
    assert out["step"] == 2 and not out["stopped"]
    assert np.isfinite(out["train"]["loss"]) and np.isfinite(out["test"]["loss"])
    train = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert train[0]["compile_s"] > 0 and train[0]["tokens_per_s"] is None  # step 1 alone: compilation
    assert "compile_s" not in train[1] and train[1]["tokens_per_s"] > 0
    if path.stem == "icl_regression":  # seq_len is not in this config: eval reports the resolved one
        assert "seq_len" not in c.task.params
        r = run.evaluate(tmp_path / "r")
        assert r["seq_len"] == 41 and r["task_params"]["num_context"] == 40 and r["eval_tokens_per_s"] is None


def test_every_task_is_reachable():
    """Every zoo.data task is the task of some config file."""
    names = {load_config_module(p).get_config(*([a] if a else [])).task.name for p, a in config_variants()}
    assert set(zdata.tasks()) <= names, sorted(set(zdata.tasks()) - names)


def test_positional_transformer_gets_the_task_shapes():
    spec = zdata.get_task("positional_sum").spec(n=6, scratch=2)
    model = nnx.eval_shape(lambda: train_lib.build_model(
        {"name": "positional_transformer", "d_model": 8, "num_heads": 2, "mlp_hidden": 8, "scratch": 2}, spec, seed=0))
    assert (model.n, model.scratch, model.length, model.in_dim, model.out_dim) == (6, 2, 8, 1, 1)
    with pytest.raises(ValueError, match=r"model\.max_len is not an argument of model\.name='positional_transformer'"):
        train_lib.build_model({"name": "positional_transformer", "max_len": 8}, spec, seed=0)
    with pytest.raises(ValueError, match="needs a token task"):
        train_lib.build_model({"name": "decoder_lm", "d_model": 8, "num_layers": 1, "num_heads": 1}, spec, seed=0)


# ----------------------------------------------------------------------------- ICL regression


def test_icl_attention_is_the_papers_layer_without_the_query_attending_to_itself():
    """Naive form of He et al.'s layer: out_q = sum_h O^h sum_{j<N} softmax_j(<K^h z_j, Q^h z_q>/sqrt(E)) V^h z_j."""
    e, heads, n = 6, 3, 7
    model = train_lib.ICLAttention(e, 1, num_heads=heads, rngs=nnx.Rngs(1))
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, n + 1, e)), np.float64)
    wq, wk, wv = (np.asarray(getattr(model.attn, f"{a}_proj")[...], np.float64) for a in "qkv")  # [E, H, E]
    wo = np.asarray(model.attn.o_proj[...], np.float64)  # [H, E, 1]
    ctx, zq = z[:, :n], z[:, n]
    want = np.zeros((2, 1))
    for h in range(heads):
        q = zq @ wq[:, h]                                  # [B, E]
        k, v = ctx @ wk[:, h], ctx @ wv[:, h]              # [B, N, E]
        s = np.einsum("be,bne->bn", q, k) / math.sqrt(e)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        want += np.einsum("bn,bne->be", a, v) @ wo[h]
    call = nnx.jit(lambda m, x: m(x))
    got = np.asarray(call(model, jnp.asarray(z, jnp.float32)))[:, n]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Its own token does not enter the keys/values: changing z_q only changes the query vector,
    # so with W_q = 0 (uniform attention) the query's output is independent of z_q.
    model.attn.q_proj[...] = jnp.zeros_like(model.attn.q_proj[...])
    z2 = z.copy()
    z2[:, n] += 5.0
    a1, a2 = (np.asarray(call(model, jnp.asarray(x, jnp.float32)))[:, n] for x in (z, z2))
    np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-6)


def test_icl_regression_defaults_are_the_papers():
    """sigma^2 = 0.1: the Bayes (ridge) risk at d=5, L=40 is 0.114 and predicting 0 costs 1.1
    (Monte-Carlo numbers of the design notes, wave2.md section 5.4, not computed here)."""
    task = zdata.get_task("icl_regression")
    p = task.resolve()
    assert (p["dim"], p["num_context"]) == (5, 40)
    assert p["noise_std"] == pytest.approx(math.sqrt(0.1), rel=1e-12)
    batch = task.generate(4000, seed=np.random.default_rng(0), dim=5, num_context=40, noise_std=p["noise_std"])
    base = zdata.icl_baselines(batch)
    assert base["bayes_mse"] == pytest.approx(0.114, abs=0.012)
    assert base["zero_mse"] == pytest.approx(1.1, abs=0.08)


# ----------------------------------------------------------------------------- config errors


def test_task_params_and_mixer_options_from_the_command_line_are_checked():
    d = run.config_to_dict(tiny("/unused"))
    d["task"]["params"]["seq_lenn"] = 64
    with pytest.raises(run.ConfigError, match=r"task\.params: unknown parameter\(s\) \['seq_lenn'\].*valid parameters"):
        run.validate(d)
    d = run.config_to_dict(tiny("/unused"))
    d["model"].update(mixer="sliding_window", mixer_options={"windw": 8})
    with pytest.raises(run.ConfigError, match="takes no option 'windw'; valid: .*window"):
        run.validate(d)
    d = run.config_to_dict(tiny("/unused"))
    d["eval"]["splits"] = ("test", "test_len999")
    with pytest.raises(run.ConfigError, match=r"eval\.splits \['test_len999'\]"):
        run.validate(d)


def test_a_model_that_cannot_run_the_task_fails_before_writing(data_dir, tmp_path):
    """One training step is traced abstractly first: learned positions shorter than the task."""
    c = tiny(data_dir, steps=5)
    c.model.max_len = 8
    with pytest.raises(run.ConfigError, match=r"one training step on task 'mqar' fails: .*max_len 8"):
        run.train(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=5"], "unknown config key 'train.stepz'; valid keys under train: batch_size"),
    (["--config.task.paramz.seq_len=5"], "unknown config key 'task.paramz.seq_len'; valid keys under task: data_dir"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
    (["--config.train.steps=abc"], "flag --config.train.steps=abc"),
])
def test_bad_command_line_is_one_line_exit_2(args, message, tmp_path):
    cfg = [a for a in args if a.startswith("--config=")] or [f"--config={ROOT / 'configs' / 'mqar.py'}"]
    res = _cli("train.py", [*cfg, f"--workdir={tmp_path / 'w'}", *[a for a in args if not a.startswith("--config=")]],
               cwd=ROOT)
    assert res.returncode == 2, res.stderr
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("config error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "w").exists()


def test_workdir_under_a_file_and_read_only_filesystem(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(run.ConfigError, match="is a file, not a directory"):
        run.train(tiny(data_dir, steps=2), tmp_path / "file" / "run")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user/mount namespaces here to make a read-only filesystem")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = shlex.join([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'mqar.py'}",
                      f"--workdir={ro / 'run'}", *_overrides(data_dir, 2)])
    res = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {ro} {ro} && exec {cmd}"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = _error_lines(res.stderr)
    assert lines[-1].startswith("config error: --workdir=") and "Read-only file system" in lines[-1], res.stderr
    assert "Traceback" not in res.stderr and not (ro / "run").exists()


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A 20-step tiny run with checkpoints at steps 10 and 20."""
    w = tmp_path_factory.mktemp("trained") / "run"
    run.train(tiny(data_dir, steps=20), w)
    return w


def _corrupt(workdir: pathlib.Path, step: int, kind: str) -> None:
    d = workdir / "checkpoints" / str(step)
    if kind == "truncated_array_file":
        f = max((d / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "corrupt_metadata":
        (d / "state" / "_METADATA").write_text("{not json")
    elif kind == "missing_metadata":
        (d / "state" / "_METADATA").unlink()
    elif kind == "corrupt_config":
        (d / "config" / "metadata").write_text("{not json")
    else:
        raise ValueError(kind)


KINDS = ["truncated_array_file", "corrupt_metadata", "missing_metadata", "corrupt_config"]


@pytest.mark.parametrize("kind", [k if k in ("truncated_array_file", "missing_metadata") else
                                  pytest.param(k, marks=pytest.mark.slow) for k in KINDS])
def test_unreadable_latest_checkpoint_falls_back(kind, trained, data_dir, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(trained, w)
    _corrupt(w, 20, kind)
    sources, spec, model, trainer = run._setup(run.config_to_dict(tiny(data_dir, steps=20)), check_step=False)
    warnings = []
    ckpt = Checkpointer(w, read_only=True)
    try:
        step, state, _, cfg = ckpt.restore_readable(lambda c: trainer.init_state(model), warn=warnings.append)
    finally:
        ckpt.close()
    assert step == 10 and int(state["step"]) == 10 and cfg["train"]["steps"] == 20
    assert len(warnings) == 1 and "checkpoints/20 is unreadable" in warnings[0] and "using step 10" in warnings[0]
    assert "\n" not in warnings[0]


def test_eval_and_resume_use_the_newest_readable_checkpoint(trained, data_dir, tmp_path, capfd):
    w = tmp_path / "run"
    shutil.copytree(trained, w)
    _corrupt(w, 20, "truncated_array_file")
    res = run.evaluate(w)
    assert res["step"] == 10 and res["seq_len"] == 16 and res["eval_tokens_per_s"] > 0
    err = capfd.readouterr().err
    assert "checkpoints/20 is unreadable" in err and "using step 10" in err
    # Training resumes from step 10, sets the unreadable step aside and ends equal to the uninterrupted run.
    run.train(tiny(data_dir, steps=20), w)
    assert "moved to" in capfd.readouterr().err
    assert (w / "checkpoints_unreadable" / "20").is_dir()
    assert read_metrics(w) == read_metrics(trained)
    # None readable: one line naming each.
    for s in (10, 20):
        _corrupt(w, s, "corrupt_metadata")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*step 20: .*; step 10: "):
        run.evaluate(w)


def test_eval_step_lists_available_steps_and_read_only_run(trained, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at step 123 in .*; available steps: 10, 20"):
        run.evaluate(trained, step=123)
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user/mount namespaces here to make a read-only filesystem")
    w = tmp_path / "run"
    shutil.copytree(trained, w)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = shlex.join([sys.executable, str(ROOT / "eval.py"), f"--workdir={w}", "--splits=test"])
    res = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {w} {w} && exec {cmd}"], env=ENV,
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    notes = [ln for ln in _error_lines(res.stderr) if ln.startswith("note:")]
    assert len(notes) == 1 and "is not writable; writing results to" in notes[0], res.stderr
    results = json.loads((cwd / "eval_run" / "results.json").read_text())
    assert results["run"]["seq_len"] == 16 and not (w / "results.json").exists()


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_mid_log_window_resumes_to_identical_metrics(trained, data_dir, tmp_path):
    """SIGTERM at step 7 (log_every 5): the checkpoint holds the metrics of steps 6-7, so the
    resumed run's step-10 record is the uninterrupted one's; then at step 10 (a checkpoint step)."""
    cfg = tiny(data_dir, steps=20)
    w = tmp_path / "run"
    out = run.train(cfg, w, on_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 7 else None)
    assert out["stopped"] and out["step"] == 7
    ckpt = Checkpointer(w, read_only=True)
    assert ckpt.all_steps() == [7]
    ckpt.close()
    # Again at step 10, where a checkpoint was just saved (the step is not saved twice).
    out = run.train(cfg, w, on_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 10 else None)
    assert out["stopped"] and out["step"] == 10
    out = run.train(cfg, w)
    assert not out["stopped"] and out["step"] == 20
    assert read_metrics(w) == read_metrics(trained)


@pytest.mark.slow  # a subprocess end to end (exit 143); the in-process SIGTERM test above runs in CI
def test_sigterm_exit_code_message_and_cli_overrides(data_dir, tmp_path):
    """train.py with new task.params / mixer_options keys from the command line; SIGTERM: a
    checkpoint at the step it names, one line, exit 143 (the exact resume is tested above)."""
    work = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'mqar.py'}", f"--workdir={work}",
           *_overrides(data_dir, 400), "--config.model.mixer=sliding_window", "--config.model.mixer_options.window=4",
           "--config.task.params.power_a=0.02"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (work / "metrics.jsonl").exists() and (work / "metrics.jsonl").read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = [ln for ln in err.splitlines() if "preempted" in ln]
    assert len(line) == 1 and "preempted (SIGTERM) at step" in line[0] and "exit 143" in line[0], err[-3000:]
    stopped_at = int(line[0].split("at step ")[1].split(":")[0])
    assert 5 <= stopped_at < 400
    ckpt = Checkpointer(work, read_only=True)
    assert ckpt.latest_step() == stopped_at
    ckpt.close()
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["model"]["mixer_options"] == {"window": 4} and cfg["task"]["params"]["power_a"] == 0.02


# ----------------------------------------------------------------------------- eval outputs


def _eval_module():
    """eval.py as a module, loaded once (it defines absl flags)."""
    import importlib.util

    if "zoo_eval_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("zoo_eval_script", ROOT / "eval.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["zoo_eval_script"] = module
    return sys.modules["zoo_eval_script"]


def test_eval_plots(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = _eval_module()
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    results = {
        "a": {"mixer": "softmax", "seq_len": 16, "task_params": {}, "splits": {
            "test": {"accuracy": 0.0}, "test_len32": {"accuracy": 0.0}},
            "attention_entropy": {"l0": [1.608, 1.610]}},
        "b": {"mixer": "linear", "seq_len": 16, "task_params": {}, "splits": {
            "test": {"accuracy": 0.0}, "test_len32": {"accuracy": 0.0}},
            "attention_entropy": {"l0": [1.620, 1.623], "l1": [1.615]}},
    }
    ev.plot(results, tmp_path)
    ev.plot_entropy(results, tmp_path)
    acc_fig, ent_fig = figs
    ax = acc_fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)  # an all-zero accuracy curve is drawn on [0, 1]
    assert sorted(ax.lines[0].get_xdata()) == [16, 32]  # the test split at the resolved training length
    clims = {im.get_clim() for a in ent_fig.axes for im in a.get_images()}
    assert clims == {(1.608, 1.623)}  # one colour scale across the panels


# ----------------------------------------------------------------------------- sweeps


def test_product_sweep_and_best_learning_rate():
    from configs import base, mqar_grid

    grid = base.product_sweep({"s": {"model.mixer": "softmax"}, "l": {"model.mixer": "linear"}},
                              {"d8": {"model.d_model": 8}}, {"lr1": {"optim.learning_rate": 1.0},
                                                             "lr2": {"optim.learning_rate": 2.0}})
    assert grid == {"s-d8-lr1": {"model.mixer": "softmax", "model.d_model": 8, "optim.learning_rate": 1.0},
                    "s-d8-lr2": {"model.mixer": "softmax", "model.d_model": 8, "optim.learning_rate": 2.0},
                    "l-d8-lr1": {"model.mixer": "linear", "model.d_model": 8, "optim.learning_rate": 1.0},
                    "l-d8-lr2": {"model.mixer": "linear", "model.d_model": 8, "optim.learning_rate": 2.0}}
    assert len(mqar_grid.get_sweep()) == 6 * 3 * 3
    ev = _eval_module()
    res = {name: {"mixer": o["model.mixer"], "config": {"model": {"d_model": 8},
                                                        "optim": {"learning_rate": o["optim.learning_rate"]}},
                  "splits": {"test": {"accuracy": acc}}}
           for (name, o), acc in zip(grid.items(), (0.5, 0.9, 0.7, 0.2))}
    best = {b["mixer"]: (b["learning_rate"], b["run"]) for b in ev.best_learning_rates(res)}
    assert best == {"softmax": (2.0, "s-d8-lr2"), "linear": (1.0, "l-d8-lr1")}
    # two task cells of one mechanism and width: one best learning rate per cell
    cells = {}
    for kv, accs in ((4, (0.9, 0.5)), (16, (0.3, 0.6))):
        for lr, acc in zip((1.0, 2.0), accs):
            cells[f"s-kv{kv}-lr{lr:g}"] = {"mixer": "softmax", "splits": {"test": {"accuracy": acc}}, "config": {
                "model": {"d_model": 8}, "optim": {"learning_rate": lr},
                "task": {"name": "mqar", "params": {"seq_len": 64, "num_kv_pairs": kv}}}}
    got = [(b["task"], b["learning_rate"], b["test"]) for b in ev.best_learning_rates(cells)]
    assert got == [({"num_kv_pairs": 4}, 1.0, 0.9), ({"num_kv_pairs": 16}, 2.0, 0.6)]


def test_sweep_list_and_sweep_run(tmp_path):
    res = _cli("train.py", [f"--config={ROOT / 'configs' / 'mqar.py'}", "--sweep_list"])
    assert res.returncode == 0 and res.stdout.split() == ["softmax", "linear_elu", "based_taylor", "flow", "aaren",
                                                          "titans"], res.stderr
    res = _cli("train.py", [f"--config={ROOT / 'configs' / 'mqar.py'}", "--sweep_run=nope", f"--workdir={tmp_path}"])
    assert res.returncode == 2 and _error_lines(res.stderr) == [
        "config error: --sweep_run='nope' is not a get_sweep() entry; entries: softmax, linear_elu, based_taylor, "
        "flow, aaren, titans"]

