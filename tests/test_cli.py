"""The ``instab`` command: models, parameter parsing, clear errors, the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instab_core import book
from instab_core.cli import main, parse_value
from instab_core.models import BUNDLED

REPO = Path(__file__).resolve().parents[1]


def test_models_lists_both_bundled_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name, path in BUNDLED.items():
        assert name in lines, out
        if (path / "config.json").is_file():
            arch = json.loads((path / "config.json").read_text())["architectures"][0]
            assert arch in lines[name]
        else:
            assert "missing" in lines[name]
    assert "/path/to/model" in out  # says that any local directory works too


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("-7", -7), ("1e-6", 1e-6), ("0.25", 0.25), ("true", True), ("False", False),
    ("none", None), ("null", None), ("[1,2]", [1, 2]), ('{"a": [1.5]}', {"a": [1.5]}),
    ("cuda", "cuda"), ("/models/x", "/models/x"), ("tiny-llama", "tiny-llama"), ("[1,", "[1,"),
    ("float64", "float64"), ("layer_out[3]", "layer_out[3]"),
])
def test_parse_value(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_run_unknown_experiment_names_the_known_ones(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    known = list(book.experiments(REPO))
    assert main(["run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err
    if known:
        for key in known:
            assert key in err
    else:
        assert "no notebooks in nbs/" in err


def test_run_unknown_experiment_without_notebooks_is_clear(capsys, monkeypatch, tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (tmp_path / "nbs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert book.experiments(tmp_path) == {}
    assert main(["run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and "no notebooks in nbs/" in err


def test_run_outside_a_checkout_is_clear(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "exp12"]) == 2
    assert "instab checkout" in capsys.readouterr().err


def test_list_prints_every_experiment(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for key, path in book.experiments(REPO).items():
        assert f"{key}" in out and str(path.relative_to(REPO)) in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: instab" in capsys.readouterr().err


def test_console_script_help(tmp_path):
    exe = Path(sys.executable).parent / "instab"
    assert exe.is_file(), f"console script not installed next to {sys.executable}"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage: instab" in r.stdout
    for cmd in ("models", "list", "run", "book"):
        assert cmd in r.stdout
