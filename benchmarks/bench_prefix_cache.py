"""Boundaries with ``prefix_cache=True`` against the full-sequence semantics, on the same rays.

For a short and a long prompt on a real-width model (default: ``llama-3.2-1b -L 2`` built into a
temporary folder by ``instab_core.zoo.shapes``; d = 2048, vocabulary 128256), prints per ray:
token-forwards (rows × tokens per row, the prefix's tokens amortised), forward rows and wall time
for both semantics and their ratio, and how often the two semantics give the same s_out (they are
different float32 computations).

It also measures how often an evaluated state whose input changed re-converges bitwise to the
reference at an intermediate layer (every later layer's output at the position then equals the
reference's too: the change was absorbed there), and whether any state equal at a layer differs
again later (that would break the premise of retiring rows early). Early retirement is not
implemented: dropping rows changes the batch shape of the remaining rows, so it is only safe where
the device is batch-invariant, which an audit of a few rows does not prove.

    python benchmarks/bench_prefix_cache.py [--model DIR] [--rays 32] [--batch-size 16] [--also tiny-llama]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import instab_core as ic
from instab_core import boundary, fp
from instab_core.zoo import ZOO_DIR, shapes


def prompt_of(h: ic.models.ModelHandle, tokens: int) -> str:
    """A text of the bundled sample document whose encoding has exactly ``tokens`` ids (BOS included), or the
    first text at or above it."""
    words = (ZOO_DIR / "documents" / "sample.txt").read_text().split()
    if tokens <= 6:
        return "The capital of France is"
    lo, hi = 1, len(words)
    while lo < hi:  # the fewest words that reach ``tokens`` ids
        mid = (lo + hi) // 2
        if len(h.encode(" ".join(words[:mid]))) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


def evaluated_states(probe: ic.Probe, D: torch.Tensor, res: boundary.BoundaryResult, s_max: float,
                     mode: fp.Mode) -> tuple[torch.Tensor, np.ndarray]:
    """The inputs the exact kernel evaluated (first ``states`` distinct inputs of each ray), and their ray."""
    x0 = probe.x0.float()
    rows, ray = [], []
    for r in range(D.shape[0]):
        n = int(res.states[r])
        lattice = fp.RayLattice(x0, D[r:r + 1], s_max, mode)
        B = lattice.advance(torch.zeros(1, dtype=torch.int64), n)[0]
        B = B[torch.isfinite(B)]
        rows.append(fp.perturb(x0, B[:, None], D[r:r + 1].expand(B.shape[0], -1), mode))
        ray += [r] * B.shape[0]
    return torch.cat(rows), np.array(ray)


@torch.no_grad()
def layer_outputs(probe: ic.Probe, X: torch.Tensor) -> torch.Tensor:
    """Each decoder layer's output at the last position plus the target, in the probe's batch shape: [n, layers+1, m]."""
    h = probe.handle
    grabbed: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: grabbed.append((o[0] if isinstance(o, tuple) else o)[:, -1]))
             for layer in h.layers]
    out = []
    try:
        for chunk, k in probe.pad(X):
            grabbed.clear()
            target = probe.f_batch(chunk)
            out.append(torch.stack([*grabbed, target], dim=1)[:k])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(out)


def reconvergence(probe: ic.Probe, X: torch.Tensor) -> dict[str, float]:
    """Among states X (inputs differ from x0): fraction equal to the reference at each layer, the fraction that
    re-converged at an intermediate layer (equal from there on), and states equal at a layer but not later."""
    ref = layer_outputs(probe, probe.x0[None])[0]
    out = layer_outputs(probe, X)
    eq = (out.view(torch.int32) == ref.view(torch.int32)).all(dim=2) if out.dtype == torch.float32 else \
        (out == ref).all(dim=2)
    n, L1 = eq.shape
    later_all = torch.flip(torch.cummin(torch.flip(eq.int(), [1]), dim=1).values, [1]).bool()  # equal from l on
    intermediate = later_all[:, :-1].any(dim=1)
    relapse = (eq & ~later_all).any(dim=1)
    stats = {"states": float(n), "equal_at_target": float(eq[:, -1].float().mean()),
             "reconverged_at_intermediate": float(intermediate.float().mean()),
             "equal_then_differs": float(relapse.sum())}
    for layer in range(L1 - 1):
        stats[f"equal_at_layer{layer}"] = float(eq[:, layer].float().mean())
    return stats


def run_prompt(h: ic.models.ModelHandle, text: str, rays: int, batch: int, s_max: float, seed: int) -> None:
    probe = ic.Probe(h, text, batch_size=batch)
    L = int(probe.ids.shape[0])
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(rays, probe.d, generator=gen)
    D = (D / D.norm(dim=1, keepdim=True)).float()
    t = time.perf_counter()
    cached = boundary.prefix_cached(probe)
    t_setup = time.perf_counter() - t
    boundary.first_output_change(probe, D[:2], s_max, progress=False)  # warm-up
    boundary.first_output_change(cached, D[:2], s_max, progress=False)
    t = time.perf_counter()
    full = boundary.first_output_change(probe, D, s_max, progress=False)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    pc = boundary.first_output_change(cached, D, s_max, progress=False)
    t_pc = time.perf_counter() - t
    tf_full = full.rows * L / rays
    tf_pc = (pc.rows + (L - 1) / 1) / rays  # the prefix's L-1 tokens once, amortised over the rays
    same = boundary.compare_methods(full, pc)
    print(f"\nprompt of {L} tokens, d={probe.d}, {h.n_layers} layers, {rays} random rays, batch {batch}, "
          f"s_max={s_max:g} on {ic.models.device_name(h.device)}")
    print(f"{'':28}{'full sequence':>16}{'prefix_cache':>16}{'ratio':>10}")
    print(f"{'token-forwards per ray':28}{tf_full:>16.1f}{tf_pc:>16.2f}{tf_full / tf_pc:>9.1f}x")
    print(f"{'forward rows per ray':28}{full.rows / rays:>16.2f}{pc.rows / rays:>16.2f}")
    print(f"{'wall seconds per ray':28}{t_full / rays:>16.4f}{t_pc / rays:>16.4f}{t_full / t_pc:>9.1f}x")
    print(f"{'':28}{'':>16}{f'+ {t_setup:.2f} s once (prefix + reference)':>30}")
    fa = f"{int((full.status == 'found').sum())} / {full.absorbed.mean():.2f}"
    fb = f"{int((pc.status == 'found').sum())} / {pc.absorbed.mean():.2f}"
    print(f"{'found / absorbed mean':28}{fa:>16}{fb:>16}")
    print(f"same s_out in both semantics on {rays - len(same)} of {rays} rays (different float32 computations)")
    for name, p, res in (("full sequence", probe, full), ("prefix_cache", cached, pc)):
        X, _ = evaluated_states(p, D, res, s_max, "fp32")
        st = reconvergence(p, X)
        layers = ", ".join(f"L{i} {st[f'equal_at_layer{i}']:.3f}" for i in range(h.n_layers))
        print(f"  {name}: {int(st['states'])} evaluated states; equal to the reference at {layers}, target "
              f"{st['equal_at_target']:.3f}; re-converged at an intermediate layer {st['reconverged_at_intermediate']:.3f}; "
              f"equal at a layer then different later: {int(st['equal_then_differs'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: build llama-3.2-1b -L 2 in a tmp folder)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default="6,100", help="prompt lengths in tokens")
    ap.add_argument("--rays", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--s-max", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--also", default="tiny-llama", help="a second (bundled) model for the re-convergence numbers; '' for none")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="instab-prefix-") as tmp:
        path = args.model
        if path is None:
            path = shapes.build("llama-3.2-1b", Path(tmp) / "m", layers=args.layers, progress=False)
        models = [path] + ([args.also] if args.also else [])
        for m in models:
            h = ic.load_model(m)
            print(f"\n== model {h.name}")
            for tokens in [int(t) for t in args.tokens.split(",")]:
                run_prompt(h, prompt_of(h, tokens), args.rays, args.batch_size, args.s_max, args.seed)
            del h


if __name__ == "__main__":
    main()
