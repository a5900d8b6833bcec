"""Random-weight models of real architectures' exact shapes, built locally from their configs alone.

Usage::

    python -m instab_core.zoo.shapes NAME --out DIR [-L N] [--seed S]
    python -m instab_core.zoo.shapes --list

Writes a Hugging Face model directory that ``instab_core.load_model(DIR)`` loads: config.json (the
published config's architecture fields verbatim; ``-L N`` keeps only N decoder layers, the field
transformers calls ``num_hidden_layers``: ``n_layer`` for GPT-2),
generation_config.json, float32 safetensors (sharded, with an index, above ``--shard-gib``),
tokenizer.json / tokenizer_config.json (the bundled tiny-llama byte-level BPE tokenizer, its
vocabulary padded with unreachable ``<|pad_i|>`` entries up to the shape's ``vocab_size``, so that
every token id of the model decodes and the prompt ids stay those of the bundled tokenizer) and
shape.json (what was built, the seed, the source of the config).

For ``qwen2`` shapes transformers 5's AutoTokenizer always builds ``Qwen2Tokenizer`` from the
vocabulary and merges, with Qwen's own NFC normaliser and pre-tokenizer regex (digits split one by
one): the same vocabulary, decoding and BOS template, but some texts (numbers) encode differently
from the bundled tokenizer, as they would with the real Qwen tokenizer.

Special-token ids follow the bundled tokenizer (bos 0, eos 1, pad 2), not the published ones
(128000/128001, 151643, 50256): the published ids name tokens this tokenizer does not have.

Random weights make the *cost* real (width, vocabulary, depth, memory), not the science. Each
tensor is drawn from its own generator, seeded by (seed, tensor name), so the bits do not depend
on shard size or thread count; tensors are drawn in parallel threads one shard at a time and each
shard is written before the next is drawn (peak memory about one shard). Init follows HF's
``_init_weights``: weights (Linear, GPT-2's Conv1D, embeddings) N(0, initializer_range²), norm weights
(RMSNorm, LayerNorm) 1, biases 0; GPT-2's extra down-scaling of its ``c_proj`` weights by
1/sqrt(2·n_layer) is not applied.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import ZOO_DIR

TOKENIZER_SOURCE = ZOO_DIR / "tiny-llama"
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}  # the bundled tokenizer's
PAD_TOKEN = "<|pad_{}|>"

# The published config.json of each checkpoint (Hugging Face hub, main branch), verbatim.
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
    },
    "llama-3.1-8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 152064,
    },
    "gpt2-xl": {  # openai-community/gpt2-xl (no tie_word_embeddings field: the default, tied)
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1600, "n_head": 25,
        "n_layer": 48, "n_positions": 1024, "output_past": True, "resid_pdrop": 0.1, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    },
}
SOURCES = {"llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
           "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-7b": "Qwen/Qwen2.5-7B", "gpt2-xl": "openai-community/gpt2-xl"}
# Fields that describe the file, not the architecture; token ids are replaced by the tokenizer's.
NON_ARCHITECTURE = ("torch_dtype", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id")
# Fields a reduced test shape may override (the code path stays the same), by their published names.
REDUCIBLE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "vocab_size", "max_position_embeddings", "n_embd", "n_inner", "n_head", "n_positions", "n_ctx")


class ShapeError(ValueError):
    """An unknown shape name or an invalid option; the message says what is allowed."""


def field(cfg: dict[str, Any], name: str) -> str:
    """The key of config dict ``cfg`` that holds transformers' standard attribute ``name``
    (``num_hidden_layers``, ``hidden_size``, ...): GPT-2 publishes ``n_layer``, ``n_embd``, ..."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[cfg["model_type"]].attribute_map.get(name, name)


def shape_config(name: str, layers: int | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config dict written for shape ``name``: the published one, token ids of the bundled
    tokenizer, the layer count (``num_hidden_layers``, GPT-2 ``n_layer``) = ``layers`` if given, and
    (tests only) ``overrides`` of :data:`REDUCIBLE` fields."""
    if name not in PUBLISHED:
        raise ShapeError(f"unknown shape {name!r}; known: {', '.join(PUBLISHED)}")
    cfg = copy.deepcopy(PUBLISHED[name])
    if layers is not None:
        key = field(cfg, "num_hidden_layers")
        if not 1 <= layers <= cfg[key]:
            raise ShapeError(f"-L must be in 1..{cfg[key]} for {name}, got {layers}")
        cfg[key] = int(layers)
    for key, value in (overrides or {}).items():
        if key not in REDUCIBLE:
            raise ShapeError(f"cannot override {key!r}; reducible fields: {', '.join(REDUCIBLE)}")
        cfg[key] = value
    for key in ("torch_dtype", "transformers_version"):
        cfg.pop(key, None)  # absent from older files (gpt2-xl)
    cfg["dtype"] = "float32"
    cfg.update(TOKEN_IDS)
    return cfg


def architecture(config: Any) -> dict[str, Any]:
    """The architecture fields of a config (a published dict or a loaded ``PretrainedConfig``),
    normalised so that both compare equal: rope as one dict (theta + scaling; None without rope, as
    GPT-2), head_dim derived when absent, token ids and file fields dropped."""
    d = dict(config) if isinstance(config, dict) else config.to_dict()
    rope = d.get("rope_parameters")
    if rope is None and "rope_theta" in d:  # transformers 4.x field names, as published
        rope = {"rope_theta": d["rope_theta"], **(d.get("rope_scaling") or {"rope_type": "default"})}
    if rope is not None:
        rope = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rope_type"
                    and k != "original_max_position_embeddings" else v) for k, v in rope.items()}
    keys = set(PUBLISHED_KEYS.get(d["model_type"], ())) - set(NON_ARCHITECTURE) - {"rope_theta", "rope_scaling"}
    out = {k: d.get(k) for k in sorted(keys)}
    out["rope"] = rope
    if not out.get("use_sliding_window", True):
        out["sliding_window"] = None  # transformers 5 stores None when the window is off (Qwen2Config)
    if out.get("head_dim") is None:
        out["head_dim"] = d[field(d, "hidden_size")] // d[field(d, "num_attention_heads")]
    return out


PUBLISHED_KEYS: dict[str, tuple[str, ...]] = {}
for _cfg in PUBLISHED.values():
    PUBLISHED_KEYS[_cfg["model_type"]] = tuple(sorted(set(PUBLISHED_KEYS.get(_cfg["model_type"], ())) | set(_cfg)))
PUBLISHED_KEYS["llama"] = tuple(sorted(set(PUBLISHED_KEYS["llama"]) | {"head_dim"}))


def _make_config(cfg: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = dict(cfg)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


Shape = tuple[str, tuple[int, ...], str]  # state-dict name, shape, init ("ones", "zeros" or "normal")


def parameter_shapes(config: Any) -> list[Shape]:
    """(state-dict name, shape, init) of every tensor to save, in module order; tied weights once.
    Init: biases "zeros", the weights of norm modules (class name ending in ``Norm``: RMSNorm,
    LayerNorm) "ones", everything else "normal"."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    def init(name: str) -> str:
        if name.endswith(".bias"):
            return "zeros"
        return "ones" if type(model.get_submodule(name.rpartition(".")[0])).__name__.endswith("Norm") else "normal"

    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # shared (tied) parameters once
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [(n, tuple(b.shape)) for n, b in model.state_dict().items() if n not in names]
    return [(n, s, init(n)) for n, s in params + buffers]


def _tensor(name: str, shape: tuple[int, ...], init: str, seed: int, std: float) -> torch.Tensor:
    """One float32 tensor: ones, zeros, or N(0, std²) drawn from its own generator seeded by (seed, name)."""
    if init == "ones":
        return torch.ones(shape, dtype=torch.float32)
    if init == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


def _shards(shapes: list[Shape], shard_bytes: int) -> list[list[Shape]]:
    shards: list[list[Shape]] = [[]]
    size = 0
    for item in shapes:
        n = 4 * int(torch.Size(item[1]).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def write_padded_tokenizer(out: Path, vocab_size: int, model_max_length: int) -> None:
    """The bundled tokenizer with its BPE vocabulary padded to ``vocab_size`` entries.

    The padding entries ``<|pad_i|>`` (i = old size … vocab_size−1) are plain vocabulary entries no
    merge produces, so encoding is unchanged and every id < vocab_size decodes.
    """
    tok = json.loads((TOKENIZER_SOURCE / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    n = max(vocab.values()) + 1
    if vocab_size < n:
        raise ShapeError(f"vocab_size {vocab_size} is smaller than the bundled tokenizer's {n} tokens")
    for i in range(n, vocab_size):
        vocab[PAD_TOKEN.format(i)] = i
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    tcfg = json.loads((TOKENIZER_SOURCE / "tokenizer_config.json").read_text())
    tcfg["model_max_length"] = int(model_max_length)
    # Qwen2Tokenizer (what AutoTokenizer returns for every qwen2 directory in transformers 5) would
    # otherwise add "<|endoftext|>" as unk, an id beyond the model's vocabulary.
    tcfg["unk_token"] = None
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")


def build(name: str, out: str | os.PathLike, layers: int | None = None, seed: int = 0,
          overrides: dict[str, Any] | None = None, shard_gib: float = 2.0, threads: int | None = None,
          progress: bool = True) -> Path:
    """Write the random-weight model of shape ``name`` into ``out`` (created; must be empty or absent).

    Peak memory is about one shard (``shard_gib``, or the largest single tensor if larger).
    Returns the directory.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ShapeError(f"{out} exists and is not empty; pass a new directory")
    cfg = shape_config(name, layers, overrides)
    config = _make_config(cfg)
    shapes = parameter_shapes(config)
    shards = _shards(shapes, int(shard_gib * 2**30))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    std = float(cfg["initializer_range"])
    workers = threads or max(1, min(8, os.cpu_count() or 1))
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(4 * torch.Size(s).numel() for _, s, _ in shapes), unit="B", unit_scale=True,
                   desc=f"shapes {name}")
    with ThreadPoolExecutor(workers) as pool:
        for file, shard in zip(files, shards):
            tensors = dict(zip([n for n, _, _ in shard], pool.map(lambda t: _tensor(*t, seed, std), shard)))
            save_file(tensors, str(out / file), metadata={"format": "pt"})
            size = sum(4 * t.numel() for t in tensors.values())
            total += size
            weight_map.update({n: file for n in tensors})
            del tensors
            if bar is not None:
                bar.update(size)
    if bar is not None:
        bar.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    GenerationConfig(**TOKEN_IDS, do_sample=False).save_pretrained(out)
    write_padded_tokenizer(out, int(config.vocab_size), int(config.max_position_embeddings))
    n_params = sum(int(torch.Size(s).numel()) for _, s, _ in shapes)
    (out / "shape.json").write_text(json.dumps({
        "shape": name, "source_config": SOURCES[name], "layers": config.num_hidden_layers,
        "published_layers": PUBLISHED[name][field(cfg, "num_hidden_layers")], "seed": seed,
        "overrides": overrides or {},
        "parameters": n_params, "bytes": total, "files": files, "init": f"N(0, {std}^2), norms 1, biases 0",
        "tokenizer": "bundled tiny-llama BPE, vocabulary padded with <|pad_i|>", "seconds": time.perf_counter() - t0,
    }, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help=f"one of: {', '.join(PUBLISHED)}")
    ap.add_argument("--out", help="new directory to write")
    ap.add_argument("-L", "--layers", type=int, default=None, help="keep only N decoder layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--list", action="store_true", help="list the shapes and exit")
    args = ap.parse_args(argv)
    if args.list or args.name is None:
        for n in PUBLISHED:
            c = _make_config(shape_config(n))
            print(f"{n:14} {SOURCES[n]:26} d={c.hidden_size} layers={c.num_hidden_layers} "
                  f"vocab={c.vocab_size} tied={c.tie_word_embeddings}")
        return
    if not args.out:
        ap.error("--out DIR is required")
    try:
        path = build(args.name, args.out, args.layers, args.seed, shard_gib=args.shard_gib)
    except ShapeError as exc:
        raise SystemExit(f"error: {exc}") from None
    info = json.loads((path / "shape.json").read_text())
    print(f"{path}: {args.name}, {info['layers']} layers, {info['parameters'] / 1e6:.1f}M parameters, "
          f"{info['bytes'] / 2**30:.2f} GiB float32, {info['seconds']:.1f} s")


if __name__ == "__main__":
    main()
