"""Dense Jacobian: chunked torch.func.jacrev (instab) against torch.autograd.functional.jacobian.

    python benchmarks/bench_jacobian.py [--model tiny-llama] [--repeats 5]

Also times the matrix-free top-k against the dense SVD. Both sides run here, now, in one process.
"""

from __future__ import annotations

import argparse
import time

import torch

import instab_core as ic


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="The capital of France is")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()
    h = ic.load_model(args.model, device=args.device)
    probe = ic.Probe(h, args.text, batch_size=1)
    x0 = probe.x0
    print(f"model {h.name} (d={probe.d}) on {ic.models.device_name(h.device)}, best of {args.repeats}")

    J = ic.jacobian.jacobian(probe)
    J_ref = torch.autograd.functional.jacobian(probe.f, x0)
    rel = float((J - J_ref).abs().max() / J_ref.abs().max())
    print(f"max |J_instab - J_autograd| / max |J| = {rel:.1e} (float32; batched and sequential VJPs round differently)")
    rows = {
        "instab jacobian (jacrev, chunks of 256 VJPs)": best_of(lambda: ic.jacobian.jacobian(probe), args.repeats),
        "autograd.functional.jacobian": best_of(lambda: torch.autograd.functional.jacobian(probe.f, x0),
                                                args.repeats),
        "autograd.functional.jacobian(vectorize=True)": best_of(
            lambda: torch.autograd.functional.jacobian(probe.f, x0, vectorize=True), args.repeats),
    }
    base = rows["autograd.functional.jacobian"]
    print(f"\n{'method':48}{'seconds':>10}{'speed-up vs autograd':>22}")
    for name, t in rows.items():
        print(f"{name:48}{t:>10.4f}{base / t:>21.1f}x")
    t_dense = best_of(lambda: ic.jacobian.spectrum(probe), args.repeats)
    t_topk = best_of(lambda: ic.jacobian.top_singular(probe, args.top_k), args.repeats)
    print(f"\nfull SVD of the dense J: {t_dense:.4f} s; matrix-free top-{args.top_k}: {t_topk:.4f} s "
          f"(the matrix-free path is for large d, where J does not fit or d VJPs cost too much)")


if __name__ == "__main__":
    main()
