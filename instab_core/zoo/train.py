"""Train the bundled tiny models on the generated corpus (CPU, one thread, deterministic).

Usage::

    python -m instab_core.zoo.train --model tiny-llama|tiny-gpt2|all [--steps N] [--out DIR]

Writes into ``<out>/<model>/``: config.json, generation_config.json,
model.safetensors (float32), tokenizer.json, tokenizer_config.json and
manifest.json (settings, hashes, versions, wall time and measured checks).
Same script, same machine, same thread count -> same bits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from instab_core.zoo.corpus import P0, PROSE_PROMPT, SEED, SEED_QA, build_corpus, build_documents

from . import ZOO_DIR
MODELS = ("tiny-llama", "tiny-gpt2")
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class TrainSettings:
    """Optimiser and data settings (identical for both models unless overridden)."""

    steps: int = 1600
    batch_size: int = 8
    block_size: int = 256  # >= prompt + 200 generated tokens, so every position used in generation is trained
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = SEED
    eval_every: int = 250


DEFAULT_STEPS = {"tiny-llama": 1600, "tiny-gpt2": 1600}


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_tokenizer(docs: list[str]) -> Tokenizer:
    """Byte-level BPE (vocab 2048) with a post-processor that prepends <s>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json that AutoTokenizer understands."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def make_model(name: str, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Freshly initialised model of the given zoo architecture (uses the current torch seed)."""
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager", **ids,
        )
        return LlamaForCausalLM(cfg)
    if name == "tiny-gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: deterministic, memorises faster
            attn_implementation="eager", **ids,
        )
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def token_stream(tok: PreTrainedTokenizerBase, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream: <s> doc </s> <s> doc </s> ..."""
    ids: list[int] = []
    for d in docs:
        ids += tok(d, verbose=False).input_ids + [tok.eos_token_id]  # tok() already prepends <s>
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def greedy(model: PreTrainedModel, input_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding of n tokens (full recompute, no cache, EOS not special)."""
    ids = list(input_ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(input_ids):]


def distinct_ngram_ratio(ids: list[int], n: int = 4) -> float:
    """Distinct n-grams / total n-grams of a token sequence."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def measure(model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_gen: int = 200) -> dict:
    """Top-5 next tokens after P0 and the distinct-4-gram ratio of a greedy generation."""
    model.eval()
    logits = model(input_ids=torch.tensor([tok(P0).input_ids])).logits[0, -1]
    probs = logits.softmax(-1)
    top = torch.topk(logits, 5)
    top5 = [
        {"token": tok.convert_ids_to_tokens(int(i)), "text": tok.decode([int(i)]), "id": int(i),
         "logit": round(float(v), 4), "prob": round(float(probs[i]), 4)}
        for v, i in zip(top.values, top.indices)
    ]
    gen = greedy(model, tok(PROSE_PROMPT).input_ids, n_gen)
    extra = {}
    if n_gen >= 200:  # final check only: the same ratio for two experiment prompts
        for name, prompt in (("p0", P0), ("q1", SEED_QA[0][0])):
            extra[name] = round(distinct_ngram_ratio(greedy(model, tok(prompt).input_ids, n_gen), 4), 4)
    return {
        "p0": P0,
        "p0_top5": top5,
        "prose_prompt": PROSE_PROMPT,
        "gen_tokens": n_gen,
        "gen_distinct4": round(distinct_ngram_ratio(gen, 4), 4),
        "gen_text": tok.decode(gen),
        **({"gen_distinct4_other_prompts": extra} if extra else {}),
    }


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup then cosine decay to min_lr_frac * lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(name: str, out_root: Path, steps: int | None = None, verbose: bool = True) -> dict:
    """Train one zoo model from scratch and write it with its manifest; returns the manifest."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    s = TrainSettings(steps=steps if steps is not None else DEFAULT_STEPS[name])
    out = out_root / name
    t0 = time.time()

    docs = build_documents()
    corpus_sha = hashlib.sha256(build_corpus().encode("utf-8")).hexdigest()
    save_tokenizer(train_tokenizer(docs), out)
    tok = AutoTokenizer.from_pretrained(out)
    stream = token_stream(tok, docs)

    torch.manual_seed(s.seed)
    model = make_model(name, tok)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=s.betas, foreach=False,
    )
    gen = torch.Generator().manual_seed(s.seed)
    offsets = torch.arange(s.block_size)
    log: list[dict] = []
    ema = None
    for step in range(s.steps):
        model.train()
        starts = torch.randint(0, len(stream) - s.block_size, (s.batch_size,), generator=gen)
        x = stream[starts[:, None] + offsets]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            m = measure(model, tok, n_gen=100)
            rec = {"step": step + 1, "loss": round(lv, 4), "loss_ema": round(ema, 4),
                   "p0_top1": m["p0_top5"][0]["text"], "p0_top1_prob": m["p0_top5"][0]["prob"],
                   "gen100_distinct4": m["gen_distinct4"], "elapsed_s": round(time.time() - t0, 1)}
            log.append(rec)
            if verbose:
                print(json.dumps(rec), flush=True)
    train_s = time.time() - t0

    model.eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out)  # transformers 5 always writes safetensors; weights stay float32
    checks = measure(model, tok, n_gen=200)
    cfg = model.config
    manifest = {
        "model": name,
        "architecture": cfg.architectures[0] if cfg.architectures else type(model).__name__,
        "config": {k: getattr(cfg, k) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head", "n_positions",
            "max_position_embeddings", "rms_norm_eps", "layer_norm_epsilon", "tie_word_embeddings",
            "activation_function", "hidden_act",
        ) if hasattr(cfg, k)},
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "training": {**asdict(s), "optimizer": "AdamW", "schedule": "linear warmup + cosine",
                     "tokens_per_step": s.batch_size * s.block_size, "corpus_tokens": len(stream),
                     "threads": torch.get_num_threads(), "deterministic_algorithms": True},
        "final_loss": round(lv, 4),
        "final_loss_ema": round(ema, 4),
        "train_log": log,
        "sha256": {"model.safetensors": sha256_file(out / "model.safetensors"),
                   "tokenizer.json": sha256_file(out / "tokenizer.json"),
                   "corpus": corpus_sha},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version()},
        "machine": platform.machine(),
        "wall_time_s": round(train_s, 1),
        "checks": checks,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="override the default number of steps")
    ap.add_argument("--out", type=Path, default=ZOO_DIR, help="output root (default: the package zoo dir)")
    args = ap.parse_args(argv)
    for name in MODELS if args.model == "all" else (args.model,):
        m = train(name, args.out, args.steps)
        c = m["checks"]
        print(f"{name}: loss {m['final_loss']} wall {m['wall_time_s']}s "
              f"top1 {c['p0_top5'][0]['text']!r} distinct4 {c['gen_distinct4']} "
              f"sha {m['sha256']['model.safetensors'][:16]}")


if __name__ == "__main__":
    main()
