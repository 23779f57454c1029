"""The registry record and the implementation resolver (issue 10 regressions at the transform level)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.attention as za
from tests.helpers import assert_close, rand
from zoo.attention import registry

B, T, H, D = 2, 6, 2, 4


def _qkv(seed=0, t=T):
    return tuple(jnp.asarray(rand(seed + i, B, t, H, D)) for i in range(3))


@pytest.mark.parametrize("name", ["based", "nalaformer"])
def test_every_form_honours_the_registered_defaults(name):
    """Defect 1: init_state/step and the reference used plain elu linear attention."""
    t = za.get(name)
    q, k, v = _qkv()
    y = t(q, k, v, causal=True)
    # The expected values come from the generic linear transform with the paper's options spelt out.
    spelt = {"based": {"feature_map": "taylor"}, "nalaformer": {"feature_map": "nalaformer", "normalize": "mean"}}[name]
    expected = za.linear_naive(q, k, v, causal=True, **spelt)
    assert_close(y, expected, atol=2e-5, rtol=2e-4, what="parallel")
    assert_close(t.reference(q, k, v, causal=True), expected, atol=2e-5, rtol=2e-4, what="reference")
    st = t.init_state(B, H, D)
    ys = []
    for i in range(T):
        y_t, st = t.step(st, q[:, i], k[:, i], v[:, i])
        ys.append(y_t)
    assert_close(jnp.stack(ys, 1), expected, atol=2e-5, rtol=2e-4, what="init_state + step")


def test_integer_inputs_are_rejected():
    """Defect 3: softmax returned int32 after truncating integer inputs."""
    q, k, v = (x.astype(jnp.int32) for x in _qkv())
    for name in za.names():
        with pytest.raises(ValueError, match="floating"):
            za.get(name)(q, k, v, causal=True, **(za.get(name).example_options or (lambda h, d: {}))(H, D))


def test_shape_and_option_errors_name_the_argument():
    """Defect 5."""
    q, k, v = _qkv()
    for fn in (za.softmax, za.sigmoid, za.softplus):
        with pytest.raises(ValueError, match=r"q must have rank 4"):
            fn(q[0], k, v)
    with pytest.raises(ValueError, match=r"bias must broadcast to \[batch, heads, q_length, k_length\]"):
        za.softmax(q, k, v, bias=jnp.zeros((3, T)))
    for name in za.names():  # length 0: one behaviour for all
        ex = (za.get(name).example_options or (lambda h, d: {}))(H, D)
        with pytest.raises(ValueError, match="at least one token"):
            za.get(name)(q[:, :0], k[:, :0], v[:, :0], causal=True, **ex)
    y = za.sliding_window(q, k, v, causal=True, window=np.int64(3))
    assert_close(y, za.softmax(q, k, v, causal=True, window=3), atol=0)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        za.softmax(q, k, v, causal=True, window=0)
    with pytest.raises(ValueError, match="'windw'"):
        za.get("sliding_window").bind(windw=3)


def test_causal_rule():
    """Defect 6: every transform defaults to causal=False; causal-only ones raise."""
    q, k, v = _qkv()
    for name in za.names():
        t = za.get(name)
        ex = (t.example_options or (lambda h, d: {}))(H, D)
        if t.causal_only:
            with pytest.raises(ValueError, match="causal only"):
                t(q, k, v, **{k_: x for k_, x in ex.items() if k_ != "decay"})
        else:
            ex = {k_: x for k_, x in ex.items() if k_ not in ("decay", "window")}
            assert_close(t(q, k, v, **ex), t(q, k, v, causal=False, **ex), atol=0, what=name)


def test_uniform_decoding_api():
    """Defect 8: one init_state signature (max_len sizes a KV cache; no silent 8-slot buffer).
    (prefill + step == parallel for every name: the conformance suite.)"""
    for name in za.names():
        t = za.get(name)
        if not t.decodes:
            continue
        ex = (t.example_options or (lambda h, d: {}))(H, D)
        if t.cache == "kv":
            with pytest.raises(ValueError, match="max_len"):
                t.init_state(B, H, D)
        st = t.init_state(B, H, D, D, kv_heads=H, max_len=12, **ex)
        assert jax.tree_util.tree_leaves(st), name


def _family():
    calls = []

    def impl(name, platforms=("cpu", "gpu", "tpu"), interpret=False, refuse=None):
        sup = (lambda **o: refuse(o)) if refuse else registry._always
        return registry.Implementation(name, lambda: calls.append(name), platforms, interpret, sup)

    fam = "test_family"
    registry._IMPLS.pop(fam, None)
    registry.register_impl(fam, impl("xla"))
    registry.register_impl(fam, impl("kernel", ("gpu", "tpu"), interpret=True,
                                     refuse=lambda o: "per-token decay" if o.get("per_token") else None))
    registry.set_preference(fam, {"cpu": ("xla",), "gpu": ("kernel", "xla")})
    return fam


def test_resolver(caplog):
    fam = _family()
    assert registry.resolve(fam, "auto", on="cpu").name == "xla"
    with caplog.at_level(logging.INFO, logger="zoo.attention"):
        assert registry.resolve(fam, "auto", on="gpu").name == "kernel"
        assert registry.resolve(fam, "auto", on="gpu").name == "kernel"
    assert sum("-> 'kernel'" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert registry.resolve(fam, "auto", on="gpu", per_token=True).name == "xla"
    assert registry.resolve(fam, "kernel", on="cpu").name == "kernel"  # named: interpret mode
    assert registry.resolve(fam, ("kernel", "xla"), on="gpu", per_token=True).name == "xla"
    with pytest.raises(ValueError, match="kernel: per-token decay"):
        registry.resolve(fam, ("kernel",), on="gpu", per_token=True)
    with pytest.raises(ValueError, match="impl='fast' is not valid"):
        registry.resolve(fam, "fast")
    with pytest.raises(ValueError, match="impl must be"):
        registry.resolve(fam, 3)
    registry._IMPLS.pop(fam)
    registry._PREFERENCE.pop(fam)


def test_record_validation():
    with pytest.raises(ValueError, match="cache must be"):
        za.Transform("x", za.softmax, cache="ring")
    with pytest.raises(ValueError, match="decoding form needs"):
        za.Transform("x", za.softmax, step_fn=za.softmax_step)
    with pytest.raises(ValueError, match="takes no option 'windw'"):
        za.Transform("x", za.softmax, defaults={"windw": 2})
    with pytest.raises(ValueError, match="already registered"):
        za.register(za.get("softmax"))
    with pytest.raises(ValueError, match="no decoding form"):
        za.Transform("x", za.softmax).init_state(1, 1, 1)


def test_streaming_llm_sinks_through_the_registry():
    """Decode-only options (num_sink_tokens) pass the option check and reach prefill/step; one
    parallel prefill over a prompt longer than the cache equals StreamingLLM's visibility."""
    t, ns, cap, n = za.get("softmax"), 2, 6, 14
    q, k, v = _qkv(seed=7, t=n)
    j, i = np.arange(n)[None, :], np.arange(n)[:, None]
    vis = (j <= i) & ((i < cap) | (j < ns) | (j > i - (cap - ns)))  # written from the definition
    expected = za.softmax_naive(q, k, v, mask=vis[None, None])
    st = t.init_state(B, H, D, kv_heads=H, max_len=cap, num_sink_tokens=ns)
    y, st = t.prefill(st, q[:, :10], k[:, :10], v[:, :10], num_sink_tokens=ns)
    ys = [y]
    for s in range(10, n):
        y_t, st = t.step(st, q[:, s], k[:, s], v[:, s], num_sink_tokens=ns)
        ys.append(y_t[:, None])
    assert_close(jnp.concatenate(ys, 1), expected, atol=2e-5, rtol=2e-4)
    assert_close(t(q, k, v, causal=True, num_sink_tokens=ns), t(q, k, v, causal=True), atol=0)
