"""sigmaReparam: spectrally reparametrised dense layer (Zhai et al., ICML 2023).

    W_hat = (gamma / sigma(W)) W,      sigma(W) = v^T W u        (torch layout W [out, in])

with one power-iteration step per *training* forward pass from the stored right singular
vector estimate ``u``:

    v <- normalize(W u),   u <- normalize(W^T v),   sigma = v^T W u.

``u`` and ``v`` are stop-gradient (``u`` is an ``nnx.BatchStat``: it is state, not a parameter,
so an optimiser built with ``wrt=nnx.Param`` never touches it), but the gradient flows through
``W`` inside ``sigma``. In evaluation mode (``deterministic=True``, set by ``model.eval()`` or
``nnx.view(model, deterministic=True)``) the same step is run from the stored ``u`` without
writing it back. ``gamma`` is a learnable scalar initialised to ``sigma(W_0)`` (the vision code:
``W_hat = W`` at init) or to 1 (the Flax speech code). ``u`` is initialised from the SVD of
``W_0`` as in the source (``u_init="random"`` draws a random unit vector instead).

Here the kernel is stored in the Flax layout ``kernel [in, out] = W^T`` so ``y = x kernel_hat + b``
with ``kernel_hat = (gamma / sigma) kernel``; ``u`` is ``[in]``, ``v`` is ``[out]``.

Paper: Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu, Susskind, "Stabilizing
Transformer Training by Preventing Attention Entropy Collapse" (ICML 2023);
reference code apple/ml-sigma-reparam ``vision/layers.py`` (``SNLinear``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.nn.layers import axes
from zoo.nn.layers import axis_init as _init

Array = jax.Array
GAMMA_INITS = ("sigma", "one")



def _normalize(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def power_iteration(kernel: Array, u: Array) -> tuple[Array, Array, Array]:
    """One power-iteration step on ``W = kernel^T``: returns ``(sigma, u_new, v)``.

    ``v = normalize(W u)``, ``u_new = normalize(W^T v)``, ``sigma = v^T W u_new``; ``u_new`` and
    ``v`` are stop-gradient, ``sigma`` is differentiable in ``kernel``. float32 inside.
    """
    k = kernel.astype(jnp.float32)
    u = jax.lax.stop_gradient(u.astype(jnp.float32))
    v = jax.lax.stop_gradient(_normalize(u @ k))  # W u, [out]
    u_new = jax.lax.stop_gradient(_normalize(k @ v))  # W^T v, [in]
    sigma = u_new @ k @ v
    return sigma, u_new, v


class SigmaReparamDense(nnx.Module):
    """Dense layer ``y = x ((gamma / sigma(W)) W)^T + b`` with a power-iteration ``sigma``.

    Args:
      in_features, out_features: sizes; ``x [..., in_features] -> y [..., out_features]``.
      use_bias: add ``b [out_features]``.
      gamma_init: ``"sigma"`` (``gamma = sigma(W_0)``, so ``W_hat = W`` at init; vision code),
        ``"one"`` (speech code) or a number.
      u_init: ``"svd"`` (top right singular vector of ``W_0``, the source's choice) or
        ``"random"`` (a random unit vector; the first steps then converge to it).
      kernel_init: initialiser of ``kernel [in, out]`` (default LeCun normal).
      kernel_axes: logical axis names of the kernel (default ``("embed", "mlp")``); the bias
        uses the last, ``u`` the first.
      deterministic: evaluation mode (the stored ``u`` is not updated); switched by
        ``model.train()`` / ``model.eval()`` and overridable per call.

    State: ``kernel``, ``bias``, ``gamma`` (``nnx.Param``); ``u [in]`` and ``sigma [] `` (the
    last ``sigma`` estimate) as ``nnx.BatchStat``.
    """

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True,
        gamma_init: str | float = "sigma", u_init: str = "svd",
        kernel_init: Any = None,
        kernel_axes: tuple[str | None, str | None] = ("embed", "mlp"),
        deterministic: bool = False, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if not (gamma_init in GAMMA_INITS or isinstance(gamma_init, (int, float))):
            raise ValueError(f"gamma_init must be one of {GAMMA_INITS} or a number; got {gamma_init!r}")
        if u_init not in ("svd", "random"):
            raise ValueError(f"u_init must be 'svd' or 'random'; got {u_init!r}")
        if len(kernel_axes) != 2:
            raise ValueError(f"kernel_axes must name the 2 kernel axes; got {kernel_axes!r}")
        self.in_features, self.out_features = in_features, out_features
        kernel_init = nnx.initializers.lecun_normal() if kernel_init is None else kernel_init
        self.deterministic = deterministic
        self.kernel = nnx.Param(
            _init(kernel_init, *kernel_axes)(rngs.params(), (in_features, out_features), param_dtype)
        )
        self.bias = (
            nnx.Param(_init(nnx.initializers.zeros_init(), kernel_axes[1])(rngs.params(), (out_features,),
                                                                           param_dtype))
            if use_bias else None
        )
        k0 = self.kernel[...].astype(jnp.float32)
        if u_init == "svd":
            left, s, _ = jnp.linalg.svd(k0, full_matrices=False)  # kernel = W^T: left vectors of kernel
            u0 = left[:, 0]
            sigma0 = s[0]
        else:
            u0 = _normalize(jax.random.normal(rngs.params(), (in_features,), jnp.float32))
            sigma0, u0, _ = power_iteration(k0, u0)
        if gamma_init == "sigma":
            g = sigma0
        elif gamma_init == "one":
            g = jnp.float32(1.0)
        else:
            g = jnp.float32(gamma_init)
        self.gamma = nnx.Param(jnp.asarray(g, param_dtype), **axes())
        self.u = nnx.BatchStat(_init(lambda *_: u0, kernel_axes[0])(None, None))
        self.sigma = nnx.BatchStat(jnp.asarray(sigma0, jnp.float32))

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` freezes ``u``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def effective_kernel(self) -> Array:
        """``kernel_hat = gamma kernel / sigma`` with the stored ``sigma`` (that of the last call)."""
        return self.gamma[...] * self.kernel[...] / self.sigma[...].astype(self.kernel[...].dtype)

    def __call__(self, x: Array, *, deterministic: bool | None = None) -> Array:
        """``x [..., in_features] -> [..., out_features]``; one power-iteration step per call."""
        if getattr(x, "ndim", 0) < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must be [..., in_features={self.in_features}]; got shape {getattr(x, 'shape', None)}"
            )
        det = self.deterministic if deterministic is None else deterministic
        sigma, u_new, _ = power_iteration(self.kernel[...], self.u[...])
        if not det:
            self.u[...] = u_new
            self.sigma[...] = jax.lax.stop_gradient(sigma)
        kernel = self.gamma[...].astype(jnp.float32) * self.kernel[...].astype(jnp.float32) / sigma
        y = jnp.einsum("...i,io->...o", x.astype(jnp.float32), kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
