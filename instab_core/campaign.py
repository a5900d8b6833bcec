"""Campaigns: a grid of notebook runs, each in its own subprocess, resumable, on a local pool or a Ray cluster.

A campaign file (YAML, see ``examples/``) names one experiment, a parameter profile, fixed parameters and a grid;
each cell of the grid's cross product is one papermill execution of the notebook, written under
``campaigns/<name>/<cell-id>/``: the executed notebook, the cell's own results store (``results/``), ``cell.json``
(status, error, wall time, where it ran) and ``cell.log``. The cell id hashes the notebook's content, the cell's
parameters and the model's weights hash, so editing any of them makes a new cell.

A cell runs in ``<cell-id>.partial/`` (locked by the process running it) and is renamed to ``<cell-id>/`` when it
ends, ok or failed: a killed cell never looks finished. Running the same file again skips finished cells and runs
failed and interrupted ones again; an interrupted cell's own checkpoints (its ``results/`` store) are resumed.

Each cell is a separate ``python -m instab_core.campaign _cell`` process, because papermill in one process races on
kernel launch and ports. The ``local`` backend keeps ``workers`` of them running (one per visible GPU where there are
GPUs); ``ray`` submits each as a Ray task (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import yaml

from . import book, params
from .results import PARTIAL, _try_lock, write_json

CAMPAIGNS_DIR = "campaigns"
CELL_FILE = "cell.json"
SPEC_FILE = "campaign.json"
KEYS = {"name", "description", "experiment", "profile", "parameters", "grid", "backend", "workers", "threads", "ray",
        "book"}
RAY_KEYS = {"address", "num_gpus", "accelerator_type", "transfer"}
BACKENDS = ("local", "ray")
PLACEMENT_KEYS = {"accelerator_type"}  # grid keys that place a cell (Ray resources), not notebook parameters
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CampaignError(ValueError):
    """A campaign file that cannot run as written (the message names the file and the key)."""


@dataclass(frozen=True)
class Cell:
    """One grid point: the values it sets (``values``) and every parameter passed to the notebook."""

    id: str  # 12 hex digits: sha256 of notebook content, parameters and model weights hash
    values: dict[str, Any]  # the grid's values at this cell, in grid order
    parameters: dict[str, Any]  # profile, then ``parameters:``, then ``values``, checked against the notebook
    placement: dict[str, Any] = field(default_factory=dict)  # e.g. {"accelerator_type": "H100"} (Ray only)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.values.items())


@dataclass
class Campaign:
    """A campaign file, read and checked. ``folder`` is where its cells go."""

    name: str
    experiment: str
    profile: str
    parameters: dict[str, Any]
    grid: dict[str, list[Any]]
    cells: list[Cell]
    folder: Path
    root: Path  # the instab checkout whose nbs/ the cells execute
    source: Path | None = None  # the campaign file
    description: str = ""
    backend: str = "local"
    workers: int = 1
    threads: int | None = None  # torch threads per cell (default: this machine's CPUs / workers)
    ray: dict[str, Any] = field(default_factory=dict)
    book: bool = False  # `instab book` runs this campaign and puts its report in the book

    def spec(self) -> dict[str, Any]:
        """What ``campaign.json`` records: the resolved file and every cell."""
        return {"name": self.name, "experiment": self.experiment, "profile": self.profile,
                "description": self.description, "parameters": self.parameters, "grid": self.grid,
                "source": str(self.source) if self.source else None, "backend": self.backend,
                "cells": [{"id": c.id, "label": c.label, "values": c.values, "parameters": c.parameters,
                           "placement": c.placement} for c in self.cells]}


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "…"


def _closest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- reading a campaign file ------------------------------------------------------------------------------


def load(path: str | os.PathLike, root: Path | None = None, folder: Path | None = None) -> Campaign:
    """Read and check ``path`` before anything runs; every problem is one :class:`CampaignError` naming the key.

    ``root``: the instab checkout (default: the one around the current directory); ``folder``: where the cells go
    (default ``<root>/campaigns/<name>``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CampaignError(f"campaign file {path} does not exist (see examples/*.yaml for the format)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CampaignError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise CampaignError(f"{path}: a campaign file is a mapping with keys name, experiment, grid, …")
    return from_dict(doc, where=str(path), root=root, folder=folder, source=path.resolve())


def from_dict(doc: dict[str, Any], where: str = "campaign", root: Path | None = None, folder: Path | None = None,
              source: Path | None = None) -> Campaign:
    """A campaign from its parsed file (see :func:`load`)."""
    def bad(key: str, why: str) -> CampaignError:
        return CampaignError(f"{where}: {key}: {why}")

    for key in doc:
        if key not in KEYS:
            raise bad(key, f"unknown key{_closest(str(key), KEYS)} (keys: {', '.join(sorted(KEYS))})")
    for key in ("name", "experiment", "grid"):
        if key not in doc:
            raise CampaignError(f"{where}: the key {key!r} is missing")
    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad("name", f"{name!r} is not a folder name (letters, digits, '.', '_', '-')")
    root = Path(root or book.repo_root()).resolve()
    try:
        src = book.source(str(doc["experiment"]), root)
    except ValueError as exc:
        raise bad("experiment", str(exc)) from None
    experiment = book._key(src.stem)
    profile = doc.get("profile") or params.DEFAULT_PROFILE
    try:
        base = params.profile(src, str(profile))
    except params.ParameterError as exc:
        raise bad("profile", str(exc)) from None
    fixed = doc.get("parameters") or {}
    if not isinstance(fixed, dict):
        raise bad("parameters", "must be a mapping of parameter names to values")
    grid = doc["grid"]
    if not isinstance(grid, dict) or not grid:
        raise bad("grid", "is empty: give at least one parameter with a list of values (e.g. dtype: [float32, "
                          "float64])")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise bad(f"grid.{key}", f"must be a list of values, got {values!r}")
        if not values:
            raise bad(f"grid.{key}", "is an empty list: give at least one value")
        if key in fixed:
            raise bad(f"grid.{key}", "is also set under parameters: set it in one place")
    try:
        params.check(experiment, src, {**base, **fixed})
    except params.ParameterError as exc:
        raise bad("parameters", str(exc)) from None
    for key, values in grid.items():
        if key in PLACEMENT_KEYS:
            if not all(isinstance(v, str) for v in values):
                raise bad(f"grid.{key}", f"takes Ray accelerator type names (e.g. H100, A100), got {values!r}")
            continue
        try:
            for v in values:
                params.check(experiment, src, {key: v})
        except params.ParameterError as exc:
            raise bad(f"grid.{key}", str(exc)) from None
    backend = doc.get("backend", "local")
    if backend not in BACKENDS:
        raise bad("backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    for key in PLACEMENT_KEYS & set(grid):
        if backend != "ray":
            raise bad(f"grid.{key}", "places cells on Ray nodes: set backend: ray")
    workers = doc.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise bad("workers", f"must be a positive integer, got {workers!r}")
    threads = doc.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise bad("threads", f"must be a positive integer, got {threads!r}")
    ray_opts = doc.get("ray") or {}
    if not isinstance(ray_opts, dict):
        raise bad("ray", "must be a mapping (address, num_gpus, accelerator_type, transfer)")
    for key in ray_opts:
        if key not in RAY_KEYS:
            raise bad(f"ray.{key}", f"unknown key{_closest(str(key), RAY_KEYS)} (keys: {', '.join(sorted(RAY_KEYS))})")
    if ray_opts.get("transfer", "auto") not in ("auto", "bytes"):
        raise bad("ray.transfer", "must be auto (a shared filesystem when the campaign folder is visible) or bytes")

    notebook = src.read_bytes()
    model_default = params.declared(src).get("model")
    keys = list(grid)
    cells: list[Cell] = []
    weights: dict[str, str] = {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        placement = {k: v for k, v in values.items() if k in PLACEMENT_KEYS}
        given = {k: v for k, v in values.items() if k not in PLACEMENT_KEYS}
        cell_params = params.check(experiment, src, {**base, **fixed, **given})
        model = cell_params.get("model", model_default.default if model_default else None)
        where_model = "grid.model" if "model" in values else "parameters.model"
        if isinstance(model, str) and model not in weights:
            weights[model] = _weights_hash(model, lambda why: bad(where_model, why))
        digest = hashlib.sha256(notebook)
        digest.update(json.dumps(cell_params, sort_keys=True, default=str).encode())
        digest.update(weights.get(model, "no-model").encode() if isinstance(model, str) else b"no-model")
        if placement:
            digest.update(json.dumps(placement, sort_keys=True).encode())
        cells.append(Cell(digest.hexdigest()[:12], values, cell_params, placement))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise bad("grid", "two cells have the same parameters (a value is listed twice)")
    folder = Path(folder) if folder is not None else root / CAMPAIGNS_DIR / name
    return Campaign(name=name, experiment=experiment, profile=str(profile), parameters=fixed, grid=grid, cells=cells,
                    folder=folder.resolve(), root=root, source=source, description=str(doc.get("description", "")),
                    backend=backend, workers=workers, threads=threads, ray=ray_opts, book=bool(doc.get("book")))


def _weights_hash(model: str, bad) -> str:
    """The weights hash the results store records for ``model`` (a bundled name or a local directory)."""
    from .models import ModelLoadError, resolve_model_path, weights_fingerprint

    try:
        _, path = resolve_model_path(model)
    except ModelLoadError as exc:
        raise bad(str(exc)) from None
    if path is None:
        raise bad(f"{model!r} is not a local directory; nothing downloads at run time: save the model with "
                  "save_pretrained (or huggingface-cli download) and give its path")
    return weights_fingerprint(path)


# --- the state of a campaign folder -----------------------------------------------------------------------


def cell_state(folder: Path, cell_id: str) -> tuple[str, dict[str, Any] | None]:
    """(``done`` | ``failed`` | ``running`` | ``interrupted`` | ``pending``, the cell's cell.json or None)."""
    final, partial = folder / cell_id, folder / f"{cell_id}{PARTIAL}"
    if (final / CELL_FILE).is_file():
        try:
            info = json.loads((final / CELL_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "interrupted", None  # damaged: run it again
        return ("done" if info.get("status") == "ok" else "failed"), info
    if partial.is_dir():
        lock = _try_lock(partial)
        if lock is None:
            return "running", None
        lock.close()
        return "interrupted", None
    return "pending", None


def status_table(c: Campaign) -> list[dict[str, Any]]:
    """One row per cell: id, label, state, seconds, error."""
    rows = []
    for cell in c.cells:
        state, info = cell_state(c.folder, cell.id)
        rows.append({"cell": cell.id, "values": cell.label, "state": state,
                     "seconds": (info or {}).get("seconds"), "error": (info or {}).get("error")})
    return rows


# --- running one cell (in its own process) ----------------------------------------------------------------


def execute_cell(folder: Path, experiment: str, cell: dict[str, Any], profile: str, root: Path) -> dict[str, Any]:
    """Run one cell in ``<folder>/<id>.partial`` and rename it to ``<folder>/<id>``; returns its cell.json.

    Called by ``python -m instab_core.campaign _cell`` (one process per cell). Raises only when another live
    process holds the cell.
    """
    cell_id = cell["id"]
    final, partial = folder / cell_id, folder / f"{cell_id}{PARTIAL}"
    partial.mkdir(parents=True, exist_ok=True)
    lock = None
    for _ in range(20):  # `instab campaign status` probes the lock for an instant: do not lose the cell to it
        lock = _try_lock(partial)
        if lock is not None:
            break
        time.sleep(0.05)
    if lock is None:
        raise CampaignError(f"cell {cell_id} is being run by another process ({partial} is locked)")
    if final.exists():
        shutil.rmtree(final)  # an earlier failed attempt: this one replaces it
    started = time.time()
    outcome = book.run_notebook(experiment, cell["parameters"], root, out_dir=partial,
                                results_root=partial / "results", progress=False, profile=profile)
    import platform

    import torch
    info = {"id": cell_id, "label": cell["label"], "values": cell["values"], "parameters": cell["parameters"],
            "status": "ok" if outcome.ok else "failed", "error": outcome.error,
            "seconds": round(time.time() - started, 3), "notebook": outcome.executed.name,
            "results": [str(Path(p).relative_to(partial)) for p in outcome.results],
            "host": platform.node(), "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))}
    write_json(partial / CELL_FILE, info)
    for f in partial.glob(".*.lock"):
        f.unlink(missing_ok=True)
    lock.close()
    (partial / ".lock").unlink(missing_ok=True)
    os.replace(partial, final)
    return info


def _cell_env(threads: int, cuda_visible_devices: str | None) -> dict[str, str]:
    """The environment of a cell's process; its kernel inherits it (torch reads OMP_NUM_THREADS at start)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


def spawn_cell(folder: Path, experiment: str, cell: dict[str, Any], profile: str, root: Path,
               env: dict[str, str]) -> dict[str, Any]:
    """Run one cell in a fresh process; its cell.json, or a failure record when the process died first."""
    payload = json.dumps({"folder": str(folder), "experiment": experiment, "cell": cell, "profile": profile,
                          "root": str(root)})
    r = subprocess.run([sys.executable, "-m", "instab_core.campaign", "_cell"], input=payload, env=env,
                       capture_output=True, text=True, cwd=str(root))
    final, partial = folder / cell["id"], folder / f"{cell['id']}{PARTIAL}"
    done = (final / CELL_FILE).is_file()
    where = final if done else partial
    where.mkdir(parents=True, exist_ok=True)
    (where / "cell.log").write_text(r.stdout + r.stderr)
    if done:
        return json.loads((final / CELL_FILE).read_text())
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"id": cell["id"], "label": cell["label"], "status": "failed",
            "error": f"the cell's process exited with code {r.returncode} before it finished: {last} "
                     f"(log: {where / 'cell.log'})"}


def _ray_cell(folder: str, experiment: str, cell: dict[str, Any], profile: str, root: str, threads: int,
              transfer: str) -> dict[str, Any]:
    """A Ray task: run the cell into the campaign folder when this node sees it (a shared filesystem), else into
    a temporary folder whose finished cell comes back as tar bytes."""
    env = _cell_env(threads, None)  # Ray sets CUDA_VISIBLE_DEVICES for the task's GPUs
    if transfer == "auto" and Path(folder).is_dir():
        return {"info": spawn_cell(Path(folder), experiment, cell, profile, Path(root), env), "tar": None}
    with tempfile.TemporaryDirectory(prefix="instab-cell-") as tmp:
        info = spawn_cell(Path(tmp), experiment, cell, profile, Path(root), env)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for p in Path(tmp).iterdir():
                tf.add(p, arcname=p.name)
        return {"info": info, "tar": buf.getvalue()}


def _unpack(folder: Path, cell_id: str, data: bytes) -> None:
    """Put a cell that came back as bytes into the campaign folder (the finished folder last, by rename)."""
    with tempfile.TemporaryDirectory(prefix=".incoming-", dir=folder) as tmp:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            tf.extractall(tmp, filter="data")
        for p in Path(tmp).iterdir():
            target = folder / p.name
            if target.exists():
                shutil.rmtree(target)
            os.replace(p, target)
    stale = folder / f"{cell_id}{PARTIAL}"  # an earlier interrupted attempt here: the cell is now finished
    if (folder / cell_id / CELL_FILE).is_file() and stale.is_dir():
        lock = _try_lock(stale)
        if lock is not None:
            lock.close()
            shutil.rmtree(stale)


# --- running a campaign -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A local worker slot: torch threads for its cells and the GPU it may see."""

    index: int
    threads: int
    cuda_visible_devices: str | None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_cell(c: Campaign) -> int:
    return c.threads or max(1, cpu_count() // c.workers)


def local_slots(c: Campaign) -> list[Slot]:
    """One slot per visible GPU where there are GPUs, else ``workers`` CPU slots sharing the cores."""
    import torch

    threads = threads_per_cell(c)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return [Slot(i, threads, str(i)) for i in range(gpus)]
    return [Slot(i, threads, None) for i in range(c.workers)]


@dataclass
class CampaignReport:
    """What :func:`run` did."""

    campaign: Campaign
    skipped: list[str]  # cell ids already finished
    outcomes: dict[str, dict[str, Any]]  # cell id -> cell.json (or the failure record) of the cells run now
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [i for i, o in self.outcomes.items() if o.get("status") != "ok"]


def run(c: Campaign, backend: str | None = None, address: str | None = None, progress: bool = True) -> CampaignReport:
    """Run every cell of ``c`` that is not finished; a failed cell never stops the others."""
    from tqdm.auto import tqdm

    backend = backend or c.backend
    if backend not in BACKENDS:
        raise CampaignError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
    c.folder.mkdir(parents=True, exist_ok=True)
    write_json(c.folder / SPEC_FILE, c.spec())
    states = {cell.id: cell_state(c.folder, cell.id)[0] for cell in c.cells}
    busy = [i for i, s in states.items() if s == "running"]
    if busy:
        raise CampaignError(f"cells {', '.join(busy)} of {c.name} are being run by another process: wait for it, "
                            "or stop it first")
    skipped = [i for i, s in states.items() if s == "done"]
    todo = [cell for cell in c.cells if states[cell.id] != "done"]
    print(f"campaign {c.name}: {len(c.cells)} cells, {len(skipped)} finished (skipped), {len(todo)} to run "
          f"on the {backend} backend; folder {c.folder}", file=sys.stderr, flush=True)
    payloads = {cell.id: {"id": cell.id, "label": cell.label, "values": cell.values, "parameters": cell.parameters,
                          "placement": cell.placement} for cell in todo}
    t0 = time.perf_counter()
    outcomes: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(todo), desc=c.name, unit="cell", disable=not (progress and todo))
    try:
        runner = _run_ray if backend == "ray" else _run_local
        for cell_id, info in runner(c, payloads, address):
            outcomes[cell_id] = info
            bar.update(1)
            if info.get("status") != "ok":
                tqdm.write(f"cell {cell_id} ({info.get('label')}) failed: {info.get('error')}", file=sys.stderr)
    finally:
        bar.close()
    return CampaignReport(c, skipped, outcomes, time.perf_counter() - t0)


def _run_local(c: Campaign, payloads: dict[str, dict], address: str | None):
    slots: Queue[Slot] = Queue()
    for s in local_slots(c):
        slots.put(s)

    def one(payload: dict) -> dict:
        slot = slots.get()
        try:
            env = _cell_env(slot.threads, slot.cuda_visible_devices)
            return spawn_cell(c.folder, c.experiment, payload, c.profile, c.root, env)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
        futures = {pool.submit(one, p): i for i, p in payloads.items()}
        for f in as_completed(futures):
            yield futures[f], f.result()


def _run_ray(c: Campaign, payloads: dict[str, dict], address: str | None):
    try:
        import ray
    except ImportError:
        raise CampaignError("the ray backend needs Ray: pip install -e \".[ray]\"") from None
    address = address or c.ray.get("address")
    threads = threads_per_cell(c)
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False)
        if address:
            ray.init(address=address, **kw)
        else:  # a local Ray instance with room for `workers` cells at once
            ray.init(num_cpus=c.workers * threads, **kw)
    try:
        options: dict[str, Any] = {"num_cpus": threads}
        if c.ray.get("num_gpus"):
            options["num_gpus"] = c.ray["num_gpus"]
        if c.ray.get("accelerator_type"):
            options["accelerator_type"] = c.ray["accelerator_type"]
        task = ray.remote(_ray_cell)
        transfer = c.ray.get("transfer", "auto")
        pending = {task.options(**{**options, **p["placement"]}).remote(str(c.folder), c.experiment, p, c.profile,
                                                                    str(c.root), threads, transfer): i
                   for i, p in payloads.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell_id = pending.pop(ready[0])
            try:
                got = ray.get(ready[0])
            except Exception as exc:  # the task itself died (node lost, worker killed): the cell failed
                yield cell_id, {"id": cell_id, "status": "failed", "label": payloads[cell_id]["label"],
                                "error": f"the Ray task failed: {' '.join(str(exc).split())[:300]}"}
                continue
            if got["tar"] is not None:
                _unpack(c.folder, cell_id, got["tar"])
            yield cell_id, got["info"]
    finally:
        if started:
            ray.shutdown()


def open_campaign(where: str | os.PathLike, root: Path | None = None) -> Campaign:
    """A campaign from its file, or from a campaign folder's ``campaign.json`` (its source file is re-read)."""
    p = Path(where).expanduser()
    if p.is_dir():
        spec_file = p / SPEC_FILE
        if not spec_file.is_file():
            raise CampaignError(f"{p} is not a campaign folder (no {SPEC_FILE}); pass the campaign's YAML file")
        spec = json.loads(spec_file.read_text())
        source = spec.get("source")
        if not source or not Path(source).is_file():
            raise CampaignError(f"{p}: the campaign file {source} is gone; pass the campaign's YAML file")
        return load(source, root=root, folder=p)
    return load(p, root=root)


REPORT_TEMPLATE = "nbs/_campaign_report.ipynb"
REPORTS_DIR = "book/campaigns"
# Sections of the report template, by cell tag: which experiments get them (``generic``: every campaign).
REPORT_SECTIONS = {"report-boundary": {"exp12"}, "report-trace": {"exp04"}}


def report(c: Campaign, out: Path | None = None) -> Path:
    """Execute the report notebook on ``c``'s folder into ``out`` (default ``book/campaigns/<name>.ipynb``).

    The template's sections tagged ``report-boundary`` / ``report-trace`` are kept only for the experiments
    that have them; the title cell names the campaign. Raises :class:`CampaignError` when no cell finished or the
    report fails.
    """
    import nbformat

    if not any(cell_state(c.folder, cell.id)[0] == "done" for cell in c.cells):
        raise CampaignError(f"campaign {c.name} has no finished cell in {c.folder}: run `instab campaign run` first")
    out = Path(out) if out is not None else c.root / REPORTS_DIR / f"{c.name}.ipynb"
    nb = nbformat.read(c.root / REPORT_TEMPLATE, as_version=4)
    keep = []
    for cell in nb.cells:
        tags = set(cell.metadata.get("tags", []))
        wanted = [t for t in tags if t in REPORT_SECTIONS]
        if all(c.experiment in REPORT_SECTIONS[t] for t in wanted):
            keep.append(cell)
    nb.cells = keep
    grid = "; ".join(f"`{k}` ∈ {{{', '.join(_short(v) for v in vs)}}}" for k, vs in c.grid.items())
    nb.cells[0].source = nb.cells[0].source.format(
        name=c.name, experiment=c.experiment, description=c.description.strip() or "",
        grid=grid, cells=len(c.cells), profile=c.profile,
        fixed=", ".join(f"`{k}={v!r}`" for k, v in c.parameters.items()) or "none",
        source=c.source.relative_to(c.root) if c.source and c.source.is_relative_to(c.root) else c.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".ipynb", prefix=f".{c.name}.src.", dir=out.parent,
                                     delete=False) as fh:
        nbformat.write(nb, fh)
    try:
        ok, error, _ = book.execute(Path(fh.name), out, {"campaign": str(c.folder)}, c.root)
    finally:
        Path(fh.name).unlink(missing_ok=True)
    if not ok:
        raise CampaignError(f"the report of {c.name} failed: {' '.join(str(error).split())[:300]} "
                            f"(the partly executed report: {out})")
    return out


def _main_cell() -> int:
    payload = json.loads(sys.stdin.read())
    info = execute_cell(Path(payload["folder"]), payload["experiment"], payload["cell"], payload["profile"],
                        Path(payload["root"]))
    return 0 if info["status"] == "ok" else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["_cell"]:
        sys.exit(_main_cell())
    sys.exit("usage: instab campaign run|status|report FILE (python -m instab_core.campaign _cell is internal)")
