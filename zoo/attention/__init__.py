"""Pure functional attention transforms: arrays in, arrays out, no parameters.

Layout ``[batch, length, heads, head_dim]`` everywhere (as ``jax.nn.dot_product_attention``);
k/v may have fewer heads than q (grouped-query attention). Every function is safe under
``jax.jit``, ``jax.vmap`` and ``jax.grad``. See ``names()`` for the registered mechanisms.
"""

from zoo.attention import feature_maps
from zoo.attention.aaren import AarenState, aaren, aaren_naive
from zoo.attention.aaren import init_state as aaren_init_state
from zoo.attention.aaren import step as aaren_step
from zoo.attention.flow import FlowState, flow, flow_naive
from zoo.attention.flow import init_state as flow_init_state
from zoo.attention.flow import step as flow_step
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
from zoo.attention.miras import preset as miras_preset
from zoo.attention.miras import step as miras_step
from zoo.attention.positional import (
    identity_encoding,
    positional,
    positional_apply,
    positional_naive,
    positional_qk,
    positional_weights,
)
from zoo.attention.registry import Transform, get, names, register
from zoo.attention.softmax import (
    KVCache,
    init_cache,
    prefill,
    sigmoid,
    sliding_window,
    softmax,
    softmax_naive,
    softplus,
)
from zoo.attention.softmax import step as softmax_step
from zoo.attention.titans import MemoryState, titans, titans_naive
from zoo.attention.titans import init_state as memory_init_state
from zoo.attention.titans import step as titans_step

register(Transform(
    "softmax", softmax, reference=softmax_naive, init_state=init_cache, step=softmax_step,
    description="scaled dot-product softmax attention (sinks, window, log-n scaling options)",
))
register(Transform(
    "sliding_window", sliding_window, init_state=init_cache, step=softmax_step,
    causal_only=True, description="causal sliding-window softmax attention (needs window=...)",
))
register(Transform(
    "sigmoid", sigmoid, init_state=init_cache,
    step=lambda *a, **kw: softmax_step(*a, variant="sigmoid", **kw),
    description="sigmoid attention, bias -log n, no normalisation",
))
register(Transform(
    "softplus", softplus, init_state=init_cache,
    step=lambda *a, **kw: softmax_step(*a, variant="softplus", **kw),
    description="length-scaled softplus attention (LSSA; reweight=True for LSSAR)",
))
for _name, _fm, _desc in (
    ("linear", "elu", "linear attention, elu+1 feature map (Katharopoulos et al.)"),
    ("based", "taylor", "linear attention with BASED's 2nd-order Taylor feature map"),
    ("hedgehog", "hedgehog", "linear attention with the learnable Hedgehog map (params explicit)"),
    ("nalaformer", "nalaformer", "NaLaFormer norm-aware linear attention (mean normaliser)"),
):
    register(Transform(
        _name, linear, reference=linear_naive, init_state=linear_init_state, step=linear_step,
        defaults={"feature_map": _fm, **({"normalize": "mean"} if _fm == "nalaformer" else {})},
        description=_desc,
    ))
register(Transform(
    "aaren", aaren, reference=aaren_naive, init_state=aaren_init_state, step=aaren_step,
    causal_only=True, description="Aaren: attention as an RNN, prefix-scan softmax (learned query)",
))
register(Transform(
    "flow", flow, reference=flow_naive, init_state=flow_init_state, step=flow_step,
    description="Flow-Attention (Flowformer): sigmoid linear attention with flow conservation",
))
register(Transform(
    "positional", positional, reference=positional_naive, init_state=init_cache, step=softmax_step,
    description="positional attention: weights from positional q/k only, values from the input",
))
register(Transform(
    "titans", titans, reference=titans_naive, init_state=memory_init_state, step=titans_step,
    causal_only=True, description="Titans neural memory: test-time GD + momentum + decay (chunked)",
))
register(Transform(
    "miras", miras, reference=miras_naive, init_state=memory_init_state, step=miras_step,
    causal_only=True, description="Miras memory: choose bias, retention, algorithm, architecture",
))
for _name, _desc in (
    ("moneta", "Moneta (Miras): lp attentional bias, lq retention"),
    ("yaad", "Yaad (Miras): Huber attentional bias, l2 retention"),
    ("memora", "Memora (Miras): l2 attentional bias, KL retention (simplex weights)"),
):
    register(Transform(
        _name, miras, reference=miras_preset(miras_naive, _name), init_state=memory_init_state,
        step=miras_preset(miras_step, _name), defaults=dict(MIRAS_PRESETS[_name]), causal_only=True,
        description=_desc,
    ))

__all__ = [
    "AarenState", "aaren", "aaren_init_state", "aaren_naive", "aaren_step",
    "FlowState", "flow", "flow_init_state", "flow_naive", "flow_step",
    "identity_encoding", "positional", "positional_apply", "positional_naive", "positional_qk",
    "positional_weights",
    "KVCache", "LinearState", "Transform", "alibi_slopes", "feature_maps", "get", "init_cache",
    "linear", "linear_init_state", "linear_naive", "linear_step", "names", "prefill", "register",
    "sigmoid", "sliding_window", "softmax", "softmax_naive", "softmax_step", "softplus",
    "MemoryState", "memora", "memory_init_state", "miras", "miras_naive", "miras_step", "moneta",
    "titans", "titans_naive", "titans_step", "yaad",
]
