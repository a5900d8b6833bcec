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
