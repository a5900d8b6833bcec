"""``make bench-scale``: every notebook with its default parameters on a real-width model, timed.

    python benchmarks/scale.py [--shape llama-3.2-1b] [--layers 2] [--only exp12,exp02] [--md benchmarks/scale.md]

Builds ``SHAPE -L LAYERS`` (default llama-3.2-1b with 2 layers: d=2048, vocabulary 128256) into a temporary folder
with ``instab_core.zoo.shapes``, runs each notebook once with ``{"model": DIR}`` and otherwise its defaults via
``instab_core.book.run_notebook`` (executed notebooks and results into the temporary folder, never the checkout's
book/experiments/ or results/), and writes wall time, peak RSS of the notebook's kernel process and the outcome per
notebook into ``--md``. Each notebook runs in its own kernel; a failed one is recorded and the rest still run.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(name: str, model: str, tmp: Path, timeout: int) -> dict:
    """One notebook in a fresh child process (so its peak RSS, kernel included, is its own)."""
    code = (
        "import sys, json; from pathlib import Path; from instab_core import book\n"
        f"out = book.run_notebook({name!r}, {{'model': {model!r}}}, out_dir=Path({str(tmp / 'nb')!r}), "
        f"results_root=Path({str(tmp / 'results')!r}), progress=False)\n"
        "print(json.dumps({'ok': out.ok, 'error': ' '.join((out.error or '').split())[:400]}))\n"
    )
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    import json
    import signal

    # Own process group, so that a timeout also ends the notebook's kernel (a grandchild).
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
        last = (stdout.strip().splitlines() or ["{}"])[-1]
        res = json.loads(last) if last.startswith("{") else {"ok": False, "error": stderr.strip()[-400:]}
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        res = {"ok": False, "error": f"timed out after {timeout} s"}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"notebook": name, "wall_s": time.perf_counter() - t,
            "peak_rss_mib": peak / 1024 if peak > before else float("nan"), **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated notebook keys (default: all)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per notebook")
    ap.add_argument("--md", default=str(Path(__file__).with_name("scale.md")))
    args = ap.parse_args()
    from instab_core import book
    from instab_core.zoo import shapes

    root = book.repo_root()
    names = [n for n in book.experiments(root) if not args.only or n in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="instab-scale-") as tmp:
        model = str(shapes.build(args.shape, Path(tmp) / "model", layers=args.layers, progress=False))
        for name in names:
            r = run_one(name, model, Path(tmp), args.timeout)
            print(f"{name:28} {'ok' if r['ok'] else 'FAILED'} {r['wall_s']:8.1f} s  peak RSS {r['peak_rss_mib']:8.0f} MiB"
                  f"  {r['error'][:160]}", flush=True)
            rows.append(r)
    lines = [f"# Every notebook at real width: {args.shape}, {args.layers} layers", "",
             f"Written by `make bench-scale` (`benchmarks/scale.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs. Default parameters, `model` = the random-weight shape.", "",
             "Peak RSS is the largest of the notebook's processes (kernel included); NaN where it did not exceed an earlier "
             "notebook's (the counter is a running maximum).", "",
             "| notebook | ok | wall s | peak RSS MiB (kernel process) | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['notebook']} | {'yes' if r['ok'] else '**no**'} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['error']} |" for r in rows]
    Path(args.md).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
