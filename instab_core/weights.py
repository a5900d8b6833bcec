"""Weight statistics per layer and projection (the seed's exp9), read through the model adapter.

Every matrix is taken as [out, in] (GPT-2's Conv1D stores [in, out]; it is transposed, which
changes no statistic). Moments, percentiles and norms are computed in float64 whatever the model
dtype. Spectral and nuclear norms come from ``torch.linalg.svdvals`` (exact, one SVD per matrix,
instead of the seed's two CPU SVDs) or, for the spectral norm alone, from a matrix-free power
iteration that raises when it has not converged.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .models import ModelHandle

PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("q", "k", "v", "o", "gate", "up", "down"),
    "gpt2": ("qkv", "o", "up", "down"),
}
PERCENTILES: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.9)
MAGNITUDE_BINS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)  # fraction of |w| below each (the seed's bins)
SPECTRAL_METHODS = ("svdvals", "power")


class PowerIterationError(RuntimeError):
    """Power iteration did not reach the requested tolerance."""


def projections(handle: ModelHandle) -> tuple[str, ...]:
    """The weight-matrix stage names of the handle's model, from its discovered adapter (llama: q k v o gate up
    down; gpt2: qkv o up down)."""
    names = handle.adapter.projections
    if not names:
        raise ValueError(f"no projection stages found for family {handle.adapter.family!r}")
    return names


def _check_layer(handle: ModelHandle, layer: int) -> int:
    n = handle.n_layers
    if not isinstance(layer, (int, np.integer)) or not -n <= int(layer) < n:
        raise IndexError(f"layer {layer!r} out of range: the model has {n} layers (0..{n - 1})")
    return int(layer) % n


def weight_matrix(handle: ModelHandle, layer: int, stage: str) -> torch.Tensor:
    """The weight of projection ``stage`` of decoder layer ``layer`` as [out, in] (model dtype, a view)."""
    layer = _check_layer(handle, layer)
    names = projections(handle)
    if stage not in names:
        raise KeyError(f"unknown projection {stage!r} for {handle.adapter.family}; known: {list(names)}")
    mod = handle.stage_module(layer, stage)
    w = mod.weight.detach()
    if type(mod).__name__ == "Conv1D":  # HF GPT-2 stores [in, out]
        w = w.t()
    return w


def percentiles(values: torch.Tensor, qs: Sequence[float]) -> np.ndarray:
    """Percentiles (0..100) of a 1-D tensor with numpy's default linear interpolation.

    Uses one sort, so it works beyond ``torch.quantile``'s 16M-element limit (an 8B model's MLP
    matrices have 58M entries).
    """
    v = values.reshape(-1).double().sort().values
    n = v.numel()
    if n == 0:
        raise ValueError("percentiles of an empty tensor")
    pos = torch.tensor([q / 100.0 * (n - 1) for q in qs], dtype=torch.float64, device=v.device)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.double()
    return (v[lo] + (v[hi] - v[lo]) * frac).cpu().numpy()


def spectral_norm_power(W: torch.Tensor, tol: float = 1e-10, max_iter: int = 2000, seed: int = 0) -> float:
    """Largest singular value of W [m, n] by power iteration on WᵀW, matrix-free, in float64.

    Converged when the relative change of the estimate is below ``tol`` and the residual
    ‖WᵀW v − σ² v‖/σ² is below sqrt(tol); raises :class:`PowerIterationError` otherwise
    (a small gap σ1/σ2 needs more iterations: raise ``max_iter``).
    """
    A = W.double()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(A.shape[1], generator=gen, dtype=torch.float64).to(A.device)
    v /= v.norm()
    sigma2 = 0.0
    for _ in range(max_iter):
        u = A.t() @ (A @ v)
        new = float(u.norm())
        if new == 0.0:
            return 0.0
        resid = float((u - new * v).norm()) / new if new else 0.0
        v = u / new
        if abs(new - sigma2) <= tol * new and resid <= tol ** 0.5:
            return float(np.sqrt(new))
        sigma2 = new
    raise PowerIterationError(f"power iteration did not converge in {max_iter} iterations (tol {tol}); "
                              "raise max_iter or use spectral='svdvals'")


def matrix_stats(W: torch.Tensor, spectral: str = "svdvals") -> dict[str, Any]:
    """Statistics of one matrix W [m, n] (any float dtype), all in float64.

    Keys: rows, cols, mean, std (population), min, max, skew, kurtosis (excess, population
    moments), frac_pos/neg/zero, frac_abs_lt_<bin>, abs_p<q> for q in PERCENTILES, fro,
    spectral, nuclear (NaN with ``spectral='power'``: it needs every singular value), stable_rank.
    """
    if spectral not in SPECTRAL_METHODS:
        raise ValueError(f"unknown spectral method {spectral!r}; use one of {SPECTRAL_METHODS}")
    if W.ndim != 2 or W.numel() == 0:
        raise ValueError(f"matrix_stats needs a non-empty 2-D matrix, got shape {tuple(W.shape)}")
    A = W.detach().double()
    x = A.reshape(-1)
    mean = x.mean()
    c = x - mean
    m2, m3, m4 = (c ** 2).mean(), (c ** 3).mean(), (c ** 4).mean()
    a = x.abs()
    out: dict[str, Any] = {
        "rows": int(A.shape[0]), "cols": int(A.shape[1]),
        "mean": float(mean), "std": float(m2.sqrt()), "min": float(x.min()), "max": float(x.max()),
        "skew": float(m3 / m2 ** 1.5) if m2 > 0 else float("nan"),
        "kurtosis": float(m4 / m2 ** 2 - 3.0) if m2 > 0 else float("nan"),
        "frac_pos": float((x > 0).double().mean()), "frac_neg": float((x < 0).double().mean()),
        "frac_zero": float((x == 0).double().mean()),
    }
    for b in MAGNITUDE_BINS:
        out[f"frac_abs_lt_{b:g}"] = float((a < b).double().mean())
    for q, v in zip(PERCENTILES, percentiles(a, PERCENTILES)):
        out[f"abs_p{q:g}"] = float(v)
    fro = float(torch.linalg.matrix_norm(A, "fro"))
    if spectral == "svdvals":
        s = torch.linalg.svdvals(A)
        spec, nuc = float(s[0]), float(s.sum())
    else:
        spec, nuc = spectral_norm_power(A), float("nan")
    out.update(fro=fro, spectral=spec, nuclear=nuc, stable_rank=fro ** 2 / spec ** 2 if spec > 0 else float("nan"))
    return out


def weight_statistics(handle: ModelHandle, layers: Sequence[int] | None = None, stages: Sequence[str] | None = None,
                      spectral: str = "svdvals", progress: bool = True) -> pd.DataFrame:
    """One row per (layer, projection): :func:`matrix_stats` of its [out, in] weight.

    ``layers`` default: all; ``stages`` default: :func:`projections` of the family.
    """
    layers = list(range(handle.n_layers)) if layers is None else [_check_layer(handle, i) for i in layers]
    stages = list(projections(handle)) if stages is None else list(stages)
    if not layers or not stages:
        raise ValueError("weight_statistics needs at least one layer and one projection")
    for s in stages:
        if s not in projections(handle):
            raise KeyError(f"unknown projection {s!r} for {handle.adapter.family}; known: {list(projections(handle))}")
    pairs = [(i, s) for i in layers for s in stages]
    if progress:
        from tqdm.auto import tqdm
        pairs = tqdm(pairs, desc="weights", unit="matrix")
    rows = [{"layer": i, "projection": s, **matrix_stats(weight_matrix(handle, i, s), spectral)} for i, s in pairs]
    return pd.DataFrame(rows)


def weight_sample(handle: ModelHandle, layer: int, stage: str, n: int = 100_000, seed: int = 0) -> np.ndarray:
    """Up to ``n`` entries of one weight matrix drawn without replacement (float64), for histograms."""
    w = weight_matrix(handle, layer, stage).reshape(-1)
    if w.numel() <= n:
        return w.double().cpu().numpy()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(w.numel(), generator=gen)[:n].to(w.device)
    return w[idx].double().cpu().numpy()
