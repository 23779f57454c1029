"""Reproduction: multi-head softmax vs linear attention on in-context linear regression
(He, Pan, Chen, Yang, "In-Context Linear Regression Demystified", ICML'25; wave2 design section 5.4;
docs/reproductions.md).

The paper's setup (co-author repo ``XintianPan/ICL_linear``): d=5, L=40 context pairs,
beta ~ N(0, I/d), noise variance sigma^2 = 0.1; one attention layer of H full-width heads, no
bias, the query attends to the context only (``icl_attention``); Adam 1e-3, batch 256, 500k
steps. Claims: multi-head softmax reaches about the error of one step of gradient descent (the
Bayes/ridge error is reported beside it) and, at longer test contexts (80, 160), its error falls;
linear attention's does not. Test contexts here: 10, 20, 40 (training), 80, 160. CPU scale here: ``STEPS`` steps at
Adam 3e-3 with a cosine decay to 3e-4 (instead of 500k at 1e-3) and a fixed training set of
100k prompts (the paper draws fresh prompts every step).

Sweep: softmax with H = 1, 2, 4 (seeds 0, 1, 2); linear attention with H = 4: the identity feature
map without normaliser (``normalize=False``: ``sum_j (q.k_j) v_j``, the linear attention of the
ICL theory, whose output grows with L) and the elu+1 feature map with its normaliser (Katharopoulos
et al., the zoo's default ``linear``).

    python train.py --config=configs/repro/icl_regression.py --sweep --workdir=runs/repro_icl
    python eval.py --workdir=runs/repro_icl
"""

from configs import icl_regression

STEPS = 3000


def get_config():
    c = icl_regression.get_config()  # the paper's task (d = 5, L = 40, sigma^2 = 0.1) and model
    c.task.params.num_train = 100_000
    c.task.params.num_test = 2000
    c.task.params.test_context_lengths = (10, 20, 80, 160)
    c.optim.learning_rate = 3e-3  # the paper: 1e-3 constant for 500k steps; 3e-3 + cosine to fit the CPU
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.optim.final_lr_ratio = 0.1
    c.train.steps = STEPS
    c.train.batch_size = 256
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.progress_bar = False
    c.eval.batch_size = 500
    c.eval.max_batches = 4  # the whole 2000-prompt test split
    c.eval.splits = ("test", "test_ctx10", "test_ctx20", "test_ctx80", "test_ctx160")
    return c


def get_sweep():
    """Softmax with H = 1, 2, 4 heads, three seeds each (the single-head plateau is escaped or not
    depending on the initialisation); linear attention with H = 4 once per feature map."""
    out = {f"softmax_h{h}_s{seed}": {"model.num_heads": h, "seed": seed} for h in (1, 2, 4) for seed in (0, 1, 2)}
    linear = {"model.mixer": "linear", "model.num_heads": 4}
    out["linear_h4"] = {**linear, "model.mixer_options.feature_map": "identity",
                        "model.mixer_options.normalize": False}
    out["linear_elu_h4"] = {**linear, "model.mixer_options.feature_map": "elu",
                            "model.mixer_options.normalize": True}
    return out
