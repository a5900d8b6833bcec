"""Logit-linearity radius in parameter space (seed 004).

For prompts x and parameters θ in a scope, f(θ) = the logits at the last position (``positions="last"``,
one [V] vector per prompt) or at every position (``"all"``, the [L·V] flattened logits per prompt). Along a
unit direction δ over the scoped parameters and a radius r:

* Δ_true(r) = f(θ + r·δ) − f(θ), computed out of place with ``torch.func.functional_call`` on perturbed
  copies of the scoped tensors (the model's own parameters are never written);
* Δ_pred(r) = r·J·δ, from ONE ``torch.func.jvp`` per direction (linear in r: computed once, scaled);
* the second directional derivative c₂ = d²f/dt²(θ + tδ) at t = 0 (a jvp of a jvp: the Hessian of every
  logit along δ, never a Hessian matrix), so Δ_true − Δ_pred ≈ ½r²·c₂ to second order.

Per (direction, prompt): relative error ‖Δ_true − Δ_pred‖/‖Δ_true‖ and cos(Δ_true, Δ_pred), accumulated in
float64. The linearity radius is the largest tested r such that r and every smaller tested radius meet both
thresholds on the means (the seed's "largest radius satisfying" is reported too: on a non-monotone curve
the two differ).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, jvp

from .curvature import composite_layer_norm
from .models import ModelHandle

SCOPES_HELP = "'all' (or 'full'), 'last_blocks:K', 'embeddings', 'attention', or 'regex:PATTERN' (parameter names)"
REFUSED_DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Parameter scopes and directions

def scoped_parameters(h: ModelHandle, scope: str) -> dict[str, torch.Tensor]:
    """Name -> parameter tensor (the model's own, not copies) of the parameters in ``scope``.

    ``last_blocks:K`` takes every parameter of the last K decoder blocks (whole blocks, from the adapter's
    layer list); ``embeddings`` every ``nn.Embedding`` (token and, for GPT-2, position embeddings; a tied
    unembedding moves with its embedding); ``attention`` every parameter inside each block's attention
    module. Tied parameters appear once (``named_parameters`` de-duplicates; ``functional_call`` re-ties).
    """
    named = dict(h.model.named_parameters())
    scope = str(scope).strip()
    if scope in ("all", "full"):
        chosen = list(named)
    elif scope.startswith("last_blocks:"):
        try:
            k = int(scope.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"param_scope {scope!r}: K in 'last_blocks:K' must be an integer") from None
        if not 1 <= k <= h.n_layers:
            raise ValueError(f"param_scope {scope!r}: K must be between 1 and {h.n_layers} (the model's blocks)")
        prefixes = tuple(f"{h.adapter.layers}.{i}." for i in range(h.n_layers - k, h.n_layers))
        chosen = [n for n in named if n.startswith(prefixes)]
    elif scope == "embeddings":
        mods = [m for m, mod in h.model.named_modules() if isinstance(mod, torch.nn.Embedding)]
        chosen = [n for n in named if any(n.startswith(m + ".") for m in mods)]
    elif scope == "attention":
        attn = h.adapter.submodules["attn"]
        prefixes = tuple(f"{h.adapter.layers}.{i}.{attn}." for i in range(h.n_layers))
        chosen = [n for n in named if n.startswith(prefixes)]
    elif scope.startswith("regex:"):
        pattern = re.compile(scope.split(":", 1)[1])
        chosen = [n for n in named if pattern.search(n)]
    else:
        raise ValueError(f"unknown param_scope {scope!r}; use {SCOPES_HELP}")
    if not chosen:
        raise ValueError(f"param_scope {scope!r} selects no parameters of {h.name}; use {SCOPES_HELP}")
    return {n: named[n] for n in chosen}


def n_elements(params: dict[str, torch.Tensor]) -> int:
    return int(sum(p.numel() for p in params.values()))


def random_directions(params: dict[str, torch.Tensor], n: int, seed: int, std: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    """``n`` Gaussian directions N(0, std²) over ``params``, each normalised to global unit norm.

    Drawn in float64 on the CPU from ``torch.Generator(seed)`` (the same directions on every device and
    dtype), normalised in float64, then cast to each parameter's dtype and device. ``std`` cancels in the
    normalisation; it is kept because the seed's config has it.
    """
    if n < 1:
        raise ValueError(f"num_directions must be >= 1 (got {n})")
    if not std > 0:
        raise ValueError(f"perturbation_std must be positive (got {std})")
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(n):
        raw = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) * std for k, p in params.items()}
        norm = math.sqrt(sum(float((v * v).sum()) for v in raw.values()))
        out.append({k: (v / norm).to(dtype=params[k].dtype, device=params[k].device) for k, v in raw.items()})
    return out


# ---------------------------------------------------------------------------------------------
# The logit function of the scoped parameters

def check_dtype(h: ModelHandle) -> None:
    """Refuse half precisions: a unit direction over N parameters has entries ~1/√N, and r/√N is below
    half a unit in the last place of typical weights, so θ + r·δ rounds back to θ in most coordinates."""
    if h.dtype in REFUSED_DTYPES:
        raise ValueError(
            f"logit linearity refuses {str(h.dtype).removeprefix('torch.')}: a step of r/sqrt(N) per parameter "
            f"(N = number of scoped parameters) rounds to nothing against weights with an 8- or 11-bit "
            f"significand, so Δ_true would measure rounding, not the model; load the model in float32 or float64")
    impl = getattr(h.model.config, "_attn_implementation", None)
    if impl not in ("eager", "instab_eager"):
        raise ValueError(f"attention implementation {impl!r}: forward-mode AD needs eager attention; "
                         "load the model with attn_implementation='eager' (load_model's default)")


def encode_prompts(h: ModelHandle, prompts: list[str]) -> list[torch.Tensor]:
    if not prompts:
        raise ValueError("no prompts: pass at least one prompt")
    return [h.encode(p) for p in prompts]


def logit_function(h: ModelHandle, ids: list[torch.Tensor], positions: str = "last") -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """f(scoped params) -> [P, V] (last position) or [P, L·V] (``all``: each prompt's flattened logits,
    zero-padded to the longest prompt). Each prompt runs at batch 1, so no padding enters the model."""
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all' (got {positions!r})")
    model = h.model

    def f(scoped: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = []
        for t in ids:
            logits = functional_call(model, scoped, args=(), kwargs={"input_ids": t[None], "use_cache": False}).logits[0]
            rows.append(logits[-1] if positions == "last" else logits.reshape(-1))
        if positions == "all":
            width = max(r.numel() for r in rows)
            rows = [torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows]
        return torch.stack(rows)

    return f


def perturbed(params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], r: float) -> dict[str, torch.Tensor]:
    """New tensors θ + r·δ (out of place; in the parameters' dtype)."""
    return {k: p.detach() + r * delta[k] for k, p in params.items()}


# ---------------------------------------------------------------------------------------------
# Metrics and the radius

def relerr_cos(d_true: torch.Tensor, d_pred: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ‖t − p‖/‖t‖ and cos(t, p) in float64 for [P, V] tensors; ‖t‖ = 0 gives inf and nan."""
    t, p = d_true.double(), d_pred.double()
    nt, npred = t.norm(dim=-1), p.norm(dim=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = ((t - p).norm(dim=-1) / nt).cpu().numpy()
        cos = ((t * p).sum(-1) / (nt * npred)).cpu().numpy()
    rel = np.where(nt.cpu().numpy() == 0, np.inf, rel)
    return rel, cos


def linearity_radius(radii: list[float] | np.ndarray, mean_relerr: np.ndarray, mean_cos: np.ndarray,
                     relerr_threshold: float, cos_threshold: float) -> float | None:
    """Largest r such that r and every smaller tested radius have mean relerr <= and mean cos >= the
    thresholds; None if the smallest fails. nan fails."""
    order = np.argsort(np.asarray(radii, dtype=np.float64))
    best = None
    for i in order:
        ok = bool(mean_relerr[i] <= relerr_threshold) and bool(mean_cos[i] >= cos_threshold)
        if not ok:
            break
        best = float(radii[i])
    return best


def largest_passing_radius(radii: list[float] | np.ndarray, mean_relerr: np.ndarray, mean_cos: np.ndarray,
                           relerr_threshold: float, cos_threshold: float) -> float | None:
    """The seed's definition: the largest tested radius meeting both thresholds, smaller ones regardless."""
    ok = [float(r) for r, e, c in zip(radii, mean_relerr, mean_cos) if e <= relerr_threshold and c >= cos_threshold]
    return max(ok) if ok else None


# ---------------------------------------------------------------------------------------------
# The analysis

@dataclass
class LinearityConfig:
    """The seed's keys (plus model, dtype, device, seed, positions, second_order)."""

    model: str = "tiny-llama"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    perturbation_std: float = 1e-3
    num_directions: int = 8
    radii: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    param_scope: str = "full"
    cos_threshold: float = 0.95
    relerr_threshold: float = 0.20
    prompts: list[str] = field(default_factory=lambda: ["The capital of France is"])
    prompts_file: str | None = None
    positions: str = "last"
    second_order: bool = True
    output_dir: str = "results/analyze-logits"
    report_filename: str = "logit_linearity.json"


@dataclass
class LinearityResult:
    """Per (direction d, radius r, prompt p) metrics; arrays are float64 numpy.

    relerr, cos: [D, R, P]; jvp_norm (‖J·δ‖), second_norm (‖c₂‖): [D, P]; second_relerr: [D, R, P] is
    ‖Δ_true − r·Jδ − ½r²c₂‖/‖Δ_true‖ (nan without second_order); predicted_relerr: [D, R, P] is
    ½r‖c₂‖/‖Jδ‖, the relative error the second-order term predicts.
    """

    scope: str
    n_params: int
    radii: np.ndarray
    relerr: np.ndarray
    cos: np.ndarray
    jvp_norm: np.ndarray
    second_norm: np.ndarray
    second_relerr: np.ndarray
    predicted_relerr: np.ndarray
    relerr_threshold: float
    cos_threshold: float
    positions: str

    def per_radius(self) -> dict[str, dict[str, float]]:
        """The seed's report entries: mean and std over (direction, prompt) of relerr and cosine, per radius."""
        out = {}
        for j, r in enumerate(self.radii):
            e, c = self.relerr[:, j].ravel(), self.cos[:, j].ravel()
            entry = {"mean_relative_error": float(np.mean(e)), "std_relative_error": float(np.std(e)),
                     "mean_cosine_similarity": float(np.mean(c)), "std_cosine_similarity": float(np.std(c))}
            if np.isfinite(self.second_relerr[:, j]).any():
                entry["mean_second_order_relative_error"] = float(np.mean(self.second_relerr[:, j]))
                entry["mean_predicted_relative_error"] = float(np.mean(self.predicted_relerr[:, j]))
            out[repr(float(r))] = entry
        return out

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        return self.relerr.mean(axis=(0, 2)), self.cos.mean(axis=(0, 2))

    @property
    def radius(self) -> float | None:
        e, c = self.means()
        return linearity_radius(self.radii, e, c, self.relerr_threshold, self.cos_threshold)

    @property
    def first_failing(self) -> float | None:
        """The smallest tested radius above the linearity radius (None if every radius passes)."""
        later = [float(x) for x in sorted(self.radii) if self.radius is None or x > self.radius]
        return later[0] if later else None

    @property
    def largest_passing(self) -> float | None:
        e, c = self.means()
        return largest_passing_radius(self.radii, e, c, self.relerr_threshold, self.cos_threshold)

    @property
    def curvature_radius(self) -> float | None:
        """2·relerr_threshold·mean(‖Jδ‖/‖c₂‖): where the second-order term alone reaches the error threshold."""
        ratio = self.jvp_norm / self.second_norm
        ratio = ratio[np.isfinite(ratio)]
        return float(2 * self.relerr_threshold * ratio.mean()) if ratio.size else None

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, np.ndarray)}

    def table(self):
        """Long table: one row per radius with mean/std of every metric."""
        import pandas as pd
        rows = []
        for j, r in enumerate(self.radii):
            rows.append({"scope": self.scope, "radius": float(r),
                         "mean_relerr": self.relerr[:, j].mean(), "std_relerr": self.relerr[:, j].std(),
                         "mean_cos": self.cos[:, j].mean(), "std_cos": self.cos[:, j].std(),
                         "mean_second_order_relerr": self.second_relerr[:, j].mean(),
                         "mean_predicted_relerr": self.predicted_relerr[:, j].mean()})
        return pd.DataFrame(rows)


def analyze(h: ModelHandle, prompts: list[str], radii: list[float], scope: str = "full", num_directions: int = 8,
            seed: int = 0, perturbation_std: float = 1e-3, relerr_threshold: float = 0.20,
            cos_threshold: float = 0.95, positions: str = "last", second_order: bool = True,
            progress: bool = True) -> LinearityResult:
    """Relative error and cosine of Δ_true against Δ_pred = r·Jδ for every (direction, radius, prompt).

    Costs per direction: one jvp, one forward per radius (plus one jvp-of-jvp with ``second_order``);
    the reference f(θ) is one forward in total. The model's parameters are read, never written.
    """
    from tqdm.auto import tqdm

    check_dtype(h)
    radii_arr = np.asarray([float(r) for r in radii], dtype=np.float64)
    if radii_arr.size == 0:
        raise ValueError("radii is empty: pass at least one positive radius")
    if not np.all(np.isfinite(radii_arr) & (radii_arr > 0)):
        raise ValueError(f"every radius must be positive and finite (got {radii_arr.tolist()})")
    params = scoped_parameters(h, scope)
    primals = {k: p.detach() for k, p in params.items()}
    ids = encode_prompts(h, prompts)
    f = logit_function(h, ids, positions)
    dirs = random_directions(params, num_directions, seed, perturbation_std)
    D, R, P = len(dirs), len(radii_arr), len(ids)
    shape3 = (D, R, P)
    relerr, cos = np.empty(shape3), np.empty(shape3)
    second_relerr, predicted = np.full(shape3, np.nan), np.full(shape3, np.nan)
    jvp_norm, second_norm = np.empty((D, P)), np.full((D, P), np.nan)
    with torch.no_grad():
        f0 = f(primals)
    for d, delta in enumerate(tqdm(dirs, desc=f"directions ({scope})", disable=not progress)):
        _, jd = jvp(f, (primals,), (delta,))
        jd = jd.detach()
        jvp_norm[d] = jd.double().norm(dim=-1).cpu().numpy()
        c2 = None
        if second_order:
            with composite_layer_norm(h.model):  # torch's jvp-of-jvp through fused LayerNorm is wrong
                _, c2 = jvp(lambda p: jvp(f, (p,), (delta,))[1], (primals,), (delta,))
            c2 = c2.detach()
            second_norm[d] = c2.double().norm(dim=-1).cpu().numpy()
        for j, r in enumerate(radii_arr):
            with torch.no_grad():
                d_true = f(perturbed(params, delta, float(r))) - f0
            relerr[d, j], cos[d, j] = relerr_cos(d_true, r * jd.double())
            if c2 is not None:
                second_relerr[d, j], _ = relerr_cos(d_true, r * jd.double() + 0.5 * r * r * c2.double())
                predicted[d, j] = 0.5 * r * second_norm[d] / jvp_norm[d]
    return LinearityResult(scope=scope, n_params=n_elements(params), radii=radii_arr, relerr=relerr, cos=cos,
                           jvp_norm=jvp_norm, second_norm=second_norm, second_relerr=second_relerr,
                           predicted_relerr=predicted, relerr_threshold=relerr_threshold,
                           cos_threshold=cos_threshold, positions=positions)


@dataclass
class StepResponse:
    """One scope and direction δ: ``at(r)`` gives (Δ_true, Δ_pred) = (f(θ + rδ) − f(θ), r·Jδ), each [P, V] (float64
    prediction). The jvp is computed once, at construction; each radius costs one forward pass."""

    f: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    params: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    f0: torch.Tensor
    jd: torch.Tensor

    def at(self, r: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"the radius must be positive and finite, got {r}")
        with torch.no_grad():
            d_true = self.f(perturbed(self.params, self.delta, float(r))) - self.f0
        return d_true, r * self.jd.double()


def step_response(h: ModelHandle, prompts: list[str], scope: str, direction: int, num_directions: int, seed: int = 0,
                  perturbation_std: float = 1e-3, positions: str = "last") -> StepResponse:
    """The ``direction``-th of the ``num_directions`` random directions :func:`analyze` draws with this ``seed``
    (the same δ), ready to be evaluated at any radius (the live explorer's kernel)."""
    check_dtype(h)
    if not 0 <= direction < num_directions:
        raise ValueError(f"direction {direction} out of range: 0..{num_directions - 1}")
    params = scoped_parameters(h, scope)
    primals = {k: p.detach() for k, p in params.items()}
    f = logit_function(h, encode_prompts(h, prompts), positions)
    delta = random_directions(params, num_directions, seed, perturbation_std)[direction]
    with torch.no_grad():
        f0 = f(primals)
    _, jd = jvp(f, (primals,), (delta,))
    return StepResponse(f=f, params=params, delta=delta, f0=f0, jd=jd.detach())


# ---------------------------------------------------------------------------------------------
# Config files and the report

_KEY_TYPES: dict[str, str] = {
    "model": "str", "dtype": "str", "device": "str", "seed": "int", "perturbation_std": "float",
    "num_directions": "int", "radii": "list[float]", "param_scope": "str", "cos_threshold": "float",
    "relerr_threshold": "float", "prompts": "list[str]", "prompts_file": "str", "positions": "str",
    "second_order": "bool", "output_dir": "str", "report_filename": "str",
}


def _float(key: str, v: Any) -> float:
    # PyYAML reads 1e-3 (no dot) as a string: accept numeric strings for float keys.
    if isinstance(v, bool):
        raise ValueError(f"config key {key!r} must be a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise ValueError(f"config key {key!r} must be a number, got {type(v).__name__} {v!r}")


def _coerce(key: str, v: Any) -> Any:
    kind = _KEY_TYPES[key]
    if kind == "str":
        if key == "prompts_file" and v is None:
            return None
        if not isinstance(v, str):
            raise ValueError(f"config key {key!r} must be a string, got {type(v).__name__} {v!r}")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"config key {key!r} must be an integer, got {type(v).__name__} {v!r}")
        return v
    if kind == "float":
        return _float(key, v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {type(v).__name__} {v!r}")
        return v
    if kind == "list[float]":
        if not isinstance(v, list) or not v:
            raise ValueError(f"config key {key!r} must be a non-empty list of numbers, got {type(v).__name__} {v!r}")
        return [_float(key, x) for x in v]
    if kind == "list[str]":
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise ValueError(f"config key {key!r} must be a non-empty list of strings, got {v!r}")
        return v
    raise AssertionError(kind)


def load_config(path: str | Path) -> LinearityConfig:
    """Read a YAML config: keys at the root or under ``analysis:``; unknown keys ignored with a warning;
    a wrong type raises ValueError naming the key. ``prompts_file`` (one prompt per non-empty line) is
    resolved against the config's folder and replaces ``prompts``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a YAML mapping of keys to values")
    merged = {k: v for k, v in raw.items() if k != "analysis"}
    if "analysis" in raw:
        if not isinstance(raw["analysis"], dict):
            raise ValueError(f"config key 'analysis' must be a mapping, got {raw['analysis']!r}")
        merged.update(raw["analysis"])
    if "model_name_or_path" in merged and "model" not in merged:  # the key of an SFT config (the seed's)
        merged["model"] = merged.pop("model_name_or_path")
    unknown = sorted(set(merged) - set(_KEY_TYPES))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown config keys {unknown}", stacklevel=2)
    values = {k: _coerce(k, v) for k, v in merged.items() if k in _KEY_TYPES}
    if "model" not in values:
        raise ValueError(f"{path}: missing required config key 'model' (a bundled name such as tiny-llama, or a "
                         "local Hugging Face directory)")
    if "prompts" not in values and not values.get("prompts_file"):
        raise ValueError(f"{path}: missing required config key 'prompts' (a list of prompts) or 'prompts_file'")
    cfg = LinearityConfig(**values)
    if cfg.prompts_file:
        pf = Path(cfg.prompts_file)
        pf = pf if pf.is_absolute() else path.parent / pf
        if not pf.is_file():
            raise ValueError(f"config key 'prompts_file': {pf} does not exist")
        cfg.prompts = [line.strip() for line in pf.read_text().splitlines() if line.strip()]
        if not cfg.prompts:
            raise ValueError(f"config key 'prompts_file': {pf} has no non-empty lines")
    return cfg


def report(res: LinearityResult, cfg: LinearityConfig, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed's JSON shape (one entry per radius, keyed by the radius) plus linearity_radius, the
    second-order summary and the config."""
    out: dict[str, Any] = {"config": asdict(cfg), "model": model, "param_scope": res.scope,
                           "num_scoped_parameters": res.n_params, "positions": res.positions}
    out.update(res.per_radius())
    out["linearity_radius"] = res.radius
    out["largest_passing_radius"] = res.largest_passing
    out["second_order"] = {
        "mean_jvp_norm": float(np.mean(res.jvp_norm)),
        "mean_second_derivative_norm": float(np.nanmean(res.second_norm)) if np.isfinite(res.second_norm).any() else None,
        "curvature_radius": res.curvature_radius,
    }
    return out


def run_config(cfg: LinearityConfig, output_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Load the model, analyse, write ``<output_dir>/<report_filename>`` atomically; returns (path, report)."""
    from .models import load_model
    from .results import write_json

    if cfg.dtype in ("bfloat16", "float16"):
        raise ValueError(f"config key 'dtype': {cfg.dtype} is refused: a step of r/sqrt(N) per parameter rounds "
                         "to nothing there; use float32 or float64")
    h = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    res = analyze(h, cfg.prompts, cfg.radii, scope=cfg.param_scope, num_directions=cfg.num_directions,
                  seed=cfg.seed, perturbation_std=cfg.perturbation_std, relerr_threshold=cfg.relerr_threshold,
                  cos_threshold=cfg.cos_threshold, positions=cfg.positions, second_order=cfg.second_order,
                  progress=progress)
    rep = report(res, cfg, model=h.describe())
    target = Path(output_dir or cfg.output_dir) / cfg.report_filename
    write_json(target, rep)
    return target, rep
