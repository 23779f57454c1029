"""configs/repro/*.py (issue 14, docs/reproductions.md): each reproduction config loads, every
get_sweep() entry passes the config validation and builds its model abstractly, two distinct
models trace one training step (``zoo.run._setup``: validate, build the model,
``jax.eval_shape`` of a step), and the base
config trains two steps at a tiny size. The full runs are not run here (their outputs are under
docs/repro_*/)."""

from __future__ import annotations

import copy
import json
import pathlib
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_train import load_config_module  # noqa: E402
from zoo import data as zdata  # noqa: E402
from zoo import run, sharding, train_lib  # noqa: E402

REPRO = sorted(p for p in (ROOT / "configs" / "repro").glob("*.py") if p.name != "__init__.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _apply(c, overrides: dict):
    c = copy.deepcopy(c)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _tiny(c, data_dir: str):
    """The config on a tiny generated task with one out-of-distribution split (value range, context
    length or sequence length: twice the training length), two steps of 8; the
    positional network at one narrow block (its full size is traced for every sweep entry)."""
    c = copy.deepcopy(c)
    if c.model.name == "positional_transformer":
        c.model.num_blocks, c.model.d_model, c.model.mlp_hidden = 1, 16, 16
    c.task.data_dir = data_dir
    params = zdata.get_task(c.task.name).params
    seq_len = c.task.params.get("seq_len", params["seq_len"].default if "seq_len" in params else 0)
    tiny = {"num_train": 32, "num_test": 16, "max_scale": 2, "test_context_lengths": (80,),
            "test_lengths": (2 * seq_len,)}
    for k, v in tiny.items():
        if k in params:
            c.task.params[k] = v
    far = {"max_scale": "test_c2", "test_context_lengths": "test_ctx80", "test_lengths": f"test_len{2 * seq_len}"}
    c.eval.splits = ("test", *(split for k, split in far.items() if k in params))
    if "test_lengths" in params and "max_len" in c.model and c.model.max_len < 2 * seq_len:
        c.model.max_len = 2 * seq_len  # learned positions must cover the longer split
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 8, 1, 2
    c.train.checkpoint_every, c.train.eval_batches, c.train.progress_bar = 2, 1, False
    c.optim.warmup_steps = 0
    c.eval.batch_size, c.eval.max_batches = 8, 1
    return c


def test_there_are_repro_configs():
    assert {p.stem for p in REPRO} >= {"icl_regression", "positional_ood"}


@pytest.mark.parametrize("path", REPRO, ids=lambda p: p.stem)
def test_repro_config_sweep_validates_builds_and_trains(path, data_dir, tmp_path, monkeypatch):
    module = load_config_module(path)
    base = module.get_config()
    sweep = module.get_sweep()
    assert len(sweep) >= 2  # a comparison
    built, traced = set(), set()
    for name, overrides in sweep.items():
        d = run.config_to_dict(_apply(base, overrides))
        d["train"]["batch_size"] = 8  # shapes do not depend on it; divisible by the test's 8 devices
        try:
            run.validate(d)  # keys, task parameters, eval splits, mixer options
            model = {k: v for k, v in d["model"].items() if k != "num_heads"}
            key = json.dumps([d["model"], d["task"]["params"]], sort_keys=True, default=str)
            if key in built:  # seeds and tasks of one shape
                continue
            built.add(key)
            spec = zdata.get_task(d["task"]["name"]).spec(**dict(d["task"]["params"]))
            rules = sharding.rules_from(d["mesh"]["logical_axis_rules"])
            with jax.set_mesh(sharding.make_mesh(1, 1, 1)), nnx.logical_axis_rules(rules):
                nnx.eval_shape(lambda d=d, spec=spec: train_lib.build_model(d["model"], spec, seed=0))
            kind = json.dumps(model, sort_keys=True, default=str)
            if kind in traced or len(traced) >= 2:  # CI time: every entry is built (above); two trace
                continue  # a training step (the mixers' own tests trace theirs)
            traced.add(kind)
            # zoo.run's own path (build, then one training step traced with jax.eval_shape),
            # without generating the data: only the task's spec is needed
            monkeypatch.setattr(run, "_data", lambda cfg: types.SimpleNamespace(
                spec=zdata.get_task(cfg["task"]["name"]).spec(**dict(cfg["task"]["params"]))))
            run._setup(d)
        except (run.ConfigError, ValueError) as e:  # pragma: no cover - the message names the entry
            pytest.fail(f"{path.stem}: sweep entry {name!r}: {e}")
        finally:
            monkeypatch.undo()
    assert traced
    c = _tiny(base, data_dir)
    out = run.train(c, tmp_path / "r")
    assert out["step"] == 2 and np.isfinite(out["train"]["loss"]) and np.isfinite(out["test"]["loss"])
    r = run.evaluate(tmp_path / "r")
    assert set(r["splits"]) == set(c.eval.splits) and len(c.eval.splits) == 2
    assert all(np.isfinite(m["loss"]) for m in r["splits"].values())


# ----------------------------------------------------------------------------- positional_ood's models
# configs/repro/positional_ood.py compares PositionalTransformer(attention="positional") with the
# paper's baseline, attention="standard" (zoo/models/positional.py); both non-causal as the paper's.


def _randomize(model, seed: int):
    """Every parameter drawn at random (the biases start at 0), so the reference sees all of them."""
    import jax

    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(tree, [rng.standard_normal(x.shape).astype(np.float32) * 0.5
                                                for x in leaves]))


def test_standard_attention_equals_naive_softmax_attention_on_the_input():
    from zoo.models.positional import StandardAttention

    e, h, b, t = 8, 2, 3, 5
    attn = StandardAttention(e, h, rngs=nnx.Rngs(0))
    _randomize(attn, 1)
    x = np.random.default_rng(2).standard_normal((b, t, e)).astype(np.float32)
    wq, bq = np.asarray(attn.q_kernel[...], np.float64), np.asarray(attn.q_bias[...], np.float64)
    wk, bk = np.asarray(attn.k_kernel[...], np.float64), np.asarray(attn.k_bias[...], np.float64)
    wv, bv = np.asarray(attn.v_proj.kernel[...], np.float64), np.asarray(attn.v_proj.bias[...], np.float64)
    wo, bo = np.asarray(attn.o_proj.kernel[...], np.float64), np.asarray(attn.o_proj.bias[...], np.float64)
    xd = x.astype(np.float64)
    v = (xd @ wv + bv).reshape(b, t, h, e // h)
    heads = []
    for i in range(h):  # softmax((x Wq + bq)(x Wk + bk)^T / sqrt(E)) v, per head, every key (non-causal)
        s = np.einsum("bid,bjd->bij", xd @ wq[i] + bq[i], xd @ wk[i] + bk[i]) / np.sqrt(e)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        heads.append(np.einsum("bij,bjd->bid", a, v[:, :, i]))
    want = np.concatenate(heads, -1) @ wo + bo
    got = np.asarray(attn(x, causal=False), np.float64)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["positional", "standard"])
def test_positional_transformer_is_non_causal(attention):
    """The paper's network attends to every position (sort needs the later values): changing the
    last value changes the first output; the standard baseline's weights depend on the input."""
    from zoo.models import PositionalTransformer

    model = PositionalTransformer(4, d_model=8, num_heads=2, mlp_hidden=8, attention=attention, record=True,
                                  rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).uniform(-2, 2, (2, 5, 1)).astype(np.float32)
    x2 = x.copy()
    x2[:, 3] += 1.5
    (y, y2), inter = nnx.capture(lambda m: (m(x), m(x2)), nnx.Intermediate)(model)
    assert y.shape == (2, 5, 1) and np.all(np.isfinite(np.asarray(y)))
    assert np.max(np.abs(np.asarray(y[:, 0]) - np.asarray(y2[:, 0]))) > 1e-4
    w = inter["blocks"][0]["attn"]["attn_weights"].get_value()
    if attention == "standard":
        assert w[0].shape == (2, 2, 5, 5) and not np.allclose(np.asarray(w[0]), np.asarray(w[1]))
        with pytest.raises(ValueError, match="positional"):
            model.attention_weights()
    else:
        assert w[0].shape == (2, 5, 5)
        np.testing.assert_allclose(np.asarray(model.attention_weights()[0]), np.asarray(w[0]), atol=1e-6)
    with pytest.raises(ValueError, match="attention must be one of"):
        PositionalTransformer(4, attention="causal", rngs=nnx.Rngs(0))
