"""A real JupyterLab, driven by Chromium: exp12's explorer works in a live kernel, and nothing leaves the machine.

The server runs in a temporary folder on 127.0.0.1 with a token; the notebook is a copy of nbs/exp12 with its
smoke parameters written into the parameters cell (so Run All takes seconds); results go to a temporary store.
Set INSTAB_SCREENSHOTS=DIR to keep a screenshot of the explorer (the README's images are made this way).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from instab_core import book

pytestmark = pytest.mark.slow

NOTEBOOK = "exp12_polar_boundary"
PLOT = ".instab-explorer .js-plotly-plot"
TITLE = f"document.querySelector('{PLOT}').layout.title.text"
KERNEL_IDLE = """() => {
  const k = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
  return k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_parameters(src: Path, dst: Path, values: dict) -> None:
    nb = nbformat.read(src, 4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# smoke values for the test\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nbformat.write(nb, dst)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, repo):
    """(base URL, token) of a JupyterLab server serving a folder with the prepared exp12 notebook."""
    root = tmp_path_factory.mktemp("lab")
    _with_parameters(book.source(NOTEBOOK, repo), root / f"{NOTEBOOK}.ipynb", book.smoke_parameters(NOTEBOOK, repo))
    token, port = secrets.token_hex(16), _free_port()
    env = {k: v for k, v in os.environ.items() if k != book.BATCH_ENV}
    env.update(INSTAB_RESULTS=str(root / "results"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"), PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # CI containers run as root; jupyter refuses that unless told
        cmd.append("--allow-root")
    log = open(root / "server.log", "w")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail(f"jupyter lab did not answer in 60 s: {(root / 'server.log').read_text()[-2000:]}")
        yield base, token
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _plot_x(page) -> str:
    return page.evaluate(f"JSON.stringify(document.querySelector('{PLOT}')._fullData.map(t => Array.from(t.x || [])))")


def test_exp12_explorer_redraws_when_the_ray_slider_moves(lab, offline_page):
    base, token = lab
    page = offline_page.page
    page.goto(f"{base}/lab/tree/{NOTEBOOK}.ipynb?token={token}")
    page.wait_for_function(KERNEL_IDLE, timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(PLOT, timeout=240_000)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not [e for e in errors if "Traceback" in e or "Error" in e], errors
    before = _plot_x(page)
    title = page.evaluate(TITLE)
    handle = page.locator(".instab-explorer .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(f"{TITLE} !== {title!r}", timeout=60_000)
    after = _plot_x(page)
    assert after != before, "the figure's data did not change when the ray moved"
    assert page.locator(".instab-explorer .widget-html-content").first.inner_text() == "Input states along one ray"
    if os.environ.get("INSTAB_SCREENSHOTS"):
        out = Path(os.environ["INSTAB_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        page.locator(".instab-explorer").screenshot(path=str(out / "explorer_exp12.png"))
    assert offline_page.blocked == []
