"""Campaigns: bad files are refused before anything runs; cells resume; Ray and the local pool agree bit for bit.

The slow tests reuse the book's example campaign (examples/boundary_dtypes.yaml, 4 cells of exp12) that the
``built_book`` fixture ran in its scratch checkout, as the uninterrupted reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from instab_core import campaign as C
from instab_core import campaign_report as CR
from instab_core.cli import main
from randmodels import random_model_dir

GOOD = {"name": "t", "experiment": "exp12", "profile": "smoke", "parameters": {"bisect_rays": 0},
        "grid": {"dtype": ["float32", "float64"], "text": ["a b c", "d e f"]}}


def _doc(**change) -> dict:
    doc = json.loads(json.dumps(GOOD))
    for k, v in change.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    return doc


BAD = [  # (what, document, words the one-line message must hold)
    ("unknown experiment", _doc(experiment="exp99"), ["experiment:", "exp99", "known:"]),
    ("unknown parameter under parameters", _doc(parameters={"num_angle": 3}),
     ["parameters:", "num_angle", "did you mean 'num_angles'"]),
    ("unknown parameter in the grid", _doc(grid={"dtyp": ["float32"]}), ["grid.dtyp", "did you mean 'dtype'"]),
    ("an empty grid", _doc(grid={}), ["grid:", "is empty"]),
    ("no grid", _doc(grid=None), ["'grid' is missing"]),
    ("a grid key with no values", _doc(grid={"dtype": []}), ["grid.dtype", "empty list"]),
    ("a grid value that is not a list", _doc(grid={"dtype": "float32"}), ["grid.dtype", "must be a list"]),
    ("a value of the wrong type", _doc(grid={"num_angles": [8, "many"]}), ["grid.num_angles", "takes int", "many"]),
    ("a key in both places", _doc(parameters={"dtype": "float32"}), ["grid.dtype", "also set under parameters"]),
    ("an unknown top-level key", {**GOOD, "gird": {}}, ["gird", "did you mean 'grid'"]),
    ("an unknown profile", _doc(profile="huge"), ["profile:", "huge", "smoke"]),
    ("an unknown backend", _doc(backend="slurm"), ["backend:", "slurm"]),
    ("zero workers", _doc(workers=0), ["workers:", "positive"]),
    ("an unknown model", _doc(grid={"model": ["tiny-llama", "no-such-model"]}), ["grid.model", "no-such-model"]),
    ("a hub id", _doc(grid={"model": ["meta-llama/Llama-3.1-8B"]}), ["grid.model", "not a local directory"]),
    ("a bad name", _doc(name="my campaign/1"), ["name:", "folder name"]),
    ("a placement key without Ray", _doc(grid={"accelerator_type": ["H100", "A100"]}),
     ["grid.accelerator_type", "backend: ray"]),
]


@pytest.mark.parametrize("what,doc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_campaign_file_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch, what, doc, words):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(REPO)
    assert main(["campaign", "run", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(f) in err, err
    for w in words:
        assert w in err, (what, err)
    assert not (tmp_path / "out").exists(), "nothing may run (or be created) for a bad file"


def test_missing_file_and_bad_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["campaign", "run", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert main(["campaign", "status", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cells_are_the_cross_product_with_ids_from_notebook_parameters_and_weights(tmp_path):
    c = C.from_dict(_doc(), root=REPO, folder=tmp_path)
    assert [cell.values for cell in c.cells] == [{"dtype": d, "text": t} for d in ("float32", "float64")
                                                 for t in ("a b c", "d e f")]
    assert c.cells[0].parameters["num_angles"] == 24  # the smoke profile, then parameters, then the grid
    assert c.cells[0].parameters["bisect_rays"] == 0
    again = C.from_dict(_doc(), root=REPO, folder=tmp_path)
    assert [x.id for x in again.cells] == [x.id for x in c.cells], "ids are stable"
    assert len({x.id for x in c.cells}) == 4
    other = C.from_dict(_doc(parameters={"bisect_rays": 4}), root=REPO, folder=tmp_path)
    assert not {x.id for x in other.cells} & {x.id for x in c.cells}, "a parameter change makes new cells"


def test_new_weights_in_the_same_model_folder_make_new_cells(tmp_path):
    model = random_model_dir(tmp_path / "m", "llama", seed=1)
    doc = _doc(parameters={"bisect_rays": 0, "model": str(model)})
    before = C.from_dict(doc, root=REPO, folder=tmp_path / "f").cells
    random_model_dir(tmp_path / "m", "llama", seed=2)  # same path, same parameters, other weights
    after = C.from_dict(doc, root=REPO, folder=tmp_path / "f").cells
    assert not {x.id for x in before} & {x.id for x in after}


def test_accelerator_type_places_cells_without_becoming_a_parameter(tmp_path):
    doc = _doc(grid={"accelerator_type": ["H100", "A100"], "dtype": ["float32"]}, backend="ray")
    cells = C.from_dict(doc, root=REPO, folder=tmp_path).cells
    assert [c.placement for c in cells] == [{"accelerator_type": "H100"}, {"accelerator_type": "A100"}]
    assert all("accelerator_type" not in c.parameters for c in cells) and cells[0].id != cells[1].id


def test_notebook_content_is_part_of_the_cell_id(tmp_path):
    from conftest import scratch_checkout
    root = scratch_checkout(tmp_path / "co")
    before = C.from_dict(_doc(), root=root, folder=tmp_path / "f").cells
    nb = root / "nbs" / "exp12_polar_boundary.ipynb"
    nb.write_text(nb.read_text().replace("Polar stability boundary", "Polar stability boundary (edited)", 1))
    after = C.from_dict(_doc(), root=root, folder=tmp_path / "f").cells
    assert not {x.id for x in before} & {x.id for x in after}


# --- running campaigns (slow) -----------------------------------------------------------------------------


def _arrays(cell_folder: Path) -> dict[str, bytes]:
    """Every array of the cell's exp12 run, as exact bytes with dtype and shape."""
    out = {}
    for f in sorted((cell_folder / "results").rglob("*.npz")):
        with np.load(f) as z:
            for k in z.files:
                out[f"{f.name}:{k}"] = (z[k].dtype.str, z[k].shape, z[k].tobytes())
    assert out, f"no arrays under {cell_folder}"
    return out


@pytest.fixture(scope="module")
def reference(built_book):
    """The book's example campaign, run uninterrupted on the local backend by `instab book` (2 workers)."""
    run = built_book.campaigns["boundary-dtypes"]
    assert run.ok, run.error
    c = C.load(built_book.root / "examples" / "boundary_dtypes.yaml", root=built_book.root)
    assert all(C.cell_state(c.folder, cell.id)[0] == "done" for cell in c.cells)
    return c


def _variant(reference: C.Campaign, tmp_path: Path, **change) -> Path:
    """The reference's file with some keys changed, written to tmp_path (same cells: same ids)."""
    doc = yaml.safe_load(reference.source.read_text())
    doc.update(change)
    f = tmp_path / "campaign.yaml"
    f.write_text(yaml.safe_dump(doc, sort_keys=False))  # the grid's key order is the cells' order
    return f


def _same_results(a: C.Campaign, b_folder: Path) -> None:
    for cell in a.cells:
        assert _arrays(a.folder / cell.id) == _arrays(b_folder / cell.id), f"cell {cell.id} ({cell.label}) differs"


def _wait_until_gone(pgid: int, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"process group {pgid} survived SIGKILL"
        time.sleep(0.1)


@pytest.mark.slow
def test_interrupted_campaign_resumes_exactly_the_unfinished_cells_on_ray_with_the_local_bits(reference, tmp_path):
    """SIGKILL a local campaign (driver, worker and kernel) while its second cell runs; resume it on the Ray backend
    (a local Ray instance, each cell shipped back as bytes): exactly the three unfinished cells run, and every
    cell's arrays equal the uninterrupted local campaign's bit for bit — the local pool and Ray give the same
    bits, and a resumed campaign gives the uninterrupted one's."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]' (make test does)")
    threads = C.threads_per_cell(reference)  # the thread count changes the bits: keep the reference's
    f = _variant(reference, tmp_path, workers=1, threads=threads)
    out = tmp_path / "out"
    cells = C.load(f, root=reference.root, folder=out).cells
    assert [c.id for c in cells] == [c.id for c in reference.cells]
    cmd = [sys.executable, "-m", "instab_core.cli", "campaign", "run", str(f), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=reference.root, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first, second = cells[0].id, cells[1].id
    deadline = time.time() + 300
    while not (out / first / C.CELL_FILE).is_file() or C.cell_state(out, second)[0] != "running":
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the campaign did not reach its second cell in 5 minutes"
        time.sleep(0.2)
    time.sleep(3)  # well inside the second cell (a cell takes ~10 s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_until_gone(proc.pid)  # the cell's process too (its flock goes with it)
    states = {cell.id: C.cell_state(out, cell.id)[0] for cell in cells}
    assert list(states.values()) == ["done", "interrupted", "pending", "pending"], states
    assert not (out / second).exists(), "an interrupted cell never looks finished"
    finished = (out / first / C.CELL_FILE).read_bytes()

    f2 = _variant(reference, tmp_path, workers=2, threads=threads, backend="ray", ray={"transfer": "bytes"})
    again = C.run(C.load(f2, root=reference.root, folder=out), progress=False)
    assert again.skipped == [first]
    assert sorted(again.outcomes) == sorted(c.id for c in cells[1:]) and not again.failed, again.outcomes
    assert {o["torch_threads"] for o in again.outcomes.values()} == {threads}
    assert (out / first / C.CELL_FILE).read_bytes() == finished, "a finished cell is never run again"
    assert not list(out.glob("*.partial"))
    _same_results(reference, out)


@pytest.mark.slow
def test_a_failed_cell_does_not_stop_the_others_and_is_rerun(tmp_path, capsys, monkeypatch):
    doc = {"name": "t", "experiment": "exp03", "profile": "smoke", "grid": {"position": [0, 99]}, "workers": 2}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    monkeypatch.chdir(REPO)
    assert main(["campaign", "run", str(f), "--out", str(out)]) == 1
    assert main(["campaign", "status", str(f), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 done, 1 failed" in text and "position" in text and "out of range" in text, text
    c = C.load(f, root=REPO, folder=out)
    ok_id, bad_id = c.cells[0].id, c.cells[1].id
    stamp = (out / ok_id / C.CELL_FILE).read_bytes()
    again = C.run(c, progress=False)
    assert again.skipped == [ok_id] and list(again.outcomes) == [bad_id]  # only the failed cell runs again
    assert (out / ok_id / C.CELL_FILE).read_bytes() == stamp


@pytest.mark.slow
def test_report_compares_the_cells(built_book, reference):
    """The report page `instab book` wrote for the example campaign: its menu, figure and table are the cells'."""
    import nbformat
    nb = nbformat.read(built_book.campaigns["boundary-dtypes"].executed, as_version=4)
    assert nb.cells[0].source.startswith("# Campaign boundary-dtypes — exp12")
    assert not nb.metadata["papermill"].get("exception")
    figures = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    polar = figures[0]["data"]["application/vnd.plotly.v1+json"]
    assert len(polar["data"]) == 8  # s_out and s_in for each of 4 cells
    menu = polar["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in menu] == ["all"] + [cell.label for cell in reference.cells]
    table = CR.boundary_table(CR.load(reference.folder))
    b = CR.boundaries(CR.load(reference.folder))
    for cell in reference.cells:  # the table is the cells' own arrays, summarised
        s_out = b[cell.id]["s_out"]
        assert table.loc[cell.id, "median s_out"] == np.nanmedian(np.where(np.isfinite(s_out), s_out, np.nan))
        assert table.loc[cell.id, "rays"] == 48


@pytest.mark.slow
def test_campaign_page_is_in_the_book_and_renders_offline(built_book, rendered):
    page = built_book.campaign_page("boundary-dtypes")
    assert page.is_file(), page
    seen = rendered(page)
    assert not seen.external, seen.external
    figures = built_book.figures["campaign boundary-dtypes"]
    assert figures >= 1
    assert seen.dom.count('class="plotly-graph-div js-plotly-plot"') == figures
    assert "updatemenu" in seen.dom  # the per-cell menu was drawn
