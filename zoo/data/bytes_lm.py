"""Byte-level language modelling over local text files.

The files (``paths``: file names or glob patterns, expanded and sorted) are read as raw bytes
and concatenated in order. The last ``test_fraction`` of the byte stream is the ``test`` split,
the rest ``train``. Each split is cut into non-overlapping windows of ``seq_len + 1`` bytes
(a trailing remainder is dropped): ``inputs = w[:-1]``, ``targets = w[1:]``, token ids are byte
values in [0, 256). ``test_lengths`` adds length-extrapolation splits ``test_len{L}``: the same
test bytes cut into windows of ``L + 1`` (so every length is scored on the same text, as far as
it reaches: ``len(test) // L`` windows). The files are read into memory: meant for corpora up to a few hundred MB.

The files' content hash is part of the cache key, so editing a file rebuilds the dataset.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from zoo.data import registry as R

VOCAB_SIZE = 256


def expand_paths(paths: Any) -> tuple[str, ...]:
    """Absolute, sorted file names for file names / glob patterns; ValueError if none match."""
    if isinstance(paths, str | os.PathLike):
        paths = (paths,)
    if not isinstance(paths, list | tuple) or not paths:
        raise ValueError(f"paths must be a file name, glob, or a non-empty list, got {paths!r}")
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        files = [os.path.abspath(m) for m in matches if os.path.isfile(m)]
        if not files:
            raise ValueError(f"paths entry {p!r} matches no file")
        out.extend(files)
    return tuple(out)


def read_bytes(paths: tuple[str, ...]) -> np.ndarray:
    """The files' bytes concatenated, as ``uint8[total]``."""
    return np.frombuffer(b"".join(open(p, "rb").read() for p in paths), np.uint8)


def byte_windows(data: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Non-overlapping next-byte windows: ``{"inputs", "targets"}: int32[W, seq_len]``."""
    w = max(0, (len(data) - 1) // seq_len)
    idx = np.arange(w)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    win = np.asarray(data, np.int32)[idx] if w else np.zeros((0, seq_len + 1), np.int32)
    return {"inputs": win[:, :-1], "targets": win[:, 1:]}


def _split_bytes(p: dict[str, Any]) -> dict[str, np.ndarray]:
    data = read_bytes(p["paths"])
    cut = len(data) - int(round(len(data) * p["test_fraction"]))
    out = {"train": data[:cut]}
    if p["test_fraction"] > 0:
        out["test"] = data[cut:]
    return out


def _check(p: dict[str, Any]) -> dict[str, Any]:
    p["paths"] = expand_paths(p["paths"])
    p["seq_len"] = R.check_int("seq_len", p["seq_len"], low=1)
    p["test_fraction"] = R.check_float("test_fraction", p["test_fraction"], low=0.0)
    if p["test_fraction"] >= 1:
        raise ValueError(f"test_fraction must be < 1, got {p['test_fraction']}")
    h = hashlib.sha256()
    for path in p["paths"]:
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    p["content_sha256"] = h.hexdigest()
    p["test_lengths"] = R.check_int_tuple("test_lengths", p["test_lengths"] or (), low=1)
    if p["test_lengths"] and p["test_fraction"] == 0:
        raise ValueError("test_lengths needs a test split (test_fraction > 0)")
    sizes = {k: (len(v) - 1) // p["seq_len"] for k, v in _split_bytes(p).items()}
    sizes.update({f"test_len{n}": (len(_split_bytes(p)["test"]) - 1) // n for n in p["test_lengths"]})
    for split, count in sizes.items():
        if count < 1 and split.startswith("test_len"):
            raise ValueError(f"test_lengths entry {split[8:]}: the test split has fewer than {split[8:]} + 1 bytes "
                             "(lower it or raise test_fraction)")
        if count < 1:
            raise ValueError(
                f"seq_len={p['seq_len']}: the {split} split has fewer than seq_len + 1 bytes "
                "(lower seq_len or change test_fraction)"
            )
    return p


def _iter(p: dict[str, Any], split: str, seed: int) -> Iterator[dict[str, np.ndarray]]:
    del seed  # the data are the files
    lengths = _lengths(p)
    if split not in lengths:
        raise ValueError(f"split {split!r} not in task 'bytes_lm': {sorted(lengths)}")
    yield byte_windows(_split_bytes(p)[split.split("_len")[0]], lengths[split])


def _lengths(p: dict[str, Any]) -> dict[str, int]:
    """Window length of every split."""
    out = {k: p["seq_len"] for k in _split_bytes(p)}
    return {**out, **{f"test_len{n}": n for n in p["test_lengths"]}}


def _splits(p: dict[str, Any]) -> dict[str, R.Split]:
    parts = _split_bytes(p)
    return {k: R.Split((len(parts[k.split("_len")[0]]) - 1) // n, {}) for k, n in _lengths(p).items()}


TASK = R.register(
    R.Task(
        name="bytes_lm",
        kind="lm_tokens",
        description=__doc__,
        params={
            "paths": R.Param(R.REQUIRED, "text files or glob patterns"),
            "seq_len": R.Param(256, "bytes per training window"),
            "test_fraction": R.Param(0.1, "final fraction of the byte stream used as test"),
            "test_lengths": R.Param((), "lengths of test_len{L} splits (windows of the test bytes)"),
            "content_sha256": R.Param("", "filled in from the files (cache key); leave unset"),
        },
        generate=None,
        check=_check,
        split_fn=_splits,
        spec_fn=lambda p: R.token_spec("bytes_lm", seq_len=p["seq_len"], vocab_size=VOCAB_SIZE),
        iter_fn=_iter,
        seeded=False,
    )
)
