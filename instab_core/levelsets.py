"""KL ε-level-sets in input-embedding space and their normals (seed 000).

The setting is the seed's: a free embedding slot x [d] after BOS; the model reads [BOS, x] and predicts the
next token at x's position. For a target distribution t over the vocabulary (a one-hot token, as the seed,
or any distribution) the function is

    KL(x) = KL(t ‖ softmax(logits(x))) = Σ_c t_c (log t_c − log p_c(x)),

the direction of the seed's ``kl_div(log_softmax(logits), target)`` (target first). The level set is
{x : KL(x) = ε}. The model runs in its dtype (float32 or float64); the KL is reduced from its logits in
float64, because in float32 log-softmax quantises KL near 1e-6 to multiples of ~1.2e-7 and the seed's
tolerance ε·1e-2 = 1e-8 could not be met. float16/bfloat16 models are refused.

* :func:`sample_vocab_ellipse` — start points uniform inside the Gaussian ellipsoid of the vocabulary embeddings.
* :meth:`LevelSet.project` — batched optimisation of many points onto the level set: ``newton`` (default; a
  damped Newton root-find along the gradient) or ``adam`` (the seed's: Adam on |KL − ε|).
  Converged when |KL − ε| < ε·``tolerance``; a per-point report, and non-converged points raise unless
  ``strict=False`` (then they are flagged in the report and a warning is issued).
* Normals three ways: :meth:`LevelSet.analytic_normal` (∇KL/‖∇KL‖, one backward pass);
  :func:`central_difference_normal` (the seed's: ±δ per dimension, each optimised back to the level set,
  n_i = b − a, sequential or batched; and a ``signed`` variant that converges to the normal);
  :meth:`LevelSet.fisher_normal` (G·(x − x*) with the pull-back Fisher G = Jᵀ(diag p − ppᵀ)J, for a target
  that is the model's own distribution at x*, where ∇KL vanishes and the level set is the ellipsoid
  ½(x − x*)ᵀG(x − x*) ≈ ε).
* :func:`tangent_profile` and :func:`tangent_walk` — KL along tangent and normal directions, and walks
  along the level set (tangent step, then re-projection).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from .fisher import fisher_matvec
from .models import ModelHandle
from .probe import run_until

Method = Literal["newton", "adam"]
CHUNK_BYTES = 2 ** 30  # memory budget of one batched KL evaluation (its vocabulary-sized buffers)


class LevelSetError(RuntimeError):
    """Points that did not reach the level set (with strict=True); nothing is substituted."""


def _check_dtype(handle: ModelHandle) -> None:
    if handle.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"level sets need a float32 or float64 model, got {handle.dtype}: "
                         "16-bit floats cannot represent ε = 1e-6 with tolerance 1e-8; load with dtype='float32'")


def sample_vocab_ellipse(handle: ModelHandle, n: int, radius: float = 1.0, seed: int = 0) -> torch.Tensor:
    """n points [n, d] (model dtype) uniform inside the ellipsoid {μ + L·u : ‖u‖ ≤ radius·√d} of the Gaussian
    fit (mean μ, covariance Σ = L Lᵀ, float64) of the vocabulary embeddings. √d is the typical Mahalanobis
    radius of a d-dimensional Gaussian, so radius = 1 is the ellipse that holds the vocabulary."""
    if n < 1 or radius <= 0:
        raise ValueError("n must be >= 1 and radius > 0")
    W = handle.embedding.weight.detach().double()
    mu = W.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((W - mu).T))
    L = evecs * evals.clamp(min=0).sqrt()
    d = W.shape[1]
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    r = torch.rand(n, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)  # uniform in the ball
    u = u / u.norm(dim=1, keepdim=True) * r * radius * d ** 0.5
    return (mu + u.to(W.device) @ L.T).to(handle.dtype)


@dataclass
class Projection:
    """Result of :meth:`LevelSet.project`: ``points`` [n, d] (model dtype), ``start`` [n, d], ``kl`` [n]
    (float64), ``iterations`` [n] (steps taken), ``converged`` [n] bool, ``seconds``, ``method``."""

    points: torch.Tensor
    start: torch.Tensor
    kl: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    epsilon: float
    tolerance: float
    seconds: float
    method: str

    @property
    def distance(self) -> np.ndarray:
        """‖point − start‖ per point (float64)."""
        return (self.points.double() - self.start.double()).norm(dim=1).cpu().numpy()

    def report(self) -> pd.DataFrame:
        """One row per point: KL, relative error |KL − ε|/ε, iterations, converged, distance travelled."""
        return pd.DataFrame({"point": np.arange(len(self.kl)), "kl": self.kl,
                             "rel_error": np.abs(self.kl - self.epsilon) / self.epsilon,
                             "iterations": self.iterations, "converged": self.converged, "distance": self.distance})


class LevelSet:
    """KL(t ‖ softmax(logits([BOS, x]))) = ε for a free slot x [d] after the prefix (default: BOS).

    ``target``: a token id (one-hot t, the seed) or a distribution [V] (non-negative, sums to 1).
    ``tolerance``: the seed's epsilon_tolerance_scale; converged means |KL − ε| < ε·tolerance.
    """

    def __init__(self, handle: ModelHandle, target: int | torch.Tensor | np.ndarray, epsilon: float,
                 tolerance: float = 1e-2, prefix_ids: list[int] | None = None) -> None:
        _check_dtype(handle)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (the KL is ≥ 0 and 0 only at the target), got {epsilon}")
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance (epsilon_tolerance_scale) must be in (0, 1), got {tolerance}")
        self.handle, self.epsilon, self.tolerance = handle, float(epsilon), float(tolerance)
        V = handle.unembed.weight.shape[0]
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < V:
                raise ValueError(f"target token {target} out of range 0..{V - 1}")
            t = torch.zeros(V, dtype=torch.float64)
            t[int(target)] = 1.0
        else:
            t = torch.as_tensor(np.asarray(target) if isinstance(target, np.ndarray) else target).double().cpu()
            if t.shape != (V,) or not torch.isfinite(t).all() or (t < 0).any() or abs(float(t.sum()) - 1) > 1e-6:
                raise ValueError(f"target must be a token id or a probability distribution of shape ({V},) "
                                 "(non-negative, summing to 1); normalise it first")
        self.target = t.to(handle.device)
        self._tlogt = float(torch.xlogy(t, t).sum())
        if prefix_ids is None:
            bos = handle.tokenizer.bos_token_id
            if bos is None:
                raise ValueError("the tokenizer has no BOS token; pass prefix_ids=[...] for the tokens before the slot")
            prefix_ids = [int(bos)]
        self.prefix_ids = list(prefix_ids)
        with torch.no_grad():
            self.prefix = handle.embedding(torch.tensor(self.prefix_ids, device=handle.device)).detach()

    @property
    def d(self) -> int:
        return int(self.prefix.shape[1])

    @property
    def tol_abs(self) -> float:
        return self.epsilon * self.tolerance

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """Differentiable logits [n, V] (model dtype) at the slot for X [n, d]; rows are independent."""
        X = X.to(device=self.prefix.device, dtype=self.handle.dtype)
        emb = torch.cat([self.prefix[None].expand(X.shape[0], -1, -1), X[:, None, :]], dim=1)
        hidden = run_until(self.handle, emb, self.handle.final_norm)[:, -1]
        return self.handle.logits(hidden)

    @torch.no_grad()
    def distribution(self, X: torch.Tensor) -> torch.Tensor:
        """The model's next-token distribution softmax(logits(X)) [n, V], float64."""
        return torch.softmax(self.logits(X).double(), dim=-1)

    def kl(self, X: torch.Tensor) -> torch.Tensor:
        """Differentiable KL(t ‖ p(x)) [n] in float64 from the model-dtype logits."""
        logp = torch.log_softmax(self.logits(X).double(), dim=-1)
        return self._tlogt - (self.target * logp).sum(-1)

    def _row_chunks(self, n: int) -> list[slice]:
        """Row slices of at most ``CHUNK_BYTES`` of vocabulary-sized buffers each (logits, their float64
        log-softmax and its gradient: ~40 bytes per row and vocabulary entry), so 2d rows at V = 128k fit."""
        per = max(1, CHUNK_BYTES // (40 * self.target.shape[0]))
        return [slice(s, min(n, s + per)) for s in range(0, max(n, 1), per)]  # one empty slice for n = 0

    def value_and_grad(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL [n] float64, ∇KL [n, d] model dtype): one forward and one backward per chunk of rows."""
        X = X.detach().to(device=self.prefix.device, dtype=self.handle.dtype)
        k = torch.empty(X.shape[0], dtype=torch.float64, device=X.device)
        g = torch.empty_like(X)
        for rows in self._row_chunks(X.shape[0]):
            xr = X[rows].requires_grad_(True)
            with torch.enable_grad():
                kr = self.kl(xr)
                (g[rows],) = torch.autograd.grad(kr.sum(), xr)  # rows are independent: the sum's gradient is per row
            k[rows] = kr.detach()
        return k, g

    @torch.no_grad()
    def value(self, X: torch.Tensor) -> torch.Tensor:
        """KL [n] float64, chunked as :meth:`value_and_grad`."""
        X = X.to(device=self.prefix.device, dtype=self.handle.dtype)
        return torch.cat([self.kl(X[rows]) for rows in self._row_chunks(X.shape[0])])

    def analytic_normal(self, X: torch.Tensor) -> torch.Tensor:
        """Unit normals ∇KL/‖∇KL‖ [n, d] (float64), pointing towards larger KL; one backward pass."""
        _, g = self.value_and_grad(X)
        g = g.double()
        norm = g.norm(dim=1, keepdim=True)
        if (norm == 0).any():
            raise ValueError("∇KL is exactly zero at a point (a minimum): use fisher_normal with the minimum's location")
        return g / norm

    def fisher_matvec(self, x: torch.Tensor):
        """v ↦ G(x)·v, the pull-back Fisher Jᵀ(diag p − ppᵀ)J of the slot's logits at x [d] (float64 [d])."""
        x = x.detach().to(device=self.prefix.device, dtype=self.handle.dtype)
        return fisher_matvec(lambda y: self.logits(y[None])[0], x)

    def fisher_normal(self, X: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Metric-aware unit normals [n, d] (float64) for a target that is the model's distribution at
        ``center`` x*: n ∝ G(x)·(x − x*), the normal of the quadratic level set ½(x − x*)ᵀG(x − x*) = ε.
        Near x* ∇KL = Jᵀ(p − t) is a difference of nearly equal distributions and vanishes; this does not."""
        out = []
        for x in X:
            v = (x.double() - center.double()).to(self.handle.dtype)
            n = self.fisher_matvec(x)(v)
            out.append(n / n.norm())
        return torch.stack(out)

    def quadratic_starts(self, center: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        """n points [n, d] on the quadratic model of the level set around a minimum x* = ``center``: random unit
        directions u scaled to ½ s² uᵀG(x*)u = ε (G the pull-back Fisher). Start points for :meth:`project`
        when the target is the model's own distribution at x*."""
        c = center.detach().to(device=self.prefix.device, dtype=self.handle.dtype)
        mv = self.fisher_matvec(c)
        U = torch.randn(n, c.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        U = (U / U.norm(dim=1, keepdim=True)).to(c.device)
        curv = torch.stack([u @ mv(u) for u in U])
        if (curv <= 0).any():
            raise ValueError("the Fisher is zero along a sampled direction: the centre is not a strict minimum")
        s = (2 * self.epsilon / curv).sqrt()
        return (c.double()[None] + s[:, None] * U).to(self.handle.dtype)

    # --- projection onto the level set ----------------------------------------------------------
    def project(self, X: torch.Tensor, method: Method = "newton", max_iters: int = 100, learning_rate: float = 1e-3,
                max_step: float | None = None, strict: bool = True) -> Projection:
        """Move every row of X [n, d] onto the level set, batched (one forward + backward per iteration).

        ``newton``: a Newton step along ∇KL for KL − ε or for log KL − log ε, whichever is shorter, capped at
        ``max_step`` (default: a quarter of the mean vocabulary-embedding norm) and halved for a point whose
        |log KL − log ε| grew.
        ``adam``: the seed's Adam (``learning_rate``) on |KL − ε|, per point. Converged points stop.
        """
        if method not in ("newton", "adam"):
            raise ValueError(f"method must be 'newton' or 'adam', got {method!r}")
        if max_iters < 0:
            raise ValueError("max_iters must be >= 0")
        t0 = time.perf_counter()
        X = X.detach().to(device=self.prefix.device, dtype=self.handle.dtype).clone()
        start = X.clone()
        n = X.shape[0]
        if max_step is None:
            max_step = 0.25 * float(self.handle.embedding.weight.detach().double().norm(dim=1).mean())
        iters = torch.zeros(n, dtype=torch.long)
        log_eps = float(np.log(self.epsilon))
        k, g = self.value_and_grad(X)
        active = (k - self.epsilon).abs() >= self.tol_abs
        m = torch.zeros_like(X)
        v = torch.zeros_like(X)
        damp = torch.ones(n, dtype=torch.float64, device=X.device)
        step_count = 0
        while active.any() and step_count < max_iters:
            step_count += 1
            # only the rows still moving are evaluated: a central difference's 2d rows mostly stop within a step
            a = active.nonzero()[:, 0]
            if method == "newton":
                ka, ga = k[a], g[a].double()
                kk = ka.clamp(min=1e-300)
                phi = kk.log() - log_eps
                g2 = ga.pow(2).sum(1).clamp(min=1e-300)
                # Newton steps along ∇KL for KL − ε and for log KL − log ε; the shorter one is taken: the
                # first overshoots where KL grows like an exponential, the second near a quadratic minimum
                t_lin = (ka - self.epsilon) / g2
                t_log = phi * kk / g2
                step = -torch.where(t_lin.abs() <= t_log.abs(), t_lin, t_log)[:, None] * ga
                norm = step.norm(dim=1)
                step = step * (torch.clamp(max_step / norm.clamp(min=1e-300), max=1.0) * damp[a])[:, None]
                cand = (X[a].double() + step).to(X.dtype)
                k_new, g_new = self.value_and_grad(cand)
                worse = (k_new.clamp(min=1e-300).log() - log_eps).abs() > phi.abs()
                ok = ~worse
                X[a[ok]], k[a[ok]], g[a[ok]] = cand[ok], k_new[ok], g_new[ok]
                damp[a] = torch.where(worse, damp[a] / 2, torch.clamp(damp[a] * 2, max=1.0))
            else:  # the seed's Adam on |KL − ε|, elementwise, so per point
                gl = torch.sign(k[a] - self.epsilon)[:, None].to(X.dtype) * g[a]
                m[a] = 0.9 * m[a] + 0.1 * gl
                v[a] = 0.999 * v[a] + 0.001 * gl ** 2
                t = (iters[a.cpu()] + 1).to(X.device, X.dtype)[:, None]
                mhat = m[a] / (1 - 0.9 ** t)
                vhat = v[a] / (1 - 0.999 ** t)
                X[a] = X[a] - learning_rate * mhat / (vhat.sqrt() + 1e-8)
                k[a], g[a] = self.value_and_grad(X[a])
            iters[a.cpu()] += 1
            active[a] = (k[a] - self.epsilon).abs() >= self.tol_abs
        res = Projection(points=X, start=start, kl=k.cpu().numpy(), iterations=iters.numpy(),
                         converged=~active.cpu().numpy(), epsilon=self.epsilon, tolerance=self.tolerance,
                         seconds=time.perf_counter() - t0, method=method)
        bad = np.flatnonzero(~res.converged)
        if bad.size:
            msg = (f"{bad.size} of {n} points did not reach |KL − ε| < {self.tol_abs:.1e} in {max_iters} {method} "
                   f"iterations (points {bad[:10].tolist()}{'…' if bad.size > 10 else ''}, worst relative error "
                   f"{res.report().rel_error.max():.2e}); raise max_iters or use method='newton'")
            if strict:
                raise LevelSetError(msg)
            warnings.warn(msg, stacklevel=2)
        return res


SEED_EPSILON = 1e-6


def choose_epsilon(handle: ModelHandle, target: int | torch.Tensor | np.ndarray, X0: torch.Tensor,
                   seed_epsilon: float = SEED_EPSILON, tolerance: float = 1e-2, max_iters: int = 100) -> tuple[float, str]:
    """A level ε this model reaches from the start points X0 [n, d], and a sentence saying how it was chosen.

    The seed's ε (1e-6) when at least half of the points reach it in ``max_iters`` Newton steps; otherwise
    (a model whose logits cannot make the target that likely, e.g. a random one) the largest KL the points
    reached on their way down, rounded up to one significant digit — a level every point crosses.
    """
    ls = LevelSet(handle, target, seed_epsilon, tolerance=tolerance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = ls.project(X0, method="newton", max_iters=max_iters, strict=False)
    n, ok = len(pr.kl), int(pr.converged.sum())
    if ok * 2 >= n:
        return float(seed_epsilon), f"the seed's ε = {seed_epsilon:g} ({ok} of {n} start points reach it)"
    top = float(np.max(pr.kl))
    if not np.isfinite(top) or top <= 0:
        raise LevelSetError(f"the KL reached from the start points is {top!r}: the model's logits are broken")
    m = 10.0 ** np.floor(np.log10(top))
    eps = float(np.ceil(top / m) * m)
    return eps, (f"ε = {eps:g}: the seed's ε = {seed_epsilon:g} is out of this model's reach ({ok} of {n} start points "
                 f"reach it in {max_iters} Newton steps; the KL they reach is {float(np.min(pr.kl)):.3g} .. {top:.3g}), "
                 "so ε is the largest KL reached, rounded up")


# ---------------------------------------------------------------------------------------------
# Central differencing (the seed's normal)


@dataclass
class CDNormal:
    """A central-difference normal on the coordinates ``dims`` [m] (int64; all d unless a subset was asked):
    ``normal`` [m] (unit on those coordinates, float64), ``a``, ``b`` [m] distances travelled back to the level
    set from x + δe_i and x − δe_i, ``converged_plus`` / ``converged_minus`` [m], ``seconds``. Compare it with a
    full normal n [d] as ``cosine(n[cd.dims], cd.normal)``."""

    normal: np.ndarray
    a: np.ndarray
    b: np.ndarray
    converged_plus: np.ndarray
    converged_minus: np.ndarray
    seconds: float
    variant: str
    dims: np.ndarray

    @property
    def degenerate(self) -> bool:
        """True when every a_i = b_i (e.g. all x ± δe_i already within the tolerance): ``normal`` is zero."""
        return not np.any(self.normal)

    @property
    def n_unconverged(self) -> int:
        return int((~self.converged_plus).sum() + (~self.converged_minus).sum())


def central_difference_normal(ls: LevelSet, x: torch.Tensor, delta: float = 1e-3, method: Method = "adam",
                              max_iters: int = 100, learning_rate: float = 1e-3, batch_size: int | None = None,
                              sequential: bool = False, variant: Literal["seed", "signed"] = "seed",
                              strict: bool = False, progress: bool = False,
                              dims: np.ndarray | list[int] | None = None) -> CDNormal:
    """The seed's normal at x [d] on the level set: for each dimension i, x ± δe_i are optimised back to the
    level set (``method``, ``max_iters``, ``learning_rate`` as the seed) and a_i, b_i are the distances moved.

    ``variant="seed"``: n_i = b_i − a_i (the seed; on the level set this is a curvature term, not the gradient).
    ``variant="signed"``: each distance counts positive when the perturbed point is outside (KL > ε), and
    n_i = (a_i^± − b_i^±)/(2δ) → ∂KL/∂x_i / ‖∇KL‖ as δ → 0 with an exact (Newton) projection.
    ``sequential``: one perturbation at a time at batch 1 (the reference); otherwise batched,
    ``batch_size`` dimensions (2·batch_size rows) per batch, all at once by default.
    ``dims``: the coordinates to difference (default all d); each costs two projections, so at d = 2048 a
    subset bounds the cost, and the components found are those of the full method on those coordinates.
    Unconverged projections are counted in the result (``strict`` raises instead).
    """
    if not delta > 0:
        raise ValueError("delta must be > 0")
    if variant not in ("seed", "signed"):
        raise ValueError(f"variant must be 'seed' or 'signed', got {variant!r}")
    t0 = time.perf_counter()
    x = x.detach().to(device=ls.prefix.device, dtype=ls.handle.dtype)
    dims = np.arange(x.shape[0]) if dims is None else np.asarray(dims, dtype=np.int64)
    if dims.ndim != 1 or dims.size == 0 or dims.min() < 0 or dims.max() >= x.shape[0] or np.unique(dims).size != dims.size:
        raise ValueError(f"dims must be distinct coordinates in 0..{x.shape[0] - 1}")
    d = dims.size
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)[torch.as_tensor(dims, device=x.device)] * delta
    starts = torch.cat([x[None] + eye, x[None] - eye])  # rows 0..d-1: +δe_i; d..2d-1: −δe_i, i in dims
    kw = dict(method=method, max_iters=max_iters, learning_rate=learning_rate, strict=strict)
    if sequential:
        chunks = [torch.tensor([r]) for r in range(2 * d)]
    else:
        per = d if batch_size is None else batch_size
        if per < 1:
            raise ValueError("batch_size must be >= 1")
        # (+δe_i, −δe_i) of the same dimensions share a batch, as the seed's per-dimension batches
        chunks = [torch.cat([torch.arange(s, min(d, s + per)), d + torch.arange(s, min(d, s + per))])
                  for s in range(0, d, per)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="central differences", unit="batch")
    pts = torch.empty(2 * d, x.shape[0], dtype=torch.float64, device=x.device)
    conv = np.zeros(2 * d, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged projections are counted in the result, not warned per batch
        for idx in chunks:
            pr = ls.project(starts[idx], **kw)
            pts[idx] = pr.points.double()
            conv[idx.numpy()] = pr.converged
    kl0 = ls.value(starts).cpu().numpy()
    dist = (pts - starts.double()).norm(dim=1).cpu().numpy()
    a, b = dist[:d], dist[d:]
    if variant == "seed":
        n = b - a
    else:
        sgn = np.sign(kl0 - ls.epsilon)
        n = (sgn[:d] * a - sgn[d:] * b) / (2 * delta)
    norm = np.linalg.norm(n)
    return CDNormal(normal=n / norm if norm > 0 else n, a=a, b=b, converged_plus=conv[:d], converged_minus=conv[d:],
                    seconds=time.perf_counter() - t0, variant=variant, dims=dims)


def cd_coordinates(d: int, k: int | None, seed: int = 0) -> np.ndarray:
    """The coordinates [m] (int64, sorted) a central difference runs on: all d when k is None or k >= d, else k
    drawn without replacement (seeded). The seed differences all d; at d = 2048 that is 4096 projections."""
    if k is not None and k < 1:
        raise ValueError(f"the number of central-difference coordinates must be >= 1 or None (all), got {k}")
    if k is None or k >= d:
        return np.arange(d)
    return np.sort(np.random.default_rng(seed).choice(d, size=k, replace=False))


def cosine(u: torch.Tensor | np.ndarray, v: torch.Tensor | np.ndarray) -> float:
    """cos(u, v) in float64; nan when either vector is zero (a degenerate central difference has no direction)."""
    u, v = np.asarray(torch.as_tensor(u).double().cpu()), np.asarray(torch.as_tensor(v).double().cpu())
    den = np.linalg.norm(u) * np.linalg.norm(v)
    return float(u @ v / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Tangent space


def tangent_directions(normal: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k random unit directions [k, d] (float64) orthogonal to the unit ``normal`` [d]."""
    n = normal.double().cpu()
    R = torch.randn(k, n.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    R = R - (R @ n)[:, None] * n[None]
    return R / R.norm(dim=1, keepdim=True)


def tangent_profile(ls: LevelSet, x: torch.Tensor, scales: np.ndarray, n_tangent: int = 4, seed: int = 0) -> pd.DataFrame:
    """KL(x + s·u) − ε for the analytic normal u and ``n_tangent`` random tangents, per scale s: linear in s
    along the normal, quadratic along a tangent (the level set is smooth and the normal is right)."""
    nrm = ls.analytic_normal(x[None])[0]
    dirs = torch.cat([nrm[None], tangent_directions(nrm, n_tangent, seed)]).to(x.device)
    names = ["normal"] + [f"tangent {i + 1}" for i in range(n_tangent)]
    s = torch.as_tensor(np.asarray(scales, dtype=np.float64), device=x.device)
    X = (x.double()[None, None] + s[None, :, None] * dirs[:, None, :]).reshape(-1, x.shape[0]).to(x.dtype)
    k = ls.value(X).cpu().numpy().reshape(len(names), len(s)) - ls.epsilon
    return pd.DataFrame([{"direction": nm, "scale": float(sc), "kl_minus_eps": float(k[i, j])}
                         for i, nm in enumerate(names) for j, sc in enumerate(s.tolist())])


def tangent_walk(ls: LevelSet, x: torch.Tensor, n_steps: int = 20, step: float = 1e-2, seed: int = 0,
                 max_iters: int = 50) -> pd.DataFrame:
    """Walk along the level set from x [d]: a step of length ``step`` along a tangent (a fixed random direction
    projected on each point's tangent space), then a Newton re-projection. Per step: KL before and after the
    re-projection (relative to ε), the correction length, and the distance from the start."""
    cur = x.detach().to(device=ls.prefix.device, dtype=ls.handle.dtype)
    x0 = cur.double()
    r = torch.randn(cur.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(cur.device)
    rows = []
    for i in range(n_steps):
        nrm = ls.analytic_normal(cur[None])[0]
        t = r - (r @ nrm) * nrm
        t = t / t.norm()
        moved = (cur.double() + step * t).to(cur.dtype)
        before = float(ls.value(moved[None])[0])
        pr = ls.project(moved[None], method="newton", max_iters=max_iters)
        cur = pr.points[0]
        rows.append({"step": i + 1, "kl_before_rel": (before - ls.epsilon) / ls.epsilon,
                     "kl_after_rel": (float(pr.kl[0]) - ls.epsilon) / ls.epsilon,
                     "correction": float(pr.distance[0]), "distance_from_start": float((cur.double() - x0).norm()),
                     "newton_iterations": int(pr.iterations[0])})
    return pd.DataFrame(rows)
