"""Reproduction: positional attention vs a standard transformer on out-of-distribution value ranges
(Back de Luca, Giapitzakis, Yang, Velickovic, Fountoulakis, "Positional Attention: Expressivity and
Learnability of Algorithmic Computation", ICML'25; wave2 design section 5.1; docs/reproductions.md).

The paper's setup (``opallab/positional_attention`` ``experiment_scale.py``): n = 8 values plus one
scratch node, 30k training samples whose values are drawn from a random sub-interval of [-2, 2];
test ranges [-2c, 2c], c = 2..10; width 64, 2 heads, log2(n)+1 = 4 blocks, MLP hidden 64; Adam
5e-4, batch 1000, 2001 epochs, MSE, median over 10 runs. The baseline is the same network with
queries and keys from the hidden state and the one-hot encodings appended to the input
(``model.attention="standard"``). Claim: positional attention's error stays small out of
distribution while the standard transformer's explodes (cumulative sum at 10x range: 0.059 vs 87.6).

CPU scale here: ``STEPS`` steps of batch 250 (12.5 epochs instead of 2001), one seed, Adam 3e-3
with a cosine decay to 3e-4, tasks sum, min and sort.

    python train.py --config=configs/repro/positional_ood.py --sweep --workdir=runs/repro_positional
    python eval.py --workdir=runs/repro_positional
"""

from configs import base

STEPS = 1500
OPS = ("sum", "min", "sort")


def get_config():
    c = base.get_config()
    c.task.name = "positional_sum"
    c.task.params.n = 8
    c.task.params.scratch = 1
    c.task.params.num_train = 30_000
    c.task.params.num_test = 1000
    c.model = base.model_config("positional_transformer", d_model=64, num_heads=2, mlp_hidden=64, mlp_layers=2,
                                attention="positional")
    c.model.scratch = c.task.params.get_ref("scratch")
    c.optim.learning_rate = 3e-3  # the paper: 5e-4 constant, batch 1000, 2001 epochs
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.optim.final_lr_ratio = 0.1
    c.train.steps = STEPS
    c.train.batch_size = 250  # the paper: 1000 (on 2, 4 or 8 devices give e.g. --config.train.batch_size=256)
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.progress_bar = False
    c.eval.batch_size = 500
    c.eval.max_batches = 2  # the whole 1000-sample split
    c.eval.splits = ("test", *(f"test_c{k}" for k in range(2, 11)))
    return c


def get_sweep():
    return {f"{op}_{att}": {"task.name": f"positional_{op}", "model.attention": att}
            for op in OPS for att in ("positional", "standard")}
