"""Per-sample curvature along parameter directions and sparse low-interference directions (seed 003).

Parameters are a flat vector w (one tensor, or the flattened selection of a model's parameters); a
problem supplies ``div_all(w) -> [N]``, the divergence D(f, x_n, w) of every sample against the outputs at
w0 (:func:`divergence`: normalised KL for classifiers and language models, MSE for regression).

* :func:`curvature_matrix` — C[n, k] = u_kᵀ H(x_n) u_k = d²/dt² D(f, x_n, w0 + t·u_k) at t = 0, by a jvp of a
  jvp (never a Hessian), vmapped over the directions; samples are batched in ``div_all`` (the toys vmap
  their one-sample divergence over samples).
* :func:`learn_directions` — the seed's bi-level optimisation over unit directions U [K, P]: a step on the
  loss that rewards high curvature concentrated on some samples, L_high = −mean_n Σ_k C̃[n,k]², then a step
  on the low-interference loss over pairs, L_low = mean_n Σ_{k≠l} (C̃[n,k] C̃[n,l] cos(u_k, u_l))², where
  C̃ = C / c0 and c0 is the mean curvature of the initial directions (so both losses are O(1)). A pair of
  directions interferes on a sample only if both bend the output there AND they are not orthogonal.
* :func:`recovery` — against ground truth given as parameter blocks (index sets): the best cosine between
  a learned direction and any vector supported on a block is the norm of its projection onto the block.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.func import jvp, vmap

DivFn = Callable[[torch.Tensor], torch.Tensor]


def _layer_norm_composite(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(-len(self.normalized_shape), 0))
    c = x - x.mean(dims, keepdim=True)
    y = c * torch.rsqrt((c * c).mean(dims, keepdim=True) + self.eps)
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


@contextmanager
def composite_layer_norm(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every ``nn.LayerNorm`` of ``model`` computes with elementwise ops instead of the fused kernel.

    Why: forward-over-forward AD through ``F.layer_norm`` is wrong in torch 2.13 (measured on the CPU: the
    second directional derivative of a LayerNorm off by ~80% against float64 central differences; first
    derivatives are right), while the composite's is right. Nested jvps through GPT-2 need this; the
    forward's bits change slightly, so use it only for second derivatives. Parameters are not touched; the
    original forward is restored on exit.
    """
    patched = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    for m in patched:
        m.forward = types.MethodType(_layer_norm_composite, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def divergence(out: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """D per row of [..., C] outputs against reference outputs ``ref`` (same shape), reduced over the last dim.

    ``kl``: KL(softmax(out) ‖ softmax(ref)) − KL(softmax(ref) ‖ softmax(ref)) for logits (the seed's
    normalisation; the second term is zero up to rounding). ``mse``: mean((out − ref)²).
    """
    if kind == "kl":
        lp, lq = torch.log_softmax(out, -1), torch.log_softmax(ref, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        kl_ref = (lq.exp() * (lq - lq)).sum(-1)
        return kl - kl_ref
    if kind == "mse":
        return ((out - ref) ** 2).mean(-1)
    raise ValueError(f"unknown divergence {kind!r}; use 'kl' (classifiers, language models) or 'mse' (regression)")


def second_directional(div_all: DivFn, w0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d²/dt² div_all(w0 + t·u) at t = 0: [N], by forward-over-forward AD."""
    return jvp(lambda w: jvp(div_all, (w,), (u,))[1], (w0,), (u,))[1]


def curvature_matrix(div_all: DivFn, w0: torch.Tensor, U: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """C [N, K]: per-sample curvature u_kᵀ H(x_n) u_k for the rows of U [K, P] (dtype of w0).

    Differentiable with respect to U (the directions are learned through it). ``chunk`` vmaps that many
    directions at a time (memory); None = all at once.
    """
    if U.ndim != 2 or U.shape[1] != w0.numel():
        raise ValueError(f"directions must be [K, {w0.numel()}] (got {tuple(U.shape)})")
    fn = vmap(lambda u: second_directional(div_all, w0, u), chunk_size=chunk)
    return fn(U).T


def unit_rows(V: torch.Tensor) -> torch.Tensor:
    return V / V.norm(dim=1, keepdim=True)


def interference_matrix(C: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """[K, K]: mean over samples of C[n,k]·C[n,l]·cos(u_k, u_l) (the seed's per-sample Gram of curvature-
    scaled directions); the diagonal is the mean squared curvature."""
    Un = unit_rows(U)
    cos = Un @ Un.T
    return (C.T @ C) / C.shape[0] * cos


def losses(C: torch.Tensor, U: torch.Tensor, c0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_high, L_low) of the module docstring for curvature C [N, K] of unit directions U [K, P]."""
    K = C.shape[1]
    Ct = C / c0
    l_high = -(Ct ** 2).sum(1).mean() / K
    cos = U @ U.T
    G = Ct[:, :, None] * Ct[:, None, :] * cos[None]  # [N, K, K]
    off = G - torch.diag_embed(torch.diagonal(G, dim1=1, dim2=2))
    l_low = (off ** 2).sum((1, 2)).mean() / max(K * (K - 1), 1)
    return l_high, l_low


@dataclass
class LearnedDirections:
    """U [K, P] unit rows (float64 numpy), C [N, K] their per-sample curvature, per-step history."""

    U: np.ndarray
    C: np.ndarray
    U_init: np.ndarray
    C_init: np.ndarray
    c0: float
    history: pd.DataFrame

    def interference(self) -> np.ndarray:
        return interference_matrix(torch.from_numpy(self.C), torch.from_numpy(self.U)).numpy()


def learn_directions(div_all: DivFn, w0: torch.Tensor, n_directions: int = 5, steps: int = 200,
                     lr_high: float = 0.05, lr_low: float = 0.05, seed: int = 0, init: torch.Tensor | None = None,
                     chunk: int | None = None, progress: bool = True) -> LearnedDirections:
    """The seed's bi-level optimisation: per step, an Adam step on L_high, then an Adam step on L_low at
    the updated directions (curvature recomputed). Directions are parametrised as V/‖V‖ (unit rows).

    ``init`` [K, P] overrides the seeded Gaussian start. Raises if a loss becomes non-finite.
    """
    from tqdm.auto import tqdm

    if n_directions < 1 or steps < 0:
        raise ValueError(f"n_directions must be >= 1 and steps >= 0 (got {n_directions}, {steps})")
    w0 = w0.detach()
    if init is None:
        gen = torch.Generator().manual_seed(int(seed))
        init = torch.randn(n_directions, w0.numel(), generator=gen, dtype=torch.float64)
    V = unit_rows(init.to(w0)).clone().requires_grad_(True)
    with torch.no_grad():
        C_init = curvature_matrix(div_all, w0, unit_rows(V), chunk)
    c0 = float(C_init.abs().mean())
    if not np.isfinite(c0) or c0 <= 0:
        raise ValueError(f"initial directions have mean curvature {c0}: the divergence does not bend along them "
                         "(check the model's parameters and the samples)")
    opt_high = torch.optim.Adam([V], lr=lr_high)
    opt_low = torch.optim.Adam([V], lr=lr_low)
    rows = []
    for step in tqdm(range(steps), desc="learning directions", disable=not progress):
        U = unit_rows(V)
        l_high, _ = losses(curvature_matrix(div_all, w0, U, chunk), U, c0)
        opt_high.zero_grad()
        l_high.backward()
        opt_high.step()
        U = unit_rows(V)
        l_high_after, l_low = losses(curvature_matrix(div_all, w0, U, chunk), U, c0)
        opt_low.zero_grad()
        l_low.backward()
        opt_low.step()
        if not (torch.isfinite(l_high) and torch.isfinite(l_low)):
            raise FloatingPointError(f"learn_directions: a loss became non-finite at step {step} "
                                     f"(L_high={float(l_high.detach())}, L_low={float(l_low.detach())}); lower the learning rates")
        rows.append({"step": step, "L_high": float(l_high.detach()), "L_low": float(l_low.detach())})
    with torch.no_grad():
        U = unit_rows(V)
        C = curvature_matrix(div_all, w0, U, chunk)
    return LearnedDirections(U=U.detach().double().cpu().numpy(), C=C.double().cpu().numpy(),
                             U_init=unit_rows(init.to(w0)).double().cpu().numpy(),
                             C_init=C_init.double().cpu().numpy(), c0=c0,
                             history=pd.DataFrame(rows, columns=["step", "L_high", "L_low"]))


def block_fractions(U: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """[K, B]: ‖P_b u_k‖/‖u_k‖, the cosine between u_k and its best-matching vector supported on block b."""
    U = np.asarray(U, dtype=np.float64)
    norms = np.linalg.norm(U, axis=1)
    return np.stack([np.linalg.norm(U[:, np.asarray(b)], axis=1) / norms for b in blocks], axis=1)


def recovery(U: np.ndarray, blocks: list[np.ndarray], names: list[str] | None = None) -> pd.DataFrame:
    """One row per learned direction: its best-matching true block and the cosine to it; ``coverage``
    (in the frame's attrs) is the number of distinct blocks matched."""
    F = block_fractions(U, blocks)
    names = names or [f"block {b}" for b in range(len(blocks))]
    best = F.argmax(1)
    df = pd.DataFrame({"direction": [f"u{k + 1}" for k in range(len(U))], "best_match": [names[b] for b in best],
                       "cosine": F[np.arange(len(U)), best]})
    df.attrs["coverage"] = int(len(set(best.tolist())))
    return df
