"""Reproduction: when does an attention sink emerge? Softmax vs sigmoid attention without
normalisation, a learned sink logit, and a larger learning rate (issue 14; wave2 design section
5.5; docs/reproductions.md).

The paper: Gu, Pang, Du, Liu, Zhang, Wang, Lin, Wang (ICLR 2025), "When Attention Sink Emerges in
Language Models: An Empirical View" (code ``sail-sg/Attention-Sink``). A 60M-parameter LLaMA-style
model (10 layers, 8 heads, width 768, RoPE, RMSNorm) pre-trained on about 5B tokens of the Pile.
The sink metric (``eval_sink_pretrain.py``): ``alpha_k = mean_{t >= k} A_tk`` on the first 64
tokens of 100 sequences, and ``Sink_1^eps`` = the percentage of (layer, head) pairs with
``alpha_1 > eps = 0.3``. Claims: the sink emerges during training after effective optimisation on
enough data; it is weaker with a smaller learning rate; with sigmoid attention *without*
normalisation no sink appears; with a learnable key/value bias the sink moves off the first token.

CPU scale here: a 4-layer width-64 byte-level LM (4 heads, RoPE, SwiGLU, pre-RMSNorm) trained at
T = 128 on a fixed snapshot of this repository's text (``configs/repro/data/zoo_sources.txt``, as
``context_extension.py``); Adam 1e-3 constant after 100 warmup steps (the paper: 4e-4 constant
after 100), weight decay 0.1, batch 16, ``STEPS`` = 600 steps (1.2M tokens: about 1/4000 of the
paper's data; sized to train the 4 runs in about 10 minutes on 2 CPU cores). Sweep:

- ``softmax``;
- ``sigmoid``: ``sum_j sigmoid(q.k_j / sqrt(d) - log 128) v_j``, no normalisation (the bias fixed
  at ``-log T``, so evaluating on 64 tokens keeps the training bias);
- ``softmax_sink``: a learned per-head sink logit with a zero value (the nearest zoo option to the
  paper's learnable ``k*``);
- ``softmax_lr4e-3``: the learning rate times 4.

A checkpoint every ``STEPS // 10`` steps is kept, so the report measures ``Sink_1^0.3`` over
training:

    python train.py --config=configs/repro/sink_emergence.py --sweep --workdir=runs/repro_sink_emergence
    python docs/repro_sink_emergence/make_report.py runs/repro_sink_emergence docs/repro_sink_emergence
"""

import math

from configs import bytes_lm
from configs.repro import CORPUS

SEQ_LEN = 128
STEPS = 600
CHECKPOINTS = 10  # kept checkpoints: every STEPS // CHECKPOINTS steps


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
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.final_lr_ratio = 1.0  # constant after warmup, as the paper
    c.optim.weight_decay = 0.1
    c.train.steps = STEPS
    c.train.batch_size = 16
    c.train.log_every = STEPS // CHECKPOINTS // 2
    c.train.eval_every = STEPS // CHECKPOINTS
    c.train.checkpoint_every = STEPS // CHECKPOINTS
    c.train.keep_checkpoints = CHECKPOINTS + 1
    c.train.progress_bar = False
    c.eval.batch_size = 32
    c.eval.max_batches = 8
    return c


def get_sweep():
    return {
        "softmax": {},
        "sigmoid": {"model.mixer": "sigmoid", "model.mixer_options": {"bias": -math.log(SEQ_LEN)}},
        "softmax_sink": {"model.mixer_options": {"sink": True}},
        "softmax_lr4e-3": {"optim.learning_rate": 4e-3},
    }
