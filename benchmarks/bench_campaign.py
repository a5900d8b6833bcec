"""Campaign throughput: cells per minute on the local pool and on a local Ray instance, against plain papermill runs.

The same 4 cells (exp12, 2 prompts x 2 dtypes, small ray counts) run three ways on this machine, in one process:
  baseline   4 x `papermill nbs/exp12... -y PARAMS` one after another (a shell loop over plain papermill)
  local      `instab campaign run` on the local pool, `workers` cells at once
  ray        the same on a local Ray instance (started and stopped inside the timing)
Everything writes into a temporary folder. Prints wall time, cells/minute and the overhead per cell against the
baseline's mean cell time.

    python benchmarks/bench_campaign.py [--workers 2] [--angles 24]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from instab_core import book
from instab_core import campaign as C

ROOT = book.repo_root(Path(__file__).parent)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--angles", type=int, default=24)
    args = ap.parse_args()
    fixed = {"num_angles": args.angles, "bisect_rays": 0, "batch1_rays": 0}
    grid = {"text": ["The capital of France is", "Water boils at"], "dtype": ["float32", "float64"]}
    with tempfile.TemporaryDirectory(prefix="instab-bench-campaign-") as tmp:
        tmp = Path(tmp)
        base = C.from_dict({"name": "bench", "experiment": "exp12", "parameters": fixed, "grid": grid},
                           root=ROOT, folder=tmp / "unused")
        t0 = time.perf_counter()
        for i, cell in enumerate(base.cells):  # what a shell loop over plain papermill does
            argv = [sys.executable, "-m", "papermill", str(book.source("exp12", ROOT)), str(tmp / f"plain{i}.ipynb"),
                    "-y", yaml.safe_dump(cell.parameters), "-k", "python3", "--cwd", str(ROOT), "--no-progress-bar"]
            r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "INSTAB_RESULTS": str(tmp / "plain")})
            if r.returncode:
                sys.exit(f"baseline run {i} failed: {r.stderr.strip().splitlines()[-1:]}")
        baseline = time.perf_counter() - t0
        rows = [("baseline (papermill x4, serial)", baseline)]
        for backend in ("local", "ray"):
            c = C.from_dict({"name": f"bench-{backend}", "experiment": "exp12", "parameters": fixed, "grid": grid,
                             "workers": args.workers, "backend": backend}, root=ROOT, folder=tmp / backend)
            t0 = time.perf_counter()
            done = C.run(c, progress=False)
            if done.failed:
                sys.exit(f"{backend}: cells failed: {[done.outcomes[i].get('error') for i in done.failed]}")
            rows.append((f"{backend} pool, {args.workers} workers", time.perf_counter() - t0))
    n = len(base.cells)
    per_cell = baseline / n
    print(f"{n} cells of exp12 ({args.angles} rays each), {C.cpu_count()} CPUs")
    print(f"{'how':<36} {'wall s':>8} {'cells/min':>10} {'vs baseline':>12}")
    for name, secs in rows:
        print(f"{name:<36} {secs:8.1f} {60 * n / secs:10.2f} {baseline / secs:11.2f}x")
    for name, secs in rows[1:]:
        workers = args.workers
        print(f"overhead per cell, {name}: {secs * workers / n - per_cell:+.1f} s against a plain run's "
              f"{per_cell:.1f} s (wall x workers / cells - baseline per cell)")


if __name__ == "__main__":
    main()
