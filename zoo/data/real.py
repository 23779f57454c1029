"""Real tfds datasets through the same sources and pipeline as the generated tasks.

:func:`load_tfds` opens a prepared tfds dataset with ``tfds.data_source`` (array_record files,
no TensorFlow) and maps each example to the zoo formats, byte-level as in the Long Range Arena:

``"text_lm"`` (``lm1b``, ...)
    each example's text as UTF-8 bytes, truncated to ``seq_len + 1``: ``inputs = b[:-1]``
    (padded with 0), ``targets = b[1:]`` (padded with -100). Kind ``lm_tokens``, vocab 256.
``"text_lm_concat"`` (``tiny_shakespeare``: one huge example per split)
    the split's texts concatenated and cut into non-overlapping ``seq_len + 1`` byte windows.
``"text_classification"`` (``imdb_reviews``: LRA's byte-level text task)
    ``inputs`` = bytes truncated / 0-padded to ``seq_len``, ``targets`` = the label.
``"image_classification"`` (``cifar10``, ``mnist``: LRA's image task)
    pixels converted to grey levels (uint8) and flattened row-major into ``inputs``
    (``seq_len`` = height * width), ``targets`` = the label.

The data must have been prepared as array_record, e.g. ``tfds build tiny_shakespeare
--file_format=array_record`` (on a machine where that works); tests use
``tfds.testing.mock_data``, which needs no files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from zoo.data import registry as R
from zoo.data.builder import Sources
from zoo.data.bytes_lm import VOCAB_SIZE, byte_windows
from zoo.data.pipeline import ArraySource

ADAPTERS = ("text_lm", "text_lm_concat", "text_classification", "image_classification")

# Known datasets and how to read them.
KNOWN = {
    "tiny_shakespeare": "text_lm_concat",
    "lm1b": "text_lm",
    "imdb_reviews": "text_classification",
    "cifar10": "image_classification",
    "mnist": "image_classification",
}

# concatenating more examples than this is refused (use "text_lm" for large corpora)
MAX_CONCAT_EXAMPLES = 100_000


class MappedSource(Sequence):
    """A random-access source whose items are ``fn(base[i])``."""

    def __init__(self, base: Sequence, fn: Callable[[Any], Any]):
        self._base, self._fn = base, fn

    def __len__(self) -> int:
        return len(self._base)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("MappedSource supports integer indices only")
        return self._fn(self._base[i])

    def __repr__(self) -> str:
        return f"MappedSource({self._base!r})"


def _to_bytes(text: Any) -> bytes:
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _text_lm(seq_len: int, key: str):
    def fn(ex: dict) -> dict[str, np.ndarray]:
        b = np.frombuffer(_to_bytes(ex[key])[: seq_len + 1], np.uint8).astype(np.int32)
        inputs = np.zeros(seq_len, np.int32)
        targets = np.full(seq_len, R.IGNORE_INDEX, np.int32)
        inputs[: max(len(b) - 1, 0)] = b[:-1]
        targets[: max(len(b) - 1, 0)] = b[1:]
        return {"inputs": inputs, "targets": targets}

    return fn


def _text_cls(seq_len: int, key: str):
    def fn(ex: dict) -> dict[str, np.ndarray]:
        b = np.frombuffer(_to_bytes(ex[key])[:seq_len], np.uint8)
        inputs = np.zeros(seq_len, np.int32)
        inputs[: len(b)] = b
        return {"inputs": inputs, "targets": np.asarray(ex["label"], np.int32)}

    return fn


def _image_cls(ex: dict) -> dict[str, np.ndarray]:
    img = np.asarray(ex["image"], np.float32)
    if img.ndim == 3 and img.shape[-1] == 3:
        img = img @ np.array([0.299, 0.587, 0.114], np.float32)
    elif img.ndim == 3:
        img = img[..., 0]
    pixels = np.clip(np.rint(img), 0, 255).astype(np.int32).reshape(-1)
    return {"inputs": pixels, "targets": np.asarray(ex["label"], np.int32)}


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    seq_len: int = 256,
    adapter: str | None = None,
    text_key: str = "text",
) -> Sources:
    """Opens a prepared tfds dataset (array_record) as zoo sources.

    Args:
      name: tfds name, e.g. ``"tiny_shakespeare"``, ``"lm1b"``, ``"imdb_reviews"``,
        ``"cifar10"`` (optionally ``"name/config:version"``).
      data_dir: tfds data directory (tfds' default if None).
      splits: split names to open (default: all splits of the dataset).
      seq_len: tokens per example (ignored for images, where it is height * width).
      adapter: one of ``ADAPTERS``; default from ``KNOWN`` by the dataset's base name.
      text_key: feature holding the text for the text adapters.

    Returns:
      :class:`~zoo.data.builder.Sources` ``{split: source}`` in the zoo example format, with a
      ``.spec`` (kind ``lm_tokens`` or ``classification``) and the tfds ``.info``.
    """
    base = name.split("/")[0].split(":")[0]
    adapter = adapter if adapter is not None else KNOWN.get(base)
    if adapter not in ADAPTERS:
        raise ValueError(
            f"adapter must be one of {ADAPTERS} (no default for dataset {name!r}; "
            f"known datasets: {sorted(KNOWN)}), got {adapter!r}"
        )
    seq_len = R.check_int("seq_len", seq_len, low=1)
    kwargs = {"data_dir": os.fspath(data_dir)} if data_dir is not None else {}
    if splits is None:
        raw = dict(tfds.data_source(name, **kwargs))  # {split: ArrayRecordDataSource}
        if not raw:
            raise ValueError(f"no splits found for {name!r}; pass splits=[...]")
    else:
        if isinstance(splits, str) or not splits:
            raise ValueError(f"splits must be a non-empty list of split names, got {splits!r}")
        raw = dict(zip(splits, tfds.data_source(name, split=list(splits), **kwargs)))
    info = getattr(next(iter(raw.values())), "dataset_info", None)

    out: dict[str, Sequence] = {}
    if adapter == "text_lm_concat":
        for split, src in raw.items():
            if len(src) > MAX_CONCAT_EXAMPLES:
                raise ValueError(
                    f"adapter 'text_lm_concat': split {split!r} has {len(src)} examples; "
                    "use adapter='text_lm' for large corpora"
                )
            data = b"".join(_to_bytes(src[i][text_key]) for i in range(len(src)))
            out[split] = ArraySource(byte_windows(np.frombuffer(data, np.uint8), seq_len))
        spec = R.token_spec(base, seq_len=seq_len, vocab_size=VOCAB_SIZE)
    elif adapter == "text_lm":
        out = {s: MappedSource(src, _text_lm(seq_len, text_key)) for s, src in raw.items()}
        spec = R.token_spec(base, seq_len=seq_len, vocab_size=VOCAB_SIZE)
    else:
        num_classes = _num_classes(info)
        if adapter == "text_classification":
            out = {s: MappedSource(src, _text_cls(seq_len, text_key)) for s, src in raw.items()}
        else:
            out = {s: MappedSource(src, _image_cls) for s, src in raw.items()}
            shape = _image_shape(info)
            seq_len = shape[0] * shape[1] if shape else seq_len
        spec = R.TaskSpec(
            name=base,
            kind="classification",
            seq_len=seq_len,
            vocab_size=VOCAB_SIZE,
            input_dim=None,
            output_dim=num_classes,
            ignore_index=None,
            metric=R.METRICS["classification"],
            features={"inputs": ((seq_len,), "int32"), "targets": ((), "int32")},
        )
    return Sources(out, spec=spec, params={"name": name, "adapter": adapter}, info=info)


def _num_classes(info: Any) -> int:
    try:
        return int(info.features["label"].num_classes)
    except Exception as e:
        raise ValueError(f"dataset has no ClassLabel feature 'label' ({e})") from None


def _image_shape(info: Any) -> tuple[int, ...] | None:
    try:
        shape = tuple(info.features["image"].shape)
    except Exception:
        return None
    return shape if None not in shape[:2] else None
