"""Scale shapes: configs equal the published ones, reduced models load, tokenizers round-trip, seeds reproduce."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import instab_core as ic
from instab_core.zoo import shapes
from randmodels import SESSION_SEED

# Reduced sizes, same code path: every shape keeps its own family, tying, GQA ratio, rope and eps.
SMALL = {
    "llama-3.2-1b": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, vocab_size=2304),
    "llama-3.1-8b": dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=1,
                         vocab_size=2100),
    "qwen2.5-0.5b": dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                         vocab_size=2200),
    "qwen2.5-7b": dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                       vocab_size=2056),
}
PROMPTS = ["The capital of France is", "Cats and dogs are animals; 12 + 7 = 19.", "Zürich — naïve café ✓"]


@pytest.mark.parametrize("name", list(shapes.PUBLISHED))
def test_full_config_is_the_published_one(name):
    """The transformers config built from the shape equals the published config field by field."""
    raw = shapes.PUBLISHED[name]
    cfg = shapes._make_config(shapes.shape_config(name))
    assert shapes.architecture(cfg) == shapes.architecture(raw)
    # A few fields read directly, independently of the normaliser.
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "num_hidden_layers"):
        assert getattr(cfg, key) == raw[key], key
    assert cfg.rope_parameters["rope_theta"] == raw["rope_theta"]
    for key, value in (raw.get("rope_scaling") or {}).items():
        assert cfg.rope_parameters[key] == value, key
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", list(shapes.PUBLISHED))
def test_reduced_model_loads_and_matches(name, tmp_path):
    layers = 2
    out = shapes.build(name, tmp_path / name, layers=layers, seed=SESSION_SEED, overrides=SMALL[name],
                       progress=False)
    h = ic.load_model(out)
    expected = shapes.architecture({**shapes.PUBLISHED[name], **SMALL[name], "num_hidden_layers": layers})
    assert shapes.architecture(h.model.config) == expected
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    cfg = h.model.config
    hd = SMALL[name].get("head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attn = h.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (cfg.num_attention_heads * hd, cfg.hidden_size)
    assert tuple(attn.k_proj.weight.shape) == (cfg.num_key_value_heads * hd, cfg.hidden_size)
    assert (attn.q_proj.bias is not None) == (cfg.model_type == "qwen2")
    assert h.n_layers == layers and h.d_model == cfg.hidden_size
    tied = h.unembed.weight.data_ptr() == h.embedding.weight.data_ptr()
    assert tied == shapes.PUBLISHED[name]["tie_word_embeddings"]
    assert h.dtype == torch.float32 and all(p.dtype == torch.float32 for p in h.model.parameters())
    # Tokenizer: padded to the vocabulary, encoding identical to the bundled tokenizer, round trip.
    bundled = ic.load_model("tiny-llama").tokenizer
    assert len(h.tokenizer) == cfg.vocab_size
    for text in PROMPTS:
        ids = h.tokenizer(text)["input_ids"]
        assert ids[0] == 0 and max(ids) < cfg.vocab_size
        if cfg.model_type == "llama":  # qwen2: Qwen2Tokenizer's own pre-tokenizer (see shapes' docstring)
            assert ids == bundled(text)["input_ids"]
        assert h.tokenizer.decode(ids, skip_special_tokens=True) == text
    last = cfg.vocab_size - 1
    assert h.tokenizer.convert_ids_to_tokens(last) == shapes.PAD_TOKEN.format(last)
    # The model runs and its logits cover the vocabulary.
    with torch.no_grad():
        logits = h.model(h.encode(PROMPTS[0])[None]).logits
    assert logits.shape[-1] == cfg.vocab_size and torch.isfinite(logits).all()


def test_seeded_bits_do_not_depend_on_sharding(tmp_path):
    kw = dict(layers=2, overrides=SMALL["llama-3.1-8b"], progress=False)
    a = shapes.build("llama-3.1-8b", tmp_path / "a", seed=SESSION_SEED, **kw)
    b = shapes.build("llama-3.1-8b", tmp_path / "b", seed=SESSION_SEED, shard_gib=2 ** -12, threads=1, **kw)
    c = shapes.build("llama-3.1-8b", tmp_path / "c", seed=SESSION_SEED + 1, **kw)
    assert (b / "model.safetensors.index.json").is_file() and not (a / "model.safetensors.index.json").exists()
    index = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    sa = load_file(a / "model.safetensors")
    sb: dict[str, torch.Tensor] = {}
    for f in sorted(set(index.values())):
        sb.update(load_file(b / f))
    sc = load_file(c / "model.safetensors")
    assert set(sa) == set(sb) == set(index)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[w], sc[w])
    assert sa[w].std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(sa["model.norm.weight"], torch.ones_like(sa["model.norm.weight"]))
    # The sharded model loads to the same weights.
    ha, hb = ic.load_model(a), ic.load_model(b)
    assert all(torch.equal(p, q) for p, q in zip(ha.model.parameters(), hb.model.parameters()))


def test_clear_errors(tmp_path):
    with pytest.raises(shapes.ShapeError, match="unknown shape"):
        shapes.shape_config("llama-9")
    with pytest.raises(shapes.ShapeError, match="-L must be in 1..16"):
        shapes.shape_config("llama-3.2-1b", layers=17)
    with pytest.raises(shapes.ShapeError, match="cannot override"):
        shapes.shape_config("llama-3.2-1b", overrides={"rms_norm_eps": 1e-6})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(shapes.ShapeError, match="not empty"):
        shapes.build("llama-3.2-1b", tmp_path / "x", layers=1, overrides=SMALL["llama-3.2-1b"], progress=False)
    with pytest.raises(shapes.ShapeError, match="smaller than the bundled"):
        shapes.build("llama-3.2-1b", tmp_path / "y", layers=1, overrides={**SMALL["llama-3.2-1b"], "vocab_size": 100},
                     progress=False)
