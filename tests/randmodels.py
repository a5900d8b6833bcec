"""Fresh random Hugging Face models saved to a directory, for oracle tests on fresh inputs.

The session seed is random unless INSTAB_TEST_SEED is set; it is printed in pytest's header so a
failure can be replayed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SESSION_SEED = int(os.environ.get("INSTAB_TEST_SEED", random.SystemRandom().randrange(2**31)))
CHARS = [chr(c) for c in range(32, 127)]


def _save_char_tokenizer(path: Path) -> None:
    """A character-level tokenizer that prepends <s>: every printable ASCII text encodes."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def random_model_dir(path: Path, family: str = "llama", seed: int = SESSION_SEED, hidden: int = 32,
                     layers: int = 2, init_std: float = 0.2) -> Path:
    """Save a random causal LM of ``family`` ("llama": GQA, untied; "gpt2": tied) to ``path``."""
    torch.manual_seed(seed)
    vocab = len(CHARS) + 3
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, tie_word_embeddings=False, initializer_range=init_std)
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                         initializer_range=init_std, bos_token_id=0, eos_token_id=1)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    _save_char_tokenizer(path)
    return path


# --- every architecture family: 2-layer random models with the bundled tokenizer ------------------

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
                             "gpt2", "gpt_neox", "olmo", "olmo2", "stablelm", "granite", "falcon", "mixtral",
                             "smollm3", "qwen2_moe", "qwen3_moe")
_FAMILY_KW: dict[str, dict] = {
    "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "falcon": {"num_kv_heads": 4, "new_decoder_architecture": False, "parallel_attn": True},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0,
                "attention_multiplier": 0.25},
}


def bundled_tokenizer_dir() -> Path:
    from instab_core.zoo import BUNDLED
    return BUNDLED["tiny-llama"]


def family_model_dir(path: Path, family: str, seed: int = SESSION_SEED, hidden: int = 64, layers: int = 2,
                     init_std: float = 0.2) -> Path:
    """Save a random 2-layer causal LM of HF model type ``family`` with the bundled tokenizer (vocab 2048)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = bundled_tokenizer_dir()
    vocab = 2048
    if family == "gpt2":
        kw = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512)
    else:
        kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    kw.update(bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=init_std)
    kw.update(_FAMILY_KW.get(family, {}))
    cfg = AutoConfig.for_model(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, Path(path) / name)
    return Path(path)
