"""Execute the experiment notebooks with papermill and build the book with Jupyter Book 1.x.

Used by the ``instab`` command (``instab run``, ``instab book``) and by tests/test_book.py.
Source notebooks live in ``nbs/``; executed copies go to ``book/experiments/`` (gitignored), which
``_toc.yml`` names; ``jupyter-book build`` never executes anything (execution is off in _config.yml).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nbformat
import yaml

from . import findings, params

EXPERIMENTS_DIR = "book/experiments"
CAMPAIGNS_DIR = "book/campaigns"  # campaign report pages (_toc.yml globs them under "Campaigns")
STATIC_DIR = "book/_static"
MATHJAX_VERSION = "3.2.2"
MATHJAX_FILE = "mathjax/tex-svg-full.js"  # relative to STATIC_DIR; must match mathjax_path in _config.yml
# Widget JS lives under html_extra_path, not html_static_path: jupyter-book adds every .js under _static to every
# page, while myst-nb adds these two only to pages with saved widget state (nb_ipywidgets_js in _config.yml).
EXTRA_DIR = "book/_extra"
WIDGETS_DIR = f"{EXTRA_DIR}/_static/widgets"
HTML_MANAGER_VERSION = "1.0.15"
REQUIREJS_VERSION = "2.3.7"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
BATCH_ENV = "INSTAB_BATCH"  # "1" in every kernel execute() starts: explorer cells skip themselves (explore.live)
GRAPH_DIV = 'class="plotly-graph-div"'
_REMOVED_OUTPUT_TAGS = {"remove-output", "remove-cell"}


@dataclass
class NotebookRun:
    """The outcome of executing (or, for ``build_book(run=False)``, inspecting) one notebook."""

    name: str  # experiment key, e.g. "exp12"
    executed: Path  # book/experiments/<stem>.ipynb (kept on failure: the book shows where it failed)
    results: list[Path] = field(default_factory=list)  # run folders the results store recorded
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BookReport:
    """What ``build_book_report`` did: per-notebook runs, plot checks, and the jupyter-book build."""

    root: Path
    runs: dict[str, NotebookRun]
    build_ok: bool
    problems: list[str]  # plot-loss and build problems, one line each
    figures: dict[str, int] = field(default_factory=dict)  # experiment -> figures in its executed notebook
    campaigns: dict[str, NotebookRun] = field(default_factory=dict)  # campaign name -> its report page's run

    @property
    def html(self) -> Path:
        return self.root / "_build" / "html"

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.runs.items() if not r.ok] + [f"campaign {n}" for n, r in self.campaigns.items()
                                                                 if not r.ok]

    @property
    def returncode(self) -> int:
        return 0 if self.build_ok and not self.failed and not self.problems else 1

    def page(self, name: str) -> Path:
        """The built HTML page of experiment ``name``."""
        return self.html / EXPERIMENTS_DIR / (self.runs[name].executed.stem + ".html")

    def campaign_page(self, name: str) -> Path:
        """The built HTML page of campaign ``name``'s report."""
        return self.html / CAMPAIGNS_DIR / f"{name}.html"


# --- where things are -------------------------------------------------------------------------


def repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``_toc.yml`` and ``nbs/``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "_toc.yml").is_file() and (d / "nbs").is_dir():
            return d
    raise FileNotFoundError(
        f"run instab inside an instab checkout; notebooks live in nbs/ (no _toc.yml and nbs/ at or above {here})"
    )


def _key(stem: str) -> str:
    return stem.split("_")[0]


def toc_stems(root: Path) -> list[str]:
    """Notebook stems that ``_toc.yml`` lists under book/experiments/, in book order."""
    toc = yaml.safe_load((Path(root) / "_toc.yml").read_text()) or {}
    stems: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            f = node.get("file")
            if isinstance(f, str) and f.startswith(EXPERIMENTS_DIR + "/"):
                stems.append(Path(f).name.removesuffix(".ipynb").removesuffix(".md"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return stems


def experiments(root: Path | None = None) -> dict[str, Path]:
    """Source notebooks ``nbs/*.ipynb`` by key (``exp12_polar_boundary.ipynb`` -> "exp12").

    Order: as listed in ``_toc.yml``, then the rest sorted by file name. Files starting with
    "_" or "." (templates, scratch) are skipped.
    """
    root = Path(root or repo_root())
    by_stem = {p.stem: p for p in sorted((root / "nbs").glob("*.ipynb")) if not p.name.startswith(("_", "."))}
    order = [s for s in toc_stems(root) if s in by_stem] + [s for s in by_stem if s not in toc_stems(root)]
    out: dict[str, Path] = {}
    for stem in order:
        key = _key(stem)
        if key in out and out[key] != by_stem[stem]:
            raise ValueError(f"two notebooks share the key {key!r}: {out[key].name} and {by_stem[stem].name}")
        out[key] = by_stem[stem]
    return out


def _metadata(nb_path: Path) -> dict:
    return dict(nbformat.read(nb_path, as_version=4).metadata.get("instab", {}))


def smoke_parameters(name: str, root: Path | None = None) -> dict:
    """The ``smoke`` profile of experiment ``name`` (fast test settings; {} if it has none)."""
    return dict(params.profiles(source(name, root)).get("smoke", {}))


def profile_parameters(name: str, profile: str, root: Path | None = None) -> dict:
    """The parameters of profile ``profile`` of experiment ``name`` (``default``: {})."""
    return params.profile(source(name, root), profile)


def source(name: str, root: Path | None = None) -> Path:
    """The source notebook of experiment ``name`` ("exp12" or the full stem "exp12_polar_boundary")."""
    return _source(name, Path(root or repo_root()))


def _source(name: str, root: Path) -> Path:
    nbs = experiments(root)
    if name in nbs:
        return nbs[name]
    for p in nbs.values():  # also accept the full stem, "exp12_polar_boundary"
        if p.stem == name:
            return p
    raise ValueError(f"unknown experiment {name!r}; known: {', '.join(nbs) or '(no notebooks in nbs/)'}")


# --- executing notebooks ----------------------------------------------------------------------


def run_notebook(
    name: str,
    parameters: dict | None = None,
    root: Path | None = None,
    out_dir: Path | None = None,
    results_root: Path | None = None,
    progress: bool = True,
    profile: str = params.DEFAULT_PROFILE,
) -> NotebookRun:
    """Execute ``nbs/<stem>.ipynb`` with papermill into ``<out_dir>/<stem>.ipynb`` (default book/experiments).

    ``profile`` names the parameter set ``parameters`` came from; the executed page says so under its title.

    The kernel runs with cwd = the repo root and inherits ``INSTAB_RUN_RECORD`` (a temp file where
    the results store appends each finished run folder) and, if given, ``INSTAB_RESULTS``.
    Parameters are checked against the notebook's parameters cell first: an unknown name or a value of the
    wrong type raises :class:`instab_core.params.ParameterError` before anything runs. A failure while
    executing does not raise: it is reported in the returned ``NotebookRun``, and the partially executed
    notebook is kept at the output path.
    """
    root = Path(root or repo_root()).resolve()
    src = _source(name, root)
    key = _key(src.stem)
    parameters = params.check(key, src, dict(parameters or {}))
    out_dir = Path(out_dir) if out_dir is not None else root / EXPERIMENTS_DIR
    out = out_dir / src.name
    fd, record_name = tempfile.mkstemp(prefix="instab-run-record-", suffix=".txt")
    os.close(fd)
    record = Path(record_name)
    env = {"INSTAB_RUN_RECORD": str(record)}
    if results_root is not None:
        env["INSTAB_RESULTS"] = str(Path(results_root).resolve())
    try:
        ok, error, seconds = execute(src, out, parameters, root, env=env, progress=progress,
                                     finish=lambda tmp, secs: _stamp(tmp, profile, parameters, secs, record, root))
        lines = record.read_text().splitlines() if record.exists() else []
    finally:
        record.unlink(missing_ok=True)
    return NotebookRun(
        name=key,
        executed=out,
        results=[Path(s.strip()) for s in lines if s.strip()],
        ok=ok,
        error=error,
        seconds=seconds,
    )


class _DeclaredParameters(logging.Filter):
    """Drops papermill's "Passed unknown parameter: NAME" for names the parameters cell declares: papermill's own
    parser skips annotated unions (``layers: str | list[int] | None = None``), which ``params`` reads and checks
    before anything runs, and injects them all the same."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        head, _, name = record.getMessage().partition("Passed unknown parameter: ")
        return head != "" or name not in self.names


def execute(src: Path, out: Path, parameters: dict, root: Path, env: dict[str, str] | None = None,
            progress: bool = False, finish: Any = None) -> tuple[bool, str | None, float]:
    """Papermill ``src`` into ``out`` atomically (kernel cwd ``root``, extra environment ``env``).

    Returns (ok, error, seconds). A failed execution keeps its partly executed notebook at ``out``; ``finish``
    (a function of the temporary output path and the seconds taken) runs before it is moved into place. Another process writing the
    same ``out`` is waited for.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_output(out)  # a concurrent run of the same notebook into the same folder waits here
    # Same directory as the output so os.replace is atomic; the name is gitignored (*.ipynb).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tmp.ipynb", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    env = {BATCH_ENV: "1", **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # papermill starts the kernel with this process's environment
    ok, error = True, None
    t0 = time.perf_counter()
    declared = _DeclaredParameters(set(params.declared(src)))
    papermill_log = logging.getLogger("papermill")
    papermill_log.addFilter(declared)
    try:
        papermill.execute_notebook(
            str(src),
            str(tmp),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(root),
            log_output=False,
            progress_bar=progress,
        )
    except PapermillExecutionError as e:
        ok, error = False, f"cell {e.exec_count}: {e.ename}: {e.evalue}"
    except Exception as e:  # kernel death, bad parameter names, ...: report, keep going
        ok, error = False, f"{type(e).__name__}: {e}"
    finally:
        papermill_log.removeFilter(declared)
        seconds = time.perf_counter() - t0
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if tmp.exists() and tmp.stat().st_size > 0:
            if finish is not None:
                finish(tmp, seconds)
            os.replace(tmp, out)
        else:
            tmp.unlink(missing_ok=True)
            out.unlink(missing_ok=True)  # no output at all: never leave a stale page from an older run
        lock.close()
    return ok, error, seconds


def _stamp(executed: Path, profile: str, parameters: dict, seconds: float, record: Path, root: Path) -> None:
    """Say under the page's title which parameter profile it ran with, and end the page with its provenance
    (from the manifests of the runs it finished); both are recorded in the notebook's metadata too."""
    nb = nbformat.read(executed, as_version=4)
    runs = [Path(s.strip()) for s in (record.read_text().splitlines() if record.exists() else []) if s.strip()]
    nb.metadata.setdefault("instab", {})["run"] = {"profile": profile, "parameters": parameters,
                                                   "seconds": round(seconds, 3), "results": [str(p) for p in runs]}
    given = ", ".join(f"`{k}={v!r}`" for k, v in parameters.items()) or "none"
    what = {"default": "its default parameters", "smoke": "the `smoke` profile (small test settings)",
            "seed": "the `seed` profile (the seed's own sizes)"}.get(profile, f"the `{profile}` profile")
    key = _key(executed.name.lstrip('.'))
    cell = nbformat.v4.new_markdown_cell(f"*This page ran with {what}; parameters set: {given}. "
                                         f"`instab params {key}` lists every parameter and profile."
                                         f"{real_width_note(key, root)}*")
    cell.metadata["tags"] = ["instab-profile"]
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, cell)
    nb.cells.append(provenance_cell(runs, profile, seconds, root))
    nbformat.write(nb, executed)


def real_width_note(key: str, root: Path) -> str:
    """What experiment ``key`` costs at a real model's width, from ``make bench-scale``'s record
    (``benchmarks/scale.json``): its default run's wall time and peak memory, and the seed profile's cost there;
    "" where the record has no finished run of it."""
    path = root / "benchmarks" / "scale.json"
    record = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    r = record["rows"].get(key)
    if not r or not r.get("ok") or "seed_cost" not in r:
        return ""
    return (f" At real width — random weights of {r['model']}, on {record['machine']} — "
            f"its default run took {r['wall_s']:.0f} s and a peak of {r['peak_rss_mib'] / 1024:.1f} GiB; the "
            f"`seed` profile there: {r['seed_cost']} (`benchmarks/scale.md`, written by `make bench-scale`).")


def provenance_cell(runs: list[Path], profile: str, seconds: float, root: Path) -> nbformat.NotebookNode:
    """A markdown cell: model and weights hash, dtype, device, versions, git commit, profile, wall time and results
    folder of each run a page finished (read from the runs' manifests)."""
    lines = ["## Provenance", "", "| | |", "|---|---|",
             f"| profile | `{profile}` |", f"| notebook wall time | {seconds:.1f} s |"]
    if not runs:
        lines.append("| results | this page finished no results run (it failed first, or writes none) |")
    for path in runs:
        f = Path(path) / "manifest.json"
        if not f.is_file():
            lines.append(f"| results | `{_rel(Path(path), root)}` (no manifest) |")
            continue
        m = json.loads(f.read_text())
        model, env, git = m.get("model") or {}, m.get("environment") or {}, m.get("git") or {}
        commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
        rows = {"results": f"`{_rel(Path(path), root)}` ({m.get('experiment')}, {m.get('wall_seconds', 0):.1f} s)"}
        if model:
            rows["model"] = f"`{model.get('model')}` ({model.get('architecture')}), weights `{model.get('weights_hash')}`"
            rows["dtype, device"] = f"{model.get('dtype')}, {model.get('device_name') or model.get('device')}"
        rows["versions"] = (f"torch {env.get('torch')}, transformers {env.get('transformers')}, "
                            f"python {env.get('python')}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))
        rows["git commit"] = commit
        lines += [f"| {k} | {v} |" for k, v in rows.items()]
    cell = nbformat.v4.new_markdown_cell("\n".join(lines))
    cell.metadata["tags"] = ["instab-provenance"]
    return cell


def _lock_output(out: Path) -> Any:
    """Hold ``.<name>.lock`` beside ``out`` (an open file; closing it releases), waiting while another process
    writes the same executed notebook."""
    import fcntl

    fh = open(out.with_name(f".{out.stem}.lock"), "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting: another run is writing {out}", file=sys.stderr, flush=True)
        fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def _inspect_executed(name: str, path: Path) -> NotebookRun:
    """A NotebookRun for an already executed notebook (``build_book(run=False)``)."""
    if not path.exists():
        return NotebookRun(name, path, ok=False, error="not executed (no notebook in book/experiments/)")
    md = nbformat.read(path, as_version=4).metadata
    if md.get("instab", {}).get("stub"):
        return NotebookRun(name, path, ok=False, error="not executed (stub page)")
    pm = md.get("papermill", {})
    failed = bool(pm.get("exception"))
    return NotebookRun(
        name,
        path,
        results=[Path(p) for p in md.get("instab", {}).get("run", {}).get("results", [])],
        ok=not failed,
        error="the executed notebook holds an error" if failed else None,
        seconds=float(pm.get("duration") or 0.0),
    )


def _write_stub(path: Path, title: str, reason: str) -> None:
    """A placeholder page so jupyter-book still builds when a toc notebook has no executed copy."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["instab"] = {"stub": True}
    nb.cells.append(
        nbformat.v4.new_markdown_cell(
            f"# {title}\n\n```{{warning}}\nThis notebook was not run: {reason}.\n```\n"
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


# --- the book ---------------------------------------------------------------------------------


def _copy_plotly_js(root: Path) -> None:
    """plotly.js ships with the book (offline); jupyter-book copies book/_static into _build/html/_static."""
    import plotly

    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    dst = root / STATIC_DIR / "plotly.min.js"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)


def _vendor_npm(package: str, version: str, files: dict[str, Path]) -> str | None:
    """Copy ``files`` out of ``npm pack package@version``, once: a ``package/...`` member -> its destination
    file, or a pattern with ``*`` -> a destination folder (every matching member, by its base name).

    The book's JavaScript is vendored this way (npm registry, at build time; the copies are gitignored) so no
    page loads a script from a CDN. Returns a warning instead of raising: the page then lacks that feature
    but stays offline.
    """
    if all(dst.exists() for dst in files.values()):
        return None
    npm = shutil.which("npm")
    if npm is None:
        return f"npm not found: cannot vendor {package}@{version}"
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = list(Path(tmp).glob("*.tgz"))
        if r.returncode != 0 or len(tgz) != 1:
            return f"npm pack {package}@{version} failed ({r.stderr.strip()[-300:]})"
        with tarfile.open(tgz[0]) as tf:
            names = tf.getnames()
            for pattern, dst in files.items():
                members = fnmatch.filter(names, pattern) if "*" in pattern else [n for n in names if n == pattern]
                if not members:
                    return f"npm pack {package}@{version} has no {pattern}"
                for member in members:
                    target = dst / PurePosixPath(member).name if "*" in pattern else dst
                    data = tf.extractfile(member)
                    if data is None:
                        return f"npm pack {package}@{version}: {member} is not a file"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data.read())
    return None


def _vendor_js(root: Path) -> list[str]:
    """MathJax (Sphinx's default mathjax_path is a CDN) and the ipywidgets embed manager with require.js
    (myst-nb's default nb_ipywidgets_js are CDN URLs); _config.yml points at these copies. Returns warnings:
    without MathJax, math shows as TeX source; without the widget JS, saved widget state (tqdm bars) is not drawn.
    The embed manager loads its icon fonts from beside itself (webpack public path), so they come along.
    """
    static = root / STATIC_DIR
    widgets = root / WIDGETS_DIR
    jobs = [
        ("mathjax", MATHJAX_VERSION, {"package/es5/tex-svg-full.js": static / MATHJAX_FILE,
                                      "package/LICENSE": (static / MATHJAX_FILE).with_name("LICENSE")}),
        ("@jupyter-widgets/html-manager", HTML_MANAGER_VERSION,
         {"package/dist/embed-amd.js": widgets / "embed-amd.js",
          "package/dist/embed.js.LICENSE.txt": widgets / "embed-amd.js.LICENSE.txt",
          "package/dist/*.woff2": widgets, "package/dist/*.woff": widgets,
          "package/dist/*.ttf": widgets, "package/dist/*.eot": widgets, "package/dist/*.svg": widgets}),
        # require.js carries its MIT licence in its header; the npm package has no separate file.
        ("requirejs", REQUIREJS_VERSION, {"package/require.js": widgets / "require.min.js"}),
    ]
    return [w for w in (_vendor_npm(*job) for job in jobs) if w]


def _jupyter_book_build(root: Path) -> tuple[bool, list[str]]:
    """Run ``jupyter-book build <root>`` (jupyter_book has no __main__, so call its click entry point)."""
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())"]
    env = {**os.environ, "NO_COLOR": "1"}  # plain log lines for the summary
    r = subprocess.run([*cmd, "build", str(root)], cwd=root, capture_output=True, text=True, env=env)
    log = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in (r.stdout + r.stderr).splitlines()]
    warnings = [ln for ln in log if "WARNING" in ln or "ERROR" in ln]
    if r.returncode != 0:
        return False, warnings + ["jupyter-book build failed:"] + log[-30:]
    return True, warnings


def _shown_outputs(nb: nbformat.NotebookNode):
    for cell in nb.cells:
        if cell.get("cell_type") != "code" or _REMOVED_OUTPUT_TAGS & set(cell.get("metadata", {}).get("tags", [])):
            continue
        yield from cell.get("outputs", [])


def check_figures(executed: Path, page: Path) -> tuple[int, list[str]]:
    """Guard against silent plot loss (myst-nb drops the plotly mimetype without an error).

    Every output with the plotly mimetype must also carry text/html (``use_book_renderer()``), and the
    built page must hold as many plotly graph divs as the notebook's shown outputs.
    Returns (figures in the notebook, problems).
    """
    nb = nbformat.read(executed, as_version=4)
    problems: list[str] = []
    n_mime = n_div = missing = 0
    for out in _shown_outputs(nb):
        data = out.get("data", {})
        html = data.get("text/html", "")
        html = "".join(html) if isinstance(html, list) else html
        n_div += html.count(GRAPH_DIV)
        if PLOTLY_MIME in data:
            n_mime += 1
            missing += "text/html" not in data
    if missing:
        problems.append(
            f"{executed.name}: {missing} plotly output(s) without text/html "
            "(call instab_core.plots.use_book_renderer() in the first cell)"
        )
    if not page.exists():
        problems.append(f"{executed.name}: built page {page} missing")
    else:
        on_page = page.read_text(errors="replace").count(GRAPH_DIV)
        if on_page != n_div:
            problems.append(f"{executed.name}: notebook has {n_div} plotly figure(s), built page has {on_page}")
    return max(n_div, n_mime), problems


def build_book_report(
    root: Path | None = None,
    run: bool = True,
    parameters_for: dict[str, dict] | None = None,
    results_root: Path | None = None,
    profile: str = params.DEFAULT_PROFILE,
) -> BookReport:
    """Execute every notebook (unless ``run=False``) with its parameter ``profile`` (``parameters_for`` overrides
    it per notebook), build ``_build/html`` and check the figures."""
    from tqdm.auto import tqdm

    root = Path(root or repo_root()).resolve()
    parameters_for = parameters_for or {}
    nbs = experiments(root)
    out_dir = root / EXPERIMENTS_DIR
    runs: dict[str, NotebookRun] = {}

    bar = tqdm(list(nbs), desc="notebooks", unit="nb", disable=not (nbs and run))
    for name in bar:
        bar.set_postfix_str(name)
        if run:
            values = parameters_for[name] if name in parameters_for else params.profiles(nbs[name]).get(profile, {})
            runs[name] = run_notebook(name, values, root, results_root=results_root, progress=False,
                                      profile=profile if name not in parameters_for else "custom")
        else:
            runs[name] = _inspect_executed(name, out_dir / nbs[name].name)
    bar.close()

    # Pages the toc names but nothing executed: a stub keeps the build going; the run counts as failed.
    for stem in toc_stems(root):
        path = out_dir / f"{stem}.ipynb"
        key = _key(stem)
        src = root / "nbs" / f"{stem}.ipynb"
        if key not in runs or runs[key].executed.stem != stem:  # no source: replace what an older build left
            key = key if key not in runs else stem
            runs[key] = NotebookRun(key, path, ok=False, error=f"no source notebook nbs/{stem}.ipynb")
            _write_stub(path, stem, f"there is no source notebook nbs/{stem}.ipynb")
        elif not path.exists():
            title = _metadata(src).get("title", stem)
            err = runs[key].error or "unknown error"
            _write_stub(path, title, f"it failed before producing output ({err})" if run else err)

    campaigns = _book_campaigns(root, run)
    _write_status_page(root, runs, campaigns, profile)
    toc = set(toc_stems(root))
    findings.write_page(root, {n: r.results for n, r in runs.items()},
                        {n: f"experiments/{r.executed.stem}.ipynb" for n, r in runs.items() if r.executed.stem in toc})
    _copy_plotly_js(root)
    problems: list[str] = []
    for warning in _vendor_js(root):
        print(f"warning: {warning}", file=sys.stderr)
    build_ok, log = _jupyter_book_build(root)
    if not build_ok:
        problems.extend(log)
    elif log:
        print("jupyter-book warnings:\n  " + "\n  ".join(log), file=sys.stderr)

    report = BookReport(root, runs, build_ok, problems, campaigns=campaigns)
    for name, r in runs.items():
        if r.executed.stem not in toc:
            print(f"note: {r.executed.name} is not in _toc.yml, so it is not in the book", file=sys.stderr)
            continue
        if build_ok and r.executed.exists() and not _is_stub(r.executed):
            n, p = check_figures(r.executed, report.page(name))
            report.figures[name] = n
            problems.extend(p)
    for name, r in campaigns.items():
        if build_ok and r.executed.exists() and not _is_stub(r.executed):
            n, p = check_figures(r.executed, report.campaign_page(name))
            report.figures[f"campaign {name}"] = n
            problems.extend(p)
    return report


def _book_campaigns(root: Path, run: bool) -> dict[str, NotebookRun]:
    """Run the campaigns of ``examples/*.yaml`` marked ``book: true`` and write their report pages.

    A campaign that fails (or, with ``run=False``, has no report yet) gets a stub page saying so.
    """
    from . import campaign

    out: dict[str, NotebookRun] = {}
    for path in sorted((root / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if not (isinstance(doc, dict) and doc.get("book") and "grid" in doc):
            continue
        t0 = time.perf_counter()
        page = root / CAMPAIGNS_DIR / f"{doc.get('name')}.ipynb"
        ok, error, results = True, None, []
        try:
            c = campaign.load(path, root=root)
            results = [c.folder]
            if run:
                done = campaign.run(c, progress=False)
                if done.failed:
                    ok, error = False, f"{len(done.failed)} of {len(c.cells)} cells failed (instab campaign status {path.name})"
                page = campaign.report(c)
            elif not page.exists():
                ok, error = False, "no report page yet (run `instab book` or `instab campaign report`)"
        except ValueError as exc:
            ok, error = False, " ".join(str(exc).split())
        if not page.exists():
            _write_stub(page, f"Campaign {doc.get('name')}", f"the campaign did not finish ({error})")
        out[str(doc.get("name"))] = NotebookRun(f"campaign {doc.get('name')}", page, results, ok, error,
                                                time.perf_counter() - t0)
    return out


STATUS_PAGE = "book/status.md"


def machine() -> dict[str, Any]:
    """The CPU model, its cores and the GPUs of this machine (for the status page)."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "host": platform.node(), "python": sys.version.split()[0]}


def _write_status_page(root: Path, runs: dict[str, NotebookRun], campaigns: dict[str, NotebookRun],
                       profile: str) -> None:
    """``book/status.md``: every page of this build, its status and wall time, and the machine it ran on."""
    from .results import git_commit

    m = machine()
    git = git_commit()
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    lines = ["# Build status", "",
             f"Built {time.strftime('%Y-%m-%d %H:%M %Z')} from commit `{commit}` with the `{profile}` profile, on "
             f"{m['cpu']} ({m['cores']} cores){'; GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ', no GPU'}. "
             "Each page ends with its own provenance (model, weights hash, versions, results folder).", "",
             "| page | status | wall time | results |", "|---|---|---|---|"]
    for r in [*runs.values(), *campaigns.values()]:
        status = "ok" if r.ok else "**failed**: " + " ".join((r.error or "").split())[:160].replace("|", "\\|")
        where = ", ".join(f"`{_rel(p, root)}`" for p in r.results) or "–"
        lines.append(f"| {r.executed.stem} | {status} | {r.seconds:.1f} s | {where} |")
    (root / STATUS_PAGE).write_text("\n".join(lines) + "\n")


def _is_stub(path: Path) -> bool:
    return bool(nbformat.read(path, as_version=4).metadata.get("instab", {}).get("stub"))


def print_summary(report: BookReport) -> None:
    """A plain table: notebook, ok, seconds, results folder (or the error)."""
    rows = []
    for name, r in report.runs.items():
        if r.ok:
            where = ", ".join(_rel(p, report.root) for p in r.results) or "-"
        else:
            where = (r.error or "failed").splitlines()[0][:100]
        rows.append((r.executed.stem, "ok" if r.ok else "FAIL", f"{r.seconds:.1f}", where))
    for name, r in report.campaigns.items():
        where = ", ".join(_rel(p, report.root) for p in r.results) if r.ok else (r.error or "failed")[:100]
        rows.append((f"campaign {name}", "ok" if r.ok else "FAIL", f"{r.seconds:.1f}", where))
    head = ("notebook", "ok", "seconds", "results folder")
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for p in report.problems:
        print(f"problem: {p}")
    if report.build_ok:
        print(f"book: {report.html / 'index.html'}")
    if report.failed:
        print(f"FAILED notebooks: {', '.join(report.failed)}")


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root))
    except ValueError:
        return str(p)


def build_book(
    root: Path | None = None,
    run: bool = True,
    parameters_for: dict[str, dict] | None = None,
    results_root: Path | None = None,
    profile: str = params.DEFAULT_PROFILE,
) -> int:
    """Execute every notebook, build the book, print a summary; 0 when everything passed, else 1."""
    report = build_book_report(root, run=run, parameters_for=parameters_for, results_root=results_root,
                               profile=profile)
    print_summary(report)
    return report.returncode
