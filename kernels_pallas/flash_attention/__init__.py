"""Pallas flash-attention kernels for the softmax-family variants no library kernel covers:
softmax with learned sinks, entropy-invariant log-n scaling, ALiBi slopes or a bias function of
positions, causal sliding windows (only the key blocks inside the window are visited), sigmoid
attention (FlashSigmoid: no normaliser, no running max) and softplus LSSA. Forward and backward
(FlashAttention-2, Dao 2023: online softmax per query block saving the per-row log-sum-exp; the
backward recomputes the logits block by block in a dQ kernel and a dK/dV kernel), grouped-query
heads without copying k/v, ragged lengths, cross-attention lengths (non-causal).

Equations, residuals and the backward: :mod:`.common`'s docstring. Layout (as
:mod:`kernels_pallas.linear_attention`):

- :mod:`.common`: :class:`BlockSizes`, the static plan, visible block ranges, the block maths
  shared by both backends.
- :mod:`.tpu`: the Mosaic TPU programs (grids with a sequential key/query axis, VMEM scratch,
  per-head parameters in SMEM).
- :mod:`.gpu`: the Pallas Triton programs (block loops inside each program, power-of-two tiles).
- :mod:`.reference`: a dense quadratic oracle with the same options.
- :mod:`.api`: :func:`flash_attention` (validates, resolves the backend), :func:`supports`
  (the reason a set of options cannot run: a mask array, segment ids, a bias array, softplus
  LSSAR, ...), :func:`flash_attention_kernel` (no checks: what a dispatcher calls after
  validating) and :func:`flash_attention_sharded` (inside ``shard_map`` over the active mesh via
  ``zoo.attention.dispatch.kernel_call``).

Not supported (``supports`` says so): a ``[B, H, Tq, Tk]`` mask or bias array, padding masks /
segment ids, softplus LSSAR (its re-weighting needs the finished LSSA normaliser of each row: a
second forward pass and a third backward pass), gradients of ALiBi slopes or of ``bias_fn``.

On CPU only interpret mode exists (``interpret=None`` turns it on there and uses the TPU program;
``backend="gpu"`` runs the Triton program in the interpreter). Hardware status: nothing has run
on a real GPU or TPU; the Pallas -> Mosaic and Pallas -> Triton lowerings are checked by
``jax.export`` on a CPU host (tests/kernels/test_flash_attention_kernel.py), Mosaic's and
Triton's own compilers are not. Block sizes are untuned defaults.
"""

from kernels_pallas.flash_attention.api import (
    flash_attention,
    flash_attention_kernel,
    flash_attention_sharded,
    supports,
)
from kernels_pallas.flash_attention.common import VARIANTS, BlockSizes
from kernels_pallas.flash_attention.reference import flash_attention_reference

__all__ = [
    "VARIANTS",
    "BlockSizes",
    "flash_attention",
    "flash_attention_kernel",
    "flash_attention_reference",
    "flash_attention_sharded",
    "supports",
]
