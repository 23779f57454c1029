"""MultiHeadAttention records per-head attention entropy and sink scores under nnx.capture only."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import assert_close
from zoo.models import DecoderLM
from zoo.nn import MultiHeadAttention


def test_sown_entropy_matches_direct_softmax_and_outputs_unchanged():
    mha = MultiHeadAttention(2, 16, transform="softmax", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
    y0 = mha(x)
    y, stats = nnx.capture(mha, nnx.Intermediate)(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    ent = jax.tree.leaves(stats["attention_entropy"])[0]
    # Direct numpy: entropy of the causal softmax rows of the module's own q, k.
    q, k, _ = mha._project(x, jnp.arange(6), mha.inv_freq())
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((6, 6), bool)), logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    h = -np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0), -1).mean(axis=(0, 2))
    assert_close(ent, h, atol=1e-5)
    # Nothing is stored in the module outside capture.
    assert "attention_entropy" not in nnx.state(mha, nnx.Intermediate)


def test_memory_mixers_record_nothing():
    m = DecoderLM(32, 16, 2, 2, mixers=["based", "titans"], rngs=nnx.Rngs(0))
    tok = jnp.zeros((1, 8), jnp.int32)
    _, stats = nnx.capture(m, nnx.Intermediate)(tok)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(stats)]
    assert any("[0]['mixer']['attention_entropy']" in p for p in paths)
    assert not any("[1]['mixer']" in p for p in paths)


def test_cross_attention_records_entropy_but_no_sink_scores():
    """Cross-attention weights [B, H, T, S] have an entropy per head; sink scores are defined for
    self-attention only (even when S == T)."""
    mha = MultiHeadAttention(2, 16, transform="linear", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
    c = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 16))
    y, stats = nnx.capture(mha, nnx.Intermediate)(x, c, causal=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(mha(x, c, causal=False)))
    assert jax.tree.leaves(stats["attention_entropy"])[0].shape == (2,)
    assert "sink_scores" not in stats
