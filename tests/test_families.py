"""Every architecture family the installed transformers offers, as a 2-layer random model with the bundled tokenizer.

Per family: the discovered adapter (every stage runs once per layer), the adapter's stages against HF's
``hidden_states`` bit for bit, the probe's logits against the model's own, no float32 op in a float64 forward
(the op-level dtype recorder, forward and reverse mode), float64 against float32, eager against sdpa attention,
forward-mode AD (jvp) through the probe, and smoke runs of the notebooks with ``-p model DIR`` (Llama in the fast
part, the other families marked slow).

Every outcome is also written to ``families.json`` (in pytest's temporary directory, or the path in
``INSTAB_FAMILY_REPORT``); ``python scripts/family_table.py`` turns such files into the README's table.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.func import jvp

import instab_core as ic
from instab_core.models import AdapterError, ModelLoadError, parse_layers
from randmodels import FAMILIES, SESSION_SEED, family_model_dir
from test_models import DtypeRecorder, stage_calls

TEXT = "The capital of France is Paris, and the animals"
NOTEBOOKS = ("exp02", "exp12", "exp01", "exp04", "fisher", "levelsets", "linearity")
# In the fast part: the two notebooks whose defaults used to assume the bundled model's depth and logits, on Llama.
# The rest (a minute or more each on 2 cores) are marked slow.
FAST_NOTEBOOKS = (("llama", "fisher"), ("llama", "levelsets"))
MODEL_PARAMETER = {"linearity": "models"}  # notebooks that take a list of models
# `make test` runs four notebooks on a family whose structure differs most from Llama's (a notebook run costs
# ~20 s of imports and kernel start on 2 cores; the whole grid is `make test-families`).
ROTATION = {"gemma2": "exp02", "mixtral": "exp12", "gpt_neox": "exp01", "olmo2": "exp04"}


def _available(family: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    return family in CONFIG_MAPPING_NAMES


AVAILABLE = [f for f in FAMILIES if _available(f)]
REPORT: dict[str, dict[str, str]] = {}


_OUT: list[Path] = []


def _flush() -> None:
    """Merge REPORT into the report file (after every outcome, so an interrupted run keeps what it measured)."""
    if not _OUT or not REPORT:
        return
    out = _OUT[0]
    old = json.loads(out.read_text()) if out.is_file() else {}
    for fam, checks in REPORT.items():
        old.setdefault(fam, {}).update(checks)
    import transformers
    old["_meta"] = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": SESSION_SEED,
                    "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=1, sort_keys=True))
    tmp.replace(out)


@pytest.fixture(scope="module", autouse=True)
def family_report(tmp_path_factory):
    """Every recorded outcome goes to families.json (pytest's temp dir, or $INSTAB_FAMILY_REPORT)."""
    _OUT[:] = [Path(os.environ.get("INSTAB_FAMILY_REPORT") or tmp_path_factory.getbasetemp() / "families.json")]
    yield REPORT
    _flush()
    if REPORT:
        print(f"\nfamily report: {_OUT[0]}")


@contextmanager
def record(family: str, check: str, ok: str = "pass"):
    """Record ``ok`` for (family, check) if the block passes, else ``fail: <first line>`` (and re-raise)."""
    try:
        yield
    except pytest.skip.Exception:
        REPORT.setdefault(family, {})[check] = "skip"
        raise
    except BaseException as exc:
        REPORT.setdefault(family, {})[check] = f"fail: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}" \
            if str(exc) else f"fail: {type(exc).__name__}"
        raise
    finally:
        _flush()
    REPORT.setdefault(family, {})[check] = ok
    _flush()


def note(family: str, check: str, value: str) -> None:
    REPORT.setdefault(family, {})[check] = value
    _flush()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = family_model_dir(tmp_path_factory.mktemp(family), family)
        return cache[family]
    return get


_HANDLES: dict[tuple, ic.ModelHandle] = {}


def load(path: Path, **kw) -> ic.ModelHandle:
    """ic.load_model, cached per (path, options) within the module (only tests that leave the model as is)."""
    key = (str(path), tuple(sorted(kw.items())))
    if key not in _HANDLES:
        if len(_HANDLES) > 8:
            _HANDLES.clear()
        _HANDLES[key] = ic.load_model(path, **kw)
    return _HANDLES[key]


@pytest.fixture(scope="module", params=AVAILABLE)
def fam(request, family_dirs):
    return request.param, family_dirs(request.param)


def _layer_io(h: ic.ModelHandle, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], object]:
    """One HF forward with hidden_states, and the adapter's stages captured by hooks in the same pass."""
    got: dict[str, torch.Tensor] = {}
    hooks = [h.layers[0].register_forward_pre_hook(
        lambda m, a, k: got.__setitem__("layer_in[0]", (k.get("hidden_states") if "hidden_states" in k else a[0])),
        with_kwargs=True),
        h.embedding.register_forward_hook(lambda m, i, o: got.__setitem__("embedding", o)),
        h.final_norm.register_forward_hook(lambda m, i, o: got.__setitem__("final_norm", o))]
    for i, layer in enumerate(h.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(f"layer_out[{i}]", o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = h.model(ids[None], output_hidden_states=True, use_cache=False)
    finally:
        for k in hooks:
            k.remove()
    return {k: v.detach().clone() for k, v in got.items()}, out


# --- adapters ------------------------------------------------------------------------------------

def test_adapter_is_discovered_and_every_stage_runs_once(fam):
    family, path = fam
    with record(family, "load"):
        h = load(path)
    a = h.adapter
    with record(family, "adapter"):
        assert a.family == h.model.config.model_type == family
        assert h.embedding is h.model.get_input_embeddings() and h.unembed is h.model.get_output_embeddings()
        assert isinstance(h.layers, torch.nn.ModuleList) and h.n_layers == 2
        assert a.tied == (h.unembed.weight is h.embedding.weight)
        for stage in ("attn", "mlp"):
            assert stage in a.submodules, (stage, a.submodules)
        calls = stage_calls(h, TEXT)
        assert calls == {k: 1 for k in calls}
        assert set(a.projections) <= set(a.submodules) and a.projections
    note(family, "stages", " ".join(a.submodules))
    note(family, "structure", "; ".join(a.notes) or "sequential attention then MLP")


def test_stages_equal_hf_hidden_states_bitwise(fam):
    """hidden_states[0] is the first layer's input, [i] layer i−1's output, [-1] the final norm's output."""
    family, path = fam
    with record(family, "hidden_states"):
        h = load(path)
        ids = h.encode(TEXT)
        got, out = _layer_io(h, ids)
        hs = out.hidden_states
        assert len(hs) == h.n_layers + 1
        assert torch.equal(hs[0], got["layer_in[0]"])
        if h.adapter.embed_is_input:
            assert torch.equal(hs[0], got["embedding"])
        elif h.adapter.embed_multiplier is not None:
            assert torch.equal(hs[0], got["embedding"] * h.adapter.embed_multiplier)
        else:  # absolute position embeddings (GPT-2)
            assert not torch.equal(hs[0], got["embedding"])
        for i in range(h.n_layers - 1):
            assert torch.equal(hs[i + 1], got[f"layer_out[{i}]"]), i
        assert torch.equal(hs[-1], got["final_norm"])
        assert torch.equal(out.logits, h.logits(got["final_norm"]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probe_logits_equal_the_models_own(fam, dtype):
    family, path = fam
    with record(family, f"probe_logits_{dtype}"):
        h = load(path, dtype=dtype)
        ids = h.encode(TEXT)
        with torch.no_grad():
            out = h.model(ids[None], output_hidden_states=True)
        probe = ic.Probe(h, TEXT, target="final_hidden", batch_size=1)
        assert torch.equal(probe.reference, out.hidden_states[-1][0, -1])
        probe = ic.Probe(h, TEXT, target="logits", batch_size=1)
        ref = out.logits[0, -1]
        if not torch.equal(probe.reference, ref):  # lm_head on one row vs on the whole sequence: matmul shapes differ
            tol = 4 * torch.finfo(h.dtype).eps * float(ref.abs().max())
            assert float((probe.reference - ref).abs().max()) <= tol
        p2 = ic.Probe(h, TEXT, target="logits", batch_size=3)
        assert int(p2.reference.argmax()) == int(ref.argmax())


def test_true_float64_has_no_float32_op(fam):
    """The op-level recorder (rule 8): no float32 op in a float64 forward, nor in the probe's reverse-mode Jacobian."""
    family, path = fam
    with record(family, "float64"):
        h = load(path, dtype="float64")
        assert h.true_float64
        with torch.no_grad(), DtypeRecorder() as rec:
            h.model(h.encode(TEXT)[None])
        assert torch.float64 in rec.ops and rec.low_precision() == {}, rec.low_precision()
        with DtypeRecorder() as rec:
            probe = ic.Probe(h, "Hello there", target="final_hidden", batch_size=2)
            ic.jacobian.jacobian(probe, chunk_size=h.d_model)
        assert rec.low_precision() == {}, rec.low_precision()


def test_float64_agrees_with_float32_and_stock_float64(fam):
    family, path = fam
    with record(family, "float64_vs_float32"):
        logits = {}
        ids = None
        for key, kw in {"f32": {}, "f64": {"dtype": "float64"},
                        "stock": {"dtype": "float64", "true_float64": False}}.items():
            h = load(path, **kw)
            ids = h.encode(TEXT)[None] if ids is None else ids
            with torch.no_grad():
                logits[key] = h.model(ids).logits[0].double()
        scale = float(logits["f64"].abs().max())
        gap32 = float((logits["f32"] - logits["f64"]).abs().max()) / scale
        gap_stock = float((logits["stock"] - logits["f64"]).abs().max()) / scale
        assert gap32 <= 1e-4 and gap_stock <= 1e-4, (gap32, gap_stock)
    note(family, "stock_float64_gap", f"{gap_stock:.1e}")


def test_eager_against_sdpa(fam):
    """Recorded per family: the float32 logits gap between eager and sdpa attention (sdpa where HF offers it)."""
    family, path = fam
    h = load(path)
    ids = h.encode(TEXT)[None]
    try:
        hs = load(path, attn_implementation="sdpa")
    except (ValueError, ModelLoadError) as exc:
        note(family, "eager_vs_sdpa", f"no sdpa ({str(exc).splitlines()[0][:80]})")
        return
    with torch.no_grad():
        a, b = h.model(ids).logits, hs.model(ids).logits
    gap = float((a - b).abs().max() / a.abs().max())
    note(family, "eager_vs_sdpa", "bitwise equal" if torch.equal(a, b) else f"rel. gap {gap:.1e}")
    assert gap <= 1e-4


def test_fused_experts_are_recorded(fam):
    """MoE families: the fused grouped-matmul experts (HF's default) against the eager loop instab loads."""
    family, path = fam
    h = load(path)
    if not any(type(m).__name__.endswith("Experts") for m in h.model.modules()):
        return
    assert h.model.config._experts_implementation == "eager"
    hf = load(path, experts_implementation=None)
    impl = hf.model.config._experts_implementation
    probe = ic.Probe(hf, "Hello there", target="final_hidden", batch_size=1)
    try:
        jvp(probe.f, (probe.x0,), (torch.ones_like(probe.x0),))
        note(family, "jvp_fused_experts", f"ok ({impl})")
    except Exception as exc:
        note(family, "jvp_fused_experts", f"fails ({impl}): {type(exc).__name__}")
    ids = h.encode(TEXT)[None]
    with torch.no_grad():
        a, b = h.model(ids).logits, hf.model(ids).logits
    note(family, "fused_vs_eager_experts", "bitwise equal" if torch.equal(a, b) else
         f"rel. gap {float((a - b).abs().max() / a.abs().max()):.1e}")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_mode_ad_through_the_probe(fam, dtype):
    """jvp through the whole network against a central difference in float64 (recorded per family and dtype)."""
    family, path = fam
    h = load(path, dtype=dtype)
    probe = ic.Probe(h, "Hello there", target="final_hidden", batch_size=1)
    v = torch.randn(probe.d, generator=torch.Generator().manual_seed(SESSION_SEED), dtype=torch.float64)
    v = (v / v.norm()).to(h.dtype)
    try:
        _, t = jvp(probe.f, (probe.x0,), (v,))
    except Exception as exc:  # recorded, then a failure: every family must support jvp as loaded
        note(family, f"jvp_{dtype}", f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        raise
    note(family, f"jvp_{dtype}", "ok")
    if dtype == "float64":
        eps = 1e-6
        with torch.no_grad():
            fd = (probe.f(probe.x0 + eps * v) - probe.f(probe.x0 - eps * v)) / (2 * eps)
        assert float((fd - t).norm() / t.norm()) < 1e-6


# --- a model type outside the list ---------------------------------------------------------------

def test_an_unknown_structure_is_a_one_line_error(family_dirs):
    """A model whose decoder layers are not in a ModuleList: one line naming the part and where to add it."""
    h = ic.load_model(family_dirs("llama"))
    h.model.model.layers = torch.nn.Sequential(*h.model.model.layers)  # still runs; discovery cannot see layers
    with pytest.raises(AdapterError) as exc:
        ic.models.discover_adapter(h.model)
    msg = str(exc.value)
    assert "\n" not in msg and "llama" in msg and "decoder layers" in msg and "instab_core/models.py" in msg


def test_a_missing_head_step_is_caught(family_dirs):
    """Discovery checks its head against the model's logits: a post-head step it does not know is an error."""
    h = ic.load_model(family_dirs("gemma2"))
    h.model.config.final_logit_softcapping, saved = None, h.model.config.final_logit_softcapping
    original = h.model.forward

    def forward(*a, **k):
        out = original(*a, **k)
        out.logits = torch.tanh(out.logits / saved) * saved
        return out
    h.model.forward = forward
    with pytest.raises(AdapterError, match="HEAD_TRANSFORMS"):
        ic.models.discover_adapter(h.model)


def test_parse_layers():
    assert parse_layers("0,1/3,2/3,last", 4) == [0, 1, 2, 3]
    assert parse_layers("0,1/3,2/3,last", 2) == [0, 1]
    assert parse_layers("0,1/3,2/3,last", 32) == [0, 10, 21, 31]
    assert parse_layers([0, -1], 3) == [0, 2] and parse_layers("all", 3) == [0, 1, 2] and parse_layers(None, 2) == [0, 1]
    assert parse_layers("0.5", 5) == [2] and parse_layers(1, 2) == [1]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("3", 2)
    with pytest.raises(ValueError, match="fraction"):
        parse_layers("4/3", 2)


# --- notebooks with -p model DIR -----------------------------------------------------------------

def _nb_params():
    """Every (family, notebook). `make test` runs the fast pairs and the ROTATION pairs (four notebooks on
    families of other structures; CI stays under 30 minutes); the whole grid is marked
    ``families`` and runs with `make test-families`, which also writes the README's table."""
    out = []
    for family in AVAILABLE:
        for name in NOTEBOOKS:
            if (family, name) in FAST_NOTEBOOKS:
                marks = []
            elif ROTATION.get(family) == name:
                marks = [pytest.mark.slow]
            else:
                marks = [pytest.mark.slow, pytest.mark.families]
            out.append(pytest.param(family, name, marks=marks, id=f"{family}-{name}"))
    return out


@pytest.mark.parametrize("family,name", _nb_params())
def test_notebook_smoke_run(family, name, family_dirs, tmp_path):
    from instab_core import book

    path = family_dirs(family)
    key = MODEL_PARAMETER.get(name, "model")
    params = book.smoke_parameters(name) | {key: [str(path)] if key == "models" else str(path)}
    run = book.run_notebook(name, params, results_root=tmp_path / "results", out_dir=tmp_path / "out", progress=False)
    note(family, f"nb:{name}", "pass" if run.ok else f"fail: {str(run.error).splitlines()[-1][:160]}")
    assert run.ok, run.error


# --- defaults that fit any model -----------------------------------------------------------------

def test_level_set_epsilon_fits_a_random_model(family_dirs):
    """On a random 2-layer Llama the seed's ε = 1e-6 is out of reach; the chosen ε is reached by most points."""
    from instab_core import levelsets as L

    h = load(family_dirs("llama"))
    target = h.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    X0 = L.sample_vocab_ellipse(h, 6, seed=SESSION_SEED % 1000)
    eps, rule = L.choose_epsilon(h, target, X0, max_iters=30)
    assert eps > 1e-6 and "out of this model's reach" in rule
    pr = L.LevelSet(h, target, eps).project(X0, max_iters=30, strict=False)
    assert pr.converged.sum() * 2 >= len(X0)
    ok = pr.converged
    assert (abs(pr.kl[ok] - eps) < 1e-2 * eps).all()


def test_fisher_site_falls_back_to_the_models_own_argmax(family_dirs):
    """When no sentence predicts the seed's word, the sites kept are those predicting the model's most frequent argmax."""
    from collections import Counter

    from instab_core import fisher as fi
    from instab_core.zoo.corpus import ANIMAL_SENTENCES, ANIMALS_WORD

    h = load(family_dirs("llama"))
    sents = ANIMAL_SENTENCES[:4]
    sites = [fi.find_site(h, s, ANIMALS_WORD) for s in sents]
    if any(s.keep for s in sites):
        pytest.skip("this random model happens to predict the seed's word")
    st = fi.study(h, sents, word=ANIMALS_WORD, layers="0,last", k=1, scales=[0.0, 1.0], kl_levels=[1e-3], progress=False)
    top = Counter(s.argmax for s in sites).most_common(1)[0][0]
    assert st.sites.used.tolist() == [s.argmax == top for s in sites]
    assert "kept none" in st.site_rule and repr(h.tokenizer.decode([top])) in st.site_rule
    assert st.layers == [0, 1]
    with pytest.raises(ValueError, match="no sentence"):
        fi.study(h, sents, word=ANIMALS_WORD, layers=[0], argmax_fallback=False, progress=False)
