"""Single needle in a haystack (a small S-NIAH, wave2 design section 5.2): train at length 64,
test at 2x-16x (``test_len{128..1024}``); RoPE positions so that the model runs at any length.

    python train.py --config=configs/niah.py --workdir=runs/niah
    python train.py --config=configs/niah.py --config.model.mixer=titans --workdir=runs/niah_titans
"""

from configs import base


def get_config():
    c = base.get_config()
    c.task.name = "niah"
    c.task.params.vocab_size = 256
    c.task.params.seq_len = 64
    c.task.params.test_lengths = (128, 256, 512, 1024)
    c.model.pos = "rope"
    c.model.max_len = 1024
    c.train.steps = 3000
    c.eval.splits = ("test", "test_len128", "test_len256", "test_len512", "test_len1024")
    return c


def get_sweep():
    return {"softmax": {"model.mixer": "softmax"}, "linear_elu": {"model.mixer": "linear"},
            "titans": {"model.mixer": "titans"}}
