"""Task registry: every generated benchmark task, its parameters, splits and model-facing spec.

A :class:`Task` bundles

* a pure numpy generator ``generate(num_examples, *, seed, **gen_params) -> dict[str, array]``
  (batch-major, fixed shapes inside one call);
* its documented parameters with defaults (:class:`Param`), validated by :meth:`Task.resolve`
  (unknown or bad parameters raise ``ValueError`` naming the parameter);
* its splits (``train``, ``test`` and out-of-distribution splits such as ``test_c2`` or
  ``test_len256``), each a number of examples plus the generator arguments for that split;
* a :class:`TaskSpec`: the metric semantics (``kind``) and the sizes a model needs
  (vocabulary, sequence length, input/output dims).

Example formats by ``kind``:

``"lm_tokens"``
    ``{"inputs": int32[T], "targets": int32[T]}``; ``targets[t]`` is what the model should
    output at position ``t`` (next-token convention), ``-100`` where ignored. Metric: token
    accuracy (and cross-entropy) over positions with ``targets != -100``.
``"regression"``
    ``{"inputs": float32[T, input_dim], "targets": float32[T, output_dim], "mask": float32[T]}``.
    Metric: mean squared error over positions with ``mask == 1`` (averaged over output dims).
``"classification"``
    ``{"inputs": int32[T], "targets": int32[]}`` (one label per sequence; real datasets only).
    Metric: accuracy and cross-entropy of the sequence-level prediction.

Other keys in an example (e.g. ``"interval"`` for the positional tasks) are metadata for
analysis; a training loop may ignore them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

IGNORE_INDEX = -100
KINDS = ("lm_tokens", "regression", "classification")

# Bump when any generator's output for given parameters changes: it is hashed into the tfds
# config name, so data built by an older generator is never silently reused.
GENERATOR_VERSION = 1

# Examples are generated in chunks of this many, each from its own child seed, so memory stays
# bounded and the output for a given (seed, split) never depends on anything else.
CHUNK_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Param:
    """A documented task parameter. ``default is REQUIRED`` marks a parameter with no default."""

    default: Any
    doc: str


REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a task: how many examples and the generator arguments used for it."""

    num_examples: int
    gen_kwargs: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a model and a training loop need to know about a task (or a real dataset).

    Attributes:
      name: task name.
      kind: ``"lm_tokens" | "regression" | "classification"``: selects loss and metrics.
      seq_len: training sequence length (positions per example in the ``train`` split).
      vocab_size: token ids lie in ``[0, vocab_size)`` (token tasks); ``None`` for regression.
      input_dim: features per position for regression inputs; ``None`` for token inputs.
      output_dim: size of the model's output per position: ``vocab_size`` for ``lm_tokens``,
        number of classes for ``classification``, target dims for ``regression``.
      ignore_index: label value to ignore (``-100``) for token tasks, else ``None``.
      metric: human-readable metric definition.
      features: ``name -> (shape, dtype)`` of one example; ``None`` marks a dimension that
        differs between splits (e.g. the length splits of S-NIAH).
    """

    name: str
    kind: str
    seq_len: int
    vocab_size: int | None
    input_dim: int | None
    output_dim: int
    ignore_index: int | None
    metric: str
    features: Mapping[str, tuple[tuple[int | None, ...], str]]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = {k: [list(s), t] for k, (s, t) in self.features.items()}
        return d


METRICS = {
    "lm_tokens": "accuracy and cross-entropy over positions with targets != -100",
    "regression": "mean squared error over positions with mask == 1",
    "classification": "accuracy and cross-entropy of one label per sequence",
}


def token_spec(name: str, *, seq_len: int, vocab_size: int) -> TaskSpec:
    """Spec of an ``lm_tokens`` task: int32 inputs/targets of length ``seq_len``."""
    return TaskSpec(
        name=name,
        kind="lm_tokens",
        seq_len=seq_len,
        vocab_size=vocab_size,
        input_dim=None,
        output_dim=vocab_size,
        ignore_index=IGNORE_INDEX,
        metric=METRICS["lm_tokens"],
        features={"inputs": ((None,), "int32"), "targets": ((None,), "int32")},
    )


def regression_spec(
    name: str, *, seq_len: int, input_dim: int, output_dim: int, extra: Mapping | None = None
) -> TaskSpec:
    """Spec of a ``regression`` task: float32 inputs/targets and a float32 loss mask."""
    features = {
        "inputs": ((None, input_dim), "float32"),
        "targets": ((None, output_dim), "float32"),
        "mask": ((None,), "float32"),
    }
    features.update(extra or {})
    return TaskSpec(
        name=name,
        kind="regression",
        seq_len=seq_len,
        vocab_size=None,
        input_dim=input_dim,
        output_dim=output_dim,
        ignore_index=None,
        metric=METRICS["regression"],
        features=features,
    )


def as_rng(seed: int | np.random.Generator, *, name: str = "seed") -> np.random.Generator:
    """A numpy Generator from an int seed (or the Generator itself)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """``value`` as an int, else ValueError naming ``name``; ``low`` is an inclusive bound."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_float(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return value


def check_int_tuple(name: str, value: Any, *, low: int = 1) -> tuple[int, ...]:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a tuple of ints, got {value!r}")
    out = tuple(check_int(name, v, low=low) for v in value)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {out}")
    return out


@dataclasses.dataclass(frozen=True)
class Task:
    """A registered benchmark task. See the module docstring.

    Attributes:
      name: registry name.
      kind: ``"lm_tokens" | "regression" | "classification"``.
      description: what is generated, and the paper it comes from.
      params: documented parameters with defaults.
      generate: ``generate(num_examples, *, seed, **gen_kwargs) -> dict[str, np.ndarray]``.
      check: ``check(params) -> params``: normalises and validates the resolved parameters.
      split_fn: ``split_fn(params) -> {split_name: Split}``.
      spec_fn: ``spec_fn(params) -> TaskSpec``.
      iter_fn: optional replacement for chunked generation of one split,
        ``iter_fn(params, split_name, seed) -> Iterator[dict[str, np.ndarray]]`` (used by tasks
        that read files rather than sample).
      seeded: whether the data depend on the seed (if not, the seed is left out of cache keys).
    """

    name: str
    kind: str
    description: str
    params: Mapping[str, Param]
    generate: Callable[..., dict[str, np.ndarray]] | None
    check: Callable[[dict[str, Any]], dict[str, Any]]
    split_fn: Callable[[dict[str, Any]], dict[str, Split]]
    spec_fn: Callable[[dict[str, Any]], TaskSpec]
    iter_fn: Callable[[dict[str, Any], str, int], Iterator[dict[str, np.ndarray]]] | None = None
    seeded: bool = True

    def resolve(self, **params: Any) -> dict[str, Any]:
        """Fills defaults and validates; unknown or bad parameters raise ValueError."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for task {self.name!r}; "
                f"valid parameters: {sorted(self.params)}"
            )
        out = {}
        for key, p in self.params.items():
            if key in params:
                out[key] = params[key]
            elif p.default is REQUIRED:
                raise ValueError(f"task {self.name!r} needs parameter {key!r}: {p.doc}")
            else:
                out[key] = p.default
        return self.check(out)

    def spec(self, **params: Any) -> TaskSpec:
        """The :class:`TaskSpec` for these parameters."""
        return self.spec_fn(self.resolve(**params))

    def splits(self, **params: Any) -> dict[str, Split]:
        """``{split_name: Split}`` for these parameters."""
        return self.split_fn(self.resolve(**params))

    def iter_split(
        self, split: str, *, seed: int = 0, resolved: dict[str, Any] | None = None, **params: Any
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields the examples of ``split`` as batch-major chunks of arrays (deterministic)."""
        p = resolved if resolved is not None else self.resolve(**params)
        seed = check_int("seed", seed, low=0)
        if self.iter_fn is not None:
            yield from self.iter_fn(p, split, seed)
            return
        splits = self.split_fn(p)
        if split not in splits:
            raise ValueError(f"split {split!r} not in task {self.name!r}: {sorted(splits)}")
        s = splits[split]
        split_key = zlib.crc32(split.encode())
        for i, start in enumerate(range(0, s.num_examples, CHUNK_SIZE)):
            n = min(CHUNK_SIZE, s.num_examples - start)
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_key, i)))
            yield self.generate(n, seed=rng, **s.gen_kwargs)

    def examples(self, split: str = "train", *, seed: int = 0, **params: Any) -> dict:
        """All examples of ``split`` as one dict of batch-major arrays (what :func:`build` writes)."""
        chunks = list(self.iter_split(split, seed=seed, **params))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def cache_key(self, params: dict[str, Any], seed: int) -> str:
        """Config name for tfds: task name plus a hash of (params, seed, generator version)."""
        payload = {"task": self.name, "params": _jsonable(params), "v": GENERATOR_VERSION}
        if self.seeded:
            payload["seed"] = int(seed)
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return f"{self.name}_{digest[:16]}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Adds ``task`` to the registry (names must be unique)."""
    if task.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {task.kind!r}")
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """The registered :class:`Task` called ``name``; unknown names raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {tasks()}")
    return _REGISTRY[name]


def distinct_ints(
    rng: np.random.Generator, num_rows: int, k: int, low: int, high: int
) -> np.ndarray:
    """``int64[num_rows, k]``: per row, ``k`` distinct integers drawn uniformly from [low, high).

    Vectorised: rejection of rows with repeats when ``k`` is small against the range, otherwise
    the ``k`` smallest of per-row uniform keys (a random permutation prefix), in row chunks.
    """
    m = high - low
    if k > m:
        raise ValueError(f"cannot draw {k} distinct values from a range of {m}")
    if k * k <= m // 4:
        out = rng.integers(low, high, size=(num_rows, k))
        while True:
            s = np.sort(out, axis=1)
            bad = np.nonzero(np.any(s[:, 1:] == s[:, :-1], axis=1))[0]
            if bad.size == 0:
                return out
            out[bad] = rng.integers(low, high, size=(bad.size, k))
    out = np.empty((num_rows, k), np.int64)
    rows = max(1, (1 << 22) // m)
    for start in range(0, num_rows, rows):
        u = rng.random((min(rows, num_rows - start), m))
        idx = np.argpartition(u, k - 1, axis=1)[:, :k] if k < m else np.arange(m)[None]
        idx = np.broadcast_to(idx, (len(u), k))
        # order the chosen values by their keys: a uniformly random order
        idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(u, idx, 1), 1), 1)
        out[start : start + len(u)] = idx + low
    return out
