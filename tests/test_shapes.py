"""Scale shapes: configs equal the published ones, reduced models load, tokenizers round-trip, seeds reproduce."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import instab_core as ic
from instab_core.zoo import shapes
from randmodels import SESSION_SEED

# Reduced sizes (by the published field names), same code path: every shape keeps its own family, tying,
# GQA ratio, rope and eps.
SMALL = {
    "llama-3.2-1b": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, vocab_size=2304),
    "llama-3.1-8b": dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=1,
                         vocab_size=2100),
    "qwen2.5-0.5b": dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                         vocab_size=2200),
    "qwen2.5-7b": dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                       vocab_size=2056),
    "gpt2-xl": dict(n_embd=80, n_head=5, n_positions=128, n_ctx=128, vocab_size=2090),
}
STANDARD = ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings")  # GPT-2: n_*
PROMPTS = ["The capital of France is", "Cats and dogs are animals; 12 + 7 = 19.", "Zürich — naïve café ✓"]


@pytest.mark.parametrize("name", list(shapes.PUBLISHED))
def test_full_config_is_the_published_one(name):
    """The transformers config built from the shape equals the published config field by field."""
    raw = shapes.PUBLISHED[name]
    cfg = shapes._make_config(shapes.shape_config(name))
    assert shapes.architecture(cfg) == shapes.architecture(raw)
    # Every published field read directly, independently of the normaliser (rope and the window below).
    for key, value in raw.items():
        if key not in (*shapes.NON_ARCHITECTURE, "rope_theta", "rope_scaling", "sliding_window"):
            assert getattr(cfg, key) == value, key
    for key in STANDARD:  # transformers' names, whatever the family publishes
        assert getattr(cfg, key) == raw[shapes.field(raw, key)], key
    assert cfg.tie_word_embeddings == raw.get("tie_word_embeddings", True)  # gpt2-xl: the default
    if "rope_theta" in raw:
        assert cfg.rope_parameters["rope_theta"] == raw["rope_theta"]
        for key, value in (raw.get("rope_scaling") or {}).items():
            assert cfg.rope_parameters[key] == value, key
    else:
        assert getattr(cfg, "rope_parameters", None) is None
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", list(shapes.PUBLISHED))
def test_reduced_model_loads_and_matches(name, tmp_path):
    layers = 2
    out = shapes.build(name, tmp_path / name, layers=layers, seed=SESSION_SEED, overrides=SMALL[name],
                       progress=False)
    h = ic.load_model(out)
    raw = shapes.PUBLISHED[name]
    layers_key = shapes.field(raw, "num_hidden_layers")
    expected = shapes.architecture({**raw, **SMALL[name], layers_key: layers})
    assert shapes.architecture(h.model.config) == expected
    assert json.loads((out / "config.json").read_text())[layers_key] == layers
    cfg = h.model.config
    d = cfg.hidden_size
    if cfg.model_type == "gpt2":  # fused qkv, Conv1D weights stored (in, out), biases everywhere
        block = h.layers[0]
        assert tuple(block.attn.c_attn.weight.shape) == (d, 3 * d) and block.attn.c_attn.bias is not None
        assert tuple(block.mlp.c_fc.weight.shape) == (d, cfg.n_inner or 4 * d)
        assert (cfg.n_head, cfg.n_positions) == (SMALL[name]["n_head"], SMALL[name]["n_positions"])
        assert cfg.layer_norm_epsilon == raw["layer_norm_epsilon"]
    else:
        hd = SMALL[name].get("head_dim", d // cfg.num_attention_heads)
        attn = h.layers[0].self_attn
        assert tuple(attn.q_proj.weight.shape) == (cfg.num_attention_heads * hd, d)
        assert tuple(attn.k_proj.weight.shape) == (cfg.num_key_value_heads * hd, d)
        assert (attn.q_proj.bias is not None) == (cfg.model_type == "qwen2")
    assert h.n_layers == layers and h.d_model == d
    tied = h.unembed.weight.data_ptr() == h.embedding.weight.data_ptr()
    assert tied == raw.get("tie_word_embeddings", True)
    assert h.dtype == torch.float32 and all(p.dtype == torch.float32 for p in h.model.parameters())
    # Init: norm weights (RMSNorm, LayerNorm) 1, biases 0, weights N(0, 0.02²).
    norms = [m for m in h.model.modules() if type(m).__name__.endswith("Norm")]
    assert len(norms) == (2 * layers + 1) and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    biases = [p for n, p in h.model.named_parameters() if n.endswith(".bias")]
    assert (len(biases) > 0) == (cfg.model_type != "llama") and all(not p.any() for p in biases)
    assert h.embedding.weight.std().item() == pytest.approx(raw["initializer_range"], rel=0.05)
    # Special-token ids: the bundled tokenizer's, the same in the tokenizer, the config and the generation config.
    ids = (h.tokenizer.bos_token_id, h.tokenizer.eos_token_id, h.tokenizer.pad_token_id)
    assert ids == (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    gen = h.model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 2)
    assert h.tokenizer.model_max_length == cfg.max_position_embeddings
    # Tokenizer: padded to the vocabulary, encoding identical to the bundled tokenizer, round trip.
    bundled = ic.load_model("tiny-llama").tokenizer
    assert len(h.tokenizer) == cfg.vocab_size
    for text in PROMPTS:
        ids = h.tokenizer(text)["input_ids"]
        assert ids[0] == 0 and max(ids) < cfg.vocab_size
        if cfg.model_type != "qwen2":  # qwen2: Qwen2Tokenizer's own pre-tokenizer (see shapes' docstring)
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


def test_scale_run_reruns_the_upstream_run_a_notebook_reads(tmp_path):
    """make bench-scale on a fresh work folder: a notebook still to run whose upstream notebook is recorded as
    finished, but whose results are not in the work folder, gets that upstream run again first; a finished run
    there (not an interrupted one) is enough."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    names = ["exp12", "exp06", "exp07", "exp13", "exp15"]
    done = {n: {"ok": True} for n in names}
    assert scale.to_run(names, done, tmp_path) == []
    assert scale.to_run(names, done | {"exp07": {"ok": False}}, tmp_path) == ["exp06", "exp07"]
    assert scale.to_run(names, done | {"exp15": {}}, tmp_path) == ["exp12", "exp13", "exp15"]
    exp06 = tmp_path / "results" / "exp06"
    (exp06 / "20261206-000001-cd34.partial").mkdir(parents=True)  # an interrupted run is no run
    (exp06 / "20261206-000001-cd34.partial" / "manifest.json").write_text("{}")
    assert scale.to_run(names, done | {"exp07": {"ok": False}}, tmp_path) == ["exp06", "exp07"]
    (exp06 / "20261206-000000-ab12").mkdir()
    (exp06 / "20261206-000000-ab12" / "manifest.json").write_text("{}")
    assert scale.to_run(names, done | {"exp07": {"ok": False}}, tmp_path) == ["exp07"]
