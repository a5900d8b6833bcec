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

import hashlib
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .zoo import BUNDLED

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
NATIVE_EAGER = "instab_eager"  # eager attention with the softmax in the model's dtype


class ModelLoadError(ValueError):
    """A model name, path or option that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family, relative to the causal-LM model."""

    family: str
    base: str
    embed: str
    layers: str
    final_norm: str
    unembed: str
    # stage name -> path inside one decoder layer, in network order
    submodules: dict[str, str] = field(default_factory=dict)


_LLAMA = Adapter(
    family="llama", base="model", embed="model.embed_tokens", layers="model.layers",
    final_norm="model.norm", unembed="lm_head",
    submodules={
        "input_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
        "v": "self_attn.v_proj", "o": "self_attn.o_proj", "attn": "self_attn",
        "post_attn_norm": "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "act": "mlp.act_fn", "down": "mlp.down_proj", "mlp": "mlp",
    },
)
_GPT2 = Adapter(
    family="gpt2", base="transformer", embed="transformer.wte", layers="transformer.h",
    final_norm="transformer.ln_f", unembed="lm_head",
    submodules={
        "input_norm": "ln_1", "qkv": "attn.c_attn", "o": "attn.c_proj", "attn": "attn",
        "post_attn_norm": "ln_2", "up": "mlp.c_fc", "act": "mlp.act", "down": "mlp.c_proj", "mlp": "mlp",
    },
)
ADAPTERS: dict[str, Adapter] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}


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
        return ids.to(self.device)

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
            "d_model": self.d_model, "n_layers": self.n_layers,
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
) -> ModelHandle:
    """Load a causal LM by bundled name, local directory or (cached) hub id.

    ``dtype``: float32 (default), float64, bfloat16, float16. ``device``: cpu, cuda, mps or auto.
    ``attn_implementation``: "eager" by default (forward-mode AD and bit-level work need it).
    ``true_float64`` (default: on for float64) computes RMSNorm, rotary tables and the
    attention softmax in the model's dtype instead of HF's hard-coded float32.
    Hub ids are read from the local Hugging Face cache only; set INSTAB_ALLOW_DOWNLOAD=1 to let
    transformers download (never the case on machines without network).
    """
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
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ModelLoadError(f"no adapter for model type {model_type!r}; supported: {sorted(ADAPTERS)}")
    model = model.to(dev).eval()
    model.requires_grad_(False)
    if true_float64:
        if torch_dtype != torch.float64:
            raise ModelLoadError("true_float64 applies to float64 models only")
        make_true_float64(model)
    if path is None:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(name, local_files_only=True))
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=ADAPTERS[model_type], dtype=torch_dtype,
                       device=dev, name=name, path=path, true_float64=bool(true_float64))


# ---------------------------------------------------------------------------------------------
# True float64: replace the hard-coded float32 steps of HF models with steps in the model's dtype.

def _rmsnorm_native(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@torch.no_grad()
def _rotary_native(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # inv_freq keeps the values the checkpoint's config defines (computed once at init); the
    # angles, cos and sin are computed in x's dtype rather than float32.
    inv_freq = self.inv_freq.to(device=x.device, dtype=x.dtype)
    freqs = position_ids[..., None].to(x.dtype) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def native_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with every step, the softmax included, in the query's dtype.

    query [B, H, L, hd], key/value [B, H_kv, S, hd]; returns ([B, L, H, hd], weights [B, H, L, S]).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        b, h_kv, s, hd = key.shape
        key = key[:, :, None].expand(b, h_kv, groups, s, hd).reshape(b, h_kv * groups, s, hd)
        value = value[:, :, None].expand(b, h_kv, groups, s, hd).reshape(b, h_kv * groups, s, hd)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register_native_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NATIVE_EAGER, native_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NATIVE_EAGER, eager_mask)


def make_true_float64(model: nn.Module) -> None:
    """Patch a float64 HF model in place so that no step is computed in float32."""
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_native, module)
        elif cls.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            module.forward = types.MethodType(_rotary_native, module)
    _register_native_eager()
    model.set_attn_implementation(NATIVE_EAGER)
