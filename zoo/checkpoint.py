"""Orbax checkpoints of a training run: train state, data-iterator state and the config.

One ``CheckpointManager`` per run directory (``<workdir>/checkpoints``). Each step stores three
items: ``state`` (parameters, optimizer state, step; restored with the shardings of an abstract
target), ``data`` (the grain iterator state, JSON) and ``config`` (JSON), so a run resumes
exactly where it stopped and ``eval.py`` can rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, bytes):
        return {"__bytes__": x.decode("latin-1")}
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _from_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return x["__bytes__"].encode("latin-1")
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


class Checkpointer:
    """Saves/restores ``(state, data_state, config)`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, save_every: int = 1000):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every, create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, config: dict, *, force: bool = False) -> bool:
        """Saves when ``step`` is due (or ``force``); returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_to_jsonable(data_state)),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, Any, dict]:
        """Restores ``step`` (latest if None) into the shapes/shardings of ``abstract_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        # Place every leaf exactly like the template (orbax may commit scalars to one device).
        state = jax.tree.map(
            lambda x, t: jax.device_put(x, t.sharding) if getattr(t, "sharding", None) is not None else x,
            out.state, abstract_state,
        )
        return state, _from_jsonable(out.data), out.config

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step) / "config"
        for name in ("metadata", "config.json"):
            if (path / name).exists():
                return json.loads((path / name).read_text())
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
