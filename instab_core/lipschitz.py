"""Finite-difference Lipschitz estimates along chosen directions, with noise averaging and precision control.

For a probe f (target ``final_hidden`` or ``logits``), a unit direction v and a step ε:

* plain:  L(ε, v) = ‖f(fl(x0 + εv)) − f(x0)‖ / ε;
* ``noise="vector"`` (the seed's exp2 v1): r_j ~ U(−1, 1)^d · ε · ``vector_scale`` (default 1e-2),
  L = ‖mean_j f(fl(x0 + εv + r_j)) − mean_j f(fl(x0 + r_j))‖ / ε;
* ``noise="scalar"`` (the seed's exp2 v2): r_j ~ U(−1, 1) · ``scalar_scale`` (default 1e-9),
  L = ‖mean_j f(fl(x0 + (ε + r_j) v)) − mean_j f(fl(x0 + r_j v))‖ / ε.

Every perturbed input is formed in float64 and rounded once to the model's dtype (fl). The realised
input change fl(x0 + εv) − x0 is reported next to the intended ε: at small ε it is 0 (the input did
not move, L = 0 by construction, ``input_moved`` False) and ``L_realised`` = ‖Δf‖/‖Δx‖ is undefined
(nan) — it is never silently replaced by the division by ε.

All steps and all noise samples of all directions go through :meth:`Probe.forward` in the probe's
fixed batch shape, so every row is comparable bitwise with ``probe.reference`` (plain variant). The
seed ran one batch-1 forward per row and recomputed f(x0) on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .models import ModelHandle, load_model
from .probe import Probe

PRECISIONS = ("bfloat16", "float32", "float64")
NOISE = ("none", "vector", "scalar")


def check_eps(eps: Iterable[float]) -> np.ndarray:
    """Validated steps ε [n] float64 (non-empty, finite, > 0)."""
    e = np.asarray(list(eps) if not isinstance(eps, (np.ndarray, torch.Tensor)) else eps, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("empty ε list: pass at least one step, e.g. eps=10.0 ** -np.arange(1, 19)")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise ValueError(f"every ε must be finite and > 0 (got {e[~(np.isfinite(e) & (e > 0))][:3].tolist()})")
    return e


def eps_powers(first: int = 1, last: int = 18) -> np.ndarray:
    """ε = 10^-first … 10^-last, float64 (the seed's 1e-1 … 1e-18)."""
    return 10.0 ** -np.arange(first, last + 1, dtype=np.float64)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    return precision


@dataclass
class Directions:
    """Unit directions D [k, d] float64 with labels, 1-based singular index and σ (nan if not a singular vector)."""

    D: np.ndarray
    labels: list[str]
    index: np.ndarray
    sigma: np.ndarray


def singular_directions(S: np.ndarray, Vt: np.ndarray, top_k: int = 5, dims: Sequence[int] = ()) -> Directions:
    """v1 … v_top_k and, for every n in ``dims``, Vt[n − 1] (1-based: dim n is the n-th singular vector).

    The seed's ``range(2)`` made dim 0 → Vt[−1]; here 0 and anything above len(S) is an error.
    """
    S, Vt = np.asarray(S, dtype=np.float64), np.asarray(Vt, dtype=np.float64)
    k = len(S)
    if not 0 <= top_k <= k:
        raise ValueError(f"top_k={top_k} out of range: the spectrum has {k} singular vectors")
    bad = [n for n in dims if not 1 <= int(n) <= k]
    if bad:
        raise ValueError(f"dims {bad} out of range: singular vector indices are 1-based, 1..{k}")
    idx = list(range(1, top_k + 1)) + [int(n) for n in dims if int(n) > top_k]
    if not idx:
        raise ValueError("no directions: pass top_k >= 1 or some dims")
    ii = np.array(idx) - 1
    return Directions(D=Vt[ii], labels=[f"v{i}" for i in idx], index=np.array(idx), sigma=S[ii])


@dataclass
class FDResult:
    """One row per (direction, ε) in ``table``; ``forward_passes``/``rows`` counted by the probe (padding included)."""

    table: pd.DataFrame
    forward_passes: int
    rows: int
    batch_size: int
    seed_style_passes: int  # batch-1 forwards the seed's loops needed for the same table


def _logits(probe: Probe, out: torch.Tensor) -> torch.Tensor:
    """Logits for rows of ``out`` [n, m], unembedded in chunks of exactly ``batch_size`` rows (padded with the
    reference) so that every row, the reference's included, goes through the same matmul shape."""
    if probe.target.kind == "logits":
        return out
    if probe.target.kind == "final_hidden":
        b, n = probe.batch_size, out.shape[0]
        res = []
        with torch.no_grad():
            for s in range(0, n, b):
                chunk = out[s:s + b]
                k = chunk.shape[0]
                if k < b:
                    chunk = torch.cat([chunk, probe.reference.expand(b - k, -1)])
                res.append(probe.handle.logits(chunk)[:k])
        return torch.cat(res)
    raise ValueError(f"finite_difference needs target final_hidden or logits (got {probe.target}): "
                     "the logits and the token flip are computed from the final hidden state")


def _block(x0: torch.Tensor, v: torch.Tensor, e: float, noise: str, n: int, gen: torch.Generator,
           vector_scale: float, scalar_scale: float) -> torch.Tensor:
    """Rows (float64, before rounding) of one (direction, ε) block: plain [1, d]; noise [2n, d] = rep1 rows, rep2 rows."""
    if noise == "none":
        return (x0 + e * v)[None]
    if noise == "vector":
        r = (torch.rand((n, x0.shape[0]), generator=gen, dtype=torch.float64) * 2 - 1) * (e * vector_scale)
        return torch.cat([x0 + e * v + r, x0 + r])
    r = ((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * scalar_scale)[:, None]
    return torch.cat([x0 + (e + r) * v, x0 + r * v])


def _check(probe: Probe, directions: np.ndarray | torch.Tensor, eps: Iterable[float], noise: str,
           n_samples: int) -> tuple[torch.Tensor, np.ndarray]:
    eps = check_eps(eps)
    if noise not in NOISE:
        raise ValueError(f"unknown noise variant {noise!r}; use one of {NOISE}")
    if noise != "none" and n_samples < 1:
        raise ValueError("n_samples must be >= 1 for a noise variant")
    D = torch.as_tensor(np.asarray(directions), dtype=torch.float64)
    if D.ndim != 2 or D.shape[1] != probe.d:
        raise ValueError(f"directions must be [k, {probe.d}] (got {tuple(D.shape)})")
    return D, eps


def iter_blocks(probe: Probe, directions: np.ndarray | torch.Tensor, eps: Iterable[float], noise: str = "none",
                n_samples: int = 100, seed: int = 0, vector_scale: float = 1e-2, scalar_scale: float = 1e-9):
    """The exact inputs the kernel evaluates, block by block: yields (k, i, X) with X in the probe's dtype.

    X is fl(rows) for direction k and step eps[i]: plain [1, d]; noise [2n, d] (n rep1 rows, then n rep2 rows).
    Noise comes from one ``torch.Generator(seed)``, drawn direction by direction, ε by ε, in that order
    (an independent loop reproduces it); each block needs O(n·d) memory, never the whole sweep.
    """
    D, eps = _check(probe, directions, eps, noise, n_samples)
    gen = torch.Generator().manual_seed(int(seed))
    x0 = probe.x0.double().cpu()
    for k, v in enumerate(D):
        for i, e in enumerate(eps):
            yield k, i, _block(x0, v, float(e), noise, n_samples, gen, vector_scale, scalar_scale).to(probe.dtype)


def _token_stats(lg: torch.Tensor, ref_lg: torch.Tensor) -> dict[str, np.ndarray]:
    """lg [E, V] against ref_lg [E, V] or [V] (float64)."""
    ref_lg = ref_lg.expand_as(lg)
    p, p0 = torch.softmax(lg, dim=-1), torch.softmax(ref_lg, dim=-1)
    t0, t = ref_lg.argmax(dim=-1), lg.argmax(dim=-1)
    g = lambda a, idx: a.gather(1, idx[:, None])[:, 0].numpy()  # noqa: E731
    return {
        "logit_diff": (lg - ref_lg).norm(dim=-1).numpy(),
        "orig_token_id": t0.numpy(), "pert_token_id": t.numpy(),
        "orig_prob": g(p0, t0), "pert_prob": g(p, t), "orig_token_prob_after": g(p, t0),
        "orig_logit": g(ref_lg, t0), "pert_logit": g(lg, t),
        "token_changed": (t != t0).numpy(),
    }


def finite_difference(probe: Probe, directions: Directions | np.ndarray | torch.Tensor, eps: Iterable[float],
                      noise: str = "none", n_samples: int = 100, seed: int = 0, vector_scale: float = 1e-2,
                      scalar_scale: float = 1e-9, max_rows: int = 4096, progress: bool = True) -> FDResult:
    """Finite-difference Lipschitz estimates for every direction and ε, batched.

    ``directions``: :class:`Directions` or unit rows [k, d]. ``eps``: steps > 0. Inputs are rounded once to
    the probe's dtype (the model's precision). The rows of all directions, steps and samples are streamed
    through :meth:`Probe.forward` in groups of ``max_rows`` (a multiple of the batch size), across block
    boundaries, so only the last pass is padded; outputs and logits are summed per (direction, ε, side) as
    they come (memory O(k·E·(m + V)) however many samples). Returns the table (columns: direction, index,
    sigma, eps, L, L_over_sigma, output_diff, input_change, input_moved, L_realised, logit_diff, token
    ids/probs/logits before and after, token_changed, regime (input_unchanged | absorbed | changed);
    noise variants: tokens from the mean logits of rep1 against those of rep2, the seed's convention).
    """
    if not isinstance(directions, Directions):
        D = np.asarray(directions, dtype=np.float64)
        if D.ndim != 2:
            raise ValueError(f"directions must be [k, d] (got shape {D.shape})")
        directions = Directions(D=D, labels=[f"dir{i}" for i in range(len(D))], index=np.zeros(len(D), int),
                                sigma=np.full(len(D), np.nan))
    Dt, eps = _check(probe, directions.D, eps, noise, n_samples)
    _logits(probe, probe.reference[None])  # raises for targets without logits before any work
    K, E = Dt.shape[0], len(eps)
    n = 1 if noise == "none" else n_samples
    sides = 1 if noise == "none" else 2
    ref = probe.reference.double().cpu()
    ref_lg = _logits(probe, probe.reference[None])[0].double().cpu()
    m, V = ref.shape[0], ref_lg.shape[0]
    sum_out = torch.zeros(K * E * sides, m, dtype=torch.float64)
    sum_lg = torch.zeros(K * E * sides, V, dtype=torch.float64)
    b = probe.batch_size
    G = max(b, max_rows // b * b)
    rows0 = probe.rows_evaluated
    pend_X: list[torch.Tensor] = []
    pend_key: list[torch.Tensor] = []  # per row: the (direction, ε, side) slot it is summed into
    pending = 0

    def flush(final: bool) -> None:
        nonlocal pend_X, pend_key, pending
        while pending >= G or (final and pending > 0):
            X, key = torch.cat(pend_X), torch.cat(pend_key)
            take = min(G, X.shape[0])
            out = probe.forward(X[:take])
            lg = _logits(probe, out)
            sum_out.index_add_(0, key[:take], out.double().cpu())
            sum_lg.index_add_(0, key[:take], lg.double().cpu())
            pend_X, pend_key, pending = [X[take:]], [key[take:]], X.shape[0] - take

    from tqdm.auto import tqdm
    blocks = iter_blocks(probe, directions.D, eps, noise, n_samples, seed, vector_scale, scalar_scale)
    for k, i, X in tqdm(blocks, total=K * E, desc=f"FD ({noise})", disable=not progress or K * E * n < 4 * G):
        side = torch.arange(X.shape[0]) // n  # 0: rep1 (or the plain step), 1: rep2
        pend_X.append(X)
        pend_key.append((k * E + i) * sides + side)
        pending += X.shape[0]
        flush(False)
    flush(True)
    rows = probe.rows_evaluated - rows0
    mean_out = (sum_out / n).reshape(K, E, sides, m)
    mean_lg = (sum_lg / n).reshape(K, E, sides, V)
    x0 = probe.x0.double().cpu()
    frames = []
    for k in range(K):
        # the un-noised realised step fl(x0 + εv) − x0, reported for every variant
        step = (x0 + torch.from_numpy(eps)[:, None] * Dt[k]).to(probe.dtype).double() - x0
        dx = step.norm(dim=1).numpy()
        if noise == "none":
            diff = (mean_out[k, :, 0] - ref).norm(dim=1).numpy()
            tok = _token_stats(mean_lg[k, :, 0], ref_lg)
        else:
            diff = (mean_out[k, :, 0] - mean_out[k, :, 1]).norm(dim=1).numpy()
            tok = _token_stats(mean_lg[k, :, 0], mean_lg[k, :, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            L_real = np.where(dx > 0, diff / np.where(dx > 0, dx, 1.0), np.nan)
        frame = pd.DataFrame({
            "direction": directions.labels[k], "index": int(directions.index[k]), "sigma": directions.sigma[k],
            "eps": eps, "eps_power": np.round(-np.log10(eps), 6), "noise": noise, "n_samples": n,
            "L": diff / eps, "output_diff": diff, "input_change": dx, "input_moved": dx > 0, "L_realised": L_real,
            **tok,
        })
        frame["L_over_sigma"] = frame["L"] / frame["sigma"]
        # why L is 0 or undefined: the rounded input did not move, or it moved and the model absorbed it
        frame["regime"] = np.where(dx == 0, "input_unchanged", np.where(diff == 0, "absorbed", "changed"))
        frames.append(frame)
    return FDResult(table=pd.concat(frames, ignore_index=True), forward_passes=rows // b, rows=rows,
                    batch_size=b, seed_style_passes=K * E * 2 * n)


def rounding_floor(table: pd.DataFrame, sigma_1: float, factor: float = 2.0) -> float:
    """Largest ε at which L leaves the band [σ1/factor, σ1·factor] going down in ε (nan if it never does).

    Below that ε, ‖Δf‖ is set by forward-pass rounding rather than by J·v, and L ∝ 1/ε.
    """
    t = table.sort_values("eps", ascending=False)
    off = (t["L"] > sigma_1 * factor) | (t["L"] < sigma_1 / factor)
    return float(t["eps"][off].iloc[0]) if off.any() else float("nan")


# --- exp03: the float32 input lattice at x0 + ε·σ1·v1 ------------------------------------------

def precision_table(x0: torch.Tensor | np.ndarray, v: torch.Tensor | np.ndarray, sigma: float,
                    eps: Iterable[float], decimals: Sequence[int] = tuple(range(15, 0, -1))
                    ) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-ε summary of the float32 input x = fl32(x0 + ε·σ·v) against x0 (float32) and per-dimension ULPs.

    Returns (table, ulps [E, d] int64). The table has: eps, step_norm (intended ‖ε σ v‖), changed (dims
    whose float32 bits changed), max_ulps, sum_ulps, realised_norm (‖x − x0‖ in float64), and one
    column ``round_<k>`` per k in ``decimals``: the count of dims whose np.round(·, k) differs (the seed's
    decimal-places count, for parity — it misses changes below 10^-k and flags those that cross a
    rounding boundary of the decimal grid, which the float32 grid does not have).
    """
    from .fp import ulp_distance
    eps = check_eps(eps)
    x0 = (x0.detach().cpu() if isinstance(x0, torch.Tensor) else torch.from_numpy(np.asarray(x0))).to(torch.float32)
    v = (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).to(torch.float64)
    X = (x0.double()[None] + torch.from_numpy(eps)[:, None] * float(sigma) * v[None]).float()
    ulps = ulp_distance(X, x0.expand_as(X)).to(torch.int64)
    a, b = X.double().numpy(), x0.double().numpy()
    rows = []
    for i, e in enumerate(eps):
        row = {"eps": e, "step_norm": float(e * abs(sigma) * v.norm()), "changed": int((ulps[i] != 0).sum()),
               "max_ulps": int(ulps[i].abs().max()), "sum_ulps": int(ulps[i].abs().sum()),
               "realised_norm": float(np.linalg.norm(a[i] - b))}
        for k in decimals:
            row[f"round_{k}"] = int((np.round(a[i], k) != np.round(b, k)).sum())
        rows.append(row)
    return pd.DataFrame(rows), ulps.numpy()


def load_precision(model: str, precision: str, device: str = "cpu") -> ModelHandle:
    """The model in ``precision`` (float64 is true float64: no hidden float32 steps)."""
    check_precision(precision)
    dev = torch.device(device) if device != "auto" else None
    if precision == "bfloat16" and dev is not None and dev.type == "mps":
        raise ValueError("bfloat16 on mps is not supported here: use device cpu or cuda")
    if precision == "float64" and dev is not None and dev.type == "mps":
        raise ValueError("mps has no float64: use device cpu or cuda for precision float64")
    return load_model(model, dtype=precision, device=device)
