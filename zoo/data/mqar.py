"""Multi-query associative recall (MQAR), following the zoology generator.

Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models"
(ICLR'24), ``zoology/data/multiquery_ar.py``. Re-implemented (vectorised numpy), not copied.

Layout of one sequence of length ``T`` with ``kv`` key-value pairs and vocabulary ``V``::

    positions 0 .. 2kv-1 :  k_1 v_1 k_2 v_2 ... k_kv v_kv      (keys from [1, V/2), values from
                                                              [V/2, V), all distinct in a row)
    positions 2kv .. T-1 :  the query region. Each key appears once more, at offset 2*g_j from
                            the region start; the gap slots g_j (distinct, in [0, (T-2kv)/2))
                            are drawn with p(g) ∝ (g+1)^(a-1), a = power_a (0.01: mostly
                            early). Every other position holds filler: 0, or a uniform random
                            token in [0, V) if random_non_queries (zoology's default).

``targets`` is -100 everywhere except at each query position, where it is the value paired
with that key: the model, having read the query key, must predict the next token (the value).
The value itself never appears after the query in ``inputs``.

zoology asserts ``T % 2 == 0``, ``V > T`` and ``4 * kv <= T`` (``2*kv*passes + 2*kv <= T`` with
one pass); these are checked here and raise ValueError naming the parameter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.data import registry as R


def multiquery_ar(
    num_examples: int,
    *,
    seed: int | np.random.Generator,
    vocab_size: int = 256,
    seq_len: int = 64,
    num_kv_pairs: int = 4,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> dict[str, np.ndarray]:
    """Generates MQAR sequences (zoology's task; see the module docstring for the layout).

    Args:
      num_examples: number of sequences ``N``.
      seed: int seed or numpy Generator.
      vocab_size: ``V``; keys come from [1, V/2), values from [V/2, V). Must exceed seq_len.
      seq_len: ``T``, even, with ``4 * num_kv_pairs <= T``.
      num_kv_pairs: ``kv`` key-value pairs (and as many queries) per sequence.
      power_a: exponent ``a`` of the query-gap law p(g) ∝ g^(a-1) (1.0 gives uniform gaps).
      random_non_queries: fill non-query positions of the query region with uniform random
        tokens from [0, V) instead of 0.

    Returns:
      ``{"inputs": int32[N, T], "targets": int32[N, T]}``, targets -100 except at queries.
    """
    check_mqar(vocab_size, seq_len, num_kv_pairs, power_a)
    num_examples = R.check_int("num_examples", num_examples, low=0)
    rng = R.as_rng(seed)
    n, v, t, kv = num_examples, vocab_size, seq_len, num_kv_pairs
    half = v // 2
    keys = R.distinct_ints(rng, n, kv, 1, half)
    values = R.distinct_ints(rng, n, kv, half, v)

    space = (t - 2 * kv) // 2
    logp = (power_a - 1.0) * np.log(np.arange(1, space + 1))
    # Weighted sampling without replacement (same law as sequential np.random.choice with p):
    # the kv largest of log p + Gumbel noise.
    scores = logp[None, :] + rng.gumbel(size=(n, space))
    gaps = np.argpartition(-scores, kv - 1, axis=1)[:, :kv]

    inputs = np.zeros((n, t), np.int64)
    inputs[:, 0 : 2 * kv : 2] = keys
    inputs[:, 1 : 2 * kv : 2] = values
    qpos = 2 * kv + 2 * gaps
    np.put_along_axis(inputs, qpos, keys, axis=1)
    targets = np.full((n, t), R.IGNORE_INDEX, np.int64)
    np.put_along_axis(targets, qpos, values, axis=1)
    if random_non_queries:
        filler = rng.integers(0, v, size=(n, t))
        inputs = np.where(inputs == 0, filler, inputs)
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


def check_mqar(vocab_size: Any, seq_len: Any, num_kv_pairs: Any, power_a: Any) -> None:
    """zoology's asserts, as ValueErrors naming the parameter."""
    seq_len = R.check_int("seq_len", seq_len, low=4)
    num_kv_pairs = R.check_int("num_kv_pairs", num_kv_pairs, low=1)
    vocab_size = R.check_int("vocab_size", vocab_size, low=2)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (zoology asserts it), got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must be > seq_len (zoology), got {vocab_size} <= {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} needs 4 * num_kv_pairs <= seq_len={seq_len} (zoology)"
        )
    R.check_float("power_a", power_a, low=0.0, strict=True)


def _check(p: dict[str, Any]) -> dict[str, Any]:
    check_mqar(p["vocab_size"], p["seq_len"], p["num_kv_pairs"], p["power_a"])
    p["power_a"] = float(p["power_a"])
    p["random_non_queries"] = bool(p["random_non_queries"])
    p["num_train"] = R.check_int("num_train", p["num_train"], low=1)
    p["num_test"] = R.check_int("num_test", p["num_test"], low=1)
    p["test_lengths"] = R.check_int_tuple("test_lengths", p["test_lengths"])
    for length in p["test_lengths"]:
        if (length * p["num_kv_pairs"]) % p["seq_len"]:
            raise ValueError(
                f"test_lengths entry {length}: num_kv_pairs * length / seq_len must be an int "
                "(kv is scaled with the length)"
            )
        try:
            check_mqar(p["vocab_size"], length, length * p["num_kv_pairs"] // p["seq_len"], 1.0)
        except ValueError as e:
            raise ValueError(f"test_lengths entry {length}: {e}") from None
    return p


def _gen_kwargs(p: dict[str, Any], length: int) -> dict[str, Any]:
    return {
        "vocab_size": p["vocab_size"],
        "seq_len": length,
        "num_kv_pairs": p["num_kv_pairs"] * length // p["seq_len"],
        "power_a": p["power_a"],
        "random_non_queries": p["random_non_queries"],
    }


def _splits(p: dict[str, Any]) -> dict[str, R.Split]:
    out = {
        "train": R.Split(p["num_train"], _gen_kwargs(p, p["seq_len"])),
        "test": R.Split(p["num_test"], _gen_kwargs(p, p["seq_len"])),
    }
    for length in p["test_lengths"]:
        out[f"test_len{length}"] = R.Split(p["num_test"], _gen_kwargs(p, length))
    return out


TASK = R.register(
    R.Task(
        name="mqar",
        kind="lm_tokens",
        description=__doc__,
        params={
            "vocab_size": R.Param(256, "vocabulary V (> every sequence length)"),
            "seq_len": R.Param(64, "training sequence length T (even, >= 4 * num_kv_pairs)"),
            "num_kv_pairs": R.Param(4, "key-value pairs (= queries) per training sequence"),
            "power_a": R.Param(0.01, "query-gap law p(g) ∝ g^(a-1); 1.0 = uniform"),
            "random_non_queries": R.Param(True, "random filler tokens instead of 0"),
            "num_train": R.Param(10_000, "training examples (zoology Fig. 2: 100k)"),
            "num_test": R.Param(1_000, "examples per test split (zoology: 3k)"),
            "test_lengths": R.Param(
                (), "extra test splits test_len{L}, kv scaled by L/seq_len; needs V > L"
            ),
        },
        generate=multiquery_ar,
        check=_check,
        split_fn=_splits,
        spec_fn=lambda p: R.token_spec("mqar", seq_len=p["seq_len"], vocab_size=p["vocab_size"]),
    )
)
