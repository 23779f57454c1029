"""Test-time memory layers: the Titans neural long-term memory and the Miras memories as NNX layers.

Both layers share one shell (Behrouz, Zhong, Mirrokni 2024, "Titans: Learning to Memorize at
Test Time", Sec. 3 and 4.4; Behrouz, Razaviyayn, Zhong, Mirrokni 2025, "It's All Connected",
Sec. 5): for ``x [B, T, E]`` and per head ``h`` (``H`` heads of width ``D``)

    q_t = l2norm(silu(conv(x W_Q))),  k_t = l2norm(silu(conv(x W_K))),  v_t = silu(conv(x W_V))
    theta_t = max_lr * sigmoid(x_t w_theta + b_theta)      (learning rate, per token and head)
    eta_t   = sigmoid(x_t w_eta + b_eta)                   (momentum)
    alpha_t = sigmoid(x_t w_alpha + b_alpha)               (forgetting; b_alpha = -5 at init)
    delta_t = softplus(x_t w_delta + b_delta)              (Huber threshold, Yaad only; 1 at init)
    y_t     = memory(q, k, v; gates)_t                     (zoo.attention.titans / .miras)
    out_t   = (rmsnorm(y_t) * sigmoid(x_t W_G)) W_O         (output norm and gate optional)

``conv`` is an optional causal depthwise convolution over time (``conv`` taps, identity at init)
after each projection, as in the paper. The memory (one per head) is an MLP of ``depth`` layers
(depth 1 = a matrix memory) whose *initial* weights ``M_0`` are parameters of the layer (zeros
for a matrix, LeCun-normal for an MLP); at test time it learns online, e.g. for Titans

    S_t = eta_t S_{t-1} - theta_t grad ||M_{t-1}(k_t) - v_t||^2,   M_t = (1 - alpha_t) M_{t-1} + S_t,
    y_t = M_t(q_t).

Training uses the chunked parallel form (``chunk_size`` C: gradients frozen at the weights of
each chunk start, :func:`zoo.attention.titans.titans`). Persistent memory (Titans Sec. 4.1):
``num_persistent`` learned tokens ``P [N_p, E]`` are fed to the memory before the sequence,
``x~ = P || x``; they are processed as a separate first segment (chunking restarts at ``x_0``)
and their outputs are dropped (:meth:`initial` returns them, MAL uses them).

Decoding (:meth:`init_state` / :meth:`prefill` / :meth:`decode_step`) runs the transform's own
state and forms: its :class:`zoo.attention.MemoryState` keeps the effective weights of the current
chunk start and the token count, and the layer sets the count to the decoding position (chunks
are counted from the first token after the persistent ones), so ``decode_step`` (the
transform's ``step``) and ``prefill`` (its chunked form continuing from the state, also from
inside a chunk) equal the chunked forward for every chunk size.

Layers: :class:`TitansMemory` (mixer ``"titans_memory"``) and :class:`MirasMemory` (mixer
``"miras_memory"``; presets by keyword, e.g. ``{"module": "miras_memory", "preset": "moneta"}``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo.attention as za
from zoo.attention.common import as_int, check_float, concrete, shape_str
from zoo.attention.miras import check_choices as _check_miras_choices
from zoo.attention.miras import make_rule as _miras_rule
from zoo.attention.titans import ACTIVATIONS, Rule, apply_memory, init_weights, l2_loss
from zoo.nn.attention import register_mixer
from zoo.nn.layers import RMSNorm, axes, cast, l2norm, normal_init, param

Array = jax.Array
GATE_INIT = {"theta": 0.0, "eta": 0.0, "alpha": -5.0, "delta": math.log(math.e - 1.0)}


class MemoryLayerState(NamedTuple):
    """Decoding state of a memory layer (float32).

    memory: the transform's :class:`zoo.attention.MemoryState` (weights ``[B, H, d_in, d_out]`` per
      memory layer, the momentum ``S``, the effective weights at the start of the current chunk
      where the gradients of the chunk's tokens are taken, and the token count).
    conv: the last ``conv - 1`` projected inputs of each of q/k/v, ``{name: [B, conv - 1, H, D]}``
      (``{}`` without convolution).
    """

    memory: za.MemoryState
    conv: dict[str, Array]


def causal_conv(x: Array, kernel: Array, state: Array) -> tuple[Array, Array]:
    """Causal depthwise convolution over time continuing from ``state``.

    ``y_t = sum_{i < w} kernel[i] * x_{t-i}`` with ``x [B, T, H, D]``, ``kernel [w, H, D]`` and the
    ``w - 1`` inputs before ``x_0`` in ``state [B, w - 1, H, D]`` (zeros at a sequence start).
    Returns ``(y [B, T, H, D], new_state [B, w - 1, H, D])`` (the last ``w - 1`` inputs).
    """
    w, t = kernel.shape[0], x.shape[1]
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    y = sum(kernel[i] * xp[:, w - 1 - i: w - 1 - i + t] for i in range(w))
    return y, xp[:, xp.shape[1] - (w - 1):].astype(state.dtype)


def _check_int(name: str, x: Any, minimum: int) -> int:
    """A Python or NumPy integer ``>= minimum`` as ``int``; ValueError naming ``name`` otherwise."""
    return as_int(name, x, minimum=minimum, allow_none=False)


def _position(name: str, position: Any, batch: int) -> Any:
    """A decoding position (int, ``[]`` or ``[batch]`` integer array) as int32: NumPy when
    concrete (>= 0 checked), else a traced array; ValueError naming ``name`` otherwise."""
    dt = getattr(position, "dtype", None)
    if isinstance(position, int) and not isinstance(position, bool):
        dt = np.dtype(np.int64)
    shape = tuple(getattr(position, "shape", ()))
    if dt is None or not jnp.issubdtype(dt, jnp.integer) or shape not in ((), (batch,)):
        raise ValueError(f"{name} must be an integer scalar or [batch={batch}] array; got {position!r}")
    c = concrete(position)
    if c is None:
        return jnp.asarray(position, jnp.int32)
    if np.any(c < 0):
        raise ValueError(f"{name} must be >= 0; got {c}")
    return c.astype(np.int32)


class _MemoryLayer(nnx.Module):
    """The shared shell of :class:`TitansMemory` and :class:`MirasMemory` (see module docstring).

    Subclasses define ``gate_names`` and the transform hooks ``_transform`` (chunked parallel
    form continuing from a state), ``_step`` (the transform's one-token step) and ``_rule`` (the
    :class:`zoo.attention.titans.Rule` the transform uses, for the read-out of the weights).
    """

    gate_names: tuple[str, ...] = ()

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int | None = None, depth: int = 2,
        expansion: int = 4, activation: str = "gelu", residual: bool = False, chunk_size: int = 16,
        conv: int = 4, qkv_silu: bool = True, qk_l2norm: bool = True, max_lr: float = 0.1,
        gate_init: dict[str, float] | None = None, grad_clip: float | None = None, num_persistent: int = 0,
        output_norm: bool = True, output_gate: bool = True, dtype: Any = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        d_model = _check_int("d_model", d_model, 1)
        num_heads = _check_int("num_heads", num_heads, 1)
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model}) when head_dim is not given")
            head_dim = d_model // num_heads
        head_dim = _check_int("head_dim", head_dim, 1)
        depth = _check_int("depth", depth, 1)
        expansion = _check_int("expansion", expansion, 1)
        chunk_size = _check_int("chunk_size", chunk_size, 1)
        conv = _check_int("conv", conv, 0)
        num_persistent = _check_int("num_persistent", num_persistent, 0)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if not (isinstance(max_lr, (int, float)) and max_lr > 0):
            raise ValueError(f"max_lr must be a positive number; got {max_lr!r}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None; got {grad_clip!r}")
        inits = {**GATE_INIT, **dict(gate_init or {})}
        unknown = set(gate_init or {}) - set(GATE_INIT)
        if unknown:
            raise ValueError(f"gate_init: unknown gates {sorted(unknown)}; valid: {', '.join(GATE_INIT)}")

        e, h, d, pd = d_model, num_heads, head_dim, param_dtype
        self.d_model, self.num_heads, self.head_dim = e, h, d
        self.depth, self.expansion, self.activation, self.residual = depth, expansion, activation, residual
        self.chunk_size, self.conv_width, self.qkv_silu, self.qk_l2norm = chunk_size, conv, qkv_silu, qk_l2norm
        self.max_lr, self.grad_clip, self.num_persistent = float(max_lr), grad_clip, num_persistent
        self.output_norm, self.output_gate, self.dtype = output_norm, output_gate, dtype

        for n in ("q", "k", "v"):
            setattr(self, f"w{n}", param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd))
            if conv:  # identity at init: tap 0 (the current token) = 1
                kern = jnp.zeros((conv, h, d), pd).at[0].set(1.0)
                setattr(self, f"conv_{n}", nnx.Param(kern, **axes(None, "heads", "head_dim")))
        for g in self.gate_names:
            setattr(self, f"{g}_proj", param(rngs, normal_init(e), (e, h), ("embed", "heads"), pd))
            setattr(self, f"{g}_bias", nnx.Param(jnp.full((h,), inits[g], pd), **axes("heads")))
        w0 = init_weights(rngs.params(), h, d, d, depth=depth, expansion=expansion)
        self.memory_weights = nnx.List([nnx.Param(w.astype(pd), **axes("heads", None, None)) for w in w0])
        if num_persistent:
            self.persistent = param(rngs, normal_init(1), (num_persistent, e), (None, "embed"), pd)
        if output_norm:
            self.out_norm = RMSNorm(d, dtype=dtype, param_dtype=pd, axis_name="head_dim", rngs=rngs)
        if output_gate:
            self.wg = param(rngs, normal_init(e), (e, h, d), ("embed", "heads", "head_dim"), pd)
        self.wo = param(rngs, normal_init(h * d), (h, d, e), ("heads", "head_dim", "embed"), pd)

    # ------------------------------------------------------------------ transform hooks

    def _transform(self, q, k, v, gates, state):  # -> (y [B, T, H, D], MemoryState), chunked
        raise NotImplementedError

    def _step(self, q, k, v, gates, state):  # one token [B, H, D] -> (y, MemoryState), chunked
        raise NotImplementedError

    def _rule(self) -> Rule:
        raise NotImplementedError

    # ------------------------------------------------------------------ pieces

    def project(self, x: Array, conv: dict[str, Array], names: tuple[str, ...] = ("q", "k", "v")
                ) -> tuple[dict[str, Array], dict[str, Array]]:
        """``x [B, T, E]`` -> ``({name: [B, T, H, D]}, new conv states)`` for ``names`` among q, k, v:
        projection, causal conv continuing from ``conv``, SiLU, l2 norm of q and k."""
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        out, new = {}, dict(conv)
        for n in names:
            y = jnp.einsum("bte,ehd->bthd", x, getattr(self, f"w{n}")[...].astype(dt))
            if self.conv_width:
                y, new[n] = causal_conv(y, getattr(self, f"conv_{n}")[...].astype(dt), conv[n])
            if self.qkv_silu:
                y = jax.nn.silu(y)
            if n != "v" and self.qk_l2norm:
                y = l2norm(y)
            out[n] = y
        return out, new

    def gates(self, x: Array) -> dict[str, Array]:
        """Per-token gates ``{name: [B, T, H]}`` float32 (see module docstring)."""
        xf = x.astype(jnp.float32)
        out = {}
        for g in self.gate_names:
            z = jnp.einsum("bte,eh->bth", xf, getattr(self, f"{g}_proj")[...].astype(jnp.float32))
            z = z + getattr(self, f"{g}_bias")[...].astype(jnp.float32)
            if g == "theta":
                out[g] = self.max_lr * jax.nn.sigmoid(z)
            elif g == "delta":
                out[g] = jax.nn.softplus(z)
            else:
                out[g] = jax.nn.sigmoid(z)
        return out

    def output(self, x: Array, y: Array) -> Array:
        """``y [B, T, H, D]`` -> ``[B, T, E]``: per-head RMS norm, gate ``sigmoid(x W_G)``, ``W_O``."""
        dt = self.dtype or x.dtype
        y = y.astype(dt)
        if self.output_norm:
            y = self.out_norm(y)
        if self.output_gate:
            y = y * jax.nn.sigmoid(jnp.einsum("bte,ehd->bthd", x.astype(dt), self.wg[...].astype(dt)))
        return cast(jnp.einsum("bthd,hde->bte", y, self.wo[...].astype(dt)), self.dtype)

    def read_weights(self, memory: za.MemoryState) -> tuple[Array, ...]:
        """The effective weights ``R(A)`` of a memory state (the read-out of Miras' retention)."""
        return self._rule().read(memory.weights)

    def retrieve(self, x: Array, weights: tuple[Array, ...], conv: dict[str, Array]
                 ) -> tuple[Array, dict[str, Array]]:
        """Read-only retrieval ``M*(q)`` (no update) with effective ``weights`` ``[B, H, d_in, d_out]``
        and queries from ``x [B, T, E]``: returns ``(out [B, T, E], conv)`` (only q's conv state
        advances). Used by MAC for ``h_t = M*_{t-1}(S^{(t)} W_Q)``."""
        f, conv = self.project(x, conv, ("q",))
        q = jnp.moveaxis(f["q"].astype(jnp.float32), 1, 2)
        y = apply_memory(weights, q, activation=self.activation, residual=self.residual)
        return self.output(x, jnp.moveaxis(y, 1, 2)), conv

    # ------------------------------------------------------------------ states

    def _empty(self, batch: int) -> MemoryLayerState:
        ws = [w[...].astype(jnp.float32) for w in self.memory_weights]
        mem = za.memory_init_state(batch, self.num_heads, self.head_dim, self.head_dim, weights=ws)
        dt = self.dtype or jnp.float32
        conv = {n: jnp.zeros((batch, self.conv_width - 1, self.num_heads, self.head_dim), dt)
                for n in ("q", "k", "v")} if self.conv_width else {}
        return MemoryLayerState(mem, conv)

    def initial(self, batch: int) -> tuple[Array | None, MemoryLayerState]:
        """The state after the persistent tokens, broadcast to ``batch``, and their outputs
        ``[1, N_p, E]`` (None without persistent tokens). Without persistent tokens: the initial
        weights ``M_0``, zero momentum and zero conv states. The token count is 0 (the sequence
        starts a chunk)."""
        if not self.num_persistent:
            return None, self._empty(batch)
        p = self.persistent[...][None].astype(self.dtype or jnp.float32)
        y, st = self.stream(p, self._empty(1))
        grow = lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:])
        mem = st.memory
        mem = za.MemoryState(*(tuple(map(grow, x)) for x in (mem.weights, mem.momentum, mem.frozen)),
                             jnp.zeros((), jnp.int32))
        return y, MemoryLayerState(mem, jax.tree.map(grow, st.conv))

    def _run(self, x: Array, state: MemoryLayerState, count: Any) -> tuple[Array, MemoryLayerState]:
        f, conv = self.project(x, state.conv)
        y, mem = self._transform(f["q"], f["k"], f["v"], self.gates(x), state.memory._replace(count=count))
        return self.output(x, y), MemoryLayerState(mem, conv)

    def stream(self, x: Array, state: MemoryLayerState) -> tuple[Array, MemoryLayerState]:
        """Chunked forward of ``x [B, T, E]`` continuing from ``state`` (chunks start at ``x_0``):
        write every token and read it back; returns ``(out [B, T, E], state after x)``."""
        return self._run(x, state, np.zeros((), np.int32))

    def stream_step(self, x_t: Array, state: MemoryLayerState, chunk_pos: Array | int
                    ) -> tuple[Array, MemoryLayerState]:
        """One token ``x_t [B, E]`` of :meth:`stream`; ``chunk_pos`` (``[]`` or ``[B]`` int) is its
        index in the stream (a chunk starts where ``chunk_pos % chunk_size == 0``). Equal to
        :meth:`stream` at that token (the transform's ``step`` on the state with count
        ``chunk_pos``)."""
        x = x_t[:, None]
        f, conv = self.project(x, state.conv)
        q, k, v = (f[n][:, 0] for n in ("q", "k", "v"))
        g = {n: a[:, 0] for n, a in self.gates(x).items()}
        count = _position("position", chunk_pos, x_t.shape[0])
        y, mem = self._step(q, k, v, g, state.memory._replace(count=count))
        return self.output(x, y[:, None])[:, 0], MemoryLayerState(mem, conv)

    # ------------------------------------------------------------------ mixer interface

    def _check_x(self, name: str, x: Array, ndim: int) -> None:
        layout = "[batch, length, d_model" if ndim == 3 else "[batch, d_model"
        if getattr(x, "ndim", None) != ndim or x.shape[-1] != self.d_model:
            raise ValueError(f"{name} must be {layout}={self.d_model}]; got {shape_str(x)}")
        check_float(name, x)
        if ndim == 3 and x.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one token (length >= 1); got {shape_str(x)}")

    def __call__(self, x: Array, *, causal: bool = True) -> Array:
        """``x [B, T, E]`` -> ``[B, T, E]`` (causal only; persistent tokens, if any, first)."""
        if causal is not True:
            raise ValueError(f"causal must be True: a test-time memory is causal; got causal={causal!r}")
        self._check_x("x", x, 3)
        _, st = self.initial(x.shape[0])
        return self.stream(x, st)[0]

    def init_state(self, batch: int, max_len: int | None = None) -> MemoryLayerState:
        """Decoding state after the persistent tokens (constant size: ``max_len`` is unused)."""
        return self.initial(batch)[1]

    def prefill(self, x: Array, state: MemoryLayerState, position: Array | int = 0
                ) -> tuple[Array, MemoryLayerState]:
        """``x [B, T, E]`` at positions ``position .. position + T - 1`` (``position`` scalar or
        ``[B]``, counted as in :meth:`decode_step`) in one chunked parallel call, continuing from
        ``state`` (also from inside a chunk) -> ``(y [B, T, E], state)``; equals ``T``
        :meth:`decode_step` calls."""
        self._check_x("x", x, 3)
        return self._run(x, state, _position("position", position, x.shape[0]))

    def decode_step(self, x_t: Array, state: MemoryLayerState, position: Array | int
                    ) -> tuple[Array, MemoryLayerState]:
        """One token ``x_t [B, E]`` at ``position`` (scalar or ``[B]``, counted from the first
        token after the persistent ones) -> ``(y_t [B, E], state)``; equals the forward there."""
        self._check_x("x_t", x_t, 2)
        return self.stream_step(x_t, state, position)


class TitansMemory(_MemoryLayer):
    """Titans' neural long-term memory (LMM) as a layer ``[B, T, E] -> [B, T, E]`` (module docstring).

    Memory per head: ``M(x) = z_L`` with ``z_l = act(z_{l-1}) W_l`` (``depth`` layers, hidden
    ``expansion * head_dim``; ``residual``: ``M(x) + x``), trained online by
    ``S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2``, ``M_t = (1 - alpha_t) M_{t-1} + S_t``,
    read ``y_t = M_t(q_t)`` (:func:`zoo.attention.titans`).

    Args:
      d_model: width ``E``; num_heads: memory heads ``H``; head_dim: ``D`` (default ``E // H``).
      depth: memory layers (1 = matrix memory, initial weights zeros; >= 2 = MLP, LeCun normal).
      expansion, activation, residual: the memory MLP (hidden ``expansion * D``).
      chunk_size: tokens per chunk of the parallel form (gradients frozen at chunk starts).
      conv: width of the causal depthwise conv after each of the q/k/v projections (0 = off).
      qkv_silu, qk_l2norm: SiLU on q/k/v, l2 normalisation of q and k (the paper's choices).
      max_lr: ``theta_t = max_lr * sigmoid(.)``; gate_init: bias init per gate
        (``{"theta": 0, "eta": 0, "alpha": -5}`` by default: theta = max_lr / 2, eta = 0.5,
        alpha ~ 0.007).
      grad_clip: per-token surprise clipping (global norm), None = off.
      num_persistent: persistent memory tokens ``N_p`` fed to the memory before the sequence.
      output_norm, output_gate: per-head RMS norm and sigmoid gate before the output projection.
      dtype, param_dtype: compute / parameter dtypes (the memory itself runs in float32).

    Parameters (logical axes): ``wq, wk, wv, wg [E, H, D]`` (embed, heads, head_dim),
    ``conv_q/k/v [conv, H, D]`` (None, heads, head_dim), ``{theta,eta,alpha}_proj [E, H]``
    (embed, heads), biases ``[H]`` (heads), ``memory_weights[l] [H, d_in, d_out]`` (heads, None,
    None), ``persistent [N_p, E]`` (None, embed), ``out_norm.scale [D]`` (head_dim),
    ``wo [H, D, E]`` (heads, head_dim, embed).

    Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024).
    """

    gate_names = ("theta", "eta", "alpha")

    def _rule(self) -> Rule:
        return Rule(l2_loss, activation=self.activation, residual=self.residual,
                            grad_clip=self.grad_clip)

    def _opts(self) -> dict[str, Any]:
        return dict(activation=self.activation, residual=self.residual, grad_clip=self.grad_clip,
                    chunk_size=self.chunk_size)

    def _transform(self, q, k, v, gates, state):
        return za.titans(q, k, v, **gates, **self._opts(), initial_state=state, return_state=True, causal=True)

    def _step(self, q, k, v, gates, state):
        return za.titans_step(state, q, k, v, **gates, **self._opts())


class MirasMemory(_MemoryLayer):
    """A Miras memory layer ``[B, T, E] -> [B, T, E]``: the :class:`TitansMemory` shell around
    :func:`zoo.attention.miras` with a choice of attentional bias, retention and algorithm.

    ``S_t = eta_t S_{t-1} - theta_t grad l(R(A_{t'}); k_t, v_t)`` (``gd``: no momentum),
    ``A_t = (1 - alpha_t) A_{t-1} + S_t``, ``y_t = M_{R(A_t)}(q_t)`` with the bias ``l``
    (``dot | l2 | lp | huber``), the retention read-out ``R`` (``none | l2 | lq | kl``) and the
    algorithm (``gd | momentum``). Only the gates the choices use are parameters: ``eta`` with
    momentum, ``alpha`` unless retention is ``none``, ``delta_t`` (softplus, 1 at init) with
    ``huber``.

    Args:
      preset: ``"moneta"`` (lp bias p = 3, lq retention q = 4), ``"yaad"`` (Huber bias, l2
        retention) or ``"memora"`` (l2 bias, KL retention: softmax read-out, mass ``kl_scale``),
        all with ``gd``; or None and explicit ``bias`` / ``retention`` / ``algorithm`` (explicit
        values override a preset's).
      p, q_order, kl_scale, eps: options of the lp bias, lq retention, KL retention.
      Other arguments as :class:`TitansMemory`. The papers use a 2-layer residual MLP memory
      (``depth=2, residual=True``; the default here is ``depth=2``, no residual).

    Paper: Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey Through Test-Time
    Memorization, Attentional Bias, Retention, and Online Optimization" (2025).
    """

    def __init__(
        self, d_model: int, num_heads: int, *, preset: str | None = None, bias: str | None = None,
        retention: str | None = None, algorithm: str | None = None, p: float = 3.0, q_order: float = 4.0,
        kl_scale: float = 1.0, eps: float = 1e-6, rngs: nnx.Rngs, **kw: Any,
    ):
        if preset is not None and preset not in za.MIRAS_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(map(repr, za.MIRAS_PRESETS))} or None; got {preset!r}")
        choice = dict(za.MIRAS_PRESETS[preset]) if preset else {"bias": "l2", "retention": "l2", "algorithm": "gd"}
        for name, val in (("bias", bias), ("retention", retention), ("algorithm", algorithm)):
            if val is not None:
                choice[name] = val
        _check_miras_choices(choice["bias"], choice["retention"], choice["algorithm"], p=p, q_order=q_order,
                              kl_scale=kl_scale, eps=eps, eta=None, alpha=None, delta=None)
        self.preset, self.bias, self.retention, self.algorithm = preset, choice["bias"], choice["retention"], \
            choice["algorithm"]
        self.p, self.q_order, self.kl_scale, self.eps = float(p), float(q_order), float(kl_scale), float(eps)
        names = ["theta"]
        if self.algorithm == "momentum":
            names.append("eta")
        if self.retention != "none":
            names.append("alpha")
        if self.bias == "huber":
            names.append("delta")
        self.gate_names = tuple(names)
        super().__init__(d_model, num_heads, rngs=rngs, **kw)

    def _opts(self) -> dict[str, Any]:
        return dict(bias=self.bias, retention=self.retention, algorithm=self.algorithm, p=self.p,
                    q_order=self.q_order, kl_scale=self.kl_scale, eps=self.eps, activation=self.activation,
                    residual=self.residual, grad_clip=self.grad_clip, chunk_size=self.chunk_size)

    def _rule(self) -> Rule:
        return _miras_rule(self.bias, self.retention, p=self.p, q_order=self.q_order, kl_scale=self.kl_scale,
                            eps=self.eps, activation=self.activation, residual=self.residual,
                            grad_clip=self.grad_clip)

    def _transform(self, q, k, v, gates, state):
        return za.miras(q, k, v, **gates, **self._opts(), initial_state=state, return_state=True, causal=True)

    def _step(self, q, k, v, gates, state):
        return za.miras_step(state, q, k, v, **gates, **self._opts())


# ----------------------------------------------------------------------------- mixers


def titans_memory_mixer(
    d_model: int, rngs: nnx.Rngs, *, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> TitansMemory:
    """``zoo.nn.register_mixer`` factory of :class:`TitansMemory` (mixer ``"titans_memory"``)."""
    return TitansMemory(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        **kw)


def miras_memory_mixer(
    d_model: int, rngs: nnx.Rngs, *, num_heads: int, head_dim: int | None = None, dtype: Any = None,
    param_dtype: Any = jnp.float32, **kw: Any,
) -> MirasMemory:
    """``zoo.nn.register_mixer`` factory of :class:`MirasMemory` (mixer ``"miras_memory"``; pass
    ``preset=`` or ``bias=/retention=/algorithm=``)."""
    return MirasMemory(d_model, num_heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       **kw)


register_mixer(
    "titans_memory", titans_memory_mixer,
    description="TitansMemory: the Titans neural-memory layer with data-dependent gates (the mixer 'titans' is "
                "the titans transform with constant gates inside MultiHeadAttention)",
)
register_mixer(
    "miras_memory", miras_memory_mixer,
    description="MirasMemory: the Miras memory layer with data-dependent gates; presets by keyword "
                "({'module': 'miras_memory', 'preset': 'moneta'|'yaad'|'memora'})",
)

__all__ = ["MemoryLayerState", "MirasMemory", "TitansMemory", "causal_conv", "miras_memory_mixer",
           "titans_memory_mixer"]
