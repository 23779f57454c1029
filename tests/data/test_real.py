"""Real tfds datasets by name through the same sources and pipeline (mocked, no files, no TF)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from zoo import data


def test_tiny_shakespeare_lm_windows_through_pipeline():
    with tfds.testing.mock_data(num_examples=6):
        src = data.load_tfds("tiny_shakespeare", splits=["train", "test"], seq_len=8)
        assert src.spec.kind == "lm_tokens" and src.spec.vocab_size == 256
        assert len(src["train"]) > 0
        ex = src["train"][0]
        np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])  # next-byte targets
        it = data.make_iterator(src["train"], batch_size=2, seed=0, shard_index=0, shard_count=1)
        b = next(it)
        assert b["inputs"].shape == (2, 8) and b["inputs"].dtype == np.int32
        state = it.get_state()
        nxt = next(it)
        it.set_state(state)
        np.testing.assert_array_equal(next(it)["inputs"], nxt["inputs"])
    assert "tensorflow" not in sys.modules


def test_lm1b_per_example_padding():
    with tfds.testing.mock_data(num_examples=4):
        src = data.load_tfds("lm1b", splits=["train"], seq_len=64)
        ex = src["train"][0]
        n = int((ex["targets"] != -100).sum())
        assert 0 < n < 64 and np.all(ex["inputs"][n:] == 0)  # short mock text: padded
        np.testing.assert_array_equal(ex["inputs"][1:n], ex["targets"][: n - 1])


def test_classification_datasets():
    with tfds.testing.mock_data(num_examples=5):
        imdb = data.load_tfds("imdb_reviews", splits=["train", "test"], seq_len=32)
        assert imdb.spec.kind == "classification" and imdb.spec.output_dim == 2
        b = next(data.make_iterator(imdb["test"], batch_size=5, seed=0, shard_index=0,
                                    shard_count=1))
        assert b["inputs"].shape == (5, 32) and b["targets"].shape == (5,)
        cifar = data.load_tfds("cifar10", splits=["train"])
        assert cifar.spec.seq_len == 1024 and cifar.spec.output_dim == 10
        ex = cifar["train"][0]
        assert ex["inputs"].shape == (1024,) and 0 <= ex["inputs"].min() <= ex["inputs"].max() < 256


def test_unknown_dataset_needs_an_adapter():
    with pytest.raises(ValueError, match="adapter"):
        data.load_tfds("some_unknown_dataset", splits=["train"])
