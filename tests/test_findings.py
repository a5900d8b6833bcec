"""The findings page: verdicts follow the measured numbers, every number comes from a manifest, quotes are verbatim.

The page of the real built book is checked in tests/test_book.py (test_findings_page_*); these tests are fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from instab_core import findings as F

SHARED = REPO.parent / "shared"


def _run(tmp_path: Path, experiment: str, **summary) -> Path:
    folder = tmp_path / experiment / "run1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"experiment": experiment, "status": "complete",
                                                      "model": {"model": "m"}, "summary": summary}))
    return folder


def _exp12(tmp_path: Path, same: int) -> F.Finding:
    return F.finding("exp12", _run(tmp_path / str(same), "exp12", rays=24, rays_sout_eq_sin=same,
                                   median_sout_over_sin=1.5, bisect_disagreements=0, bisect_rays=8))


def test_verdict_follows_the_numbers(tmp_path: Path) -> None:
    """The same judge says "differs" or "confirmed" depending on what the run measured, never a fixed answer."""
    lattice, absorbed = _exp12(tmp_path, same=20), _exp12(tmp_path, same=2)
    assert lattice.verdict == "differs" and "input lattice" in lattice.why
    assert absorbed.verdict == "confirmed"
    floor = F.finding("exp15", _run(tmp_path / "a", "exp15", exp12_rays=8, exp12_median_amplification=3e7,
                                    exp12_median_jump_over_linear=5e3))
    linear = F.finding("exp15", _run(tmp_path / "b", "exp15", exp12_rays=8, exp12_median_amplification=600.0,
                                     exp12_median_jump_over_linear=1.2))
    assert (floor.verdict, linear.verdict) == ("differs", "confirmed")


def test_every_figure_on_a_row_is_a_manifest_value(tmp_path: Path) -> None:
    row = _exp12(tmp_path, same=20)
    assert row.values == {"rays": 24, "rays_sout_eq_sin": 20, "median_sout_over_sin": 1.5, "bisect_disagreements": 0,
                          "bisect_rays": 8}
    for v in row.values.values():
        assert F.fmt(v) in row.measured + row.why


def test_nested_keys_are_recorded_by_their_path(tmp_path: Path) -> None:
    run = _run(tmp_path, "exp06", method="root", gap=0.0, distance=0.25, converged=True, tokens=[" a", " b"],
               methods={"adam_geometric": {"distance": 0.5, "gap": 2.0, "exact_tie": False}})
    row = F.finding("exp06", run)
    assert row.values["methods.adam_geometric.gap"] == 2.0 and "2" in row.measured
    assert row.verdict == "confirmed" and "Adam does not reach it" in row.why


def test_a_run_without_the_figure_says_rerun(tmp_path: Path) -> None:
    row = F.finding("exp12", _run(tmp_path, "exp12", rays=24))
    assert row.verdict == "not run" and "re-run" in row.why and "rays_sout_eq_sin" in row.why


def test_page_lists_each_experiment_once_with_its_sources(tmp_path: Path) -> None:
    runs = {"exp12": [_run(tmp_path, "exp12", rays=4, rays_sout_eq_sin=4, median_sout_over_sin=1.0,
                           bisect_disagreements=1, bisect_rays=4)]}
    (tmp_path / "book").mkdir()
    page = F.write_page(tmp_path, runs, {"exp12": "experiments/exp12_polar_boundary.ipynb"}).read_text()
    table = [ln for ln in page.splitlines() if ln.startswith("| ") and not ln.startswith("| experiment")]
    assert len(table) == len(F.CLAIMS)
    assert table[0].startswith("| [exp12](experiments/exp12_polar_boundary.ipynb)<br>**differs** |")
    assert "<small>from exp12/run1: rays; " in table[0] and "(seed 001, Experiment 12)" in table[0]
    assert sum("**not run**" in ln for ln in table) == len(F.CLAIMS) - 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="the seed documents (../shared) are not beside this checkout")
@pytest.mark.parametrize("experiment", list(F.CLAIMS))
def test_seed_quote_is_verbatim(experiment: str) -> None:
    """Each quote appears in the document it cites (markdown emphasis and code marks aside)."""
    claim = F.CLAIMS[experiment]
    doc = (SHARED / claim.source.split(" §")[0].split(",")[0]).read_text()

    def plain(s: str) -> str:
        return " ".join(s.replace("*", "").replace("`", "").split())
    assert plain(claim.seed) in plain(doc)
