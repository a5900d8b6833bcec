"""Decision geometry: equal-logit (tie) points, 1-D token-flip scans, 2-D top-2 logit-gap grids and their statistics.

Everything here works on a probe whose target is ``logits`` and on the **logit gap** of a token pair,

    G(x) = logit[t1](x) − logit[t2](x),

computed from the logits row of the fixed-shape forward pass (float32 subtraction, exact near a tie by
Sterbenz's lemma, so the sign of G is the sign of the comparison).

* :func:`tie_point` — an input x near x0 at which the top-2 logits are equal. Three formulations:
  ``"root"`` (default) finds the root of G along its gradient: from x0 along −∇G, the first scale
  at which the argmax changes, found by batched scans that narrow to adjacent float32 scales; the
  gradient is re-taken at the crossing and the line search repeated until the direction settles
  (then x* − x0 ∥ ∇G(x*), the condition for the nearest point of the tie surface). The last bracket
  is resolved to a **float32 tie**: x* and a partner that differs from it by one ULP in one
  coordinate, with G(x*) = 0 or G of opposite signs. ``"adam_geometric"`` and ``"adam_direct"``
  are the seed's two optimisers (Adam at lr 1e-3 on (f·u)², u = W_U[t1] − W_U[t2], with the pair
  fixed from the unoptimised prompt; and on (top1 − top2)², the pair re-picked every iteration).
* :func:`flip_scan` — the argmax token and its probability along x* + ε·v for a grid of ε, batched;
  the first flip is the smallest |ε| on each side (the seed reported the most negative ε).
* :func:`gap_grid` — G at x* + a_i·h1 + b_j·h2 (float32 arithmetic, defined by :func:`grid_inputs`)
  over a grid, evaluated in fixed-shape batches, chunked so memory is bounded; also the argmax
  token per cell, the label of the distinct float32 input per cell (the input lattice) and,
  optionally, the linear prediction G(x*) + ∇G·(X − x*) from the realised inputs.
* :func:`grid_statistics` and helpers — the seed's exp7 part 3 statistics on B = (G ≥ 0), vectorised
  (sparse 4-neighbour weights for Moran's I, ``scipy.ndimage.label`` for regions), and
  :func:`dilate_class` (exp7 part 4) with ``scipy.ndimage.binary_dilation``.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from . import fp
from .numerics import batch_invariance_audit
from .probe import Probe, run_until

Method = Literal["root", "adam_geometric", "adam_direct"]
METHODS: tuple[str, ...] = ("root", "adam_geometric", "adam_direct")
GridMode = Literal["fp32", "fp64"]

# The seed's exp7 part 3 thresholds: each indicator that holds adds one to the "randomness score" (0..6).
RANDOMNESS_THRESHOLDS: dict[str, str] = {
    "high flip frequency": "flip_ratio > 0.3",
    "high fragmentation": "regions_total > 10",
    "low spatial autocorrelation": "|morans_i| < 0.3",
    "high local entropy": "entropy_ratio > 0.7",
    "high boundary complexity": "crossing_density > 5",
    "balanced classes (chi-square p > 0.05)": "chi2_p > 0.05",
}


class TieSearchError(RuntimeError):
    """A tie search that found no tie, or stopped because the top-2 pair changed; nothing is substituted."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def _check_logits_probe(probe: Probe) -> None:
    if probe.target.kind != "logits":
        raise ValueError(f"decision kernels need a probe with target='logits', got {probe.target}")


def logits_probe(probe: Probe) -> Probe:
    """``probe`` itself if its target is logits, else the same prompt/position/batch shape with target logits."""
    if probe.target.kind == "logits":
        return probe
    return Probe(probe.handle, probe.text, probe.position, "logits", probe.batch_size)


def token_text(probe: Probe, token: int) -> str:
    return probe.handle.tokenizer.decode([int(token)])


def top2(logits: torch.Tensor) -> tuple[int, int]:
    """Ids of the two largest logits of a row (ties broken by the lower id, as ``torch.topk``)."""
    idx = logits.topk(2).indices
    return int(idx[0]), int(idx[1])


def gap_gradient(probe: Probe, x: torch.Tensor, t1: int, t2: int) -> torch.Tensor:
    """∇G(x) for G = logit[t1] − logit[t2], by reverse mode at batch size 1 (a direction, not a bitwise value)."""
    _check_logits_probe(probe)
    x = x.detach().to(device=probe.x0.device, dtype=probe.dtype).requires_grad_(True)
    with torch.enable_grad():
        out = probe.f(x)
        (g,) = torch.autograd.grad(out[t1] - out[t2], x)
    return g.detach()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact numpy copy of a tensor; bfloat16 (no numpy dtype) is widened to float32, which is exact."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def line_point(x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x0 + t·u with the product and the sum each rounded in x0's dtype (fp.perturb's "fp32" mode).

    x0 [d], t [n] or scalar, u [d]; returns [n, d] (or [d]).
    """
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.ndim == 0:
        return x0 + t * u
    return x0 + t[:, None] * u


@dataclass
class _Evals:
    """Counts of model work for a kernel run."""

    rows: int = 0  # forward rows (fixed-shape batches, padding included)
    passes: int = 0  # forward calls of the fixed-shape evaluator
    backward: int = 0  # backward passes (batch 1)


def _eval_logits(probe: Probe, X: torch.Tensor, ev: _Evals) -> torch.Tensor:
    before = probe.rows_evaluated
    out = probe.forward(X)
    ev.rows += probe.rows_evaluated - before
    ev.passes += 1
    return out


# ---------------------------------------------------------------------------------------------
# Nearest real tokens


def nearest_tokens(probe: Probe, x: torch.Tensor, k: int = 3, chunk: int = 16384) -> pd.DataFrame:
    """The ``k`` token embeddings nearest to x (L2, float64), chunked over the vocabulary."""
    W = probe.handle.embedding.weight
    xd = x.detach().to(device=W.device, dtype=torch.float64)
    dists = []
    for s in range(0, W.shape[0], chunk):
        dists.append((W[s:s + chunk].double() - xd).norm(dim=1))
    dist = torch.cat(dists)
    vals, idx = dist.topk(min(k, dist.numel()), largest=False)
    return pd.DataFrame({"token_id": idx.cpu().numpy(), "token": [token_text(probe, i) for i in idx.tolist()],
                         "distance": vals.cpu().numpy()})


def embedding_scale(probe: Probe) -> dict[str, float]:
    """Scale context for distances in embedding space: ‖x0‖, the distance from x0 to the nearest other
    token embedding, and the median nearest-neighbour distance among the prompt's token embeddings."""
    W = probe.handle.embedding.weight.double()
    ids = probe.ids.tolist()
    nn = []
    for i in ids:
        d = (W - W[i]).norm(dim=1)
        d[i] = float("inf")
        nn.append(float(d.min()))
    own = nn[probe.position]
    return {"x0_norm": float(probe.x0.double().norm()), "x0_nearest_other_token": own,
            "prompt_median_nn_distance": float(np.median(nn))}


# ---------------------------------------------------------------------------------------------
# Tie points


@dataclass
class TieResult:
    """An equal-logit point found by :func:`tie_point`.

    ``x`` is the point (probe dtype, on the probe's device); ``t1``, ``t2`` the pair tied there (t1 = the
    argmax at x0); ``gap`` = G(x) from the fixed-shape forward pass, ``gap_batch1`` at batch size 1
    (the seed's semantics). For the root method ``partner`` is x with one coordinate (``partner_coord``)
    moved by one ULP and ``partner_gap`` its gap: ``exact_tie`` means G(x) == 0, or G(x) and
    G(partner) have opposite signs. ``converged`` is the method's own criterion (root: the direction
    settled; Adam: |objective| < tol). ``pair_changed`` says whether the top-2 pair differs from the
    one at x0; ``events`` lists every pair change during the search.
    """

    method: str
    x: torch.Tensor
    x0: torch.Tensor
    t1: int
    t2: int
    pair_start: tuple[int, int]
    gap: float
    gap_batch1: float
    top2_at_x: tuple[int, int]
    exact_tie: bool
    converged: bool
    pair_changed: bool
    distance: float
    lower_bound: float  # |G(x0)| / ‖∇G(x0)‖: the first-order (Newton) estimate of the distance to the tie surface
    alignment: float  # cos(x − x0, ∇G(x)); ±1 at the nearest point of the surface
    iterations: int
    evals: _Evals
    seconds: float
    message: str
    history: pd.DataFrame
    partner: torch.Tensor | None = None
    partner_gap: float = float("nan")
    partner_coord: int = -1
    objective: float = float("nan")  # the method's own objective value (seed: f·u or top1 − top2 at batch 1)
    events: list[str] = field(default_factory=list)
    tokens: dict[int, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Flat scalars for a comparison table."""
        tok = self.tokens
        return {
            "method": self.method, "pair": f"{tok.get(self.t1, self.t1)!r} vs {tok.get(self.t2, self.t2)!r}",
            "gap (fixed batch)": self.gap, "gap (batch 1)": self.gap_batch1, "objective": self.objective,
            "float tie": self.exact_tie, "converged": self.converged, "pair changed": self.pair_changed,
            "top-2 at x": f"{tok.get(self.top2_at_x[0], self.top2_at_x[0])!r}, {tok.get(self.top2_at_x[1], self.top2_at_x[1])!r}",
            "‖x − x0‖": self.distance, "first-order estimate": self.lower_bound, "cos(x − x0, ∇G)": self.alignment,
            "iterations": self.iterations, "forward rows": self.evals.rows, "forward passes": self.evals.passes,
            "backward passes": self.evals.backward, "seconds": self.seconds, "message": self.message,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Exact bits for the results store (``x``, ``x0``, ``partner``, the pair)."""
        out = {"x": to_numpy(self.x), "x0": to_numpy(self.x0),
               "pair": np.array([self.t1, self.t2], dtype=np.int64),
               "pair_start": np.array(self.pair_start, dtype=np.int64),
               "gap": np.array(self.gap), "gap_batch1": np.array(self.gap_batch1)}
        if self.partner is not None:
            out["partner"] = to_numpy(self.partner)
            out["partner_coord"] = np.array(self.partner_coord, dtype=np.int64)
            out["partner_gap"] = np.array(self.partner_gap)
        return out


def tie_point(probe: Probe, method: Method = "root", pair_policy: Literal["repick", "stop"] = "repick",
              strict: bool = True, **options: Any) -> TieResult:
    """An input near x0 (the probe's vector) at which the top-2 logits are equal.

    ``method``: "root" (default, see :func:`root_tie`), "adam_geometric" or "adam_direct" (the seed's,
    see :func:`adam_tie`). ``pair_policy`` (root only): when the argmax at the crossing is not the
    runner-up at x0, "repick" continues with the new pair and records it, "stop" raises
    :class:`TieSearchError`. ``strict``: raise :class:`TieSearchError` unless the result is a float32 tie
    (the Adam formulations essentially never reach one; pass ``strict=False`` to get their result with
    ``exact_tie=False`` and a message).
    """
    probe = logits_probe(probe)
    if method == "root":
        res = root_tie(probe, pair_policy=pair_policy, **options)
    elif method in ("adam_geometric", "adam_direct"):
        if pair_policy not in ("repick", "stop"):
            raise ValueError(f"pair_policy must be 'repick' or 'stop', got {pair_policy!r}")
        res = adam_tie(probe, objective=method.removeprefix("adam_"), **options)
    else:
        raise ValueError(f"unknown tie method {method!r}; use one of {METHODS}")
    if strict and not res.exact_tie:
        raise TieSearchError(f"{method}: no float tie: {res.message}")
    return res


def _first_change(probe: Probe, x0: torch.Tensor, u: torch.Tensor, t1: int, t_hint: float, max_scale: float,
                  points: int, ev: _Evals) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Along X(t) = x0 + t·u (t ≥ 0 in x0's dtype): adjacent scales t_lo < t_hi with argmax t1 at t_lo and
    another token at t_hi, found by scans of ``points`` scales per pass. Returns (t_lo, t_hi, winner, t_first_scan)
    or raises TieSearchError when no change is found up to ``max_scale``.

    The first pass scans (0, T] with T = 2·t_hint (T ×4 until the argmax changes); each later pass scans
    the bracket around the first changed sample, then the float bit patterns between adjacent samples, so it
    ends at adjacent representable scales (about log_points(2^31) passes). The first changed sample is taken:
    nothing assumes that "changed" is monotone in t.
    """
    dt, dev = x0.dtype, x0.device
    T = min(max(2.0 * t_hint, float(torch.finfo(dt).tiny)), max_scale)
    k = torch.arange(1, points + 1, dtype=torch.float64, device=dev)
    while True:
        ts = (k * (T / points)).to(dt)
        tops = _eval_logits(probe, line_point(x0, ts, u), ev).argmax(dim=1)
        moved = torch.nonzero(tops != t1).flatten()
        if moved.numel():
            j = int(moved[0])
            hi = ts[j]
            lo = ts[j - 1] if j > 0 else torch.zeros((), dtype=dt, device=dev)
            winner = int(tops[j])
            break
        if T >= max_scale:
            raise TieSearchError(
                f"the argmax stays {t1} along the gradient direction up to scale {T:.3g} (max_scale {max_scale:.3g}): "
                "no decision boundary found; raise max_scale")
        T = min(4.0 * T, max_scale)
    t_first = float(hi)
    # Narrow: invariant argmax(lo) == t1, argmax(hi) == winner != t1.
    while True:
        blo, bhi = int(fp.bit_pattern(lo.reshape(1))[0]), int(fp.bit_pattern(hi.reshape(1))[0])
        gap = bhi - blo
        if gap <= 1:
            return lo, hi, winner, t_first
        if gap - 1 <= points:
            cand = fp.from_bit_pattern(torch.arange(blo + 1, bhi, device=dev, dtype=torch.int64), dt)
        else:
            frac = torch.arange(1, points + 1, dtype=torch.float64, device=dev) / (points + 1)
            cand = (lo.double() + (hi.double() - lo.double()) * frac).to(dt)
            cand = torch.unique(cand)  # sorted
            cand = cand[(cand > lo) & (cand < hi)]
            if cand.numel() == 0:  # value-linear samples collapsed: step in bits instead
                mid = blo + gap // 2
                cand = fp.from_bit_pattern(torch.tensor([mid], device=dev), dt)
        tops = _eval_logits(probe, line_point(x0, cand, u), ev).argmax(dim=1)
        moved = torch.nonzero(tops != t1).flatten()
        if moved.numel():
            j = int(moved[0])
            hi, winner = cand[j], int(tops[j])
            if j > 0:
                lo = cand[j - 1]
        else:
            lo = cand[-1]


def _ulp_walk(probe: Probe, x_lo: torch.Tensor, x_hi: torch.Tensor, t1: int, t2: int, ev: _Evals,
              max_steps: int = 1_000_000) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """Resolve a bracket (G(x_lo) ≥ 0 ≥ G(x_hi)) to a float tie.

    Walks from x_lo to x_hi changing one coordinate by one ULP per step (coordinates in index order),
    evaluates G at every point (batched) and returns the first adjacent pair across which G reaches or
    crosses zero: (x, partner, coordinate, G(x), G(partner)), x being the one with the smaller |G|.
    """
    dist = fp.ulp_distance(x_lo, x_hi)
    coords = torch.nonzero(dist).flatten().tolist()
    total = int(dist.sum())
    if total == 0:
        raise TieSearchError("the two sides of the bracket have the same input but different argmax: "
                             "rows depend on their batch companions here (see the batch-invariance audit)")
    if total > max_steps:
        raise TieSearchError(f"the bracket spans {total} one-ULP steps (> {max_steps})")
    path = [x_lo]
    moved = []
    cur = x_lo.clone()
    for i in coords:
        for _ in range(int(dist[i])):
            cur = cur.clone()
            cur[i] = torch.nextafter(cur[i], x_hi[i])
            path.append(cur)
            moved.append(i)
    P = torch.stack(path)
    out = _eval_logits(probe, P, ev)
    G = (out[:, t1] - out[:, t2]).double().cpu().numpy()
    nonpos = np.flatnonzero(G <= 0)
    if nonpos.size == 0 or G[0] < 0:
        raise TieSearchError(f"no sign change of G along the one-ULP path (G from {G[0]:.3g} to {G[-1]:.3g})")
    j = int(nonpos[0])
    if G[j] == 0:
        a, b = j, (j - 1 if j > 0 else j + 1)
    else:
        a, b = j - 1, j
        if abs(G[b]) < abs(G[a]):
            a, b = b, a
    coord = moved[max(a, b) - 1]
    return P[a].clone(), P[b].clone(), coord, float(G[a]), float(G[b])


def root_tie(probe: Probe, pair_policy: Literal["repick", "stop"] = "repick", max_iter: int = 40,
             align_tol: float = 1e-5, max_scale: float | None = None, points: int | None = None,
             x_start: torch.Tensor | None = None) -> TieResult:
    """Tie point as the root of the gap along its gradient (the default formulation).

    A line search finds, on X(t) = x0 + t·u (float arithmetic of the probe's dtype), the first scale τ(u) at
    which the argmax leaves t1 (:func:`_first_change`: batched scans ending at adjacent float scales). The
    first line is u = −∇G(x0)/‖∇G(x0)‖ (a Newton step's direction). Then the direction is improved to
    minimise τ: at the crossing x_c the nearest-point condition is u ∥ −∇G(x_c); the next trial direction
    moves u a fraction β of the way to −∇G(x_c)/‖∇G(x_c)‖ (β = 1 first, halved when τ does not decrease,
    doubled after a success). Converged when 1 − cos(u, −∇G(x_c)) ≤ ``align_tol`` (x − x0 ∥ ∇G(x));
    otherwise, after ``max_iter`` line searches or when β falls below 1e-4, the smallest crossing found
    is returned with ``converged=False`` and a warning (it is an exact tie, maybe not the nearest).
    Pair changes: the pair is (t1, the argmax just past the crossing); if that is not the runner-up at x0
    the pair changed — ``pair_policy`` "repick" continues with the new pair, "stop" raises.
    The final bracket is resolved to a one-ULP float tie by :func:`_ulp_walk`.
    ``points``: scales per scan pass (default: the probe's batch size, at least 16).
    """
    _check_logits_probe(probe)
    if pair_policy not in ("repick", "stop"):
        raise ValueError(f"pair_policy must be 'repick' or 'stop', got {pair_policy!r}")
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    t0 = time.perf_counter()
    ev = _Evals()
    x0 = (probe.x0 if x_start is None else x_start).detach().to(device=probe.x0.device, dtype=probe.dtype)
    if not torch.isfinite(x0).all():
        raise ValueError("x0 has non-finite entries")
    points = max(16, probe.batch_size) if points is None else int(points)
    ref = _eval_logits(probe, x0[None], ev)[0]
    t1, t2 = top2(ref)
    pair_start = (t1, t2)
    G0 = float(ref[t1] - ref[t2])
    g0 = gap_gradient(probe, x0, t1, t2)
    ev.backward += 1
    gnorm0 = float(g0.double().norm())
    if not math.isfinite(gnorm0) or gnorm0 == 0:
        raise TieSearchError(f"∇G at x0 is {gnorm0}: no direction to search along")
    lower_bound = G0 / gnorm0
    if max_scale is None:
        max_scale = 10.0 * max(float(x0.double().norm()), lower_bound)
    events: list[str] = []
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    u_try = (-g0.double() / gnorm0)
    beta, converged, stalled = 1.0, False, False
    for it in range(max_iter):
        u = u_try.to(probe.dtype)
        hint = lower_bound if best is None else best["t"]
        lo, hi, winner, _ = _first_change(probe, x0, u, t1, hint, max_scale, points, ev)
        pair_t2 = t2
        if winner != t2:
            msg = (f"top-2 pair changed at line search {it}: along this direction the argmax first changes from "
                   f"{token_text(probe, t1)!r} to {token_text(probe, winner)!r} (id {winner}), not to the runner-up "
                   f"{token_text(probe, t2)!r}, at scale {float(hi):.6g}")
            if pair_policy == "stop":
                raise TieSearchError(msg + "; pair_policy='repick' continues with the new pair")
            pair_t2 = winner
        t = float(lo)
        accepted = best is None or t < best["t"] or (pair_t2 != best["t2"] and t <= best["t"])
        align = float("nan")
        if accepted:
            if pair_t2 != t2:
                events.append(msg + f"; re-picked the pair ({token_text(probe, t1)!r}, {token_text(probe, winner)!r})")
                t2 = pair_t2
            g = gap_gradient(probe, line_point(x0, lo, u), t1, t2)
            ev.backward += 1
            gn = float(g.double().norm())
            if not math.isfinite(gn) or gn == 0:
                raise TieSearchError(f"∇G at the crossing of line search {it} is zero or not finite")
            target = -g.double() / gn
            align = float(target @ u.double() / u.double().norm())
            best = {"lo": lo, "hi": hi, "u": u, "t2": t2, "t": t, "target": target, "align": align}
            beta = min(1.0, 2.0 * beta) if it > 0 else beta
        else:
            beta *= 0.5
        rows.append({"line_search": it, "scale": t, "accepted": accepted, "runner_up": pair_t2,
                     "cos(u, −∇G at crossing)": align, "beta": beta, "best_scale": best["t"]})
        if 1.0 - best["align"] <= align_tol:
            converged = True
            break
        if beta < 1e-4:
            stalled = True
            break
        ub = best["u"].double()
        u_try = ub + beta * (best["target"] - ub)
        u_try = u_try / u_try.norm()
    assert best is not None
    t2 = best["t2"]
    x_lo = line_point(x0, best["lo"], best["u"])
    x_hi = line_point(x0, best["hi"], best["u"])
    x, partner, coord, gx, gp = _ulp_walk(probe, x_lo, x_hi, t1, t2, ev)
    exact = gx == 0 or (gx > 0) != (gp > 0)
    kind = str(probe.dtype).removeprefix("torch.")
    message = f"{kind} tie" if exact else "no sign change at the final bracket"
    if converged:
        message += f"; nearest-point condition met after {len(rows)} line searches (1 − cos = {1 - best['align']:.1e})"
    else:
        why = "the step size fell below 1e-4" if stalled else f"{max_iter} line searches"
        message += (f"; nearest-point condition not met ({why}; 1 − cos = {1 - best['align']:.1e} > {align_tol:g}): "
                    "the tie is exact but may not be the nearest point of the surface")
        warnings.warn(f"root_tie: {message}", stacklevel=2)
    return _finish_tie(probe, "root", x, x0, t1, t2, pair_start, exact, converged, lower_bound, len(rows), ev,
                       t0, message, pd.DataFrame(rows), events, partner=partner, partner_gap=gp,
                       partner_coord=coord)


def _finish_tie(probe: Probe, method: str, x: torch.Tensor, x0: torch.Tensor, t1: int, t2: int,
                pair_start: tuple[int, int], exact: bool, converged: bool, lower_bound: float, iterations: int,
                ev: _Evals, t0: float, message: str, history: pd.DataFrame, events: list[str],
                objective: float = float("nan"), **extra: Any) -> TieResult:
    out = _eval_logits(probe, x[None], ev)[0]
    gap = float(out[t1] - out[t2])
    with torch.no_grad():
        out1 = probe.f_batch(x[None])[0]
    gap1 = float(out1[t1] - out1[t2])
    top = top2(out)
    g = gap_gradient(probe, x, t1, t2)
    ev.backward += 1
    dx = (x.double() - x0.double())
    dist = float(dx.norm())
    align = float(torch.nn.functional.cosine_similarity(dx, g.double(), dim=0)) if dist > 0 else float("nan")
    changed = set(top) != set(pair_start)
    if changed and not events:
        events = [f"the top-2 at the result is ({token_text(probe, top[0])!r}, {token_text(probe, top[1])!r}), "
                  f"not the pair at x0 ({token_text(probe, pair_start[0])!r}, {token_text(probe, pair_start[1])!r})"]
    ids = {*pair_start, t1, t2, *top}
    return TieResult(method=method, x=x.detach().clone(), x0=x0.detach().clone(), t1=t1, t2=t2, pair_start=pair_start,
                     gap=gap, gap_batch1=gap1, top2_at_x=top, exact_tie=bool(exact), converged=bool(converged),
                     pair_changed=bool(changed or (t1, t2) != pair_start), distance=dist, lower_bound=lower_bound,
                     alignment=align, iterations=iterations, evals=ev, seconds=time.perf_counter() - t0,
                     message=message, history=history, events=events, objective=objective,
                     tokens={i: token_text(probe, i) for i in ids}, **extra)


def adam_tie(probe: Probe, objective: Literal["geometric", "direct"] = "geometric", iterations: int = 500,
             lr: float = 1e-3, tol: float | None = None, keep_best: bool | None = None, clip: float = 1.0,
             x_start: torch.Tensor | None = None) -> TieResult:
    """The seed's optimisers (exp6 part 1), on the last-row embedding only, at batch size 1.

    ``"geometric"``: loss (f·u)² with f the state after the final norm and u = W_U[t1] − W_U[t2] (+ the bias
    difference if the unembedding has one), the pair fixed from x0; stops when |f·u| < ``tol`` (seed: 1e-8);
    keeps the best iterate (seed). ``"direct"``: loss (top1 − top2)² of the logits, the top-2 re-picked every
    iteration; no stopping rule and the last iterate (seed; ``tol``/``keep_best`` override). Adam(lr), the
    gradient norm clipped to ``clip`` (seed: 1). The result is whatever the optimiser reached: ``exact_tie``
    only if G is exactly 0 in the fixed batch shape.
    """
    _check_logits_probe(probe)
    if objective not in ("geometric", "direct"):
        raise ValueError(f"objective must be 'geometric' or 'direct', got {objective!r}")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    if tol is None:
        tol = 1e-8 if objective == "geometric" else 0.0
    if keep_best is None:
        keep_best = objective == "geometric"
    t0 = time.perf_counter()
    ev = _Evals()
    x0 = (probe.x0 if x_start is None else x_start).detach().to(device=probe.x0.device, dtype=probe.dtype)
    ref = _eval_logits(probe, x0[None], ev)[0]
    t1, t2 = top2(ref)
    pair_start = (t1, t2)
    g0 = gap_gradient(probe, x0, t1, t2)
    ev.backward += 1
    lower_bound = float(ref[t1] - ref[t2]) / float(g0.double().norm())
    h = probe.handle
    if objective == "geometric":
        fh = Probe(h, probe.text, probe.position, "final_hidden", 1)
        W = h.unembed.weight.detach()
        u = (W[t1] - W[t2]).to(probe.dtype)
        bias = getattr(h.unembed, "bias", None)
        du = 0.0 if bias is None else (bias[t1] - bias[t2]).detach().to(probe.dtype)

        def value(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
            return fh.f(x) @ u + du, (t1, t2)
    else:
        def value(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
            logits = probe.f(x)
            v, i = logits.topk(2)
            return v[0] - v[1], (int(i[0]), int(i[1]))

    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    best_val, best_x, converged, status = float("inf"), x0.clone(), False, ""
    rows = []
    pairs_seen = {pair_start}
    last_val = float("nan")
    for it in range(iterations):
        opt.zero_grad()
        with torch.enable_grad():
            val, pair = value(x)
            loss = val.pow(2)
        last_val = float(val.detach())
        if not math.isfinite(last_val):
            status = f"objective became non-finite at iteration {it}"
            break
        pairs_seen.add(pair)
        rows.append({"iteration": it, "objective": last_val, "distance": float((x.detach().double() - x0.double()).norm()),
                     "pair": f"{pair[0]},{pair[1]}"})
        if abs(last_val) < best_val:
            best_val, best_x = abs(last_val), x.detach().clone()
        if abs(last_val) < tol:
            converged = True
            break
        loss.backward()
        ev.backward += 1
        with torch.no_grad():
            n = x.grad.norm()
            if n > clip:
                x.grad.mul_(clip / n)
        opt.step()
    xf = best_x if keep_best else x.detach().clone()
    out = _eval_logits(probe, xf[None], ev)[0]
    # The pair the seed's method ended on: fixed (geometric) or the top-2 at the result (direct).
    p1, p2 = (t1, t2) if objective == "geometric" else top2(out)
    gap = float(out[p1] - out[p2])
    exact = gap == 0.0
    parts = [status] if status else []
    if converged:
        parts.append(f"|objective| < {tol:g} at iteration {rows[-1]['iteration']}")
    else:
        parts.append(f"not converged after {len(rows)} iterations: best |objective| {best_val:.3g}"
                     + (f" (tol {tol:g})" if tol else " (the seed's direct variant has no stopping rule)"))
    if not exact:
        parts.append(f"G = {gap:.3g} in the fixed batch shape, not a float tie")
    events = []
    if objective == "direct" and len(pairs_seen) > 1:
        events.append(f"the top-2 pair was re-picked: {len(pairs_seen)} different pairs during the iterations")
    return _finish_tie(probe, f"adam_{objective}", xf, x0, p1, p2, pair_start, exact, converged, lower_bound,
                       len(rows), ev, t0, "; ".join(parts), pd.DataFrame(rows), events, objective=last_val)


# ---------------------------------------------------------------------------------------------
# 1-D token-flip scans


def eps_grid(eps_max: float = 1e-6, eps_step: float = 1e-9) -> np.ndarray:
    """Symmetric ε grid k·step, k = −n..n with n = round(eps_max/step) (the seed's arange, with 0 exact), float32."""
    if not (eps_max > 0 and eps_step > 0):
        raise ValueError("eps_max and eps_step must be positive")
    n = int(round(eps_max / eps_step))
    if n > 10_000_000:
        raise ValueError(f"{2 * n + 1} ε values per direction is too many")
    return (np.arange(-n, n + 1, dtype=np.float64) * eps_step).astype(np.float32)


@dataclass
class FlipScan:
    """Argmax along x + ε·v for each direction v (rows) and ε (columns)."""

    eps: np.ndarray  # [n] float32
    names: list[str]
    reference_token: int  # argmax at x (ε = 0), fixed batch shape
    tokens: np.ndarray  # [k, n] int64 argmax
    probs: np.ndarray  # [k, n] float64 softmax probability of the argmax
    gap: np.ndarray  # [k, n] float32 G = logit[t1] − logit[t2]
    distinct_inputs: np.ndarray  # [k] distinct float inputs along each direction
    pair: tuple[int, int]
    rows: int
    token_texts: dict[int, str]

    @property
    def flipped(self) -> np.ndarray:
        return self.tokens != self.reference_token

    def first_flips(self) -> pd.DataFrame:
        """Per direction: the smallest ε > 0 and the largest ε < 0 (smallest |ε|) with a flip, the seed's
        "first" (most negative flipped ε), flip counts and token changes between consecutive ε."""
        rows = []
        for k, name in enumerate(self.names):
            f = self.flipped[k]
            pos = np.flatnonzero(f & (self.eps > 0))
            neg = np.flatnonzero(f & (self.eps < 0))
            any_ = np.flatnonzero(f)
            at_pos = int(self.tokens[k, pos[0]]) if pos.size else -1
            at_neg = int(self.tokens[k, neg[-1]]) if neg.size else -1
            rows.append({
                "direction": name,
                "first flip ε > 0": float(self.eps[pos[0]]) if pos.size else np.nan,
                "token there (+)": self.token_texts.get(at_pos, "") if pos.size else "",
                "first flip ε < 0": float(self.eps[neg[-1]]) if neg.size else np.nan,
                "token there (−)": self.token_texts.get(at_neg, "") if neg.size else "",
                "seed's first flip (most negative ε)": float(self.eps[any_[0]]) if any_.size else np.nan,
                "flipped ε": int(f.sum()),
                "token changes": int((np.diff(self.tokens[k]) != 0).sum()),
                "distinct inputs": int(self.distinct_inputs[k]),
            })
        return pd.DataFrame(rows)

    def table(self) -> pd.DataFrame:
        """Long form, one row per (direction, ε) — the seed's per-direction CSV columns plus the gap."""
        k, n = self.tokens.shape
        toks = self.tokens.ravel()
        return pd.DataFrame({
            "direction": np.repeat(self.names, n), "epsilon": np.tile(self.eps, k), "pred_token_id": toks,
            "pred_token": [self.token_texts.get(int(t), "") for t in toks], "pred_prob": self.probs.ravel(),
            "gap": self.gap.ravel(), "token_changed": self.flipped.ravel(),
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return {"eps": self.eps, "names": np.asarray(self.names), "tokens": self.tokens, "probs": self.probs,
                "gap": self.gap, "distinct_inputs": self.distinct_inputs,
                "reference_token": np.array(self.reference_token), "pair": np.array(self.pair)}


def _check_directions(D: torch.Tensor, d: int, what: str = "direction") -> torch.Tensor:
    D = torch.as_tensor(D)
    if D.ndim == 1:
        D = D[None]
    if D.ndim != 2 or D.shape[1] != d:
        raise ValueError(f"{what}s must have shape [k, {d}], got {tuple(D.shape)}")
    if not torch.isfinite(D).all():
        raise ValueError(f"{what}s contain non-finite entries")
    zero = torch.nonzero(D.abs().amax(dim=1) == 0).flatten().tolist()
    if zero:
        raise ValueError(f"{what} {zero[0]} has zero norm")
    return D


def _row_hash(X: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """Two 64-bit hashes per row of the exact bits of X [n, d] (signed zeros distinct): [n, 2] int64."""
    bits = fp.bit_pattern(X)
    return torch.stack([(bits * salt[0]).sum(dim=1), (bits * salt[1]).sum(dim=1)], dim=1)


def _salt(d: int, device: torch.device) -> torch.Tensor:
    gen = np.random.default_rng(20240611)
    s = gen.integers(1, 2**62, size=(2, d), dtype=np.int64) | 1
    return torch.from_numpy(s).to(device)


@torch.no_grad()
def flip_scan(probe: Probe, x: torch.Tensor, directions: torch.Tensor, eps: np.ndarray,
              names: list[str] | None = None, pair: tuple[int, int] | None = None) -> FlipScan:
    """The argmax token and its probability at x + ε·v (fp32-mode arithmetic: fl(x + fl(ε·v))), batched.

    ``directions`` [k, d] used as given (float, the probe's dtype); ``eps`` float values (rounded to the
    probe's dtype). The reference token is the argmax at x in the same fixed batch shape; ``pair`` (default:
    the top-2 at x) names the gap recorded per ε.
    """
    probe = logits_probe(probe)
    dt, dev = probe.dtype, probe.x0.device
    x = x.detach().to(device=dev, dtype=dt)
    D = _check_directions(directions, probe.d).to(device=dev, dtype=dt)
    k = D.shape[0]
    names = list(names) if names is not None else [f"v{i + 1}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} names for {k} directions")
    e = torch.from_numpy(np.asarray(eps, dtype=np.float64)).to(device=dev).to(dt)
    if not torch.isfinite(e).all():
        raise ValueError("eps has non-finite values")
    rows_before = probe.rows_evaluated
    ref = probe.forward(x[None])[0]
    ref_token = int(ref.argmax())
    p1, p2 = top2(ref) if pair is None else (int(pair[0]), int(pair[1]))
    n = e.numel()
    tokens = np.empty((k, n), dtype=np.int64)
    probs = np.empty((k, n), dtype=np.float64)
    gap = np.empty((k, n), dtype=np.float32)
    distinct = np.empty(k, dtype=np.int64)
    salt = _salt(probe.d, dev)
    step = max(probe.batch_size, (1 << 16) // max(1, probe.d) // probe.batch_size * probe.batch_size)
    for r in range(k):
        hashes = []
        for s in range(0, n, step):
            X = x + e[s:s + step, None] * D[r]
            hashes.append(_row_hash(X, salt))
            L = probe.forward(X)
            tokens[r, s:s + step] = L.argmax(dim=1).cpu().numpy()
            Ld = L.double()
            probs[r, s:s + step] = (1.0 / torch.exp(Ld - Ld.max(dim=1, keepdim=True).values).sum(dim=1)).cpu().numpy()
            gap[r, s:s + step] = (L[:, p1] - L[:, p2]).float().cpu().numpy()
        distinct[r] = len(np.unique(torch.cat(hashes).cpu().numpy(), axis=0))
    ids = {ref_token, p1, p2, *np.unique(tokens).tolist()}
    return FlipScan(eps=e.float().cpu().numpy(), names=names, reference_token=ref_token, tokens=tokens, probs=probs,
                    gap=gap, distinct_inputs=distinct, pair=(p1, p2), rows=probe.rows_evaluated - rows_before,
                    token_texts={int(i): token_text(probe, i) for i in ids})


# ---------------------------------------------------------------------------------------------
# 2-D logit-gap grids


def grid_axis(e_min: float, e_max: float, step: float | None = None, n: int | None = None,
              dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Scales linspace(e_min, e_max, n) computed in float64 and rounded once to ``dtype``.

    Give ``n`` or ``step`` (the seed: n = int((e_max − e_min)/step) + 1, here rounded, so ±1e-8 with step
    1e-10 gives 201 points).
    """
    if not (math.isfinite(e_min) and math.isfinite(e_max) and e_max > e_min):
        raise ValueError(f"need finite e_min < e_max, got {e_min}, {e_max}")
    if (step is None) == (n is None):
        raise ValueError("give exactly one of step and n")
    if n is None:
        if not step > 0:
            raise ValueError("step must be positive")
        n = int(round((e_max - e_min) / step)) + 1
    if n < 2:
        raise ValueError("a grid axis needs at least 2 points")
    return torch.from_numpy(np.linspace(e_min, e_max, int(n))).to(dtype).numpy()


def grid_inputs(x: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                mode: GridMode = "fp32") -> torch.Tensor:
    """The grid's inputs X[r] for rows r = (i, j) given as index tensors, i.e. a [r] and b [r] already gathered.

    ``"fp32"``: fl(fl(x + fl(a·h1)) + fl(b·h2)) — every product and sum rounded in x's dtype (float32 for a
    float32 model), as fp.perturb's fp32 mode and the seed's ``x0 + e1*h1 + e2*h2``.
    ``"fp64"``: x + a·h1 + b·h2 in float64, rounded once to x's dtype.
    """
    if mode == "fp32":
        return (x + a[:, None] * h1) + b[:, None] * h2
    if mode == "fp64":
        return (x.double() + a.double()[:, None] * h1.double() + b.double()[:, None] * h2.double()).to(x.dtype)
    raise ValueError(f"unknown grid mode {mode!r}; use 'fp32' or 'fp64'")


@dataclass
class GapGrid:
    """G[i, j] = logit[t1] − logit[t2] at X_ij = grid_inputs(x, h1, h2, a_i, b_j) (i along h1, j along h2)."""

    a: np.ndarray  # [na] scales along h1 (the input dtype, exact)
    b: np.ndarray  # [nb] scales along h2
    G: np.ndarray  # [na, nb] float32 (float64 for a float64 model; np.memmap when written to disk)
    top: np.ndarray  # [na, nb] int32 argmax token per cell
    state: np.ndarray  # [na, nb] int64 label of the distinct input X_ij (0, 1, … in order of first appearance)
    n_states: int
    x: np.ndarray  # the centre, exact
    h1: np.ndarray
    h2: np.ndarray
    pair: tuple[int, int]
    mode: str
    batch_size: int
    rows: int  # forward rows run (padding included)
    chunks: int
    chunk_rows: int
    seconds: float
    G_lin: np.ndarray | None = None  # [na, nb] float64: G(x) + ∇G(x)·(X_ij − x), when computed
    gap_center: float = float("nan")
    audit: dict[str, Any] | None = None
    path: dict[str, Any] | None = None  # how the rows were computed (gap_grid's fast routes; None when stored)

    @property
    def sign(self) -> np.ndarray:
        """B = (G ≥ 0) as uint8: 1 where t1 wins or ties (the seed's binary map)."""
        return (np.asarray(self.G) >= 0).astype(np.uint8)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"a": self.a, "b": self.b, "G": np.asarray(self.G), "top": np.asarray(self.top),
               "state": np.asarray(self.state), "x": self.x, "h1": self.h1, "h2": self.h2,
               "pair": np.array(self.pair, dtype=np.int64)}
        if self.G_lin is not None:
            out["G_lin"] = np.asarray(self.G_lin)
        return out

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray], mode: str = "fp32") -> "GapGrid":
        """Rebuild from :meth:`arrays` (a stored grid), for cropping and statistics."""
        state = z["state"]
        return cls(a=z["a"], b=z["b"], G=z["G"], top=z["top"], state=state, n_states=int(state.max()) + 1,
                   x=z["x"], h1=z["h1"], h2=z["h2"], pair=tuple(int(v) for v in z["pair"]), mode=mode,
                   batch_size=0, rows=0, chunks=0, chunk_rows=0, seconds=0.0, G_lin=z.get("G_lin"))


# ---------------------------------------------------------------------------------------------
# The grid's rows, fast: the prompt prefix computed once, the head restricted to a few column
# blocks, each used only where it reproduces the plain rows (Probe.f_batch) bit for bit.


def _family_eager(module: torch.nn.Module) -> Any:
    """The eager attention function of ``module``'s modelling file (the default its forward passes)."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def _full_shape_eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Eager attention for q < k new queries against k keys, computed in the full [k, k] shape.

    The queries are placed in the last q of k rows (laid out as the full sequence lays them out; the other
    rows are zeros with a zero mask and are dropped), so the score and value matmuls run in exactly the shapes
    of the full-sequence forward: CPU ``bmm`` switches kernels for small matrices, and one query row alone is
    not the same float computation as that row inside the [k, k] product.
    """
    eager = _family_eager(module)
    q, k = query.shape[-2], key.shape[-2]
    if q >= k:
        return eager(module, query, key, value, attention_mask, *args, **kwargs)
    n, heads, _, dh = query.shape
    buf = query.new_zeros((n, k, heads, dh))
    buf[:, k - q:] = query.transpose(1, 2)
    mask = attention_mask
    if attention_mask is not None:
        mask = attention_mask.new_zeros((*attention_mask.shape[:-2], k, attention_mask.shape[-1]))
        mask[..., k - q:, :] = attention_mask
    out, w = eager(module, buf.transpose(1, 2), key, value, mask, *args, **kwargs)
    return out[:, k - q:], (None if w is None else w[..., k - q:, :])


class _full_shape_attention:
    """Context: the "eager" attention of every model runs :func:`_full_shape_eager` (restored on exit)."""

    def __enter__(self) -> "_full_shape_attention":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A

        if "eager" in A._local_mapping:
            raise RuntimeError("another eager attention override is active")
        A["eager"] = _full_shape_eager
        self._A = A
        return self

    def __exit__(self, *exc: Any) -> None:
        del self._A["eager"]


# Prefix keys/values per probe (the notebooks grid one probe several times): (key, E, kv).
_PREFIX_KV: "weakref.WeakKeyDictionary[Probe, tuple]" = weakref.WeakKeyDictionary()


class _GridRows:
    """(hidden, logits) of fixed-shape batches of a logits probe, as :meth:`Probe.f_batch` computes them, and
    two faster routes to the same bits, each switched on only after reproducing the plain batch bit for bit:

    * **prefix** — the prompt tokens before the perturbed position are the same in every row. Their keys and
      values are taken once from a full-sequence forward of the fixed batch shape (rows x0), and each batch runs
      only the tokens from the position on against them (1 token per row instead of L when the position is the
      last). Linear layers then run [b·(L−p), d] instead of [b·L, d] matmuls and attention runs in the full
      [L, L] shape (:func:`_full_shape_eager`).
    * **head** — only the lm_head column blocks holding t1 and t2 (and the reference's top 2) are computed
      (``block`` columns each, [b, d] × [d, block]). The argmax over the whole vocabulary is certified per row:
      for every other token k, fl(W_k·h) ≤ L_ref,k + ‖W_k‖ (‖h − h_ref‖ + γ_d (‖h‖ + ‖h_ref‖)) (Cauchy–Schwarz
      and the worst-case dot-product error γ_d = d·u/(1 − d·u), any summation order), so if the best block
      logit exceeds max L_ref,k + max ‖W_k‖ (…) the argmax lies in the blocks (and, blocks in increasing
      column order, is the same first index). A batch with an uncertified row runs the plain path.

    Verification: the first grid batch is run plain (its results are used) and by the candidate routes; a
    route whose hidden states or block logits differ in any bit is not used. All later batches have the same
    shapes, so they run the same kernels; floating-point kernels do not branch on the data.
    """

    def __init__(self, probe: Probe, x: torch.Tensor) -> None:
        self.probe, self.h = probe, probe.handle
        self.p, self.L, self.b = probe.position, int(probe.ids.shape[0]), probe.batch_size
        self.plain_batches = 0  # batches run whole (the reference, the verified one, and all without the routes)
        self.full_head_batches = 0  # batches whose argmax the blocks could not certify: the full head on their states
        Hr, Lr = self.plain(probe.pad(x[None])[0][0])  # the reference f(x) in the fixed batch shape
        self.ref, self.h_ref = Lr[0], Hr[0]
        self.vocab = int(self.ref.shape[0])
        self.prefix_reason = self.head_reason = "fast=False"
        self._kv, self.cols, self.verified = None, None, True

    def prepare(self, t1: int, t2: int, fast: bool, block: int) -> None:
        """Choose the candidate routes for the pair (t1, t2); the first batch of :meth:`rows` verifies them."""
        if not fast:
            return
        self.verified = False
        top = self.ref.topk(min(2, self.vocab)).indices.tolist()
        self.prefix_reason = self._prefix_candidate()
        self.head_reason = self._head_candidate((t1, t2, *top), block)

    # --- the plain rows -----------------------------------------------------------------------
    def plain_hidden(self, X: torch.Tensor) -> torch.Tensor:
        """Final hidden [b, d] at the position of one fixed-shape batch: the operations of Probe.f_batch."""
        self.probe.rows_evaluated += X.shape[0]
        return run_until(self.h, self.probe.embeds(X), self.h.final_norm)[:, self.p, :]

    def plain(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden [b, d], logits [b, V]) of one fixed-shape batch, as Probe.f_batch."""
        H = self.plain_hidden(X)
        self.plain_batches += 1
        return H, self.h.logits(H)

    # --- the prefix route ---------------------------------------------------------------------
    def _prefix_candidate(self) -> str:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.p == 0:
            return "no prefix (position 0)"
        if self.h.adapter.mixture_of_experts:  # the first batch's check would not cover the next batches' shapes
            return "mixture of experts: each expert's batch shape depends on the routed rows"
        if getattr(self.h.model.config, "_attn_implementation", None) != "eager":
            return "attention is not eager"
        if "eager" in ALL_ATTENTION_FUNCTIONS._local_mapping:
            return "eager attention overridden"
        key = (self.b, self.p, self.probe.x0.dtype)
        kept = _PREFIX_KV.get(self.probe)
        if kept is not None and kept[0] == key and torch.equal(fp.bit_pattern(kept[1]), fp.bit_pattern(self.probe.E)):
            self._kv = kept[2]
            return "candidate"
        try:
            out = self.h.base(inputs_embeds=self.probe.embeds(self.probe.x0.expand(self.b, -1)), use_cache=True)
            layers = out.cache.layers
            if any(layer.keys.shape[-2] != self.L for layer in layers):
                return "the cache does not keep every position"
            self._kv = [(layer.keys[:1, ..., :self.p, :].clone(), layer.values[:1, ..., :self.p, :].clone())
                        for layer in layers]
        except Exception as e:  # a family whose cache cannot be read this way: the plain rows
            return f"no prefix cache ({type(e).__name__})"
        _PREFIX_KV[self.probe] = (key, self.probe.E.clone(), self._kv)
        return "candidate"

    def _cache(self, n: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.h.model.config)
        for i, (k, v) in enumerate(self._kv):
            cache.update(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]), i)
        return cache

    def prefix_hidden(self, X: torch.Tensor) -> torch.Tensor:
        """Final hidden [b, d] at the position: tokens p..L−1 run against the prefix's keys and values."""
        h, n, E = self.h, X.shape[0], self.probe.E
        emb = torch.cat([X[:, None, :], E[self.p + 1:].expand(n, self.L - self.p - 1, -1)], dim=1)
        with _full_shape_attention():
            full = run_until(h, emb, h.final_norm, cache=self._cache(n), use_cache=True)
        self.probe.rows_evaluated += n
        return full[:, 0, :]

    # --- the head route -----------------------------------------------------------------------
    def _head_candidate(self, tokens: tuple[int, ...], block: int) -> str:
        head, dt = self.h.unembed, self.probe.dtype
        if self.h.adapter.head_transforms:
            return "the head has post-head steps"
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return "the head is not a bias-free Linear"
        if dt not in (torch.float32, torch.float64):
            return f"no error bound for {dt}"
        if dt == torch.float32 and (torch.get_float32_matmul_precision() != "highest" or (
                self.ref.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)):
            return "float32 matmuls run in reduced precision (TF32/bf16): no error bound"
        u = torch.finfo(dt).eps / 2
        d = self.probe.d
        if d * u >= 0.5:
            return "d·u too large for an error bound"
        # Block c keeps columns [c·block, its end); every block computes exactly ``block`` columns (a last, partial
        # block ends at V and starts inside the block before it), so that all are the same matmul shape: a narrower
        # one runs another CPU kernel, whose sums differ in the last bits from the full head's.
        ends = {c: min((c + 1) * block, self.vocab) for c in sorted({int(t) // block for t in tokens})}
        cols = [(end - block, end, c * block) for c, end in ends.items()]
        if sum(end - keep for _, end, keep in cols) >= self.vocab:
            return "the blocks cover the vocabulary"
        self.cols = cols
        self.idx = torch.cat([torch.arange(keep, end) for _, end, keep in cols]).to(self.ref.device)
        W = head.weight
        inside = torch.zeros(self.vocab, dtype=torch.bool, device=W.device)
        inside[self.idx] = True
        self.gamma = d * u / (1 - d * u)
        # ‖W_k‖ in the model's dtype (no float64 copy of the vocabulary), raised by more than its rounding error
        norms = torch.linalg.vector_norm(W.detach(), dim=1)
        self.m_out = float(self.ref.double()[~inside].max())
        self.n_out = float(norms[~inside].max()) * (1 + 4 * self.gamma)
        self.h_ref64 = self.h_ref.double()
        self.h_ref_norm = float(self.h_ref64.norm())
        return "candidate"

    def head_blocks(self, H: torch.Tensor) -> torch.Tensor:
        W = self.h.unembed.weight
        return torch.cat([torch.nn.functional.linear(H, W[c0:c1])[:, keep - c0:] for c0, c1, keep in self.cols], dim=1)

    def certified(self, H: torch.Tensor, Lb: torch.Tensor) -> torch.Tensor:
        """[b] bool: the row's argmax over the whole vocabulary is provably inside the blocks."""
        H64 = H.double()
        c = (H64 - self.h_ref64).norm(dim=1) + self.gamma * (H64.norm(dim=1) + self.h_ref_norm)
        bound = self.m_out + self.n_out * c * (1 + 1e-9) + abs(self.m_out) * 1e-12
        best = Lb.double().max(dim=1).values
        return torch.isfinite(Lb).all(dim=1) & (best > bound)

    # --- the rows -----------------------------------------------------------------------------
    def rows(self, X: torch.Tensor, t1: int, t2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G = logit[t1] − logit[t2], argmax) for one fixed-shape batch X [b, d]."""
        if not self.verified:
            return self._verify(X, t1, t2)
        use_prefix, use_head = self.prefix_reason == "used", self.head_reason == "used"
        if not use_head:
            L = self.h.logits(self.prefix_hidden(X)) if use_prefix else self.plain(X)[1]
            return L[:, t1] - L[:, t2], L.argmax(dim=1)
        H = self.prefix_hidden(X) if use_prefix else self.plain_hidden(X)
        Lb = self.head_blocks(H)
        if not bool(self.certified(H, Lb).all()):  # H is bitwise the plain rows' state: only the head is missing
            self.full_head_batches += 1
            L = self.h.logits(H)
            return L[:, t1] - L[:, t2], L.argmax(dim=1)
        return Lb[:, self.pos[t1]] - Lb[:, self.pos[t2]], self.idx[Lb.argmax(dim=1)]

    def _verify(self, X: torch.Tensor, t1: int, t2: int) -> tuple[torch.Tensor, torch.Tensor]:
        H, L = self.plain(X)
        if self.prefix_reason == "candidate":
            try:
                Hp = self.prefix_hidden(X)
                same = bool(fp.bits_equal(Hp, H).all())
            except Exception as e:  # an attention or cache this route cannot drive: the plain rows
                same, self.prefix_reason = False, f"failed ({type(e).__name__}: {e})"
            if same:
                self.prefix_reason = "used"
            elif self.prefix_reason == "candidate":
                self.prefix_reason = "not bitwise equal to the plain rows"
        if self.head_reason == "candidate":
            Hs = Hp if self.prefix_reason == "used" else H  # the hidden states later batches will feed the head
            if bool(fp.bits_equal(self.head_blocks(Hs), L[:, self.idx]).all()):
                self.head_reason = "used"
                self.pos = {int(t): int((self.idx == t).nonzero()[0]) for t in (t1, t2)}
            else:
                self.head_reason = "not bitwise equal to the full head"
        if self.prefix_reason == "used" and self.head_reason != "used" and \
                not bool(fp.bits_equal(self.h.logits(Hp), L).all()):
            self.prefix_reason = "the full head of the cached hidden states differs from the plain rows"
        self.verified = True
        return L[:, t1] - L[:, t2], L.argmax(dim=1)

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix_reason, "tokens_per_row": self.L - self.p if self.prefix_reason == "used"
                else self.L, "head": self.head_reason,
                "head_columns": sum(c1 - c0 for c0, c1, _ in self.cols) if self.head_reason == "used" else self.vocab,
                "plain_batches": self.plain_batches, "full_head_batches": self.full_head_batches}


def _chunk_rows(probe: Probe, vocab: int, memory_bytes: int) -> int:
    item = torch.finfo(probe.dtype).bits // 8
    per_row = (probe.d * 3 + vocab * 2) * max(item, 4) + 64  # inputs + temporaries, logits + reductions
    b = probe.batch_size
    return max(b, (memory_bytes // per_row) // b * b)


@torch.no_grad()
def gap_grid(probe: Probe, x: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, a: np.ndarray, b: np.ndarray,
             pair: tuple[int, int] | None = None, mode: GridMode = "fp32", linear: bool = False,
             memory_bytes: int = 256 * 2**20, max_result_bytes: int = 2 * 2**30, out_dir: str | Path | None = None,
             audit: bool = True, progress: bool = False, fast: bool = True, head_block: int = 256) -> GapGrid:
    """G over the grid X_ij = grid_inputs(x, h1, h2, a_i, b_j), in fixed-shape batches of ``probe.batch_size``.

    Rows are cell indices r = i·nb + j, generated chunk by chunk (at most ``memory_bytes`` of inputs and
    logits at a time) and reduced to (G, argmax, input hash) at once, so memory does not grow with the grid.
    Results larger than ``max_result_bytes`` need ``out_dir`` (they are written to .npy memmaps there);
    otherwise a clear error is raised rather than running out of memory. ``pair`` defaults to the top-2 at x.
    ``linear``: also the first-order prediction G(x) + ∇G(x)·(X_ij − x) from the realised inputs (float64).
    The probe's batch must be position invariant (checked by the audit unless ``audit=False``).

    ``fast`` (default): every cell is still the plain fixed-shape row (G and argmax bit for bit those of
    ``probe.forward``), but computed with the prompt prefix run once and the lm_head restricted to
    ``head_block``-column blocks around the pair, where the first batch shows that these routes reproduce the
    plain rows bit for bit and the argmax is certified per row (see :class:`_GridRows`; ``GapGrid.path`` says
    which routes ran and why). ``fast=False``: the plain rows only.
    """
    probe = logits_probe(probe)
    t_start = time.perf_counter()
    dt, dev = probe.dtype, probe.x0.device
    x = torch.as_tensor(x).detach().to(device=dev, dtype=dt)
    if x.shape != (probe.d,) or not torch.isfinite(x).all():
        raise ValueError(f"x must be a finite vector of length {probe.d}")
    hs = []
    for name, h in (("h1", h1), ("h2", h2)):
        h = torch.as_tensor(h).detach().reshape(-1)
        if h.numel() != probe.d:
            raise ValueError(f"{name} must have {probe.d} entries, got {h.numel()}")
        if not torch.isfinite(h).all():
            raise ValueError(f"{name} has non-finite entries")
        if h.abs().max() == 0:
            raise ValueError(f"{name} has zero norm: a grid direction must be non-zero")
        hs.append(h.to(device=dev))
    H = torch.stack(hs)
    H = H.to(device=dev, dtype=dt)
    av = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dt).to(dev)
    bv = torch.from_numpy(np.asarray(b, dtype=np.float64)).to(dt).to(dev)
    if av.ndim != 1 or bv.ndim != 1 or av.numel() < 1 or bv.numel() < 1:
        raise ValueError("a and b must be non-empty 1-D arrays of scales")
    if not (torch.isfinite(av).all() and torch.isfinite(bv).all()):
        raise ValueError("grid scales contain non-finite values")
    na, nb = av.numel(), bv.numel()
    cells = na * nb
    result_bytes = cells * (4 + 4 + 16 + (8 if linear else 0))
    if result_bytes > max_result_bytes and out_dir is None:
        raise MemoryError(f"a {na}×{nb} grid needs {result_bytes / 2**30:.2f} GiB of results (> max_result_bytes "
                          f"{max_result_bytes / 2**30:.2f} GiB): pass out_dir= to write them to disk as memmaps, "
                          "or use a smaller grid")
    audit_result = None
    if audit and probe.batch_size > 1:
        audit_result = batch_invariance_audit(probe)
        if not audit_result.position_invariant:
            raise RuntimeError(f"on {audit_result.device} a row's output depends on its position in the batch; grid "
                               "cells would not be well defined: use a probe with batch_size=1")
    rows_before = probe.rows_evaluated
    ev = _GridRows(probe, x)
    ref = ev.ref
    vocab = int(ref.shape[0])
    t1, t2 = top2(ref) if pair is None else (int(pair[0]), int(pair[1]))
    if not (0 <= t1 < vocab and 0 <= t2 < vocab) or t1 == t2:
        raise ValueError(f"bad token pair {(t1, t2)} for a vocabulary of {vocab}")
    if head_block < 1:
        raise ValueError("head_block must be >= 1")
    gap_center = float(ref[t1] - ref[t2])
    ev.prepare(t1, t2, fast, int(head_block))
    g = None
    if linear:
        g = gap_gradient(probe, x, t1, t2).double()

    def alloc(name: str, dtype: Any) -> np.ndarray:
        if out_dir is None:
            return np.empty((na, nb), dtype=dtype)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(Path(out_dir) / f"{name}.npy", mode="w+", dtype=dtype, shape=(na, nb))

    G = alloc("G", np.float64 if dt == torch.float64 else np.float32)
    top = alloc("top", np.int32)
    hashes = alloc("hash", np.dtype([("h0", np.int64), ("h1", np.int64)]))
    G_lin = alloc("G_lin", np.float64) if linear else None
    Gf, topf, hf = G.reshape(-1), top.reshape(-1), hashes.reshape(-1)
    Glf = G_lin.reshape(-1) if G_lin is not None else None
    salt = _salt(probe.d, dev)
    chunk = _chunk_rows(probe, vocab, memory_bytes)
    starts = range(0, cells, chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="grid", unit="chunk")
    n_chunks = 0
    for s in starts:
        r = torch.arange(s, min(s + chunk, cells), device=dev)
        X = grid_inputs(x, H[0], H[1], av[r // nb], bv[r % nb], mode)
        gaps, tops = [], []
        for Xb, k in probe.pad(X):  # fixed-shape batches of probe.batch_size rows, the last padded with x0
            gb, tb = ev.rows(Xb, t1, t2)
            gaps.append(gb[:k])
            tops.append(tb[:k])
        Gf[s:s + r.numel()] = torch.cat(gaps).to(torch.float64 if dt == torch.float64 else torch.float32).cpu().numpy()
        topf[s:s + r.numel()] = torch.cat(tops).to(torch.int32).cpu().numpy()
        hh = _row_hash(X, salt).cpu().numpy()
        hf["h0"][s:s + r.numel()] = hh[:, 0]
        hf["h1"][s:s + r.numel()] = hh[:, 1]
        if Glf is not None:
            Glf[s:s + r.numel()] = (gap_center + (X.double() - x.double()) @ g).cpu().numpy()
        n_chunks += 1
    # Distinct inputs: labels in order of first appearance (row-major).
    _, first, inverse = np.unique(np.asarray(hf), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    state = alloc("state", np.int64)
    state.reshape(-1)[:] = order[inverse.reshape(-1)]
    if out_dir is not None:
        del hashes
        (Path(out_dir) / "hash.npy").unlink(missing_ok=True)
    return GapGrid(a=to_numpy(av), b=to_numpy(bv), G=G, top=top, state=state, n_states=int(first.size),
                   x=to_numpy(x), h1=to_numpy(H[0]), h2=to_numpy(H[1]), pair=(t1, t2), mode=mode,
                   batch_size=probe.batch_size, rows=probe.rows_evaluated - rows_before, chunks=n_chunks,
                   chunk_rows=chunk, seconds=time.perf_counter() - t_start, G_lin=G_lin, gap_center=gap_center,
                   audit=audit_result.as_dict() if audit_result else None, path=ev.describe())


def crop(grid: GapGrid, a_range: tuple[float, float], b_range: tuple[float, float]) -> GapGrid:
    """The seed's zoom of a stored grid (exp7 part 2): the cells between the nearest indices of the range ends."""
    def span(v: np.ndarray, lo: float, hi: float) -> slice:
        i0, i1 = int(np.argmin(np.abs(v - lo))), int(np.argmin(np.abs(v - hi)))
        if i1 < i0:
            i0, i1 = i1, i0
        return slice(i0, i1 + 1)

    sa, sb = span(grid.a, *a_range), span(grid.b, *b_range)
    sub = grid.state[sa, sb]
    _, first, inv = np.unique(sub.ravel(), return_index=True, return_inverse=True)
    state = np.argsort(np.argsort(first))[inv].reshape(sub.shape)
    return GapGrid(a=grid.a[sa], b=grid.b[sb], G=np.asarray(grid.G[sa, sb]), top=np.asarray(grid.top[sa, sb]),
                   state=state, n_states=int(first.size), x=grid.x, h1=grid.h1, h2=grid.h2, pair=grid.pair,
                   mode=grid.mode, batch_size=grid.batch_size, rows=0, chunks=0, chunk_rows=0, seconds=0.0,
                   G_lin=None if grid.G_lin is None else np.asarray(grid.G_lin[sa, sb]), gap_center=grid.gap_center,
                   audit=grid.audit)


# ---------------------------------------------------------------------------------------------
# Grid statistics (the seed's exp7 part 3), vectorised


def four_neighbour_weights(shape: tuple[int, int]):
    """Sparse binary 4-neighbour weights W (n×n, n = rows·cols, row-major cells), symmetric, as scipy CSR."""
    from scipy import sparse

    rows, cols = shape
    idx = np.arange(rows * cols).reshape(rows, cols)
    i = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    j = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    data = np.ones(2 * i.size)
    n = rows * cols
    return sparse.csr_matrix((data, (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n))


def morans_i(values: np.ndarray) -> float:
    """Moran's I with binary 4-neighbour weights: (n / ΣW) · zᵀWz / zᵀz, z = values − mean; NaN for a constant map."""
    v = np.asarray(values, dtype=np.float64)
    z = v.ravel() - v.mean()
    denom = float(z @ z)
    if denom == 0:
        return float("nan")
    W = four_neighbour_weights(v.shape)
    return float(z.size / W.sum() * (z @ (W @ z)) / denom)


def local_entropy(binary: np.ndarray, window: int = 5) -> np.ndarray:
    """Binary entropy (bits) of the fraction of ones in every full ``window``×``window`` window ("valid" size)."""
    from numpy.lib.stride_tricks import sliding_window_view

    B = np.asarray(binary, dtype=np.float64)
    if min(B.shape) < window:
        return np.zeros((0, 0))
    p = sliding_window_view(B, (window, window)).mean(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.where((p > 0) & (p < 1), h, 0.0)


def regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask (scipy.ndimage.label): (labels, count)."""
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(mask, dtype=bool))
    return lab, int(n)


def sign_crossings(G: np.ndarray) -> tuple[int, int]:
    """Adjacent pairs whose np.sign differs, along rows (axis 1) and along columns (axis 0)."""
    s = np.sign(np.asarray(G, dtype=np.float64))
    return int((np.diff(s, axis=1) != 0).sum()), int((np.diff(s, axis=0) != 0).sum())


def grid_statistics(G: np.ndarray, window: int = 5) -> dict[str, Any]:
    """The seed's exp7 part 3 statistics of a gap grid, on B = (G ≥ 0) unless noted.

    flip_ratio: fraction of adjacent (4-neighbour) pairs with different B; regions: 4-connected components of
    each class; morans_i: Moran's I of B (sparse 4-neighbour weights); mean_local_entropy over full
    ``window``² windows and its ratio to 1 bit; gradient magnitude of G itself (np.gradient, per cell);
    zero crossings of np.sign(G) along rows and columns and their density per line (rows + cols);
    chi-square of the class counts against 50/50 (balance only); the seed's randomness score =
    the number of :data:`RANDOMNESS_THRESHOLDS` that hold.
    """
    from scipy import stats

    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or min(G.shape) < 2:
        raise ValueError("grid statistics need a 2-D grid of at least 2×2")
    B = (G >= 0).astype(np.int8)
    v_diff = int(np.abs(np.diff(B, axis=0)).sum())  # between rows (the seed's "horizontal")
    h_diff = int(np.abs(np.diff(B, axis=1)).sum())
    pairs = (G.shape[0] - 1) * G.shape[1] + G.shape[0] * (G.shape[1] - 1)
    lab1, n1 = regions(B == 1)
    lab0, n0 = regions(B == 0)
    size1 = np.bincount(lab1.ravel())[1:] if n1 else np.array([0])
    size0 = np.bincount(lab0.ravel())[1:] if n0 else np.array([0])
    ent = local_entropy(B, window)
    mean_ent = float(ent.mean()) if ent.size else float("nan")
    g0, g1 = np.gradient(G, axis=0), np.gradient(G, axis=1)
    gm = np.sqrt(g0 ** 2 + g1 ** 2)
    row_x, col_x = sign_crossings(G)
    n_pos, n_neg = int(B.sum()), int(B.size - B.sum())
    chi2, p = stats.chisquare([n_pos, n_neg])
    out: dict[str, Any] = {
        "cells": int(B.size), "G ≥ 0 cells": n_pos, "G < 0 cells": n_neg,
        "flip_ratio": (v_diff + h_diff) / pairs, "flips_between_rows": v_diff, "flips_between_columns": h_diff,
        "regions_pos": n1, "regions_neg": n0, "regions_total": n1 + n0,
        "largest_region_pos": int(size1.max()), "largest_region_neg": int(size0.max()),
        "morans_i": morans_i(B), "mean_local_entropy": mean_ent, "entropy_ratio": mean_ent / 1.0,
        "gradient_mean": float(gm.mean()), "gradient_std": float(gm.std()), "gradient_max": float(gm.max()),
        "gradient_cv": float(gm.std() / gm.mean()) if gm.mean() > 0 else float("nan"),
        "zero_crossings": row_x + col_x, "crossing_density": (row_x + col_x) / (G.shape[0] + G.shape[1]),
        "chi2": float(chi2), "chi2_p": float(p),
    }
    checks = {
        "high flip frequency": out["flip_ratio"] > 0.3,
        "high fragmentation": out["regions_total"] > 10,
        "low spatial autocorrelation": abs(out["morans_i"]) < 0.3,
        "high local entropy": out["entropy_ratio"] > 0.7,
        "high boundary complexity": out["crossing_density"] > 5,
        "balanced classes (chi-square p > 0.05)": out["chi2_p"] > 0.05,
    }
    out["randomness_indicators"] = [k for k, v in checks.items() if v]
    out["randomness_score"] = len(out["randomness_indicators"])
    return out


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a boolean mask by ``pixels`` steps of its 3×3 neighbourhood (scipy.ndimage.binary_dilation)."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if pixels < 0:
        raise ValueError("pixels must be >= 0")
    if pixels == 0 or not m.any():
        return m.copy()
    return ndimage.binary_dilation(m, structure=np.ones((3, 3), dtype=bool), iterations=int(pixels))


def dilate_class(G: np.ndarray, pixels: int, cls: Literal["minority", "negative", "positive"] = "minority"
                 ) -> tuple[np.ndarray, str]:
    """The sign map B = (G ≥ 0) with one class dilated by ``pixels`` (exp7 part 4; the seed grew G < 0).

    Returns (B' as uint8, the class that was grown: "G < 0" or "G ≥ 0"). "minority" grows the rarer class
    (G < 0 on a tie).
    """
    B = np.asarray(G) >= 0
    if cls == "minority":
        cls = "positive" if B.sum() < B.size - B.sum() else "negative"
    if cls == "negative":
        return (~dilate(~B, pixels)).astype(np.uint8), "G < 0"
    if cls == "positive":
        return dilate(B, pixels).astype(np.uint8), "G ≥ 0"
    raise ValueError(f"cls must be 'minority', 'negative' or 'positive', got {cls!r}")


# ---------------------------------------------------------------------------------------------
# The input lattice in the grid plane


def lattice_summary(grid: GapGrid) -> dict[str, Any]:
    """How much of the sign map is the float input lattice.

    Adjacent cells with the same input must have the same G (same input, same fixed-shape output); every sign
    change therefore sits on an input change. Reports the distinct inputs, the adjacent pairs whose input
    changes, the share of those that change the sign, and (with ``G_lin``) how often the linear prediction from
    the realised inputs has the sign of the model's G.
    """
    S = np.asarray(grid.state)
    B = np.asarray(grid.G) >= 0
    same_in = np.concatenate([(S[1:, :] == S[:-1, :]).ravel(), (S[:, 1:] == S[:, :-1]).ravel()])
    flip = np.concatenate([(B[1:, :] != B[:-1, :]).ravel(), (B[:, 1:] != B[:, :-1]).ravel()])
    Gs = np.asarray(grid.G)
    same_G = np.concatenate([(Gs[1:, :] == Gs[:-1, :]).ravel(), (Gs[:, 1:] == Gs[:, :-1]).ravel()])
    out = {
        "cells": int(S.size), "distinct inputs": int(grid.n_states), "cells per input": S.size / grid.n_states,
        "adjacent pairs": int(same_in.size), "pairs with an input change": int((~same_in).sum()),
        "sign flips": int(flip.sum()), "sign flips with the same input": int((flip & same_in).sum()),
        "G differs with the same input": int((~same_G & same_in).sum()),
        "input changes that flip the sign": float(flip[~same_in].mean()) if (~same_in).any() else float("nan"),
        "distinct G values": int(np.unique(Gs).size),
    }
    if grid.G_lin is not None:
        out["linear prediction has the sign of G"] = float(((np.asarray(grid.G_lin) >= 0) == B).mean())
    return out


def input_edges(state: np.ndarray) -> np.ndarray:
    """Cells whose input differs from the next cell along either axis (1.0, else NaN): an overlay of the lattice."""
    S = np.asarray(state)
    e = np.zeros(S.shape, dtype=bool)
    e[:-1, :] |= S[1:, :] != S[:-1, :]
    e[:, :-1] |= S[:, 1:] != S[:, :-1]
    return np.where(e, 1.0, np.nan)


@dataclass
class TieSetup:
    """A tie point with its top-2 pair and the singular directions at it, ready for grids and scans."""

    probe: Probe  # target "logits", in the requested batch shape
    x: torch.Tensor  # x* [d]
    t1: int
    t2: int
    D: torch.Tensor  # [k, d] float32 right singular vectors of ∂(final hidden)/∂x at x*
    S: np.ndarray  # [k] singular values
    gap: float  # the gap where the tie was found
    upstream: list  # [LoadedRun] of exp06, or [] when found here
    source: str  # one line saying where it came from


def load_tie(handle: Any, exp06_run: str, batch_size: int, text: str = "", position: int = -1) -> TieSetup:
    """The tie point of an exp06 run (a folder or "latest"), checked against ``handle``; or, with
    ``exp06_run=""``, found here for ``text``/``position`` (with the spectrum at x*).

    Checks: the run's model weights and dtype, that its x0 is this prompt's x0 bit for bit, and that
    its spectrum was taken at its tie point. Raises with a one-line message otherwise.
    """
    from . import jacobian, results

    if not exp06_run:
        probe = Probe(handle, text, position=position, target="logits", batch_size=batch_size)
        found = tie_point(probe)
        sp = jacobian.spectrum(Probe(handle, text, position=position, target="final_hidden", batch_size=batch_size),
                               found.x)
        return TieSetup(probe, found.x, found.t1, found.t2, sp.directions, sp.S, found.gap, [],
                        f"tie point found here: {found.message}")
    up = results.load_run(exp06_run, "exp06", model=handle)
    p6 = up.parameters
    dtype = str(handle.dtype).removeprefix("torch.")
    if p6["dtype"] != dtype:
        raise ValueError(f"{up.path} was computed in {p6['dtype']}; pass -p dtype {p6['dtype']}")
    probe = Probe(handle, p6["text"], position=p6["position"], target="logits", batch_size=batch_size)
    tie, spec = up.arrays("tie"), up.arrays("spectrum")
    if not np.array_equal(tie["x0"].view(np.int32), probe.x0.cpu().numpy().view(np.int32)):
        raise ValueError(f"x0 differs from the one exp06 used ({up.path}): same model, prompt and position needed")
    if not np.array_equal(spec["x"].view(np.int32), tie["x"].view(np.int32)):
        raise ValueError(f"{up.path}: the spectrum was not taken at the saved tie point")
    t1, t2 = (int(v) for v in tie["pair"])
    return TieSetup(probe, torch.from_numpy(tie["x"]), t1, t2, torch.from_numpy(spec["D"]), spec["S"],
                    float(tie["gap"]), [up],
                    f"reading exp06: {up.path} (batch size {p6['batch_size']}, method {p6['method']})")
