"""Selective copying (Mamba / MAD): copy the k data tokens scattered among noise, after k markers.

MAD's setting at a CPU-sized length: vocabulary 16, 16 tokens to copy, length 128, 12,800
training examples; a 2-layer width-64 model with a width-2 short convolution.

    python train.py --config=configs/selective_copying.py --workdir=runs/copying
"""

from configs import base


def get_config():
    c = base.get_config()
    c.task.name = "selective_copying"
    c.task.params.vocab_size = 16
    c.task.params.seq_len = 128
    c.task.params.num_tokens = 16
    c.model.short_conv = 2
    c.model.max_len = 128
    c.train.steps = 2000
    c.eval.splits = ("test",)
    return c


def get_sweep():
    return {"softmax": {"model.mixer": "softmax"}, "linear": {"model.mixer": "linear"},
            "gla": {"model.mixer": "gla"}}
