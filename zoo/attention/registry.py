"""Registry of attention transforms: ``zoo.attention.get(name)`` / ``zoo.attention.names()``.

A :class:`Transform` bundles the forms of one mechanism so models and sweeps address it by name:
``fn`` (parallel form, ``fn(q, k, v, *, causal=..., **options)``), ``reference`` (the obviously
right naive form used by the tests), and for decoding ``init_state`` / ``step``. Registered
entries may fix options (``based`` is linear attention with the Taylor feature map); extra
keyword arguments given to the transform override them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named attention mechanism and its forms."""

    name: str
    fn: Callable[..., Any]
    reference: Callable[..., Any] | None = None
    init_state: Callable[..., Any] | None = None
    step: Callable[..., Any] | None = None
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    causal_only: bool = False
    description: str = ""

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any) -> Any:
        return self.fn(q, k, v, **{**self.defaults, **kwargs})

    def bind(self, **kwargs: Any) -> Callable[..., Any]:
        """The parallel form with ``kwargs`` fixed (on top of the registered defaults)."""
        return functools.partial(self.fn, **{**self.defaults, **kwargs})


_REGISTRY: dict[str, Transform] = {}


def register(transform: Transform, *, overwrite: bool = False) -> Transform:
    """Adds ``transform`` under ``transform.name``; re-registering a name needs ``overwrite=True``."""
    if transform.name in _REGISTRY and not overwrite:
        raise ValueError(f"attention transform {transform.name!r} is already registered")
    _REGISTRY[transform.name] = transform
    return transform


def names() -> list[str]:
    """Sorted names of the registered transforms."""
    return sorted(_REGISTRY)


def get(name: str | Transform) -> Transform:
    """The :class:`Transform` registered as ``name``; ValueError listing the valid names otherwise."""
    if isinstance(name, Transform):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention transform {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name]
