"""Reproduction: attention entropy collapse at a high learning rate, and sigmaReparam preventing it
(issue 14; wave2 design section 5.6; docs/reproductions.md).

The paper: Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu, Susskind, "Stabilizing
Transformer Training by Preventing Attention Entropy Collapse" (ICML 2023; code
``apple/ml-sigma-reparam``). The attention entropy ``Ent(A_i) = -sum_j A_ij log A_ij`` is bounded
below by a quantity that decreases with ``sigma(W_K W_Q^T)``; training instability (loss spikes,
divergence) co-occurs with the entropy of some heads collapsing towards 0. sigmaReparam,
``W_hat = (gamma / sigma(W)) W`` on every linear layer, prevents the collapse and lets ViTs train
without warmup, weight decay or LayerNorm (the vision code converts every ``nn.Linear`` and removes
every normalisation layer).

CPU scale here: a 4-layer width-64 byte-level LM (4 heads, RoPE, SwiGLU, pre-RMSNorm) at T = 64 on
``configs/repro/data/zoo_sources.txt`` (as ``context_extension.py``), Adam (b2 = 0.98) at a
deliberately high constant learning rate (1e-2 and 3e-2; the zoo's byte-LM default is 3e-3
after 100 warmup steps) with no warmup, no weight decay and no gradient clipping, batch 16, ``STEPS`` = 300 steps
(sized so the 8 runs train in about 10 minutes on 2 CPU cores); ``baseline`` vs
``sigma_reparam`` (``MultiHeadAttention``'s ``sigma_reparam=True``: the q, k, v and output
projections of every layer; the MLPs, the embedding and the RMSNorms are unchanged, see the
report), seeds 0 and 1. A checkpoint every ``STEPS // CHECKPOINTS`` = 50 steps is kept, so the
report measures each layer's per-head attention entropy over training:

    python train.py --config=configs/repro/sigma_reparam.py --sweep --workdir=runs/repro_sigma_reparam
    python docs/repro_sigma_reparam/make_report.py runs/repro_sigma_reparam docs/repro_sigma_reparam
"""


from configs import bytes_lm
from configs.repro import CORPUS

SEQ_LEN = 64
STEPS = 300
CHECKPOINTS = 6  # kept checkpoints: every STEPS // CHECKPOINTS steps
SEEDS = (0, 1)
LEARNING_RATES = (1e-2, 3e-2)


def get_config():
    c = bytes_lm.get_config()
    c.task.params.paths = (str(CORPUS),)
    c.task.params.seq_len = SEQ_LEN
    c.task.params.test_fraction = 0.1
    c.model.d_model = 64
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.pos = "rope"
    c.model.mlp = "swiglu"
    c.model.max_len = SEQ_LEN
    c.optim.learning_rate = 1e-2  # deliberately high
    c.optim.warmup_steps = 0
    c.optim.final_lr_ratio = 1.0  # constant
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.train.steps = STEPS
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = STEPS // CHECKPOINTS
    c.train.checkpoint_every = STEPS // CHECKPOINTS
    c.train.keep_checkpoints = CHECKPOINTS + 1
    c.train.progress_bar = False
    c.eval.batch_size = 32
    c.eval.max_batches = 8
    return c


def get_sweep():
    """``{baseline, sigma_reparam}_lr{lr}_s{seed}`` for every learning rate and seed."""
    out = {}
    for lr in LEARNING_RATES:
        for seed in SEEDS:
            base = {"seed": seed, "optim.learning_rate": lr}
            out[f"baseline_lr{lr:.0e}_s{seed}"] = base
            out[f"sigma_reparam_lr{lr:.0e}_s{seed}"] = {**base, "model.mixer_options": {"sigma_reparam": True}}
    return out
