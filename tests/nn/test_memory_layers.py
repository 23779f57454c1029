"""TitansMemory / MirasMemory layers: shapes, gradients, decode == forward and prefill + decode ==
forward for every chunk size (the transform's own state and step: chunk-start weights and token
count), chunked forward == naive reference, causality, registered mixers inside DecoderLM,
logical axis names, eval_shape, ValueErrors.

Tolerances: decode vs forward 1e-4 abs + 1e-4 rel (the output projection and RMS norm amplify
float32 differences of the memory; values O(1)); prefill vs forward 1e-5 abs + 1e-5 rel on the
memory path without output norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo.attention as za
import zoo.nn as zn
from tests.helpers import assert_close, tree_assert_close
from zoo.models import DecoderLM
from zoo.nn.memory import MemoryLayerState, MirasMemory, TitansMemory

B, T, E, H = 2, 11, 16, 2


def _x(seed: int = 0, t: int = T) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, t, E), jnp.float32)


fwd = nnx.jit(lambda m, x: m(x))


@nnx.jit
def _step(layer, x_t, state, position):
    return layer.decode_step(x_t, state, position)


def _decode_all(layer, x):
    state = layer.init_state(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y, state = _step(layer, x[:, t], state, jnp.int32(t))
        ys.append(y)
    return jnp.stack(ys, axis=1)


def _names(v):
    return v.get_metadata()["out_sharding"]


# ----------------------------------------------------------------------------- Titans


def test_titans_shapes_and_finite_gradients():
    m = TitansMemory(E, H, depth=2, chunk_size=4, num_persistent=2, rngs=nnx.Rngs(0))
    assert len(m.memory_weights) == 2
    x = _x(t=8)
    y = fwd(m, x)
    assert y.shape == (B, 8, E) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(m)
    flat = dict(nnx.to_flat_state(nnx.state(grads, nnx.Param)))
    for path, g in flat.items():
        assert bool(jnp.all(jnp.isfinite(g.get_value()))), path
    # the learned initial memory, the gates and the persistent tokens all get gradients
    for key in [("memory_weights", 0), ("theta_proj",), ("eta_bias",), ("alpha_proj",), ("persistent",)]:
        assert float(jnp.abs(flat[key].get_value()).max()) > 0, key


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(chunk_size=1, depth=2, conv=4, num_persistent=3), id="c1-mlp-conv-persistent",
                     marks=pytest.mark.slow),
        pytest.param(dict(chunk_size=1, depth=1, conv=0, output_norm=False, output_gate=False), id="c1-matrix"),
        pytest.param(dict(chunk_size=4, depth=2, conv=2, num_persistent=2, residual=True), id="c4-chunk-frozen"),
    ],
)
def test_titans_decode_matches_forward(kw):
    """decode_step token by token == full forward (float32): decoding is the transform's step, whose
    state keeps the chunk-start weights, so it equals the chunked forward for C = 1 and C > 1."""
    m = TitansMemory(E, H, rngs=nnx.Rngs(1), **kw)
    x = _x(1)
    assert_close(_decode_all(m, x), fwd(m, x), atol=1e-4, rtol=1e-4, what=f"titans {kw}")


def test_titans_chunked_forward_equals_frozen_gradient_reference():
    """The layer's chunked forward == the naive token-by-token recurrence with gradients frozen
    at chunk starts (titans_naive) on the layer's own q/k/v/gates, and differs from C = 1."""
    m = TitansMemory(E, H, chunk_size=4, depth=2, num_persistent=2, rngs=nnx.Rngs(2))
    x = _x(2)
    _, st = m.initial(B)
    f, _ = m.project(x, st.conv)
    y = za.titans_naive(f["q"], f["k"], f["v"], **m.gates(x), chunk_size=4, initial_state=st.memory, causal=True)
    assert_close(fwd(m, x), m.output(x, y), atol=1e-5, rtol=1e-4, what="chunked vs naive(C=4)")
    y1 = za.titans_naive(f["q"], f["k"], f["v"], **m.gates(x), chunk_size=1, initial_state=st.memory, causal=True)
    assert float(jnp.abs(m.output(x, y1) - fwd(m, x)).max()) > 1e-6  # C = 4 is not the C = 1 recurrence


def test_titans_causal():
    m = TitansMemory(E, H, chunk_size=3, conv=3, num_persistent=1, rngs=nnx.Rngs(3))
    x = _x(3)
    j = 6
    x2 = x.at[:, j].add(1.0)
    y, y2 = fwd(m, x), fwd(m, x2)
    assert_close(y2[:, :j], y[:, :j], atol=1e-6, what="outputs before the perturbed token")
    assert float(jnp.abs(y2[:, j:] - y[:, j:]).max()) > 1e-4


def test_titans_persistent_tokens_are_a_first_segment():
    """Persistent tokens are read first: the state after them == the stream over P alone, with
    the token count reset to 0 (chunks restart at the first token of the sequence)."""
    m = TitansMemory(E, H, chunk_size=2, num_persistent=3, rngs=nnx.Rngs(4))
    out_p, st = m.initial(B)
    assert out_p.shape == (1, 3, E)
    y_ref, st_ref = m.stream(m.persistent[...][None], m._empty(1))
    assert_close(out_p, y_ref, atol=1e-6, what="prefix outputs")
    grow = lambda a: jnp.broadcast_to(a, (B,) + a.shape[1:])
    mem, ref = st.memory, st_ref.memory
    arrays = lambda st: (st.weights, st.momentum, st.frozen)
    tree_assert_close(arrays(mem), jax.tree.map(grow, arrays(ref)), atol=1e-6, what="state after P")
    assert int(ref.count) == 3 and int(mem.count) == 0
    # and they matter: the same layer without them gives another output
    y = fwd(m, _x(4))
    m.persistent[...] = m.persistent[...] + 1.0
    assert float(jnp.abs(fwd(m, _x(4)) - y).max()) > 1e-5


_prefill = nnx.jit(lambda layer, x, state, position: layer.prefill(x, state, position))


def _prefill_then_decode(layer, x, n, traced):
    """init_state, prefill of x[:, :n] at position 0, then decode_step over the rest; and a second
    prefill of x[:, n:] at position n from the state after the first."""
    st0 = layer.init_state(x.shape[0])
    pre = _prefill if traced else (lambda m, x, s, p: m.prefill(x, s, p))
    y1, st1 = pre(layer, x[:, :n], st0, 0)
    ys = [y1]
    st = st1
    for t in range(n, x.shape[1]):
        y, st = _step(layer, x[:, t], st, jnp.int32(t))
        ys.append(y[:, None])
    y2, st2 = pre(layer, x[:, n:], st1, n)
    return jnp.concatenate(ys, axis=1), jnp.concatenate([y1, y2], axis=1), st, st2


@pytest.mark.parametrize("chunk", [1, pytest.param(3, marks=pytest.mark.slow), 4])
def test_titans_prefill_then_decode_equals_forward(chunk):
    """Regression (issue 10): prefill(first 5 tokens: ends inside a chunk for C = 3, 4; T = 11 is
    not a multiple of C) + decode_step(rest) == prefill + prefill(rest, position=5) == forward,
    eager (concrete position) and under jit (traced state); the decoding state is the
    transform's MemoryState (frozen chunk-start weights and count, no copy in the layer)."""
    m = TitansMemory(E, H, chunk_size=chunk, depth=2, conv=2, num_persistent=2, output_norm=False,
                     rngs=nnx.Rngs(8))
    x = _x(8)
    y = fwd(m, x)
    for traced in (False, True) if chunk > 1 else (True,):
        y_dec, y_pre, st_dec, st_pre = _prefill_then_decode(m, x, 5, traced)
        assert_close(y_dec, y, atol=1e-5, rtol=1e-5, what=f"prefill + decode C={chunk} traced={traced}")
        assert_close(y_pre, y, atol=1e-5, rtol=1e-5, what=f"prefill + prefill C={chunk} traced={traced}")
        tree_assert_close(st_pre, st_dec, atol=1e-5, rtol=1e-5, what=f"states C={chunk} traced={traced}")
    assert isinstance(st_dec.memory, za.MemoryState) and MemoryLayerState._fields == ("memory", "conv")
    assert int(st_dec.memory.count) == T


# ----------------------------------------------------------------------------- Miras


@pytest.mark.parametrize("preset", ["moneta", "yaad", "memora"])
@pytest.mark.parametrize("chunk", [1, pytest.param(3, marks=pytest.mark.slow)])  # CI time: chunk 3 with -m slow
def test_miras_presets_decode_matches_forward(preset, chunk):
    m = MirasMemory(E, H, preset=preset, chunk_size=chunk, num_persistent=2, conv=2, rngs=nnx.Rngs(5))
    x = _x(5, t=8)
    y = fwd(m, x)
    assert y.shape == (B, 8, E) and bool(jnp.all(jnp.isfinite(y)))
    assert_close(_decode_all(m, x), y, atol=1e-4, rtol=1e-4, what=f"{preset} C={chunk}")
    if chunk > 1:  # prefill of 4 tokens ends inside a chunk of 3
        y_dec, y_pre, _, _ = _prefill_then_decode(m, x, 4, traced=True)
        assert_close(y_dec, y, atol=1e-4, rtol=1e-4, what=f"{preset} C={chunk} prefill + decode")
        assert_close(y_pre, y, atol=1e-4, rtol=1e-4, what=f"{preset} C={chunk} prefill + prefill")


def test_miras_choices_and_gates():
    m = MirasMemory(E, H, preset="yaad", rngs=nnx.Rngs(0))
    assert (m.bias, m.retention, m.algorithm) == ("huber", "l2", "gd")
    assert m.gate_names == ("theta", "alpha", "delta")
    delta = m.gates(_x())["delta"]
    assert_close(delta, jnp.ones_like(delta), atol=5.0)  # positive, ~1 at init
    assert bool(jnp.all(delta > 0))
    m = MirasMemory(E, H, preset="memora", algorithm="momentum", rngs=nnx.Rngs(0))
    assert (m.bias, m.retention, m.algorithm) == ("l2", "kl", "momentum")
    assert m.gate_names == ("theta", "eta", "alpha")
    m = MirasMemory(E, H, bias="dot", retention="none", algorithm="momentum", chunk_size=2, depth=1,
                    rngs=nnx.Rngs(6))
    assert m.gate_names == ("theta", "eta")
    x = _x(6, t=6)
    assert_close(_decode_all(m, x), fwd(m, x), atol=1e-4, rtol=1e-4, what="dot/none/momentum")


def test_miras_l2_momentum_equals_titans():
    """Miras (l2 bias, l2 retention, momentum) with the same parameters is the Titans layer."""
    kw = dict(chunk_size=3, depth=2, num_persistent=1, rngs=nnx.Rngs(7))
    t = TitansMemory(E, H, **kw)
    mi = MirasMemory(E, H, bias="l2", retention="l2", algorithm="momentum", **{**kw, "rngs": nnx.Rngs(7)})
    nnx.update(mi, nnx.state(t, nnx.Param))
    x = _x(7)
    assert_close(fwd(mi, x), fwd(t, x), atol=1e-5, rtol=1e-5, what="miras(l2,l2,momentum) vs titans")


# ----------------------------------------------------------------------------- mixers, metadata, errors


def test_registered_mixers_decode_in_decoder_lm():
    for name in ("titans_memory", "miras_memory"):
        assert name in zn.mixer_names()
    mixers = [{"module": "titans_memory", "chunk_size": 2},
              {"module": "miras_memory", "preset": "memora", "chunk_size": 3}]
    m = DecoderLM(37, E, 2, H, mixers=mixers, max_len=16, rngs=nnx.Rngs(0))
    assert isinstance(m.blocks[0].mixer, TitansMemory) and m.blocks[1].mixer.preset == "memora"
    toks = jax.random.randint(jax.random.key(0), (B, 7), 0, 37, dtype=jnp.int32)
    step = nnx.jit(lambda m, tok, st: m.decode_step(tok, st))
    st = m.init_state(B, 7)
    assert isinstance(st.layers[0]["mixer"], MemoryLayerState)
    out = []
    for t in range(7):
        logits, st = step(m, toks[:, t], st)
        out.append(logits)
    assert_close(jnp.stack(out, 1), nnx.jit(lambda m, x: m(x))(m, toks), atol=1e-4, rtol=1e-4, what="LM decode")


def test_logical_axis_names_and_eval_shape():
    m = MirasMemory(E, H, preset="yaad", num_persistent=2, rngs=nnx.Rngs(0))
    for path, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        names = p.get_metadata().get("out_sharding")
        assert names is not None and len(names) == p.get_value().ndim, (path, names)
    assert _names(m.wq) == ("embed", "heads", "head_dim")
    assert _names(m.wo) == ("heads", "head_dim", "embed")
    assert _names(m.conv_k) == (None, "heads", "head_dim")
    assert _names(m.theta_proj) == ("embed", "heads")
    assert _names(m.delta_bias) == ("heads",)
    assert _names(m.memory_weights[1]) == ("heads", None, None)
    assert _names(m.persistent) == (None, "embed")
    assert _names(m.out_norm.scale) == ("head_dim",)
    abstract = nnx.eval_shape(lambda: TitansMemory(64, 4, depth=3, num_persistent=4, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert [w.shape for w in abstract.memory_weights] == [(4, 16, 64), (4, 64, 64), (4, 64, 16)]


def test_matrix_memory_starts_at_zero():
    m = TitansMemory(E, H, depth=1, rngs=nnx.Rngs(0))
    assert m.memory_weights[0][...].shape == (H, E // H, E // H)
    np.testing.assert_array_equal(np.asarray(m.memory_weights[0][...]), 0.0)


@pytest.mark.parametrize(
    "kw, arg",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"depth": 0}, "depth"),
        ({"conv": -1}, "conv"),
        ({"num_persistent": -1}, "num_persistent"),
        ({"max_lr": 0.0}, "max_lr"),
        ({"gate_init": {"beta": 1.0}}, "gate_init"),
        ({"activation": "swish"}, "activation"),
        ({"num_heads": 3}, "num_heads"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_bad_config_raises(kw, arg):
    kw = {"num_heads": H, **kw}
    with pytest.raises(ValueError, match=arg):
        TitansMemory(E, kw.pop("num_heads"), rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize(
    "kw, arg",
    [({"preset": "titans"}, "preset"), ({"bias": "l3"}, "bias"), ({"retention": "l1"}, "retention"),
     ({"algorithm": "adam"}, "algorithm"), ({"preset": "moneta", "q_order": 0.5}, "q_order")],
)
def test_miras_bad_config_raises(kw, arg):
    with pytest.raises(ValueError, match=arg):
        MirasMemory(E, H, rngs=nnx.Rngs(0), **kw)


def test_bad_inputs_raise():
    m = TitansMemory(E, H, rngs=nnx.Rngs(0))
    st = m.init_state(B)
    with pytest.raises(ValueError, match="causal"):
        m(_x(), causal=False)
    with pytest.raises(ValueError, match="x must be"):
        m(jnp.zeros((B, T, E + 1)))
    with pytest.raises(ValueError, match="x must be a floating"):  # was a TypeError
        m(jnp.zeros((B, T, E), jnp.int32))
    with pytest.raises(ValueError, match="x must hold at least one token"):
        m(jnp.zeros((B, 0, E)))
    with pytest.raises(ValueError, match="x_t must be"):
        m.decode_step(jnp.zeros((B, 1, E)), st, 0)
    with pytest.raises(ValueError, match="x_t must be a floating"):
        m.decode_step(jnp.zeros((B, E), jnp.int32), st, 0)
    with pytest.raises(ValueError, match="x must be a floating"):
        m.prefill(jnp.zeros((B, 3, E), jnp.int32), st)
    for position in (-1, 0.5, jnp.zeros((B + 1,), jnp.int32)):
        with pytest.raises(ValueError, match="position"):
            m.prefill(_x(t=3), st, position)


def test_numpy_integer_config():
    m = TitansMemory(np.int64(E), np.int64(H), chunk_size=np.int64(3), depth=np.int32(1), rngs=nnx.Rngs(0))
    assert type(m.chunk_size) is int and m.chunk_size == 3
