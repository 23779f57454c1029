"""Context extension after training (issue 15): bytes_lm length splits, a trained run evaluated
with a RoPE scaling applied after training (``eval.variants`` / ``run.evaluate(overrides=)`` /
``run.load_model``) and fine-tuned from another run (``train.init_from``)."""

from __future__ import annotations

import copy
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base, bytes_lm
from zoo import data as zdata
from zoo import run

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def tiny(corpus: str, data_dir: str, **changes):
    c = bytes_lm.get_config()
    c.task.data_dir = data_dir
    c.task.params.paths = (corpus,)
    c.task.params.seq_len = 16
    c.task.params.test_fraction = 0.25
    c.task.params.test_lengths = (32, 64)
    c.model.d_model, c.model.num_heads, c.model.num_layers = 16, 2, 1
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 4, 8, 2, 4
    c.train.checkpoint_every, c.train.eval_batches, c.train.progress_bar = 4, 1, False
    c.optim.warmup_steps = 0
    c.eval.splits = ("test", "test_len32", "test_len64")
    c.eval.batch_size, c.eval.max_batches = 8, 2
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def trained(corpus, data_dir, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("runs") / "base"
    run.train(tiny(corpus, data_dir), workdir)
    return workdir


def params_of(model) -> dict:
    from flax import traverse_util

    return {".".join(map(str, k)): np.asarray(v)
            for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def test_bytes_lm_length_splits_are_windows_of_the_test_bytes(corpus, data_dir):
    sources = zdata.build("bytes_lm", data_dir, paths=(corpus,), seq_len=16, test_fraction=0.25,
                          test_lengths=(32, 64))
    raw = np.frombuffer(TEXT.encode(), np.uint8)
    test = raw[len(raw) - int(round(len(raw) * 0.25)):]
    for n in (16, 32, 64):
        src = sources["test" if n == 16 else f"test_len{n}"]
        assert len(src) == (len(test) - 1) // n
        for i in (0, len(src) - 1):
            ex = src[i]
            np.testing.assert_array_equal(ex["inputs"], test[i * n:(i + 1) * n])
            np.testing.assert_array_equal(ex["targets"], test[i * n + 1:(i + 1) * n + 1])


def test_bytes_lm_length_split_errors(corpus, data_dir):
    with pytest.raises(ValueError, match="test_lengths entry 100000"):
        zdata.get_task("bytes_lm").resolve(paths=(corpus,), test_lengths=(100_000,))
    with pytest.raises(ValueError, match="test_lengths needs a test split"):
        zdata.get_task("bytes_lm").resolve(paths=(corpus,), test_fraction=0.0, test_lengths=(32,))


def test_identity_scaling_after_training_gives_the_same_metrics(trained):
    plain = run.evaluate(trained)
    same = run.evaluate(trained, overrides={"model.rope_scaling": {"kind": "linear", "factor": 1.0}})
    assert same["config"]["model"]["rope_scaling"]["kind"] == "linear"
    for split, m in plain["splits"].items():
        assert same["splits"][split]["loss"] == pytest.approx(m["loss"], rel=1e-6, abs=1e-6), split
    yarn = run.evaluate(trained, overrides=base.nest(
        {"model.rope_scaling": {"kind": "yarn", "factor": 4.0, "original_max_len": 16}}))
    assert yarn["splits"]["test_len64"]["loss"] != pytest.approx(plain["splits"]["test_len64"]["loss"], rel=1e-4)


def test_load_model_copies_the_trained_parameters_and_keeps_new_ones(trained):
    plain = params_of(run.load_model(trained))
    clex = params_of(run.load_model(trained, overrides={
        "model.rope_scaling": {"kind": "clex", "factor": 2.0, "original_max_len": 16}}))
    new = sorted(set(clex) - set(plain))
    assert new and all("clex" in p for p in new)
    for p, v in plain.items():
        np.testing.assert_array_equal(clex[p], v, err_msg=p)
    assert all(not np.any(clex[p]) for p in new if p.endswith("clex_down"))  # CLEX's init: W_down = 0


def test_shape_changing_override_is_a_config_error(trained):
    with pytest.raises(run.ConfigError, match=r"parameter .*shape"):
        run.evaluate(trained, overrides={"model.d_model": 32, "model.num_heads": 2})


def test_init_from_starts_from_the_runs_parameters(trained, corpus, data_dir, tmp_path):
    # a vanishing learning rate: after one step the parameters are still the source run's
    c = tiny(corpus, data_dir, **{"train.init_from": str(trained), "train.steps": 2, "train.log_every": 1,
                                  "train.eval_every": 2, "train.checkpoint_every": 2,
                                  "optim.learning_rate": 1e-30, "task.params.seq_len": 32,
                                  "task.params.test_lengths": (16, 64), "eval.splits": ("test",),
                                  "model.rope_scaling": {"kind": "linear", "factor": 2.0}})
    run.train(c, tmp_path / "ft")
    src, got = params_of(run.load_model(trained)), params_of(run.load_model(tmp_path / "ft"))
    assert set(got) == set(src)
    for p, v in src.items():
        np.testing.assert_allclose(got[p], v, rtol=0, atol=1e-12, err_msg=p)
    init = params_of(run._setup(run.config_to_dict(c), check_step=False)[2])  # without init_from
    assert any(np.abs(init[p] - got[p]).max() > 1e-4 for p in got)
    # relative init_from: next to the workdir (in a sweep, another entry's name)
    c2 = copy.deepcopy(c)
    c2.train.init_from = "base"
    assert run.init_from_dir(run.config_to_dict(c2)["train"], trained.parent / "ft2") == trained.parent / "base"


def test_init_from_errors(trained, corpus, data_dir, tmp_path):
    missing = tiny(corpus, data_dir, **{"train.init_from": str(tmp_path / "nothing")})
    with pytest.raises(run.ConfigError, match="train.init_from.*no run"):
        run.train(missing, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written
    wider = tiny(corpus, data_dir, **{"train.init_from": str(trained), "model.d_model": 32})
    with pytest.raises(run.ConfigError, match=r"parameter .*shape"):
        run.train(wider, tmp_path / "y")


def test_merge_overrides_nested_dotted_and_whole_scalings():
    cfg = {"model": {"d_model": 8, "rope_scaling": {"kind": "yarn", "beta_fast": 16}}, "seed": 0}
    out = run.merge_overrides(cfg, {"model": {"rope_scaling": {"kind": "linear", "factor": 2}}, "seed": 3})
    assert out == {"model": {"d_model": 8, "rope_scaling": {"kind": "linear", "factor": 2}}, "seed": 3}
    assert run.merge_overrides(cfg, {"model.d_model": 16})["model"] == {**cfg["model"], "d_model": 16}
    assert cfg["model"]["d_model"] == 8  # not modified
    assert jax.tree.leaves(base.nest({"a.b.c": 1, "a.d": 2})) == [1, 2]


def test_readme_context_extension_example_runs(trained):
    """The README's three lines, on the trained run (tokens of twice its training length)."""
    from tests.test_readme import _blocks

    (block,) = [b for b in _blocks() if "run.load_model(" in b]
    ns = {"long_tokens": np.tile(np.arange(32, dtype=np.int32), (2, 1))}
    exec(compile(block.replace('"runs/lm"', repr(str(trained))), "README.md", "exec"), ns)  # noqa: S102
    assert ns["logits"].shape == (2, 32, 256) and np.isfinite(np.asarray(ns["logits"])).all()
    assert ns["scaled"].blocks[0].mixer.rope_scaling is not None
