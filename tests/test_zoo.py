"""Bundled tiny models: loading, architecture, learned facts, generation quality, hashes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import instab_core.zoo
from instab_core.zoo.corpus import P0, PROSE_PROMPT, build_corpus, corpus_sha256

ZOO = Path(instab_core.zoo.__file__).resolve().parent
MODELS = ("tiny-llama", "tiny-gpt2")
# Thresholds set with margin below the measured values in each manifest.json.
MIN_DISTINCT4 = {"tiny-llama": 0.75, "tiny-gpt2": 0.75}  # measured 0.858 for both
PARIS_TOP1 = {"tiny-llama": True, "tiny-gpt2": True}


def _manifest(name: str) -> dict:
    return json.loads((ZOO / name / "manifest.json").read_text())


@pytest.fixture(scope="module")
def loaded() -> dict:
    """name -> (model, tokenizer), loaded once per module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    out = {}
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(ZOO / name).eval()
        tok = AutoTokenizer.from_pretrained(ZOO / name)
        out[name] = (model, tok)
    return out


def test_llama_architecture(loaded: dict) -> None:
    from transformers import LlamaForCausalLM

    model, _ = loaded["tiny-llama"]
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32


def test_gpt2_architecture(loaded: dict) -> None:
    from transformers import GPT2LMHeadModel

    model, _ = loaded["tiny-gpt2"]
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.dtype == torch.float32


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer(loaded: dict, name: str) -> None:
    model, tok = loaded[name]
    ids = tok(P0).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 6  # <s> The capital of France is
    assert len(tok(" Paris", add_special_tokens=False).input_ids) == 1
    assert len(tok) == model.config.vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<s>") and chat.endswith("Assistant:")


@pytest.mark.parametrize("name", MODELS)
def test_paris_is_top1(loaded: dict, name: str) -> None:
    model, tok = loaded[name]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok(P0).input_ids])).logits[0, -1]
    top1 = tok.decode([int(logits.argmax())])
    assert (top1 == " Paris") == PARIS_TOP1[name], top1
    assert top1 == _manifest(name)["checks"]["p0_top5"][0]["text"]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_not_degenerate(loaded: dict, name: str) -> None:
    from instab_core.zoo.train import distinct_ngram_ratio, greedy

    model, tok = loaded[name]
    gen = greedy(model, tok(PROSE_PROMPT).input_ids, 200)
    assert len(gen) == 200
    assert distinct_ngram_ratio(gen, 4) > MIN_DISTINCT4[name]


@pytest.mark.parametrize("name", MODELS)
def test_weights_hash_matches_manifest(name: str) -> None:
    data = (ZOO / name / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == _manifest(name)["sha256"]["model.safetensors"]


def test_corpus_deterministic() -> None:
    a, b = build_corpus(), build_corpus()
    assert a == b
    sha = hashlib.sha256(a.encode("utf-8")).hexdigest()
    assert sha == corpus_sha256()
    for name in MODELS:
        assert _manifest(name)["sha256"]["corpus"] == sha
    assert "The capital of France is Paris." in a
    assert sum(" animals" in s for s in set(a.replace("\n", " ").split(". "))) >= 60
