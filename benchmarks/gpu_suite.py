"""The GPU suite's driver (run by ``benchmarks/gpu_suite.sh``; see its header for how to run it).

Builds (or takes) a scale model, measures the boundary kernel in process (1000 rays: wall time, forward rows/s
against pure-forward rows/s of the same rows in the same batch shape, prefix_cache beside it, the batch-invariance
audit, peak GPU memory), then runs the notebooks exp02 (top-k), exp12, exp10 (invariance table), exp04 (one
question) and fisher (one layer) with papermill into a scratch folder, and writes ``--md`` with the figures.

Everything goes under ``--work`` (models, executed notebooks, results); only ``--md`` is written elsewhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch


class GpuMemoryPoller:
    """Peak device memory in use (MiB, nvidia-smi, all processes: the notebook kernels are subprocesses)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self.base = interval, 0.0, self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _read() -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return float("nan")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> "GpuMemoryPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any finished child process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kernel_figures(model: str, device: str, rays: int, batch: int, text: str) -> dict[str, Any]:
    """exp12's kernel in process: top-2 plane, ``rays`` rays, full sequence and prefix_cache; pure forward of the rows."""
    import instab_core as ic

    fig: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    h = ic.load_model(model, device=device)
    fig["load_s"] = time.perf_counter() - t
    fig["device_name"] = ic.models.device_name(h.device)
    probe = ic.Probe(h, text, batch_size=batch)
    fig["d"], fig["layers"], fig["vocab"] = probe.d, h.n_layers, int(h.unembed.weight.shape[0])
    fig["prompt_tokens"] = int(probe.ids.shape[0])
    t = time.perf_counter()
    spec = ic.jacobian.top_singular(ic.Probe(h, text, batch_size=1), 2)
    fig["top2_s"] = time.perf_counter() - t
    _, D = ic.boundary.plane_directions(spec.Vt[0], spec.Vt[1], rays)
    D = D.to(probe.x0.device)
    ic.boundary.first_output_change(probe, D[:4], 1e-6, progress=False)  # warm-up
    for name, p in (("full", probe), ("prefix_cache", ic.boundary.prefix_cached(probe))):
        sync(device)
        t = time.perf_counter()
        res = ic.boundary.first_output_change(p, D, 1e-6, mode="fp64", progress=False)
        sync(device)
        t_kernel = time.perf_counter() - t
        X = p.x0.expand(res.rows, -1).clone()
        p.forward(X[:batch])
        sync(device)
        t = time.perf_counter()
        p.forward(X)
        sync(device)
        t_fwd = time.perf_counter() - t
        fig[name] = {"kernel_s": t_kernel, "rows": res.rows, "rows_per_s": res.rows / t_kernel,
                     "pure_forward_rows_per_s": res.rows / t_fwd, "kernel_over_forward": t_kernel / t_fwd,
                     "found": int((res.status == "found").sum()), "absorbed_mean": float(res.absorbed.mean()),
                     "audit": res.audit}
    fig["peak_gpu_mib_in_process"] = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                                      else float("nan"))
    return fig


def notebook_plan(rays: int, steps: int, layers_frac: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("exp02", {"check_float64": False, "precisions": ["float32"], "top_k": 5, "analyze_dims": [], "n_samples": 10}),
        # bisection and batch-1 re-runs are batch-1 loops: a sample of rays keeps them to a minute or two at 8B
        ("exp12", {"spectrum_method": "topk", "num_angles": rays, "batch1_rays": min(20, rays),
                   "bisect_rays": min(20, rays)}),
        ("exp10", {"invariance_dtypes": ["float32"], "batch_sizes": [1, 2, 8, 32, 64, 128], "threads": [1]}),
        ("exp04", {"questions": [1], "steps": steps, "survey_questions": [1], "survey_steps": min(20, steps)}),
        ("fisher", {"layers": layers_frac, "num_sentences": 1, "k": 2}),
    ]


def run_notebooks(model: str, device: str, work: Path, plan: list[tuple[str, dict[str, Any]]],
                  rows: list[dict[str, Any]], report: Any) -> None:
    """Run ``plan``'s notebooks, appending a row each to ``rows`` and calling ``report()`` after each one."""
    from instab_core import book

    for name, extra in plan:
        values = {"model": model, "device": device, **extra}
        t = time.perf_counter()
        with GpuMemoryPoller() as mem:
            try:
                out = book.run_notebook(name, values, out_dir=work / "notebooks", results_root=work / "results",
                                        progress=False)
                ok, error, results = out.ok, out.error, [str(r) for r in out.results]
            except Exception as exc:  # a refused parameter: reported in the table, the other notebooks still run
                ok, error, results = False, f"{type(exc).__name__}: {exc}", []
        row = {"notebook": name, "ok": ok, "wall_s": time.perf_counter() - t, "peak_gpu_mib": mem.peak,
               "gpu_mib_before": mem.base, "children_peak_rss_mib": children_peak_rss_mb(),
               "error": " ".join((error or "").split())[:300], "results": results, "parameters": extra}
        print(json.dumps(row), flush=True)
        rows.append(row)
        report()


def invariance_tables(rows: list[dict[str, Any]]) -> str:
    """exp10's saved tables (csv) as text, for the report."""
    import pandas as pd

    out = []
    for row in rows:
        if row["notebook"] != "exp10":
            continue
        for folder in row["results"]:
            for csv in sorted(Path(folder).glob("*.csv")):
                if "invariance" in csv.stem or "kv" in csv.stem:
                    df = pd.read_csv(csv)
                    out.append(f"`{csv.name}`\n\n```\n{df.to_string(max_rows=60, max_cols=14)}\n```\n")
    return "\n".join(out) or "(no invariance table found in exp10's results)\n"


def write_md(path: Path, args: argparse.Namespace, build: dict[str, Any], fig: dict[str, Any] | None,
             rows: list[dict[str, Any]], total_s: float, errors: list[str]) -> None:
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else "none"
    lines = [f"# GPU suite: {args.shape} ({'full depth' if not args.layers else f'{args.layers} layers'}), {args.device}",
             "", f"Written by `benchmarks/gpu_suite.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "Random weights of the real shape (`instab_core.zoo.shapes`): the costs are real, the science is not.", "",
             f"- GPU: **{gpu}**; host {platform.node()}, {os.cpu_count()} CPUs",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}",
             f"- model build: {build.get('seconds', float('nan')):.1f} s ({build.get('note', '')})",
             f"- whole suite: {total_s:.0f} s", ""]
    if fig:
        lines += [f"## exp12's kernel in process: {args.rays} rays, batch {args.batch}, prompt of {fig['prompt_tokens']} "
                  f"tokens, d={fig['d']}, {fig['layers']} layers, V={fig['vocab']}", "",
                  f"model load {fig['load_s']:.1f} s; top-2 singular vectors (matrix-free) {fig['top2_s']:.1f} s; "
                  f"peak GPU memory (this process) {fig['peak_gpu_mib_in_process']:.0f} MiB", "",
                  "| semantics | kernel s | rows | kernel rows/s | pure-forward rows/s | kernel ÷ forward time | found | absorbed (mean) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in ("full", "prefix_cache"):
            f = fig[name]
            lines.append(f"| {name} | {f['kernel_s']:.2f} | {f['rows']} | {f['rows_per_s']:.0f} | "
                         f"{f['pure_forward_rows_per_s']:.0f} | {f['kernel_over_forward']:.2f} | {f['found']} | "
                         f"{f['absorbed_mean']:.2f} |")
        lines += ["", "Goals (issue 13): exp12 with 1000 rays on the 8B shape in under 2 minutes; kernel time within 1.3× "
                  "of the pure forward time of its rows.", "", "Batch-invariance audit on this device (full sequence):", "",
                  "```", json.dumps(fig["full"]["audit"], indent=1), "```", ""]
    lines += ["## Notebooks", "", "| notebook | ok | wall s | peak GPU MiB (nvidia-smi, all processes) | parameters | error |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['notebook']} | {'yes' if r['ok'] else '**no**'} | {r['wall_s']:.1f} | {r['peak_gpu_mib']:.0f} | "
                     f"`{json.dumps(r['parameters'])}` | {r['error']} |")
    lines += ["", "## exp10's invariance tables", "", invariance_tables(rows)]
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=0, help="0: full depth")
    ap.add_argument("--model", default=None, help="an existing model directory (skips the build)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rays", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fisher-layer", default="1/2", help="fisher's layers parameter (a fraction of depth)")
    ap.add_argument("--text", default="The capital of France is")
    ap.add_argument("--work", required=True, help="scratch folder: model, notebooks, results")
    ap.add_argument("--md", required=True, help="the report to write (benchmarks/gpu.md)")
    ap.add_argument("--skip", default="", help="comma-separated: kernel, and/or notebook names")
    args = ap.parse_args()
    t_all = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    errors: list[str] = []
    build: dict[str, Any] = {}
    model = args.model
    if model is None:
        from instab_core.zoo import shapes

        t = time.perf_counter()
        model = str(shapes.build(args.shape, work / "model", layers=args.layers or None, seed=0))
        build = {"seconds": time.perf_counter() - t, "note": f"{args.shape}, built into {model}"}
    else:
        build = {"seconds": 0.0, "note": f"given: {model}"}
    print(f"model {model}: build {build['seconds']:.1f} s", flush=True)
    fig: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []

    def report() -> None:
        # rewritten after every stage: a run stopped by a time limit still leaves what it measured
        write_md(Path(args.md), args, build, fig, rows, time.perf_counter() - t_all, errors)

    report()
    if "kernel" not in skip:
        try:
            fig = kernel_figures(model, args.device, args.rays, args.batch, args.text)
            # its model is garbage now: hand the cached blocks back, or the notebooks share the GPU with 32 GB of it
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(json.dumps(fig, default=str), flush=True)
        except Exception as exc:
            errors.append(f"kernel figures: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        report()
    plan = [(n, p) for n, p in notebook_plan(args.rays, args.steps, args.fisher_layer) if n not in skip]
    run_notebooks(model, args.device, work, plan, rows, report)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
