"""Reproduction: extending a RoPE model's context with each RoPE scaling, training-free and after
a 100-sample fine-tune (issue 15; wave2 design section 2.8; docs/reproductions.md).

The papers (shared/design/wave2.md section 2): position interpolation (Chen et al. 2023), NTK-aware
and dynamic NTK scaling (bloc97 2023), YaRN (Peng et al., ICLR 2024), ABF (Xiong et al. 2023) and
Entropy-ABF ("Extending LLMs' Context Window with 100 Samples", Zhang et al. 2024), CLEX (Chen et
al., ICLR 2024) and Giraffe (Pal et al. 2023) extend pretrained Llama models from 2k-4k tokens to
16k-128k. Their claims, at our scale: without scaling, perplexity explodes past the training
length; NTK/YaRN do better than plain extrapolation and PI training-free; after a short fine-tune
at the longer length, PI/YaRN/Entropy-ABF stay flat up to that length, and CLEX (dynamic: its ODE
time follows the length) beyond it.

CPU scale here: a 2-layer width-128 byte-level LM with RoPE, trained at 256 bytes on a fixed
snapshot of this repository's text (``configs/repro/data/zoo_sources.txt``: the README and
``zoo/`` sources at commit cd13012, so the numbers do not move with the code), evaluated on the
same held-out bytes at 256..4096 (16x). ``base`` is the trained model; its ``eval.variants`` are
the scalings applied after training (factor 4, ``original_max_len=256``: target length 1024; the
trained parameters copied into the rebuilt model); the ``ft_*`` entries fine-tune ``base`` on 100
windows of 1024 bytes (25 steps of 4, the "100 samples" regime) with the scaling in place.

    python train.py --config=configs/repro/context_extension.py --sweep --workdir=runs/repro_ctx
    python eval.py --workdir=runs/repro_ctx
    python docs/repro_context_extension/make_report.py runs/repro_ctx docs/repro_context_extension
"""


from configs import base, bytes_lm
from configs.repro import CORPUS

TRAIN_LEN = 256
FINE_TUNE_LEN = 1024
TEST_LENGTHS = (256, 512, 1024, 2048, 4096)
STEPS = 1000
FACTOR = FINE_TUNE_LEN / TRAIN_LEN  # 4: the scalings target the fine-tune length


def scaling(kind: str, **options) -> dict:
    return {"kind": kind, "factor": FACTOR, "original_max_len": TRAIN_LEN, **options}


# the scalings applied after training: name -> RopeScaling keys (zoo.attention.rope)
SCALINGS = {
    "pi": scaling("linear"),
    "ntk": scaling("ntk"),
    "ntk_dynamic": scaling("ntk", dynamic=True),
    "yarn": scaling("yarn"),
    "abf": scaling("abf"),
    "entropy_abf": scaling("entropy_abf"),
    "clex_dynamic": scaling("clex", dynamic=True),  # untrained ODE: the NTK closed form at t = ceil(n / L)
    "giraffe_truncate": {"kind": "giraffe", "factor": 1.0, "original_max_len": TRAIN_LEN, "truncate": TRAIN_LEN},
}
FINE_TUNED = ("pi", "yarn", "entropy_abf", "clex_dynamic")


def splits(train_len: int) -> tuple[str, ...]:
    return ("test", *(f"test_len{n}" for n in TEST_LENGTHS if n != train_len))


def get_config():
    c = bytes_lm.get_config()
    c.task.params.paths = (str(CORPUS),)
    c.task.params.seq_len = TRAIN_LEN
    c.task.params.test_fraction = 0.1
    c.task.params.test_lengths = tuple(n for n in TEST_LENGTHS if n != TRAIN_LEN)
    c.model.d_model = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.pos = "rope"
    c.model.mlp = "swiglu"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.train.steps = STEPS
    c.train.batch_size = 32
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.progress_bar = False
    c.eval.splits = splits(TRAIN_LEN)
    c.eval.batch_size = 8
    c.eval.max_batches = 64  # every held-out window at every length (81 KB: 318 at 256, 19 at 4096)
    c.eval.variants = {name: base.nest({"model.rope_scaling": s}) for name, s in SCALINGS.items()}
    return c


def get_sweep():
    """``base`` (trained at 256; the scalings applied after training are its eval variants) and one
    100-sample fine-tune at 1024 per scaling in FINE_TUNED, started from ``base``'s parameters."""
    out = {"base": {}}
    for name in FINE_TUNED:
        out[f"ft_{name}"] = {
            "train.init_from": "base",
            "model.rope_scaling": SCALINGS[name],
            "task.params.seq_len": FINE_TUNE_LEN,
            "task.params.test_lengths": tuple(n for n in TEST_LENGTHS if n != FINE_TUNE_LEN),
            "eval.splits": splits(FINE_TUNE_LEN),
            "eval.variants": {},
            "train.steps": 25,
            "train.batch_size": 4,
            "optim.learning_rate": 1e-3,
            "optim.warmup_steps": 0,
            "optim.final_lr_ratio": 1.0,
            "train.log_every": 5,
            "train.eval_every": 25,
            "train.checkpoint_every": 25,
        }
    return out
