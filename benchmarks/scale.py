"""``make bench-scale``: every notebook with its default parameters on a real-width model, timed.

    python benchmarks/scale.py [--shape llama-3.2-1b] [--layers 2] [--only exp12,exp02] [--timeout 3600] [--fresh]

Builds ``SHAPE -L LAYERS`` (default llama-3.2-1b with 2 layers: d=2048, vocabulary 128256) into the work folder
with ``instab_core.zoo.shapes``, runs each notebook once with ``{"model": DIR}`` (``{"models": [DIR]}``) and otherwise
its defaults via ``instab_core.book.run_notebook`` (executed notebooks and results into the work folder, never the
checkout's book/experiments/ or results/), and records wall time, the peak RSS of the notebook's kernel and the
outcome. A notebook that takes a GPT-2 family model instead (decomposition: ``gpt2_model``) gets ``gpt2-xl -L LAYERS``
(d=1600, vocabulary 50257), built next to the other model when such a notebook is first to run.

Hours on a 2-core CPU, so nothing is lost: after every notebook the record ``benchmarks/scale.json`` and the table
``benchmarks/scale.md`` are rewritten (atomically), and a later run skips the notebooks already finished for the
same shape (``--fresh`` starts over; a failed, timed-out or skipped notebook is retried). Cheap notebooks run first.
The models (``model/``, ``model-gpt2-xl/``) and the runs' results live in ``--work`` (default
``~/.cache/instab/scale-SHAPE-LLAYERS``, outside the checkout), so a resumed run reuses the models and exp15 finds the
exp12/exp13 runs it reads; where the work folder lacks the run a notebook reads (exp07: exp06; exp15: exp12, exp13),
that upstream notebook runs again first.

The table ends with the cost model of ``benchmarks/bench_scale_costs.py`` (each size-dependent kernel against the
seed's method at d = 128, 512, 2048), read from ``benchmarks/scale_costs.json``, which ``make bench-scale`` writes
first (also resumable: only the kernels and sizes it lacks are measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_scale_costs renders the cost table
# Run last, most expensive last (measured or estimated at d=2048 on 2 cores): a partial run still covers the rest.
LAST = ["fisher", "exp06", "exp07", "exp04", "exp08", "levelsets", "exp13", "exp15"]
# The notebooks whose runs another notebook reads ("latest" for this model in the work folder's results).
UPSTREAM = {"exp07": ["exp06"], "exp15": ["exp12", "exp13"]}
GPT2_SHAPE = "gpt2-xl"  # for the notebooks that take a GPT-2 family model (gpt2_model)


def declared(name: str) -> dict:
    from instab_core import book, params

    return params.declared(book.source(name))


def model_parameter(name: str, model: str, gpt2_model: str) -> dict | None:
    """The parameters that point notebook ``name`` at ``model``, or at ``gpt2_model`` where it takes a GPT-2 family
    model (decomposition); None: it takes no model."""
    names = declared(name)
    if "model" in names:
        return {"model": model}
    if "models" in names:
        return {"models": [model]}
    if "gpt2_model" in names:
        return {"gpt2_model": gpt2_model}
    return None


def ensure_model(shape: str, path: Path, layers: int) -> Path:
    """``shape -L layers`` built into ``path`` once; a build interrupted before it finished is redone."""
    from instab_core.zoo import shapes

    if not (path / "shape.json").is_file():  # written last by shapes.build
        shutil.rmtree(path, ignore_errors=True)
        shapes.build(shape, path, layers=layers, progress=False)
    return path


def has_run(work: Path, name: str) -> bool:
    """Whether the work folder holds a finished run of ``name`` (one that a downstream notebook can read)."""
    from instab_core.results import PARTIAL

    folder = work / "results" / name
    return folder.is_dir() and any((p / "manifest.json").is_file() for p in folder.iterdir()
                                   if p.is_dir() and not p.name.endswith(PARTIAL))


def to_run(names: list[str], rows: dict, work: Path) -> list[str]:
    """The notebooks of ``names`` not yet finished, plus every upstream notebook a downstream one of them reads
    whose run is not in ``work`` (a fresh work folder: finished in the record, but its results are gone), in the
    order of ``names``."""
    todo = {n for n in names if not rows.get(n, {}).get("ok")}
    todo |= {u for n in todo for u in UPSTREAM.get(n, []) if not has_run(work, u)}
    return [n for n in names if n in todo]


def run_one(name: str, given: dict | None, tmp: Path, timeout: int) -> dict:
    """One notebook with parameters ``given`` in a fresh child process; it reports the peak RSS of its own children
    (the kernel)."""
    if given is None:
        return {"notebook": name, "wall_s": 0.0, "peak_rss_mib": float("nan"), "ok": False, "skipped": True,
                "error": "not run: the notebook takes no model parameter", "finished": ""}
    code = (
        "import sys, json, resource; from pathlib import Path; from instab_core import book\n"
        f"out = book.run_notebook({name!r}, {given!r}, out_dir=Path({str(tmp / 'nb')!r}), "
        f"results_root=Path({str(tmp / 'results')!r}), progress=False)\n"
        "kernel = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'ok': out.ok, 'error': ' '.join((out.error or '').split())[:400], "
        "'peak_rss_mib': kernel}))\n"
    )
    t = time.perf_counter()
    # Own process group, so that a timeout also ends the notebook's kernel (a grandchild).
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
        last = (stdout.strip().splitlines() or ["{}"])[-1]
        res = json.loads(last) if last.startswith("{") else {"ok": False,
                                                              "error": " ".join(stderr.split())[-400:] or "no output"}
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        res = {"ok": False, "error": f"timed out after {timeout} s"}
    return {"notebook": name, "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_mib": round(res.pop("peak_rss_mib", float("nan")), 0), "ok": bool(res.get("ok")),
            "error": res.get("error", ""), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# Where the seed profile changes a notebook's work, the work unit its time is taken to be proportional to (an
# extrapolation of the measured default run, an upper bound where fixed costs such as the Jacobian dominate).
UNITS: dict[str, tuple[str, Callable[[dict, int], float]]] = {
    "exp12": ("rays, batched plus batch-1 (num_angles + batch1_rays)", lambda p, d: p["num_angles"] + p["batch1_rays"]),
    "exp02": ("noise samples (n_samples)", lambda p, d: p["n_samples"]),
    "exp01": ("steps (part2_jumps + part3_steps)", lambda p, d: p["part2_jumps"] + p["part3_steps"]),
    "exp11": ("rolls × jumps (d / roll_step · len(jumps))", lambda p, d: d / p["roll_step"] * len(p["jumps"])),
    "exp14": ("steps (num_steps)", lambda p, d: p["num_steps"]),
    "exp04": ("generated tokens (len(questions) · steps)", lambda p, d: len(p["questions"]) * p["steps"]),
    "exp08": ("generated tokens (len(questions) · steps)", lambda p, d: len(p["questions"]) * p["steps"]),
    "fisher": ("sentences (num_sentences)", lambda p, d: p["num_sentences"]),
    "lipschitz": ("directions (top_k + len(analyze_dims))", lambda p, d: p["top_k"] + len(p["analyze_dims"])),
    "levelsets": ("coordinates differenced (cd_dims, all d in the seed)",
                  lambda p, d: d if p["cd_dims"] is None else min(d, p["cd_dims"])),
    "linearity": ("directions × radii × scopes", lambda p, d: p["num_directions"] * len(p["radii"]) * len(p["scopes"])),
}


def seed_cost(name: str, wall: float, d: int) -> str:
    """What the notebook's ``seed`` profile costs at this width, from the measured default run."""
    from instab_core import book, params

    src = book.source(name)
    default = {k: v.default for k, v in params.declared(src).items()}
    seed = params.profiles(src).get("seed")
    if seed is None:
        return "no seed profile"
    changed = {k: v for k, v in seed.items() if default.get(k) != v}
    if not changed:
        return f"{wall:.0f} s (the seed's sizes are the defaults)"
    if name not in UNITS:
        return "not extrapolated: it sets " + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + \
            ", not a work unit of this run"
    label, unit = UNITS[name]
    ratio = unit({**default, **seed}, d) / unit(default, d)
    return f"≈ {wall * ratio:.0f} s ({ratio:.3g} × the {label})"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def annotate(record: dict) -> dict:
    """Each finished row also says which model it ran on and what the seed profile costs at this width (the book's
    pages quote both from scale.json, see ``instab_core.book.real_width_note``)."""
    main = f"{record['shape']} -L {record['layers']} (d = {record.get('d', '?')}, vocabulary {record.get('vocab', '?')})"
    g = record.get("gpt2")
    gpt2 = f"{g['shape']} -L {g['layers']} (d = {g['d']}, vocabulary {g['vocab']})" if g else "?"
    for name, r in record["rows"].items():
        if r["ok"]:
            r["model"] = gpt2 if "gpt2_model" in (model_parameter(name, "", "") or {}) else main
            r["seed_cost"] = seed_cost(name, r["wall_s"], int(record.get("d") or 0))
    return record


def table(record: dict) -> str:
    rows = record["rows"]
    done = sum(r["ok"] for r in rows.values())  # skipped ones are counted apart
    lines = [f"# Every notebook at real width: {record['shape']}, {record['layers']} layers", "",
             f"Written by `make bench-scale` (`benchmarks/scale.py`); {done} of {len(record['notebooks'])} notebooks "
             f"finished so far. Machine: {record['machine']}. Default parameters, `model` = the random-weight shape "
             f"(d = {record.get('d', '?')}, vocabulary {record.get('vocab', '?')})"
             + (f"; `gpt2_model` (decomposition) = {record['gpt2']['shape']} with {record['gpt2']['layers']} layers "
                f"(d = {record['gpt2']['d']}, vocabulary {record['gpt2']['vocab']})" if record.get("gpt2") else "")
             + ". Peak RSS is the notebook's kernel process (its largest resident set).", "",
             "The seed column is what the notebook's `seed` profile (`instab run NAME --profile seed`) costs at this "
             "width: measured where the seed's sizes are the defaults, else extrapolated from this run in proportion "
             "to the work unit named (an upper bound where fixed costs, such as a Jacobian, dominate).", "",
             "| notebook | ok | wall s | peak RSS MiB | seed profile at this width | finished | error |",
             "|---|---|---|---|---|---|---|"]
    for name in record["notebooks"]:
        r = rows.get(name)
        if r is None:
            lines.append(f"| {name} | not yet run | | | | | |")
        else:
            seed = r.get("seed_cost", "") if r["ok"] else ""
            ok = "yes" if r["ok"] else "skipped" if r.get("skipped") else "**no**"
            lines.append(f"| {name} | {ok} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                         f"{seed} | {r['finished']} | {r['error']} |")
    costs = HERE / "scale_costs.json"  # bench_scale_costs.py --record, which make bench-scale runs first
    if costs.is_file():
        from bench_scale_costs import markdown

        lines += ["", markdown(json.loads(costs.read_text()))]
    else:
        lines += ["", "(No cost table yet: `python benchmarks/bench_scale_costs.py --record benchmarks/scale_costs.json`.)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated notebook keys (default: all)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per notebook")
    ap.add_argument("--fresh", action="store_true", help="forget the notebooks already recorded for this shape")
    ap.add_argument("--md", default=str(HERE / "scale.md"))
    ap.add_argument("--table-only", action="store_true", help="rewrite --md from the record, run nothing")
    ap.add_argument("--work", default="", help="model and results folder (default ~/.cache/instab/scale-SHAPE-LN)")
    args = ap.parse_args()
    from instab_core import book

    root = book.repo_root()
    order = [n for n in book.experiments(root) if n not in LAST] + [n for n in LAST if n in book.experiments(root)]
    wanted = set(args.only.split(",") if args.only else order)
    if wanted - set(order):
        raise SystemExit(f"--only: no notebook {sorted(wanted - set(order))}; the notebooks are {order}")
    wanted |= {u for n in wanted for u in UPSTREAM.get(n, [])}
    names = [n for n in order if n in wanted]
    md = Path(args.md)
    store = md.with_suffix(".json")
    record = json.loads(store.read_text()) if store.is_file() and not args.fresh else {}
    if (record.get("shape"), record.get("layers")) != (args.shape, args.layers):
        record = {"shape": args.shape, "layers": args.layers, "rows": {}}
    record["notebooks"] = list(dict.fromkeys([*record.get("notebooks", []), *names]))
    record["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.node()}"
    if args.table_only:
        _write(store, json.dumps(annotate(record), indent=1))
        _write(md, table(record))
        print(f"wrote {md}")
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    work = Path(args.work or cache / "instab" / f"scale-{args.shape}-L{args.layers}")
    todo = to_run(names, record["rows"], work)
    print(f"{args.shape} -L {args.layers}: running {todo}; already finished: {[n for n in names if n not in todo]}")
    model = ensure_model(args.shape, work / "model", args.layers)
    gpt2 = work / f"model-{GPT2_SHAPE}"
    cfg = json.loads((model / "config.json").read_text())
    record.update(d=cfg.get("hidden_size"), vocab=cfg.get("vocab_size"), work=str(work))
    for name in todo:
        given = model_parameter(name, str(model), str(gpt2))
        if given is not None and "gpt2_model" in given:
            g = json.loads((ensure_model(GPT2_SHAPE, gpt2, args.layers) / "config.json").read_text())
            record["gpt2"] = {"shape": GPT2_SHAPE, "layers": g["n_layer"], "d": g["n_embd"], "vocab": g["vocab_size"]}
        r = run_one(name, given, work, args.timeout)
        print(f"{name:28} {'ok' if r['ok'] else 'FAILED'} {r['wall_s']:8.1f} s  peak RSS {r['peak_rss_mib']:8.0f} MiB"
              f"  {r['error'][:160]}", flush=True)
        record["rows"][name] = r
        _write(store, json.dumps(annotate(record), indent=1))
        _write(md, table(record))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
