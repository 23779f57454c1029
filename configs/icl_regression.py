"""In-context linear regression (He, Pan, Chen, Yang, ICML'25; wave2 design section 5.4).

The paper's setup: d=5, L=8d=40 context pairs, beta ~ N(0, I/d), noise variance sigma^2 = 0.1;
one attention layer with H heads of full width d+1, no bias, in which the query token attends to
the context tokens only (``model.name="icl_attention"``); Adam 1e-3, batch 256 (20k steps here,
500k in the paper). Test splits with 2x and 4x longer contexts (``test_ctx80``, ``test_ctx160``).
Reference errors: Bayes/ridge 0.114, one-step GD 0.239 at L=40 (wave2 design section 5.4).

    python train.py --config=configs/icl_regression.py --workdir=runs/icl
    python train.py --config=configs/icl_regression.py --sweep --workdir=runs/icl_sweep   # H = 1, 2, 4; linear
"""

from configs import base


def get_config():
    c = base.get_config()
    c.task.name = "icl_regression"
    c.task.params.dim = 5
    c.task.params.num_context = 40
    c.task.params.noise_std = 0.1**0.5  # sigma^2 = 0.1 (the paper)
    c.task.params.num_train = 200_000
    c.model = base.model_config("icl_attention", num_heads=4, mixer="softmax", mixer_options={})
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.optim.final_lr_ratio = 1.0  # constant learning rate (Adam, as the paper)
    c.train.steps = 20_000
    c.train.batch_size = 256
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.eval.batch_size = 250
    c.eval.max_batches = 4
    c.eval.splits = ("test", "test_ctx80", "test_ctx160")
    return c


def get_sweep():
    return {"softmax_h1": {"model.num_heads": 1}, "softmax_h2": {"model.num_heads": 2},
            "softmax_h4": {"model.num_heads": 4}, "linear_h4": {"model.mixer": "linear"}}
