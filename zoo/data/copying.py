"""Selective copying (Gu & Dao, "Mamba", 2023, App. E.1; the MAD-lab version, Poli et al. 2024).

A sequence of length ``T`` has a context of ``T - k`` positions holding ``k`` data tokens at
random (sorted, distinct) positions, with the noise token 0 everywhere else, followed by ``k``
copy markers (token 1). At the ``j``-th marker the model must output the ``j``-th data token of
the context, in order. Data tokens are uniform over [2, V) (with repeats), so 0 and 1 are never
data. ``targets`` is -100 except at the ``k`` marker positions.

Mamba uses V=16, T=4096, k=16; the CPU-sized MAD config uses V=16, T=256, k=16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.data import registry as R

NOISE, MARKER = 0, 1


def selective_copying(
    num_examples: int,
    *,
    seed: int | np.random.Generator,
    vocab_size: int = 16,
    seq_len: int = 256,
    num_tokens: int = 16,
) -> dict[str, np.ndarray]:
    """Generates selective-copying sequences (see the module docstring).

    Args:
      num_examples: number of sequences ``N``.
      seed: int seed or numpy Generator.
      vocab_size: ``V >= 3``; 0 is noise, 1 the copy marker, data tokens are [2, V).
      seq_len: ``T``, with ``2 * num_tokens <= T``.
      num_tokens: ``k`` data tokens to copy.

    Returns:
      ``{"inputs": int32[N, T], "targets": int32[N, T]}``.
    """
    vocab_size, seq_len, num_tokens = _check_args(vocab_size, seq_len, num_tokens)
    n = R.check_int("num_examples", num_examples, low=0)
    rng = R.as_rng(seed)
    k, ctx = num_tokens, seq_len - num_tokens
    data = rng.integers(2, vocab_size, size=(n, k))
    pos = np.sort(np.argpartition(rng.random((n, ctx)), k - 1, axis=1)[:, :k], axis=1)
    inputs = np.full((n, seq_len), NOISE, np.int32)
    np.put_along_axis(inputs, pos, data, axis=1)
    inputs[:, ctx:] = MARKER
    targets = np.full((n, seq_len), R.IGNORE_INDEX, np.int32)
    targets[:, ctx:] = data
    return {"inputs": inputs, "targets": targets}


def _check_args(vocab_size: Any, seq_len: Any, num_tokens: Any) -> tuple[int, int, int]:
    vocab_size = R.check_int("vocab_size", vocab_size, low=3)
    seq_len = R.check_int("seq_len", seq_len, low=2)
    num_tokens = R.check_int("num_tokens", num_tokens, low=1)
    if 2 * num_tokens > seq_len:
        raise ValueError(f"num_tokens={num_tokens} needs 2 * num_tokens <= seq_len={seq_len}")
    return vocab_size, seq_len, num_tokens


def _check(p: dict[str, Any]) -> dict[str, Any]:
    p["vocab_size"], p["seq_len"], p["num_tokens"] = _check_args(
        p["vocab_size"], p["seq_len"], p["num_tokens"]
    )
    p["num_train"] = R.check_int("num_train", p["num_train"], low=1)
    p["num_test"] = R.check_int("num_test", p["num_test"], low=1)
    return p


def _splits(p: dict[str, Any]) -> dict[str, R.Split]:
    kw = {k: p[k] for k in ("vocab_size", "seq_len", "num_tokens")}
    return {"train": R.Split(p["num_train"], kw), "test": R.Split(p["num_test"], kw)}


TASK = R.register(
    R.Task(
        name="selective_copying",
        kind="lm_tokens",
        description=__doc__,
        params={
            "vocab_size": R.Param(16, "vocabulary (0 noise, 1 marker, data tokens [2, V))"),
            "seq_len": R.Param(256, "sequence length T (context T - k, then k markers)"),
            "num_tokens": R.Param(16, "data tokens to copy, k"),
            "num_train": R.Param(12_800, "training examples (MAD: 12,800)"),
            "num_test": R.Param(1_000, "test examples"),
        },
        generate=selective_copying,
        check=_check,
        split_fn=_splits,
        spec_fn=lambda p: R.token_spec(
            "selective_copying", seq_len=p["seq_len"], vocab_size=p["vocab_size"]
        ),
    )
)
