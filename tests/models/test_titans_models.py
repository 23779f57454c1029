"""Titans MAC / MAG / MAL models: shapes, gradients, decode == forward, MAC's retrieve -> attend ->
write order and causality across segments, eval_shape, logical axes, bad configs; and a hybrid
DecoderLM (softmax, based, flow, titans_memory) that trains one optax step and generates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoo.attention as za
from tests.helpers import assert_close, tree_assert_close
from zoo.models import DecoderLM, TitansLM, generate
from zoo.models.titans import MemoryAsContext

V, D, L, H, B = 37, 16, 2, 2, 2
VARIANTS = ["mac", "mag", "mal"]


def tokens(t: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, t), 0, V, dtype=jnp.int32)


def model(variant: str, **kw) -> TitansLM:
    kw = {"segment_len": 4, "num_persistent": 2, "chunk_size": 2, "max_len": 32, **kw}
    if variant != "mac":
        kw["window"] = kw.pop("segment_len")
    return TitansLM(V, D, L, H, variant=variant, rngs=nnx.Rngs(0), **kw)


fwd = nnx.jit(lambda m, x: m(x))


step = nnx.jit(lambda m, tok, st: m.decode_step(tok, st))


def decode_all(m, toks, state=None):
    st = m.init_state(toks.shape[0], toks.shape[1]) if state is None else state
    out = []
    for t in range(toks.shape[1]):
        logits, st = step(m, toks[:, t], st)
        out.append(logits)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) for v in ("mac", "mag", "mal")])
def test_shapes_gradients_and_decode_matches_forward(variant):  # CI: test_lm's titans_mal and the layer tests
    """Logits [B, T, V] float32, finite gradients, and decode_step token by token == forward
    (T = 11: MAC runs 3 segments of 4, the last ragged; MAG/MAL slide a window of 4)."""
    m = model(variant)
    x = tokens(11)
    logits = fwd(m, x)
    assert logits.shape == (B, 11, V) and logits.dtype == jnp.float32
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(m)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert_close(decode_all(m, x), logits, atol=1e-4, rtol=1e-4, what=f"{variant}: decode vs forward")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) for v in ("mac", "mag", "mal")])
def test_prefill_equals_decode_steps(variant):
    """prefill == decode_step token by token (float32, 1e-4), and its state continues decoding:
    from position 0 (MAC: two whole segments of 4 in parallel and a ragged 2-token one), from
    position 2 inside a segment (MAC: 2 tokens one by one, then segments) and under jit, where
    the position is traced (MAC: token by token). MAG/MAL: the window-4 ring buffer wraps."""
    m = model(variant)
    x = tokens(11)
    decoded = decode_all(m, x)
    logits, st = m.prefill(x[:, :10], max_len=11)
    assert_close(logits, decoded[:, :10], atol=1e-4, rtol=1e-4, what=f"{variant}: prefill from 0")
    assert_close(decode_all(m, x[:, 10:], st), decoded[:, 10:], atol=1e-4, rtol=1e-4,
                 what=f"{variant}: decode after prefill")
    _, st2 = m.prefill(x[:, :2], max_len=11)
    logits, st = m.prefill(x[:, 2:10], st2)
    assert_close(logits, decoded[:, 2:10], atol=1e-4, rtol=1e-4, what=f"{variant}: prefill from 2")
    assert_close(decode_all(m, x[:, 10:], st), decoded[:, 10:], atol=1e-4, rtol=1e-4,
                 what=f"{variant}: decode after prefill from 2")
    logits, _ = nnx.jit(lambda m, a, s: m.prefill(a, s))(m, x[:, 2:], st2)
    assert_close(logits, decoded[:, 2:], atol=1e-4, rtol=1e-4, what=f"{variant}: prefill at a traced position")


def test_generate_titans_mac_greedy_matches_forward():
    m = model("mac", memory_depth=1)
    prompt = tokens(5, seed=3)
    out = generate(m, prompt, 3)
    assert out.shape == (B, 8)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(prompt))
    greedy = jnp.argmax(fwd(m, out[:, :-1])[:, 4:], axis=-1)
    np.testing.assert_array_equal(np.asarray(out[:, 5:]), np.asarray(greedy))


# ----------------------------------------------------------------------------- MAC order


def _mac(**kw) -> MemoryAsContext:
    kw = {"segment_len": 4, "num_persistent": 2, "chunk_size": 2, **kw}
    return MemoryAsContext(D, H, rngs=nnx.Rngs(1), **kw)


def _h(seed: int, t: int = 12) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32)


def test_mac_causality_across_segments():
    """A segment's output depends on earlier segments (only through the memory, since attention
    stays inside the segment) and never on later ones."""
    m = _mac()
    f = nnx.jit(lambda m, x: m(x))
    x = _h(0)
    y = f(m, x)
    later = x.at[:, 8:].add(1.0)  # change segment 2
    assert_close(f(m, later)[:, :8], y[:, :8], atol=1e-6, what="segments 0-1 after changing segment 2")
    inside = x.at[:, 6].add(1.0)  # change token 6 of segment 1
    y2 = f(m, inside)
    assert_close(y2[:, :6], y[:, :6], atol=1e-6, what="tokens before the change")
    earlier = x.at[:, :4].add(1.0)  # change segment 0: segment 1 sees it via the memory
    assert float(jnp.abs(f(m, earlier)[:, 4:8] - y[:, 4:8]).max()) > 1e-4


def test_mac_retrieve_attend_write_order():
    """Segment by segment: h is read from the memory left by the previous segments (M_{t-1}),
    the memory is written with the attention output y (not the input), and the forward equals
    chaining the segments."""
    m = _mac()
    x = _h(1)
    carry0 = m.initial_carry(B)
    mem0 = carry0[0]
    o0, carry1, aux0 = m.segment(x[:, :4], jnp.arange(4), carry0)
    # retrieve from M_0 (the initial weights)
    h0, _ = m.memory.retrieve(x[:, :4], m.memory.read_weights(mem0.memory), carry0[1])
    assert_close(aux0["h"], h0, atol=1e-6, what="h of segment 0")
    # write: the stored state == a direct call of the transform on y's keys/values
    y = aux0["y"]
    f, _ = m.memory.project(y, mem0.conv)
    mm = m.memory
    _, st = za.titans(f["q"], f["k"], f["v"], **mm.gates(y), causal=True, chunk_size=mm.chunk_size,
                      activation=mm.activation, residual=mm.residual, initial_state=mem0.memory, return_state=True)
    tree_assert_close(carry1[0].memory, st, atol=1e-6, what="memory after segment 0")
    fx, _ = m.memory.project(x[:, :4], mem0.conv)
    _, st_x = za.titans(fx["q"], fx["k"], fx["v"], **mm.gates(x[:, :4]), causal=True, chunk_size=mm.chunk_size,
                        initial_state=mem0.memory, return_state=True)
    assert float(jnp.abs(st_x.weights[0] - carry1[0].memory.weights[0]).max()) > 1e-6  # not written with x
    # segment 1 retrieves from M_1, the memory after segment 0
    o1, carry2, aux1 = m.segment(x[:, 4:8], jnp.arange(4, 8), carry1)
    h1, _ = m.memory.retrieve(x[:, 4:8], m.memory.read_weights(carry1[0].memory), carry1[1])
    assert_close(aux1["h"], h1, atol=1e-6, what="h of segment 1")
    o2, _, _ = m.segment(x[:, 8:], jnp.arange(8, 12), carry2)
    assert_close(m(x), jnp.concatenate([o0, o1, o2], axis=1), atol=1e-5, what="forward vs chained segments")


# ----------------------------------------------------------------------------- build, axes, errors


def test_eval_shape_and_logical_axes():
    for variant in VARIANTS:
        abstract = nnx.eval_shape(lambda v=variant: TitansLM(1000, 64, 2, 4, variant=v, segment_len=32,
                                                              rngs=nnx.Rngs(0)))
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    m = model("mac")
    for path, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        names = p.get_metadata().get("out_sharding")
        assert names is not None and len(names) == p.get_value().ndim, (path, names)
    mix = m.blocks[0].mixer
    names = lambda v: v.get_metadata()["out_sharding"]
    assert names(mix.attn.wq) == ("embed", "heads", "head_dim")
    assert names(mix.attn.wo) == ("heads", "head_dim", "embed")
    assert names(mix.persistent) == (None, "embed")
    assert names(mix.memory.memory_weights[0]) == ("heads", None, None)
    assert names(model("mag").blocks[1].mixer.memory.persistent) == (None, "embed")


@pytest.mark.parametrize(
    "kw, arg",
    [
        ({"segment_len": 0}, "segment_len"),
        ({"variant": "mat"}, "variant"),
        ({"variant": "mag", "window": 0}, "window"),
        ({"variant": "mac", "window": 4}, "window"),
        ({"num_persistent": -1}, "num_persistent"),
        ({"memory_depth": 0}, "memory_depth"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory_kwargs": {"depth": 2}}, "depth"),
    ],
)
def test_bad_config_raises(kw, arg):
    with pytest.raises(ValueError, match=arg):
        TitansLM(V, D, L, H, rngs=nnx.Rngs(0), **kw)


# ----------------------------------------------------------------------------- hybrid (README example)


@pytest.mark.slow  # left out of CI (README test command); run with -m slow
def test_hybrid_decoder_lm_trains_and_generates():
    m = DecoderLM(V, D, 4, H, mixers=["softmax", "based", "flow", "titans_memory"], short_conv=2, max_len=32,
                  rngs=nnx.Rngs(0))
    x = tokens(9, seed=5)
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(m, nnx.Param))

    @nnx.jit
    def train_step(m, opt, x):
        def loss_fn(m):
            logits = m(x[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    loss = train_step(m, opt, x)
    assert np.isfinite(float(loss))
    after = nnx.state(m, nnx.Param)
    changed = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert all(changed)
    out = generate(m, x[:, :4], 5)
    assert out.shape == (B, 9) and out.dtype == jnp.int32
    assert bool(jnp.all((out >= 0) & (out < V)))
