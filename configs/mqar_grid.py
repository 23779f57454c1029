"""Zoology's MQAR grid (wave2 design section 5.7), CPU-sized: mechanisms x widths x learning
rates, one run per cell; ``eval.py`` reports the best learning rate per mechanism and width.

    python train.py --config=configs/mqar_grid.py --sweep_list                     # 54 entry names
    python train.py --config=configs/mqar_grid.py --sweep --workdir=runs/grid      # all, one after another
    python train.py --config=configs/mqar_grid.py --sweep --sweep_procs=0 --workdir=runs/grid  # one per GPU
    python train.py --config=configs/mqar_grid.py --sweep_run=softmax-d64-lr3e-03 --workdir=runs/grid
    python eval.py --workdir=runs/grid

Across machines, give each scheduler task one entry: a SLURM job array over the names,
``sbatch --array=1-54 job.sh`` with ``NAME=$(python train.py --config=configs/mqar_grid.py
--sweep_list | sed -n "${SLURM_ARRAY_TASK_ID}p")`` and ``python train.py
--config=configs/mqar_grid.py --sweep_run=$NAME --workdir=runs/grid`` (README).
"""

from configs import base, mqar


def get_config():
    c = mqar.get_config()
    c.task.params.vocab_size = 256
    c.task.params.test_lengths = (128,)
    c.eval.splits = ("test", "test_len128")
    return c


def get_sweep():
    mixers = {"softmax": {"model.mixer": "softmax"}, "linear": {"model.mixer": "linear"},
              "based": {"model.mixer": "based", "model.num_heads": 4}, "gla": {"model.mixer": "gla"},
              "flow": {"model.mixer": "flow"}, "titans": {"model.mixer": "titans"}}
    widths = {f"d{d}": {"model.d_model": d} for d in (32, 64, 128)}
    lrs = {f"lr{lr:.0e}": {"optim.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)}
    return base.product_sweep(mixers, widths, lrs)
