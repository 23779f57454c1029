"""Base config: every experiment file starts from ``get_config()`` here and overrides a few keys.

Loaded by ``train.py`` / ``eval.py`` with ``ml_collections.config_flags``; any key can be
overridden on the command line (``--config.model.mixer=flow``). Unknown keys are an error, except
under ``task.params`` (any parameter the task declares: ``zoo.data.get_task(name).params``) and
``model.mixer_options`` (any option of the mixer: MultiHeadAttention arguments or the
transform's options), where new names may be given and are checked against those lists.
"""

import itertools

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.task = ml_collections.ConfigDict()
    c.task.name = "mqar"
    c.task.data_dir = "~/.cache/zoo/tfds"  # generated tasks are built here once (array_record)
    c.task.data_seed = 0  # seed of the generated data (the training seed is c.seed)
    c.task.params = ml_collections.ConfigDict()  # task parameters (zoo.data.get_task(name).params); unset = default

    c.model = ml_collections.ConfigDict()
    c.model.name = "decoder_lm"
    c.model.mixer = "softmax"  # a zoo.attention registry name (or a per-layer list)
    c.model.mixer_options = ml_collections.ConfigDict()  # every layer's mixer options (e.g. window=8)
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 1
    c.model.mlp = None
    c.model.short_conv = 0
    c.model.gated_conv = 0  # width of a zoology gated-convolution block before each mixer (0: off)
    c.model.pos = "learned"
    c.model.rope_scaling = None  # with pos="rope": a zoo.attention.rope scaling dict, e.g. {"kind": "yarn", ...}
    c.model.max_len = 1024

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.final_lr_ratio = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64  # global batch (split over hosts and the data/fsdp mesh axes)
    c.train.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_batches = 8
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.progress_bar = True
    # start from another run's trained parameters (a fine-tune; relative: next to the workdir, so
    # in a sweep another entry's name), at its newest readable checkpoint or init_step
    c.train.init_from = ml_collections.config_dict.placeholder(str)
    c.train.init_step = ml_collections.config_dict.placeholder(int)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.logical_axis_rules = [
        ["batch", ["data", "fsdp"]],
        ["embed", "fsdp"],
        ["heads", "tensor"],
        ["kv_heads", "tensor"],
        ["mlp", "tensor"],
        ["vocab", "tensor"],
        ["head_dim", None],
        ["length", None],
        ["layers", None],
    ]

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("test",)  # splits eval.py reports (length / value-range sweeps add more)
    c.eval.batch_size = 64
    c.eval.max_batches = 16
    # name -> config changes applied after training (nested dicts, see nest()): eval.py reports
    # each as run "<run>+<name>", the trained parameters in the changed model (a RoPE scaling,
    # LSSAR re-weighting); a sweep entry can clear them ({"eval.variants": {}})
    c.eval.variants = ml_collections.ConfigDict()
    return c


def nest(dotted: dict) -> dict:
    """``{"model.rope_scaling": x}`` -> ``{"model": {"rope_scaling": x}}`` (config sections cannot
    hold dotted keys; eval.variants values are written with this)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def model_config(name: str, **kwargs) -> ml_collections.ConfigDict:
    """A ``model`` section for a model other than ``decoder_lm`` (its own constructor arguments;
    ``train_lib.build_model`` rejects a key the model does not take)."""
    return ml_collections.ConfigDict({"name": name, **kwargs})


def product_sweep(*axes: dict) -> dict:
    """The product grid of sweep axes, each ``{label: overrides}``: one entry per combination,
    named by its labels joined with ``-`` (``softmax-d64-lr3e-03``), overrides merged, e.g.
    ``product_sweep(mixers, {f"d{d}": {"model.d_model": d} for d in (32, 64)}, lrs)``."""
    out = {}
    for combo in itertools.product(*(list(a.items()) for a in axes)):
        name = "-".join(label for label, _ in combo)
        merged = {}
        for _, overrides in combo:
            merged.update(overrides)
        out[name] = merged
    return out
