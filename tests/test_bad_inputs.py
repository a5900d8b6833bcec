"""Every bad input gets a non-zero exit and one line that names the parameter or the file, with no traceback.

The table below is the README's list of bad inputs. Command-line rows run ``instab`` in process; notebook rows
(slow) run ``instab run`` in a scratch copy of the checkout, never in the user's book/experiments/ or results/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import load_file, save_file

import instab_core as ic
from conftest import REPO, scratch_checkout, snapshot
from instab_core import params as P
from instab_core.cli import main
from instab_core.models import BUNDLED
from randmodels import random_model_dir


def _one_line(text: str) -> str:
    """The one message line of ``text``; papermill's progress bar ("Executing: …", redrawn with \r) is not a message."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Executing:")]
    assert "Traceback" not in text, text
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Inputs the table refers to by name: model folders, trace folders, configs, documents."""
    tmp = tmp_path_factory.mktemp("bad")
    f: dict[str, str] = {"tmp": str(tmp)}
    bad_cfg = random_model_dir(tmp / "bad-config", "llama")
    cfg = json.loads((bad_cfg / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    f["bad_config"] = str(bad_cfg)
    remote = random_model_dir(tmp / "remote", "llama")
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="mystery_lm", architectures=["MysteryForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (remote / "config.json").write_text(json.dumps(cfg))
    f["remote"] = str(remote)
    other = tmp / "other"  # tiny-llama with one weight changed: same tokenizer, other weights hash
    shutil.copytree(BUNDLED["tiny-llama"], other)
    weights = next(other.glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    for name, prompt, model in (("a", "The capital of France is", "tiny-llama"),
                                ("b", "The capital of France is", "tiny-llama"),
                                ("other_prompt", "Water boils at", "tiny-llama"),
                                ("other_weights", "The capital of France is", str(other))):
        assert main(["capture", prompt, "--out", str(tmp / name), "--steps", "3", "--model", model]) == 0
        f[name] = str(tmp / name)
    shutil.copytree(tmp / "b", tmp / "chunk")
    chunk = next((tmp / "chunk" / "steps").glob("*.npz"))
    chunk.write_bytes(chunk.read_bytes()[:60])
    f["chunk"], f["chunk_file"] = str(tmp / "chunk"), chunk.name
    shutil.copytree(tmp / "b", tmp / "incomplete")
    m = json.loads((tmp / "incomplete" / "manifest.json").read_text())
    m["complete"] = False
    (tmp / "incomplete" / "manifest.json").write_text(json.dumps(m))
    f["incomplete"] = str(tmp / "incomplete")
    (tmp / "no_model.yaml").write_text("prompts: [The capital of France is]\nradii: [0.1]\n")
    (tmp / "no_prompts.yaml").write_text("model: tiny-llama\nradii: [0.1]\n")
    f["no_model"], f["no_prompts"] = str(tmp / "no_model.yaml"), str(tmp / "no_prompts.yaml")
    return f


# (what, argv with {placeholders} from `files`, exit status, words the one line must contain)
CLI_CASES = [
    ("unknown experiment", ["run", "nope"], 2, ["nope", "exp12"]),
    ("typo in a parameter name", ["run", "exp12", "-p", "num_angle", "10"], 2, ["num_angle", "did you mean 'num_angles'"]),
    ("text for an int", ["run", "exp12", "-p", "num_angles", "ten"], 2, ["num_angles", "int", "ten"]),
    ("float position", ["run", "exp12", "-p", "position", "2.5"], 2, ["position", "int", "2.5"]),
    ("list for a float", ["run", "exp12", "-p", "s_max", "[1]"], 2, ["s_max", "float"]),
    ("unknown profile", ["run", "exp12", "--profile", "huge"], 2, ["huge", "smoke"]),
    ("parameters of an unknown experiment", ["params", "exp99"], 2, ["exp99"]),
    ("missing model path", ["capture", "x", "--out", "{tmp}/t1", "--model", "/nonexistent/model"], 2,
     ["/nonexistent/model"]),
    ("hub id without network", ["capture", "x", "--out", "{tmp}/t2", "--model", "meta-llama/Llama-3.1-8B"], 2,
     ["not in the local Hugging Face cache", "pass that directory"]),
    ("remote-code model", ["capture", "x", "--out", "{tmp}/t3", "--model", "{remote}"], 2, ["mystery_lm"]),
    ("config.json with a wrong field type", ["capture", "x", "--out", "{tmp}/t4", "--model", "{bad_config}"], 2,
     ["config.json", "num_hidden_layers"]),
    ("empty prompt", ["capture", "", "--out", "{tmp}/t5"], 2, ["prompt"]),
    ("cuda without CUDA", ["capture", "x", "--out", "{tmp}/t6", "--device", "cuda"], 2, ["cuda"]),
    ("unsupported dtype", ["capture", "x", "--out", "{tmp}/t7", "--dtype", "float8"], 2, ["float8"]),
    ("compare: different prompts", ["compare", "{a}", "{other_prompt}", "--no-model"], 2, ["prompt"]),
    ("compare: different weights", ["compare", "{a}", "{other_weights}", "--no-model"], 2, ["weights"]),
    ("compare: incomplete trace", ["compare", "{a}", "{incomplete}", "--no-model"], 2, ["incomplete"]),
    ("compare: truncated chunk", ["compare", "{a}", "{chunk}", "--no-model"], 2, ["{chunk_file}", "capture it again"]),
    ("compare: not a trace folder", ["compare", "{a}", "{tmp}", "--no-model"], 2, ["not a trace folder"]),
    ("analyze-logits: missing config", ["analyze-logits", "{tmp}/none.yaml"], 2, ["none.yaml"]),
    ("analyze-logits: no model key", ["analyze-logits", "{no_model}"], 2, ["'model'"]),
    ("analyze-logits: no prompts key", ["analyze-logits", "{no_prompts}"], 2, ["'prompts'"]),
]


@pytest.mark.parametrize("what,argv,status,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line(files, capsys, monkeypatch, what, argv, status, words):
    monkeypatch.chdir(REPO)
    argv = [a.format(**files) for a in argv]
    assert main(argv) == status, what
    out = capsys.readouterr()
    line = _one_line(out.err)
    for w in words:
        assert w.format(**files) in line, f"{what}: {w!r} not in {line!r}"


def _probe(h, **kw):
    return ic.Probe(h, **{"text": "The capital of France is", **kw})


def _boundary(h, **kw):
    probe = _probe(h, batch_size=4)
    D = torch.nn.functional.normalize(torch.randn(2, probe.d), dim=1)
    return ic.boundary.first_output_change(probe, D, **{"s_max": 1e-6, "progress": False, **kw})


# (what, call on the bundled tiny-llama handle, words the one-line message must contain)
API_CASES = [
    ("empty prompt", lambda h, tmp: _probe(h, text=""), ["prompt"]),
    ("position out of range", lambda h, tmp: _probe(h, position=99), ["position 99"]),
    ("prompt longer than the model's positions", lambda h, tmp: _probe(h, text="the cat sat. " * 200), ["positions"]),
    ("unknown target", lambda h, tmp: _probe(h, target="middle"), ["middle"]),
    ("s_max <= 0", lambda h, tmp: _boundary(h, s_max=0.0), ["s_max"]),
    ("s_max inf", lambda h, tmp: _boundary(h, s_max=float("inf")), ["s_max"]),
    ("s_max nan", lambda h, tmp: _boundary(h, s_max=float("nan")), ["s_max"]),
    ("s_max below the first input change", lambda h, tmp: _boundary(h, s_max=1e-30), ["s_max", "raise s_max"]),
    ("negative threshold", lambda h, tmp: _boundary(h, threshold=-1.0), ["threshold"]),
    ("non-finite direction", lambda h, tmp: ic.boundary.first_output_change(
        _probe(h, batch_size=4), torch.full((1, h.d_model), float("nan")), progress=False), ["non-finite"]),
    ("document: missing file", lambda h, tmp: ic.wordpred.read_document(tmp / "absent.pdf"), ["absent.pdf"]),
    ("document: binary, not text", lambda h, tmp: ic.wordpred.read_document(_write(tmp / "x.bin", b"\xff\xfe\x00")),
     ["x.bin", "UTF-8"]),
    ("document: not a PDF", lambda h, tmp: ic.wordpred.read_document(_write(tmp / "fake.pdf", b"hello")),
     ["fake.pdf"]),
    ("document: empty PDF", lambda h, tmp: ic.wordpred.read_document(_blank_pdf(tmp / "e.pdf")),
     ["e.pdf", "no extractable text"]),
    ("document: empty text", lambda h, tmp: ic.wordpred.read_document(_write(tmp / "e.txt", b"  \n")),
     ["e.txt", "empty"]),
    ("unknown parameter (Python)", lambda h, tmp: P.check("exp12", REPO / "nbs/exp12_polar_boundary.ipynb",
                                                         {"s_maxx": 1.0}), ["s_maxx", "s_max"]),
]


def _blank_pdf(path: Path) -> Path:
    from pypdf import PdfWriter
    w = PdfWriter()
    w.add_blank_page(width=200, height=200)
    with open(path, "wb") as fh:
        w.write(fh)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tiny():
    return ic.load_model("tiny-llama")


@pytest.mark.parametrize("what,call,words", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api(tiny, tmp_path, what, call, words):
    with pytest.raises(ValueError) as exc:
        call(tiny, tmp_path)
    line = _one_line(str(exc.value))
    for w in words:
        assert w in line, f"{what}: {w!r} not in {line!r}"


def test_cli_values_take_the_parameters_declared_type():
    src = REPO / "nbs/exp12_polar_boundary.ipynb"
    assert P.check("exp12", src, {"text": 2024}, raw={"text": "2024"}) == {"text": "2024"}  # a str parameter
    assert P.check("exp12", src, {"s_max": 1}) == {"s_max": 1.0} and type(P.check("exp12", src, {"s_max": 1})["s_max"]) is float
    with pytest.raises(P.ParameterError, match="'bisect_rays' takes int"):
        P.check("exp12", src, {"bisect_rays": 1.5})
    wp = REPO / "nbs/wordpred_document.ipynb"
    assert P.check("wordpred", wp, {"context": None, "path": "/doc.pdf"}) == {"context": None, "path": "/doc.pdf"}


def test_every_profile_of_every_notebook_passes_the_checks():
    from instab_core import book
    for name, src in book.experiments(REPO).items():
        for profile, values in P.profiles(src).items():
            P.check(name, src, values)  # raises, naming the notebook and parameter, if a profile is stale


def test_papermill_reads_every_parameters_cell(caplog):
    """papermill's own parser (``papermill --help-notebook``) reads every line of every parameters cell without a
    warning: it gives up on a line whose comment holds '=' and then warns on every run that sets that parameter.
    (It skips lines with union annotations silently; instab_core.params reads those.)"""
    import logging

    import nbformat
    from papermill.translators import PythonTranslator

    from instab_core import book
    for name, src in book.experiments(REPO).items():
        cell = next(c for c in nbformat.read(src, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        with caplog.at_level(logging.WARNING, logger="papermill"):
            caplog.clear()
            PythonTranslator.inspect(cell)
        assert not caplog.records, f"{name}: {caplog.records[0].getMessage()}"


# --- through the notebooks (slow): the kernel's message reaches the command line as one line -------------

@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return scratch_checkout(tmp_path_factory.mktemp("checkout"))


NOTEBOOK_CASES = [
    ("empty prompt", ["-p", "text", ""], ["prompt"]),
    ("position out of range", ["-p", "position", "99"], ["position 99"]),
    ("negative threshold", ["-p", "threshold", "-1"], ["threshold"]),
    ("s_max below the first input change", ["-p", "s_max", "1e-30"], ["s_max"]),
    ("missing model path", ["-p", "model", "/nonexistent/model"], ["/nonexistent/model"]),
]


def test_papermill_does_not_call_a_declared_union_parameter_unknown(tmp_path, caplog):
    """papermill's parser skips ``layers: str | None = None`` and so warns "Passed unknown parameter: layers" on a
    run that sets it, though it injects it; book.execute drops that warning for the names the cell declares, and
    keeps it for a name the cell does not declare."""
    import logging

    import nbformat

    from instab_core import book
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    cell = nbformat.v4.new_code_cell("layers: str | list[int] | None = None  # a union papermill cannot parse")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print(repr(layers))")]
    src = tmp_path / "union.ipynb"
    nbformat.write(nb, src)
    with caplog.at_level(logging.WARNING, logger="papermill"):
        ok, error, _ = book.execute(src, tmp_path / "out.ipynb", {"layers": "0,last", "undeclared": 1}, tmp_path)
    assert ok, error
    warned = [r.getMessage() for r in caplog.records if "Passed unknown parameter" in r.getMessage()]
    assert warned == ["Passed unknown parameter: undeclared"]
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[-1].outputs[0]["text"].strip() == "'0,last'"  # injected all the same
    assert not logging.getLogger("papermill").filters


@pytest.mark.slow
@pytest.mark.parametrize("what,extra,words", NOTEBOOK_CASES, ids=[c[0] for c in NOTEBOOK_CASES])
def test_notebook_failure_is_one_line(checkout, tmp_path, capsys, monkeypatch, what, extra, words):
    monkeypatch.chdir(checkout)
    assert main(["run", "exp12", "--smoke", "--results", str(tmp_path), *extra]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "partly executed notebook" in line
    for w in words:
        assert w in line, f"{what}: {w!r} not in {line!r}"


@pytest.mark.slow
def test_corrupted_upstream_is_refused_downstream(checkout, tmp_path, capsys, monkeypatch):
    """exp12's directions.npz scaled by 10 (a valid file, the manifest's hash now stale): exp15 refuses to run."""
    monkeypatch.chdir(checkout)
    assert main(["run", "exp12", "--smoke", "--results", str(tmp_path), "-p", "bisect_rays", "0",
                 "-p", "batch1_rays", "0"]) == 0
    (folder,) = (tmp_path / "exp12").iterdir()
    f = folder / "directions.npz"
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["S"] = arrays["S"] * 10
    with open(f, "wb") as fh:
        np.savez(fh, **arrays)
    capsys.readouterr()
    assert main(["run", "exp15", "--results", str(tmp_path), "-p", "exp13_run", ""]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "directions.npz does not match the hash its manifest recorded" in line and "re-run exp12" in line
    assert not (tmp_path / "exp15").exists() or not any(
        p.is_dir() and not p.name.endswith(".partial") for p in (tmp_path / "exp15").iterdir())


@pytest.mark.slow
def test_two_runs_at_once_never_share_a_folder(checkout, tmp_path):
    """Two `instab run exp12` with the same parameters started together: both finish, in their own results
    folders, and the executed notebook is one whole notebook (the second waited for the first)."""
    cmd = [str(Path(sys.executable).parent / "instab"), "run", "exp12", "--smoke", "--results", str(tmp_path),
           "-p", "bisect_rays", "0", "-p", "batch1_rays", "0"]
    procs = [subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = sorted(p for p in (tmp_path / "exp12").iterdir())
    assert len(folders) == 2 and not any(p.name.endswith(".partial") for p in folders), folders
    for folder in folders:
        ic.results.load_run(folder, "exp12")  # complete, hashes verified
    import nbformat
    nb = nbformat.read(checkout / "book/experiments/exp12_polar_boundary.ipynb", as_version=4)
    assert not nb.metadata["papermill"].get("exception")
    assert any("waiting: another run is writing" in o[1] for o in outs)


def _trimmed_checkout(dest: Path, src: Path, stem: str) -> Path:
    """A checkout whose book has one experiment page (keeps the build to seconds)."""
    root = scratch_checkout(dest, src)
    shutil.rmtree(root / "examples")  # no book campaign either
    for nb in (root / "nbs").glob("*.ipynb"):
        if nb.stem != stem:
            nb.unlink()
    (root / "_toc.yml").write_text(f"format: jb-book\nroot: book/intro\nchapters:\n  - file: book/method\n"
                                   f"  - file: book/experiments/{stem}\n")
    return root


def _hashes(root: Path) -> dict[str, str]:
    import hashlib
    return {k: hashlib.sha256((root / k).read_bytes()).hexdigest() for k in snapshot(root)}


@pytest.mark.slow
def test_a_test_build_leaves_the_users_book_unchanged(tmp_path):
    """A user's `make book`, then the test suite's way of building: the user's book and results stay bit for bit."""
    from instab_core import book
    stem = "exp03_precision"
    user = _trimmed_checkout(tmp_path / "user", REPO, stem)
    smoke = {"exp03": book.smoke_parameters("exp03", user)}
    mine = book.build_book_report(user, parameters_for=smoke)  # results go to the user's results/
    assert mine.returncode == 0, mine.problems
    before = _hashes(user)
    assert any(k.startswith("_build/") for k in before) and any(k.startswith("results/") for k in before)
    assert any(k.startswith("book/experiments/") for k in before)
    scratch = scratch_checkout(tmp_path / "scratch", user)  # what the built_book fixture does
    assert book.build_book_report(scratch, parameters_for=smoke, results_root=tmp_path / "r").returncode == 0
    assert _hashes(user) == before
