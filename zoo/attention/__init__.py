"""Pure functional attention transforms: arrays in, arrays out, no parameters.

Layout ``[batch, length, heads, head_dim]`` everywhere (as ``jax.nn.dot_product_attention``);
k/v may have fewer heads than q (grouped-query attention). Every function is safe under
``jax.jit``, ``jax.vmap`` and ``jax.grad``. See ``names()`` for the registered mechanisms.
"""

import functools

import jax
import jax.numpy as jnp

from zoo.attention import blockwise, common, feature_maps, kv_select, rope
from zoo.attention.aaren import AarenState, aaren, aaren_naive
from zoo.attention.aaren import init_state as aaren_init_state
from zoo.attention.aaren import step as aaren_step
from zoo.attention.blockwise import BlockSizes
from zoo.attention.deltanet import DeltaNetState, deltanet, deltanet_naive, gated_deltanet
from zoo.attention.deltanet import init_state as deltanet_init_state
from zoo.attention.deltanet import step as deltanet_step
from zoo.attention.flow import FlowState, flow, flow_naive
from zoo.attention.flow import init_state as flow_init_state
from zoo.attention.flow import step as flow_step
from zoo.attention.kv_select import (
    attend_selected,
    tidaldecode_select,
    tidaldecode_step,
    tokenselect_select,
    tokenselect_step,
)
from zoo.attention.linear import (
    LinearState,
    alibi_slopes,
    linear,
    linear_naive,
)
from zoo.attention.linear import init_state as linear_init_state
from zoo.attention.linear import step as linear_step
from zoo.attention.miras import PRESETS as MIRAS_PRESETS
from zoo.attention.miras import memora, miras, miras_naive, moneta, yaad
from zoo.attention.miras import step as miras_step
from zoo.attention.positional import (
    identity_encoding,
    positional,
    positional_apply,
    positional_naive,
    positional_qk,
    positional_weights,
)
from zoo.attention.registry import (
    Implementation,
    Transform,
    get,
    implementations,
    names,
    recurrent_prefill,
    register,
    register_impl,
    resolve,
    set_preference,
)
from zoo.attention.rope import RopeScaling
from zoo.attention.softmax import (
    KVCache,
    init_cache,
    sigmoid,
    sigmoid_naive,
    sliding_window,
    softmax,
    softmax_naive,
    softplus,
    softplus_naive,
)
from zoo.attention.softmax import init_state as softmax_init_state
from zoo.attention.softmax import prefill as softmax_prefill
from zoo.attention.softmax import step as softmax_step
from zoo.attention.sparse import (
    nsa,
    nsa_naive,
    nsa_prefill,
    nsa_step,
    routing,
    routing_init_params,
    routing_naive,
    routing_prefill,
    routing_step,
    s2,
    s2_naive,
    s2_prefill,
    s2_step,
)
from zoo.attention.titans import MemoryState, titans, titans_naive
from zoo.attention.titans import init_state as memory_init_state
from zoo.attention.titans import step as titans_step
from zoo.attention.ttt import TTTState, ttt, ttt_linear, ttt_mlp, ttt_naive
from zoo.attention.ttt import init_params as ttt_init_params
from zoo.attention.ttt import init_state as ttt_init_state
from zoo.attention.ttt import step as ttt_step

_kv = dict(init_state_fn=softmax_init_state, prefill_fn=softmax_prefill, cache="kv",
           decode_only={"num_sink_tokens"})
register(Transform(
    "softmax", softmax, softmax_naive, step_fn=softmax_step, parallel_only={"bias", "segment_ids"}, **_kv,
    impl_family="softmax",
    example_options=lambda h, d: {"sink_logit": jnp.linspace(-1.0, 1.0, h)},
    description="scaled dot-product softmax attention (sinks, window, log-n scaling options)",
))
register(Transform(
    "sliding_window", sliding_window, softmax_naive, step_fn=softmax_step, parallel_only={"bias", "segment_ids"},
    impl_family="softmax",
    causal_only=True, defaults={"window": 256}, example_options=lambda h, d: {"window": 3}, **_kv,
    description="causal sliding-window softmax attention (window=256 by default)",
))
register(Transform(
    "sigmoid", sigmoid, sigmoid_naive, init_state_fn=softmax_init_state,
    prefill_fn=functools.partial(softmax_prefill, variant="sigmoid"), decode_only={"num_sink_tokens"},
    step_fn=functools.partial(softmax_step, variant="sigmoid"), cache="kv", step_exact={"bias"},
    parallel_only={"segment_ids"}, impl_family="softmax",
    example_options=lambda h, d: {"bias": -1.5},
    description="sigmoid attention, bias -log n, no normalisation",
))
register(Transform(
    "softplus", softplus, softplus_naive, init_state_fn=softmax_init_state,
    prefill_fn=functools.partial(softmax_prefill, variant="softplus"), decode_only={"num_sink_tokens"},
    step_fn=functools.partial(softmax_step, variant="softplus"), cache="kv",
    parallel_only={"segment_ids"}, impl_family="softmax",
    description="length-scaled softplus attention (LSSA; reweight=True for LSSAR)",
))
register(Transform(
    "positional", positional, positional_naive, step_fn=softmax_step, gqa=False, **_kv,
    description="positional attention: weights from positional q/k only, values from the input",
))
register(Transform(
    "s2", s2, s2_naive, init_state_fn=softmax_init_state, prefill_fn=s2_prefill, step_fn=s2_step, cache="kv",
    step_exact={"group_size"},  # the default group size follows the length (the cache's when decoding)
    example_options=lambda h, d: {"group_size": 4, "num_sink": 1},
    description="LongLoRA S2-Attn: groups, half the heads shifted by half a group (no wrap; SinkLoRA sinks)",
))
register(Transform(
    "nsa", nsa, nsa_naive, init_state_fn=softmax_init_state, prefill_fn=nsa_prefill, step_fn=nsa_step, cache="kv",
    example_options=lambda h, d: {"block_size": 2, "top_k": 2, "window_size": 3,
                                  "gates": jax.nn.sigmoid(jnp.linspace(-1.0, 1.0, 3 * h)).reshape(h, 3)},
    description="DeepSeek NSA: mean-pooled compression, top-k block selection, sliding window, gates",
))
register(Transform(
    "routing", routing, routing_naive, init_params=routing_init_params, init_state_fn=softmax_init_state,
    prefill_fn=routing_prefill, step_fn=routing_step, cache="kv",
    example_options=lambda h, d: {"centroids": jax.random.normal(jax.random.PRNGKey(0), (h, 2, d))},
    description="Routing Transformer: causal argmax-bucket routing to given centroids",
))


def _linear_examples(feature_map: str, heads: int, head_dim: int) -> dict:
    """Chunks of 3 (ragged at test lengths); plain linear also gets per-head decay rates 0 and
    0.7; hedgehog gets its learnable map's parameters (identity-initialised)."""
    ex: dict = {"chunk_size": 3}
    if feature_map == "elu":
        ex["decay"] = jnp.linspace(0.0, 0.7, heads)
    if feature_map == "hedgehog":
        ex["feature_map_params"] = feature_maps.hedgehog_init(None, head_dim, heads=heads)
    return ex


_recurrent = dict(init_state_fn=linear_init_state, prefill_fn=recurrent_prefill(linear),
                  step_fn=linear_step, cache="recurrent", parallel_only={"chunk_size"}, impl_family="linear")
for _name, _fm, _desc in (
    ("linear", "elu", "linear attention, elu+1 feature map (Katharopoulos et al.)"),
    ("based", "taylor", "linear attention with BASED's 2nd-order Taylor feature map"),
    ("hedgehog", "hedgehog", "linear attention with the learnable Hedgehog map (params explicit)"),
    ("nalaformer", "nalaformer", "NaLaFormer norm-aware linear attention (mean normaliser)"),
):
    register(Transform(
        _name, linear, linear_naive, **_recurrent,
        defaults={"feature_map": _fm, **({"normalize": "mean"} if _fm == "nalaformer" else {})},
        example_options=functools.partial(_linear_examples, _fm), description=_desc,
    ))
register(Transform(
    "gla", linear, linear_naive, **_recurrent, defaults={"feature_map": "identity", "normalize": False},
    example_options=lambda h, d: {"chunk_size": 3, "decay": jnp.linspace(0.0, 0.7, h)},
    description="GLA: gated linear attention, per-channel decay [batch, length, heads, head_dim] (chunked)",
))


def _deltanet_examples(gated: bool, heads: int, head_dim: int) -> dict:
    """Chunks of 3 (ragged at test lengths), writing strengths beta in (0, 1) per head (sigmoid
    values, as the layers make them); gated: decay rates 0 (no decay) to 0.7 per head."""
    ex: dict = {"chunk_size": 3, "beta": jax.nn.sigmoid(jnp.linspace(-1.0, 1.0, heads))}
    if gated:
        ex["decay"] = jnp.linspace(0.0, 0.7, heads)
    return ex


_delta = dict(init_state_fn=deltanet_init_state, prefill_fn=recurrent_prefill(deltanet), step_fn=deltanet_step,
              cache="recurrent", causal_only=True, parallel_only={"chunk_size"}, impl_family="deltanet")
register(Transform(
    "deltanet", deltanet, deltanet_naive, **_delta, example_options=functools.partial(_deltanet_examples, False),
    description="DeltaNet: delta-rule linear attention, exact chunk-parallel WY/UT form (beta per token)",
))
register(Transform(
    "gated_deltanet", deltanet, deltanet_naive, **_delta,
    example_options=functools.partial(_deltanet_examples, True),
    description="Gated DeltaNet: the delta rule with per-token decay exp(-rate) before each update (chunked)",
))
register(Transform(
    "aaren", aaren, aaren_naive, init_state_fn=aaren_init_state, prefill_fn=recurrent_prefill(aaren),
    step_fn=aaren_step, cache="recurrent", causal_only=True,
    description="Aaren: attention as an RNN, prefix-scan softmax (learned query)",
))
register(Transform(
    "flow", flow, flow_naive, init_state_fn=flow_init_state, prefill_fn=recurrent_prefill(flow),
    step_fn=flow_step, cache="recurrent", parallel_only={"chunk_size"},
    example_options=lambda h, d: {"chunk_size": 3},
    description="Flow-Attention (Flowformer): sigmoid linear attention with flow conservation",
))
_memory = dict(init_state_fn=memory_init_state, cache="recurrent", causal_only=True, linear_in_v=False,
               parallel_only={"form"}, example_options=lambda h, d: {"chunk_size": 3})
register(Transform(
    "titans", titans, titans_naive, prefill_fn=recurrent_prefill(titans), step_fn=titans_step, **_memory,
    description="Titans neural memory: test-time GD + momentum + decay (chunked)",
))
register(Transform(
    "miras", miras, miras_naive, prefill_fn=recurrent_prefill(miras), step_fn=miras_step, **_memory,
    description="Miras memory: choose bias, retention, algorithm, architecture",
))
for _name, _desc in (
    ("moneta", "Moneta (Miras): lp attentional bias, lq retention"),
    ("yaad", "Yaad (Miras): Huber attentional bias, l2 retention"),
    ("memora", "Memora (Miras): l2 attentional bias, KL retention (simplex weights)"),
):
    register(Transform(
        _name, miras, miras_naive, prefill_fn=recurrent_prefill(miras), step_fn=miras_step,
        defaults=dict(MIRAS_PRESETS[_name]), description=_desc, **_memory,
    ))

_ttt = dict(init_state_fn=ttt_init_state, prefill_fn=recurrent_prefill(ttt), step_fn=ttt_step, cache="recurrent",
            causal_only=True, linear_in_v=False, init_params=ttt_init_params,
            # key draws the inner weights (init_state and the parallel form draw the same ones);
            # residual="none" because the suite's value_dim differs from key_dim
            example_options=lambda h, d: {"chunk_size": 3, "key": jax.random.PRNGKey(0), "residual": "none"})
register(Transform(
    "ttt_linear", ttt, ttt_naive, defaults={"depth": 1}, **_ttt,
    description="TTT-Linear: linear inner model trained by mini-batch GD (LN-fused loss, dual form)",
))
register(Transform(
    "ttt_mlp", ttt, ttt_naive, defaults={"depth": 2}, **_ttt,
    description="TTT-MLP: 2-layer GELU inner model trained by mini-batch GD (LN-fused loss, dual form)",
))

__all__ = [
    "AarenState", "aaren", "aaren_init_state", "aaren_naive", "aaren_step",
    "DeltaNetState", "deltanet", "deltanet_init_state", "deltanet_naive", "deltanet_step", "gated_deltanet",
    "FlowState", "flow", "flow_init_state", "flow_naive", "flow_step",
    "identity_encoding", "positional", "positional_apply", "positional_naive", "positional_qk",
    "positional_weights",
    "BlockSizes", "blockwise",
    "Implementation", "KVCache", "LinearState", "Transform", "alibi_slopes", "common", "feature_maps", "get",
    "implementations", "init_cache", "linear", "linear_init_state", "linear_naive", "linear_step", "names",
    "recurrent_prefill", "register", "register_impl", "resolve", "set_preference",
    "sigmoid", "sigmoid_naive", "sliding_window", "softmax", "softmax_init_state", "softmax_naive",
    "softmax_prefill", "softmax_step", "softplus", "softplus_naive",
    "MemoryState", "memora", "memory_init_state", "miras", "miras_naive", "miras_step", "moneta",
    "titans", "titans_naive", "titans_step", "yaad",
    "TTTState", "ttt", "ttt_init_state", "ttt_linear", "ttt_mlp", "ttt_naive", "ttt_step",
    "RopeScaling", "rope",
    "nsa", "nsa_naive", "routing", "routing_naive", "s2", "s2_naive",
    # decode-time KV selection (functions, not registered transforms: kv_select's docstring)
    "attend_selected", "kv_select", "tidaldecode_select", "tidaldecode_step", "tokenselect_select", "tokenselect_step",
]
