"""The kernel path of zoo.attention.linear: mesh-aware dispatch (shard_map over the active mesh,
from the logical-axis rules) and the implementation resolver reaching the kernel from a model.

All on the 8 simulated CPU devices (tests/conftest.py) in Pallas interpret mode, tiny shapes.
Tolerances (float32): a sharded call vs one device computes the same per-(batch, head) programs,
so outputs agree to 1e-5 relative to the largest magnitude; a train step on a mesh reduces the
loss and gradients across shards in another order: 1e-5 abs + 1e-4 rel on losses and parameters
after plain SGD steps (no Adam normalisation that would amplify rounding in tiny gradients).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zoo.attention as za
from kernels_pallas import linear_attention as kernel
from tests.helpers import assert_close, rand
from zoo import sharding, train_lib
from zoo.attention import dispatch, registry

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 simulated CPU devices")


def _shard_map_eqns(jaxpr) -> list:
    """Every shard_map equation in a (closed) jaxpr, nested ones included."""
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "shard_map":
                found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return found


def test_logical_to_mesh_rules_and_fallback():
    mesh = sharding.make_mesh(2, 2, 2)
    rules = sharding.DEFAULT_RULES
    assert dispatch.logical_to_mesh({"batch": 4, "heads": 2}, mesh, rules) == {
        "batch": ("data", "fsdp"), "heads": ("tensor",)}
    # batch 2: fsdp no longer divides it (replicated over fsdp); 3 heads: replicated over tensor.
    assert dispatch.logical_to_mesh({"batch": 2, "heads": 3}, mesh, rules) == {"batch": ("data",), "heads": ()}
    # An axis is used once; names absent from the rules or the mesh are replicated.
    assert dispatch.logical_to_mesh({"batch": 8, "heads": 2}, mesh, (("batch", ("data", "tensor")),
                                                                    ("heads", ("tensor", "model")))) == {
        "batch": ("data", "tensor"), "heads": ()}


def _linear_inputs(b, t, h, d, seed=0):
    q, k, v = (rand(seed + i, b, t, h, d) for i in range(3))
    return q, k, v, za.alibi_slopes(h)


@pytest.mark.parametrize("b,h", [(4, 2), (2, 3)])
def test_linear_pallas_in_mesh_equals_one_device(b, h):
    """(a) linear(impl="pallas") under jax.set_mesh on a (data, fsdp, tensor) = (2, 2, 2) mesh
    equals the call without a mesh (values, final state and input gradients), and the traced
    program holds the kernel inside a shard_map with batch over (data, fsdp) and heads over
    tensor (or replicated where the axis does not divide: b=2, h=3)."""
    q, k, v, dec = _linear_inputs(b, 12, h, 4)
    w = rand(7, b, 12, h, 4)

    def f(q, k, v):
        y, st = za.linear(q, k, v, causal=True, decay=dec, impl="pallas", chunk_size=8, return_state=True)
        return y, st.S, jnp.sum(y * w)

    def with_grads(q, k, v):
        (y, s, _), pull = jax.vjp(f, q, k, v)
        return y, s, pull((jnp.zeros_like(y), jnp.zeros_like(s), jnp.ones(())))

    single = jax.jit(with_grads)(q, k, v)
    mesh = sharding.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P(("data", "fsdp") if b % 4 == 0 else "data", None, None, None))
        args = [jax.device_put(x, spec) for x in (q, k, v)]
        meshed = jax.jit(with_grads)(*args)
        eqns = _shard_map_eqns(jax.jit(f).trace(*args).jaxpr)
    assert len(eqns) == 1, "the kernel call must sit inside one shard_map"
    in_specs = eqns[0].params["in_specs"]
    batch = ("data", "fsdp") if b == 4 else "data"
    assert in_specs[0] == P(batch, None, "tensor" if h % 2 == 0 else None, None), in_specs
    assert "pallas_call" in str(eqns[0].params["jaxpr"])
    for name, a, e in zip(("y", "S", "dq", "dk", "dv"), jax.tree.leaves(meshed), jax.tree.leaves(single)):
        assert_close(a, e, atol=1e-5 * float(jnp.abs(e).max()), what=name)


def test_no_mesh_no_shard_map():
    q, k, v, dec = _linear_inputs(2, 8, 2, 4)
    jaxpr = jax.jit(lambda q, k, v: za.linear(q, k, v, causal=True, decay=dec, impl="pallas")).trace(q, k, v).jaxpr
    assert not _shard_map_eqns(jaxpr)


# ----------------------------------------------------------------------------- a Trainer on a mesh


VOCAB, T, BATCH, HEADS = 16, 8, 4, 2
MIXER = {"transform": "linear", "feature_map": "identity", "normalize": False,
         "decay": np.asarray(za.alibi_slopes(HEADS)), "impl": "pallas", "chunk_size": 4}


def _train(mesh_shape: tuple[int, int, int], steps: int = 2):
    """Builds a one-layer DecoderLM with the kernel mixer and runs ``steps`` SGD steps of the
    Trainer on a (data, fsdp, tensor) mesh; returns the losses, the final params and the train
    step's jaxpr. ``Trainer.jitted`` runs the steps under jax.set_mesh (what the dispatch reads)."""
    from zoo.models import DecoderLM

    mesh = sharding.make_mesh(*mesh_shape)
    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = DecoderLM(VOCAB, 8, 1, HEADS, mixers=MIXER, mlp=None, max_len=T, rngs=nnx.Rngs(0))
    trainer = train_lib.Trainer(nnx.graphdef(model), optax.sgd(0.5), "lm_tokens", mesh, rules)
    state = trainer.init_state(model)
    train_step, _ = trainer.jitted()
    rng = np.random.default_rng(0)
    losses, jaxpr = [], None
    for _ in range(steps):  # the Trainer's jitted steps enter the mesh themselves
        tokens = rng.integers(0, VOCAB, (BATCH, T + 1)).astype(np.int32)
        batch = sharding.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh, rules)
        if jaxpr is None:
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                jaxpr = jax.jit(trainer.train_step).trace(state, batch).jaxpr
        state, m = train_step(state, batch)
        losses.append(float(m["loss_sum"]) / float(m["count"]))
    return losses, [np.asarray(x) for x in jax.tree.leaves(state["params"])], jaxpr


def test_trainer_on_mesh_equals_one_device():
    """(b) Trainer steps with the Pallas kernel mixer on a (2, 2, 2) mesh give the losses and
    parameters of one device, and the train step holds the kernel in a shard_map (forward and
    the backward kernels)."""
    seen = []
    real = dispatch.active_mesh

    def spy():
        mesh = real()
        seen.append(None if mesh is None else dict(mesh.shape))
        return mesh

    dispatch.active_mesh = spy
    try:
        l1, p1, j1 = _train((1, 1, 1))
        seen.clear()
        l8, p8, j8 = _train((2, 2, 2), steps=2)
    finally:
        dispatch.active_mesh = real
    # Traced by Trainer.jitted's own step (not only by the explicit trace above): the mesh is seen.
    assert seen and all(m == {"data": 2, "fsdp": 2, "tensor": 2} for m in seen), seen
    assert not _shard_map_eqns(j1)  # one device: the kernel is called directly
    eqns = _shard_map_eqns(j8)
    assert eqns and all("pallas_call" in str(e.params["jaxpr"]) for e in eqns)
    np.testing.assert_allclose(l8, l1, rtol=1e-4, atol=1e-5)
    for a, e in zip(p8, p1):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    assert not np.allclose(p1[0], _initial_params()[0])  # the steps did change the parameters


def _initial_params():
    from zoo.models import DecoderLM

    model = DecoderLM(VOCAB, 8, 1, HEADS, mixers=MIXER, mlp=None, max_len=T, rngs=nnx.Rngs(0))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# ----------------------------------------------------------------------------- auto reaches the kernel


def test_auto_reaches_kernel_in_decoder_lm(monkeypatch):
    """(c) With the platform seen as "gpu" and the kernel entry point replaced by a recording fake,
    a DecoderLM whose linear mixer has a stored constant decay (traced under jit) and impl="auto"
    calls the kernel; with learn_decay=True it does not (the chunked form is chosen)."""
    from zoo.models import DecoderLM

    calls = []

    def fake_kernel(q, k, v, rate, s0, *, backend, interpret, chunk_size=None, **kw):
        calls.append(dict(backend=backend, interpret=interpret, traced=isinstance(rate, jax.core.Tracer),
                          rate_shape=None if rate is None else rate.shape))
        return kernel.causal_linear_attention_reference(q, k, v, rate, initial_state=s0)

    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, T)), jnp.int32)
    mixer = {"transform": "linear", "decay": za.alibi_slopes(HEADS)}
    model = DecoderLM(VOCAB, 8, 1, HEADS, mixers=mixer, mlp=None, max_len=T, rngs=nnx.Rngs(0))
    want = nnx.jit(lambda m, x: m(x))(model, tokens)  # CPU: auto -> scan

    monkeypatch.setattr(registry, "platform", lambda: "gpu")
    monkeypatch.setattr(kernel, "causal_linear_attention_kernel", fake_kernel)
    got = nnx.jit(lambda m, x: m(x))(model, tokens)
    assert calls == [dict(backend="gpu", interpret=False, traced=True, rate_shape=(HEADS,))]
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="kernel path vs scan")

    calls.clear()
    learned = DecoderLM(VOCAB, 8, 1, HEADS, mixers={**mixer, "learn_decay": True}, mlp=None, max_len=T,
                        rngs=nnx.Rngs(0))
    nnx.jit(lambda m, x: m(x))(learned, tokens)
    assert calls == []
