"""MQAR (zoology's multi-query associative recall), the README's main job.

Setting: vocabulary 256, length 64, 4 key-value pairs (zoology's smallest cell, at a smaller
vocabulary so a CPU run takes minutes), 20k training examples; a 2-layer model of width 64,
one head, learned positions, no MLP, and a width-2 causal short convolution in each block (the
token-mixing that BASED/zoology blocks use; without it a small model sits on the 25% plateau,
see shared/design/benchmarks.md). Evaluation adds length extrapolation splits (kv pairs scaled
with the length): 128 and 256 tokens (2x and 4x).

    python train.py --config=configs/mqar.py --workdir=runs/mqar
    python train.py --config=configs/mqar.py --config.model.mixer=based --workdir=runs/mqar_based
    python train.py --config=configs/mqar.py --sweep --workdir=runs/mqar_sweep   # get_sweep()
"""

from configs import base


def get_config():
    c = base.get_config()
    c.task.name = "mqar"
    c.task.params.vocab_size = 1024
    c.task.params.seq_len = 64
    c.task.params.num_kv_pairs = 4
    c.task.params.num_train = 20000
    c.task.params.num_test = 1000
    c.task.params.test_lengths = (128, 256)
    c.model.short_conv = 2
    c.model.max_len = 256
    c.train.steps = 1500
    c.train.batch_size = 64
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.eval.splits = ("test", "test_len128", "test_len256")
    return c


def get_sweep():
    """One run per mechanism on the same task (``train.py --sweep``): name -> overrides."""
    return {
        "softmax": {"model.mixer": "softmax"},
        "linear_elu": {"model.mixer": "linear"},
        # BASED applies its 2nd-order Taylor map to small q/k heads (feature_dim 16 in the paper):
        # 4 heads of 16 give 273 features each (one head of 64 would give 4161).
        "based_taylor": {"model.mixer": "based", "model.num_heads": 4},
        "flow": {"model.mixer": "flow"},
        "aaren": {"model.mixer": "aaren"},
        "titans": {"model.mixer": "titans"},
    }
