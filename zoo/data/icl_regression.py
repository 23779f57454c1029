"""In-context linear regression (He, Pan, Chen, Yang, ICML'25, arXiv 2503.12734).

Each example is a fresh regression problem: ``beta ~ N(0, (beta_scale^2 / d) I_d)``,
``x_i ~ N(0, I_d)``, ``y_i = beta^T x_i + eps_i`` with ``eps_i ~ N(0, noise_std^2)``. The model
reads ``N`` context tokens ``(x_i, y_i)`` and one query token ``(x_q, 0)`` and must predict
``y_q`` (noisy, like the context labels) at the query position::

    inputs  float32[N+1, d+1]: rows 0..N-1 = [x_i, y_i], row N = [x_q, 0]
    targets float32[N+1, 1]:   0 except targets[N] = y_q
    mask    float32[N+1]:      1 only at the query position

The paper compares trained softmax / linear attention with ridge regression and the Bayes
predictor; with this Gaussian prior they coincide: the posterior mean of beta is ridge with
``lambda = noise_std^2 d / beta_scale^2``. :func:`baselines` computes that error and the errors
of least squares and of predicting 0 (the prior mean) on any batch. Length-generalisation
splits ``test_ctx{M}`` use ``M`` context examples (default 2N and 4N).

Defaults follow the paper's setup (co-author repo ``XintianPan/ICL_linear``,
``utils/data_utils.py:LinearReg``): d=5, N=8d=40, ``beta ~ N(0, I/d)``, label-noise variance
``sigma^2 = 0.1`` (``noise_std = sqrt(0.1)``, :data:`NOISE_STD`).

The paper's query token attends to the N context tokens only, not to itself: that is a property
of the model (``train.py``'s ``model.name="icl_attention"`` computes it as cross-attention from
every token to the context rows); the query's label slot is 0 here, so a model that does let it
attend to itself sees no label, but it is not the paper's model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zoo.data import registry as R

NOISE_STD = math.sqrt(0.1)  # the paper's sigma^2 = 0.1


def icl_regression(
    num_examples: int,
    *,
    seed: int | np.random.Generator,
    dim: int = 5,
    num_context: int = 40,
    noise_std: float = NOISE_STD,
    beta_scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Generates in-context linear-regression prompts (see the module docstring).

    Args:
      num_examples: number of prompts ``B``.
      seed: int seed or numpy Generator.
      dim: covariate dimension ``d``.
      num_context: context examples ``N`` per prompt (sequence length ``N + 1``).
      noise_std: label noise standard deviation (default ``sqrt(0.1)``: the paper's ``sigma^2 = 0.1``).
      beta_scale: ``beta ~ N(0, beta_scale^2 / d I)``, so that ``Var(beta^T x) = beta_scale^2``.

    Returns:
      ``{"inputs": float32[B, N+1, d+1], "targets": float32[B, N+1, 1], "mask": float32[B, N+1]}``.
    """
    dim, num_context, noise_std, beta_scale = _check_args(dim, num_context, noise_std, beta_scale)
    b = R.check_int("num_examples", num_examples, low=0)
    rng = R.as_rng(seed)
    n = num_context
    x = rng.standard_normal((b, n + 1, dim))
    beta = rng.standard_normal((b, dim)) * (beta_scale / np.sqrt(dim))
    y = np.einsum("bnd,bd->bn", x, beta) + noise_std * rng.standard_normal((b, n + 1))
    inputs = np.concatenate([x, y[..., None]], axis=-1)
    inputs[:, n, dim] = 0.0
    targets = np.zeros((b, n + 1, 1))
    targets[:, n, 0] = y[:, n]
    mask = np.zeros((b, n + 1), np.float32)
    mask[:, n] = 1.0
    return {
        "inputs": inputs.astype(np.float32),
        "targets": targets.astype(np.float32),
        "mask": mask,
    }


def ridge_predict(inputs: np.ndarray, lam: float) -> np.ndarray:
    """Ridge prediction of ``y_q`` for each prompt: ``x_q^T (X^T X + lam I)^-1 X^T y``.

    Args:
      inputs: ``float[B, N+1, d+1]`` prompts as made by :func:`icl_regression`.
      lam: ridge strength (``0`` gives least squares, minimum-norm when ``N < d``).

    Returns:
      ``float64[B]`` predictions.
    """
    a = np.asarray(inputs, np.float64)
    x, y, xq = a[:, :-1, :-1], a[:, :-1, -1], a[:, -1, :-1]
    d = x.shape[-1]
    gram = np.einsum("bnd,bne->bde", x, x)
    rhs = np.einsum("bnd,bn->bd", x, y)
    if lam > 0:
        w = np.linalg.solve(gram + lam * np.eye(d), rhs[..., None])[..., 0]
    else:
        w = np.einsum("bde,be->bd", np.linalg.pinv(gram, hermitian=True), rhs)
    return np.einsum("bd,bd->b", w, xq)


def baselines(
    batch: dict[str, np.ndarray], *, noise_std: float = NOISE_STD, beta_scale: float = 1.0
) -> dict[str, float]:
    """Reference errors on a batch: the numbers a trained model is compared with.

    Returns a dict of mean squared errors at the query position:
      ``bayes_mse``: the Bayes-optimal predictor (= ridge with ``noise_std^2 d / beta_scale^2``);
      ``ols_mse``: least squares on the context (min-norm if ``N < d``);
      ``zero_mse``: always predicting 0 (the prior mean; about ``beta_scale^2 + noise_std^2``).
    """
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    y_q = targets[:, -1, 0].astype(np.float64)
    d = inputs.shape[-1] - 1
    lam = noise_std**2 * d / beta_scale**2
    return {
        "bayes_mse": float(np.mean((ridge_predict(inputs, lam) - y_q) ** 2)),
        "ols_mse": float(np.mean((ridge_predict(inputs, 0.0) - y_q) ** 2)),
        "zero_mse": float(np.mean(y_q**2)),
    }


def _check_args(dim: Any, num_context: Any, noise_std: Any, beta_scale: Any):
    return (
        R.check_int("dim", dim, low=1),
        R.check_int("num_context", num_context, low=1),
        R.check_float("noise_std", noise_std, low=0.0),
        R.check_float("beta_scale", beta_scale, low=0.0, strict=True),
    )


def _check(p: dict[str, Any]) -> dict[str, Any]:
    p["dim"], p["num_context"], p["noise_std"], p["beta_scale"] = _check_args(
        p["dim"], p["num_context"], p["noise_std"], p["beta_scale"]
    )
    p["num_train"] = R.check_int("num_train", p["num_train"], low=1)
    p["num_test"] = R.check_int("num_test", p["num_test"], low=1)
    if p["test_context_lengths"] is None:
        p["test_context_lengths"] = (2 * p["num_context"], 4 * p["num_context"])
    p["test_context_lengths"] = R.check_int_tuple("test_context_lengths", p["test_context_lengths"])
    return p


def _splits(p: dict[str, Any]) -> dict[str, R.Split]:
    kw = {k: p[k] for k in ("dim", "num_context", "noise_std", "beta_scale")}
    out = {"train": R.Split(p["num_train"], kw), "test": R.Split(p["num_test"], kw)}
    for m in p["test_context_lengths"]:
        out[f"test_ctx{m}"] = R.Split(p["num_test"], {**kw, "num_context": m})
    return out


TASK = R.register(
    R.Task(
        name="icl_regression",
        kind="regression",
        description=__doc__,
        params={
            "dim": R.Param(5, "covariate dimension d"),
            "num_context": R.Param(40, "context examples N in training prompts"),
            "noise_std": R.Param(NOISE_STD, "label noise standard deviation (sqrt(0.1): the paper's sigma^2 = 0.1)"),
            "beta_scale": R.Param(1.0, "beta ~ N(0, beta_scale^2/d I)"),
            "num_train": R.Param(20_000, "training prompts"),
            "num_test": R.Param(1_000, "prompts per test split"),
            "test_context_lengths": R.Param(None, "test_ctx{M} splits; None = 2N and 4N"),
        },
        generate=icl_regression,
        check=_check,
        split_fn=_splits,
        spec_fn=lambda p: R.regression_spec(
            "icl_regression", seq_len=p["num_context"] + 1, input_dim=p["dim"] + 1, output_dim=1
        ),
    )
)
