"""Word-by-word prediction: the O(N) KV-cached pass against the seed's O(N²) per-word re-forward.

    python benchmarks/bench_wordpred.py [--words 3000] [--baseline-words 200] [--full-baseline-words 30]
                                        [--context 256] [--stride 128] [--repeats 3] [--no-full]

The document is the bundled sample text repeated to ``--words`` words. Two settings:

* **window** — the bundled ``tiny-llama`` (trained on 256-token blocks) with the window policy
  (``context``/``stride``): ``wordpred.predict_words`` (each window one KV-cached pass) against the seed's
  method restricted to the same windows: for every word a fresh forward (no cache) of the causal LM on the exact
  token ids of its window context, as far as its last token (the seed re-tokenised the text instead; here the
  baseline is spared the tokenisation).
* **full** — a random Llama with tiny-llama's shape and tokenizer but ``max_position_embeddings`` 16384 (so the
  whole document fits one sequence; its predictions are meaningless, only the cost matters): the KV-cached pass
  over the whole document against one forward per word on the whole preceding text — the seed's O(N²).

The baseline is timed on ``--baseline-words`` (window) or ``--full-baseline-words`` (full: each of its forwards
runs thousands of tokens through eager attention, seconds apiece on one core) words drawn uniformly from the
document and extrapolated to all words (its cost per word grows with the word's position, so a uniform sample
estimates the mean); the sampled words' target probabilities are compared with the kernel's. The baseline runs
each word as far as its last token, so it yields what the kernel yields. Best of ``--repeats`` for the kernel.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import instab_core as ic
from instab_core import wordpred as wp


def document(n_words: int) -> str:
    words = wp.SAMPLE_TEXT.read_text(encoding="utf-8").split()
    return " ".join((words * (n_words // len(words) + 1))[:n_words])


@torch.no_grad()
def seed_style(h: ic.ModelHandle, tok: wp.Tokenized, pick: np.ndarray,
               window: dict[int, int] | None) -> tuple[float, np.ndarray, int]:
    """One cache-free forward per picked word on the exact ids of its context (as far as its last token);
    ``window[t]`` = first document token visible to target t (BOS kept). Returns (seconds, first-token probs,
    token-forwards)."""
    ids = torch.as_tensor(tok.ids, device=h.device)
    probs = np.empty(len(pick))
    n_fwd = 0
    t0 = time.perf_counter()
    for k, i in enumerate(pick):
        a, b = (int(x) for x in tok.spans[i])
        lo = 0 if window is None else window[a]
        ctx = ids[:b - 1] if lo == 0 else torch.cat([ids[:tok.prefix], ids[lo:b - 1]])
        logits = h.model(input_ids=ctx[None], use_cache=False).logits[0]
        row = (a - 1) if lo == 0 else tok.prefix + (a - 1 - lo)
        probs[k] = float(torch.softmax(logits[row].double(), -1)[ids[a]])
        n_fwd += int(ctx.shape[0])
    return time.perf_counter() - t0, probs, n_fwd


def windows_of(res: wp.WordPrediction, context: int, stride: int) -> dict[int, int]:
    """First document token visible to each target under the plan actually used (0: the first window)."""
    segs = wp.plan_segments(res.tok.n_tokens, res.tok.prefix, context, stride)
    out = {}
    for k, s in enumerate(segs):
        for t in range(s.t0, s.t1):
            out[t] = 0 if k == 0 else s.lo
    return out


def bench(name: str, h: ic.ModelHandle, text: str, context: int | None, stride: int | None, baseline_words: int,
          repeats: int) -> None:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        res = wp.predict_words(h, text, context=context, stride=stride, progress=False)
        best = min(best, time.perf_counter() - t)
    n = len(res.words)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(n, size=min(baseline_words, n), replace=False))
    window = None if context is None else windows_of(res, context, stride)
    t_seed, p_seed, f_seed = seed_style(h, res.tok, pick, window)
    seed_total = t_seed * n / len(pick)
    w = res.word_arrays()
    dp = np.abs(p_seed / w["target_prob"][pick] - 1).max()
    policy = "whole document" if context is None else f"context {context}, stride {stride}"
    print(f"\n[{name}] {h.name}: {n} words, {res.tok.n_tokens} tokens, {policy}; {res.segments} segments")
    print(f"  KV-cached pass     {best:8.2f} s  {res.token_forwards:>10} token-forwards  {n / best:8.0f} words/s")
    print(f"  seed-style (extr.) {seed_total:8.2f} s  {int(f_seed * n / len(pick)):>10} token-forwards  "
          f"({len(pick)} words timed: {t_seed:.2f} s)")
    print(f"  speed-up {seed_total / best:.1f}x wall time, {f_seed * n / len(pick) / res.token_forwards:.1f}x "
          f"token-forwards; max relative difference of the sampled target probabilities {dp:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=3000)
    ap.add_argument("--baseline-words", type=int, default=200, help="words timed with the per-word re-forward")
    ap.add_argument("--full-baseline-words", type=int, default=30, help="the same for the whole-document setting")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the whole-document setting (random model)")
    args = ap.parse_args()
    text = document(args.words)
    h = ic.load_model("tiny-llama")
    print(f"device: {ic.models.device_name(h.device)}")
    bench("window", h, text, args.context, args.stride, args.baseline_words, args.repeats)
    if not args.no_full:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig.from_pretrained(ic.BUNDLED["tiny-llama"])
        cfg.max_position_embeddings = 16384
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            LlamaForCausalLM(cfg).save_pretrained(tmp)
            h.tokenizer.save_pretrained(tmp)
            hr = ic.load_model(Path(tmp))
            hr.name = "random llama (tiny-llama shape, 16384 positions)"
            bench("full", hr, text, None, None, args.full_baseline_words, args.repeats)


if __name__ == "__main__":
    main()
