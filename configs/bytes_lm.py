"""Byte-level language modelling over local text (wave2 design section 5.3's CPU setting: a
2-layer width-128 RoPE model at 64 bytes).

The default text ships with the code: this repository's README and its Python sources (a few
hundred KB). Give your own corpus with ``task.params.paths`` (file names or glob patterns):

    python train.py --config=configs/bytes_lm.py --workdir=runs/bytes
    python train.py --config=configs/bytes_lm.py --config.task.params.paths="['/data/*.txt']" --workdir=runs/b
    python train.py --config=configs/bytes_lm.py --sweep --workdir=runs/bytes_sweep   # softmax vs LSSA
"""

import pathlib

from configs import base

ROOT = pathlib.Path(__file__).resolve().parents[1]


def get_config():
    c = base.get_config()
    c.task.name = "bytes_lm"
    c.task.params.paths = (str(ROOT / "README.md"), str(ROOT / "zoo" / "*.py"), str(ROOT / "zoo" / "*" / "*.py"))
    c.task.params.seq_len = 64
    c.task.params.test_fraction = 0.1
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.pos = "rope"
    c.model.mlp = "swiglu"
    c.model.max_len = 1024
    c.train.steps = 3000
    c.train.eval_every = 500
    c.eval.splits = ("test",)
    return c


def get_sweep():
    return {"softmax": {"model.mixer": "softmax"}, "lssa": {"model.mixer": "softplus"}}
