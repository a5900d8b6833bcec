"""Ray sweeps compared stage by stage: every hidden-state entry and, on request, every submodule.

For a direction d and a list of scales s_k, the inputs X_k = x0 + s_k·d are evaluated in batched
passes of the probe's fixed batch shape (the reference in the same shape), and at the probe's
position the output of every stage is compared with the reference: the embedding (the input row
itself), each decoder layer's output, the final norm's output, and optionally the submodules of
chosen layers through the adapter table (input norm, attention and its projections, post-attention
norm, MLP and its gate/up/act/down).

Metrics per stage: changed count (bitwise), % changed, mean and max |Δ|, L2, cosine, the histogram
of ULP distances, and — for parity with the seed — counts of |Δ| above 10^-1 … 10^-7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from . import fp
from .probe import Probe

E1 = 1e-6 + 1815 * 2e-13  # the seed's base scale (1.000363e-6)
STEP = 3 * 2e-14  # the seed's step (6e-14, below ulp(E1) in float32)
DECIMAL_THRESHOLDS = tuple(10.0 ** -k for k in range(1, 8))
ULP_EDGES = (0, 1, 2, 4, 16, 256, 65536)
ULP_LABELS = ("ulp=0", "ulp=1", "ulp=2-3", "ulp=4-15", "ulp=16-255", "ulp=256-65535", "ulp>=65536")
SweepMode = Literal["fp32", "fp64", "native"]


def states(probe: Probe, direction: torch.Tensor, scales: np.ndarray, mode: SweepMode = "fp32") -> torch.Tensor:
    """Inputs x0 + s·d for every scale, [S, d].

    "fp32"/"fp64": the seed's float32 perturbation (see :func:`fp.perturb`), scales rounded to float32.
    "native": computed in the probe's dtype (a float64 model perturbed in float64, as the seed's
    CPU fp64 analysis did).
    """
    scales = np.asarray(scales)
    if scales.ndim != 1 or scales.size == 0:
        raise ValueError("scales must be a non-empty 1-D list")
    if not np.isfinite(scales).all():
        raise ValueError("scales must be finite")
    d = torch.as_tensor(direction)
    if d.ndim != 1 or d.shape[0] != probe.d:
        raise ValueError(f"direction must have shape [{probe.d}], got {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("direction has non-finite entries")
    dev = probe.x0.device
    if mode == "native":
        s = torch.as_tensor(scales, dtype=probe.dtype, device=dev)[:, None]
        return probe.x0 + s * d.to(device=dev, dtype=probe.dtype)
    if mode not in fp.MODES:
        raise ValueError(f"mode must be fp32, fp64 or native, got {mode!r}")
    s = torch.as_tensor(scales.astype(np.float32), device=dev)[:, None]
    return fp.perturb(probe.x0.float(), s, d.to(device=dev, dtype=torch.float32), mode)


def stage_modules(probe: Probe, submodule_layers: tuple[int, ...] = (), submodules: tuple[str, ...] = ()) -> dict:
    """Stage name -> module, in network order: layer outputs, final norm, then requested submodules."""
    h = probe.handle
    mods = {f"layer_out[{i}]": h.layers[i] for i in range(h.n_layers)}
    mods["final_norm"] = h.final_norm
    known = list(h.adapter.submodules)
    for stage in submodules:
        if stage not in known:
            raise ValueError(f"unknown submodule {stage!r} for {h.adapter.family}; known: {known}")
    for i in submodule_layers:
        if not -h.n_layers <= i < h.n_layers:
            raise ValueError(f"layer {i} out of range: the model has {h.n_layers} layers (0..{h.n_layers - 1})")
        for stage in submodules:
            mods[f"layer{i % h.n_layers}.{stage}"] = h.stage_module(i % h.n_layers, stage)
    return mods


@torch.no_grad()
def capture(probe: Probe, X: torch.Tensor, submodule_layers: tuple[int, ...] = (),
            submodules: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every stage's output at the probe position for each row of X [n, d], in the fixed batch shape.

    Returns stage name -> [n, width] in the model's dtype; "embedding" is X itself.
    """
    mods = stage_modules(probe, submodule_layers, submodules)
    p = probe.position
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def grab(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            current[name] = out[:, p, :].detach().clone()
        return grab

    handles = [m.register_forward_hook(hook(name)) for name, m in mods.items()]
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in mods}
    try:
        for chunk, k in probe.pad(X):
            current.clear()
            probe.handle.base(inputs_embeds=probe.embeds(chunk), use_cache=False)
            probe.rows_evaluated += chunk.shape[0]
            for name in mods:
                collected[name].append(current[name][:k])
    finally:
        for hd in handles:
            hd.remove()
    out = {"embedding": X.to(device=probe.x0.device, dtype=probe.dtype)}
    out.update({name: torch.cat(parts) for name, parts in collected.items()})
    return out


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of a [n, w] with the matching row of b [n, w] (or [w]), float64 [n]."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def compare(A: torch.Tensor, ref: torch.Tensor) -> dict[str, np.ndarray]:
    """Metrics of each row of A [n, w] against ref [w] or [n, w] (same dtype); arrays of length n.

    ``rel_l2`` is ‖A − ref‖ / ‖ref‖ per row (inf where the reference row is zero and A differs)."""
    ref_b = ref.expand_as(A)
    diff = A.double() - ref_b.double()
    absd = diff.abs()
    w = A.shape[1]
    changed = (~fp.bits_equal(A, ref_b)).sum(dim=1)
    cos = cosine_rows(A, ref_b)
    l2 = diff.norm(dim=1)
    ulps = fp.ulp_distance(A, ref_b)
    m: dict[str, np.ndarray] = {
        "changed": changed.cpu().numpy(), "pct_changed": (100.0 * changed / w).cpu().numpy(),
        "mean_abs": absd.mean(1).cpu().numpy(), "max_abs": absd.amax(1).cpu().numpy(),
        "l2": l2.cpu().numpy(), "rel_l2": (l2 / ref_b.double().norm(dim=1)).cpu().numpy(),
        "cosine": cos.cpu().numpy(),
    }
    edges = list(ULP_EDGES) + [np.iinfo(np.int64).max]
    for lo, hi, label in zip(edges[:-1], edges[1:], ULP_LABELS):
        m[label] = ((ulps >= lo) & (ulps < hi)).sum(1).cpu().numpy()
    for t in DECIMAL_THRESHOLDS:
        m[f"abs>{t:.0e}"] = (absd > t).sum(1).cpu().numpy()
    return m


@dataclass
class Sweep:
    """The inputs, the captured stages, and the long metrics table of a sweep."""

    scales: np.ndarray  # [S]
    X: torch.Tensor  # [S, d] inputs
    X_ref: torch.Tensor  # [d] reference input
    outputs: dict[str, torch.Tensor]  # stage -> [S, w]
    reference: dict[str, torch.Tensor]  # stage -> [w]
    table: pd.DataFrame
    stages: list[str] = field(default_factory=list)

    def delta(self, stage: str) -> np.ndarray:
        """|Δ| [S, w] of one stage against the reference, float64."""
        return (self.outputs[stage].double() - self.reference[stage].double()).abs().cpu().numpy()

    def pivot(self, metric: str) -> pd.DataFrame:
        """metric as a [scale index × stage] table, stages in network order."""
        return self.table.pivot(index="scale_index", columns="stage", values=metric)[self.stages]

    def input_response(self, stage: str) -> dict[str, Any]:
        """Where the input row first moves and how much of ``stage`` that changes (the findings page reads it).

        ``scales``: S; ``scales_input_unchanged``: scales whose input row is bitwise the reference's (so every stage
        is too); at the first scale that moves it (``first_input_change``, an index into the scales, or None):
        ``input_coords_changed`` and ``stage_pct_changed`` (% of ``stage``'s coordinates not bitwise equal).
        """
        differs = ~fp.bits_equal(self.X, self.X_ref.expand_as(self.X))  # [S, d]
        moved = np.flatnonzero(differs.any(dim=1).cpu().numpy())
        first = int(moved[0]) if len(moved) else None
        return {"scales": len(self.scales), "scales_input_unchanged": len(self.scales) - len(moved),
                "first_input_change": first,
                "input_coords_changed": int(differs[first].sum()) if first is not None else 0,
                "stage_pct_changed": float(self.pivot("pct_changed")[stage].iloc[first]) if first is not None else 0.0}


def stage_sweep(probe: Probe, direction: torch.Tensor, scales: np.ndarray, mode: SweepMode = "fp32",
                reference_scale: float | None = None, submodule_layers: tuple[int, ...] = (),
                submodules: tuple[str, ...] = ()) -> Sweep:
    """Compare x0 + s·d for every scale with the reference input, stage by stage.

    The reference input is x0, or x0 + reference_scale·d (the seed's exp1 compares against E1);
    it is evaluated in the same batch shape as the sweep. Cost: ceil((S + 1) / batch_size)
    batched forward passes for all stages at once.
    """
    X = states(probe, direction, scales, mode)
    X_ref = probe.x0.clone() if reference_scale is None else states(probe, direction, np.array([reference_scale]), mode)[0]
    caps = capture(probe, torch.cat([X_ref[None].to(X.dtype), X]), tuple(submodule_layers), tuple(submodules))
    reference = {k: v[0] for k, v in caps.items()}
    outputs = {k: v[1:] for k, v in caps.items()}
    stages = list(outputs)
    rows = []
    for stage in stages:
        m = compare(outputs[stage], reference[stage])
        frame = pd.DataFrame(m)
        frame.insert(0, "stage", stage)
        frame.insert(0, "scale", np.asarray(scales, dtype=np.float64))
        frame.insert(0, "scale_index", np.arange(len(scales)))
        rows.append(frame)
    table = pd.concat(rows, ignore_index=True)
    return Sweep(np.asarray(scales), X, X_ref, outputs, reference, table, stages)


def changed_coordinates(a: torch.Tensor, b: torch.Tensor) -> list[tuple[int, int]]:
    """(coordinate, ULP distance) of every entry where a and b [d] differ bitwise."""
    idx = torch.nonzero(~fp.bits_equal(a, b)).flatten()
    dist = fp.ulp_distance(a[idx], b[idx])
    return [(int(i), int(u)) for i, u in zip(idx.tolist(), dist.tolist())]
