"""Positional-attention algorithmic tasks (Back de Luca et al., ICML'25; wave2 design section 5.1).

One file for the five tasks: the operation is the config string argument (default ``sum``):
``--config=configs/positional.py:min`` (sum, min, median, sort, max_subarray). Paper setup: n=8
values plus one scratch node, 30k training samples drawn from sub-intervals of [-2, 2], MSE;
width 64, 2 heads, log2(n)+1 blocks; Adam 5e-4, batch 1000 (500 epochs here). Test splits at
value ranges [-2c, 2c], c = 2..10 (``test_c{c}``).

    python train.py --config=configs/positional.py --workdir=runs/pos_sum
    python train.py --config=configs/positional.py:sort --workdir=runs/pos_sort
"""

from configs import base

OPS = ("sum", "min", "median", "sort", "max_subarray")


def get_config(op: str = "sum"):
    if op not in OPS:
        raise ValueError(f"positional task {op!r} is not one of {', '.join(OPS)}")
    c = base.get_config()
    c.task.name = f"positional_{op}"
    c.task.params.n = 8
    c.task.params.scratch = 1
    c.task.params.num_train = 30_000
    c.model = base.model_config("positional_transformer", d_model=64, num_heads=2, mlp_hidden=64, mlp_layers=2)
    c.model.scratch = c.task.params.get_ref("scratch")  # the model's n = task length - scratch
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.optim.final_lr_ratio = 1.0
    c.train.steps = 15_000  # 500 epochs of 30 batches
    c.train.batch_size = 1000
    c.train.log_every = 100
    c.train.eval_every = 1500
    c.train.checkpoint_every = 1500
    c.eval.batch_size = 500
    c.eval.max_batches = 2
    c.eval.splits = ("test", *(f"test_c{k}" for k in range(2, 11)))
    return c
