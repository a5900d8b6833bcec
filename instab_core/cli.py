"""The ``instab`` command: list models, run one experiment notebook, build the book."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .params import parse_value  # noqa: F401  (the -p value parser; re-exported)


def cmd_models(_: argparse.Namespace) -> int:
    from .models import BUNDLED
    print(f"{'name':<12} {'architecture':<18} {'layers':>6} {'d_model':>7} {'params':>9}  path")
    for name, path in BUNDLED.items():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            print(f"{name:<12} (missing: {cfg_file})")
            continue
        cfg = json.loads(cfg_file.read_text())
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
        arch = (cfg.get("architectures") or ["?"])[0]
        layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        d = cfg.get("hidden_size", cfg.get("n_embd"))
        params = manifest.get("parameters") or manifest.get("n_params") or ""
        print(f"{name:<12} {arch:<18} {layers!s:>6} {d!s:>7} {params!s:>9}  {path}")
    print("\nAny local Hugging Face directory works too: -p model /path/to/model")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    from . import book
    root = book.repo_root()
    for name, path in book.experiments(root).items():
        print(f"{name:<10} {path.relative_to(root)}")
    return 0


def _run_parameters(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The profile's parameters, then each ``-p NAME VALUE``, checked against the notebook before anything runs."""
    from . import book, params
    src = book.source(args.experiment, root)
    chosen = params.profile(src, "smoke" if args.smoke else args.profile)
    given = {k: parse_value(v) for k, v in args.parameters}
    raw = {k: v for k, v in args.parameters}
    return {**params.check(args.experiment, src, chosen), **params.check(args.experiment, src, given, raw)}


def cmd_run(args: argparse.Namespace) -> int:
    from . import book
    root = book.repo_root()
    values = _run_parameters(args, root)
    outcome = book.run_notebook(args.experiment, values, root, results_root=args.results,
                                profile="smoke" if args.smoke else args.profile)
    if not outcome.ok:
        error = " ".join((outcome.error or "failed").split())
        print(f"instab run {args.experiment} failed: {error} (the partly executed notebook: {outcome.executed})",
              file=sys.stderr)
        return 1
    print(f"executed notebook: {outcome.executed}")
    for folder in outcome.results:
        print(folder)
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from . import book, params
    src = book.source(args.experiment)
    rows = params.describe(src)
    head = ("name", "type", "default", "")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(3)]
    for r in (head, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + (f"  # {r[3]}" if r[3] else ""))
    extra = {k: v for k, v in params.profiles(src).items() if k != params.DEFAULT_PROFILE}
    for name, values in extra.items():
        print(f"profile {name}: {json.dumps(values)}")
    return 0


def cmd_book(args: argparse.Namespace) -> int:
    from . import book
    root = book.repo_root()
    return book.build_book(root, run=not args.no_run, results_root=args.results,
                           profile="smoke" if args.smoke else args.profile)


def cmd_analyze_logits(args: argparse.Namespace) -> int:
    from . import linearity
    cfg = linearity.load_config(args.config)
    path, rep = linearity.run_config(cfg, output_dir=args.output_dir)
    print(f"linearity radius: {rep['linearity_radius']} (scope {rep['param_scope']}, "
          f"{rep['num_scoped_parameters']} parameters); report: {path}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from . import trace
    from .models import load_model
    h = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    stages = args.stages if "," not in args.stages and "[" not in args.stages and "." not in args.stages \
        else [s.strip() for s in args.stages.split(",") if s.strip()]
    t = trace.capture(h, args.prompt, args.out, steps=args.steps, stages=stages, use_cache=not args.no_cache,
                      batch_rows=args.batch_rows, threads=args.threads, top_k=args.top_k, chat=args.chat,
                      stop_at_eos=not args.no_eos_stop, companions=args.companion)
    print(f"{t.n_steps} steps ({t.label()}): {t.path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import trace
    from .models import load_model
    from .results import write_json
    comp = trace.compare(args.trace_a, args.trace_b)
    a, b = comp.a, comp.b
    print(f"A: {a.path}  ({a.label()})\nB: {b.path}  ({b.label()})")
    report: dict = comp.summary()
    if comp.divergence is None:
        print(f"no divergence in the {comp.common_steps} common steps; states compared at every step")
    else:
        d = comp.divergence
        ta, tb = (int(t.tokens[d]) for t in (a, b))
        text = json.loads((a.path / "tokens.json").read_text())["generated_text"]
        text_b = json.loads((b.path / "tokens.json").read_text())["generated_text"]
        print(f"divergence at step {d}: A chose {ta} {text[d]!r}, B chose {tb} {text_b[d]!r}")
    step = comp.last_step
    with pd.option_context("display.width", 160, "display.max_columns", 12):
        print(f"\nlogits by token id at step {step}:\n{comp.logits_by_id(step)}")
        cols = ["changed", "max_abs", "l2", "cosine", "ulp=0", "ulp=1"]
        print(f"\nper stage at step {step}:\n{comp.at(step)[cols]}")
    report["logits_by_id"] = comp.logits_by_id(step).reset_index().to_dict(orient="records")
    report["at_step"] = comp.at(step).reset_index().to_dict(orient="records")
    if not args.no_model:
        from .models import BUNDLED
        name = a.manifest["model"]["model"]
        source = args.model or (name if name in BUNDLED else a.manifest["model"]["path"])
        h = load_model(source, dtype=args.dtype or a.manifest["model"]["dtype"], device=args.device)
        loc = trace.localise(comp, h)
        print(f"\nfirst stage that differs at step {step}: {loc.first_difference}"
              f"\nfirst stage where the logit lens' favoured token differs: {loc.first_flip}")
        report["first_difference"], report["first_flip"] = loc.first_difference, loc.first_flip
        report["localisation"] = loc.table.reset_index().to_dict(orient="records")
    if args.json:
        write_json(Path(args.json), report)
        print(f"\nreport: {args.json}")
    return 0


def _campaign(args: argparse.Namespace):
    """The campaign named on the command line: a YAML file, a campaign folder, or a name under campaigns/."""
    from . import book, campaign
    root = book.repo_root()
    where = Path(args.campaign).expanduser()
    if not where.exists() and (root / campaign.CAMPAIGNS_DIR / args.campaign).is_dir():
        where = root / campaign.CAMPAIGNS_DIR / args.campaign
    if where.is_dir():
        return campaign.open_campaign(where, root=root)
    return campaign.load(where, root=root, folder=Path(args.out) if getattr(args, "out", None) else None)


def cmd_campaign_run(args: argparse.Namespace) -> int:
    from . import campaign
    c = _campaign(args)
    done = campaign.run(c, backend=args.backend, address=args.address)
    ok = len(done.outcomes) - len(done.failed)
    print(f"campaign {c.name}: {ok} cells ran, {len(done.failed)} failed, {len(done.skipped)} already finished; "
          f"{done.seconds:.1f} s; {c.folder}")
    for cell_id in done.failed:
        print(f"  failed {cell_id} ({done.outcomes[cell_id].get('label')}): {done.outcomes[cell_id].get('error')}")
    if args.report:
        print(f"report: {campaign.report(c)}")
    return 1 if done.failed else 0


def cmd_campaign_status(args: argparse.Namespace) -> int:
    from . import campaign
    c = _campaign(args)
    rows = campaign.status_table(c)
    print(f"campaign {c.name} ({c.experiment}): {c.folder}")
    for r in rows:
        secs = f"{r['seconds']:.1f} s" if r["seconds"] is not None else ""
        err = f"  {' '.join(str(r['error']).split())[:160]}" if r["error"] else ""
        print(f"  {r['cell']}  {r['state']:<11} {secs:>9}  {r['values']}{err}")
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "failed", "interrupted", "running", "pending")}
    print("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def cmd_campaign_report(args: argparse.Namespace) -> int:
    from . import campaign
    c = _campaign(args)
    print(f"report: {campaign.report(c, out=Path(args.report_out) if args.report_out else None)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the bundled models").set_defaults(func=cmd_models)
    sub.add_parser("list", help="list the experiment notebooks").set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="execute one experiment notebook with papermill")
    run.add_argument("experiment", help="e.g. exp12 (see `instab list`)")
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                     metavar=("NAME", "VALUE"), help="set a notebook parameter (repeatable)")
    run.add_argument("--results", default=None, help="results root (default: results/ in the checkout)")
    run.add_argument("--profile", default="default",
                     help="a named parameter set of the notebook: default | smoke | seed (see `instab params EXP`)")
    run.add_argument("--smoke", action="store_true", help="the same as --profile smoke")
    run.set_defaults(func=cmd_run)
    prm = sub.add_parser("params", help="list an experiment's parameters, their types, defaults and profiles")
    prm.add_argument("experiment")
    prm.set_defaults(func=cmd_params)
    bk = sub.add_parser("book", help="run every notebook and build the book into _build/html")
    bk.add_argument("--no-run", action="store_true", help="build from the notebooks already executed")
    bk.add_argument("--smoke", action="store_true", help="run every notebook with its smoke-test parameters")
    bk.add_argument("--profile", default="default", help="run every notebook with this parameter profile "
                    "(a notebook without it runs with its defaults)")
    bk.add_argument("--results", default=None, help="results root (default: results/ in the checkout)")
    bk.set_defaults(func=cmd_book)
    al = sub.add_parser("analyze-logits", help="logit-linearity radius in parameter space from a YAML config")
    al.add_argument("config", help="YAML config (see examples/analyze_logits.yaml)")
    al.add_argument("--output-dir", default=None, help="override the config's output_dir")
    al.set_defaults(func=cmd_analyze_logits)
    cap = sub.add_parser("capture", help="greedy-generate from a prompt and write a trace folder")
    cap.add_argument("prompt")
    cap.add_argument("--out", required=True, help="trace folder (an interrupted capture resumes there)")
    cap.add_argument("--model", default="tiny-llama", help="bundled name or local Hugging Face directory")
    cap.add_argument("--dtype", default="float32")
    cap.add_argument("--device", default="cpu")
    cap.add_argument("--attn", default="eager", help="attention implementation: eager | sdpa")
    cap.add_argument("--steps", type=int, default=100)
    cap.add_argument("--stages", default="seed_exp8_p1",
                     help="preset (seed_exp8_p1 | residual | all) or comma-separated stage names")
    cap.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every step")
    cap.add_argument("--batch-rows", type=int, default=1)
    cap.add_argument("--threads", type=int, default=None)
    cap.add_argument("--companion", action="append", default=[], metavar="PROMPT",
                     help="another prompt in the same batch (repeatable; rows are left-padded and masked)")
    cap.add_argument("--top-k", type=int, default=10)
    cap.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    cap.add_argument("--no-eos-stop", action="store_true", help="keep generating after the EOS token")
    cap.set_defaults(func=cmd_capture)
    cmp_ = sub.add_parser("compare", help="compare two trace folders of the same prompt and model")
    cmp_.add_argument("trace_a")
    cmp_.add_argument("trace_b")
    cmp_.add_argument("--model", default=None,
                      help="model for the logit lens (default: trace A's bundled name or model path)")
    cmp_.add_argument("--dtype", default=None, help="dtype for the logit lens (default: trace A's)")
    cmp_.add_argument("--device", default="cpu")
    cmp_.add_argument("--no-model", action="store_true", help="skip the localisation (no model is loaded)")
    cmp_.add_argument("--json", default=None, help="also write the report as JSON to this file")
    cmp_.set_defaults(func=cmd_compare)
    cp = sub.add_parser("campaign", help="run a grid of notebook runs (a campaign file), see its state, report it")
    csub = cp.add_subparsers(dest="action", required=True)
    crun = csub.add_parser("run", help="run every unfinished cell of a campaign file")
    crun.add_argument("campaign", help="campaign YAML file (see examples/), or the name of one already run")
    crun.add_argument("--backend", choices=["local", "ray"], default=None, help="override the file's backend")
    crun.add_argument("--address", default=None, help="Ray cluster address (default: the file's, else a local Ray)")
    crun.add_argument("--out", default=None, help="campaign folder (default: campaigns/<name> in the checkout)")
    crun.add_argument("--report", action="store_true", help="then write the report page (book/campaigns/)")
    crun.set_defaults(func=cmd_campaign_run)
    cst = csub.add_parser("status", help="list a campaign's cells: done, failed (with the error), pending")
    cst.add_argument("campaign", help="campaign YAML file, campaign folder, or name under campaigns/")
    cst.add_argument("--out", default=None, help="campaign folder, when it is not campaigns/<name>")
    cst.set_defaults(func=cmd_campaign_status)
    crep = csub.add_parser("report", help="write the comparison page of a campaign's finished cells")
    crep.add_argument("campaign", help="campaign YAML file, campaign folder, or name under campaigns/")
    crep.add_argument("--out", default=None, help="campaign folder, when it is not campaigns/<name>")
    crep.add_argument("--report-out", default=None, help="the report notebook (default book/campaigns/<name>.ipynb)")
    crep.set_defaults(func=cmd_campaign_report)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"instab: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message
        return 2


if __name__ == "__main__":
    sys.exit(main())
