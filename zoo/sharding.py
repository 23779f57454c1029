"""Device mesh and logical-axis sharding.

Model code names the axes of every parameter with logical names (``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``); one rules table (from the config) maps them to
the mesh axes ``data``, ``fsdp`` and ``tensor``. The same code runs on one CPU (a 1x1x1 mesh)
and on a TPU pod (``jax.distributed.initialize()`` first, see :func:`maybe_initialize_distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or None = replicated). Batch is split over data and fsdp (FSDP
# shards parameters over fsdp and gathers them per layer; XLA inserts the collectives).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
)


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched multi-host (coordinator address in the
    environment, as set by SLURM/TPU/GKE launchers or ``JAX_COORDINATOR_ADDRESS``)."""
    keys = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
    if any(os.environ.get(k) for k in keys) or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize()


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> tuple[int, ...]:
    """Resolves one ``-1`` entry to use all devices; checks the product equals the device count."""
    n = len(devices) if devices is not None else jax.device_count()
    sizes = [data, fsdp, tensor]
    for name, s in zip(MESH_AXES, sizes):
        if not isinstance(s, int) or (s < 1 and s != -1):
            raise ValueError(f"mesh.{name} must be a positive int or -1; got {s!r}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh axes {sizes} do not divide the {n} devices")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) > n:
        raise ValueError(
            f"mesh data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {int(np.prod(sizes))} but there are "
            f"only {n} devices"
        )
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)``: over all devices when an axis is -1, else over
    the first ``data * fsdp * tensor`` devices (e.g. ``1, 1, 1`` = one device)."""
    shape = mesh_shape(data, fsdp, tensor)
    n = int(np.prod(shape))
    devices = jax.devices()
    if n == len(devices):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)


def rules_from(config_rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises a config rules list (``[[name, axis_or_axes_or_None], ...]``)."""
    if config_rules is None:
        return DEFAULT_RULES
    out = []
    for item in config_rules:
        if len(item) != 2:
            raise ValueError(f"logical_axis_rules entries must be (logical_name, mesh_axes); got {item!r}")
        name, axes = item
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"logical_axis_rules: {name!r} maps to unknown mesh axis {a!r}; valid: {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Sequence) -> Any:
    """``NamedSharding`` for every leaf of an ``nnx.State``, from its logical axis names."""
    with nnx.logical_axis_rules(tuple(rules)):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
    )


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: batch over the axes the ``batch`` rule names."""
    axes = dict(rules).get("batch", ("data", "fsdp"))
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, rules: Sequence) -> dict:
    """Places a host batch (dict of numpy arrays) on the mesh, split along the batch axis."""
    if jax.process_count() > 1:
        return {
            k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
            for k, v in batch.items()
        }
    return {k: jax.device_put(v, batch_sharding(mesh, rules, np.ndim(v))) for k, v in batch.items()}
