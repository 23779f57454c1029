"""Single-needle-in-a-haystack retrieval (S-NIAH), a token-level version of RULER's S-NIAH.

RULER (Hsieh et al. 2024) hides "One of the special magic numbers for {key} is: {value}." in
filler text and asks for the value; Titans (Behrouz et al. 2025, Table 2) reports S-NIAH
accuracy at growing lengths. Here the haystack is random tokens and the needle is three tokens:

    ... h h h  1 key value  h h h ... h  1 key
               ^ needle at depth d                ^ query: the last two positions

Token 1 is the needle marker and never occurs elsewhere; haystack, keys and values are uniform
over [2, V). The needle starts at a uniform position in [0, L - 5] (depth 0-100%). ``targets``
is -100 except at the last position, where it is the needle's value. Models train at
``seq_len`` and are tested at longer lengths (splits ``test_len{L}``, default 2x-16x).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from zoo.data import registry as R

MARKER = 1


def single_needle(
    num_examples: int,
    *,
    seed: int | np.random.Generator,
    vocab_size: int = 256,
    seq_len: int = 64,
) -> dict[str, np.ndarray]:
    """Generates S-NIAH sequences (see the module docstring).

    Args:
      num_examples: number of sequences ``N``.
      seed: int seed or numpy Generator.
      vocab_size: ``V >= 4``; 1 is the needle marker, all other tokens come from [2, V).
      seq_len: ``L >= 5`` (needle of 3 tokens plus a 2-token query).

    Returns:
      ``{"inputs": int32[N, L], "targets": int32[N, L], "depth": float32[N]}``; ``depth`` is the
      needle's start position divided by ``L - 5`` (0 = start of the haystack, 1 = end).
    """
    vocab_size, seq_len = _check_args(vocab_size, seq_len)
    n = R.check_int("num_examples", num_examples, low=0)
    rng = R.as_rng(seed)
    inputs = rng.integers(2, vocab_size, size=(n, seq_len)).astype(np.int32)
    key = inputs[:, -1]  # the query key (random, drawn with the haystack)
    value = rng.integers(2, vocab_size, size=n).astype(np.int32)
    start = rng.integers(0, seq_len - 4, size=n)
    rows = np.arange(n)
    inputs[rows, start] = MARKER
    inputs[rows, start + 1] = key
    inputs[rows, start + 2] = value
    inputs[:, -2] = MARKER
    targets = np.full((n, seq_len), R.IGNORE_INDEX, np.int32)
    targets[:, -1] = value
    depth = (start / max(seq_len - 5, 1)).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "depth": depth}


def _check_args(vocab_size: Any, seq_len: Any) -> tuple[int, int]:
    return R.check_int("vocab_size", vocab_size, low=4), R.check_int("seq_len", seq_len, low=5)


def _check(p: dict[str, Any]) -> dict[str, Any]:
    p["vocab_size"], p["seq_len"] = _check_args(p["vocab_size"], p["seq_len"])
    p["num_train"] = R.check_int("num_train", p["num_train"], low=1)
    p["num_test"] = R.check_int("num_test", p["num_test"], low=1)
    if p["test_lengths"] is None:
        p["test_lengths"] = tuple(m * p["seq_len"] for m in (2, 4, 8, 16))
    p["test_lengths"] = R.check_int_tuple("test_lengths", p["test_lengths"], low=5)
    return p


def _splits(p: dict[str, Any]) -> dict[str, R.Split]:
    kw = {"vocab_size": p["vocab_size"], "seq_len": p["seq_len"]}
    out = {"train": R.Split(p["num_train"], kw), "test": R.Split(p["num_test"], kw)}
    for length in p["test_lengths"]:
        out[f"test_len{length}"] = R.Split(p["num_test"], {**kw, "seq_len": length})
    return out


def _spec(p: dict[str, Any]) -> R.TaskSpec:
    spec = R.token_spec("niah", seq_len=p["seq_len"], vocab_size=p["vocab_size"])
    return dataclasses.replace(spec, features={**spec.features, "depth": ((), "float32")})


TASK = R.register(
    R.Task(
        name="niah",
        kind="lm_tokens",
        description=__doc__,
        params={
            "vocab_size": R.Param(256, "vocabulary (1 = needle marker)"),
            "seq_len": R.Param(64, "training length L"),
            "num_train": R.Param(10_000, "training examples"),
            "num_test": R.Param(500, "examples per test split"),
            "test_lengths": R.Param(None, "lengths of test_len{L} splits; None = 2,4,8,16 x L"),
        },
        generate=single_needle,
        check=_check,
        split_fn=_splits,
        spec_fn=_spec,
    )
)
