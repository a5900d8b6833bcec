"""Per-sample curvature by nested JVPs against explicit per-sample Hessians, on the toys (time and memory).

    python benchmarks/bench_curvature.py [--directions 8] [--repeats 3] [--gpt2-samples 4]

For each toy, C[n, k] = u_kᵀ H(x_n) u_k for K directions: the kernel (``curvature.curvature_matrix``: a jvp of a
jvp, vmapped over directions, samples batched) against the naive route the seed wanted to avoid, one dense
Hessian per sample (``torch.autograd.functional.hessian``, vectorised) contracted with U. Printed: best-of-N
seconds, the ratio naive ÷ kernel, the memory each route materialises (the naive one: N Hessians of P²
float64 entries; the kernel: K directions with their two tangents, 3·K·P entries, beside the model's own
activations, which both routes need), and the largest difference between the two results. For the tiny-gpt2 matrix (P = 16384) the dense Hessian is not
formed: its size is printed instead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd.functional import hessian

import instab_core as ic
from instab_core import curvature as cv
from instab_core import toys


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def dense(div_all, w0, U):
    N = div_all(w0).shape[0]
    rows = []
    for n in range(N):
        H = hessian(lambda w: div_all(w)[n], w0, vectorize=True)
        rows.append(torch.einsum("kp,pq,kq->k", U, H, U))
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpt2-samples", type=int, default=4)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{'toy':16}{'P':>7}{'N':>5}{'K':>4}{'nested jvp s':>14}{'Hessians s':>12}{'ratio':>8}"
          f"{'Hessians MiB':>14}{'tangents MiB':>14}{'max |diff|':>12}")
    for toy in (toys.xor_toy(), toys.superposition_toy(), toys.xor_toy(hidden=16, seed=0)):
        d = toy.div_all()
        U = torch.randn(args.directions, toy.w0.numel(), generator=gen, dtype=torch.float64)
        cv.curvature_matrix(d, toy.w0, U)  # warm-up
        t_k, C = timed(lambda: cv.curvature_matrix(d, toy.w0, U), args.repeats)
        t_n, Cd = timed(lambda: dense(d, toy.w0, U), args.repeats)
        N, Pn = C.shape[0], toy.w0.numel()
        name = f"{toy.name}-{len(toy.blocks)}" if toy.name == "xor" else toy.name
        print(f"{name:16}{Pn:>7}{N:>5}{U.shape[0]:>4}{t_k:>14.4f}{t_n:>12.4f}{t_n / t_k:>7.1f}x"
              f"{N * Pn * Pn * 8 / 2**20:>14.4f}{3 * U.shape[0] * Pn * 8 / 2**20:>14.4f}{float((C - Cd).abs().max()):>12.2e}")
    h = ic.load_model("tiny-gpt2")
    case = toys.gpt2_attention_case(h, samples=args.gpt2_samples, length=8)
    U = torch.randn(args.directions, case.w0.numel(), generator=gen, dtype=case.w0.dtype)
    t_k, _ = timed(lambda: cv.curvature_matrix(case.div_all(), case.w0, U), args.repeats)
    Pn = case.w0.numel()
    print(f"\ntiny-gpt2 {case.param_name}: P = {Pn}, N = {args.gpt2_samples}, K = {args.directions}: nested jvp "
          f"{t_k:.3f} s; one dense Hessian per sample would be {args.gpt2_samples} × {Pn}² float32 = "
          f"{args.gpt2_samples * Pn * Pn * 4 / 2**30:.1f} GiB and {Pn} backward passes per sample")


if __name__ == "__main__":
    main()
