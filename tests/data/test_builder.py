"""TF-free tfds builder: array_record files, caching by params, data_source access."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from zoo import data

SMALL = {"num_train": 24, "num_test": 6}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_build_writes_array_record_and_matches_generator(data_dir):
    src = data.build("mqar", data_dir, seed=5, test_lengths=(128,), **SMALL)
    assert set(src) == {"train", "test", "test_len128"}
    assert len(src["train"]) == 24 and len(src["test_len128"]) == 6
    assert src.spec.kind == "lm_tokens" and src.spec.vocab_size == 256
    files = list((data_dir / "zoo_synthetic").rglob("*.array_record*"))
    assert files, "no array_record files written"
    ex = data.get_task("mqar").examples("train", seed=5, test_lengths=(128,), **SMALL)
    for i in range(24):  # example i of the source is the i-th generated example
        np.testing.assert_array_equal(src["train"][i]["inputs"], ex["inputs"][i])
        np.testing.assert_array_equal(src["train"][i]["targets"], ex["targets"][i])
    assert src["test_len128"][0]["inputs"].shape == (128,)
    assert "tensorflow" not in sys.modules


def test_build_survives_losing_a_concurrent_build(tmp_path, monkeypatch):
    """Two processes building the same data at once (train.py --sweep_procs): the one whose final
    rename finds the other's finished copy (FileExistsError from tfds) uses that copy."""
    real = tfds.core.DatasetBuilder.download_and_prepare
    calls = []

    def lose_the_race(self, *args, **kwargs):
        calls.append(1)
        real(self, *args, **kwargs)  # the winner's build lands first ...
        if len(calls) == 1:  # ... and this process's own rename then fails
            raise FileExistsError(f"Destination {self.data_dir} already exists.")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lose_the_race)
    src = data.build("mqar", tmp_path, seed=3, **SMALL)
    assert len(calls) == 2 and len(src["train"]) == 24
    ex = data.get_task("mqar").examples("train", seed=3, **SMALL)
    np.testing.assert_array_equal(src["train"][23]["inputs"], ex["inputs"][23])


def test_build_is_deterministic_and_keyed_by_params_and_seed(data_dir, tmp_path):
    a = data.build("positional_min", data_dir, seed=0, max_scale=3, **SMALL)
    again = data.build("positional_min", data_dir, seed=0, max_scale=3, **SMALL)
    fresh = data.build("positional_min", tmp_path, seed=0, max_scale=3, **SMALL)
    other_seed = data.build("positional_min", data_dir, seed=1, max_scale=3, **SMALL)
    other_params = data.build("positional_min", data_dir, seed=0, max_scale=3, n=4, **SMALL)
    assert set(a) == {"train", "test", "test_c2", "test_c3"}
    names = {x.info.config_name for x in (a, other_seed, other_params)}
    assert len(names) == 3 and again.info.config_name == a.info.config_name
    for split in a:
        for i in range(len(a[split])):
            for k in ("inputs", "targets", "mask", "interval"):
                np.testing.assert_array_equal(a[split][i][k], fresh[split][i][k])
    x0 = np.stack([a["train"][i]["inputs"] for i in range(24)])
    x1 = np.stack([other_seed["train"][i]["inputs"] for i in range(24)])
    assert not np.array_equal(x0, x1)
    assert other_params["train"][0]["inputs"].shape == (5, 1)


def test_data_source_by_name_reads_the_same_files(data_dir):
    src = data.build("selective_copying", data_dir, seed=0, seq_len=32, num_tokens=4, **SMALL)
    name = f"zoo_synthetic/{src.info.config_name}"
    ds = tfds.data_source(name, data_dir=str(data_dir), split="test")
    assert len(ds) == 6
    np.testing.assert_array_equal(ds[3]["targets"], src["test"][3]["targets"])
    meta = src.info.metadata
    assert meta["task"] == "selective_copying" and meta["params"]["seq_len"] == 32


def test_build_rejects_bad_input(data_dir):
    with pytest.raises(ValueError, match="valid tasks"):
        data.build("nope", data_dir)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        data.build("mqar", data_dir, num_kv_pairs=100)
    with pytest.raises(ValueError, match="data_dir"):
        data.build("mqar", "")


def test_bytes_lm_builder(tmp_path):
    text = bytes(range(256)) * 3 + b"hello world, " * 20
    (tmp_path / "a.txt").write_bytes(text[:500])
    (tmp_path / "b.txt").write_bytes(text[500:])
    src = data.build("bytes_lm", tmp_path / "tfds", paths=str(tmp_path / "*.txt"), seq_len=16)
    stream = np.frombuffer(text, np.uint8).astype(np.int32)
    cut = len(text) - round(0.1 * len(text))
    assert len(src["train"]) == (cut - 1) // 16 and len(src["test"]) == (len(text) - cut - 1) // 16
    for i in (0, 5, len(src["train"]) - 1):
        ex = src["train"][i]
        np.testing.assert_array_equal(ex["inputs"], stream[16 * i : 16 * i + 16])
        np.testing.assert_array_equal(ex["targets"], stream[16 * i + 1 : 16 * i + 17])
    np.testing.assert_array_equal(src["test"][0]["inputs"], stream[cut : cut + 16])
    assert src.spec.vocab_size == 256
    # editing a file changes the cache key
    (tmp_path / "b.txt").write_bytes(text[500:] + b"!")
    src2 = data.build("bytes_lm", tmp_path / "tfds", paths=str(tmp_path / "*.txt"), seq_len=16)
    assert src2.info.config_name != src.info.config_name
    with pytest.raises(ValueError, match="paths"):
        data.build("bytes_lm", tmp_path / "tfds", paths=str(tmp_path / "*.none"))
