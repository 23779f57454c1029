"""Calling a Pallas kernel from a transform: inside ``shard_map`` when a device mesh is active.

XLA cannot partition a Mosaic (TPU) or Triton (GPU) custom call: under a sharded ``jit`` it
must see the kernel inside ``shard_map``, where each device runs it on its own shard. Attention
kernels are independent per batch element and head, so :func:`kernel_call` splits exactly those
dimensions and needs no communication:

- the mesh is the one active while the caller is traced (``with jax.set_mesh(mesh):`` around
  the ``jit``-ted call, read through ``jax.sharding.get_abstract_mesh()``; the deprecated
  ``with mesh:`` too), or an explicit ``mesh=``; with no mesh, or a mesh of one device, the
  kernel is called directly. (``jax.set_mesh`` cannot be entered inside ``jit``: a train loop
  must call its jitted step under it);
- each array names its dimensions with logical axis names (``("batch", None, "heads", None)``),
  mapped to mesh axes by the active logical-axis rules (``flax.nnx.logical_axis_rules``), else
  :data:`zoo.sharding.DEFAULT_RULES` (batch over ``data`` and ``fsdp``, heads over ``tensor``);
- a mesh axis that does not divide its dimension (or is absent from the mesh, or already used by
  another dimension) is dropped: the array is replicated over it, and every device of that axis
  computes the same shard;
- axes already manual (a call inside an outer ``shard_map``) are left to the caller.

Used by ``zoo.attention.linear(impl="pallas")``; any kernel-backed implementation can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from zoo.sharding import DEFAULT_RULES

Axes = tuple[str | None, ...] | None  # logical name per dimension; None: replicated array


def active_mesh() -> Any:
    """The mesh set for the current trace (``jax.set_mesh``; else the deprecated ``with mesh:``),
    or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    try:  # `with mesh:` (deprecated in jax 0.10) only sets the physical mesh of the thread.
        from jax._src import mesh as mesh_lib

        physical = mesh_lib.thread_resources.env.physical_mesh
    except (ImportError, AttributeError):
        return None
    return None if physical.empty else physical


def active_rules() -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules in force (``nnx.logical_axis_rules``), else ``DEFAULT_RULES``."""
    try:
        from flax.core import spmd

        rules = tuple(spmd.get_logical_axis_rules())
    except (ImportError, AttributeError):
        rules = ()
    return rules or DEFAULT_RULES


def _manual_axes(mesh: Any) -> frozenset[str]:
    types = getattr(mesh, "axis_types", None) or ()
    return frozenset(n for n, t in zip(mesh.axis_names, types) if t == jax.sharding.AxisType.Manual)


def logical_to_mesh(
    sizes: Mapping[str, int], mesh: Any, rules: Sequence[tuple[str, Any]],
) -> dict[str, tuple[str, ...]]:
    """Mesh axes for each logical dimension (``sizes``: name -> length): the rule's axes in order,
    keeping an axis only when it is in the mesh, not manual, not taken by an earlier dimension and
    the product of the kept axis sizes divides the length."""
    table = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    manual = _manual_axes(mesh)
    taken: set[str] = set()
    out = {}
    for name, size in sizes.items():
        want = table.get(name)
        want = () if want is None else (want,) if isinstance(want, str) else tuple(want)
        kept: list[str] = []
        for a in want:
            if a not in mesh.axis_names or a in manual or a in taken:
                continue
            if size % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        taken.update(kept)
        out[name] = tuple(kept)
    return out


def _spec(axes: Axes, assignment: Mapping[str, tuple[str, ...]]) -> P:
    if axes is None:
        return P()
    dims = []
    for n in axes:
        m = assignment.get(n, ()) if n is not None else ()
        dims.append(None if not m else m[0] if len(m) == 1 else m)
    return P(*dims)


def kernel_call(
    fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    in_axes: Sequence[Axes],
    out_axes: Any,
    mesh: Any = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> Any:
    """``fn(*args)``, inside ``jax.shard_map`` over the active (or given) mesh when there is one.

    Args:
      fn: the kernel call, written for local shapes (it sees ``batch / |batch axes|`` etc.).
      args: its positional arrays; ``None`` entries are passed through unchanged.
      in_axes: per argument, a logical name (or None) per dimension, e.g.
        ``("batch", None, "heads", None)``; None for an argument replicated on every device.
      out_axes: the same for the outputs, as a pytree prefix of ``fn``'s result (a tuple of
        axes tuples for a tuple of arrays).
      mesh: a ``jax.sharding.Mesh`` / ``AbstractMesh`` (default: :func:`active_mesh`).
      rules: logical-axis rules (default: :func:`active_rules`).

    Returns ``fn``'s result, the outputs sharded as ``out_axes`` says.
    """
    mesh = active_mesh() if mesh is None else mesh
    if len(in_axes) != len(args):
        raise ValueError(f"in_axes has {len(in_axes)} entries for {len(args)} arguments")
    if mesh is None or mesh.empty:
        return fn(*args)
    usable = [a for a in mesh.axis_names if a not in _manual_axes(mesh)]
    if math.prod(mesh.shape[a] for a in usable) == 1:
        return fn(*args)

    sizes: dict[str, int] = {}
    for x, axes in zip(args, in_axes):
        if x is None or axes is None:
            continue
        if len(axes) != x.ndim:
            raise ValueError(f"in_axes entry {axes} has {len(axes)} names for an array of rank {x.ndim}")
        for n, d in zip(axes, x.shape):
            if n is not None and sizes.setdefault(n, d) != d:
                raise ValueError(f"logical axis {n!r} has length {sizes[n]} in one argument and {d} in another")
    assignment = logical_to_mesh(sizes, mesh, active_rules() if rules is None else rules)

    present = [i for i, x in enumerate(args) if x is not None]

    def local(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    is_axes = lambda x: x is None or (isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x))
    out_specs = jax.tree.map(lambda a: _spec(a, assignment), out_axes, is_leaf=is_axes)
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=tuple(_spec(in_axes[i], assignment) for i in present),
        out_specs=out_specs, axis_names=frozenset(usable), check_vma=False,
    )
    return sharded(*(args[i] for i in present))
