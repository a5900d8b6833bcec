"""The book's findings page: per experiment, what the seed reported, what this build measured, and the verdict.

Every measured figure is read from the ``summary`` of a finished run's ``manifest.json`` (what the notebook
passed to ``Run.finish``), never typed by hand: a judge reads it through :class:`Summary`, which remembers
each key it read, so the page can list where every number came from and a test can check it against the
manifest. The seed side is a verbatim quote from the seed documents (``../shared/seeds``) or from the
seed-code restatement (``../shared/spec/experiments.md``), with its source.

Verdicts: ``confirmed`` (the seed's observation or reading holds on this build's model), ``differs`` (it
does not, and the one-line reason says why), ``measured`` (the seed made no claim this measurement could
confirm; the figures are reported), ``not run`` (no finished run in this build).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FINDINGS_PAGE = "book/findings.md"
SEED_DOC = "seeds/001_4735f917868e62c2.txt"
SPEC_DOC = "spec/experiments.md"
VERDICTS = ("confirmed", "differs", "measured", "not run")


def fmt(v: Any) -> str:
    """How the page prints a manifest value: ints and bools as they are, floats to 3 significant digits."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}"
    return str(v)


class Summary:
    """A run's manifest summary; ``s[key]`` (dotted for nested dicts) reads a value and records the key."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest
        self.summary = manifest.get("summary") or {}
        self.read: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        node: Any = self.summary
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"the {self.manifest.get('experiment')} manifest summary has no {key!r}")
            node = node[part]
        self.read[key] = node
        return node

    def f(self, key: str) -> str:
        """``fmt(self[key])``: the value as the page prints it."""
        return fmt(self[key])


@dataclass
class Finding:
    """One row of the findings page."""

    experiment: str
    seed: str  # verbatim quote
    source: str  # where the quote is, relative to ../shared
    measured: str = "–"
    verdict: str = "not run"
    why: str = ""
    run: Path | None = None  # the results folder the figures came from
    values: dict[str, Any] = field(default_factory=dict)  # summary key -> value, every figure in `measured`/`why`


Judge = Callable[[Summary], tuple[str, str, str]]  # -> (measured, verdict, why)


@dataclass(frozen=True)
class Claim:
    seed: str
    source: str
    judge: Judge


def _pct(part: float, whole: float) -> str:
    return fmt(100.0 * part / whole) + "%" if whole else "–"


# --- judges: one per experiment, reading only the manifest summary --------------------------------------


def _exp01(s: Summary) -> tuple[str, str, str]:
    n, same, first = s["jumps"], s["jumps_input_unchanged"], s["first_input_change_jump"]
    measured = (f"{s.f('jumps_input_unchanged')} of {s.f('jumps')} jumps leave the float32 input row unchanged; "
                f"the first that moves it (jump {s.f('first_input_change_jump')}) changes "
                f"{s.f('input_coords_changed')} input coordinates and {s.f('layer0_pct_changed')}% of layer 0's output")
    if same:
        return measured, "differs", (f"the seed's smallest jumps compare an input with itself: {fmt(same)} of "
                                     f"{fmt(n)} are below the float32 spacing of the input row")
    return measured, "confirmed", "every jump moves the input row, and the change reaches the first layer"


def _exp02(s: Summary) -> tuple[str, str, str]:
    floor = s["fd_floor_eps_v1"]
    measured = (f"σ1 = {s.f('sigma_1')} (d = {s.f('d')}); finite differences along v1 leave [σ1/2, 2σ1] "
                f"below ε = {s.f('fd_floor_eps_v1')}; top-k Lanczos σ within {s.f('topk_max_rel_diff')} of the SVD")
    if floor is not None and not math.isnan(floor):
        return measured, "differs", ("an FD 'Lipschitz constant' far above σ1 is the forward pass's rounding floor "
                                     "‖Δf‖/ε at small ε, not a property of J")
    return measured, "confirmed", "finite differences agree with σ1 over the whole ε range"


def _exp03(s: Summary) -> tuple[str, str, str]:
    changed, smallest = s["changed"], s["smallest_eps_with_change"]
    measured = (f"coordinates of fl32(x0 + ε σ1 v1) that differ from x0, largest to smallest ε: "
                f"{', '.join(fmt(c) for c in changed)} of {s.f('d')}; smallest ε that moves any: "
                f"{s.f('smallest_eps_with_change')}")
    if changed and changed[-1] == 0:
        return measured, "differs", (f"float32 rounds the smallest perturbations away entirely: below ε = "
                                     f"{fmt(smallest)} the input equals x0 bit for bit")
    return measured, "confirmed", "float32 holds a perturbation at every ε tried (counted in ULPs, not decimals)"


def _exp04(s: Summary) -> tuple[str, str, str]:
    div = s["divergence"]
    parted = {q: v for q, v in div.items() if v is not None}
    measured = (f"{s.f('setting_a')} vs {s.f('setting_b')}: {len(parted)} of {len(div)} questions part, at steps "
                f"{', '.join(fmt(v) for v in parted.values()) or '–'}")
    if parted:
        return measured, "confirmed", "two arithmetic settings generate different text from the same prompt"
    return measured, "differs", "no question parts within the generated tokens on this model"


def _exp05(s: Summary) -> tuple[str, str, str]:
    low = s["min_submodule_pct_changed"]
    if low is None:
        return (f"no jump changed the input of layer {s.f('submodule_layer')}", "measured",
                "the jumps left the layer's input bit-identical, so its submodules could not differ")
    measured = (f"once layer {s.f('submodule_layer')}'s input changes, its submodules change between "
                f"{s.f('min_submodule_pct_changed')}% ({s.f('least_changed_submodule')}) and "
                f"{s.f('max_submodule_pct_changed')}% of their coordinates")
    if low >= 50:
        return measured, "differs", ("no submodule is singled out: every one spreads a changed input over most of "
                                     "its coordinates")
    return measured, "confirmed", "the submodules differ in how much of a changed input they carry"


def _exp06(s: Summary) -> tuple[str, str, str]:
    measured = (f"{s.f('method')}: gap {s.f('gap')} at distance {s.f('distance')} from x0 "
                f"(tokens {', '.join(s['tokens'])}), tie reached: {s.f('converged')}")
    adam = "adam_geometric" in (s.summary.get("methods") or {})
    if adam:
        measured += (f"; the seed's Adam: gap {s.f('methods.adam_geometric.gap')} at distance "
                     f"{s.f('methods.adam_geometric.distance')}, float tie: {s.f('methods.adam_geometric.exact_tie')}")
    if s["converged"]:
        if adam and not s["methods.adam_geometric.exact_tie"]:
            return measured, "confirmed", "a float32 tie point exists; the seed's Adam does not reach it"
        return measured, "confirmed", "a float32 tie point exists next to the prompt's embedding"
    return measured, "differs", "no tie point was reached"


def _exp07(s: Summary) -> tuple[str, str, str]:
    grids = s.summary.get("grids") or {}
    zoom = next((n for n in grids if n.endswith("zoom")), None)
    parts = [f"{n}: {s.f(f'grids.{n}.distinct_inputs')} distinct inputs in {s.f(f'grids.{n}.cells')} cells, "
             f"randomness score {s.f(f'grids.{n}.randomness_score')}" for n in grids]
    measured = "; ".join(parts)
    if zoom is not None:
        k, n = s[f"grids.{zoom}.distinct_inputs"], s[f"grids.{zoom}.cells"]
        if k < n:
            return measured, "differs", (f"the zoomed map's pattern is the input lattice: its {fmt(n)} cells hold "
                                         f"only {fmt(k)} distinct float32 inputs, G is constant on each")
    return measured, "confirmed", "every cell is a distinct input"


def _exp08(s: Summary) -> tuple[str, str, str]:
    rows = s["localisation"]
    measured = "; ".join(f"{r['question']}: step {fmt(r['step'])} ({r['t_A']!r} vs {r['t_B']!r}), first differing "
                         f"stage {fmt(r['first stage that differs'])}, lens flips at "
                         f"{fmt(r['first stage where the lens flips'])}" for r in rows)
    if not rows:
        return "no divergence to localise", "differs", "the two runs never part, so there is nothing to localise"
    return measured, "confirmed", ("a divergence is localised: the stage where the states first differ, and the "
                                   "layer whose logit lens first favours the other run's token")


def _exp09(s: Summary) -> tuple[str, str, str]:
    measured = (f"{s.f('matrices')} matrices; largest spectral norm {s.f('max_spectral')}, largest excess "
                f"kurtosis {s.f('max_kurtosis')}")
    return measured, "measured", "descriptive statistics; the seed stated no claim about them"


def _exp10(s: Summary) -> tuple[str, str, str]:
    measured = (f"chain bitwise identical: {s.f('chain_identical')}; batch-invariant settings "
                f"{s.f('invariant_settings')} of {s.f('settings')}; KV cache bitwise equal in {s.f('kv_bitwise_equal')} "
                f"of {s.f('kv_checks')}; chain ratio ≤ {s.f('chain_ratio_max')} vs exact gain {s.f('chain_linear_gain')}")
    if not s["chain_identical"]:
        return measured, "differs", "the deterministic chain is not bit-reproducible on this machine"
    if s["kv_bitwise_equal"] < s["kv_checks"]:
        return measured, "confirmed", ("the chain is bit-reproducible, yet a KV-cached step is not bitwise the full "
                                       "recomputation: equality needs the same shapes, not just determinism")
    return measured, "confirmed", "the chain is bit-reproducible"


def _exp11(s: Summary) -> tuple[str, str, str]:
    measured = (f"{s.f('rotations')} rotations × jumps: {s.f('cells_input_changed')} of {s.f('cells')} move the "
                f"input row; the layer-0 output changes without an input change in {s.f('layer0_without_input')}")
    if s["layer0_without_input"] == 0:
        return measured, "differs", ("which coordinates move is decided by the float32 lattice of x0 under the rolled "
                                     "direction, and the layer-0 output changes only when the input row does")
    return measured, "confirmed", "the layer-0 output changes even where the input row does not"


def _exp12(s: Summary) -> tuple[str, str, str]:
    rays = s["rays"]
    same = s["rays_sout_eq_sin"]
    measured = (f"{s.f('rays')} rays: median s_out/s_in {s.f('median_sout_over_sin')}; the first input change "
                f"already changes the output on {s.f('rays_sout_eq_sin')} of them; the seed's bisection disagrees on "
                f"{s.f('bisect_disagreements')} of the {s.f('bisect_rays')} rays it searched")
    if same * 2 >= rays:
        return measured, "differs", ("the boundary is the input lattice: on most rays the output changes at the "
                                     "first float32 input change, a property of x0 and d, not of the network")
    return measured, "differs" if s["bisect_disagreements"] else "confirmed", (
        f"the output absorbs the first input changes (median s_out/s_in {s.f('median_sout_over_sin')})"
        + (f"; the seed's bisection misses the first change on {s.f('bisect_disagreements')} rays"
           if s["bisect_disagreements"] else ""))


def _exp13(s: Summary) -> tuple[str, str, str]:
    rho = s["spearman_sout_sigma"]
    measured = f"{s.f('vectors')} singular vectors; Spearman ρ(s_out, σ_i) = {s.f('spearman_sout_sigma')}"
    if abs(rho) < 0.3:
        return measured, "differs", "the boundary along v_i does not follow σ_i: it is set by x0's float32 lattice"
    return measured, "confirmed", "the boundary along v_i follows σ_i"


def _exp14(s: Summary) -> tuple[str, str, str]:
    measured = (f"{s.f('jumps')} output jumps in {s.f('steps')} steps; {s.f('input_changes')} steps move the input; "
                f"jumps without an input change: {s.f('unexplained_jumps')}")
    if s["unexplained_jumps"] == 0 and s["jumps"] < s["steps"]:
        return measured, "confirmed", ("the output is flat with rare jumps, each at a step where an input coordinate "
                                       "moved by one ULP")
    return measured, "differs", "output jumps occur where the float32 input did not change"


def _exp15(s: Summary) -> tuple[str, str, str]:
    jol = s["exp12_median_jump_over_linear"]
    measured = (f"median ‖Δh‖/‖Δx‖ = {s.f('exp12_median_amplification')} over {s.f('exp12_rays')} rays; "
                f"median ‖Δh‖/‖JΔx‖ = {s.f('exp12_median_jump_over_linear')}")
    if jol > 10:
        return measured, "differs", (f"the jump is {fmt(jol)}× the linear response ‖JΔx‖: a forward-pass rounding "
                                     "floor, not amplification of the input change")
    return measured, "confirmed", "the jump is the linear response of the input change"


def _fisher(s: Summary) -> tuple[str, str, str]:
    cos, rnd = s["median_abs_cos_exact_vs_seed"], s["median_abs_cos_random"]
    measured = (f"median |cos| of the seed's top eigenvector with the exact one {s.f('median_abs_cos_exact_vs_seed')} "
                f"(a random direction: {s.f('median_abs_cos_random')}); median λ exact/seed "
                f"{s.f('median_lambda_exact_over_seed')}")
    if cos < 0.9:
        return measured, "differs", ("the seed's Fisher (200 tokens of the unembedding, no final norm) is not the "
                                     "model's: its eigenvector is " + ("no closer than a random one" if cos <= 2 * rnd
                                                                       else "only partly aligned"))
    return measured, "confirmed", "the seed's approximation finds the exact top eigenvector"


def _levelsets(s: Summary) -> tuple[str, str, str]:
    cd = s["cos_seed_cd"]
    measured = (f"cos(analytic normal, seed's central difference) = {s.f('cos_seed_cd')}; with signed central "
                f"differences {s.f('cos_signed_cd')}; Newton reached the level set from {s.f('converged_newton')} "
                f"starts, Adam from {s.f('converged_adam')}")
    if cd is None or math.isnan(cd):
        return measured, "differs", ("the seed's central difference gives no normal at all: every x ± δe_i was already "
                                     "inside its tolerance band, so every component is zero")
    if cd < 0.9:
        return measured, "differs", "the seed's central-difference normal is not the normal of the level set"
    return measured, "confirmed", "the seed's central differences recover the normal"


def _linearity(s: Summary) -> tuple[str, str, str]:
    radius = s["radius"]
    measured = "; ".join(f"{k}: r = {fmt(v)} (curvature radius {fmt(s['curvature_radius'][k])})"
                         for k, v in radius.items())
    return measured, "measured", "a radius per scope; the seed reported none for these models"


def _lipschitz(s: Summary) -> tuple[str, str, str]:
    floor = s["floor_eps_v1"]
    measured = (f"σ1 = {s.f('sigma_1')} (d = {s.f('d')}); finite differences leave [σ1/2, 2σ1] below ε = "
                f"{s.f('floor_eps_v1')}; argmax flips {s.f('token_flips')}")
    if floor is not None and not math.isnan(floor):
        return measured, "differs", "as for Llama (exp02), small-ε finite differences measure the rounding floor"
    return measured, "confirmed", "finite differences agree with σ1"


def _injection(s: Summary) -> tuple[str, str, str]:
    m = s["max_logit_diff"]
    measured = (f"largest ‖Δlogits‖: " + ", ".join(f"{k} {fmt(v)}" for k, v in m.items())
                + f"; argmax flips {s.f('token_flips')} of {s.f('pairs')} model/dtype pairs × shifts")
    if max(m.values(), default=0.0) > 0:
        return measured, "confirmed", "an add-then-subtract that is exact in real arithmetic moves the logits"
    return measured, "differs", "the injection left the logits bit-identical"


def _wordpred(s: Summary) -> tuple[str, str, str]:
    measured = (f"{s.f('words')} words ({s.f('tokens')} tokens): the top-1 token is the word's first token for "
                f"{s.f('accuracy_first_token')} of them, the whole word for {s.f('accuracy_word')}; token perplexity "
                f"{s.f('token_perplexity')}; {s.f('token_forwards')} token-forwards")
    return measured, "measured", "the seed reported no figure for its document"


def _decomposition(s: Summary) -> tuple[str, str, str]:
    measured = f"superposition features recovered: {s.f('superposition_coverage')}"
    return measured, "measured", "the seed states the method, not a result to compare"


CLAIMS: dict[str, Claim] = {
    "exp01": Claim("For the 13 jumps [1,10,…,1e12], e2=E1+STEP·jump; CMP over all 33 hidden states at x0+E1·d vs "
                   "x0+e2·d (fp32, thr=0).", SPEC_DOC + " §1.B", _exp01),
    "exp02": Claim("exp2_v2 (P0, ε=1e-8, plots.ipynb): ‖Δf‖=1.0626e-4, so L=10625.9.", SPEC_DOC + " §5", _exp02),
    "exp03": Claim("It investigates the effect of float32 precision on perturbations and model behavior, and whether "
                   "it provides sufficient numerical precision.", SEED_DOC + ", Experiment 3", _exp03),
    "exp04": Claim("Hint: the exp4 examples use div=52 for Q1 (A5000 vs A6000).", SPEC_DOC + " §5", _exp04),
    "exp05": Claim("It computes layer-specific Jacobians and their Singular Value Decompositions (SVDs) to identify "
                   "which layers and submodules are most sensitive to perturbations in the input.",
                   SEED_DOC + ", Experiment 5", _exp05),
    "exp06": Claim("The first part focuses on finding a precise input embedding that forces the model to produce "
                   "equal logits (or probabilities) for its top two predicted next tokens.",
                   SEED_DOC + ", Experiment 6", _exp06),
    "exp07": Claim("Performs a statistical analysis on the .npz files to quantify the \"randomness\" or \"chaos\" "
                   "of the decision boundary.", SEED_DOC + ", Experiment 7 part 3", _exp07),
    "exp08": Claim("This script traces through the network layer-by-layer to identify WHERE the representation shift "
                   "occurs that eventually leads to different token predictions.", SEED_DOC + ", Experiment 8 part 4",
                   _exp08),
    "exp09": Claim("It computes various statistics like mean, standard deviation, norms, and distribution properties "
                   "for each layer and projection type.", SEED_DOC + ", Experiment 9", _exp09),
    "exp10": Claim("Compares two tensor files saved by part1 to check if they are bit-for-bit identical.",
                   SEED_DOC + ", Experiment 10 part 2", _exp10),
    "exp11": Claim("It analyzes how the number and location of changes in the model's internal representations are "
                   "affected by rotating the perturbation direction.", SEED_DOC + ", Experiment 11", _exp11),
    "exp12": Claim("it determines the maximum perturbation magnitude that doesn't change the model's hidden state "
                   "output. This reveals the directional sensitivity of the model to perturbations.",
                   SEED_DOC + ", Experiment 12", _exp12),
    "exp13": Claim("measuring the maximum perturbation magnitude along each individual singular vector direction "
                   "(all singular vectors, typically 4096) before the model's output changes.",
                   SEED_DOC + ", Experiment 13", _exp13),
    "exp14": Claim("Small steps (notebook; fp32 arithmetic, ε0=E1, δ=2e-14, 500 steps): only 6 nonzero consecutive "
                   "differences, at steps 2/42/82/105/235/497.", SPEC_DOC + " §5", _exp14),
    "exp15": Claim("This represents an amplification factor of approximately 10⁷ (10 million times)",
                   SEED_DOC + ", Experiment 15", _exp15),
    "fisher": Claim("Eigendecompose I(h) to find top eigenvector v with eigenvalue λ",
                    "seeds/002_f8f2424b2e43c093.txt", _fisher),
    "levelsets": Claim("we can compute the local normal vector using central differencing.",
                       "seeds/000_9ca43915ef49554d.txt", _levelsets),
    "linearity": Claim("The new tool measures the largest parameter‐space radius at which the model’s last-token logit "
                       "function remains approximately first-order linear.", "seeds/004_0e2b163a639e9096.txt",
                       _linearity),
    "lipschitz_gpt2": Claim("Computes the Lipschitz constant of the GPT-OSS model using Jacobian analysis and SVD.",
                            SEED_DOC + ", gpt_oss_lipschitz_const.py", _lipschitz),
    "rounding_injection": Claim("adds then subtracts c·1 (c=2^−10..2^5) on all tokens, a pure rounding injection.",
                                SPEC_DOC + " §1.G", _injection),
    "wordpred": Claim("Analyzes how well a language model predicts each word in a PDF document using preceding "
                      "context.", SEED_DOC + ", PDF word-by-word prediction", _wordpred),
    "decomposition": Claim("Our goal is to identify important directions (${u}$ or $U$) in parameter space of this "
                           "Hessian", "seeds/003_79b938440631b51b.txt", _decomposition),
}


def finding(experiment: str, run: Path | None) -> Finding:
    """The row of ``experiment`` from the finished run folder ``run`` (None: not run in this build)."""
    claim = CLAIMS[experiment]
    row = Finding(experiment, claim.seed, claim.source, run=run)
    if run is None:
        row.why = "no finished run in this build"
        return row
    manifest = json.loads((Path(run) / "manifest.json").read_text())
    s = Summary(manifest)
    try:
        row.measured, row.verdict, row.why = claim.judge(s)
    except KeyError as exc:  # a run from before the notebook recorded this figure
        row.measured, row.verdict = "–", "not run"
        row.why = f"{exc.args[0]}: re-run the notebook"
        return row  # no figure shown, so none listed
    row.values = dict(s.read)
    return row


def collect(runs: dict[str, list[Path]]) -> list[tuple[str, Finding]]:
    """(book key, Finding) per experiment of CLAIMS: ``runs`` maps each page's key to the run folders it finished,
    in book order; a run is matched by the experiment its manifest names (the last one when a page finished several).
    Experiments of CLAIMS that no page ran come last, as "not run"."""
    found: dict[str, tuple[str, Path]] = {}
    for key, folders in runs.items():
        for p in folders:
            f = Path(p) / "manifest.json"
            exp = json.loads(f.read_text()).get("experiment") if f.is_file() else None
            if exp in CLAIMS:
                found[exp] = (key, Path(p))
    rows = [(key, finding(exp, path)) for exp, (key, path) in found.items()]
    return rows + [(exp, finding(exp, None)) for exp in CLAIMS if exp not in found]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _short(source: str) -> str:
    """"seeds/001_4735f917868e62c2.txt, Experiment 12" -> "seed 001, Experiment 12"; "spec/experiments.md §5" -> "spec §5"."""
    doc, _, rest = source.partition(" §") if " §" in source else source.partition(", ")
    name = Path(doc).name
    short = f"seed {name.split('_')[0]}" if doc.startswith("seeds/") else "spec"
    return short + ((" §" if " §" in source else ", ") + rest if rest else "")


def page(rows: list[tuple[str, Finding]], pages: dict[str, str], model: str) -> str:
    """The markdown of the findings page. ``pages``: book key -> the experiment page's path from the page's folder."""
    counts = {v: sum(r.verdict == v for _, r in rows) for v in VERDICTS}
    docs = sorted({r.source.partition(" §")[0].partition(", ")[0] for _, r in rows})
    lines = [
        "# Findings", "",
        f"Generated by `instab book` from the results of this build (model: {model}); no number on this page is "
        "typed by hand. For each experiment: the verdict, what this build measured (read from the summary of the "
        "run's manifest; the small print names the run folder, under the results root, and the keys), and what the "
        "seed reported, quoted. **confirmed**: the seed's observation holds here; **differs**: it does not, and the "
        "line says why; **measured**: the seed made no claim to check; **not run**: no finished run in this build. "
        "Build the book on another model (`instab book -p model DIR`) and the figures change with it.", "",
        "Verdicts: " + ", ".join(f"{v} {n}" for v, n in counts.items() if n) + ". Sources, under `../shared/`: "
        + ", ".join(f"{_short(d)} = `{d}`" for d in docs) + ".", "",
        "| experiment | measured here | the seed reported |", "|---|---|---|"]
    for key, r in rows:
        name = f"[{r.experiment}]({pages[key]})" if key in pages else r.experiment
        where = (f"<br><small>from {r.run.parent.name}/{r.run.name}: {'; '.join(r.values)}</small>"
                 if r.run is not None else "")
        why = f"<br>*{_cell(r.why)}*" if r.why else ""
        lines.append(f"| {name}<br>**{r.verdict}** | {_cell(r.measured)}{why}{where} | “{_cell(r.seed)}” "
                     f"<small>({_cell(_short(r.source))})</small> |")
    return "\n".join(lines) + "\n"


def write_page(root: Path, runs: dict[str, list[Path]], pages: dict[str, str]) -> Path:
    """Write ``book/findings.md`` under ``root`` from the run folders of this build (``collect``'s ``runs``)."""
    rows = collect(runs)
    models = [json.loads((r.run / "manifest.json").read_text()).get("model") or {} for _, r in rows if r.run]
    names = sorted({str(m.get("model")) for m in models if m.get("model")})
    out = Path(root) / FINDINGS_PAGE
    out.write_text(page(rows, pages, ", ".join(f"`{n}`" for n in names) or "none"))
    return out
