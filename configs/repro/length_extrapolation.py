"""Reproduction: length extrapolation of softmax vs length-scaled softplus attention with
re-weighting (issue 14 item 5; wave2 design section 5.3; docs/reproductions.md).

The paper (Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in
Large Language Models", arXiv 2501.13428): GPT-2-small-class models with RoPE trained at 1024
tokens; LSSA (``softplus(log d log n q^.k^)`` normalised) and LSSAR (LSSA re-weighted by
``relu(n a - delta)^p``, p = 15, applied without training) against softmax; LSSAR keeps a
"nearly constant validation loss at 16x the training length" where softmax's grows.

CPU scale here: a 2-layer width-128 RoPE byte-level LM trained at 64 bytes on a fixed snapshot
of this repository's text (``configs/repro/data/zoo_sources.txt``, as context_extension.py),
evaluated on the same held-out bytes at 64..1024 (16x):

- ``softmax``: softmax attention; eval variants ``logn`` (the entropy-invariant factor
  ``max(1, log n_i / log 64)`` on the logits, Chiang & Cholak 2022 / Entropy-ABF) and
  ``logn_sqrt`` (its square root, Jin et al. NeurIPS 2023), both applied after training;
- ``lssa``: softplus attention (LSSA) trained as such; eval variant ``lssar``: the re-weighting
  switched on after training (training-free, as the design notes read the paper);
- ``lssar``: LSSAR (the re-weighting, p = 15) in training too;
- ``sigmoid``: sigmoid attention without normalisation (bias ``-log n``), a softmax-free
  alternative that the paper's summary says loses extrapolation.

    python train.py --config=configs/repro/length_extrapolation.py --sweep --workdir=runs/repro_lenx
    python eval.py --workdir=runs/repro_lenx
    python docs/repro_length_extrapolation/make_report.py runs/repro_lenx docs/repro_length_extrapolation
"""


from configs import base, bytes_lm
from configs.repro import CORPUS

TRAIN_LEN = 64
TEST_LENGTHS = (128, 256, 512, 1024)
STEPS = 1000


def get_config():
    c = bytes_lm.get_config()
    c.task.params.paths = (str(CORPUS),)
    c.task.params.seq_len = TRAIN_LEN
    c.task.params.test_fraction = 0.1
    c.task.params.test_lengths = TEST_LENGTHS
    c.model.d_model = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.pos = "rope"
    c.model.mlp = "swiglu"
    c.model.max_len = max(TEST_LENGTHS)
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.train.steps = STEPS
    c.train.batch_size = 64
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.progress_bar = False
    c.eval.splits = ("test", *(f"test_len{n}" for n in TEST_LENGTHS))
    c.eval.batch_size = 8
    c.eval.max_batches = 80  # every held-out window at every length (81 KB: 79 windows at 1024)
    return c


def get_sweep():
    """softmax (with log-n scalings applied after training), LSSA (with LSSAR re-weighting
    applied after training), LSSAR trained as such and sigmoid attention, one run each."""
    opts = lambda **o: base.nest({f"model.mixer_options.{k}": v for k, v in o.items()})  # noqa: E731
    return {
        "softmax": {"model.mixer": "softmax", "eval.variants": {
            "logn": opts(logn_train_length=TRAIN_LEN),
            "logn_sqrt": opts(logn_train_length=TRAIN_LEN, logn_kind="sqrt"),
        }},
        "lssa": {"model.mixer": "softplus", "eval.variants": {"lssar": opts(reweight=True)}},
        "lssar": {"model.mixer": "softplus", "model.mixer_options.reweight": True},
        "sigmoid": {"model.mixer": "sigmoid"},
    }
