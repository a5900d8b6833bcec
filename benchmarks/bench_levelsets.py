"""Level-set normal: the analytic normal (one backward pass) against central differencing.

    python benchmarks/bench_levelsets.py [--model tiny-llama] [--word " the"] [--epsilon 1e-6] [--repeats 3]
                                         [--sequential]

At one point on the level set KL(t ‖ p) = ε (Newton projection from a vocabulary-ellipse sample), wall time of:

* analytic — ``LevelSet.analytic_normal``: one batched forward and one backward;
* central differences, all 2d perturbations in one batch, with the seed's settings (δ = 1e-3, Adam lr 1e-3,
  100 iterations, tolerance ε·1e-2) and with converging settings (signed variant, Newton, δ = 1e-2,
  tolerance ε·1e-5);
* seed-style — the same, 128 dimensions (256 rows) per batch, as the seed's ``batch_size=128``; and the seed's
  settings with δ = 1e-2 (at δ = 1e-3 every x ± δe_i is already within the tolerance on the bundled model,
  so Adam takes no step and the normal is zero);
* with ``--sequential``, the sequential reference (one perturbation at a time, batch 1), seed settings.

Printed as ratios (central-difference time ÷ analytic time; the target is ≥ 1000×), with the cosine of each
central-difference normal with the analytic one. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import instab_core as ic
from instab_core import levelsets as L


def best(fn, repeats: int) -> tuple[float, object]:
    out, t_best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--word", default=" the")
    ap.add_argument("--epsilon", type=float, default=1e-6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequential", action="store_true")
    args = ap.parse_args()

    h = ic.load_model(args.model, dtype=args.dtype, device=args.device)
    target = h.tokenizer(args.word, add_special_tokens=False)["input_ids"][0]
    ls = L.LevelSet(h, target, args.epsilon, tolerance=1e-2)
    tight = L.LevelSet(h, target, args.epsilon, tolerance=1e-5)
    x = tight.project(L.sample_vocab_ellipse(h, 1, seed=0)).points[0]  # on both level sets (tighter tolerance)
    d = x.shape[0]
    t_an, an = best(lambda: ls.analytic_normal(x[None])[0], max(args.repeats, 5))
    print(f"{h.name} ({args.dtype}, {args.device}), d = {d}, target {args.word!r}, ε = {args.epsilon:g}")
    print(f"analytic normal: {t_an * 1e3:.2f} ms")
    seed_kw = dict(delta=1e-3, method="adam", max_iters=100, learning_rate=1e-3)
    conv_kw = dict(delta=1e-2, method="newton", max_iters=100, variant="signed")
    cases = [("seed settings, all 2d at once", ls, dict(seed_kw)),
             ("seed settings, 128-dim batches (seed-style)", ls, dict(seed_kw, batch_size=128)),
             ("seed settings but δ = 1e-2 (Adam iterates)", ls, dict(seed_kw, delta=1e-2)),
             ("converging settings, all 2d at once", tight, dict(conv_kw)),
             ("converging settings, 128-dim batches", tight, dict(conv_kw, batch_size=128))]
    if args.sequential:
        cases.append(("seed settings, sequential (batch 1)", ls, dict(seed_kw, sequential=True)))
    print(f"{'central differences':48s} {'time':>10s} {'÷ analytic':>12s} {'cos':>8s} {'unconverged':>12s}")
    for name, lset, kw in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, cd = best(lambda: L.central_difference_normal(lset, x, **kw), 1 if kw.get("sequential") else args.repeats)
        print(f"{name:48s} {t:9.3f}s {t / t_an:11.0f}× {L.cosine(cd.normal, an):8.4f} {cd.n_unconverged:12d}"
              + ("   (degenerate: every component zero)" if cd.degenerate else ""))


if __name__ == "__main__":
    main()
