"""Orbax checkpoints of a training run: train state, data-iterator state and the config.

One ``CheckpointManager`` per run directory (``<workdir>/checkpoints``). Each step stores three
items: ``state`` (parameters, optimizer state, step; restored with the shardings of an abstract
target), ``data`` (the grain iterator state, JSON) and ``config`` (JSON), so a run resumes
exactly where it stopped and ``eval.py`` can rebuild the model from the checkpoint alone.

A checkpoint that cannot be read (a truncated array file, corrupt or missing metadata) is not
fatal: :meth:`Checkpointer.restore_readable` warns in one line naming it and falls back to the
newest readable one; with none readable it raises :class:`CheckpointError` (one line).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
from collections.abc import Callable
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


class CheckpointError(RuntimeError):
    """No usable checkpoint (none readable, or an asked-for step that does not exist)."""


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (tensorstore/orbax errors run to many lines)."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Checkpointer:
    """Saves/restores ``(state, data_state, config)`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, save_every: int = 1000,
                 read_only: bool = False):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every, create=not read_only, read_only=read_only,
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

    def restore_readable(
        self, abstract_state: Any | Callable[[dict], Any], *, step: int | None = None,
        quarantine: pathlib.Path | None = None, warn: Callable[[str], None] = _warn,
        propagate: tuple[type[BaseException], ...] = (),
    ) -> tuple[int, Any, Any, dict] | None:
        """``(step, state, data_state, config)`` of the newest checkpoint that reads back, or None
        when there is no checkpoint at all.

        ``abstract_state``: the restore template, or ``fn(config) -> template`` (eval: the model is
        rebuilt from each candidate's own config). ``step``: that step only (a CheckpointError
        listing the available steps if it is not one; no fallback). Each unreadable checkpoint is
        reported by ``warn`` in one line; with ``quarantine`` (a directory, training) the unreadable
        ones newer than the restored step are moved there so the run can save those steps again.
        No readable checkpoint: CheckpointError naming each (nothing is moved).
        Exceptions of the types in ``propagate`` (a bad config, not a bad file) are re-raised.
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint at step {step} in {self.directory}; available steps: "
                    f"{', '.join(map(str, steps)) or 'none'}"
                )
            steps = [step]
        steps = sorted(steps, reverse=True)
        if not steps:
            return None
        bad: list[tuple[int, BaseException]] = []
        for s in steps:
            try:
                template, config = abstract_state, None
                if callable(abstract_state):
                    config = self.restore_config(s)
                    template = abstract_state(config)
                state, data, cfg = self.restore(s, template)
            except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types; each is reported)
                if isinstance(e, (CheckpointError, *propagate)):
                    raise
                bad.append((s, e))
                continue
            moved = self._set_aside([b for b, _ in bad], quarantine) if quarantine is not None and bad else {}
            for b, e in bad:
                where = f" (moved to {moved[b]})" if b in moved else ""
                warn(f"warning: checkpoint {self.directory / str(b)} is unreadable ({one_line(e)}){where}; "
                     f"using step {s}")
            return s, state, data, cfg if config is None else config
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {b}: {one_line(e)}" for b, e in bad)
        )

    def _set_aside(self, steps: list[int], quarantine: pathlib.Path) -> dict[int, pathlib.Path]:
        """Moves unreadable step directories into ``quarantine`` (so those steps can be saved
        again) and re-reads the step list; returns where each went."""
        out = {}
        quarantine = pathlib.Path(quarantine)
        quarantine.mkdir(parents=True, exist_ok=True)
        for s in steps:
            dest, n = quarantine / str(s), 1
            while dest.exists():
                dest, n = quarantine / f"{s}.{n}", n + 1
            shutil.move(str(self.directory / str(s)), str(dest))
            out[s] = dest
        self.reload()
        return out

    def reload(self) -> None:
        """Re-reads the step list from disk (after checkpoints were moved away)."""
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
