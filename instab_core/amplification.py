"""Amplification of a small input change through matmul chains, one weight matrix, and an MLP (the seed's exp10 p3–p5).

The seed divided ‖Δy‖ by the *intended* change ε‖d‖. Below about ulp(x)/2 per coordinate the
stored input fl(x + εd) equals x in most coordinates, so the realised change is far from εd (often
exactly zero), and ‖Δy‖/(ε‖d‖) reports rounding of the input as "amplification". Here the ratio
divides by the realised change ‖fl(x + εd) − x‖ (computed exactly in float64 from the two stored
vectors); the seed's ratio is kept next to it for comparison. All ε are evaluated in one batch with
the reference f(x) computed in the same batch (row 0), so Δy is never a batch-shape artefact.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .models import ModelHandle

SEED_EPSILONS = tuple(float(e) for e in np.logspace(-6, -19, 14))  # the seed's exp10 ε grid


def _check_eps(eps: Sequence[float]) -> np.ndarray:
    e = np.asarray(list(eps), dtype=np.float64)
    if e.size == 0:
        raise ValueError("empty ε list: pass at least one scale, e.g. np.logspace(-6, -19, 14)")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise ValueError("every ε must be finite and positive")
    return e


def unit_direction(n: int, seed: int = 0, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """A random unit vector [n] (Gaussian, normalised in float64, then cast to ``dtype``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = torch.randn(n, generator=gen, dtype=torch.float64)
    return (d / d.norm()).to(device=device, dtype=dtype)


@torch.no_grad()
def realised_amplification(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, d: torch.Tensor,
                           eps: Sequence[float]) -> pd.DataFrame:
    """‖f(fl(x+εd)) − f(x)‖ over the realised and over the intended input change, for every ε.

    ``f`` maps [n, d_in] -> [n, d_out] rowwise; ``x`` [d_in] in the working dtype; ``d`` [d_in]
    (any float dtype; used in float64). fl(x + εd) is computed in float64 and rounded once to x's
    dtype. One call of f on [1 + len(eps), d_in] rows; row 0 is the reference f(x).
    Columns: eps, intended_dx (ε‖d‖), realised_dx (‖fl(x+εd) − x‖), changed_coords, dy
    (‖Δy‖), ratio (dy / realised_dx; NaN when the input did not change), ratio_intended (the
    seed's dy / (ε‖d‖)), output_changed (any output element differs bitwise).
    """
    e = _check_eps(eps)
    if x.ndim != 1 or d.shape != x.shape:
        raise ValueError(f"x and d must be vectors of one shape, got {tuple(x.shape)} and {tuple(d.shape)}")
    dd = d.double()
    xd = x.double()
    X = (xd[None] + torch.from_numpy(e).to(xd)[:, None] * dd[None]).to(x.dtype)
    Y = f(torch.cat([x[None], X]))
    y0, Yp = Y[0].double(), Y[1:].double()
    dx = X.double() - xd  # exact: both are stored values of the working dtype, difference fits float64
    realised = dx.norm(dim=1).cpu().numpy()
    dy = (Yp - y0).norm(dim=1).cpu().numpy()
    intended = e * float(dd.norm())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(realised > 0, dy / np.where(realised > 0, realised, 1.0), np.nan)
    return pd.DataFrame({
        "eps": e, "intended_dx": intended, "realised_dx": realised,
        "changed_coords": (dx != 0).sum(dim=1).cpu().numpy(), "dy": dy, "ratio": ratio,
        "ratio_intended": dy / intended,
        "output_changed": (Y[1:] != Y[0]).any(dim=1).cpu().numpy(),
    })


def random_chain(dim: int, depth: int, weight_scale: float, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """``depth`` matrices [dim, dim] with N(0, weight_scale²) entries (drawn in float32 on the CPU, then cast)."""
    if dim < 1 or depth < 1:
        raise ValueError("dim and depth must be >= 1")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(dim, dim, generator=gen) * weight_scale).to(device=device, dtype=dtype) for _ in range(depth)]


def chain_apply(Ws: Sequence[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """X [n, dim] through y = W_k ⋯ W_1 x, rowwise (X @ Wᵀ per matrix)."""
    for W in Ws:
        X = X @ W.t()
    return X


def chain_amplification(dim: int = 256, depth: int = 12, weight_scale: float = 0.01,
                        eps: Sequence[float] = SEED_EPSILONS, seed: int = 0,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> pd.DataFrame:
    """The seed's p3: a random unit-norm x (scaled like its input), a random unit d, a random chain.

    Adds columns dim, depth, weight_scale and the chain's linear gain ‖W_k⋯W_1 d‖ (float64), the
    amplification a perfectly computed chain would show.
    """
    Ws = random_chain(dim, depth, weight_scale, seed, dtype, device)
    x = unit_direction(dim, seed + 1, dtype, device)
    d = unit_direction(dim, seed + 2, torch.float64, device)
    table = realised_amplification(lambda X: chain_apply(Ws, X), x, d, eps)
    gain = float(chain_apply([W.double() for W in Ws], d[None])[0].norm())
    table.insert(0, "dim", dim)
    table.insert(1, "depth", depth)
    table.insert(2, "weight_scale", weight_scale)
    table["linear_gain"] = gain
    return table


def linear_amplification(W: torch.Tensor, x0: torch.Tensor, eps: Sequence[float] = SEED_EPSILONS,
                         seed: int = 0) -> pd.DataFrame:
    """The seed's p4: y = W x0 for one real weight W [out, in] and a real embedding x0 [in].

    Adds the linear gain ‖W d‖ (float64) for comparison with the measured ratio.
    """
    if W.ndim != 2 or W.shape[1] != x0.shape[-1]:
        raise ValueError(f"W {tuple(W.shape)} does not act on x0 of size {x0.shape[-1]}")
    x = x0.to(W.dtype)
    d = unit_direction(x.shape[0], seed, torch.float64, x.device)
    table = realised_amplification(lambda X: X @ W.t(), x, d, eps)
    table["linear_gain"] = float((W.double() @ d).norm())
    return table


def mlp_function(handle: ModelHandle, layer: int = 0, with_norm: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rowwise f(X) = MLP(X) or MLP(norm(X)) of decoder layer ``layer`` (the norm that precedes the MLP)."""
    n = handle.n_layers
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1})")
    mlp: nn.Module = handle.stage_module(layer, "mlp")
    norm: nn.Module = handle.stage_module(layer, "post_attn_norm")

    def f(X: torch.Tensor) -> torch.Tensor:
        X = X[:, None, :]  # [n, 1, d]: the modules expect a sequence axis
        return mlp(norm(X) if with_norm else X)[:, 0, :]

    return f


def mlp_amplification(handle: ModelHandle, x0: torch.Tensor, eps: Sequence[float] = SEED_EPSILONS, layer: int = 0,
                      seed: int = 0) -> pd.DataFrame:
    """The seed's p5 (the MLP on the raw x0) and the same with the MLP's norm in front; column ``norm``."""
    d = unit_direction(x0.shape[-1], seed, torch.float64, x0.device)
    parts = []
    for with_norm in (False, True):
        t = realised_amplification(mlp_function(handle, layer, with_norm), x0.to(handle.dtype), d, eps)
        t.insert(0, "norm", with_norm)
        parts.append(t)
    return pd.concat(parts, ignore_index=True)
