"""Generated tasks: determinism, structure, targets against direct numpy, validation."""

from __future__ import annotations

import numpy as np
import pytest

from zoo import data
from zoo.data import icl_regression, mqar, niah, positional

GENERATED = [t for t in data.tasks() if t != "bytes_lm"]


def test_registry_lists_tasks_and_rejects_unknown():
    names = data.tasks()
    for name in ["mqar", "selective_copying", "niah", "icl_regression", "bytes_lm"]:
        assert name in names
    for op in positional.OPS:
        assert f"positional_{op}" in names
    with pytest.raises(ValueError, match="mqar"):  # the message lists the valid names
        data.get_task("no_such_task")
    with pytest.raises(ValueError, match="vocabsize"):
        data.get_task("mqar").resolve(vocabsize=10)


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(seq_len=63, vocab_size=256), "seq_len"),
        (dict(seq_len=64, vocab_size=64), "vocab_size"),
        (dict(seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
        (dict(num_train=0), "num_train"),
        (dict(test_lengths=(128,), vocab_size=100), "test_lengths"),
    ],
)
def test_mqar_bad_params_name_the_param(params, name):
    with pytest.raises(ValueError, match=name):
        data.get_task("mqar").resolve(**params)


def test_other_bad_params_name_the_param():
    with pytest.raises(ValueError, match="num_tokens"):
        data.get_task("selective_copying").resolve(seq_len=10, num_tokens=6)
    with pytest.raises(ValueError, match="dim"):
        data.get_task("icl_regression").resolve(dim=0)
    with pytest.raises(ValueError, match="base_range"):
        data.get_task("positional_sum").resolve(base_range=-1.0)
    with pytest.raises(ValueError, match="seed"):
        data.multiquery_ar(4, seed=-1)
    with pytest.raises(ValueError, match="paths"):
        data.get_task("bytes_lm").resolve()


@pytest.mark.parametrize("name", GENERATED)
def test_generation_is_deterministic_per_seed(name):
    task = data.get_task(name)
    small = {"num_train": 40}
    a = task.examples("train", seed=3, **small)
    b = task.examples("train", seed=3, **small)
    c = task.examples("train", seed=4, **small)
    assert sorted(a) == sorted(task.spec().features)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].shape[0] == 40
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    # train and test are drawn from different streams
    t = task.examples("test", seed=3, num_test=40)
    assert not np.array_equal(a["inputs"], t["inputs"])


@pytest.mark.parametrize("name", GENERATED)
def test_spec_matches_examples(name):
    task = data.get_task(name)
    spec = task.spec()
    ex = task.examples("train", seed=0, num_train=8)
    assert spec.kind in ("lm_tokens", "regression")
    assert ex["inputs"].shape[1] == spec.seq_len
    if spec.kind == "lm_tokens":
        assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32
        assert 0 <= ex["inputs"].min() and ex["inputs"].max() < spec.vocab_size
        t = ex["targets"][ex["targets"] != -100]
        assert t.size > 0 and 0 <= t.min() and t.max() < spec.output_dim
    else:
        assert ex["inputs"].shape[2] == spec.input_dim
        assert ex["targets"].shape[1:] == (spec.seq_len, spec.output_dim)
        assert ex["mask"].shape == ex["inputs"].shape[:2] and ex["mask"].sum() > 0


def test_generation_is_fast():
    import time

    t0 = time.perf_counter()
    data.multiquery_ar(4000, seed=0, vocab_size=8192, seq_len=256, num_kv_pairs=16)
    data.selective_copying(4000, seed=0)
    data.positional_task(4000, seed=0, op="median")
    assert time.perf_counter() - t0 < 3.0  # well under a second each on a quiet machine


@pytest.mark.parametrize("random_filler", [False, True])
def test_mqar_structure(random_filler):
    v, t, kv = 128, 32, 4
    ex = data.multiquery_ar(
        200, seed=0, vocab_size=v, seq_len=t, num_kv_pairs=kv, random_non_queries=random_filler
    )
    x, y = ex["inputs"], ex["targets"]
    assert x.shape == y.shape == (200, t)
    keys, values = x[:, 0 : 2 * kv : 2], x[:, 1 : 2 * kv : 2]
    assert keys.min() >= 1 and keys.max() < v // 2
    assert values.min() >= v // 2 and values.max() < v
    for i in range(len(x)):
        assert len(set(keys[i])) == kv and len(set(values[i])) == kv
        pairs = dict(zip(keys[i], values[i]))
        q = np.nonzero(y[i] != -100)[0]
        assert len(q) == kv  # one query per key
        assert np.all(q >= 2 * kv) and np.all((q - 2 * kv) % 2 == 0)
        assert sorted(x[i, q]) == sorted(keys[i])  # each key is queried once
        for p in q:  # the label at a query is the value paired with its key
            assert y[i, p] == pairs[x[i, p]]
        assert np.all(y[i, : 2 * kv] == -100)
        if not random_filler:
            rest = np.setdiff1d(np.arange(2 * kv, t), q)
            assert np.all(x[i, rest] == 0)


def test_mqar_query_gaps_follow_power_law():
    ex = data.multiquery_ar(2000, seed=1, vocab_size=256, seq_len=128, num_kv_pairs=4)
    slots = (np.nonzero(ex["targets"] != -100)[1] - 8) // 2
    counts = np.bincount(slots, minlength=60)
    assert counts[:5].sum() > 3 * counts[-5:].sum()  # p(g) ∝ g^(a-1) favours early slots
    uni = data.multiquery_ar(
        2000, seed=1, vocab_size=256, seq_len=128, num_kv_pairs=4, power_a=1.0
    )
    ucounts = np.bincount((np.nonzero(uni["targets"] != -100)[1] - 8) // 2, minlength=60)
    assert ucounts[:5].sum() < 2 * ucounts[-5:].sum()


def test_mqar_length_splits_scale_kv():
    task = data.get_task("mqar")
    splits = task.splits(vocab_size=300, seq_len=64, num_kv_pairs=4, test_lengths=(128, 256))
    assert set(splits) == {"train", "test", "test_len128", "test_len256"}
    assert splits["test_len256"].gen_kwargs["num_kv_pairs"] == 16
    ex = task.examples(
        "test_len128", seed=0, vocab_size=300, test_lengths=(128, 256), num_test=5
    )
    assert ex["inputs"].shape == (5, 128) and np.all((ex["targets"] != -100).sum(1) == 8)


def test_mqar_check_follows_zoology_asserts():
    mqar.check_mqar(65, 64, 16, 0.01)  # 4 kv == T and V == T + 1 are allowed
    with pytest.raises(ValueError):
        mqar.check_mqar(64, 64, 16, 0.01)


def test_selective_copying_targets_are_the_data_tokens_in_order():
    k, t = 5, 30
    ex = data.selective_copying(100, seed=0, vocab_size=10, seq_len=t, num_tokens=k)
    x, y = ex["inputs"], ex["targets"]
    assert np.all(x[:, t - k :] == 1) and np.all(y[:, : t - k] == -100)
    for i in range(len(x)):
        ctx = x[i, : t - k]
        tokens = ctx[ctx != 0]
        assert len(tokens) == k and np.all(tokens >= 2)
        np.testing.assert_array_equal(y[i, t - k :], tokens)


def test_niah_single_needle_and_answer():
    ex = data.single_needle(100, seed=0, vocab_size=50, seq_len=40)
    x, y = ex["inputs"], ex["targets"]
    assert np.all((x == niah.MARKER).sum(1) == 2)  # the needle's marker and the query's
    assert np.all((y != -100).sum(1) == 1) and np.all(y[:, -1] != -100)
    for i in range(len(x)):
        start = np.nonzero(x[i] == niah.MARKER)[0][0]
        assert start <= 40 - 5
        assert x[i, start + 1] == x[i, -1]  # needle key == query key
        assert y[i, -1] == x[i, start + 2]  # answer = needle value
    assert 0.0 <= ex["depth"].min() and ex["depth"].max() <= 1.0


def test_niah_length_splits():
    task = data.get_task("niah")
    names = list(task.splits(seq_len=16))
    assert names == ["train", "test", "test_len32", "test_len64", "test_len128", "test_len256"]
    ex = task.examples("test_len64", seed=0, seq_len=16, num_test=3)
    assert ex["inputs"].shape == (3, 64)


def test_icl_regression_layout_and_baselines():
    d, n = 4, 20
    batch = icl_regression.icl_regression(2000, seed=0, dim=d, num_context=n, noise_std=0.2)
    x, y, m = batch["inputs"], batch["targets"], batch["mask"]
    assert x.shape == (2000, n + 1, d + 1) and y.shape == (2000, n + 1, 1)
    assert np.all(m[:, :n] == 0) and np.all(m[:, n] == 1)
    assert np.all(x[:, n, d] == 0) and np.all(y[:, :n] == 0)  # the query's y is hidden
    base = data.icl_baselines(batch, noise_std=0.2, beta_scale=1.0)
    assert base["bayes_mse"] < 0.5 * base["zero_mse"]  # ridge clearly beats a trivial predictor
    assert base["bayes_mse"] <= base["ols_mse"] + 1e-3  # and is at least as good as OLS
    assert base["bayes_mse"] > 0.2**2 * 0.8  # cannot beat the label noise
    assert abs(base["zero_mse"] - (1.0 + 0.2**2)) < 0.15  # Var(y) = beta_scale^2 + noise^2


def test_icl_context_length_splits():
    task = data.get_task("icl_regression")
    ex = task.examples("test_ctx80", seed=0, num_test=4)
    assert ex["inputs"].shape == (4, 81, 6)


def _direct(x: np.ndarray, op: str) -> np.ndarray:
    """Per-example, per-prefix computation with plain Python / numpy (the test oracle)."""
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        v = [float(t) for t in x[b]]
        for i in range(len(v)):
            pre = v[: i + 1]
            if op == "sum":
                out[b, i] = sum(pre)
            elif op == "min":
                out[b, i] = min(pre)
            elif op == "median":
                s = sorted(pre)
                h = len(s) // 2
                out[b, i] = s[h] if len(s) % 2 else 0.5 * (s[h - 1] + s[h])
            elif op == "max_subarray":
                out[b, i] = max(sum(pre[a:c]) for a in range(len(pre)) for c in range(a + 1, len(pre) + 1))
        if op == "sort":
            out[b] = sorted(v)
    return out


@pytest.mark.parametrize("op", positional.OPS)
def test_positional_targets_match_direct_computation(op):
    ex = data.positional_task(30, seed=0, op=op, n=7, scratch=2)
    x, y, m = ex["inputs"][..., 0], ex["targets"][..., 0], ex["mask"]
    assert x.shape == (30, 9) and np.all(m[:, :7] == 1) and np.all(m[:, 7:] == 0)
    assert np.all(x[:, 7:] == 0) and np.all(y[:, 7:] == 0)
    np.testing.assert_allclose(y[:, :7], _direct(x[:, :7], op), atol=1e-5)


def test_positional_ood_splits_are_disjoint_from_training_range():
    task = data.get_task("positional_sum")
    splits = task.splits(max_scale=4)
    assert list(splits) == ["train", "test", "test_c2", "test_c3", "test_c4"]
    train = task.examples("train", seed=0, num_train=500, max_scale=4)
    iv, x, m = train["interval"], train["inputs"][..., 0], train["mask"] == 1
    assert np.all(iv >= -2) and np.all(iv <= 2) and np.all(iv[:, 0] <= iv[:, 1])
    assert np.all(np.abs(x[m]) <= 2)
    for c in (2, 3, 4):
        ood = task.examples(f"test_c{c}", seed=0, num_test=500, max_scale=4)
        iv, x = ood["interval"], ood["inputs"][..., 0]
        assert np.all(iv >= -2 * c - 1e-6) and np.all(iv <= 2 * c + 1e-6)
        # no test interval lies inside the training range [-2, 2]
        assert not np.any((iv[:, 0] >= -2) & (iv[:, 1] <= 2))
        lo, hi = iv[:, :1] - 1e-5, iv[:, 1:] + 1e-5
        assert np.all((x[:, :8] >= lo) & (x[:, :8] <= hi))  # values drawn inside [a, b]
        assert np.abs(x).max() > 2  # and the range really is wider


def test_distinct_ints_both_paths():
    from zoo.data.registry import distinct_ints

    rng = np.random.default_rng(0)
    for k, m in [(3, 1000), (9, 10), (10, 10)]:
        out = distinct_ints(rng, 300, k, 5, 5 + m)
        assert out.min() >= 5 and out.max() < 5 + m
        assert all(len(set(r)) == k for r in out)
    # permutations of the full range come out in random order
    full = distinct_ints(rng, 300, 4, 0, 4)
    assert len({tuple(r) for r in full}) > 10
