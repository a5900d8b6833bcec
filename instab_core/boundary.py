"""First output change along rays from x0: the exact stability boundary.

For a unit direction d and the float32 input X(s) = fl32(x0 + s·d) (see :mod:`instab_core.fp`),
the boundary is the smallest float32 scale s ≤ s_max at which the probe's output differs from the
reference (bitwise, or by more than ``threshold``). X(s) is piecewise constant in s, with
breakpoints found without the model, so the exact method evaluates the model only at the distinct
input states, in increasing s, batched across rays, and takes the first state whose output
changed. It assumes nothing about monotonicity of "changed" in s, never walks one ULP at a time
and is bounded by ``max_states`` per ray.

Per ray it reports ``s_in`` (first input change, model-free), ``s_out`` (first output change),
``absorbed`` (input changes the model absorbed before s_out), ``s_below`` (largest unchanged s),
and the input and output L2 changes at s_out.

The seed's method (bisection then a ULP walk) is offered as ``method="bisect"``, done as bisection
on the float32 bit pattern (at most 33 evaluations per ray, batched); it assumes monotonicity
and can therefore land on a later transition than the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch

from . import fp
from .numerics import BatchAudit, batch_invariance_audit
from .probe import Probe, run_until

Method = Literal["exact", "bisect"]
Semantics = Literal["batched", "batch1"]


class Checkpoint(Protocol):
    """Where a long kernel saves finished blocks and finds them again after an interruption."""

    def load(self, key: str) -> dict[str, np.ndarray] | None: ...

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None: ...


class BatchVarianceError(RuntimeError):
    """Rows inside the fixed batch depend on their position or companions: batched bitwise results would be invalid."""


class PrefixCachedProbe(Probe):
    """A last-token probe evaluated against a KV cache of its prompt prefix (``prefix_cache=True``).

    When the perturbed token is the last one (position L−1), the prefix E[:L−1] is the same for
    every row. It is run once, at batch size 1, with the KV cache on; every forward of n rows is
    then a forward of inputs_embeds [n, 1, d] at position L−1 whose attention reads the prefix's
    keys and values (the same bits for every row, broadcast to n). ``reference`` is f(x0) computed
    the same way in the same batch shape, so bitwise comparisons stay within one semantics.

    Relation to the full-sequence semantics (:class:`Probe`, the default): the same function in
    exact arithmetic, a different float32 computation. The last token's projections run as an
    [n, d] matmul instead of [n·L, d], its attention over one [1, L] row instead of an [L, L]
    masked matrix, and the prefix at batch size 1 instead of inside every batch. Outputs agree to
    rounding, not bitwise, so boundaries (s_out) of the two semantics can differ and are reported
    side by side, never mixed. Only ``forward``/``f_batch``/``f`` are cached; ``embeds`` is the
    full sequence as in :class:`Probe`.

    Cost: 1 token-forward per row instead of L, plus the prefix once.
    """

    def __init__(self, handle: Any, text: str, position: int = -1, target: str = "final_hidden",
                 batch_size: int = 64) -> None:
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.prefix_tokens_run = 0
        super().__init__(handle, text, position, target, batch_size)

    @classmethod
    def of(cls, probe: Probe) -> "PrefixCachedProbe":
        """The prefix-cached version of ``probe`` (same prompt, position, target and batch size)."""
        return cls(probe.handle, probe.text, probe.position, str(probe.target), probe.batch_size)

    def _prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._kv is None:
            L = int(self.ids.shape[0])
            if self.position != L - 1:
                raise ValueError(f"prefix_cache needs the perturbed token to be the last one (position {L - 1}); "
                                 f"got position {self.position}")
            if L < 2:
                raise ValueError("prefix_cache needs a prompt of at least 2 tokens (the prefix is empty)")
            with torch.no_grad():
                out = self.handle.base(inputs_embeds=self.E[None, :L - 1], use_cache=True)
            cache = out.cache
            self._kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
            self.prefix_tokens_run += L - 1
        return self._kv

    def cache_for(self, n: int) -> Any:
        """A fresh DynamicCache holding the prefix's keys/values for ``n`` rows (the rows share the bits)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.handle.model.config)
        for i, (k, v) in enumerate(self._prefix()):
            cache.update(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]), i)
        return cache

    def f_batch(self, X: torch.Tensor) -> torch.Tensor:
        """f for X [n, d]: the last token alone at position L−1 against the prefix cache; returns [n, m]."""
        h, tgt = self.handle, self.target
        emb = X.to(device=self.x0.device, dtype=self.dtype)[:, None, :]
        kw = {"cache": self.cache_for(emb.shape[0]), "use_cache": True}
        if tgt.kind in ("final_hidden", "logits"):
            full = run_until(h, emb, h.final_norm, **kw)
        elif tgt.kind == "pre_norm":
            full = run_until(h, emb, h.final_norm, take="input", **kw)
        else:
            full = run_until(h, emb, h.layers[tgt.layer], **kw)
        out = full[:, 0, :]
        if tgt.kind == "logits":
            out = h.logits(out)  # the head and its post-head steps, as Probe
        return out

    def with_batch_size(self, batch_size: int) -> "PrefixCachedProbe":
        return PrefixCachedProbe(self.handle, self.text, self.position, str(self.target), batch_size)

    @property
    def tokens_per_row(self) -> int:
        return 1


def prefix_cached(probe: Probe) -> PrefixCachedProbe:
    """``probe`` under the prefix-cache semantics (returned as is if it already is one)."""
    return probe if isinstance(probe, PrefixCachedProbe) else PrefixCachedProbe.of(probe)


@dataclass
class BoundaryResult:
    """Per-ray boundary data; arrays have one entry per ray.

    ``status``: "found" (s_out ≤ s_max), "stable" (no output change up to s_max), "capped"
    (``max_states`` distinct inputs evaluated without a change: undetermined, not stable).
    """

    s_in: np.ndarray  # float32, +inf if the input never changes up to s_max
    s_out: np.ndarray  # float32, NaN unless found
    s_below: np.ndarray  # float32, largest s known unchanged below s_out (NaN unless found)
    absorbed: np.ndarray  # int64, input changes before s_out whose output equalled the reference
    emb_l2: np.ndarray  # float64, ‖X(s_out) − x0‖
    hid_l2: np.ndarray  # float64, ‖f(X(s_out)) − f(x0)‖
    states: np.ndarray  # int64, distinct input states evaluated (exact) or evaluations (bisect)
    status: np.ndarray  # str
    rows: int  # forward rows run, padding included
    params: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] | None = None

    def table(self, **columns: np.ndarray) -> pd.DataFrame:
        """One row per ray; extra ``columns`` (e.g. theta) come first."""
        data = dict(columns)
        for name in ("s_in", "s_out", "s_below", "absorbed", "emb_l2", "hid_l2", "states", "status"):
            data[name] = getattr(self, name)
        return pd.DataFrame(data)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("s_in", "s_out", "s_below", "absorbed", "emb_l2", "hid_l2",
                                              "states", "status")}

    def rays(self, idx: np.ndarray) -> "BoundaryResult":
        """The result restricted to rays ``idx`` (int array); ``rows`` is 0 there: rows are not per ray."""
        return BoundaryResult(**{k: v[idx] for k, v in self.arrays().items()}, rows=0, params=dict(self.params))

    def lattice_summary(self) -> dict[str, Any]:
        """How the output boundary sits on the input lattice, over the rays with status "found".

        ``rays_found``; ``rays_sout_eq_sin``: rays whose first input change already changes the output (nothing
        absorbed); ``median_sout_over_sin`` and ``median_absorbed`` (NaN when no ray was found).
        """
        found = self.status == "found"
        ratio = self.s_out[found].astype(np.float64) / self.s_in[found].astype(np.float64)
        return {"rays_found": int(found.sum()), "rays_sout_eq_sin": int((self.absorbed[found] == 0).sum()),
                "median_sout_over_sin": float(np.median(ratio)) if found.any() else float("nan"),
                "median_absorbed": float(np.median(self.absorbed[found])) if found.any() else float("nan")}


def _check_inputs(probe: Probe, D: torch.Tensor, s_max: float, threshold: float) -> torch.Tensor:
    if probe.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"boundary search needs a float32 or float64 model (the perturbed input is float32); got {probe.dtype}")
    if not torch.equal(probe.x0.float().to(probe.dtype), probe.x0):
        raise ValueError("x0 is not exactly representable in float32; the float32 input lattice does not apply")
    if not (np.isfinite(s_max) and s_max > 0):
        raise ValueError(f"s_max must be a positive finite number, got {s_max}")
    if np.float32(s_max) != s_max and not np.isfinite(np.float32(s_max)):
        raise ValueError(f"s_max={s_max} overflows float32")
    if threshold < 0 or not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    D = torch.as_tensor(D)
    if D.ndim == 1:
        D = D[None]
    if D.ndim != 2 or D.shape[1] != probe.d:
        raise ValueError(f"directions must have shape [rays, {probe.d}], got {tuple(D.shape)}")
    if not torch.isfinite(D).all():
        raise ValueError("directions contain non-finite entries")
    D = D.to(device=probe.x0.device, dtype=torch.float32)
    if (D.abs().amax(dim=1) == 0).any():
        bad = torch.nonzero(D.abs().amax(dim=1) == 0).flatten().tolist()
        raise ValueError(f"directions {bad[:5]} have zero norm")
    return D


def _evaluate(probe: Probe, X: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = probe.forward(X)
    return out, fp.rows_differ(out, probe.reference, threshold)


def first_output_change(
    probe: Probe,
    directions: torch.Tensor,
    s_max: float = 1e-6,
    mode: fp.Mode = "fp32",
    threshold: float = 0.0,
    method: Method = "exact",
    semantics: Semantics = "batched",
    chunk: int = 1,
    max_states: int = 4096,
    ray_block: int = 256,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
    audit: bool = True,
    prefix_cache: bool = False,
) -> BoundaryResult:
    """The first output change along each ray x0 + s·d, 0 < s ≤ s_max.

    ``directions`` [R, d] are used as float32 exactly as given (normalise them beforehand).
    ``mode``: "fp32" or "fp64" perturbation arithmetic (see :func:`fp.perturb`).
    ``threshold``: 0 for bitwise change, else max |Δ| > threshold.
    ``method``: "exact" (distinct input states in order) or "bisect" (the seed's method on bits).
    ``semantics``: "batched" (fixed batch of ``probe.batch_size``) or "batch1" (every state at batch
    size 1, reference too, as the seed ran it).
    ``chunk``: states per ray evaluated in the first round (doubling afterwards, up to max(chunk, 4));
    1 gives the fewest rows when rays change within their first few input states, as measured on
    the bundled models.
    Rays are processed in blocks of ``ray_block``; with a ``checkpoint`` each finished block is
    saved and found again on resume.
    ``prefix_cache``: evaluate the (last) token against a KV cache of the prompt prefix, the
    reference too (:class:`PrefixCachedProbe`): one token-forward per row instead of L. A different
    float32 computation from the default full-sequence semantics (see that class); off by default.
    A probe that already is a :class:`PrefixCachedProbe` is used as is.
    """
    D = _check_inputs(probe, directions, s_max, threshold)
    if prefix_cache:
        probe = prefix_cached(probe)
    cached = isinstance(probe, PrefixCachedProbe)
    if semantics == "batch1":
        probe = probe.with_batch_size(1)
    elif semantics != "batched":
        raise ValueError(f"semantics must be 'batched' or 'batch1', got {semantics!r}")
    if method not in ("exact", "bisect"):
        raise ValueError(f"method must be 'exact' or 'bisect', got {method!r}")
    if mode not in fp.MODES:
        raise ValueError(f"mode must be one of {fp.MODES}, got {mode!r}")
    audit_result: BatchAudit | None = None
    if audit and probe.batch_size > 1:
        audit_result = batch_invariance_audit(probe)
        if not audit_result.position_invariant:
            raise BatchVarianceError(
                f"on {audit_result.device} a row's output depends on its position or companions inside a batch of "
                f"{probe.batch_size} (max |Δ| {audit_result.position_max_abs_diff:.3g}); batched bitwise boundaries "
                "would be wrong: use semantics='batch1'")
    _check_reachable(probe.x0.float(), D, float(s_max), mode)
    rows_before = probe.rows_evaluated
    kernel = _exact_block if method == "exact" else _bisect_block
    params = dict(s_max=float(s_max), mode=mode, threshold=float(threshold), method=method, semantics=semantics,
                  chunk=chunk, max_states=max_states, batch_size=probe.batch_size, prefix_cache=cached,
                  tokens_per_row=1 if cached else (int(probe.ids.shape[0]) if hasattr(probe, "ids") else None))
    R = D.shape[0]
    blocks = range(0, R, ray_block)
    if progress:
        from tqdm.auto import tqdm
        blocks = tqdm(blocks, desc=f"boundary ({method})", unit="block", total=len(blocks))
    parts: list[dict[str, np.ndarray]] = []
    for start in blocks:
        key = f"boundary-{method}-{semantics}{'-prefix' if cached else ''}-{start}"
        saved = checkpoint.load(key) if checkpoint is not None else None
        if saved is None:
            part = kernel(probe, D[start:start + ray_block], float(s_max), mode, threshold, chunk, max_states)
            if checkpoint is not None:
                checkpoint.save(key, part)
        else:
            part = saved
        parts.append(part)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return BoundaryResult(**merged, rows=probe.rows_evaluated - rows_before, params=params,
                          audit=audit_result.as_dict() if audit_result else None)


def _check_reachable(x0: torch.Tensor, D: torch.Tensor, s_max: float, mode: fp.Mode) -> None:
    """Refuse an ``s_max`` below every ray's first input change: each ray would be "stable" only because
    fl32(x0 + s·d) never moves, which says nothing about the model."""
    if torch.isfinite(fp.next_breakpoints(x0, D, torch.zeros(D.shape[0], device=D.device), s_max, mode)).any():
        return
    first = fp.next_breakpoints(x0, D, torch.zeros(D.shape[0], device=D.device), float(np.finfo(np.float32).max),
                                mode).min()
    raise ValueError(f"s_max={s_max:g} is below the smallest scale at which the float32 input fl32(x0 + s·d) "
                     f"changes on any ray ({float(first):.3g}): every ray would look stable; raise s_max")


def _finish(probe: Probe, D: torch.Tensor, x0: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor,
            s_below: torch.Tensor, absorbed: torch.Tensor, states: torch.Tensor, status: np.ndarray,
            mode: fp.Mode, out_at: torch.Tensor) -> dict[str, np.ndarray]:
    """L2 changes at s_out and numpy packing. ``out_at`` [R, m] holds f(X(s_out)) for found rays."""
    found = torch.from_numpy(status == "found").to(D.device)
    X = fp.perturb(x0, torch.where(found, s_out, torch.zeros_like(s_out))[:, None], D, mode)
    emb = (X.double() - x0.double()).norm(dim=1)
    hid = (out_at.double() - probe.reference.double()).norm(dim=1)
    nan = torch.full_like(emb, float("nan"))
    return {
        "s_in": s_in.cpu().numpy(), "s_out": s_out.cpu().numpy(), "s_below": s_below.cpu().numpy(),
        "absorbed": absorbed.cpu().numpy().astype(np.int64),
        "emb_l2": torch.where(found, emb, nan).cpu().numpy(), "hid_l2": torch.where(found, hid, nan).cpu().numpy(),
        "states": states.cpu().numpy().astype(np.int64), "status": np.asarray(status, dtype="U7"),
    }


def _exact_block(probe: Probe, D: torch.Tensor, s_max: float, mode: fp.Mode, threshold: float,
                 chunk: int, max_states: int) -> dict[str, np.ndarray]:
    R, dev = D.shape[0], D.device
    x0 = probe.x0.float()
    lattice = fp.RayLattice(x0, D, s_max, mode)
    s_in = lattice.frontier.min(dim=1).values
    nan = torch.full((R,), float("nan"), device=dev)
    s_out, s_below = nan.clone(), nan.clone()
    states = torch.zeros(R, dtype=torch.int64, device=dev)
    status = np.array(["pending"] * R, dtype=object)
    out_at = probe.reference.expand(R, -1).clone()
    step = max(1, chunk)
    while True:
        active = np.flatnonzero(status == "pending")
        if active.size == 0:
            break
        idx = torch.from_numpy(active).to(dev)
        take = int(torch.clamp(max_states - states[idx], min=1).min())
        B = lattice.advance(idx, min(step, take))  # [a, k] the next distinct input states, in order
        valid = torch.isfinite(B)
        ray_of, k_of = torch.nonzero(valid, as_tuple=True)
        changed_at = torch.zeros_like(valid)
        if ray_of.numel():
            X = fp.perturb(x0, B[ray_of, k_of][:, None], D[idx][ray_of], mode)
            out, changed = _evaluate(probe, X, threshold)
            changed_at[ray_of, k_of] = changed
        k_range = torch.arange(B.shape[1], device=dev)
        first = torch.where(changed_at, k_range, B.shape[1]).min(dim=1).values
        n_valid = valid.sum(dim=1)
        for j, r in enumerate(active.tolist()):
            f = int(first[j])
            if f < B.shape[1]:
                s_out[r] = B[j, f]
                s_below[r] = fp.next_down(B[j, f])
                states[r] += f + 1
                status[r] = "found"
                out_at[r] = out[int(torch.nonzero((ray_of == j) & (k_of == f))[0])]
            else:
                states[r] += int(n_valid[j])
                if int(n_valid[j]) < B.shape[1]:
                    status[r] = "stable"  # no breakpoint left up to s_max
                elif states[r] >= max_states:
                    status[r] = "capped"
        # Grow the round while rays keep absorbing changes, but only to 4 states: a larger round
        # overshoots the first change by up to round-1 wasted rows per ray.
        step = min(2 * step, max(chunk, 4))
    absorbed = torch.where(torch.from_numpy(status == "found").to(dev), states - 1, states)
    return _finish(probe, D, x0, s_in, s_out, s_below, absorbed, states, status, mode, out_at)


def _bisect_block(probe: Probe, D: torch.Tensor, s_max: float, mode: fp.Mode, threshold: float,
                  chunk: int, max_states: int) -> dict[str, np.ndarray]:
    """The seed's search on float32 bit patterns: assumes "changed" is monotone in s."""
    R, dev = D.shape[0], D.device
    x0 = probe.x0.float()
    s_in = fp.RayLattice(x0, D, s_max, mode).frontier.min(dim=1).values
    smax_t = torch.full((R,), s_max, dtype=torch.float32, device=dev)
    _, changed_at_max = _evaluate(probe, fp.perturb(x0, smax_t[:, None], D, mode), threshold)
    lo = torch.zeros(R, dtype=torch.int64, device=dev)
    hi = fp.float32_bits(smax_t).to(dev)
    evals = torch.ones(R, dtype=torch.int64, device=dev)
    while True:
        live = changed_at_max & (hi - lo > 1)
        if not live.any():
            break
        idx = torch.nonzero(live).flatten()
        mid = lo[idx] + (hi[idx] - lo[idx]) // 2
        _, changed = _evaluate(probe, fp.perturb(x0, fp.float32_from_bits(mid)[:, None], D[idx], mode), threshold)
        hi[idx] = torch.where(changed, mid, hi[idx])
        lo[idx] = torch.where(changed, lo[idx], mid)
        evals[idx] += 1
    status = np.where(changed_at_max.cpu().numpy(), "found", "stable").astype(object)
    found = changed_at_max
    nan = torch.full((R,), float("nan"), device=dev)
    s_out = torch.where(found, fp.float32_from_bits(hi), nan)
    s_below = torch.where(found, fp.float32_from_bits(lo), nan)
    out_at = probe.forward(fp.perturb(x0, torch.where(found, s_out, torch.zeros_like(s_out))[:, None], D, mode))
    # Input changes strictly below s_out, counted model-free: bisection never looks at them.
    absorbed = torch.zeros(R, dtype=torch.int64, device=dev)
    for r in torch.nonzero(found).flatten().tolist():
        absorbed[r] = _count_breakpoints_below(x0, D[r:r + 1], float(s_out[r]), mode)
    return _finish(probe, D, x0, s_in, s_out, s_below, absorbed, evals, status, mode, out_at)


def _count_breakpoints_below(x0: torch.Tensor, d: torch.Tensor, s: float, mode: fp.Mode, cap: int = 100_000) -> int:
    """Number of input changes in (0, s) along one ray d [1, n] (model-free), counted up to ``cap``."""
    limit = float(fp.next_down(torch.tensor(s, dtype=torch.float32)))
    if limit <= 0:
        return 0
    lattice = fp.RayLattice(x0, d, limit, mode)
    count, ray = 0, torch.zeros(1, dtype=torch.int64, device=d.device)
    while count < cap:
        n = int(torch.isfinite(lattice.advance(ray, 64)).sum())
        count += n
        if n < 64:
            break
    return count


@torch.no_grad()
def ray_states(probe: Probe, direction: torch.Tensor | np.ndarray, s_max: float = 1e-6, mode: fp.Mode = "fp64",
               threshold: float = 0.0, max_states: int = 256) -> pd.DataFrame:
    """Every distinct float32 input state along one ray x0 + s·d, 0 < s ≤ s_max (the first ``max_states``),
    and the output at each: the whole profile behind one ray's :func:`first_output_change`, not only its first change.

    ``direction`` [d] is used as float32 exactly as given. One row per state, in increasing s: ``s`` (float32, the
    smallest scale giving this input), ``coords_changed`` (coordinates of X(s) that differ from x0),
    ``input_l2`` / ``output_l2`` (float64 ‖X(s) − x0‖, ‖f(X(s)) − f(x0)‖), ``output_max_abs`` (float64 max |Δf|),
    ``changed`` (bool: bitwise, or max |Δf| > ``threshold``, as the kernel decides). Evaluated in the probe's
    batch shape, as the kernel does: ceil(states / batch_size) forward passes.
    """
    D = _check_inputs(probe, direction, s_max, threshold)
    if D.shape[0] != 1:
        raise ValueError(f"ray_states takes one direction [d], got {D.shape[0]}")
    if max_states < 1:
        raise ValueError(f"max_states must be >= 1, got {max_states}")
    if mode not in fp.MODES:
        raise ValueError(f"mode must be one of {fp.MODES}, got {mode!r}")
    _check_reachable(probe.x0.float(), D, float(s_max), mode)
    x0 = probe.x0.float()
    s = fp.RayLattice(x0, D, s_max, mode).advance(torch.zeros(1, dtype=torch.long, device=D.device), max_states)[0]
    s = s[torch.isfinite(s)]
    X = fp.perturb(x0, s[:, None], D.expand(s.shape[0], -1), mode)
    out = probe.forward(X)
    diff = out.double() - probe.reference.double()
    return pd.DataFrame({
        "s": s.cpu().numpy(),
        "coords_changed": (X != x0).sum(dim=1).cpu().numpy(),
        "input_l2": (X.double() - x0.double()).norm(dim=1).cpu().numpy(),
        "output_l2": diff.norm(dim=1).cpu().numpy(),
        "output_max_abs": diff.abs().amax(dim=1).cpu().numpy(),
        "changed": fp.rows_differ(out, probe.reference, threshold).cpu().numpy(),
    })


def compare_methods(a: BoundaryResult, b: BoundaryResult) -> pd.DataFrame:
    """Rays where two boundary results disagree on s_out (bitwise, NaN equal to NaN)."""
    sa, sb = a.s_out.astype(np.float32), b.s_out.astype(np.float32)
    same = (sa.view(np.int32) == sb.view(np.int32)) | (np.isnan(sa) & np.isnan(sb))
    rays = np.flatnonzero(~same)
    return pd.DataFrame({"ray": rays, "s_out_a": sa[rays], "s_out_b": sb[rays], "status_a": a.status[rays],
                         "status_b": b.status[rays]})


def spaced_rays(num_angles: int, k: int) -> np.ndarray:
    """Up to ``k`` ray indices evenly spaced over ``range(num_angles)`` (int64, sorted, distinct; 0 and the last kept)."""
    if k < 0 or num_angles < 1:
        raise ValueError(f"need num_angles >= 1 and k >= 0, got num_angles={num_angles}, k={k}")
    return np.unique(np.linspace(0, num_angles - 1, min(k, num_angles)).astype(np.int64))


def plane_directions(e1: np.ndarray, e2: np.ndarray, num_angles: int) -> tuple[np.ndarray, torch.Tensor]:
    """Rays in the plane of e1, e2: θ = linspace(0, 2π, num_angles, endpoint=False),
    d(θ) = cos θ·e1 + sin θ·e2 computed in float64 and rounded once to float32 (as the seed did).

    Returns (theta [n] float64, D [n, d] float32). D is what the kernel perturbs along: save it.
    """
    if num_angles < 1:
        raise ValueError("num_angles must be >= 1")
    theta = np.linspace(0.0, 2 * np.pi, num_angles, endpoint=False)
    D = np.cos(theta)[:, None] * np.asarray(e1, np.float64) + np.sin(theta)[:, None] * np.asarray(e2, np.float64)
    return theta, torch.from_numpy(D.astype(np.float32))


@torch.no_grad()
def verify_crossing(probe: Probe, D: torch.Tensor, s_out: np.ndarray, s_below: np.ndarray, mode: fp.Mode,
                    threshold: float = 0.0, precision: str = "float64") -> pd.DataFrame:
    """Re-evaluate each found ray just below and at its boundary, from the saved exact directions.

    Returns one row per ray with ``unchanged_below`` and ``changed_at`` (both must be True for a
    correct boundary), ``emb_l2`` = ‖X(s_out) − x0‖ and ``hid_l2`` = ‖f(X(s_out)) − f(x0)‖ in
    ``precision`` ("float64" or "float32"), and ``amplification`` = hid_l2 / emb_l2.
    Rays without a boundary (NaN s_out) get NaN rows.
    """
    dt = {"float64": torch.float64, "float32": torch.float32}.get(precision)
    if dt is None:
        raise ValueError(f"precision must be float64 or float32, got {precision!r}")
    D = torch.as_tensor(D, dtype=torch.float32, device=probe.x0.device)
    found = np.flatnonzero(np.isfinite(s_out))
    R = D.shape[0]
    cols = {k: np.full(R, np.nan) for k in ("emb_l2", "hid_l2", "amplification")}
    below_ok = np.zeros(R, dtype=bool)
    at_ok = np.zeros(R, dtype=bool)
    if found.size:
        x0 = probe.x0.float()
        idx = torch.from_numpy(found).to(D.device)
        s_at = torch.from_numpy(s_out[found].astype(np.float32)).to(D.device)[:, None]
        s_lo = torch.from_numpy(s_below[found].astype(np.float32)).to(D.device)[:, None]
        X_at = fp.perturb(x0, s_at, D[idx], mode)
        X_lo = fp.perturb(x0, s_lo, D[idx], mode)
        out = probe.forward(torch.cat([X_lo, X_at]))
        n = found.size
        below_ok[found] = ~fp.rows_differ(out[:n], probe.reference, threshold).cpu().numpy()
        at_ok[found] = fp.rows_differ(out[n:], probe.reference, threshold).cpu().numpy()
        emb = (X_at.to(dt) - x0.to(dt)).norm(dim=1).double().cpu().numpy()
        hid = (out[n:].to(dt) - probe.reference.to(dt)).norm(dim=1).double().cpu().numpy()
        cols["emb_l2"][found], cols["hid_l2"][found] = emb, hid
        cols["amplification"][found] = hid / emb
    return pd.DataFrame({"unchanged_below": below_ok, "changed_at": at_ok, **cols})


def statistics(values: dict[str, np.ndarray], index: np.ndarray, index_name: str) -> pd.DataFrame:
    """count/mean/median/std/min/max and the index (θ, singular-vector number, …) of min and max, per column; NaN/inf ignored."""
    rows = []
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        ok = np.isfinite(v)
        if not ok.any():
            rows.append({"quantity": name, "count": 0})
            continue
        w = np.where(ok, v, np.nan)
        rows.append({"quantity": name, "count": int(ok.sum()), "mean": np.nanmean(w), "median": np.nanmedian(w),
                     "std": np.nanstd(w), "min": np.nanmin(w), "max": np.nanmax(w),
                     f"{index_name} at min": index[int(np.nanargmin(w))], f"{index_name} at max": index[int(np.nanargmax(w))]})
    return pd.DataFrame(rows).set_index("quantity")


def crossing_distances(probe: Probe, D: torch.Tensor, s_out: np.ndarray, s_below: np.ndarray, mode: fp.Mode,
                       threshold: float, sigma_1: float, precision: str = "float64") -> pd.DataFrame:
    """:func:`verify_crossing` plus the linear picture of each jump.

    Adds ``linear_response`` = ‖J·Δx‖ for the realised input change Δx = X(s_out) − x0 (one
    Jacobian–vector product per ray), ``linear_bound`` = σ1·‖Δx‖, and ``jump_over_linear`` =
    ‖Δh‖ / ‖J·Δx‖: far above 1, the jump is forward-pass rounding rather than sensitivity.
    """
    from .jacobian import jvp_rows

    D = torch.as_tensor(D, dtype=torch.float32, device=probe.x0.device)
    table = verify_crossing(probe, D, s_out, s_below, mode, threshold, precision)
    found = np.isfinite(s_out)
    x0 = probe.x0.float()
    s = torch.from_numpy(np.where(found, s_out, 0).astype(np.float32)).to(D.device)[:, None]
    linear = jvp_rows(probe, fp.perturb(x0, s, D, mode) - x0).double().norm(dim=1).cpu().numpy()
    table["linear_response"] = np.where(found, linear, np.nan)
    table["linear_bound"] = sigma_1 * table["emb_l2"]
    table["jump_over_linear"] = table["hid_l2"] / table["linear_response"]
    return table
