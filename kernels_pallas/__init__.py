"""Pallas kernels of the zoo (GPU via Triton, TPU via Mosaic; interpret mode on CPU), one
sub-package per kernel (``common`` block maths, ``tpu`` / ``gpu`` programs, ``reference``).

``causal_linear_attention(q, k, v, decay_rate, *, initial_state, chunk_size) -> (out, final_state)``
is the tiled causal linear attention of Lightning Attention-2 (Qin et al. 2024) with forward and
backward kernels; ``zoo.attention.linear(impl="pallas" | "auto")`` calls
``causal_linear_attention_kernel`` (inside ``shard_map`` when a mesh is active). See
:mod:`kernels_pallas.linear_attention`.

``flash_attention.flash_attention(q, k, v, *, variant="softmax" | "sigmoid" | "softplus",
causal, window, sink_logit, logn_train_length, alibi_slopes, bias_fn, ...)`` is FlashAttention-2 (forward and
backward kernels) for the softmax variants no library kernel covers; ``flash_attention_supports``
says why a set of options cannot run, ``flash_attention_sharded`` calls it inside ``shard_map``.
See :mod:`kernels_pallas.flash_attention`.
"""

from kernels_pallas import flash_attention  # the sub-package: flash_attention.flash_attention(...)
from kernels_pallas.flash_attention import flash_attention_reference, flash_attention_sharded
from kernels_pallas.flash_attention import supports as flash_attention_supports
from kernels_pallas.linear_attention import (
    BlockSizes,
    causal_linear_attention,
    causal_linear_attention_kernel,
    causal_linear_attention_reference,
    flops,
)

__all__ = [
    "BlockSizes",
    "causal_linear_attention",
    "causal_linear_attention_kernel",
    "causal_linear_attention_reference",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_sharded",
    "flash_attention_supports",
    "flops",
]
