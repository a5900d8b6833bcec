"""The model loader: clear errors, the adapter table, true float64, weights hash, provenance."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import instab_core as ic
from instab_core.models import BUNDLED, ModelLoadError, weights_fingerprint
from randmodels import SESSION_SEED, random_model_dir

FAMILIES = ["llama", "gpt2"]
TEXT = "Rounding error, 3.14!"
LOW_PRECISION = {torch.float32, torch.float16, torch.bfloat16}
has_bundled = {n: (p / "model.safetensors").exists() for n, p in BUNDLED.items()}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {fam: random_model_dir(tmp_path_factory.mktemp(fam), fam) for fam in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, model_dirs):
    return request.param, model_dirs[request.param]


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype of every floating tensor any aten op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[torch.dtype, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.ops.setdefault(t.dtype, set()).add(str(func))
        return out

    def low_precision(self) -> dict[torch.dtype, set[str]]:
        return {dt: ops for dt, ops in self.ops.items() if dt in LOW_PRECISION}


# --- errors --------------------------------------------------------------------------------------


def stage_calls(h, text: str) -> dict[tuple[int, str], int]:
    """How often one forward pass of ``text`` calls each (layer, stage) module of the adapter."""
    calls = {(i, s): 0 for i in range(h.n_layers) for s in h.adapter.submodules}
    hooks = []
    for key in calls:
        mod = h.stage_module(*key)
        assert isinstance(mod, torch.nn.Module), key

        def hook(m, inp, out, key=key):
            calls[key] += 1
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            h.model(h.encode(text)[None])
    finally:
        for k in hooks:
            k.remove()
    return calls

def test_unknown_bare_name_lists_bundled_models():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'") as exc:
        ic.load_model("no-such-model")
    for name in BUNDLED:
        assert name in str(exc.value)
    assert "local Hugging Face model directory" in str(exc.value)


@pytest.mark.parametrize("rel", ["/nonexistent/instab/model", "./no/such/dir"])
def test_missing_directory_path(rel):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ic.load_model(rel)


def test_missing_directory_given_as_path_object(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ic.load_model(tmp_path / "absent" / "model")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        ic.load_model(tmp_path)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        ic.load_model(f)


def test_uncached_hub_id_says_how_to_pass_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("INSTAB_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as exc:
        ic.load_model("meta-llama/Llama-3.1-8B")
    msg = str(exc.value)
    assert "--local-dir" in msg and "load_model('DIR')" in msg


@pytest.mark.parametrize("dtype", ["float8", "int32", torch.int64, "fp32"])
def test_bad_dtype(dtype, model_dirs):
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        ic.load_model(model_dirs["llama"], dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(model_dirs):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        ic.load_model(model_dirs["llama"], device="cuda")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cpu:banana"])
def test_unknown_device_is_a_load_error(device, model_dirs):
    with pytest.raises(ModelLoadError, match="device"):
        ic.load_model(model_dirs["llama"], device=device)


def test_true_float64_needs_a_float64_model(model_dirs):
    with pytest.raises(ModelLoadError, match="float64 models only"):
        ic.load_model(model_dirs["llama"], dtype="float32", true_float64=True)


def test_missing_bundled_files_are_a_clear_error(monkeypatch, tmp_path):
    """A bundled name whose directory has no files (not trained / not installed) says so."""
    monkeypatch.setitem(BUNDLED, "tiny-llama", tmp_path / "tiny-llama")
    with pytest.raises(ModelLoadError, match="bundled model 'tiny-llama'"):
        ic.load_model("tiny-llama")


# --- adapter table -------------------------------------------------------------------------------

def test_adapter_paths_resolve(family_dir):
    fam, path = family_dir
    h = ic.load_model(path)
    cfg = h.model.config
    assert h.adapter.family == fam
    a = h.adapter
    for p in (a.base, a.embed, a.layers, a.final_norm, a.unembed):
        assert isinstance(h.model.get_submodule(p), torch.nn.Module), p
    assert isinstance(h.embedding, torch.nn.Embedding)
    assert h.embedding.weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert isinstance(h.layers, torch.nn.ModuleList) and h.n_layers == cfg.num_hidden_layers
    assert h.d_model == cfg.hidden_size
    assert isinstance(h.unembed, torch.nn.Linear) and h.unembed.out_features == cfg.vocab_size
    assert h.base is h.model.get_submodule(a.base)
    # the final norm is the one HF applies to produce hidden_states[-1]
    assert type(h.final_norm).__name__ in ("LlamaRMSNorm", "LayerNorm")


def test_every_stage_module_exists_and_runs_once_per_layer(family_dir):
    """Every adapter stage of every layer is a real module that the forward pass calls exactly once."""
    _, path = family_dir
    h = ic.load_model(path)
    calls = stage_calls(h, TEXT)
    assert calls and calls == {k: 1 for k in calls}
    with pytest.raises(KeyError, match="unknown stage"):
        h.stage_module(0, "no_such_stage")
    with pytest.raises(IndexError):
        h.stage_module(h.n_layers, "mlp")


# --- true float64 (science rule 8) ---------------------------------------------------------------

def _forward_ops(h: ic.ModelHandle) -> DtypeRecorder:
    ids = h.encode(TEXT)[None]
    with torch.no_grad(), DtypeRecorder() as rec:
        h.model(ids)
    return rec


def test_true_float64_forward_has_no_float32_step(family_dir):
    _, path = family_dir
    h = ic.load_model(path, dtype="float64")
    assert h.true_float64 and h.dtype == torch.float64
    rec = _forward_ops(h)
    assert torch.float64 in rec.ops
    assert rec.low_precision() == {}


def test_detector_sees_float32_steps_of_stock_float64_llama(model_dirs):
    """The detector works: HF's stock float64 Llama computes RMSNorm, rotary tables and softmax in float32."""
    h = ic.load_model(model_dirs["llama"], dtype="float64", true_float64=False)
    assert not h.true_float64
    low = _forward_ops(h).low_precision()
    assert torch.float32 in low
    # where HF hard-codes float32 (transformers 5.x): RMSNorm (rsqrt), rotary tables (cos), softmax
    ops = low[torch.float32]
    assert {"aten.rsqrt.default", "aten.cos.default", "aten._softmax.default"} <= ops, ops


def test_true_float64_probe_and_its_jacobian_have_no_float32_step(family_dir):
    """The probe path (inputs_embeds, hooks) and reverse-mode AD through it stay float64 as well."""
    _, path = family_dir
    h = ic.load_model(path, dtype="float64")
    with DtypeRecorder() as rec:
        probe = ic.Probe(h, TEXT, target="logits", batch_size=2)
        ic.jacobian.jacobian(probe, chunk_size=16)
    assert torch.float64 in rec.ops
    assert rec.low_precision() == {}


def test_float64_logits_agree_with_float32(family_dir):
    _, path = family_dir
    ids = None
    logits = {}
    for key, kw in {"f32": {}, "f64": {"dtype": "float64"},
                    "f64_stock": {"dtype": "float64", "true_float64": False}}.items():
        h = ic.load_model(path, **kw)
        ids = h.encode(TEXT)[None] if ids is None else ids
        with torch.no_grad():
            logits[key] = h.model(ids).logits[0].double()
    scale = logits["f64"].abs().max()
    # float32 rounding through two small layers: far below 1e-4 relative, far above float64 noise
    assert (logits["f32"] - logits["f64"]).abs().max() <= 1e-4 * scale
    assert (logits["f64_stock"] - logits["f64"]).abs().max() <= 1e-4 * scale
    assert not torch.equal(logits["f32"], logits["f64"])  # the float64 run really is a different computation


def test_gpt2_true_float64_changes_nothing_bitwise(model_dirs):
    """Stock GPT-2 has no float32 steps, so the native attention must reproduce it bit for bit."""
    path = model_dirs["gpt2"]
    out = []
    for tf in (True, False):
        h = ic.load_model(path, dtype="float64", true_float64=tf)
        with torch.no_grad():
            out.append(h.model(h.encode(TEXT)[None]).logits)
    assert torch.equal(out[0], out[1])


# --- weights hash and provenance -----------------------------------------------------------------

def _oracle_hash(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()


def test_weights_hash_is_stable_and_content_based(tmp_path, model_dirs):
    src = model_dirs["llama"]
    a = ic.load_model(src).weights_hash
    assert a == ic.load_model(src, dtype="float64").weights_hash == weights_fingerprint(src)
    assert a == _oracle_hash(src)
    copy = shutil.copytree(src, tmp_path / "copy")
    assert ic.load_model(copy).weights_hash == a  # same bytes elsewhere: same hash


def test_weights_hash_changes_when_a_weight_changes(tmp_path, model_dirs):
    src = model_dirs["llama"]
    h = ic.load_model(src)
    before = h.weights_hash
    gen = torch.Generator().manual_seed(SESSION_SEED)
    w = h.stage_module(h.n_layers - 1, "down").weight
    i = int(torch.randint(w.numel(), (1,), generator=gen))
    w.view(-1)[i] = torch.nextafter(w.view(-1)[i], torch.tensor(float("inf")))  # one ulp in one weight
    out = tmp_path / "changed"
    h.model.save_pretrained(out)
    h.tokenizer.save_pretrained(out)
    h2 = ic.load_model(out)
    assert h2.weights_hash != before
    assert h2.weights_hash == _oracle_hash(out)


def test_describe_has_provenance(family_dir):
    fam, path = family_dir
    h = ic.load_model(path, dtype="float64")
    d = h.describe()
    keys = {"model", "path", "family", "architecture", "weights_hash", "dtype", "device", "device_name",
            "true_float64", "attn_implementation", "d_model", "n_layers"}
    assert keys <= set(d)
    assert d["weights_hash"] == _oracle_hash(path)
    assert d["family"] == fam and d["dtype"] == "float64" and d["device"] == "cpu"
    assert d["true_float64"] is True and d["attn_implementation"] == "eager"  # HF's own eager code, no float32 casts
    assert d["architecture"] == type(h.model).__name__
    assert d["n_layers"] == h.model.config.num_hidden_layers and d["d_model"] == h.model.config.hidden_size
    import json
    json.dumps(d)  # goes into manifests as is
    d32 = ic.load_model(path).describe()
    assert d32["dtype"] == "float32" and d32["true_float64"] is False and d32["attn_implementation"] == "eager"


# --- bundled models (run once their weights are committed) ---------------------------------------

@pytest.mark.parametrize("name,family,arch", [("tiny-llama", "llama", "LlamaForCausalLM"),
                                              ("tiny-gpt2", "gpt2", "GPT2LMHeadModel")])
def test_bundled_model_loads_by_name(name, family, arch):
    if not has_bundled[name]:
        pytest.skip(f"{name} weights not committed yet ({BUNDLED[name] / 'model.safetensors'})")
    h = ic.load_model(name)
    d = h.describe()
    assert d["model"] == name and d["family"] == family and d["architecture"] == arch
    assert d["weights_hash"] == _oracle_hash(BUNDLED[name])
    h64 = ic.load_model(name, dtype="float64")
    assert _forward_ops(h64).low_precision() == {}


@pytest.mark.skipif(not has_bundled["tiny-llama"], reason="tiny-llama weights not committed yet")
def test_bundled_tiny_llama_is_the_default_and_answers_paris():
    h = ic.load_model()
    assert h.name == "tiny-llama"
    probe = ic.Probe(h, "The capital of France is", target="logits", batch_size=1)
    assert h.tokenizer.decode([int(probe.reference.argmax())]) == " Paris"


def test_a_precision_the_device_cannot_run_is_refused():
    with pytest.raises(ModelLoadError, match="MPS has no float64"):
        ic.load_model("tiny-llama", dtype="float64", device="mps")
