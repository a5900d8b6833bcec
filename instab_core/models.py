"""One way to load a model: bundled names, local Hugging Face directories, hub ids from the local cache.

``load_model("tiny-llama")`` returns a :class:`ModelHandle` with the HF model, its tokenizer, the
architecture adapter (where the embedding, decoder layers, final norm, unembedding and each
layer's submodules live), dtype and device. Experiments never hard-code module paths: they ask
the handle.

Float64 is true float64: Hugging Face's Llama computes RMSNorm, the rotary tables and the eager
attention softmax in float32 even in a float64 model. With ``true_float64`` (on by default for
float64) those steps are computed in the model's dtype instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .zoo import BUNDLED

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model name, path or option that cannot be loaded; the message says what to do."""


class AdapterError(ModelLoadError):
    """Discovery could not find a part of the model (embedding, layers, final norm, head, a stage)."""


@dataclass(frozen=True)
class Adapter:
    """Where the parts of one loaded causal LM live, discovered from the model (paths relative to it).

    ``submodules``: stage name -> path inside one decoder layer, in network order. Role names:
    ``input_norm`` (its output feeds the attention), ``attn``, ``attn_out_norm`` (normalises the attention
    output: Gemma-2/3, OLMo2), ``post_attn_norm`` (its output feeds the MLP; for parallel attention+MLP
    families it is the same module as ``input_norm``), ``mlp``, ``mlp_out_norm``; projections ``q k v o qkv
    gate up gate_up down act``; MoE ``router experts shared_expert shared_expert_gate``.
    ``head_transforms``: steps HF applies to ``lm_head``'s output (("softcap", c): c·tanh(z/c);
    ("divide", c); ("multiply", c)). ``embed_multiplier``: the factor the base model applies to
    inputs_embeds (Granite) or None.
    """

    family: str
    base: str
    embed: str
    layers: str
    final_norm: str
    unembed: str
    submodules: dict[str, str] = field(default_factory=dict)
    tied: bool = False
    parallel: bool = False
    head_transforms: tuple[tuple[str, float], ...] = ()
    embed_multiplier: float | None = None
    embed_is_input: bool = True  # layer 0 reads the embedding's output as is (no position embedding, no multiplier)
    notes: tuple[str, ...] = ()

    @property
    def mixture_of_experts(self) -> bool:
        """Whether the MLP routes tokens to experts: each expert's matmul shape then depends on the data."""
        return any(s in self.submodules for s in ("router", "experts"))

    @property
    def projections(self) -> tuple[str, ...]:
        """Stage names whose module holds one 2-D weight matrix (for weight statistics)."""
        return tuple(s for s in self.submodules if s in PROJECTION_STAGES)


# --- the small table: names discovery cannot infer -----------------------------------------------
# Child names inside an attention block -> stage names (the seed's short names).
ATTN_NAMES: dict[str, str] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "dense": "o", "c_proj": "o", "out_proj": "o",
    "qkv_proj": "qkv", "query_key_value": "qkv", "c_attn": "qkv", "Wqkv": "qkv", "q_norm": "q_norm",
    "k_norm": "k_norm",
}
# Child names inside an MLP block -> stage names.
MLP_NAMES: dict[str, str] = {
    "gate_proj": "gate", "up_proj": "up", "c_fc": "up", "fc1": "up", "dense_h_to_4h": "up", "w1": "gate",
    "w3": "up", "gate_up_proj": "gate_up", "down_proj": "down", "c_proj": "down", "fc2": "down",
    "dense_4h_to_h": "down", "w2": "down", "act_fn": "act", "act": "act", "activation_fn": "act",
}
# Child names inside a mixture-of-experts block -> stage names.
MOE_NAMES: dict[str, str] = {
    "gate": "router", "router": "router", "experts": "experts", "shared_expert": "shared_expert",
    "shared_experts": "shared_expert", "shared_expert_gate": "shared_expert_gate",
}
ATTN_CHILD = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILD = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe")
# Config attributes of steps HF's CausalLM forward applies after lm_head (not visible as modules).
HEAD_TRANSFORMS: dict[str, str] = {"final_logit_softcapping": "softcap", "logits_scaling": "divide",
                                   "logit_scale": "multiply"}
EMBED_MULTIPLIERS = ("embedding_multiplier",)
PROJECTION_STAGES = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "router", "shared_expert_gate")
HOW_TO_ADD = "add the child's name to the tables at the top of instab_core/models.py (ATTN_NAMES, MLP_NAMES, ...)"


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _is_norm(mod: nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if "hidden_states" in kwargs and isinstance(kwargs["hidden_states"], torch.Tensor):
        return kwargs["hidden_states"]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def _out_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same storage, shape and strides (a view like ``x[:, 0:]`` of x counts as x)."""
    return (a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride())


def _probe_ids(model: nn.Module) -> torch.Tensor:
    """A short token sequence [1, 5] (int64) valid for the model's vocabulary, for discovery."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    dev = model.get_input_embeddings().weight.device
    return (torch.arange(5, device=dev) * 7 + 3)[None] % vocab


class _Recorder:
    """Forward hooks on a set of modules: every call's first input tensor and output tensor, in call order."""

    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.calls: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        self.hooks = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in mods.items()]

    def _hook(self, name: str):
        def hook(mod, args, kwargs, out):
            self.calls.append((name, _first_tensor(args, kwargs), _out_tensor(out)))
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def count(self, name: str) -> int:
        return sum(c[0] == name for c in self.calls)

    def get(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for n, i, o in self.calls:
            if n == name:
                return i, o
        return None, None


def _find_layers(model: nn.Module, base: nn.Module) -> nn.ModuleList:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        exact = [m for m in lists if len(m) == n]
        lists = exact or lists
    # the outermost ModuleList whose entries each hold an attention-like child
    def has_attn(layer: nn.Module) -> bool:
        return any("attention" in type(c).__name__.lower() or name in ATTN_CHILD for name, c in layer.named_children())
    cands = [m for m in lists if all(has_attn(x) for x in m)]
    if not cands:
        where = f"model type {getattr(model.config, 'model_type', '?')!r}"
        raise AdapterError(f"{where}: no ModuleList of decoder layers found in {type(base).__name__} "
                           f"(expected {n} layers each with an attention child): {HOW_TO_ADD}")
    return cands[0]


def discover_adapter(model: nn.Module) -> Adapter:
    """Find the parts of an HF causal LM: from the module tree, then checked by one short forward (dataflow).

    Raises :class:`AdapterError` (one line) naming the part that could not be found.
    """
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    where = f"model type {model_type!r} ({type(model).__name__})"
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise AdapterError(f"{where}: no base model (base_model_prefix) under the causal-LM head: {HOW_TO_ADD}")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise AdapterError(f"{where}: get_input_embeddings() gave no embedding with a weight")
    if head is None or not hasattr(head, "weight"):
        raise AdapterError(f"{where}: get_output_embeddings() gave no unembedding (lm_head) with a weight")
    layers = _find_layers(model, base)
    paths = {k: _path_of(model, m) for k, m in
             {"base": base, "embed": emb, "layers": layers, "unembed": head}.items()}

    layer0 = layers[0]
    children = dict(layer0.named_children())
    attn_name = next((n for n in ATTN_CHILD if n in children), None) or next(
        (n for n, c in children.items() if "attention" in type(c).__name__.lower()), None)
    mlp_name = next((n for n in MLP_CHILD if n in children), None) or next(
        (n for n, c in children.items() if any(k in type(c).__name__.lower() for k in ("mlp", "moe", "feedforward"))),
        None)
    if attn_name is None:
        raise AdapterError(f"{where}: no attention block among the decoder layer's children {list(children)}: "
                           f"add its name to ATTN_CHILD in instab_core/models.py")
    if mlp_name is None:
        raise AdapterError(f"{where}: no MLP block among the decoder layer's children {list(children)}: "
                           f"add its name to MLP_CHILD in instab_core/models.py")
    attn, mlp = children[attn_name], children[mlp_name]
    norms = {n: c for n, c in children.items() if _is_norm(c)}

    # one short forward with hooks: which module feeds which (by tensor identity)
    watch: dict[str, nn.Module] = {"attn": attn, "mlp": mlp, "head": head, "layer": layer0, "embed": emb}
    watch.update({f"norm:{n}": c for n, c in norms.items()})
    layers_rel = _path_of(base, layers) or ""
    top = {n: m for n, m in base.named_modules()
           if n and m is not layers and m is not emb and not n.startswith(layers_rel + ".")}
    watch.update({f"top:{n}": m for n, m in top.items()})
    subs_attn = {f"a:{n}": c for n, c in attn.named_children()}
    subs_mlp = {f"m:{n}": c for n, c in mlp.named_children()}
    watch.update(subs_attn)
    watch.update(subs_mlp)
    rec = _Recorder(watch)
    try:
        with torch.no_grad():
            logits = model(_probe_ids(model), use_cache=False).logits
    except Exception as exc:
        raise AdapterError(f"{where}: the discovery forward failed ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        rec.remove()

    attn_in, attn_out = rec.get("attn")
    mlp_in, mlp_out = rec.get("mlp")
    head_in, _ = rec.get("head")
    final = [n for n, i, o in rec.calls if n.startswith("top:") and _same(o, head_in)]
    if not final:
        raise AdapterError(f"{where}: no module's output feeds lm_head (the final norm); "
                           f"add its path to FINAL_NORM in instab_core/models.py")
    final_path = (paths["base"] + "." if paths["base"] else "") + final[-1].removeprefix("top:")

    roles: dict[str, str] = {}
    for n in norms:
        i, o = rec.get(f"norm:{n}")
        if _same(o, attn_in):
            roles["input_norm"] = n
        if _same(o, mlp_in):
            roles["post_attn_norm"] = n
        if _same(i, attn_out):
            roles["attn_out_norm"] = n
        if _same(i, mlp_out):
            roles["mlp_out_norm"] = n
    parallel = _same(mlp_in, attn_in) or ("post_attn_norm" in roles and "input_norm" in roles and _same(
        rec.get(f"norm:{roles['post_attn_norm']}")[0], rec.get(f"norm:{roles['input_norm']}")[0]))
    notes = []
    if parallel:
        notes.append("parallel attention and MLP (both read the layer input)")
    if roles.get("post_attn_norm") is not None and roles.get("post_attn_norm") == roles.get("input_norm"):
        notes.append(f"post_attn_norm is {roles['input_norm']} (one norm feeds attention and MLP)")
    subs: dict[str, str] = {}
    for role, n in roles.items():
        subs[role] = n
    subs["attn"] = attn_name
    subs["mlp"] = mlp_name
    moe = any(n in ("experts",) for n, _ in mlp.named_children())
    table = MOE_NAMES if moe else MLP_NAMES
    for n, c in attn.named_children():
        stage = ATTN_NAMES.get(n)
        if stage and rec.count(f"a:{n}") == 1:
            subs.setdefault(stage, f"{attn_name}.{n}")
    for n, c in mlp.named_children():
        stage = table.get(n)
        if stage and rec.count(f"m:{n}") == 1:
            subs.setdefault(stage, f"{mlp_name}.{n}")
    for n in norms:  # any other norm of the layer keeps its own name
        if n not in roles.values() and rec.count(f"norm:{n}") == 1:
            subs[n] = n
    if ("attn_out_norm" in roles or "mlp_out_norm" in roles) and "input_norm" in roles:
        notes.append("sandwich norms (before and after attention/MLP)")
    elif "attn_out_norm" in roles or "mlp_out_norm" in roles:
        notes.append("norms after attention and MLP, none before")
    if moe:
        notes.append("mixture of experts: router and experts are stages")
    # network order: when each stage's module finished in layer 0 (forward hooks fire at the end)
    done = {}
    for k, (n, _, _) in enumerate(rec.calls):
        done.setdefault(n, k)
    key = {attn_name: "attn", mlp_name: "mlp"}
    key.update({n: f"norm:{n}" for n in norms})
    key.update({f"{attn_name}.{n}": f"a:{n}" for n, _ in attn.named_children()})
    key.update({f"{mlp_name}.{n}": f"m:{n}" for n, _ in mlp.named_children()})
    subs = dict(sorted(subs.items(), key=lambda kv: done.get(key.get(kv[1], ""), len(rec.calls))))
    for i, layer in enumerate(layers):
        for stage, p in subs.items():
            try:
                layer.get_submodule(p)
            except AttributeError as exc:
                raise AdapterError(f"{where}: layer {i} has no {p} (stage {stage!r} found in layer 0)") from exc

    cfg = model.config
    transforms = tuple((kind, float(getattr(cfg, attr))) for attr, kind in HEAD_TRANSFORMS.items()
                       if getattr(cfg, attr, None) not in (None, 1, 1.0, 0))
    mult = next((float(getattr(cfg, a)) for a in EMBED_MULTIPLIERS if getattr(cfg, a, None) not in (None, 1, 1.0)),
                None)
    embed_is_input = torch.equal(rec.get("embed")[1], rec.get("layer")[0])
    if not embed_is_input:
        notes.append("layer 0 reads the embedding " + (f"times {mult:g}" if mult is not None else
                                                       "plus position embeddings (or another step) of the base model"))
    if type(emb).__name__.endswith("ScaledWordEmbedding"):
        notes.append("embedding scaled by sqrt(d) inside the embedding module")
    for kind, c in transforms:
        notes.append(f"logits: {kind} {c:g} after lm_head")
    adapter = Adapter(family=model_type, base=paths["base"], embed=paths["embed"], layers=paths["layers"],
                      final_norm=final_path, unembed=paths["unembed"], submodules=subs,
                      tied=head.weight is emb.weight, parallel=bool(parallel), head_transforms=transforms,
                      embed_multiplier=mult, embed_is_input=bool(embed_is_input), notes=tuple(notes))
    final_out = [o for n, i, o in rec.calls if n == final[-1]][-1]
    with torch.no_grad():
        mine = apply_head(adapter, head, final_out)
    if not torch.equal(mine, logits):
        raise AdapterError(f"{where}: lm_head(final norm) with {list(transforms) or 'no post-head step'} does not "
                           f"reproduce the model's logits: add the missing step's config attribute to "
                           f"HEAD_TRANSFORMS in instab_core/models.py")
    return adapter


def apply_head(adapter: Adapter, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] from final hidden states [..., d]: lm_head, then the family's post-head steps."""
    z = head(hidden)
    for kind, c in adapter.head_transforms:
        if kind == "softcap":
            z = torch.tanh(z / c) * c
        elif kind == "divide":
            z = z / c
        elif kind == "multiply":
            z = z * c
    return z


@dataclass
class ModelHandle:
    """A loaded causal LM with its tokenizer, adapter, dtype and device."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    dtype: torch.dtype
    device: torch.device
    name: str
    path: Path
    true_float64: bool
    _weights_hash: str | None = None

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @property
    def base(self) -> nn.Module:
        return self.module(self.adapter.base)

    @property
    def embedding(self) -> nn.Module:
        return self.module(self.adapter.embed)

    @property
    def layers(self) -> nn.ModuleList:
        return self.module(self.adapter.layers)  # type: ignore[return-value]

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.adapter.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.module(self.adapter.unembed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of final hidden states [..., d] (after the final norm): lm_head and the family's
        post-head steps (Gemma-2/3 softcap, Granite scaling), exactly as the model's own forward."""
        return apply_head(self.adapter, self.unembed, hidden)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.embedding.weight.shape[1])

    def stage_module(self, layer: int, stage: str) -> nn.Module:
        """The submodule ``stage`` (an adapter stage name) of decoder layer ``layer``."""
        if stage not in self.adapter.submodules:
            raise KeyError(f"unknown stage {stage!r} for {self.adapter.family}; known: {list(self.adapter.submodules)}")
        return self.layers[layer].get_submodule(self.adapter.submodules[stage])

    def encode(self, text: str) -> torch.Tensor:
        """Token ids [L] (int64, on the handle's device) of ``text`` with the tokenizer's special tokens (BOS)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty prompt: pass a non-empty text")
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
        limit = self.max_positions
        if limit is not None and ids.shape[0] > limit:
            raise ValueError(f"the prompt has {ids.shape[0]} tokens but the model has {limit} positions "
                             "(max_position_embeddings): shorten the text")
        return ids.to(self.device)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings or rotary tables were configured for, if stated."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @property
    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = weights_fingerprint(self.path)
        return self._weights_hash

    def describe(self) -> dict[str, Any]:
        """Provenance of the model for result manifests."""
        return {
            "model": self.name, "path": str(self.path), "family": self.adapter.family,
            "architecture": type(self.model).__name__, "weights_hash": self.weights_hash,
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "device_name": device_name(self.device), "true_float64": self.true_float64,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "d_model": self.d_model, "n_layers": self.n_layers, "tied": self.adapter.tied,
            "experts_implementation": getattr(self.model.config, "_experts_implementation", None),
            "adapter_notes": list(self.adapter.notes),
        }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{device.type}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def weights_fingerprint(path: Path) -> str:
    """sha256 over the model's weight files (sorted by name), ``sha256:<hex>``.

    Files above 2 GiB in total are fingerprinted by name, size and their first and last MiB
    (``fp:<hex>``): a full hash of a 16 GB checkpoint would dominate a short run.
    """
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        return "none"
    total = sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    full = total <= 2 * 2**30
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            if full:
                for chunk in iter(lambda: fh.read(2**22), b""):
                    h.update(chunk)
            else:
                size = p.stat().st_size
                h.update(str(size).encode())
                h.update(fh.read(2**20))
                fh.seek(max(0, size - 2**20))
                h.update(fh.read(2**20))
    return ("sha256:" if full else "fp:") + h.hexdigest()


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"unsupported device {name!r}; use cpu, cuda, mps or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available here; use device='cpu' or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {name!r} requested but MPS is not available here; use device='cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unsupported device {name!r}; use cpu, cuda, mps or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {list(DTYPES)}")


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """(display name, local directory or None for a hub id)."""
    name = str(name_or_path)
    if name in BUNDLED:
        if not (BUNDLED[name] / "config.json").is_file():
            raise ModelLoadError(
                f"bundled model {name!r} has no files in {BUNDLED[name]} (not trained or not installed): "
                "reinstall the package, or train it with `python -m instab_core.zoo.train`")
        return name, BUNDLED[name]
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json in it)")
        return str(path.resolve()), path.resolve()
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path:
        raise ModelLoadError(f"model directory {name} does not exist")
    if "/" in name:
        return name, None
    raise ModelLoadError(
        f"unknown model {name!r}: bundled models are {', '.join(BUNDLED)}; "
        "or pass the path of a local Hugging Face model directory")


def load_model(
    name_or_path: str | os.PathLike = "tiny-llama",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "eager",
    true_float64: bool | None = None,
    experts_implementation: str | None = "eager",
) -> ModelHandle:
    """Load a causal LM by bundled name, local directory or (cached) hub id.

    ``dtype``: float32 (default), float64, bfloat16, float16. ``device``: cpu, cuda, mps or auto.
    ``attn_implementation``: "eager" by default (forward-mode AD and bit-level work need it).
    ``true_float64`` (default: on for float64) computes RMSNorm, rotary tables and the
    attention softmax in the model's dtype instead of HF's hard-coded float32.
    ``experts_implementation`` (mixture-of-experts models): "eager" by default, HF's per-expert loop, exact in
    every dtype and differentiable forward-mode (the fused grouped matmul has neither a float64 kernel nor a jvp);
    None keeps the model's default. Float64 always uses the eager loop.
    Hub ids are read from the local Hugging Face cache only; set INSTAB_ALLOW_DOWNLOAD=1 to let
    transformers download (never the case on machines without network).
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor loading bar in every notebook output says nothing
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == torch.float64 and str(device).startswith("mps"):
        raise ModelLoadError("MPS has no float64: use device='cpu' (or cuda) for float64, or dtype='float32' on MPS")
    dev = resolve_device(device)
    name, path = resolve_model_path(name_or_path)
    if true_float64 is None:
        true_float64 = torch_dtype == torch.float64 and attn_implementation == "eager"
    if true_float64 and attn_implementation != "eager":
        raise ModelLoadError(f"true_float64 needs attn_implementation='eager' (got {attn_implementation!r}): "
                             "fused attention kernels keep their own internal precision")
    source: str | Path = path if path is not None else name
    local_only = path is not None or os.environ.get("INSTAB_ALLOW_DOWNLOAD") != "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=local_only)
    except OSError as exc:
        if path is None:
            raise ModelLoadError(
                f"hub model {name!r} is not in the local Hugging Face cache and downloads are off: "
                f"download it where there is network (`hf download {name} --local-dir DIR`) "
                "and pass that directory, e.g. load_model('DIR')") from exc
        raise ModelLoadError(f"cannot load the model in {path}: {exc}") from exc
    except (TypeError, ValueError, StrictDataclassError) as exc:  # a config.json field of the wrong type or value
        where = (path / "config.json") if path is not None else name
        raise ModelLoadError(f"{where}: {' '.join(str(exc).split())}: fix that field (compare with the config "
                             "the model was trained with)") from exc
    if true_float64 and torch_dtype != torch.float64:
        raise ModelLoadError("true_float64 applies to float64 models only")
    model = model.to(dev).eval()
    model.requires_grad_(False)
    if torch_dtype == torch.float64 or experts_implementation == "eager":
        exact_float64_experts(model)
    elif experts_implementation is not None:
        set_experts = getattr(model, "set_experts_implementation", None)
        if set_experts is not None and type(model)._can_set_experts_implementation():
            set_experts(experts_implementation)
    if true_float64:
        make_true_float64(model)
    adapter = discover_adapter(model)
    if path is None:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(name, local_files_only=True))
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=adapter, dtype=torch_dtype,
                       device=dev, name=name, path=path, true_float64=bool(true_float64))


# ---------------------------------------------------------------------------------------------
# True float64: every HF module's forward runs with its hard-coded float32 casts redirected to the
# model's float64 (RMSNorm variants, LayerNorm wrappers, rotary tables, the eager softmax, routers,
# softcaps): the family's own code, in float64 throughout. A test records every aten op's dtype.

_STATE = threading.local()


def _to64(a: Any) -> Any:
    return torch.float64 if a is torch.float32 else a


class NoFloat32(TorchFunctionMode):
    """Inside a true-float64 forward: ``x.float()``, ``x.to(torch.float32)`` and ``dtype=torch.float32``
    give float64 instead (the hard-coded upcasts of HF code become no-ops on float64 tensors)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            return args[0].to(torch.float64)
        if func is torch.Tensor.to or func is torch.Tensor.type_as:
            args = tuple(a.dtype if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and i > 0 else a
                         for i, a in enumerate(args))
        args = tuple(_to64(a) for a in args)
        kwargs = {k: _to64(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _float64_forward(fwd: Any) -> Any:
    @functools.wraps(fwd)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if getattr(_STATE, "active", False):
            return fwd(*args, **kwargs)
        _STATE.active = True
        try:
            with NoFloat32():
                return fwd(*args, **kwargs)
        finally:
            _STATE.active = False
    forward.__instab_float64__ = True  # type: ignore[attr-defined]
    return forward


def make_true_float64(model: nn.Module) -> None:
    """Patch a float64 HF model in place so that no step is computed in float32.

    Every module defined by transformers (the model, its layers, attention, norms, rotary tables,
    routers, experts) runs under :class:`NoFloat32`; the eager attention is HF's own.
    """
    for module in model.modules():
        if type(module).__module__.startswith("transformers.") and not getattr(module.forward, "__instab_float64__",
                                                                                  False):
            module.forward = _float64_forward(module.forward)


def exact_float64_experts(model: nn.Module) -> None:
    """Mixture-of-experts blocks in float64: HF's eager per-expert loop (exact float64) instead of the
    grouped matmul, which has no float64 kernel; a model whose experts cannot be switched is refused."""
    experts = [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Experts")]
    if not experts:
        return
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is not None and can_set():
        model.set_experts_implementation("eager")
        return
    if getattr(model.config, "_experts_implementation", "eager") not in (None, "eager"):
        raise ModelLoadError(f"{experts[0]} computes its experts with {model.config._experts_implementation!r}, "
                             "which has no float64 kernel, and cannot be switched to the eager loop: use float32")


# ---------------------------------------------------------------------------------------------
# Layer choices that fit any depth

def parse_layers(spec: str | int | Sequence[int | str] | None, n_layers: int) -> list[int]:
    """Layer indices (0-based, in the given order, de-duplicated) for a model of ``n_layers`` layers.

    ``spec``: a comma-separated string or a list of items, each an index (``3``, ``-1``), ``last``,
    ``all``, or a fraction of depth (``1/3``, ``0.5``: round(f·(n−1))). ``"0,1/3,2/3,last"`` gives 0, 1, 2, 3
    on 4 layers and 0, 1 on 2. ``None`` or ``"all"``: every layer. Out-of-range integers raise ValueError.
    """
    if n_layers < 1:
        raise ValueError("n_layers must be >= 1")
    if spec is None:
        return list(range(n_layers))
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(
        spec if isinstance(spec, (list, tuple)) else [spec])
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and item in ("all", "*"):
            idx = list(range(n_layers))
        elif isinstance(item, str) and item == "last":
            idx = [n_layers - 1]
        elif isinstance(item, str) and item in ("first",):
            idx = [0]
        elif isinstance(item, str) and ("/" in item or "." in item):
            try:
                num, den = item.split("/") if "/" in item else (item, "1")
                f = float(num) / float(den)
            except (ValueError, ZeroDivisionError) as exc:
                raise ValueError(f"bad layer fraction {item!r}: use e.g. 1/3 or 0.5") from exc
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"layer fraction {item!r} is outside 0..1")
            idx = [int(round(f * (n_layers - 1)))]
        else:
            try:
                i = int(item)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"bad layer {item!r}: use an index, last, all or a fraction like 1/3") from exc
            if not -n_layers <= i < n_layers:
                raise ValueError(f"layer {i} out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                                 "use a fraction of depth such as 1/3 or last")
            idx = [i % n_layers]
        out += [i for i in idx if i not in out]
    if not out:
        raise ValueError(f"no layers in {spec!r}")
    return out
