"""Reproduction: the Zoology / BASED MQAR comparison (Arora et al. 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models", Fig. 2; Arora et al. 2024, "Simple linear
attention language models balance the recall-throughput tradeoff", Fig. 2; wave2 design section
5.7; docs/reproductions.md).

The papers' setup: multi-query associative recall with V=8192, one model per (T, kv) cell in
{(64, 4), (128, 8), (256, 16)}, 2 layers without MLP, d_model 64-512, a learning-rate sweep
(logspace(-4, -2, 4)) with the best one reported per mixer and width, accuracy on the query
positions. Every recurrent mixer sits in a Zoology stack: a gated short-convolution layer
(BaseConv, ``x + conv(h) * (h W + b)``) before it. Claims: attention solves every cell at every
width; gated convolutions and recurrences need the width to grow with T and kv; BASED is close
to attention on the easy cells; the gap widens with the number of kv pairs.

CPU scale here: V=256, cells (T, kv) = (64, 4) and (64, 16) (the number of pairs grows at a
fixed length, so every cell costs the same), d_model 64, ``STEPS`` steps of batch 64 on 20k
training sequences, learning rates 3e-3 and 1e-2 (``eval.py`` reports the best per mechanism and
width). A wider grid is a change of ``CELLS`` / ``WIDTHS`` / ``LEARNING_RATES`` (the zoology
widths 128-512 and 1e-3 did not fit the CPU budget: BASED's 153-feature Taylor state trains at
about 7k tokens/s here). Every model: 2 layers, each a gated-convolution block
of width 3 (zoology's BaseConv kernel size; ``model.gated_conv``) followed by the mixer block,
no MLP, learned positions. Mechanisms: softmax, BASED (4 heads of 16: the Taylor feature map of
feature dim 16), linear (elu + 1), GLA and DeltaNet (their papers' layers, ``gla_layer`` and
``deltanet_layer``), Titans, Flow, Aaren.

    python train.py --config=configs/repro/mqar_zoology.py --sweep --sweep_procs=2 --workdir=runs/repro_mqar_zoology
    python eval.py --workdir=runs/repro_mqar_zoology
    python docs/repro_mqar_zoology/make_report.py runs/repro_mqar_zoology docs/repro_mqar_zoology
"""

from configs import base, mqar

STEPS = 500
CELLS = ((64, 4), (64, 16))  # (T, kv)
WIDTHS = (64,)
LEARNING_RATES = (3e-3, 1e-2)
MIXERS = {
    "softmax": {"model.mixer": "softmax"},
    # BASED's 2nd-order Taylor map on small q/k heads (the paper's feature dim 16: 273 features)
    "based": {"model.mixer": "based", "model.num_heads": 4},
    "linear": {"model.mixer": "linear"},  # elu + 1 (Katharopoulos et al.)
    # the papers' layers (zoo.nn): short convs, SiLU, l2-normalised q/k, sigmoid beta / low-rank gates
    "gla": {"model.mixer": "gla_layer"},
    "deltanet": {"model.mixer": "deltanet_layer"},
    "titans": {"model.mixer": "titans"},
    "flow": {"model.mixer": "flow"},
    "aaren": {"model.mixer": "aaren"},
}


def get_config():
    c = mqar.get_config()
    c.task.params.vocab_size = 256
    c.task.params.seq_len, c.task.params.num_kv_pairs = CELLS[0]
    c.task.params.num_train = 20000
    c.task.params.num_test = 1000
    c.task.params.test_lengths = ()
    c.model.short_conv = 0
    c.model.gated_conv = 3  # zoology's BaseConv before every mixer (zoo.models.lm.GatedConv)
    c.model.mlp = None
    c.model.max_len = max(t for t, _ in CELLS)
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 50
    c.train.steps = STEPS
    c.train.batch_size = 64
    c.train.log_every = 100
    c.train.eval_every = STEPS
    c.train.checkpoint_every = STEPS
    c.train.keep_checkpoints = 1
    c.train.progress_bar = False
    c.eval.splits = ("test",)
    c.eval.batch_size = 250
    c.eval.max_batches = 4  # the whole 1000-sequence test split
    return c


def get_sweep():
    """mechanism x cell x width x learning rate, e.g. ``based-T128kv8-d64-lr3e-03``."""
    cells = {f"T{t}kv{kv}": {"task.params.seq_len": t, "task.params.num_kv_pairs": kv} for t, kv in CELLS}
    widths = {f"d{d}": {"model.d_model": d} for d in WIDTHS}
    lrs = {f"lr{lr:.0e}": {"optim.learning_rate": lr} for lr in LEARNING_RATES}
    return base.product_sweep(MIXERS, cells, widths, lrs)
