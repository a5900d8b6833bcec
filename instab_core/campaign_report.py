"""Reading a campaign's finished cells back and comparing them: the computations behind a campaign's report page.

``instab campaign report NAME`` executes ``nbs/_campaign_report.ipynb`` on a campaign folder; the notebook calls
these. Cells are read through the results store (:func:`instab_core.results.load_run`, hashes verified), never
recomputed.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import trace as tr
from .campaign import SPEC_FILE, CampaignError, cell_state
from .results import LoadedRun, load_run


@dataclass
class CampaignResults:
    """A campaign folder: its spec and one row per cell (``cells``), with the finished cells' runs."""

    folder: Path
    spec: dict[str, Any]
    cells: pd.DataFrame  # index: cell id; columns: the grid keys, label, state, seconds, error, run
    runs: dict[str, LoadedRun]  # cell id -> the cell's run of the campaign's experiment (finished cells)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def experiment(self) -> str:
        return self.spec["experiment"]

    @property
    def grid_keys(self) -> list[str]:
        return list(self.spec["grid"])

    def finished(self) -> list[str]:
        return list(self.runs)

    def label(self, cell_id: str) -> str:
        return str(self.cells.loc[cell_id, "label"])


def load(folder: str | os.PathLike) -> CampaignResults:
    """The campaign in ``folder`` (written by ``instab campaign run``)."""
    folder = Path(folder).expanduser().resolve()
    spec_file = folder / SPEC_FILE
    if not spec_file.is_file():
        raise CampaignError(f"{folder} is not a campaign folder (no {SPEC_FILE}): run `instab campaign run FILE` "
                            "first")
    spec = json.loads(spec_file.read_text())
    rows, runs = [], {}
    for cell in spec["cells"]:
        state, info = cell_state(folder, cell["id"])
        row = {"cell": cell["id"], **{k: _cell_text(v) for k, v in cell["values"].items()}, "label": cell["label"],
               "state": state, "seconds": (info or {}).get("seconds"), "error": (info or {}).get("error")}
        if state == "done":
            found = [p for p in info["results"] if Path(p).parent.name == spec["experiment"]]
            if len(found) != 1:
                raise CampaignError(f"cell {cell['id']} recorded {len(found)} {spec['experiment']} runs "
                                    f"({info['results']}); delete {folder / cell['id']} and run the campaign again")
            run_root = folder / cell["id"] / "results"
            runs[cell["id"]] = load_run(folder / cell["id"] / found[0], spec["experiment"], root=run_root)
        rows.append(row)
    cells = pd.DataFrame(rows).set_index("cell")
    return CampaignResults(folder, spec, cells, runs)


def _cell_text(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)


def overview(cr: CampaignResults) -> pd.DataFrame:
    """The cells: grid values, state, wall seconds, and the error of failed ones."""
    cols = cr.grid_keys + ["state", "seconds", "error"]
    return cr.cells[cols]


def summaries(cr: CampaignResults) -> pd.DataFrame:
    """Every finished cell's manifest summary (the scalar figures its notebook reported), one row per cell."""
    rows = {}
    for cell_id, run in cr.runs.items():
        summary = run.manifest.get("summary") or {}
        rows[cell_id] = {k: v for k, v in _flatten(summary).items() if isinstance(v, (int, float, str, bool))}
        rows[cell_id]["wall seconds"] = run.manifest.get("wall_seconds")
    table = pd.DataFrame.from_dict(rows, orient="index")
    return cr.cells.loc[list(rows), cr.grid_keys].join(table)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- boundary campaigns (exp12, exp13) --------------------------------------------------------------------


def boundaries(cr: CampaignResults) -> dict[str, dict[str, np.ndarray]]:
    """Cell id -> the cell's boundary arrays (theta or the direction index, s_in, s_out, absorbed, …)."""
    return {cell_id: run.arrays("boundary") for cell_id, run in cr.runs.items()}


def boundary_table(cr: CampaignResults) -> pd.DataFrame:
    """Per cell: rays, rays whose output changed within s_max, median s_in, s_out and absorbed input changes."""
    rows = {}
    for cell_id, b in boundaries(cr).items():
        s_out, s_in = b["s_out"], b["s_in"]
        rows[cell_id] = {"rays": len(s_out), "found": int(np.isfinite(s_out).sum()),
                         "median s_in": float(np.nanmedian(np.where(np.isfinite(s_in), s_in, np.nan))),
                         "median s_out": float(np.nanmedian(np.where(np.isfinite(s_out), s_out, np.nan))),
                         "median s_out / s_in": float(np.nanmedian(s_out / s_in)),
                         "median absorbed": float(np.median(b["absorbed"]))}
    return cr.cells.loc[list(rows), cr.grid_keys].join(pd.DataFrame.from_dict(rows, orient="index"))


# --- trace campaigns (exp04): which pairs of cells diverge, where ------------------------------------------


def traces(cr: CampaignResults, side: str = "A") -> dict[str, dict[str, tr.Trace]]:
    """Cell id -> {trace name ("q01", …) -> the cell's trace of setting ``side``}."""
    out = {}
    for cell_id, run in cr.runs.items():
        folder = run.path / "traces"
        out[cell_id] = {p.name.removesuffix(f"_{side}"): tr.Trace(p)
                        for p in sorted(folder.glob(f"q*_{side}")) if p.is_dir()}
    return out


def trace_pairs(cr: CampaignResults, side: str = "A") -> pd.DataFrame:
    """Every pair of cells × every question both captured: where their traces part.

    Columns: cell_a, cell_b, question, divergence step (first token that differs), first step with any
    bitwise-different state, the first stage (network order) that differs at that step, and at the divergence.
    """
    got = traces(cr, side)
    rows = []
    for a, b in itertools.combinations(got, 2):
        for q in sorted(set(got[a]) & set(got[b])):
            comp = tr.compare(got[a][q], got[b][q])
            first = tr.first_differing_step(comp)
            rows.append({"cell_a": a, "cell_b": b, "question": q, "divergence step": comp.divergence,
                         "steps compared": comp.last_step + 1, "first differing step": first,
                         "first differing stage": None if first is None else tr.first_difference(comp, first),
                         "stage differing at divergence": (None if comp.divergence is None
                                                           else tr.first_difference(comp, comp.divergence))})
    return pd.DataFrame(rows)


def divergence_matrix(cr: CampaignResults, pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(questions that diverge, earliest divergence step) as cell × cell tables, labelled by the cells' values."""
    ids = cr.finished()
    count = pd.DataFrame(0, index=ids, columns=ids, dtype=float)
    earliest = pd.DataFrame(np.nan, index=ids, columns=ids)
    for (a, b), g in pairs.groupby(["cell_a", "cell_b"]):
        steps = g["divergence step"].dropna()
        for x, y in ((a, b), (b, a)):
            count.loc[x, y] = len(steps)
            earliest.loc[x, y] = steps.min() if len(steps) else np.nan
    labels = [cr.label(i) for i in ids]
    count.index = count.columns = earliest.index = earliest.columns = labels
    return count, earliest


def determinism(cr: CampaignResults, pairs: pd.DataFrame, side: str = "A") -> pd.DataFrame:
    """Per question, over the cells' greedy completions (one per cell): how many are unique, the first step at
    which any two part, the first step at which any captured state differs, and the first stage differing there."""
    got = traces(cr, side)
    rows = []
    for q in sorted({name for per in got.values() for name in per}):
        have = {c: per[q] for c, per in got.items() if q in per}
        unique = len({tuple(t.tokens.tolist()) for t in have.values()})
        sub = pairs[pairs.question == q]
        diff = sub.dropna(subset=["first differing step"])
        first = diff.loc[diff["first differing step"].idxmin()] if len(diff) else None
        rows.append({"question": q, "completions": len(have), "unique": unique,
                     "first parting token": sub["divergence step"].min() if len(sub) else np.nan,
                     "first differing step": None if first is None else int(first["first differing step"]),
                     "first differing stage": None if first is None else first["first differing stage"]})
    return pd.DataFrame(rows).set_index("question")


def against_first_cell(cr: CampaignResults, pairs: pd.DataFrame) -> pd.DataFrame:
    """cell × question: the step at which each cell's tokens part from the first cell's (NaN: never)."""
    ref = cr.finished()[0]
    sub = pairs[(pairs.cell_a == ref) | (pairs.cell_b == ref)].copy()
    sub["cell"] = np.where(sub.cell_a == ref, sub.cell_b, sub.cell_a)
    table = sub.pivot(index="cell", columns="question", values="divergence step").astype(float)
    table = table.reindex([c for c in cr.finished() if c != ref])
    table.index = [cr.label(c) for c in table.index]
    return table
