"""grain pipeline: shuffling, batching, per-host sharding, checkpoint/restore of the iterator."""

from __future__ import annotations

import numpy as np
import pytest

from zoo import data


def _source(n: int = 50):
    return [{"x": np.array([i, -i], np.int32), "y": np.float32(i)} for i in range(n)]


def _take(it, k):
    return [next(it) for _ in range(k)]


def _ids(batches):
    return [int(v) for b in batches for v in b["x"][:, 0]]


def test_batch_shapes_and_dtypes():
    it = data.make_iterator(_source(), batch_size=8, seed=0, shard_index=0, shard_count=1)
    b = next(it)
    assert b["x"].shape == (8, 2) and b["x"].dtype == np.int32
    assert b["y"].shape == (8,) and b["y"].dtype == np.float32


def test_shuffle_is_deterministic_per_seed():
    kw = dict(batch_size=5, shard_index=0, shard_count=1)
    a = _ids(_take(data.make_iterator(_source(), seed=1, **kw), 10))
    b = _ids(_take(data.make_iterator(_source(), seed=1, **kw), 10))
    c = _ids(_take(data.make_iterator(_source(), seed=2, **kw), 10))
    assert a == b and a != c
    assert sorted(a) == list(range(50))  # first epoch is a permutation
    # the next epoch is reshuffled
    it = data.make_iterator(_source(), seed=1, **kw)
    e1, e2 = _ids(_take(it, 10)), _ids(_take(it, 10))
    assert sorted(e2) == list(range(50)) and e1 != e2
    plain = _ids(_take(data.make_iterator(_source(), seed=1, shuffle=False, **kw), 10))
    assert plain == list(range(50))


def test_finite_epochs_and_remainder():
    kw = dict(seed=0, shard_index=0, shard_count=1, num_epochs=2)
    assert len(list(data.make_iterator(_source(10), batch_size=4, **kw))) == 5  # 20 // 4
    kept = list(data.make_iterator(_source(10), batch_size=3, drop_remainder=False, **kw))
    assert [len(b["y"]) for b in kept] == [3] * 6 + [2]


def test_sharding_gives_disjoint_covering_subsets():
    shards = []
    for i in range(3):
        it = data.make_iterator(
            _source(50), batch_size=1, seed=7, num_epochs=1, shard_index=i, shard_count=3,
            drop_remainder=False,
        )
        shards.append(set(_ids(list(it))))
    assert all(not (shards[i] & shards[j]) for i in range(3) for j in range(i + 1, 3))
    assert set().union(*shards) == set(range(50))


def test_default_shard_is_this_jax_process():
    import jax

    it = data.make_iterator(_source(12), batch_size=12, seed=0, num_epochs=1)
    assert jax.process_count() == 1 and len(_ids(list(it))) == 12


def test_checkpoint_restore_resumes_exactly():
    kw = dict(batch_size=7, seed=3, shard_index=1, shard_count=2)
    it = data.make_iterator(_source(), **kw)
    _take(it, 5)  # crosses the first epoch boundary of the 25-element shard
    state = it.get_state()
    expected = _take(it, 6)
    restored = data.make_iterator(_source(), **kw)
    restored.set_state(state)
    got = _take(restored, 6)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["x"], g["x"])
        np.testing.assert_array_equal(e["y"], g["y"])


def test_pipeline_over_built_tfds_source(tmp_path):
    src = data.build("niah", tmp_path, seed=0, seq_len=16, num_train=20, num_test=4)
    it = data.make_iterator(src["train"], batch_size=4, seed=0, shard_index=0, shard_count=1)
    _take(it, 2)
    state = it.get_state()
    nxt = next(it)
    assert nxt["inputs"].shape == (4, 16) and nxt["targets"].dtype == np.int32
    it2 = data.make_iterator(src["train"], batch_size=4, seed=0, shard_index=0, shard_count=1)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["inputs"], nxt["inputs"])
    long = data.make_iterator(src["test_len64"], batch_size=2, seed=0, shard_index=0, shard_count=1)
    assert next(long)["inputs"].shape == (2, 64)
    # the same batches from an in-memory copy of the split
    mem = data.to_memory(src["train"], chunk=7)
    assert len(mem) == 20
    a = data.make_iterator(src["train"], batch_size=4, seed=2, shard_index=1, shard_count=2)
    b = data.make_iterator(mem, batch_size=4, seed=2, shard_index=1, shard_count=2)
    for _ in range(4):
        x, y = next(a), next(b)
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_array_source_checks_lengths():
    with pytest.raises(ValueError, match="arrays"):
        data.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2, shard_index=3, shard_count=3), "shard_index"),
        (dict(batch_size=2, num_epochs=0), "num_epochs"),
        (dict(batch_size=2, seed=-1), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kw, name):
    kw = {"seed": 0, "shard_index": 0, "shard_count": 1, **kw}
    with pytest.raises(ValueError, match=name):
        data.make_iterator(_source(), **kw)
