"""Fisher top eigenvector: exact matrix-free Lanczos against the seed's dense subset approach and a dense exact one.

    python benchmarks/bench_fisher.py [--model tiny-llama] [--layers 0,3] [--subset 200] [--repeats 3]

For the first kept " animals" sentence of the bundled corpus, at each layer:

* exact (Lanczos) — ``fisher.exact_fisher(k=1)``: h, then eigsh on F·v = Jᵀ(diag p − ppᵀ)J·v (one jvp + one vjp
  per product) through the real downstream network, full vocabulary;
* seed (dense subset) — ``fisher.seed_fisher``: W_U·h only, autograd gradients of the top-``subset`` log-probs,
  the dense d×d matrix, ``torch.linalg.eigh``;
* dense exact — the full Jacobian of the downstream logits (V×d, ``torch.func.jacrev``), the dense matrix and eigh:
  the naive way to the same exact answer.

Wall time (best of ``--repeats``) and peak memory above the loaded model, printed as ratios to the exact method,
with |cos| to the exact eigenvector. Memory on CPU: the rise of the peak RSS over the resident size, in a fresh
process per method after a warm-up run (Linux /proc; page-granular, so below ~1 MB it reads 0); on CUDA:
``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import time

import numpy as np
import torch

METHODS = ("exact (Lanczos)", "seed (dense subset)", "dense exact")


def _setup(model: str, device: str, dtype: str):
    import instab_core as ic
    from instab_core import fisher as fi
    from instab_core.zoo.corpus import ANIMAL_SENTENCES

    h = ic.load_model(model, dtype=dtype, device=device)
    site = next(s for s in (fi.find_site(h, t) for t in ANIMAL_SENTENCES) if s.keep)
    return h, site


def _run(method: str, h, site, layer: int, subset: int) -> np.ndarray:
    from instab_core import fisher as fi

    hv = fi.residual(h, site.ids, layer, site.position)
    if method == METHODS[0]:
        return fi.exact_fisher(h, site.ids, layer, site.position, k=1, h=hv)[1].vectors[:, 0]
    if method == METHODS[1]:
        return fi.seed_fisher(h, hv, subset)[1][:, 0]
    g = fi.downstream(h, site.ids, layer, site.position)
    F = fi.dense_fisher(lambda x: g(x[None])[0], hv)
    return torch.linalg.eigh(F)[1][:, -1].cpu().numpy()


def _peak_child(args: tuple, q) -> None:
    model, device, dtype, method, layer, subset = args
    h, site = _setup(model, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run(method, h, site, layer, subset)
        q.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    _run(method, h, site, layer, subset)  # warm-up: lazy initialisation and allocator caches are not the method's
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # Linux: reset the peak-RSS mark (VmHWM) to the current RSS
        fh.write("5")
    base = _status_kb("VmRSS")
    _run(method, h, site, layer, subset)
    q.put((_status_kb("VmHWM") - base) / 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status: peak-memory measurement needs Linux (or use --no-memory)")


def peak_mb(*args) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return float(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", default=None, help="comma-separated; default: the first and the last layer")
    ap.add_argument("--subset", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()

    h, site = _setup(args.model, args.device, args.dtype)
    layers = [0, h.n_layers - 1] if args.layers is None else [int(x) for x in args.layers.split(",")]
    V = h.unembed.weight.shape[0]
    print(f"{h.name} ({args.dtype}, {args.device}), d = {h.d_model}, V = {V}, sentence {site.text!r}")
    for layer in layers:
        res = {}
        for m in METHODS:
            t_best, vec = float("inf"), None
            for _ in range(args.repeats):
                t = time.perf_counter()
                vec = _run(m, h, site, layer, args.subset)
                t_best = min(t_best, time.perf_counter() - t)
            mem = float("nan") if args.no_memory else peak_mb(args.model, args.device, args.dtype, m, layer, args.subset)
            res[m] = (t_best, mem, vec)
        t0, m0, v0 = res[METHODS[0]]
        print(f"layer {layer}:")
        print(f"  {'method':22s} {'time':>9s} {'÷ exact':>9s} {'peak MB':>9s} {'÷ exact':>9s} {'|cos| to exact':>15s}")
        for m, (t, mem, v) in res.items():
            print(f"  {m:22s} {t * 1e3:7.1f}ms {t / t0:8.2f}× {mem:9.1f} {mem / m0 if m0 > 0 else float('nan'):8.2f}× "
                  f"{abs(float(np.dot(v, v0)) / (np.linalg.norm(v) * np.linalg.norm(v0))):15.4f}")


if __name__ == "__main__":
    main()
