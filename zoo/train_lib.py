"""Training and evaluation pieces used by ``train.py`` and ``eval.py``: model factory, losses and
metrics per task kind, optimizer, sharded train/eval steps. No config parsing, no I/O.

Task kinds (``zoo.data.TaskSpec.kind``):
- ``lm_tokens``: ``inputs``/``targets`` int32 ``[B, T]``; cross-entropy and accuracy over
  positions whose target is not ``ignore_index`` (-100).
- ``regression``: ``inputs [B, T, in]``, ``targets [B, T, out]``, ``mask [B, T]``; masked MSE.
- ``classification``: ``inputs [B, T]`` tokens, ``targets [B]`` labels; cross-entropy, accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zoo import sharding

Array = jax.Array


# ----------------------------------------------------------------------------- models


class ICLAttention(nnx.Module):
    """The one-layer multi-head attention model of in-context linear regression (He, Pan, Chen,
    Yang, ICML'25; co-author repo ``XintianPan/ICL_linear``, ``src/models.py``).

    Tokens ``z_i = (x_i, y_i)`` (context, ``i < N``) and ``z_q = (x_q, 0)`` (the last row) of
    width ``E = d + 1``. Every head ``h`` has full-width ``Q^h, K^h, V^h in R^{E x E}``, no bias,
    and the output is ``sum_h O^h softmax_j(<K^h z_j, Q^h z_t> / sqrt(E)) V^h z_j`` with
    ``O^h in R^{1 x E}``, where ``j`` runs over the context rows only: the query does not attend
    to itself (cross-attention from every row to rows ``0 .. N-1``; only the query row enters the
    loss). ``mixer`` swaps the softmax for another ``zoo.attention`` transform (e.g. ``linear``),
    ``mixer_options`` are its options.

    ``__call__(x)``: ``x [B, N+1, E]`` -> ``[B, N+1, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int = 1, *, num_heads: int = 4, mixer: str = "softmax",
                 mixer_options: dict | None = None, rngs: nnx.Rngs):
        from zoo.nn import MultiHeadAttention

        self.attn = MultiHeadAttention(num_heads, in_dim, out_features=out_dim, head_dim=in_dim, transform=mixer,
                                       transform_kwargs=dict(mixer_options or {}), use_bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if getattr(x, "ndim", None) != 3 or x.shape[1] < 2:
            raise ValueError(f"x must be [batch, N+1 >= 2, d+1] (context rows then the query row); got "
                             f"{getattr(x, 'shape', x)}")
        return self.attn(x, x[:, :-1], causal=False)


def _checked_call(model_name: str, ctor: Callable, args: tuple, kw: dict, rngs: nnx.Rngs) -> nnx.Module:
    """``ctor(*args, **kw, rngs=rngs)`` after checking that every config key is an argument."""
    import inspect

    params = inspect.signature(ctor.__init__ if isinstance(ctor, type) else ctor).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or
                       (p.kind is p.POSITIONAL_OR_KEYWORD and n != "self"))
        valid = [n for n in valid if n != "rngs"]
        unknown = sorted(set(kw) - set(valid))
        if unknown:
            raise ValueError(f"model.{unknown[0]} is not an argument of model.name={model_name!r}; its arguments: "
                             f"{', '.join(valid)}")
    return ctor(*args, **kw, rngs=rngs)


def _decoder_lm(spec, rngs, cfg):
    from zoo.models import DecoderLM

    if spec.vocab_size is None:
        raise ValueError(f"model.name='decoder_lm' needs a token task; task {spec.name!r} has {spec.kind} "
                         "inputs (use positional_transformer or icl_attention)")
    return _checked_call("decoder_lm", DecoderLM, (spec.vocab_size,), model_kwargs(cfg), rngs)


def _encoder_classifier(spec, rngs, cfg):
    from zoo.models import EncoderClassifier

    kw = model_kwargs(cfg)
    if spec.vocab_size is None:
        kw.setdefault("input_dim", spec.input_dim)
    return _checked_call("encoder_classifier", EncoderClassifier, (spec.vocab_size, spec.output_dim), kw, rngs)


def _positional_transformer(spec, rngs, cfg):
    from zoo.models import PositionalTransformer

    if spec.kind != "regression":
        raise ValueError(f"model.name='positional_transformer' needs a regression task; task {spec.name!r} is "
                         f"{spec.kind}")
    kw = dict(cfg)
    scratch = kw.pop("scratch", 1)  # the task's L = n + scratch positions
    if not isinstance(scratch, int) or not 0 <= scratch < spec.seq_len:
        raise ValueError(f"model.scratch must be an int in [0, {spec.seq_len}); got {scratch!r}")
    kw.setdefault("in_dim", spec.input_dim)
    kw.setdefault("out_dim", spec.output_dim)
    return _checked_call("positional_transformer", PositionalTransformer, (spec.seq_len - scratch,),
                         {"scratch": scratch, **kw}, rngs)


def _icl_attention(spec, rngs, cfg):
    if spec.kind != "regression" or spec.input_dim is None:
        raise ValueError(f"model.name='icl_attention' needs a regression task; task {spec.name!r} is {spec.kind}")
    kw = dict(cfg)
    kw["mixer_options"] = dict(kw.get("mixer_options") or {})
    return _checked_call("icl_attention", ICLAttention, (spec.input_dim, spec.output_dim), kw, rngs)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "decoder_lm": _decoder_lm,
    "encoder_classifier": _encoder_classifier,
    "positional_transformer": _positional_transformer,
    "icl_attention": _icl_attention,
}
# Models whose ``mixer`` config key is a per-layer mixer spec (``zoo.nn.build_mixer``); for
# ``icl_attention`` it is one transform name, and ``positional_transformer`` has none.
LAYERED_MIXERS = ("decoder_lm", "encoder_classifier")


def model_kwargs(model_cfg: dict) -> dict:
    """Constructor kwargs from a model config: ``mixer`` (one name or a per-layer list) and
    ``mixer_options`` (the mixer's keyword arguments for every layer named by a string: for an
    attention transform MultiHeadAttention arguments or transform options, e.g.
    ``{"window": 8}``; for a registered mixer module its factory's) become the ``mixers``
    argument; everything else passes through."""
    import zoo.attention as za
    from zoo.nn import mixer_names

    cfg = dict(model_cfg)
    cfg.pop("name", None)
    mixer = cfg.pop("mixer", None)
    options = dict(cfg.pop("mixer_options", None) or {})
    if mixer is not None:
        mixers = [mixer] * cfg["num_layers"] if isinstance(mixer, str) else list(mixer)
        key = lambda m: "module" if isinstance(m, str) and m not in za.names() and m in mixer_names() else "transform"
        cfg["mixers"] = [m if isinstance(m, dict) or not options else {key(m): m, **options} for m in mixers]
    return cfg


def build_model(model_cfg: dict, spec: Any, *, seed: int) -> nnx.Module:
    """Builds the model named ``model_cfg["name"]`` for the task ``spec``; a config key the model
    does not take is a ValueError naming it and listing the model's arguments."""
    name = model_cfg.get("name", "decoder_lm")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not valid; expected one of {', '.join(sorted(MODELS))}")
    cfg = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    return MODELS[name](spec, nnx.Rngs(seed), cfg)


# ----------------------------------------------------------------------------- losses


def task_loss(model: nnx.Module, batch: dict, kind: str, ignore_index: int = -100) -> tuple[Array, dict]:
    """``(loss, metrics)`` for a batch; metrics are sums and counts so they average exactly."""
    out = model(batch["inputs"]).astype(jnp.float32)
    if kind == "lm_tokens":
        tgt = batch["targets"]
        valid = tgt != ignore_index
        safe = jnp.where(valid, tgt, 0)
        ce = optax.softmax_cross_entropy_with_integer_labels(out, safe)
        n = jnp.maximum(jnp.sum(valid), 1)
        loss = jnp.sum(jnp.where(valid, ce, 0.0)) / n
        correct = jnp.sum(valid & (jnp.argmax(out, -1) == tgt))
        return loss, {"loss_sum": loss * n, "correct": correct, "count": jnp.sum(valid)}
    if kind == "classification":
        ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["targets"])
        n = ce.shape[0]
        return jnp.mean(ce), {"loss_sum": jnp.sum(ce), "correct": jnp.sum(jnp.argmax(out, -1) == batch["targets"]),
                              "count": jnp.asarray(n)}
    if kind == "regression":
        mask = batch["mask"].astype(jnp.float32)
        se = jnp.sum((out - batch["targets"]) ** 2, axis=-1)
        n = jnp.maximum(jnp.sum(mask), 1.0)
        loss = jnp.sum(se * mask) / n
        return loss, {"loss_sum": loss * n, "count": jnp.sum(mask)}
    raise ValueError(f"task kind {kind!r} is not supported; expected lm_tokens, classification or regression")


def summarize(metrics: dict) -> dict:
    """Sums/counts -> ``loss`` (mean), ``accuracy`` where defined, ``perplexity`` for tokens."""
    m = {k: float(v) for k, v in metrics.items()}
    count = max(m.get("count", 1.0), 1.0)
    out = {"loss": m["loss_sum"] / count}
    if "correct" in m:
        out["accuracy"] = m["correct"] / count
    return out


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(cfg: dict, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping."""
    warmup = int(cfg.get("warmup_steps", 0))
    if warmup >= total_steps:
        raise ValueError(f"optim.warmup_steps ({warmup}) must be < train.steps ({total_steps})")
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg["learning_rate"], peak_value=cfg["learning_rate"],
        warmup_steps=warmup, decay_steps=total_steps, end_value=cfg["learning_rate"] * cfg.get("final_lr_ratio", 0.1),
    )
    chain = []
    if cfg.get("clip_norm"):
        chain.append(optax.clip_by_global_norm(cfg["clip_norm"]))
    chain.append(optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.98),
                             weight_decay=cfg.get("weight_decay", 0.0)))
    return optax.chain(*chain)


# ----------------------------------------------------------------------------- train state


def _place_like_params(opt_state: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Optimizer moments get the sharding of the parameter they belong to (matched by key path
    suffix and shape), everything else (counts, scalars) is replicated over the mesh."""
    keystr = jax.tree_util.keystr
    by_path = [(keystr(p), x.shape, x.sharding) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, x):
        ks = keystr(path)
        for pk, shape, sh in by_path:
            if ks.endswith(pk) and x.shape == shape:
                return jax.device_put(x, sh)
        return jax.device_put(x, replicated)

    return jax.tree_util.tree_map_with_path(place, opt_state)


@dataclasses.dataclass
class Trainer:
    """Holds the model graph, the optimizer and the jitted steps for one run."""

    graphdef: Any
    tx: optax.GradientTransformation
    kind: str
    mesh: jax.sharding.Mesh
    rules: tuple
    compute_dtype: Any = jnp.float32
    ignore_index: int = -100

    def init_state(self, model: nnx.Module) -> dict:
        """``{"params", "rest", "opt_state", "step"}`` placed with the logical-axis shardings."""
        _, params, rest = nnx.split(model, nnx.Param, ...)
        p_sh = sharding.state_shardings(params, self.mesh, self.rules)
        params = jax.device_put(params, p_sh)
        rest = jax.device_put(rest, sharding.state_shardings(rest, self.mesh, self.rules))
        # Optimizer moments inherit the parameter shardings (jit propagates them).
        opt_state = _place_like_params(jax.jit(self.tx.init)(params), params, self.mesh)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return {"params": params, "rest": rest, "opt_state": opt_state, "step": step}

    def _merge(self, params, rest):
        if self.compute_dtype != jnp.float32:
            dt = self.compute_dtype
            params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        return nnx.merge(self.graphdef, params, rest)

    def _loss(self, params, rest, batch):
        model = self._merge(params, rest)
        loss, metrics = task_loss(model, batch, self.kind, self.ignore_index)
        return loss, metrics

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], state["rest"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def eval_step(self, state: dict, batch: dict) -> dict:
        return self._loss(state["params"], state["rest"], batch)[1]

    def jitted(self) -> tuple[Callable, Callable]:
        """The jitted train and eval steps, each called under the run's mesh and logical-axis
        rules (``jax.set_mesh``): kernels inside the model (``zoo.attention.dispatch``) read the
        active mesh to wrap themselves in ``shard_map``, and a mesh cannot be entered inside jit."""
        train, evaluate = jax.jit(self.train_step, donate_argnums=0), jax.jit(self.eval_step)

        def in_mesh(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def call(*args: Any) -> Any:
                with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
                    return fn(*args)
            return call

        return in_mesh(train), in_mesh(evaluate)

    def model(self, state: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, state["params"], state["rest"])
