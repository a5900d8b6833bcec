"""The results store: ``results/<experiment>/<run-id>/`` with a manifest and exact data.

A run is written into ``<run-id>.partial/`` and renamed to ``<run-id>/`` by :meth:`Run.finish`,
so a complete-looking folder is always complete; every file is written to a temporary name and
moved into place. An interrupted run leaves its ``.partial`` folder, with checkpoints, and
:func:`start_run` resumes it when the parameters and the model are the same.

Downstream experiments read upstream runs with :func:`load_run`, which checks the manifest.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

RESULTS_ENV = "INSTAB_RESULTS"
RUN_RECORD_ENV = "INSTAB_RUN_RECORD"
PARTIAL = ".partial"
LOCK = ".lock"  # in a .partial folder: flock-ed by the process writing it


class ResultsError(ValueError):
    """A results folder that is missing, incomplete or does not match what was asked for."""


def project_root(start: Path | None = None) -> Path | None:
    """The instab checkout containing ``start`` (default: cwd), or None outside one."""
    from .book import repo_root

    try:
        return repo_root(start)
    except FileNotFoundError:
        return None  # an installed package used outside a checkout: results go under ./results


def results_root() -> Path:
    """$INSTAB_RESULTS, else ``results/`` in the instab checkout, else ``./results``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser().resolve()
    root = project_root()
    return (root if root is not None else Path.cwd()) / "results"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a path would get ".npz" appended; closed before the rename
        np.savez(fh, **arrays)


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, read in pieces (results may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_npz(path: Path, fix: str) -> dict[str, np.ndarray]:
    """Every array of ``path``; a missing, truncated or damaged file raises :class:`ResultsError` naming it and
    saying what to do (``fix``, e.g. "re-run exp12")."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ResultsError(f"{path} is missing: {fix}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
        raise ResultsError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc}): {fix}") from None


def read_json(path: Path, fix: str) -> Any:
    """A JSON file, or :class:`ResultsError` naming it when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path} is missing: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is damaged or truncated ({exc}): {fix}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit() -> dict[str, Any]:
    root = project_root(Path(__file__).parent)
    if root is None:
        return {"commit": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    return {"commit": head.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}


def environment() -> dict[str, Any]:
    """Library versions and numerics-relevant settings of this process."""
    import transformers
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__, "pandas": pd.__version__,
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu"] = torch.cuda.get_device_name()
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


@dataclass
class Run:
    """A run being written. Use :func:`start_run`; finish with :meth:`finish`."""

    experiment: str
    run_id: str
    root: Path
    manifest: dict[str, Any]
    started: float
    resumed: bool = False
    _lock: Any = field(default=None, repr=False)  # open lock file: held while this process writes the run

    @property
    def partial_path(self) -> Path:
        return self.root / self.experiment / (self.run_id + PARTIAL)

    @property
    def path(self) -> Path:
        """The final folder (exists once :meth:`finish` has run)."""
        return self.root / self.experiment / self.run_id

    def save_arrays(self, name: str, **arrays: np.ndarray | torch.Tensor) -> Path:
        """``<name>.npz`` with the arrays' exact bits."""
        data = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in arrays.items()}
        target = self.partial_path / f"{name}.npz"
        _atomic_write(target, lambda p: _savez(p, data))
        return self.path / target.name

    def save_table(self, name: str, table: pd.DataFrame) -> Path:
        """``<name>.csv``; floats written with enough digits to round-trip."""
        target = self.partial_path / f"{name}.csv"
        _atomic_write(target, lambda p: table.to_csv(p, index=False))
        return self.path / target.name

    def save_json(self, name: str, obj: Any) -> Path:
        target = self.partial_path / f"{name}.json"
        write_json(target, obj)
        return self.path / target.name

    # Checkpoint protocol (see boundary.Checkpoint). Each checkpoint has a sidecar with the hash and the
    # shapes written at checkpoint time; one that does not match is discarded with a warning and recomputed.
    def _checkpoint_files(self, key: str) -> tuple[Path, Path]:
        folder = self.partial_path / "checkpoints"
        return folder / f"{key}.npz", folder / f"{key}.check.json"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays saved under ``key``, or None (never saved, or damaged: then deleted, and a warning says so)."""
        f, check = self._checkpoint_files(key)
        if not f.is_file() and not check.is_file():
            return None
        try:
            recorded = json.loads(check.read_text())
            if file_sha256(f) != recorded["sha256"]:
                raise ValueError("its bytes do not match the hash written at checkpoint time")
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            shapes = {k: [list(v.shape), v.dtype.str] for k, v in arrays.items()}
            if shapes != recorded["shapes"]:
                raise ValueError(f"its arrays {shapes} are not the ones written {recorded['shapes']}")
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
            warnings.warn(f"discarding damaged checkpoint {f} ({type(exc).__name__}: {exc}); recomputing it",
                          stacklevel=2)
            f.unlink(missing_ok=True)
            check.unlink(missing_ok=True)
            return None
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        f, check = self._checkpoint_files(key)
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        _atomic_write(f, lambda p: _savez(p, arrays))
        write_json(check, {"sha256": file_sha256(f),
                           "shapes": {k: [list(v.shape), v.dtype.str] for k, v in arrays.items()}})

    def finish(self, **summary: Any) -> Path:
        """Write the manifest, drop checkpoints, move the folder into place; returns the final path."""
        shutil.rmtree(self.partial_path / "checkpoints", ignore_errors=True)
        (self.partial_path / "run.json").unlink(missing_ok=True)  # the resume key of a partial run
        files = {}
        for f in sorted(self.partial_path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name != "manifest.json":
                files[f.name] = file_sha256(f)
        self.manifest.update(status="complete", finished=_now(), wall_seconds=round(time.time() - self.started, 3),
                             files=files, summary=summary)
        write_json(self.partial_path / "manifest.json", self.manifest)
        if self.path.exists():
            raise ResultsError(f"{self.path} already exists; refusing to overwrite a finished run")
        (self.partial_path / LOCK).unlink(missing_ok=True)
        os.replace(self.partial_path, self.path)
        self.release()
        record = os.environ.get(RUN_RECORD_ENV)
        if record:
            with open(record, "a") as fh:
                fh.write(str(self.path) + "\n")
        return self.path


    def release(self) -> None:
        """Let other processes resume this run (called by :meth:`finish`; process exit releases it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _try_lock(folder: Path) -> Any:
    """An exclusive lock on ``folder/.lock`` (an open file), or None when another live process holds it."""
    fh = open(folder / LOCK, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def start_run(experiment: str, params: dict[str, Any], model: Any = None, probe: Any = None,
              upstream: list["LoadedRun"] | None = None, resume: bool = True, root: Path | None = None) -> Run:
    """Open ``results/<experiment>/<run-id>.partial`` for writing.

    ``model`` is a ModelHandle and ``probe`` a Probe (their ``describe()`` goes into the manifest).
    With ``resume``, an interrupted run of the same experiment with the same parameters and model
    weights is continued (its checkpoints are kept) instead of starting anew.
    """
    if not experiment or "/" in experiment:
        raise ValueError(f"bad experiment name {experiment!r}")
    root = (root or results_root()).resolve()
    phash = params_hash(params)
    model_info = model.describe() if model is not None else None
    manifest: dict[str, Any] = {
        "experiment": experiment, "status": "running", "created": _now(), "parameters": params,
        "params_hash": phash, "model": model_info, "probe": probe.describe() if probe is not None else None,
        "environment": environment(), "git": git_commit(),
        "upstream": [{"experiment": u.experiment, "run_id": u.run_id, "path": str(u.path)} for u in (upstream or [])],
    }
    exp_dir = root / experiment
    if resume and exp_dir.is_dir():
        for cand in sorted(exp_dir.glob(f"*{PARTIAL}"), reverse=True):
            info = cand / "run.json"
            if not info.is_file():
                continue  # being created by another process (it locks before writing run.json), or empty
            try:
                old = json.loads(info.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
                warnings.warn(f"ignoring the interrupted run {cand}: its run.json is damaged ({exc}); delete the "
                              "folder to reclaim the space", stacklevel=2)
                continue
            same_model = (old.get("model") or {}).get("weights_hash") == (model_info or {}).get("weights_hash")
            if old.get("params_hash") != phash or not same_model:
                continue
            lock = _try_lock(cand)
            if lock is None:
                print(f"not resuming {cand}: another process is writing it; starting a new run", file=sys.stderr)
                continue
            run_id = cand.name[: -len(PARTIAL)]
            print(f"resuming interrupted run {cand}")
            return Run(experiment, run_id, root, manifest, time.time(), resumed=True, _lock=lock)
    base = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{phash[:8]}"
    n = 1
    while True:  # same parameters started in the same second (or by another process): next free suffix
        run = Run(experiment, base if n == 1 else f"{base}-{n}", root, manifest, time.time())
        n += 1
        if run.path.exists():
            continue
        try:
            run.partial_path.mkdir(parents=True)  # atomic: the folder is ours
            break
        except FileExistsError:
            continue
    run._lock = _try_lock(run.partial_path)  # before run.json: nobody resumes a folder without one
    write_json(run.partial_path / "run.json", {"params_hash": phash, "model": model_info, "created": manifest["created"]})
    return run


@dataclass
class LoadedRun:
    """A finished run read back from disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def experiment(self) -> str:
        return self.manifest["experiment"]

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def parameters(self) -> dict[str, Any]:
        return self.manifest.get("parameters", {})

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        f = self.path / f"{name}.npz"
        if not f.is_file():
            raise ResultsError(f"{self.path} has no {f.name}")
        return read_npz(f, f"re-run {self.experiment} (the folder is damaged)")

    def table(self, name: str) -> pd.DataFrame:
        f = self.path / f"{name}.csv"
        if not f.is_file():
            raise ResultsError(f"{self.path} has no {f.name}")
        try:
            return pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{f} is damaged ({exc}): re-run {self.experiment}") from None


def _complete_runs(exp_dir: Path) -> list[Path]:
    """Finished run folders, oldest first (by the manifest's start time, then by name)."""
    if not exp_dir.is_dir():
        return []
    runs = [p for p in exp_dir.iterdir() if p.is_dir() and not p.name.endswith(PARTIAL)
            and (p / "manifest.json").is_file()]
    fix = "delete that folder or re-run the experiment"
    created = {p: str(read_json(p / "manifest.json", fix).get("created", "")) for p in runs}
    return sorted(runs, key=lambda p: (created[p], p.name))


def load_run(where: str | Path, experiment: str, model: Any = None, root: Path | None = None) -> LoadedRun:
    """Read a finished run of ``experiment``: a folder path, or "latest" (the newest complete run,
    with the same model weights when ``model`` is given). Checks status, experiment and model.
    """
    root = (root or results_root()).resolve()
    if str(where) == "latest":
        runs = _complete_runs(root / experiment)
        if model is not None:
            runs = [p for p in runs if (read_json(p / "manifest.json", "delete that folder").get("model") or {})
                    .get("weights_hash") == model.weights_hash]
        if not runs:
            raise ResultsError(f"no finished {experiment} run for this model under {root / experiment}: "
                               f"run `instab run {experiment}` first (or pass the folder of one)")
        path = runs[-1]
    else:
        path = Path(where).expanduser().resolve()
    if not path.is_dir():
        raise ResultsError(f"results folder {path} does not exist")
    manifest_file = path / "manifest.json"
    if path.name.endswith(PARTIAL):
        raise ResultsError(f"{path} is an incomplete run (interrupted before it finished): re-run {experiment} "
                           "to resume it, or delete the folder")
    if not manifest_file.is_file():
        raise ResultsError(f"{path} has no manifest.json: it is not the folder of a finished run "
                           f"(pass results/{experiment}/<run-id>, or 'latest')")
    manifest = read_json(manifest_file, f"re-run {experiment} (the folder is damaged)")
    if manifest.get("status") != "complete":
        raise ResultsError(f"{path} has status {manifest.get('status')!r}, not complete: re-run {experiment}")
    if manifest.get("experiment") != experiment:
        raise ResultsError(f"{path} holds a run of {manifest.get('experiment')!r}, expected {experiment!r}")
    if model is not None:
        have = (manifest.get("model") or {}).get("weights_hash")
        if have != model.weights_hash:
            raise ResultsError(f"{path} was computed with model weights {have}, but the loaded model "
                               f"({model.name}) has {model.weights_hash}: pass the matching model or re-run {experiment}")
    verify_files(path, manifest, experiment)
    return LoadedRun(path=path, manifest=manifest)


def verify_files(path: Path, manifest: dict[str, Any], experiment: str) -> None:
    """Every data file the manifest lists exists with the hash recorded when the run finished."""
    for name, recorded in (manifest.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise ResultsError(f"{f} is missing (the manifest lists it): re-run {experiment}")
        if file_sha256(f) != recorded:
            raise ResultsError(f"{f} does not match the hash its manifest recorded: it changed or was damaged "
                               f"after the run finished; re-run {experiment}")
