"""The mechanism contract: ``zoo.attention.get(name)`` / ``names()`` and the implementation
registry behind ``impl=``.

A :class:`Transform` is everything true of one mechanism, in one record:

- its forms: ``fn`` (parallel, ``fn(q, k, v, *, causal=False, **options)``), ``reference`` (the
  obviously right naive form the tests compare against) and, for decoding, ``init_state`` /
  ``prefill`` / ``step`` with one signature for every mechanism (below);
- its registered ``defaults`` (``based`` is linear attention with the Taylor map), honoured by
  every form: ``t(q, k, v)``, ``t.reference(...)``, ``t.init_state(...)``, ``t.prefill(...)`` and
  ``t.step(...)`` all merge them under the caller's options;
- its capabilities: ``causal_only``, ``gqa`` (k/v may have fewer heads than q), ``linear_in_v``
  (the output is a weighted sum of values, so attention weights exist for diagnostics),
  ``cache`` (``"kv"``: a KV cache whose capacity is ``max_len``; ``"recurrent"``: a fixed-size
  state), ``parallel_only`` (options a one-token step never takes), ``step_exact`` (options a
  caller must give explicitly for decoding to equal the parallel form, e.g. sigmoid's ``bias``
  whose default depends on the key length), ``decode_only`` (options only the decoding forms
  take, such as StreamingLLM's ``num_sink_tokens``; the parallel forms drop them),
  ``impl_family`` (the table of implementations its
  ``impl=`` option chooses from) and ``example_options(heads, head_dim)`` (small options that
  exercise the mechanism: learnable parameters it needs, a short window or chunk; the
  conformance suite runs every form with them) and ``init_params(key, heads, head_dim,
  value_dim, **options) -> {option: initial value}`` (the learned parameters a module owns for
  the mechanism, e.g. TTT's initial inner model and LayerNorm: arrays or tuples of arrays, heads
  first; ``zoo.nn.MultiHeadAttention`` makes them ``nnx.Param`` s and passes them as those
  options unless they are given).

Decoding, the same for every mechanism::

    state = t.init_state(batch, heads, head_dim, value_dim, kv_heads=..., max_len=..., **options)
    y, state = t.prefill(state, q, k, v, **options)      # a whole prompt in one parallel call
    y_t, state = t.step(state, q_t, k_t, v_t, **options)  # one token [batch, heads, head_dim]

``prefill`` followed by ``step`` equals the causal parallel form over the concatenation (the
conformance suite, tests/attention/test_conformance.py, checks it for every registered name).

Causality, one rule: every transform takes ``causal=False`` by default, like
``jax.nn.dot_product_attention``; a causal-only mechanism raises a ValueError unless it is
called with ``causal=True``. Modules (``zoo.nn``) are decoder mixers: ``causal=True`` by default.

Implementations (tokamax-style): ``register_impl(family, Implementation(...))`` declares a form
of a mechanism, the platforms where ``impl="auto"`` may pick it and a ``supports(**options)``
returning the reason it cannot take the given options (None when it can).
``resolve(family, impl)`` takes a name or an ordered tuple of names; ``"auto"`` walks the
family's per-platform preference list, logs its choice once, and raises listing every reason
when nothing fits.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

logger = logging.getLogger("zoo.attention")

CACHE_KINDS = ("kv", "recurrent")
# Options that only a parallel form takes: a one-token step never receives them.
PARALLEL_ONLY = frozenset({"impl", "mask", "initial_state", "return_state", "causal"})
# Arguments the decoding forms fill themselves (never options).
_DECODE_ARGS = frozenset({"batch", "heads", "head_dim", "value_dim", "kv_heads", "max_len", "dtype"})


@functools.cache
def keyword_params(fn: Callable) -> tuple[frozenset[str], bool]:
    """Named keyword parameters of ``fn`` and whether it takes ``**kwargs`` (the one place the
    zoo reads signatures)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    names = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _accepted(fn: Callable, options: Mapping[str, Any]) -> dict[str, Any]:
    names, var = keyword_params(fn)
    return dict(options) if var else {k: v for k, v in options.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named attention mechanism: its forms, defaults and capabilities (module docstring)."""

    name: str
    fn: Callable[..., Any]
    reference_fn: Callable[..., Any] | None = None
    init_state_fn: Callable[..., Any] | None = None
    prefill_fn: Callable[..., Any] | None = None
    step_fn: Callable[..., Any] | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    causal_only: bool = False
    gqa: bool = True
    linear_in_v: bool = True
    cache: str | None = None
    parallel_only: frozenset[str] = PARALLEL_ONLY
    step_exact: frozenset[str] = frozenset()
    decode_only: frozenset[str] = frozenset()
    impl_family: str | None = None
    example_options: Callable[[int, int], Mapping[str, Any]] | None = None
    init_params: Callable[..., Mapping[str, Any]] | None = None
    description: str = ""

    def __post_init__(self):
        if self.cache is not None and self.cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS} or None; got {self.cache!r}")
        decodes = (self.init_state_fn, self.prefill_fn, self.step_fn)
        if any(f is not None for f in decodes) and (None in decodes or self.cache is None):
            raise ValueError(
                f"transform {self.name!r}: a decoding form needs init_state_fn, prefill_fn, step_fn and cache"
            )
        object.__setattr__(self, "parallel_only", frozenset(self.parallel_only) | PARALLEL_ONLY)
        object.__setattr__(self, "decode_only", frozenset(self.decode_only))
        self.check_options(self.defaults)

    # ------------------------------------------------------------------ facts

    @property
    def decodes(self) -> bool:
        """Whether the mechanism has a decoding form (init_state / prefill / step)."""
        return self.step_fn is not None

    @property
    def option_names(self) -> frozenset[str]:
        """Options the parallel form takes (``causal`` and the arrays excluded)."""
        names, _ = keyword_params(self.fn)
        return names - {"q", "k", "v", "causal"}

    def check_options(self, options: Mapping[str, Any], *, what: str = "options") -> None:
        """Raises a ValueError naming every option the parallel form does not take."""
        names, var = keyword_params(self.fn)
        if var:
            return
        bad = sorted(set(options) - self.option_names - self.decode_only)
        if bad:
            raise ValueError(
                f"{what}: transform {self.name!r} takes no option {', '.join(map(repr, bad))}; valid: "
                f"{', '.join(sorted(self.option_names | self.decode_only))}"
            )

    def check_causal(self, causal: Any) -> None:
        if self.causal_only and causal is not True:
            raise ValueError(f"transform {self.name!r} is causal only: pass causal=True; got causal={causal!r}")

    def _merged(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **options}

    def _parallel(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in self._merged(options).items() if k not in self.decode_only}

    def _require_decoding(self) -> None:
        if not self.decodes:
            raise ValueError(f"transform {self.name!r} has no decoding form (init_state/prefill/step)")

    # ------------------------------------------------------------------ forms

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, **options: Any) -> Any:
        """The parallel form with the registered defaults under ``options``."""
        return self.fn(q, k, v, **self._parallel(options))

    def bind(self, **options: Any) -> Callable[..., Any]:
        """The parallel form with ``options`` fixed (on top of the registered defaults)."""
        self.check_options(options)
        return functools.partial(self.fn, **self._parallel(options))

    def reference(self, q: jax.Array, k: jax.Array, v: jax.Array, **options: Any) -> Any:
        """The naive reference with the registered defaults (options it does not take, such as
        ``impl``, are dropped)."""
        if self.reference_fn is None:
            raise ValueError(f"transform {self.name!r} has no reference form")
        return self.reference_fn(q, k, v, **_accepted(self.reference_fn, self._parallel(options)))

    def step_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options (defaults merged) that ``step`` receives: parallel-only ones dropped."""
        merged = {k: v for k, v in self._merged(options).items() if k not in self.parallel_only}
        return _accepted(self.step_fn, merged) if self.step_fn is not None else merged

    def init_state(
        self, batch: int, heads: int, head_dim: int, value_dim: int | None = None, *,
        kv_heads: int | None = None, max_len: int | None = None, dtype: Any = None, **options: Any,
    ) -> Any:
        """An empty decoding state for ``batch`` sequences (``max_len`` sizes a KV cache)."""
        self._require_decoding()
        self.check_options(options)
        opts = {k: v for k, v in self._merged(options).items() if k not in _DECODE_ARGS}
        extra = {"kv_heads": heads if kv_heads is None else kv_heads, "max_len": max_len, "dtype": dtype}
        return self.init_state_fn(
            batch, heads, head_dim, head_dim if value_dim is None else value_dim,
            **_accepted(self.init_state_fn, {**opts, **extra}),
        )

    def prefill(self, state: Any, q: jax.Array, k: jax.Array, v: jax.Array, **options: Any) -> tuple[Any, Any]:
        """A prompt ``q, k, v [batch, T, heads, dim]`` in one parallel call from ``state``:
        ``(y [batch, T, heads, value_dim], state)``, equal to T calls of :meth:`step`."""
        self._require_decoding()
        self.check_options(options)
        opts = {k: v for k, v in self._merged(options).items() if k not in PARALLEL_ONLY - {"impl"}}
        return self.prefill_fn(state, q, k, v, **_accepted(self.prefill_fn, opts))

    def step(self, state: Any, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, **options: Any) -> tuple[Any, Any]:
        """One token ``q_t [batch, heads, head_dim]``, ``k_t``/``v_t [batch, kv_heads, dim]``:
        ``(y_t [batch, heads, value_dim], state)``."""
        self._require_decoding()
        self.check_options(options)
        return self.step_fn(state, q_t, k_t, v_t, **self.step_options(options))


def recurrent_prefill(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``prefill`` of a mechanism whose causal parallel form takes ``initial_state`` and
    ``return_state``: ``prefill(state, q, k, v, **options) = fn(q, k, v, causal=True,
    initial_state=state, return_state=True, **options)`` (keeps ``fn``'s option names)."""

    @functools.wraps(fn)
    def prefill(state: Any, q: jax.Array, k: jax.Array, v: jax.Array, **options: Any) -> tuple[Any, Any]:
        return fn(q, k, v, causal=True, initial_state=state, return_state=True, **options)

    return prefill


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


# ----------------------------------------------------------------------------- implementations


def _always(**options: Any) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of a mechanism family.

    ``fn``: the core it runs (signature fixed by the family). ``platforms``: where ``"auto"`` may
    choose it. ``interpret``: a kernel that also runs (slowly, in Pallas interpret mode) on other
    platforms when named explicitly. ``supports(**options)``: the reason it cannot take these
    options, or None.
    """

    name: str
    fn: Callable[..., Any]
    platforms: tuple[str, ...] = ("cpu", "gpu", "tpu")
    interpret: bool = False
    supports: Callable[..., str | None] = _always

    def reason(self, platform: str, *, explicit: bool, **options: Any) -> str | None:
        """Why this implementation cannot run here with these options (None: it can)."""
        if platform not in self.platforms and not (explicit and self.interpret):
            return f"{self.name}: not available on {platform} (platforms {', '.join(self.platforms)})"
        why = self.supports(**options)
        return None if why is None else f"{self.name}: {why}"


_IMPLS: dict[str, dict[str, Implementation]] = {}
_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {}
_logged: set[tuple[str, str, str]] = set()


def register_impl(family: str, impl: Implementation, *, overwrite: bool = False) -> Implementation:
    """Adds ``impl`` to ``family``'s table."""
    table = _IMPLS.setdefault(family, {})
    if impl.name in table and not overwrite:
        raise ValueError(f"implementation {impl.name!r} of {family!r} is already registered")
    table[impl.name] = impl
    return impl


def set_preference(family: str, order: Mapping[str, Sequence[str]]) -> None:
    """``"auto"``'s order per platform, e.g. ``{"cpu": ("scan", "chunked"), "gpu": ("pallas", ...)}``."""
    _PREFERENCE[family] = {p: tuple(o) for p, o in order.items()}


def implementations(family: str) -> dict[str, Implementation]:
    """The implementations registered for ``family`` by name."""
    return dict(_IMPLS.get(family, {}))


def platform() -> str:
    """The default backend as ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def resolve(
    family: str, impl: str | Sequence[str] = "auto", *, on: str | None = None, **options: Any,
) -> Implementation:
    """The implementation of ``family`` that ``impl`` selects for ``options`` on platform ``on``
    (default: the default backend). ``impl``: a name, ``"auto"`` or an ordered tuple of names
    (the first that fits). Raises a ValueError listing every reason when none fits."""
    table = _IMPLS.get(family)
    if not table:
        raise ValueError(f"no implementations registered for {family!r}")
    on = on or platform()
    if isinstance(impl, str):
        explicit = impl != "auto"
        candidates = _PREFERENCE.get(family, {}).get(on, tuple(table)) if impl == "auto" else (impl,)
    elif isinstance(impl, Sequence) and impl and all(isinstance(i, str) for i in impl):
        explicit, candidates = True, tuple(impl)
    else:
        raise ValueError(f"impl must be 'auto', a name or a tuple of names of {', '.join(table)}; got {impl!r}")
    reasons = []
    for name in candidates:
        if name not in table:
            raise ValueError(f"impl={name!r} is not valid; expected 'auto' or one of {', '.join(map(repr, table))}")
        why = table[name].reason(on, explicit=explicit, **options)
        if why is None:
            key = (family, str(impl), on)
            if impl == "auto" and key not in _logged:
                _logged.add(key)
                logger.info("zoo.attention.%s: impl='auto' -> %r on %s", family, name, on)
            return table[name]
        reasons.append(why)
    raise ValueError(f"no implementation of {family!r} fits impl={impl!r} on {on}: " + "; ".join(reasons))
