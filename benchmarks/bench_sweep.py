"""Stage sweeps (exp01, exp14) batched against the seed's batch-1 loops, on the same model and machine.

    python benchmarks/bench_sweep.py [--model tiny-llama]

For each workload: forward passes (the seed: one batch-1 pass per scale, plus the reference it
recomputed each time) and wall time, both ways, and their ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import instab_core as ic
from instab_core import sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="The capital of France is")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    h = ic.load_model(args.model, device=args.device)
    probe = ic.Probe(h, args.text, batch_size=args.batch_size)
    probe1 = probe.with_batch_size(1)
    v1 = ic.jacobian.spectrum(probe).directions[0]
    # name -> (scales, whether the seed recomputed its reference forward for every scale)
    workloads = {
        "exp01 part 1 (13 jumps)": (sweep.E1 + sweep.STEP * np.array([10.0 ** k for k in range(13)]), True),
        "exp01 part 2 (1000 jumps)": (sweep.E1 + sweep.STEP * np.arange(1, 1001), True),
        "exp14 (501 small steps)": ((np.float64(sweep.E1) + np.arange(501) * 2e-11).astype(np.float32), False),
    }
    print(f"model {h.name} on {ic.models.device_name(h.device)}; batched = fixed batch of {args.batch_size}")
    print(f"\n{'workload':28}{'passes batched':>16}{'passes seed':>13}{'ratio':>8}{'s batched':>11}{'s seed':>9}{'ratio':>8}")
    sweep.stage_sweep(probe, v1, workloads["exp01 part 1 (13 jumps)"][0])  # warm-up
    for name, (scales, with_reference) in workloads.items():
        before = probe.rows_evaluated
        t = time.perf_counter()
        sweep.stage_sweep(probe, v1, scales, reference_scale=float(scales[0]))
        t_batched = time.perf_counter() - t
        passes_batched = (probe.rows_evaluated - before) // args.batch_size
        # The seed: one batch-1 forward per scale (plus its reference again where it recomputed it).
        t = time.perf_counter()
        for s in scales:
            sweep.capture(probe1, sweep.states(probe1, v1, np.array([scales[0], s] if with_reference else [s])))
        t_seed = time.perf_counter() - t
        passes_seed = (2 if with_reference else 1) * len(scales)
        print(f"{name:28}{passes_batched:>16}{passes_seed:>13}{passes_seed / passes_batched:>7.0f}x"
              f"{t_batched:>11.2f}{t_seed:>9.2f}{t_seed / t_batched:>7.1f}x")


if __name__ == "__main__":
    main()
