"""Logit linearity: one JVP per direction (scaled by r) against one JVP per (direction, radius).

    python benchmarks/bench_linearity.py [--model tiny-llama] [--scope full] [--directions 4] [--radii 9]
                                         [--repeats 3]

Both compute the same Δ_pred for every (direction, radius, prompt); the naive one calls ``torch.func.jvp`` with
the tangent r·δ for each radius, as a per-radius loop would. Also timed: the forward passes for Δ_true (one per
radius, shared by both) and the second directional derivative (a jvp of a jvp per direction). Printed: seconds
and the ratio naive ÷ kernel for the prediction step, and each step's time over one plain forward. Best of
``--repeats`` (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.func import jvp

import instab_core as ic
from instab_core import linearity as L
from instab_core.curvature import composite_layer_norm


def best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scope", default="full")
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--radii", type=int, default=9, help="number of log-spaced radii in [1e-3, 10]")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    h = ic.load_model(args.model, device=args.device)
    prompts = ["The capital of France is", "Animals that live in the forest"]
    radii = np.logspace(-3, 1, args.radii)
    params = L.scoped_parameters(h, args.scope)
    primals = {k: p.detach() for k, p in params.items()}
    f = L.logit_function(h, L.encode_prompts(h, prompts))
    dirs = L.random_directions(params, args.directions, seed=0)

    def kernel():
        for d in dirs:
            jd = jvp(f, (primals,), (d,))[1]
            _ = [r * jd for r in radii]

    def naive():
        for d in dirs:
            _ = [jvp(f, (primals,), ({k: r * v for k, v in d.items()},))[1] for r in radii]

    def forwards():
        with torch.no_grad():
            for d in dirs:
                for r in radii:
                    f(L.perturbed(params, d, float(r)))

    def second():
        with composite_layer_norm(h.model):
            for d in dirs:
                jvp(lambda p: jvp(f, (p,), (d,))[1], (primals,), (d,))

    def one_forward():
        with torch.no_grad():
            f(primals)

    kernel()  # warm-up
    t_fwd = best(one_forward, args.repeats)
    t_k, t_n = best(kernel, args.repeats), best(naive, args.repeats)
    t_true, t_2 = best(forwards, args.repeats), best(second, args.repeats)
    D, R = len(dirs), len(radii)
    print(f"model {h.name}, scope {args.scope} ({L.n_elements(params)} parameters), {D} directions × {R} radii × "
          f"{len(prompts)} prompts on {ic.models.device_name(h.device)}")
    print(f"{'step':44}{'seconds':>9}{'÷ one forward':>15}")
    for name, t in [("Δ_pred: one jvp per direction (kernel)", t_k), ("Δ_pred: one jvp per (direction, radius)", t_n),
                    ("Δ_true: one forward per (direction, radius)", t_true),
                    ("c2: one jvp-of-jvp per direction", t_2), ("one forward f(θ)", t_fwd)]:
        print(f"{name:44}{t:>9.3f}{t / t_fwd:>14.1f}x")
    print(f"\nspeed-up of the prediction step: {t_n / t_k:.1f}x (expected ≈ number of radii, {R})")
    print(f"whole analysis (Δ_pred + Δ_true + c2): kernel {t_k + t_true + t_2:.3f} s, "
          f"per-radius jvp {t_n + t_true + t_2:.3f} s, ratio {(t_n + t_true + t_2) / (t_k + t_true + t_2):.2f}x")


if __name__ == "__main__":
    main()
