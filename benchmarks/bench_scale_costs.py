"""Cost model: how each size-dependent kernel and the seed's method for it grow with width and vocabulary.

    python benchmarks/bench_scale_costs.py [--sizes 128,512,2048] [--layers 2] [--only jacobian,boundary,...]
                                           [--record benchmarks/scale_costs.json [--fresh]]

Three random-weight Llama shapes built by ``instab_core.zoo.shapes`` (the llama-3.2-1b code path) into a
temporary folder, ``--layers`` decoder layers each: d=128 / V=2048, d=512 / V=32000, and the exact
llama-3.2-1b width d=2048 / V=128256. For each kernel, the instab method and the seed's method run on the same
model and inputs in this one process; printed per size: wall seconds, peak memory above the resident model
(MB; Linux VmHWM reset per measurement, page-granular), and the ratio seed ÷ instab, then how the ratio grows
from the smallest to the largest size.

Expensive seed methods are measured on a few units and extrapolated linearly in the units (marked ``~``):
a unit is one VJP row (dense Jacobian), one ray (boundary), one grid cell (exp07), one coordinate (central
differences: 2 projections). Everything else is measured in full. Kernels (seed's method in brackets):

* jacobian — matrix-free top-2 singular triplets (``jacobian.top_singular``) and the chunked dense jacrev + SVD
  [the seed: ``torch.autograd.functional.jacobian``, one backward per output row, then the SVD];
* boundary — exp12/13's exact kernel, batch 64, full sequence and ``prefix_cache`` [bisection + ULP walk at
  batch 1, ``bench_boundary.seed_style``]; exp13 runs d rays, so its cost is d × the per-ray figure;
* grid — exp07's ``decision.gap_grid`` on a 16×16 grid of logits gaps [one HF forward per cell at batch 1
  with all hidden states, ``bench_decision.seed_style_cells``];
* trace — exp04's ``trace.capture`` with the KV cache [the whole sequence re-run every step];
* levelset — the analytic normal, one backward [central differences with the converging settings: signed,
  Newton projections, δ = 1e-2, tolerance ε·1e-5];
* fisher — exact matrix-free Lanczos over the full vocabulary [the seed's unembedding-only top-200 dense eigh];
* linearity — one parameter-space JVP per direction [one per (direction, radius)], scope last_blocks:1.

Random weights make costs real, not the science: the numbers here are times and memory only. The table is
printed as markdown; with ``--record`` every measurement is kept in a JSON file (rewritten after each kernel), a
later run measures only the (kernel, size) pairs missing from it, and ``benchmarks/scale.py`` puts the table at the
end of ``benchmarks/scale.md`` (``make bench-scale`` runs both).

Run time: 26 min on a shared, loaded 2-core machine at one thread with 2 seed rays and 4 coordinates (the
defaults are now 1 and 2), most of it the seed's methods at d=2048 (bisection + ULP walk ~100 s a ray, central
differences ~1 min a coordinate) and the exact Fisher (148 s); ``--sizes 128,512`` takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import instab_core as ic
from instab_core.zoo import shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_boundary import seed_style as boundary_seed_style  # noqa: E402
from bench_decision import seed_style_cells  # noqa: E402

TEXT = "The capital of France is"
SIZES: dict[int, dict[str, int]] = {
    128: dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
              vocab_size=2048),
    512: dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              vocab_size=32000),
    2048: {},  # llama-3.2-1b exactly (d=2048, 32 heads, 8 kv heads, intermediate 8192, V=128256, tied)
}
KERNELS = ("jacobian", "boundary", "grid", "trace", "levelset", "fisher", "linearity")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status: the peak-memory measurement needs Linux")


def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak MB above the RSS before the call, result) of one call."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    t = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t
    return sec, max(0.0, (_status_kb("VmHWM") - base) / 1024), out


class Row:
    """One method of one kernel at one size: time (s), peak MB, whether extrapolated, a note."""

    def __init__(self, sec: float, mb: float, extrapolated: bool = False, note: str = "") -> None:
        self.sec, self.mb, self.extrapolated, self.note = sec, mb, extrapolated, note

    def cell(self) -> str:
        if self.extrapolated:
            return f"~{self.sec:.3g} s / {self.mb:.0f} MB ({self.note})"
        return f"{self.sec:.3g} s / {self.mb:.0f} MB"


def extrapolated(fn: Callable[[int], Any], units: int, total: int, unit: str) -> Row:
    """Run ``fn(units)`` and scale its time linearly to ``total`` units (memory as measured)."""
    sec, mb, _ = measure(lambda: fn(units))
    return Row(sec * total / units, mb, extrapolated=units < total, note=f"{units} of {total} {unit}")


# --- kernels: each returns {method name: Row}; the first entry is instab's, the seed's is marked ------------

def k_jacobian(h: ic.ModelHandle) -> dict[str, Row]:
    from torch.func import vjp, vmap

    probe = ic.Probe(h, TEXT, batch_size=1)
    d = probe.d
    ic.jacobian.top_singular(probe, 2)  # warm-up
    sec, mb, _ = measure(lambda: ic.jacobian.top_singular(probe, 2))
    rows = {"top-2 matrix-free": Row(sec, mb)}
    _, vjp_fn = vjp(probe.f, probe.x0)
    eye = torch.eye(probe.reference.shape[0], dtype=probe.dtype)

    def jacrev_rows(n: int) -> None:  # the chunked dense jacrev: one vmapped VJP chunk of n rows
        vmap(lambda u: vjp_fn(u)[0])(eye[:n])

    chunk = min(d, 256)
    r = extrapolated(jacrev_rows, chunk, d, "rows")
    A = torch.randn(d, d, dtype=torch.float64)
    t_svd, mb_svd, _ = measure(lambda: torch.linalg.svd(A))
    rows["dense jacrev + SVD"] = Row(r.sec + t_svd, max(r.mb, mb_svd) + 4 * d * d / 2**20, r.extrapolated, r.note)

    def seed_rows(n: int) -> None:  # torch.autograd.functional.jacobian: one backward per output row
        x = probe.x0.clone().requires_grad_(True)
        y = probe.f(x)
        for i in range(n):
            torch.autograd.grad(y[i], x, retain_graph=True)

    s = extrapolated(seed_rows, min(d, 16), d, "rows")
    rows["seed: autograd jacobian + SVD"] = Row(s.sec + t_svd, max(s.mb, mb_svd) + 4 * d * d / 2**20, s.extrapolated,
                                                    s.note)
    return rows


def k_boundary(h: ic.ModelHandle, rays: int = 16, seed_rays: int = 1) -> dict[str, Row]:
    probe = ic.Probe(h, TEXT, batch_size=64)
    gen = torch.Generator().manual_seed(0)
    D = torch.randn(rays, probe.d, generator=gen)
    D = D / D.norm(dim=1, keepdim=True)
    ic.boundary.first_output_change(probe, D[:2], 1e-6, progress=False)
    sec, mb, _ = measure(lambda: ic.boundary.first_output_change(probe, D, 1e-6, progress=False))
    rows = {"exact, batch 64 (per ray)": Row(sec / rays, mb)}
    cached = ic.boundary.prefix_cached(probe)
    sec, mb, _ = measure(lambda: ic.boundary.first_output_change(cached, D, 1e-6, progress=False))
    rows["exact, prefix_cache (per ray)"] = Row(sec / rays, mb)
    p1 = probe.with_batch_size(1)
    sec, mb, _ = measure(lambda: [boundary_seed_style(p1, D[i], 1e-6, 100_000) for i in range(seed_rays)])
    rows["seed: bisect + ULP walk, batch 1 (per ray)"] = Row(sec / seed_rays, mb, note=f"{seed_rays} rays")
    return rows


def k_grid(h: ic.ModelHandle, n: int = 16, seed_cells: int = 16) -> dict[str, Row]:
    from instab_core import decision as dc

    probe = ic.Probe(h, TEXT, target="logits", batch_size=64)
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(probe.d, 2, generator=gen, dtype=torch.float64))
    h1, h2 = Q[:, 0].float(), Q[:, 1].float()
    top = torch.topk(probe.reference, 2).indices
    pair = (int(top[0]), int(top[1]))
    a = dc.grid_axis(-1e-6, 1e-6, n=n)
    dc.gap_grid(probe, probe.x0, h1, h2, a[:4], a[:4], pair=pair, audit=False)
    sec, mb, _ = measure(lambda: dc.gap_grid(probe, probe.x0, h1, h2, a, a, pair=pair, audit=False))
    rows = {f"gap_grid {n}×{n}, batch 64": Row(sec, mb)}
    cells = np.arange(n * n)
    s = extrapolated(lambda k: seed_style_cells(h, probe, probe.x0, h1, h2, a, a, cells[:k], *pair), seed_cells, n * n,
                     "cells")
    rows[f"seed: batch-1 forward per cell"] = s
    return rows


def k_trace(h: ic.ModelHandle, steps: int = 16) -> dict[str, Row]:
    from instab_core import trace as tr

    def cap(use_cache: bool) -> Callable[[], Any]:
        def run() -> None:
            with tempfile.TemporaryDirectory(prefix="instab-cost-trace-") as d:
                tr.capture(h, TEXT, Path(d) / "t", steps=steps, use_cache=use_cache, stop_at_eos=False, progress=False)
        return run

    cap(True)()
    rows = {}
    sec, mb, _ = measure(cap(True))
    rows[f"capture {steps} steps, KV cache"] = Row(sec, mb)
    sec, mb, _ = measure(cap(False))
    rows[f"seed: re-run the sequence every step"] = Row(sec, mb)
    return rows


def k_levelset(h: ic.ModelHandle, dims: int = 2) -> dict[str, Row]:
    from instab_core import levelsets as L

    target = h.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    X0 = L.sample_vocab_ellipse(h, 1, seed=0)
    eps, _ = L.choose_epsilon(h, target, X0)  # the seed's 1e-6 is out of a random model's reach
    tight = L.LevelSet(h, target, eps, tolerance=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = tight.project(X0).points[0]
    tight.analytic_normal(x[None])
    sec, mb, _ = measure(lambda: tight.analytic_normal(x[None]))
    rows = {"analytic normal (1 backward)": Row(sec, mb)}
    d = x.shape[0]
    delta = 1e-2

    def cd(k: int) -> None:  # the converging central difference on k coordinates: 2k Newton projections
        L.central_difference_normal(tight, x, delta=delta, method="newton", max_iters=100, variant="signed",
                                    dims=np.arange(k))

    rows["seed: central differences (converging)"] = extrapolated(cd, min(d, dims), d, "coordinates")
    return rows


def k_fisher(h: ic.ModelHandle) -> dict[str, Row]:
    from instab_core import fisher as fi
    from instab_core.zoo.corpus import ANIMAL_SENTENCES

    site = fi.find_site(h, ANIMAL_SENTENCES[0])
    hv = fi.residual(h, site.ids, 0, site.position)
    fi.exact_fisher(h, site.ids, 0, site.position, k=1, h=hv)
    sec, mb, _ = measure(lambda: fi.exact_fisher(h, site.ids, 0, site.position, k=1, h=hv))
    rows = {"exact Lanczos, full V": Row(sec, mb)}
    sec, mb, _ = measure(lambda: fi.seed_fisher(h, hv, 200))
    rows["seed: W_U only, top-200, dense eigh"] = Row(sec, mb)
    return rows


def k_linearity(h: ic.ModelHandle, n_dirs: int = 2, n_radii: int = 5) -> dict[str, Row]:
    from torch.func import jvp

    from instab_core import linearity as L

    params = L.scoped_parameters(h, "last_blocks:1")
    primals = {k: p.detach() for k, p in params.items()}
    f = L.logit_function(h, L.encode_prompts(h, [TEXT]))
    dirs = L.random_directions(params, n_dirs, seed=0)
    radii = np.logspace(-3, 1, n_radii)

    def kernel() -> None:
        for dd in dirs:
            jd = jvp(f, (primals,), (dd,))[1]
            _ = [r * jd for r in radii]

    def naive() -> None:
        for dd in dirs:
            _ = [jvp(f, (primals,), ({k: r * v for k, v in dd.items()},))[1] for r in radii]

    kernel()
    sec, mb, _ = measure(kernel)
    rows = {f"1 jvp per direction ({n_dirs}×{n_radii})": Row(sec, mb)}
    sec, mb, _ = measure(naive)
    rows["seed: 1 jvp per (direction, radius)"] = Row(sec, mb)
    return rows


FUNCS: dict[str, Callable[[ic.ModelHandle], dict[str, Row]]] = {
    "jacobian": k_jacobian, "boundary": k_boundary, "grid": k_grid, "trace": k_trace, "levelset": k_levelset,
    "fisher": k_fisher, "linearity": k_linearity,
}


def markdown(record: dict) -> str:
    """The cost table of a record: every kernel's methods at each size, then seed ÷ instab and its growth."""
    sizes = sorted({int(d) for rows in record["rows"].values() for d in rows})
    vocab = record.get("vocab", {})
    head = [f"d={d} / V={vocab.get(str(d), '?')}" for d in sizes]
    lines = ["## Cost model: each size-dependent kernel against the seed's method", "",
             f"Written by `benchmarks/bench_scale_costs.py --record` (`make bench-scale` runs it first). Random Llama "
             f"shapes with {record['layers']} decoder layers; {record['machine']}; {record['threads']} torch thread(s). "
             "Each cell: wall seconds / peak MB above the resident model; `~` = extrapolated linearly from a measured "
             "part (the units measured in brackets). The ratio rows: the seed's method ÷ instab's (the "
             "first method of the kernel) at each size, and how it grows from the smallest to the largest size.", "",
             "| kernel | method | " + " | ".join(head) + " | growth |", "|---|---|" + "---|" * (len(sizes) + 1)]
    for k, by_size in record["rows"].items():
        methods = list(dict.fromkeys(m for d in sizes for m in by_size.get(str(d), {})))
        for m in methods:
            cells = [Row(**by_size[str(d)][m]).cell() if m in by_size.get(str(d), {}) else "failed" for d in sizes]
            lines.append(f"| {k} | {m} | " + " | ".join(cells) + " | |")
        for m in methods[1:]:
            ratios = [by_size[str(d)][m]["sec"] / by_size[str(d)][methods[0]]["sec"]
                      if m in by_size.get(str(d), {}) and methods[0] in by_size.get(str(d), {}) else float("nan")
                      for d in sizes]
            growth = f"{ratios[-1] / ratios[0]:.2f}×" if len(ratios) > 1 and ratios[0] > 0 else "–"
            lines.append(f"| {k} | ratio: {m} ÷ {methods[0]} | " + " | ".join(f"{r:.3g}×" for r in ratios)
                         + f" | {growth} |")
    errors = record.get("errors", {})
    if errors:
        lines += ["", "Failed (re-run to retry):", *[f"- {k}: {e}" for k, e in errors.items()]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,512,2048")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--only", default=",".join(KERNELS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads made small forwards 6-15x slower)")
    ap.add_argument("--record", default="", help="JSON file of measurements, rewritten after every kernel; a later "
                    "run measures only the (kernel, size) pairs it lacks (scale.py puts its table in scale.md)")
    ap.add_argument("--fresh", action="store_true", help="with --record: forget what it holds and measure all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    kernels = args.only.split(",")
    bad = [k for k in kernels if k not in FUNCS] + [s for s in sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"unknown kernel or size {bad}; kernels {list(FUNCS)}, sizes {list(SIZES)}")
    store = Path(args.record) if args.record else None
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    fresh = {"layers": args.layers, "threads": args.threads, "machine": machine, "rows": {}, "vocab": {}, "errors": {}}
    record = json.loads(store.read_text()) if store and store.is_file() and not args.fresh else fresh
    if (record.get("layers"), record.get("threads"), record.get("machine")) != (args.layers, args.threads, machine):
        record = fresh  # measurements of another setting are not comparable with the ones to come
    torch.manual_seed(0)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="instab-costs-") as tmp:
        for d in sizes:
            todo = [k for k in kernels if str(d) not in record["rows"].get(k, {})]
            if not todo:
                continue
            path = shapes.build("llama-3.2-1b", Path(tmp) / f"d{d}", layers=args.layers, overrides=SIZES[d] or None,
                                progress=False)
            h = ic.load_model(path)
            record["vocab"][str(d)] = h.unembed.weight.shape[0]
            print(f"\n== d={d}, V={record['vocab'][str(d)]}, {h.n_layers} layers ({ic.models.device_name(h.device)})",
                  flush=True)
            gc.collect()
            for k in todo:
                t = time.perf_counter()
                try:
                    rows = FUNCS[k](h)
                except Exception as exc:  # reported, never hidden: the table says the kernel failed at this size
                    record["errors"][f"{k} at d={d}"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                else:
                    record["errors"].pop(f"{k} at d={d}", None)
                    record["rows"].setdefault(k, {})[str(d)] = {m: vars(r) for m, r in rows.items()}
                    print(f"  {k:10} ({time.perf_counter() - t:.1f} s) "
                          + "; ".join(f"{m} {r.cell()}" for m, r in rows.items()), flush=True)
                if store:
                    ic.results.write_json(store, record)
            del h
            gc.collect()
    print(f"\n(measured in {time.perf_counter() - t_all:.0f} s)\n")
    print(markdown(record))


if __name__ == "__main__":
    main()
