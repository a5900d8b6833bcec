"""Jacobian of a probe's target with respect to the replaced input vector, and its singular triplets.

* :func:`jacobian` — the dense J = ∂f/∂x at x [m, d] by chunked reverse mode
  (``torch.func.jacrev``): m vector-Jacobian products, ``chunk_size`` at a time.
* :func:`spectrum` — the full SVD of the dense J, computed in float64.
* :func:`top_singular` — the top-k triplets matrix-free (jvp for J·V, vjp for Jᵀ·U), by block
  subspace iteration with Rayleigh–Ritz; raises :class:`ConvergenceError` rather than returning an
  unconverged answer.

Signs are fixed so that the largest-magnitude entry of every right singular vector is positive,
which makes the directions reproducible across runs and methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jacrev, jvp, vjp, vmap

from .probe import Probe


class ConvergenceError(RuntimeError):
    """An iterative solver did not reach its tolerance; nothing is substituted."""


@dataclass
class Spectrum:
    """Singular triplets of J [m, d]: J ≈ U diag(S) Vt.

    ``S`` [k] float64 descending; ``U`` [m, k] float64; ``Vt`` [k, d] float64 (rows are the right
    singular vectors); ``directions`` [k, d] float32 = Vt rounded once to float32, the exact
    vectors experiments perturb along; ``residual`` the largest relative residual
    max_i ‖Jᵀu_i − σ_i v_i‖ / σ_1 (0 for a dense SVD is not claimed: it is measured too).
    """

    S: np.ndarray
    U: np.ndarray
    Vt: np.ndarray
    residual: float
    method: str

    @property
    def directions(self) -> torch.Tensor:
        return torch.from_numpy(self.Vt).to(torch.float32)


def _fix_signs(U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = Vt.abs().argmax(dim=1)
    signs = torch.sign(Vt[torch.arange(Vt.shape[0]), idx])
    signs[signs == 0] = 1
    return U * signs[None, :], Vt * signs[:, None]


def jacobian(probe: Probe, x: torch.Tensor | None = None, chunk_size: int | None = 256) -> torch.Tensor:
    """Dense J = ∂f/∂x at x (default x0), [m, d] in the probe's dtype, at batch size 1."""
    x = (probe.x0 if x is None else x).to(device=probe.x0.device, dtype=probe.dtype)
    if not torch.isfinite(x).all():
        raise ValueError("jacobian: x has non-finite entries")
    return jacrev(probe.f, chunk_size=chunk_size)(x).detach()


def spectrum(probe: Probe, x: torch.Tensor | None = None, chunk_size: int | None = 256) -> Spectrum:
    """Full SVD of the dense Jacobian (computed in float64 from J in the probe's dtype)."""
    J = jacobian(probe, x, chunk_size).double()
    U, S, Vt = torch.linalg.svd(J, full_matrices=False)
    U, Vt = _fix_signs(U, Vt)
    residual = float((J.T @ U - Vt.T * S).norm(dim=0).max() / S[0]) if S[0] > 0 else 0.0
    return Spectrum(S=S.cpu().numpy(), U=U.cpu().numpy(), Vt=Vt.cpu().numpy(), residual=residual, method="dense")


def jvp_rows(probe: Probe, V: torch.Tensor, x: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """J·v at x (default x0) for every row v of V [n, d], by forward-mode AD; returns [n, m] in the probe's dtype."""
    x = (probe.x0 if x is None else x).to(device=probe.x0.device, dtype=probe.dtype)
    V = torch.as_tensor(V).to(device=x.device, dtype=probe.dtype)
    push = vmap(lambda v: jvp(probe.f, (x,), (v,))[1])
    return torch.cat([push(V[i:i + chunk].contiguous()) for i in range(0, V.shape[0], chunk)]).detach()


def _orth(A: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(A)
    return Q


def top_singular(probe: Probe, k: int, x: torch.Tensor | None = None, oversample: int = 16,
                 max_iter: int = 100, tol: float = 1e-4, seed: int = 0) -> Spectrum:
    """Top-k singular triplets of J at x without forming J.

    Block subspace iteration on JᵀJ with ``k + oversample`` vectors: each iteration costs one
    batched jvp and one batched vjp. Converged when every top-k residual
    ‖Jᵀu_i − σ_i v_i‖ / σ_1 ≤ ``tol`` (measured in float64 from the probe-dtype products).
    Raises :class:`ConvergenceError` after ``max_iter`` iterations otherwise.
    """
    x = (probe.x0 if x is None else x).to(device=probe.x0.device, dtype=probe.dtype)
    if not torch.isfinite(x).all():
        raise ValueError("top_singular: x has non-finite entries")
    d = x.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in 1..{d}, got {k}")
    width = min(d, k + oversample)
    _, vjp_fn = vjp(probe.f, x)

    def J_times(V: torch.Tensor) -> torch.Tensor:  # V [d, l] -> [m, l]
        return jvp_rows(probe, V.T, x).T.double()

    def Jt_times(Ucols: torch.Tensor) -> torch.Tensor:  # U [m, l] -> [d, l]
        rows = vmap(lambda u: vjp_fn(u)[0])(Ucols.T.to(probe.dtype).contiguous())
        return rows.T.double()

    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = _orth(torch.randn(d, width, generator=gen, dtype=torch.float64).to(x.device))
    residual = float("inf")
    for _ in range(max_iter):
        B = J_times(Q)  # [m, l]
        Ub, S, Wt = torch.linalg.svd(B, full_matrices=False)
        V = Q @ Wt.T  # [d, l] Ritz vectors
        Z = Jt_times(Ub[:, :k])  # [d, k]
        residual = float((Z - V[:, :k] * S[:k]).norm(dim=0).max() / S[0]) if S[0] > 0 else 0.0
        if residual <= tol:
            U, Vt = _fix_signs(Ub[:, :k], V[:, :k].T)
            return Spectrum(S=S[:k].cpu().numpy(), U=U.cpu().numpy(), Vt=Vt.cpu().numpy(),
                            residual=residual, method=f"subspace-iteration(width={width})")
        Q = _orth(Jt_times(B))
    raise ConvergenceError(
        f"top_singular(k={k}) did not converge: residual {residual:.2e} > tol {tol:.0e} after {max_iter} "
        "iterations; raise max_iter or oversample, or use spectrum() for the dense SVD")
