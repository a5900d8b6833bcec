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

# exp12 in every run; with INSTAB_SCREENSHOTS also exp01 (a stage slider over precomputed data), for the README.
NOTEBOOKS = ["exp12_polar_boundary"] + (["exp01_layerwise"] if os.environ.get("INSTAB_SCREENSHOTS") else [])
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
    """(base URL, token) of a JupyterLab server serving a folder with the prepared notebooks."""
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:
        _with_parameters(book.source(name, repo), root / f"{name}.ipynb", book.smoke_parameters(name, repo))
    token, port = secrets.token_hex(16), _free_port()
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news prompt
    env = {k: v for k, v in os.environ.items() if k != book.BATCH_ENV}
    env.update(INSTAB_RESULTS=str(root / "results"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"), PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.user_settings_dir={root / '.settings'}"]
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


def _plot_data(page) -> str:
    """The drawn traces' x, y and z (plotly.js's decoded arrays) as one string."""
    return page.evaluate(f"JSON.stringify(document.querySelector('{PLOT}')._fullData.map("
                         "t => [t.x, t.y, t.z].map(a => Array.from(a || [], v => Array.from(v?.length ? v : [v])))))")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_explorer_redraws_when_its_slider_moves(lab, offline_page, name):
    base, token = lab
    page = offline_page.page
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{base}/lab/tree/{name}.ipynb?token={token}")
    page.wait_for_function(KERNEL_IDLE, timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(PLOT, timeout=240_000)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not [e for e in errors if "Traceback" in e or "Error" in e], errors
    before = _plot_data(page)
    title = page.evaluate(TITLE)
    handle = page.locator(".instab-explorer .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(f"{TITLE} !== {title!r}", timeout=120_000)
    after = _plot_data(page)
    assert after != before, "the figure's data did not change when the slider moved"
    if os.environ.get("INSTAB_SCREENSHOTS"):
        out = Path(os.environ["INSTAB_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        page.locator(".instab-explorer").screenshot(path=str(out / f"explorer_{name.split('_')[0]}.png"))
    assert offline_page.blocked == []
