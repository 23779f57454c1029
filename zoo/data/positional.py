"""Algorithmic tasks of the positional-attention paper (Back de Luca et al., ICML'25,
``opallab/positional_attention``), with its out-of-distribution value-range splits.

Each example is ``n`` real values plus ``scratch`` scratch nodes (input 0, excluded from the
loss). Targets per position (``i`` = 0-based position, ``x[:i+1]`` the prefix):

* ``sum``: prefix sum ``x_0 + ... + x_i``;
* ``min``: prefix minimum;
* ``median``: prefix median (midpoint of the two middle values for even prefix lengths);
* ``sort``: the values sorted ascending (not a prefix task);
* ``max_subarray``: the largest sum of a non-empty contiguous subarray of the prefix.

Values (the paper's "scale" protocol): each example draws a sub-interval ``[a, b]`` of the
sampling range (two uniform endpoints, sorted) and then ``n`` values ``U[a, b]``.

* ``train`` and ``test`` (c = 1): range ``[-R, R]`` with ``R = base_range`` (2 in the paper).
* ``test_c{c}`` for ``c = 2 .. max_scale``: range ``[-cR, cR]``, rejecting (and redrawing)
  sub-intervals that lie entirely inside ``[-R, R]``, so no test interval is a training one.

Examples: ``{"inputs": float32[n+s, 1], "targets": float32[n+s, 1], "mask": float32[n+s],
"interval": float32[2]}`` (``interval`` = the example's ``[a, b]``, metadata). Paper setup:
n = 8, one scratch node, 30k training samples, 1000 per test split, c = 1..10, MSE.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.data import registry as R

OPS = ("sum", "min", "median", "sort", "max_subarray")


def positional_targets(x: np.ndarray, op: str) -> np.ndarray:
    """Targets of ``op`` for values ``x`` of shape ``[B, n]`` (float64 result, same shape)."""
    x = np.asarray(x, np.float64)
    if op == "sum":
        return np.cumsum(x, axis=1)
    if op == "min":
        return np.minimum.accumulate(x, axis=1)
    if op == "sort":
        return np.sort(x, axis=1)
    if op == "median":
        return np.stack([np.median(x[:, : i + 1], axis=1) for i in range(x.shape[1])], axis=1)
    if op == "max_subarray":  # Kadane's recurrence, vectorised over the batch
        out = np.empty_like(x)
        cur = best = x[:, 0]
        out[:, 0] = best
        for i in range(1, x.shape[1]):
            cur = np.maximum(x[:, i], cur + x[:, i])
            best = np.maximum(best, cur)
            out[:, i] = best
        return out
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def sample_intervals(
    rng: np.random.Generator,
    num: int,
    low: float,
    high: float,
    reject: tuple[float, float] | None = None,
) -> np.ndarray:
    """``float64[num, 2]`` sub-intervals ``[a, b]`` of ``[low, high]`` (sorted uniform endpoints),
    redrawing any lying entirely inside ``reject`` (inclusive), as the paper's data.py does."""
    ab = np.sort(rng.uniform(low, high, size=(num, 2)), axis=1)
    if reject is not None:
        if reject[0] <= low and high <= reject[1]:
            raise ValueError(f"reject range {reject} covers the whole range [{low}, {high}]")
        while True:
            bad = np.nonzero((ab[:, 0] >= reject[0]) & (ab[:, 1] <= reject[1]))[0]
            if bad.size == 0:
                break
            ab[bad] = np.sort(rng.uniform(low, high, size=(bad.size, 2)), axis=1)
    return ab


def positional_task(
    num_examples: int,
    *,
    seed: int | np.random.Generator,
    op: str = "sum",
    n: int = 8,
    scratch: int = 1,
    value_range: float = 2.0,
    reject_range: float | None = None,
) -> dict[str, np.ndarray]:
    """Generates one positional-attention task (see the module docstring).

    Args:
      num_examples: number of examples ``B``.
      seed: int seed or numpy Generator.
      op: one of ``sum, min, median, sort, max_subarray``.
      n: number of values per example.
      scratch: scratch nodes appended (input 0, target 0, mask 0).
      value_range: sub-intervals are drawn inside ``[-value_range, value_range]``.
      reject_range: if given, sub-intervals inside ``[-reject_range, reject_range]`` are
        redrawn (the OOD test splits use the training range here).

    Returns:
      ``{"inputs": float32[B, n+s, 1], "targets": float32[B, n+s, 1], "mask": float32[B, n+s],
      "interval": float32[B, 2]}``.
    """
    op, n, scratch, value_range, reject_range = _check_args(
        op, n, scratch, value_range, reject_range
    )
    b = R.check_int("num_examples", num_examples, low=0)
    rng = R.as_rng(seed)
    reject = None if reject_range is None else (-reject_range, reject_range)
    ab = sample_intervals(rng, b, -value_range, value_range, reject)
    x = ab[:, :1] + (ab[:, 1:] - ab[:, :1]) * rng.random((b, n))
    y = positional_targets(x, op)
    pad = np.zeros((b, scratch))
    mask = np.concatenate([np.ones((b, n)), pad], axis=1)
    return {
        "inputs": np.concatenate([x, pad], axis=1)[..., None].astype(np.float32),
        "targets": np.concatenate([y, pad], axis=1)[..., None].astype(np.float32),
        "mask": mask.astype(np.float32),
        "interval": ab.astype(np.float32),
    }


def _check_args(op: Any, n: Any, scratch: Any, value_range: Any, reject_range: Any):
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    n = R.check_int("n", n, low=1)
    scratch = R.check_int("scratch", scratch, low=0)
    value_range = R.check_float("value_range", value_range, low=0.0, strict=True)
    if reject_range is not None:
        reject_range = R.check_float("reject_range", reject_range, low=0.0)
        if reject_range >= value_range:
            raise ValueError(
                f"reject_range={reject_range} must be < value_range={value_range}: "
                "every sub-interval would be rejected"
            )
    return op, n, scratch, value_range, reject_range


def _make_task(op: str) -> R.Task:
    name = f"positional_{op}"

    def check(p: dict[str, Any]) -> dict[str, Any]:
        p["base_range"] = R.check_float("base_range", p["base_range"], low=0.0, strict=True)
        _, p["n"], p["scratch"], _, _ = _check_args(op, p["n"], p["scratch"], p["base_range"], None)
        p["max_scale"] = R.check_int("max_scale", p["max_scale"], low=1)
        p["num_train"] = R.check_int("num_train", p["num_train"], low=1)
        p["num_test"] = R.check_int("num_test", p["num_test"], low=1)
        return p

    def splits(p: dict[str, Any]) -> dict[str, R.Split]:
        kw = {"op": op, "n": p["n"], "scratch": p["scratch"], "value_range": p["base_range"]}
        out = {"train": R.Split(p["num_train"], kw), "test": R.Split(p["num_test"], kw)}
        for c in range(2, p["max_scale"] + 1):
            out[f"test_c{c}"] = R.Split(
                p["num_test"],
                {**kw, "value_range": c * p["base_range"], "reject_range": p["base_range"]},
            )
        return out

    return R.Task(
        name=name,
        kind="regression",
        description=f"Positional-attention task {op!r}.\n\n{__doc__}",
        params={
            "n": R.Param(8, "values per example"),
            "scratch": R.Param(1, "scratch nodes (masked out of the loss)"),
            "base_range": R.Param(2.0, "training range [-R, R]"),
            "max_scale": R.Param(10, "test splits test_c2 .. test_c{max_scale}: [-cR, cR]"),
            "num_train": R.Param(30_000, "training examples"),
            "num_test": R.Param(1_000, "examples per test split"),
        },
        generate=positional_task,
        check=check,
        split_fn=splits,
        spec_fn=lambda p: R.regression_spec(
            name,
            seq_len=p["n"] + p["scratch"],
            input_dim=1,
            output_dim=1,
            extra={"interval": ((2,), "float32")},
        ),
    )


TASKS = {op: R.register(_make_task(op)) for op in OPS}
