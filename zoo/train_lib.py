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


def _decoder_lm(spec, rngs, **kw):
    from zoo.models import DecoderLM

    return DecoderLM(spec.vocab_size, rngs=rngs, **kw)


def _encoder_classifier(spec, rngs, **kw):
    from zoo.models import EncoderClassifier

    return EncoderClassifier(spec.vocab_size, spec.output_dim, rngs=rngs, **kw)


def _positional_transformer(spec, rngs, **kw):
    from zoo.models import PositionalTransformer

    scratch = kw.pop("scratch", 1)  # the task's L = n + scratch positions
    return PositionalTransformer(spec.seq_len - scratch, scratch=scratch, in_dim=spec.input_dim,
                                 out_dim=spec.output_dim, rngs=rngs, **kw)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "decoder_lm": _decoder_lm,
    "encoder_classifier": _encoder_classifier,
    "positional_transformer": _positional_transformer,
}


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
    """Builds the model named ``model_cfg["name"]`` for the task ``spec``."""
    name = model_cfg.get("name", "decoder_lm")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not valid; expected one of {', '.join(sorted(MODELS))}")
    return MODELS[name](spec, nnx.Rngs(seed), **model_kwargs(model_cfg))


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
