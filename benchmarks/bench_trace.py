"""Trace capture against plain greedy `generate`: the cost of the hooks, the per-step records and the writes.

Same model, prompt and number of new tokens, greedy, one thread, in one run; best of 3 each. Also the uncached
capture (every step re-runs the whole sequence) to show what the seed's O(T²) loop costs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import instab_core as ic
from instab_core import trace as tr
from instab_core.zoo.corpus import SEED_QA

STEPS = 200
REPEATS = 3


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    h = ic.load_model("tiny-llama")
    prompt = SEED_QA[0][0]
    ids = h.encode(prompt)[None]

    def generate() -> None:
        with torch.no_grad():
            h.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, pad_token_id=h.tokenizer.eos_token_id)

    def capture(stages, use_cache=True):
        def run() -> None:
            with tempfile.TemporaryDirectory() as d:
                tr.capture(h, prompt, Path(d) / "t", steps=STEPS, stages=stages, use_cache=use_cache,
                           stop_at_eos=False, progress=False)
        return run

    base = best(generate)
    print(f"tiny-llama, {STEPS} new tokens, 1 thread, best of {REPEATS}")
    print(f"{'method':<44} {'tokens/s':>9} {'time vs generate':>17}")
    print(f"{'HF generate (greedy, KV cache)':<44} {STEPS / base:>9.0f} {1.0:>16.2f}×")
    n_all = len(tr.stage_presets(h)["all"])
    for label, fn in ((f"capture, seed_exp8_p1 (5 stages)", capture("seed_exp8_p1")),
                      (f"capture, all ({n_all} stages)", capture("all")),
                      ("capture, seed_exp8_p1, no KV cache", capture("seed_exp8_p1", use_cache=False))):
        t = best(fn)
        print(f"{label:<44} {STEPS / t:>9.0f} {t / base:>16.2f}×")


if __name__ == "__main__":
    main()
