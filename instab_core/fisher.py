"""Fisher information of the next-token distribution with respect to a residual-stream vector (seed 002).

For a sentence containing a word (default " animals"), the **site** is the token just before the word;
``h`` is the output of decoder layer ℓ at that position. The downstream map ``g: h ↦ logits`` runs the
*real* remaining network — layers ℓ+1.., the final norm and the unembedding — by a forward hook on
layer ℓ that replaces its output at the site with ``h`` (the model keeps its own rotary and mask handling).
The sequence is cut after the site: the model is causal, so the logits there depend on no later token.

* :func:`fisher_matvec` — F·v = Jᵀ(diag p − p pᵀ)J·v with J = ∂logits/∂h, over the **full** vocabulary,
  matrix-free: one jvp and one vjp per product (p and the middle product in float64).
* :func:`top_eigenpairs` — the top-k eigenpairs of F by Lanczos (``scipy.sparse.linalg.eigsh`` on a
  float64 ``LinearOperator``); a solve that fails or whose residuals are too large **raises**
  :class:`FisherError` — never a random direction in its place.
* :func:`seed_fisher` — the seed's approximation: logits = W_U·h (no remaining layers, no final norm),
  the full-vocabulary log-softmax, gradients of the top-``subset`` log-probabilities by autograd,
  F ≈ Σ_c p_c ∇log p_c ∇log p_cᵀ over that subset, dense ``torch.linalg.eigh``.
* :func:`sweep` — next-token top-k and KL(p(h) ‖ p(h + α·v)) for a list of steps α, injected by the hook.
* :func:`study` — the whole seed-002 experiment over sentences × layers, as tables.

Shapes: h, v [d]; logits [V]; the model's dtype for forward work, float64 for p, eigenpairs and KL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.func import jacrev, jvp, vjp

from .models import ModelHandle, parse_layers
from .probe import run_until

SEED_LAYERS_32 = (0, 5, 10, 15, 20, 25, 30, 31)  # the seed's layers of a 32-layer model
SEED_SCALES = (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 5.0, -5.0, 10.0, -10.0)  # × λ, the seed's α
KL_LEVELS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # target KL of the calibrated steps s = ±sqrt(2κ/λ)


class FisherError(RuntimeError):
    """An eigensolve that failed or did not meet its residual check; nothing is substituted."""


# ---------------------------------------------------------------------------------------------
# Sites and layers


@dataclass(frozen=True)
class Site:
    """The token before ``word`` in ``text``: ``ids`` [L] (full sentence), ``position`` of that token,
    ``word_token`` (the word's first token, the seed's "next token"), ``argmax`` (the model's prediction
    at the position) and ``keep`` (argmax == word_token, the seed's filter)."""

    text: str
    ids: torch.Tensor
    position: int
    word_token: int
    argmax: int
    keep: bool


def word_tokens(handle: ModelHandle, word: str) -> list[int]:
    ids = handle.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the word {word!r} encodes to no tokens; pass a non-empty word")
    return [int(i) for i in ids]


def find_site(handle: ModelHandle, text: str, word: str = " animals") -> Site:
    """The site of the first occurrence of ``word``'s tokens in ``text`` (ValueError if absent)."""
    if word not in text:
        raise ValueError(f"sentence {text!r} does not contain {word!r}; pass sentences that contain the word")
    ids = handle.encode(text)
    w = word_tokens(handle, word)
    seq = ids.tolist()
    start = next((i for i in range(1, len(seq) - len(w) + 1) if seq[i:i + len(w)] == w), None)
    if start is None:
        raise ValueError(f"{word!r} is in {text!r} but its tokens {w} are not (the tokenizer merges it with its "
                         "neighbours); pass a word with its leading space, as it appears in the sentence")
    position = start - 1
    with torch.no_grad():
        logits = handle.logits(run_until(handle, handle.embedding(ids[:position + 1])[None], handle.final_norm)[0, position])
    argmax = int(logits.argmax())
    return Site(text=text, ids=ids, position=position, word_token=w[0], argmax=argmax, keep=argmax == w[0])


def spread_layers(n_layers: int, reference: Sequence[int] = SEED_LAYERS_32, reference_depth: int = 32) -> list[int]:
    """The seed's layers of a ``reference_depth``-layer model scaled to ``n_layers`` (same fractions of
    depth, rounded, de-duplicated): 0, 5, …, 30, 31 of 32 → 0, 1, 2, 3 of 4."""
    if n_layers < 1:
        raise ValueError("n_layers must be >= 1")
    out = sorted({round(l / (reference_depth - 1) * (n_layers - 1)) for l in reference})
    return [int(l) for l in out]


def _check_layer(handle: ModelHandle, layer: int) -> None:
    if not 0 <= layer < handle.n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {handle.n_layers} layers (0..{handle.n_layers - 1})")


# ---------------------------------------------------------------------------------------------
# The real downstream network


def residual(handle: ModelHandle, ids: torch.Tensor, layer: int, position: int) -> torch.Tensor:
    """h [d]: the output of decoder ``layer`` at ``position`` (ids cut after the position; causal)."""
    _check_layer(handle, layer)
    ids = ids[:position + 1]
    with torch.no_grad():
        emb = handle.embedding(ids)[None]
        return run_until(handle, emb, handle.layers[layer])[0, position].detach().clone()


class _Replace:
    """Forward hook on a decoder layer: its output at ``position`` becomes ``H`` [n, d] (row-wise)."""

    def __init__(self, position: int, H: torch.Tensor) -> None:
        self.position, self.H = position, H

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        p = self.position
        H = self.H.to(out.dtype)[:, None, :].expand(out.shape[0], 1, out.shape[2])
        new = torch.cat([out[:, :p], H, out[:, p + 1:]], dim=1)
        return (new, *output[1:]) if isinstance(output, tuple) else new


def run_with_replacement(handle: ModelHandle, ids: torch.Tensor, layer: int, position: int, H: torch.Tensor,
                         capture: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward of ``ids`` (n = H.shape[0] copies) with layer ``layer``'s output at ``position`` replaced by
    H [n, d]. Returns logits [n, L, V] and, with ``capture``, every decoder layer's output [n, L, d]."""
    _check_layer(handle, layer)
    if not 0 <= position < ids.shape[0]:
        raise ValueError(f"position {position} out of range for {ids.shape[0]} tokens")
    emb = handle.embedding(ids)[None].expand(H.shape[0], -1, -1)
    hooks = [handle.layers[layer].register_forward_hook(_Replace(position, H))]
    outs: list[torch.Tensor] = []
    if capture:  # registered after the replacement, so layer ``layer``'s capture sees the replaced output
        for lyr in handle.layers:
            hooks.append(lyr.register_forward_hook(
                lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())))
    try:
        hidden = run_until(handle, emb, handle.final_norm)
        logits = handle.logits(hidden)
    finally:
        for hk in hooks:
            hk.remove()
    return logits, outs


def downstream(handle: ModelHandle, ids: torch.Tensor, layer: int, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """g(H) = logits [n, V] at ``position`` for residuals H [n, d] at ``layer`` (the remaining layers, the
    final norm and the unembedding of the real model); ids are cut after the position (causal)."""
    _check_layer(handle, layer)
    ids = ids[:position + 1]

    def g(H: torch.Tensor) -> torch.Tensor:
        return run_with_replacement(handle, ids, layer, position, H)[0][:, position]

    return g


# ---------------------------------------------------------------------------------------------
# Matrix-free Fisher


def fisher_matvec(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ F·v = Jᵀ(diag p − p pᵀ)J·v at x [d] for logits = fn(x) [V], p = softmax(logits) over the full
    vocabulary. One jvp and one vjp per product (the vjp's graph is built once); returns float64 [d]."""
    logits, vjp_fn = vjp(fn, x)
    p = torch.softmax(logits.detach().double(), dim=-1)

    def mv(v: torch.Tensor) -> torch.Tensor:
        _, u = jvp(fn, (x,), (v.to(device=x.device, dtype=x.dtype),))
        u = u.double()
        w = p * u - p * (p @ u)
        return vjp_fn(w.to(logits.dtype))[0].detach().double()

    return mv


@dataclass
class Eigen:
    """Top eigenpairs: ``values`` [k] descending (float64), ``vectors`` [d, k] (unit, float64), ``residuals``
    [k] = ‖F·v − λ·v‖ / λ_1, ``matvecs`` = products used."""

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    matvecs: int


def _fix_sign(V: np.ndarray) -> np.ndarray:
    """Eigenvectors are defined up to sign: make each one's largest-|.| entry positive."""
    idx = np.abs(V).argmax(axis=0)
    return V * np.sign(V[idx, np.arange(V.shape[1])])


def top_eigenpairs(mv: Callable[[torch.Tensor], torch.Tensor], d: int, k: int = 1, tol: float = 1e-10,
                   max_residual: float = 1e-4, seed: int = 0, device: torch.device | str = "cpu") -> Eigen:
    """Top-k eigenpairs of the symmetric operator ``mv`` on R^d by Lanczos (eigsh, float64).

    Raises :class:`FisherError` when ARPACK does not converge or a residual exceeds ``max_residual``·λ_1
    (the products are in the model's dtype, so float32 models need a looser check than 1e-10).
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    if not 1 <= k < d:
        raise ValueError(f"k must be in 1..{d - 1} for Lanczos on a {d}-dimensional space, got {k}")
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return mv(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).ravel()).to(device)).cpu().numpy()

    op = LinearOperator((d, d), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(d)
    try:
        vals, vecs = eigsh(op, k=k, which="LA", tol=tol, v0=v0)
    except (ArpackNoConvergence, ArpackError) as exc:
        raise FisherError(f"Lanczos (eigsh, k={k}) failed: {exc}; raise tol or k's ncv, or check the model") from exc
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], _fix_sign(vecs[:, order])
    if not np.all(np.isfinite(vals)) or vals[0] <= 0:
        raise FisherError(f"Lanczos returned a non-positive top eigenvalue {vals[0]!r}: the Fisher is PSD, so the "
                          "products are broken (non-finite logits?)")
    res = np.array([np.linalg.norm(matvec(vecs[:, i]) - vals[i] * vecs[:, i]) for i in range(k)]) / vals[0]
    if res.max() > max_residual:
        raise FisherError(f"Lanczos eigenpairs fail the residual check: max ‖Fv − λv‖/λ_1 = {res.max():.2e} > "
                          f"{max_residual:.0e}")
    return Eigen(values=vals, vectors=vecs, residuals=res, matvecs=count[0])


def dense_fisher(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The explicit float64 matrix Jᵀ(diag p − p pᵀ)J [d, d] from the dense Jacobian (for tests and small d)."""
    J = jacrev(fn)(x).detach().double()  # [V, d]
    p = torch.softmax(fn(x).detach().double(), dim=-1)
    M = torch.diag(p) - torch.outer(p, p)
    return J.T @ M @ J


def exact_fisher(handle: ModelHandle, ids: torch.Tensor, layer: int, position: int, k: int = 1,
                 h: torch.Tensor | None = None, **eig_kwargs: Any) -> tuple[torch.Tensor, Eigen]:
    """(h, top-k eigenpairs) of the exact Fisher at layer ``layer``'s residual at ``position``."""
    if h is None:
        h = residual(handle, ids, layer, position)
    g = downstream(handle, ids, layer, position)
    mv = fisher_matvec(lambda x: g(x[None])[0], h)
    return h, top_eigenpairs(mv, h.shape[0], k=k, device=h.device, **eig_kwargs)


def seed_fisher(handle: ModelHandle, h: torch.Tensor, subset: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The seed's approximate Fisher at h [d]: logits = W_U·h only (no remaining layers, no final norm),
    log p over the full vocabulary, ∇log p_c by autograd for the top-``subset`` tokens c,
    F ≈ Σ_c p_c ∇log p_c ∇log p_cᵀ, dense eigh. Returns (eigenvalues [d] descending, vectors [d, d])."""
    V = handle.unembed.weight.shape[0]
    if not 1 <= subset <= V:
        raise ValueError(f"subset must be in 1..{V}, got {subset}")
    h = h.detach()
    with torch.no_grad():
        p = torch.softmax(handle.unembed(h).double(), dim=-1)
    top = p.topk(subset).indices
    G = jacrev(lambda x: torch.log_softmax(handle.unembed(x), dim=-1)[top])(h).double()  # [subset, d]
    F = G.T @ (p[top, None] * G)
    vals, vecs = torch.linalg.eigh(F)
    vals, vecs = vals.flip(0).cpu().numpy(), vecs.flip(1).cpu().numpy()
    return vals, _fix_sign(vecs)


# ---------------------------------------------------------------------------------------------
# Perturbation sweeps


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) along the last axis, float64 (0·log 0 = 0)."""
    p, q = p.double(), q.double()
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def sweep(handle: ModelHandle, site: Site, layer: int, h: torch.Tensor, v: torch.Tensor | np.ndarray,
          steps: Sequence[float], top: int = 5) -> pd.DataFrame:
    """Next-token predictions for h' = h + step·v (one batched forward with the hook), per step:
    ``kl`` = KL(p(h) ‖ p(h')), the top-``top`` token ids / texts / probabilities, and whether the argmax changed."""
    v = torch.as_tensor(v).to(device=h.device, dtype=h.dtype)
    s = torch.as_tensor(list(steps), dtype=torch.float64, device=h.device)
    H = torch.cat([h[None], h[None] + s[:, None].to(h.dtype) * v[None]])  # row 0: unperturbed
    with torch.no_grad():
        P = torch.softmax(downstream(handle, site.ids, layer, site.position)(H).double(), dim=-1)
    kls = kl(P[:1], P[1:]).cpu().numpy()
    pv, pi = P[1:].topk(top, dim=-1)
    a0 = int(P[0].argmax())
    tok = handle.tokenizer
    rows = []
    for j, step in enumerate(steps):
        ids = pi[j].tolist()
        rows.append({"step": float(step), "kl": float(kls[j]), "argmax_changed": ids[0] != a0,
                     "top_ids": ids, "top_tokens": [tok.decode([i]) for i in ids],
                     "top_probs": [float(x) for x in pv[j]]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The seed-002 experiment


@dataclass
class FisherStudy:
    """Tables of :func:`study`. ``sites``: one row per sentence; ``eigen``: (site, layer, rank, λ);
    ``comparison``: exact vs seed eigenvector per (site, layer); ``sweeps``: one row per (site, layer, kind, step);
    ``vectors[layer]`` [n_kept, d] the exact top eigenvectors (float64), ``seed_vectors`` likewise."""

    sites: pd.DataFrame
    eigen: pd.DataFrame
    comparison: pd.DataFrame
    sweeps: pd.DataFrame
    layers: list[int]
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    seed_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    site_rule: str = ""  # which sentences were kept and why (the seed's filter or the argmax fallback)

    def similarity(self, layer: int, which: str = "exact") -> np.ndarray:
        """|cos| between the top eigenvectors of every pair of kept sentences at ``layer`` [n, n]
        (absolute: an eigenvector's sign is arbitrary)."""
        V = (self.vectors if which == "exact" else self.seed_vectors)[layer]
        return np.abs(V @ V.T)


def study(handle: ModelHandle, sentences: Sequence[str], word: str = " animals", layers: Sequence[int] | None = None,
          k: int = 4, subset: int = 200, scales: Sequence[float] = SEED_SCALES,
          kl_levels: Sequence[float] = KL_LEVELS, top: int = 5, max_residual: float = 1e-4,
          filter_argmax: bool = True, progress: bool = True, argmax_fallback: bool = True) -> FisherStudy:
    """For every sentence (kept when the model's argmax at the site is the word's token, as the seed) and layer:
    exact top-k Fisher eigenpairs, the seed's approximation and the angle between the top eigenvectors, and
    sweeps along the exact top eigenvector: ``seed`` steps α·λ_1 for α in ``scales`` and ``kl`` steps
    ±sqrt(2κ/λ_1) (second-order KL = κ) for κ in ``kl_levels``. ``filter_argmax=False`` keeps every sentence.
    When the seed's filter keeps none and ``argmax_fallback`` is on, the sentences kept are those whose argmax at
    the site is the model's most frequent prediction there (a word the model does predict); ``site_rule`` says
    which rule applied. ``layers``: indices or a spec for :func:`instab_core.models.parse_layers`
    (``"0,1/3,2/3,last"``); default: the seed's layers scaled to the model's depth."""
    layers = spread_layers(handle.n_layers) if layers is None else parse_layers(layers, handle.n_layers)
    for l in layers:
        _check_layer(handle, l)
    sites = [find_site(handle, s, word) for s in sentences]
    site_table = pd.DataFrame([{"site": i, "text": s.text, "position": s.position,
                                "token_before": handle.tokenizer.decode([int(s.ids[s.position])]),
                                "argmax": handle.tokenizer.decode([s.argmax]), "keep": s.keep}
                               for i, s in enumerate(sites)])
    kept = [(i, s) for i, s in enumerate(sites) if s.keep or not filter_argmax]
    rule = (f"the seed's filter: the model's argmax at the site is {word!r} ({len(kept)} of {len(sites)} kept)"
            if filter_argmax else f"every sentence ({len(sites)}), no argmax filter")
    if not kept and argmax_fallback and sites:
        top_id = Counter(s.argmax for s in sites).most_common(1)[0][0]
        kept = [(i, s) for i, s in enumerate(sites) if s.argmax == top_id]
        rule = (f"the seed's filter ({word!r} as the argmax) kept none; kept the {len(kept)} of {len(sites)} "
                f"sentences whose argmax at the site is the model's most frequent prediction there, "
                f"{handle.tokenizer.decode([top_id])!r}")
    if not kept:
        raise ValueError(f"no sentence has {word!r} as the model's argmax at the site; the seed's filter keeps none")
    site_table["used"] = [any(i == j for j, _ in kept) for i in range(len(sites))]
    jobs = [(i, s, l) for l in layers for i, s in kept]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="Fisher eigenpairs", unit="site·layer")
    eig_rows, cmp_rows, sweep_tables = [], [], []
    vecs: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    svecs: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    rng = np.random.default_rng(0)
    for i, s, l in jobs:
        h, eg = exact_fisher(handle, s.ids, l, s.position, k=k, max_residual=max_residual)
        sv, sV = seed_fisher(handle, h, subset)
        v1, u1 = eg.vectors[:, 0], sV[:, 0]
        cos = abs(float(v1 @ u1))
        r = rng.standard_normal(h.shape[0])
        eig_rows += [{"site": i, "layer": l, "rank": r_ + 1, "eigenvalue": float(eg.values[r_]),
                      "residual": float(eg.residuals[r_])} for r_ in range(k)]
        cmp_rows.append({"site": i, "layer": l, "lambda_exact": float(eg.values[0]), "lambda_seed": float(sv[0]),
                         "abs_cos": cos, "angle_deg": float(np.degrees(np.arccos(min(cos, 1.0)))),
                         "random_abs_cos": abs(float(v1 @ r)) / float(np.linalg.norm(r)),
                         "h_norm": float(h.double().norm()), "matvecs": eg.matvecs})
        vecs[l].append(v1)
        svecs[l].append(u1)
        lam = float(eg.values[0])
        v = torch.from_numpy(v1)
        seed_steps = [a * lam for a in scales]
        kl_steps = [sg * float(np.sqrt(2 * kap / lam)) for kap in kl_levels for sg in (1.0, -1.0)]
        for kind, st, label in (("seed", seed_steps, list(scales)),
                                ("kl", kl_steps, [sg * kap for kap in kl_levels for sg in (1.0, -1.0)])):
            t = sweep(handle, s, l, h, v, st, top=top)
            t.insert(0, "label", label)
            t.insert(0, "kind", kind)
            t.insert(0, "layer", l)
            t.insert(0, "site", i)
            sweep_tables.append(t)
    return FisherStudy(sites=site_table, eigen=pd.DataFrame(eig_rows), comparison=pd.DataFrame(cmp_rows),
                       sweeps=pd.concat(sweep_tables, ignore_index=True), layers=list(layers),
                       vectors={l: np.stack(v) for l, v in vecs.items()},
                       seed_vectors={l: np.stack(v) for l, v in svecs.items()}, site_rule=rule)
