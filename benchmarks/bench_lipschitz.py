"""Finite-difference Lipschitz: the batched kernel against the seed's batch-1 loops, same model and machine.

    python benchmarks/bench_lipschitz.py [--model tiny-llama] [--n-samples 50]

Plain FD over 5 singular directions × 18 steps, and the seed's v1 noise averaging (a fresh noise
vector per sample) along v1, timed both ways in one run; prints forward passes and the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

import instab_core as ic
from instab_core import lipschitz as LZ


def seed_loop(probe1: ic.Probe, directions: torch.Tensor, eps, n_samples: int, noise: bool, seed: int = 0) -> int:
    """The seed's loop: batch-1 forwards, f(x0) recomputed for every estimate; returns forwards run."""
    gen = torch.Generator().manual_seed(seed)
    x0 = probe1.x0.double()
    calls = 0
    for v in directions.double():
        for e in eps:
            for _ in range(n_samples if noise else 1):
                r = (torch.rand(probe1.d, generator=gen, dtype=torch.float64) * 2 - 1) * e * 1e-2 if noise else 0.0
                probe1.forward((x0 + e * v + r).to(probe1.dtype)[None])
                probe1.forward((x0 + r).to(probe1.dtype)[None])
                calls += 2
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="The capital of France is")
    ap.add_argument("--n-samples", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    h = ic.load_model(args.model, device=args.device)
    probe = ic.Probe(h, args.text, batch_size=args.batch_size)
    probe1 = probe.with_batch_size(1)
    spec = ic.jacobian.spectrum(probe)
    eps = LZ.eps_powers(1, 18)
    print(f"model {h.name} on {ic.models.device_name(h.device)}; batched = fixed batch of {args.batch_size}")
    print(f"\n{'workload':34}{'passes batched':>15}{'passes seed':>13}{'s batched':>11}{'s seed':>9}{'ratio':>8}")
    LZ.finite_difference(probe, LZ.singular_directions(spec.S, spec.Vt, top_k=1), eps[:2], progress=False)  # warm-up
    seed_loop(probe1, torch.as_tensor(spec.directions[:1]), eps[:2], 1, False)
    cases = [("plain, 5 directions x 18 eps", 5, "none", 1), (f"v1 noise n={args.n_samples}, v1 x 18 eps", 1,
             "vector", args.n_samples)]
    for name, k, noise, n in cases:
        dirs = LZ.singular_directions(spec.S, spec.Vt, top_k=k)
        t = time.perf_counter()
        res = LZ.finite_difference(probe, dirs, eps, noise=noise, n_samples=n, progress=False)
        t_batched = time.perf_counter() - t
        t = time.perf_counter()
        calls = seed_loop(probe1, torch.as_tensor(dirs.D), eps, n, noise != "none")
        t_seed = time.perf_counter() - t
        print(f"{name:34}{res.forward_passes:>15}{calls:>13}{t_batched:>11.2f}{t_seed:>9.2f}{t_seed / t_batched:>7.1f}x")


if __name__ == "__main__":
    main()
