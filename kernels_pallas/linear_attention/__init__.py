"""Pallas kernels for tiled causal linear attention with per-head decay (Lightning Attention-2).

Recurrence (per batch ``b`` and head ``h``, ``lambda_h = exp(-s_h)``, ``s_h >= 0``)::

    S_t = lambda_h S_{t-1} + k_t v_t^T        (S_0 = initial_state)
    o_t = q_t^T S_t                           final_state = S_T

i.e. ``o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j + lambda^(i+1) q_i^T S_0``.

Block form (Qin et al. 2024, "Lightning Attention-2", Alg. 1/2) with blocks of ``C`` tokens, local
index ``r, s = 0..C-1``, ``S_n`` the state *before* block ``n`` (after its previous token) and ``L``
the number of real tokens in the block (``C`` except for a ragged last block)::

    O_n     = [(Q_n K_n^T) * D] V_n + diag(lambda^(r+1)) Q_n S_n        D_rs = lambda^(r-s) [r >= s]
    S_{n+1} = lambda^L S_n + (diag(lambda^(L-1-s)) K_n)^T V_n

The carried state here is the recurrence's ``S_t`` itself, so the query factor is
``lambda^(r+1)`` and the key factor ``lambda^(L-1-s)`` (the Lightning code carries
``lambda * S_t`` instead, giving the equivalent pair ``lambda^r`` / ``lambda^(C-s)``; mixing the two
conventions is the classic off-by-one). Padded tokens of a ragged last block have zero k/v and get
key factor 0, and the last block decays the state by ``lambda^L`` only, so the final state is exact.
A rate of ``+inf`` (a reset every token) is exact too (``common.MAX_RATE``).

Backward (``G_n = dLoss/dS_n``, ``G_N = d final_state``)::

    dQ_n = [(dO_n V_n^T) * D] K_n + diag(lambda^(r+1)) dO_n S_n^T                (forward sweep)
    dK_n = [(dO_n V_n^T) * D]^T Q_n + diag(lambda^(L-1-s)) V_n G_{n+1}^T          (reverse sweep)
    dV_n = [(Q_n K_n^T) * D]^T dO_n + diag(lambda^(L-1-s)) K_n G_{n+1}
    G_n  = lambda^L G_{n+1} + (diag(lambda^(r+1)) Q_n)^T dO_n        d initial_state = G_0

as three kernels: the intra-block terms (all blocks in parallel), a forward sweep over blocks that
recomputes ``S_n`` for ``dQ``, and a reverse sweep that carries ``G`` for ``dK``, ``dV`` and
``d initial_state``. Both carried states are float32 and stay on chip. The decay rates are
**not differentiated** (their cotangent is zero; Lightning/TransNormer use fixed ALiBi slopes): use
the XLA forms in ``zoo.attention.linear`` (``learn_decay=True``) to learn them.

Layout (one folder per kernel, as jax's Pallas ops and tokamax):

- :mod:`.common`: :class:`BlockSizes`, the static plan of a call, the block maths above (pure
  functions of loaded tiles) and the intra-block backward program shared by both backends.
- :mod:`.tpu`: the Mosaic TPU programs (grid with a sequential block axis, VMEM state scratch).
- :mod:`.gpu`: the Pallas Triton programs (block loop inside each program, power-of-two tiles).
- :mod:`.reference`: the token-recurrence oracle.
- :mod:`.api`: :func:`causal_linear_attention` (validates, resolves the backend) and
  :func:`causal_linear_attention_kernel` (neither: what ``zoo.attention.linear`` calls once it
  has validated the inputs and chosen the implementation).

On CPU only interpret mode exists; ``interpret=None`` turns it on there and uses the TPU program
(``backend="gpu"`` runs the Triton-style program in the interpreter).
``interpret=pltpu.InterpretParams(...)`` runs the TPU program in the TPU simulator (races,
uninitialised memory, randomised parallel grid order). Sharding over a device mesh is the
caller's: ``zoo.attention.dispatch`` wraps the kernel in ``shard_map`` (Mosaic and Triton calls
cannot be partitioned by XLA).
"""

from kernels_pallas.linear_attention.api import (
    causal_linear_attention,
    causal_linear_attention_kernel,
    resolve_backend,
)
from kernels_pallas.linear_attention.common import MAX_RATE, BlockSizes, flops
from kernels_pallas.linear_attention.reference import causal_linear_attention_reference

__all__ = [
    "MAX_RATE",
    "BlockSizes",
    "causal_linear_attention",
    "causal_linear_attention_kernel",
    "causal_linear_attention_reference",
    "flops",
    "resolve_backend",
]
