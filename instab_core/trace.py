"""Greedy generation traces with per-stage capture, and their comparison across runs.

A trace is a folder written by :func:`capture`::

    manifest.json        prompt and its token ids, settings, model (name, weights hash, dtype, attention),
                         device, library versions, thread count, stages and their widths, progress
    tokens.json          prompt ids, generated ids, each generated token's text and the top-k texts
    steps/NNNNNN.npz     one chunk of steps: token [n] int64, topk_ids [n, k] int64, topk_logits and
                         topk_probs [n, k] float32, and "stage:<name>" [n, width] per captured stage
    kv_cache.safetensors the KV cache at the last checkpoint (only while a cached capture is incomplete)

Step t is the forward pass whose last position produced generated token t: its logits chose the
token and its stage outputs are the state that produced it (DESIGN rule 4). Generation feeds token
ids, never decoded text (rule 5). Stage arrays are stored in the model's dtype, except bfloat16 and
float16, which numpy cannot hold: those are widened to float32 (exactly) and narrowed back for bit
comparisons.

Stage names, in network order: ``embedding``, ``layer{i}.{sub}`` (the adapter's submodules, e.g.
``layer0.input_norm``), ``layer_out[{i}]`` (decoder layer i's output, before any final norm),
``final_norm`` and ``logits`` (the full logits row, large: not in any preset).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import fp
from .models import ModelHandle
from .results import ResultsError, _atomic_write, _savez, environment, read_npz, write_json
from .sweep import compare as compare_rows
from .sweep import cosine_rows

FORMAT = "instab-trace/1"
DECIMALS = tuple(range(1, 16))  # the seed's |Δ| >= 10^-k bins, k = 1..15
RESIDUAL = "residual"  # stages on the residual stream, where a logit lens applies
CHUNK_BYTES = 2 ** 28  # memory budget of one vocabulary chunk in unembedding_angles (float64 rows + their logits)


class TraceError(ValueError):
    """A trace folder or a pair of traces that cannot be used as asked; the message says why."""


# ---------------------------------------------------------------------------------------------
# Stages

def stage_presets(handle: ModelHandle) -> dict[str, list[str]]:
    """Named stage sets for ``handle``.

    "seed_exp8_p1": embedding, layer 0's input and post-attention norms, the last layer's output
    (pre-norm) and the final norm — the seed's exp8 part 1 hooks.
    "residual": the embedding, every layer's output and the final norm.
    "all": the embedding, every adapter submodule of every layer with each layer's output, the final
    norm — the seed's exp8 part 5 set.
    """
    n = handle.n_layers
    subs = list(handle.adapter.submodules)
    last = f"layer_out[{n - 1}]"
    all_stages = ["embedding"]
    for i in range(n):
        all_stages += [f"layer{i}.{s}" for s in subs] + [f"layer_out[{i}]"]
    all_stages.append("final_norm")
    return {
        # families without a pre-attention or pre-MLP norm (OLMo2: norms after attention/MLP) skip those stages
        "seed_exp8_p1": ["embedding"] + [f"layer0.{s}" for s in ("input_norm", "post_attn_norm") if s in subs]
        + [last, "final_norm"],
        "residual": ["embedding"] + [f"layer_out[{i}]" for i in range(n)] + ["final_norm"],
        "all": all_stages,
    }


def _network_order(handle: ModelHandle) -> list[str]:
    return stage_presets(handle)["all"] + ["logits"]


def stage_modules(handle: ModelHandle, stages: str | Sequence[str]) -> dict[str, torch.nn.Module]:
    """Stage name -> module, in network order, for a preset name or a list of stage names."""
    presets = stage_presets(handle)
    if isinstance(stages, str):
        if stages not in presets:
            raise TraceError(f"unknown stage preset {stages!r}; presets: {sorted(presets)} (or pass a list of stages)")
        names = presets[stages]
    else:
        names = list(stages)
    if not names:
        raise TraceError("no stages given: pass a preset name or a non-empty list of stage names")
    order = _network_order(handle)
    unknown = [s for s in names if s not in order]
    if unknown:
        raise TraceError(f"unknown stage {unknown[0]!r} for {handle.adapter.family} with {handle.n_layers} layers; "
                         f"stages look like embedding, layer0.{next(iter(handle.adapter.submodules))}, "
                         f"layer_out[0], final_norm, logits (submodules: {list(handle.adapter.submodules)})")
    mods: dict[str, torch.nn.Module] = {}
    for name in sorted(set(names), key=order.index):
        if name == "embedding":
            mods[name] = handle.embedding
        elif name == "final_norm":
            mods[name] = handle.final_norm
        elif name == "logits":
            mods[name] = handle.unembed
        elif name.startswith("layer_out["):
            mods[name] = handle.layers[int(name[len("layer_out["):-1])]
        else:
            layer, sub = name.split(".", 1)
            mods[name] = handle.stage_module(int(layer[len("layer"):]), sub)
    return mods


def is_residual(stage: str) -> bool:
    """Whether a stage's output is on the residual stream (a logit lens makes sense there)."""
    return stage in ("embedding", "final_norm") or stage.startswith("layer_out[")


# ---------------------------------------------------------------------------------------------
# Capture

def _storable(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # exact widening; numpy has no bfloat16
    return t.detach().cpu().numpy()


def prompt_ids(handle: ModelHandle, prompt: str, chat: bool = False) -> torch.Tensor:
    """Token ids [L] of the prompt: with BOS as the tokenizer adds it, or through the chat template."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise TraceError("empty prompt: pass a non-empty text")
    if not chat:
        return handle.encode(prompt)
    if not getattr(handle.tokenizer, "chat_template", None):
        raise TraceError(f"the tokenizer of {handle.name} has no chat template: use chat=False")
    ids = handle.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"][0]
    return ids.to(handle.device)


def max_steps(handle: ModelHandle, prompt: str, chat: bool = False) -> int | None:
    """The most steps a capture of ``prompt`` can take within the model's positions (None: no limit known)."""
    limit = handle.max_positions
    return None if limit is None else limit - len(prompt_ids(handle, prompt, chat)) + 1


def _save_cache(path: Path, cache: Any, steps_done: int) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, layer in enumerate(cache.layers):
        tensors[f"k{i}"] = layer.keys.contiguous()
        tensors[f"v{i}"] = layer.values.contiguous()
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"steps_done": str(steps_done)}))


def _load_cache(path: Path, handle: ModelHandle) -> tuple[Any, int]:
    from safetensors import safe_open
    from transformers import DynamicCache

    cache = DynamicCache(config=handle.model.config)
    with safe_open(str(path), framework="pt", device=str(handle.device)) as f:
        steps_done = int(f.metadata()["steps_done"])
        n = sum(1 for k in f.keys() if k.startswith("k"))
        for i in range(n):
            cache.update(f.get_tensor(f"k{i}"), f.get_tensor(f"v{i}"), i)
    return cache, steps_done


def _settings_key(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("format", "prompt_ids", "settings", "stages")} | {
        "weights_hash": m["model"]["weights_hash"], "dtype": m["model"]["dtype"],
        "attn_implementation": m["model"]["attn_implementation"], "device": m["model"]["device"]}


def capture(handle: ModelHandle, prompt: str, out_dir: str | os.PathLike, steps: int = 100,
            stages: str | Sequence[str] = "seed_exp8_p1", use_cache: bool = True, batch_rows: int = 1,
            threads: int | None = None, top_k: int = 10, chat: bool = False, stop_at_eos: bool = True,
            chunk: int = 32, progress: bool = True, companions: Sequence[str] = ()) -> "Trace":
    """Greedy-generate ``steps`` tokens from ``prompt`` and write a trace folder to ``out_dir``.

    ``use_cache``: decode one token per step with the KV cache (False: re-run the whole sequence
    every step — O(T²), and not bitwise the same computation). ``batch_rows``: run the prompt as
    row 0 of a batch of that many identical rows (batch shape is a source of variation; only row 0
    is recorded). ``companions``: other prompts in the same batch, after those rows, each generating its own
    greedy tokens; rows are left-padded to the longest prompt, with the attention mask and position ids of each
    row's own tokens, so the traced row computes its prompt alone up to rounding (batch composition is a source
    of variation). ``threads``: torch intra-op threads during the capture (restored afterwards).
    Stage outputs are taken at row 0, last position. Every ``chunk`` steps the arrays (and the KV
    cache) are written atomically; calling again with the same arguments on an interrupted folder
    resumes from the last chunk and gives the same result bit for bit. Cost: one prompt forward
    plus ``steps − 1`` one-token forwards (cached), or Σ_t (L + t)-token forwards (uncached); every
    forward unembeds only its last position (:func:`last_logits_kwargs`), one V × d product per row.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise TraceError(f"steps must be a positive integer, got {steps!r}")
    if batch_rows < 1 or top_k < 1 or chunk < 1:
        raise TraceError("batch_rows, top_k and chunk must be at least 1")
    out = Path(out_dir)
    ids = prompt_ids(handle, prompt, chat)
    companions = [str(c) for c in companions]
    for text in [prompt, *companions]:
        most = max_steps(handle, text, chat)
        if most is not None and steps > most:
            raise TraceError(f"prompt {text[:40]!r} ({len(prompt_ids(handle, text, chat))} tokens) + {steps} steps "
                             f"exceeds the model's {handle.max_positions} positions: use steps <= {most} "
                             "(trace.max_steps gives it)")
    mods = stage_modules(handle, stages)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        manifest = {
            "format": FORMAT, "complete": False, "steps_done": 0, "prompt": prompt,
            "prompt_ids": ids.tolist(),
            "settings": {"steps": steps, "use_cache": use_cache, "batch_rows": batch_rows, "top_k": top_k,
                         "chat": chat, "stop_at_eos": stop_at_eos, "chunk": chunk,
                         "threads": torch.get_num_threads(),
                         **({"companions": [prompt_ids(handle, c, chat).tolist() for c in companions]}
                            if companions else {})},
            "stages": list(mods), "model": handle.describe(), "environment": environment(),
        }
        return _generate(handle, ids, out, manifest, mods, progress)
    finally:
        torch.set_num_threads(old_threads)


def last_logits_kwargs(handle: ModelHandle) -> dict[str, int]:
    """Forward keywords that unembed only the last position (HF's ``logits_to_keep=1``, what ``generate`` passes).

    Only the last position's logits choose a token, so the prompt forward and every uncached re-run need one
    vocabulary row per batch row, not one per position (at V = 128k and a 236-token sequence: 236 × 128256
    logits and 236 × V × d multiply-adds, where 1 × V × d do). The hidden states are untouched; the kept
    row is the unembedding of the last state alone, as in every cached one-token step. Empty for a model whose
    forward has no such keyword (then every position is unembedded, as before)."""
    try:
        names = inspect.signature(handle.model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in names else {}


@torch.no_grad()
def _generate(handle: ModelHandle, ids: torch.Tensor, out: Path, manifest: dict[str, Any],
              mods: dict[str, torch.nn.Module], progress: bool) -> "Trace":
    s = manifest["settings"]
    tokens: list[int] = []
    others: list[list[int]] = [[] for _ in s.get("companions", [])]  # each companion's generated tokens
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        if old.get("complete"):
            if _settings_key(old) != _settings_key(manifest):
                raise TraceError(f"{out} holds a complete trace with other settings: choose another folder")
            return Trace(out)
        if _settings_key(old) != _settings_key(manifest):
            raise TraceError(f"{out} holds an interrupted trace with other settings: delete it or use "
                             "another folder")
        tokens, others = _resume_tokens(out, old, s["use_cache"])
    manifest["steps_done"] = len(tokens)
    write_json(out / "manifest.json", manifest)

    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def grab(module, inputs, output):
            o = output[0] if isinstance(output, tuple) else output
            current[name] = o[0, -1].detach().clone()
        return grab

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    last_only = last_logits_kwargs(handle)
    eos = handle.tokenizer.eos_token_id
    rows = s["batch_rows"]
    prompts = [ids.tolist()] * rows + [list(c) for c in s.get("companions", [])]
    cache = None
    buffer: dict[str, list] = {}
    dev = handle.device
    try:
        def forward(step_tokens: list[list[int]], whole: bool) -> torch.Tensor:
            """Logits of every row's last position. ``whole``: the rows' full sequences (prompt + generated),
            else one new token per row on top of the cache."""
            nonlocal cache
            current.clear()
            seqs = [p + g for p, g in zip(prompts, step_tokens)] if whole else step_tokens
            if not s.get("companions"):  # identical rows: no mask, exactly the computation of a lone prompt
                batch = torch.tensor(seqs[0], device=dev)[None].expand(rows, -1)
                kw = {}
            else:
                lengths = torch.tensor([len(p) + len(g) for p, g in zip(prompts, generated())], device=dev)
                width = max(len(q) for q in seqs)
                pad = handle.tokenizer.pad_token_id if handle.tokenizer.pad_token_id is not None else (eos or 0)
                batch = torch.tensor([[pad] * (width - len(q)) + q for q in seqs], device=dev)
                total = int(lengths.max())
                # left padding: row r's tokens sit at the right end; its positions count its own tokens only
                mask = (torch.arange(total, device=dev)[None] >= (total - lengths)[:, None]).long()
                positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -batch.shape[1]:]
                kw = {"attention_mask": mask, "position_ids": positions}
            if s["use_cache"]:
                o = handle.model(input_ids=batch, past_key_values=cache, use_cache=True, **kw, **last_only)
                cache = o.past_key_values
            else:
                o = handle.model(input_ids=batch, use_cache=False, **kw, **last_only)
            return o.logits[:, -1]

        def generated() -> list[list[int]]:
            return [tokens] * rows + others

        done = len(tokens)
        if done == 0:
            logits = forward([[] for _ in prompts], whole=True)
        elif s["use_cache"]:
            cache, cached = _load_cache(out / "kv_cache.safetensors", handle)
            if cached != done:
                raise TraceError(f"{out}: KV cache is at step {cached}, arrays at {done}: delete the folder")
            logits = forward([g[-1:] for g in generated()], whole=False)
        else:
            logits = forward(generated(), whole=True)
        bar = tqdm(total=s["steps"], initial=done, desc="trace", disable=not progress, leave=False)
        t = done
        while True:
            batch_logits, logits = logits, logits[0]
            probs = torch.softmax(logits.float(), dim=-1)
            top = torch.topk(logits, s["top_k"])
            token = int(torch.argmax(logits))
            step = {"token": np.int64(token), "topk_ids": top.indices.cpu().numpy().astype(np.int64),
                    "topk_logits": top.values.float().cpu().numpy(),
                    "topk_probs": probs[top.indices].cpu().numpy()}
            step.update({f"stage:{n}": _storable(current[n]) for n in mods})
            for k, v in step.items():
                buffer.setdefault(k, []).append(v)
            tokens.append(token)
            if others:
                picks = [int(torch.argmax(batch_logits[rows + i])) for i in range(len(others))]
                for g, c in zip(others, picks):
                    g.append(c)
                buffer.setdefault("companion_tokens", []).append(np.array(picks, dtype=np.int64))
            t += 1
            bar.update(1)
            finished = t >= s["steps"] or (s["stop_at_eos"] and eos is not None and token == eos)
            if finished or len(buffer["token"]) >= s["chunk"]:
                _flush(out, t - len(buffer["token"]), buffer, manifest, t, cache if not finished else None)
                buffer = {}
            if finished:
                break
            logits = forward([g[-1:] for g in generated()] if s["use_cache"] else generated(),
                             whole=not s["use_cache"])
        bar.close()
    finally:
        for hd in handles:
            hd.remove()
    _write_tokens(out, handle, manifest["prompt_ids"], tokens)
    manifest["complete"] = True
    manifest["steps_done"] = len(tokens)
    write_json(out / "manifest.json", manifest)
    (out / "kv_cache.safetensors").unlink(missing_ok=True)
    return Trace(out)


def _flush(out: Path, start: int, buffer: dict[str, list], manifest: dict[str, Any], steps_done: int,
           cache: Any) -> None:
    # arrays first, then the cache, then the manifest: a crash leaves the manifest at the last
    # consistent point, and _resume_tokens drops anything written past it
    arrays = {k: np.stack(v) for k, v in buffer.items()}
    _atomic_write(out / "steps" / f"{start:06d}.npz", lambda tmp: _savez(tmp, arrays))
    if cache is not None:
        _save_cache(out / "kv_cache.safetensors", cache, steps_done)
    manifest["steps_done"] = steps_done
    write_json(out / "manifest.json", manifest)


def _read_chunk(f: Path) -> dict[str, np.ndarray]:
    try:
        return read_npz(f, f"the trace folder {f.parent.parent} is damaged; capture it again")
    except ResultsError as exc:
        raise TraceError(str(exc)) from None


def _chunk_files(out: Path) -> list[Path]:
    return sorted((out / "steps").glob("*.npz"))


def _resume_tokens(out: Path, manifest: dict[str, Any], use_cache: bool) -> tuple[list[int], list[list[int]]]:
    """The traced row's tokens so far, and each companion row's."""
    done = int(manifest["steps_done"])
    tokens: list[int] = []
    others: list[list[int]] = [[] for _ in manifest["settings"].get("companions", [])]
    for f in _chunk_files(out):
        start = int(f.stem)
        if start >= done:
            f.unlink()  # written after the last consistent manifest
            continue
        chunk = _read_chunk(f)
        tokens += chunk["token"].tolist()
        for g, col in zip(others, chunk["companion_tokens"].T if others else []):
            g += col.tolist()
    if len(tokens) != done:
        raise TraceError(f"{out}: manifest says {done} steps but the chunks hold {len(tokens)}: delete the folder")
    if use_cache and done and not (out / "kv_cache.safetensors").is_file():
        raise TraceError(f"{out}: interrupted cached trace without its KV cache: delete the folder")
    return tokens, others


def _write_tokens(out: Path, handle: ModelHandle, prompt: list[int], tokens: list[int]) -> None:
    tok = handle.tokenizer
    topk = np.concatenate([_read_chunk(f)["topk_ids"] for f in _chunk_files(out)])
    write_json(out / "tokens.json", {
        "prompt_ids": prompt, "generated_ids": tokens,
        "generated_text": [tok.decode([t]) for t in tokens],
        "top_k_text": [[tok.decode([int(t)]) for t in row[:5]] for row in topk],
    })


# ---------------------------------------------------------------------------------------------
# Reading

class Trace:
    """A complete trace folder, read lazily. Arrays are numpy, one row per step."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise TraceError(f"{self.path} is not a trace folder (no manifest.json): capture one with "
                             "instab_core.trace.capture or `instab capture`")
        try:
            self.manifest: dict[str, Any] = json.loads(mf.read_text())
        except json.JSONDecodeError as exc:
            raise TraceError(f"{mf} is not valid JSON ({exc}): the folder is damaged, capture it again") from exc
        if self.manifest.get("format") != FORMAT:
            raise TraceError(f"{self.path}: unknown trace format {self.manifest.get('format')!r} (expected {FORMAT})")
        if not self.manifest.get("complete"):
            raise TraceError(f"{self.path} is an incomplete trace ({self.manifest.get('steps_done')} steps written): "
                             "run the same capture again to resume it")
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            parts: dict[str, list[np.ndarray]] = {}
            for f in _chunk_files(self.path):
                for k, v in _read_chunk(f).items():
                    parts.setdefault(k, []).append(v)
            arrays = {k: np.concatenate(v) for k, v in parts.items()}
            n = self.manifest["steps_done"]
            if not arrays or any(len(v) != n for v in arrays.values()):
                raise TraceError(f"{self.path}: the step files hold {len(arrays.get('token', []))} steps, the "
                                 f"manifest says {n}: the folder is truncated, capture it again")
            self._arrays = arrays
        return self._arrays

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.manifest["prompt_ids"])

    @property
    def tokens(self) -> np.ndarray:
        """Generated token ids [T] int64."""
        return self.arrays["token"]

    @property
    def n_steps(self) -> int:
        return int(self.manifest["steps_done"])

    @property
    def stages(self) -> list[str]:
        return list(self.manifest["stages"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["model"]["dtype"])

    @property
    def weights_hash(self) -> str:
        return self.manifest["model"]["weights_hash"]

    def stage(self, name: str) -> torch.Tensor:
        """Stage outputs [T, width] in the capture's dtype (narrowed back from float32 storage)."""
        if name not in self.stages:
            raise TraceError(f"stage {name!r} was not captured in {self.path}; captured: {self.stages}")
        return torch.from_numpy(self.arrays[f"stage:{name}"]).to(self.dtype)

    @property
    def token_text(self) -> list[str]:
        """The text of each generated token (decoded one id at a time, for display only)."""
        return json.loads((self.path / "tokens.json").read_text())["generated_text"]

    def label(self) -> str:
        m, s = self.manifest["model"], self.manifest["settings"]
        with_others = f" + {len(s['companions'])} other prompts" if s.get("companions") else ""
        return (f"{m['dtype']}, {m['attn_implementation']}, {'KV cache' if s['use_cache'] else 'no cache'}, "
                f"batch {s['batch_rows']}{with_others}, {m['device_name']}")


# ---------------------------------------------------------------------------------------------
# Comparison

@dataclass
class Comparison:
    """Two traces of the same prompt and model, compared step by step up to their divergence."""

    a: Trace
    b: Trace
    divergence: int | None  # first step whose token ids differ; None if none within the common steps
    common_steps: int
    stages: list[str]
    per_step: pd.DataFrame  # step, stage, metrics — steps 0..divergence (inclusive)
    topk_overlap: np.ndarray  # [steps compared] |top-k(a) ∩ top-k(b)| / k
    same_dtype: bool
    notes: list[str] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        """The last step compared: the divergence step, or the last common step."""
        return self.divergence if self.divergence is not None else self.common_steps - 1

    def at(self, step: int) -> pd.DataFrame:
        """Per-stage metrics at one step, stages in network order."""
        if not 0 <= step <= self.last_step:
            raise TraceError(f"step {step} out of range: compared steps are 0..{self.last_step}")
        return self.per_step[self.per_step.step == step].set_index("stage").loc[self.stages]

    def curve(self, metric: str) -> pd.DataFrame:
        """metric as a [step × stage] table."""
        return self.per_step.pivot(index="step", columns="stage", values=metric)[self.stages]

    def logits_by_id(self, step: int | None = None, k: int = 5) -> pd.DataFrame:
        """The union of both traces' top-k token ids at ``step`` (default: the divergence), matched by id."""
        step = self.last_step if step is None else step
        rows = {}
        for side, tr in (("a", self.a), ("b", self.b)):
            ids, lg, pr = (tr.arrays[n][step][:k] for n in ("topk_ids", "topk_logits", "topk_probs"))
            for rank, (i, l, p) in enumerate(zip(ids.tolist(), lg.tolist(), pr.tolist()), 1):
                rows.setdefault(i, {})
                rows[i].update({f"rank_{side}": rank, f"logit_{side}": l, f"prob_{side}": p})
        table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("token_id")
        for c in ("rank_a", "rank_b", "logit_a", "logit_b", "prob_a", "prob_b"):
            if c not in table:
                table[c] = np.nan
        table["logit_b − logit_a"] = table.logit_b - table.logit_a
        return table.sort_values(["rank_a", "rank_b"])

    def divergence_row(self) -> dict[str, Any]:
        """The divergence in one row: the step, each trace's token and its top-1 − top-2 logit gap there."""
        row: dict[str, Any] = {"prompt tokens": len(self.a.prompt_ids), "common steps": self.common_steps,
                               "divergence step": self.divergence}
        d = self.divergence
        if d is not None:
            for side, t in (("A", self.a), ("B", self.b)):
                lg, pr = t.arrays["topk_logits"][d], t.arrays["topk_probs"][d]
                row[f"{side} chose"] = t.token_text[d]
                row[f"{side} p(top-1)"] = float(pr[0])
                row[f"{side} top-1 − top-2"] = float(lg[0] - lg[1])
        return row

    def summary(self) -> dict[str, Any]:
        return {"divergence": self.divergence, "common_steps": self.common_steps, "same_dtype": self.same_dtype,
                "a": self.a.label(), "b": self.b.label(), "notes": self.notes}


def check_pair(a: Trace, b: Trace) -> None:
    """Refuse two traces that are not of the same prompt (token ids) and the same weights."""
    if a.prompt_ids != b.prompt_ids:
        raise TraceError(f"the traces have different prompts ({len(a.prompt_ids)} vs {len(b.prompt_ids)} tokens, "
                         "or different ids): compare traces of the same prompt")
    if a.weights_hash != b.weights_hash:
        raise TraceError(f"the traces come from different weights ({a.manifest['model']['model']} "
                         f"{a.weights_hash[:12]} vs {b.manifest['model']['model']} {b.weights_hash[:12]}): "
                         "compare traces of the same model")


def divergence_step(a_tokens: np.ndarray, b_tokens: np.ndarray) -> int | None:
    """First index where two token-id sequences differ, within their common length (None if none)."""
    n = min(len(a_tokens), len(b_tokens))
    diff = np.flatnonzero(np.asarray(a_tokens[:n]) != np.asarray(b_tokens[:n]))
    return int(diff[0]) if diff.size else None


def decimal_counts(x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Per row, the number of entries with |x − y| >= 10^-k for k = 1..15 (float64), and exact matches."""
    d = (x.double() - y.double()).abs()
    out = {f"|Δ|>=1e-{k}": (d >= 10.0 ** -k).sum(1).numpy() for k in DECIMALS}
    out["exact"] = (d == 0).sum(1).numpy()
    return out


def _comparable(a: Trace, b: Trace, name: str, steps: slice) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = a.stage(name)[steps], b.stage(name)[steps]
    if x.dtype != y.dtype:  # bit metrics need one dtype: compare in the coarser one
        coarse = x.dtype if torch.finfo(x.dtype).eps >= torch.finfo(y.dtype).eps else y.dtype
        x, y = x.to(coarse), y.to(coarse)
    return x, y


def compare(a: Trace | str | os.PathLike, b: Trace | str | os.PathLike) -> Comparison:
    """Compare two traces of the same prompt and model up to and including their divergence step.

    Per stage and step: the sweep metrics (bitwise changed count, mean/max |Δ|, L2, cosine, ULP
    bins) and the seed's decimal bins. After the divergence the two contexts differ, so later steps
    are not compared. Cost: CPU and I/O only.
    """
    a = a if isinstance(a, Trace) else Trace(a)
    b = b if isinstance(b, Trace) else Trace(b)
    check_pair(a, b)
    n = min(a.n_steps, b.n_steps)
    div = divergence_step(a.tokens, b.tokens)
    last = div if div is not None else n - 1
    steps = slice(0, last + 1)
    stages = [s for s in a.stages if s in b.stages]
    notes = []
    if a.dtype != b.dtype:
        notes.append(f"dtypes differ ({a.dtype} vs {b.dtype}): bit and ULP metrics use the coarser dtype")
    frames = []
    for name in stages:
        x, y = _comparable(a, b, name, steps)
        if x.shape[1] != y.shape[1]:
            raise TraceError(f"stage {name} has width {x.shape[1]} in one trace and {y.shape[1]} in the other")
        m = compare_rows(x, y) | decimal_counts(x, y)
        frame = pd.DataFrame(m)
        frame.insert(0, "stage", name)
        frame.insert(0, "step", np.arange(last + 1))
        frames.append(frame)
    per_step = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "stage"])
    ka, kb = a.arrays["topk_ids"][steps], b.arrays["topk_ids"][steps]
    k = min(ka.shape[1], kb.shape[1])
    overlap = np.array([len(set(r[:k]) & set(q[:k])) / k for r, q in zip(ka.tolist(), kb.tolist())])
    return Comparison(a, b, div, n, stages, per_step, overlap, a.dtype == b.dtype, notes)


# ---------------------------------------------------------------------------------------------
# Localisation, logit lens and unembedding geometry

def _unembed_rows(handle: ModelHandle, ids: Sequence[int]) -> torch.Tensor:
    return handle.unembed.weight[list(ids)]


@torch.no_grad()
def lens_logits(handle: ModelHandle, stage: str, states: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Logit lens [n, len(ids)] of residual states [n, d]: final norm then unembedding, each once.

    The final norm's own output is only unembedded (never normalised twice). Computed on the
    handle's device in its dtype; the unembedding bias, if any, is added.
    """
    if not is_residual(stage):
        raise TraceError(f"the logit lens applies to residual-stream stages (embedding, layer_out[i], final_norm), "
                         f"not {stage!r}")
    x = states.to(device=handle.device, dtype=handle.dtype)
    if stage != "final_norm":
        x = handle.final_norm(x[None])[0]
    W = _unembed_rows(handle, ids)
    out = x @ W.T
    bias = getattr(handle.unembed, "bias", None)
    if bias is not None:
        out = out + bias[list(ids)]
    return out


@dataclass
class Localisation:
    """Where in the network two traces part at one step."""

    step: int
    tokens: tuple[int, int]  # the token each trace chose at ``step`` (a, b)
    first_difference: str | None  # first stage (network order) whose output differs at all
    first_flip: str | None  # first residual stage at which the lens' favoured token differs
    table: pd.DataFrame  # per stage: differs, max |Δ|, and for residual stages the lens gaps and favourites


def first_difference(comp: Comparison, step: int | None = None) -> str | None:
    """The first stage, in network order, whose output differs at ``step`` (default: the last compared step)."""
    at = comp.at(comp.last_step if step is None else step)
    return next((name for name in comp.stages if at.loc[name, "changed"] > 0), None)


def first_differing_step(comp: Comparison) -> int | None:
    """The first step at which any captured stage differs (None: every compared state is bitwise equal)."""
    changed = comp.per_step[comp.per_step.changed > 0]
    return int(changed.step.min()) if len(changed) else None


def localise(comp: Comparison, handle: ModelHandle, step: int | None = None) -> Localisation:
    """Walk the stages in network order at ``step`` (default: the divergence step).

    The favoured token of each trace at a residual stage is the one of the two chosen tokens
    (t_a, t_b) with the larger lens logit. The handle must hold the traces' weights.
    """
    if handle.weights_hash != comp.a.weights_hash:
        raise TraceError("the model given is not the one the traces were captured with (weights hash differs)")
    step = comp.last_step if step is None else step
    at = comp.at(step)
    ta, tb = int(comp.a.tokens[step]), int(comp.b.tokens[step])
    rows = []
    first_flip = None
    for name in comp.stages:
        row: dict[str, Any] = {"stage": name, "differs": bool(at.loc[name, "changed"] > 0),
                               "max_abs": float(at.loc[name, "max_abs"]), "cosine": float(at.loc[name, "cosine"])}
        if is_residual(name) and name != "logits":
            for side, tr in (("a", comp.a), ("b", comp.b)):
                lg = lens_logits(handle, name, tr.stage(name)[step:step + 1], [ta, tb])[0].double()
                row[f"gap_{side}"] = float(lg[0] - lg[1])  # > 0: favours t_a
                row[f"favours_{side}"] = ta if lg[0] >= lg[1] else tb
            if row["favours_a"] != row["favours_b"] and first_flip is None:
                first_flip = name
        rows.append(row)
    table = pd.DataFrame(rows).set_index("stage")
    return Localisation(step, (ta, tb), first_difference(comp, step), first_flip, table)


@torch.no_grad()
def recomputed_logits(comp: Comparison, handle: ModelHandle, step: int | None = None, k: int = 2) -> pd.DataFrame:
    """The top-k (of trace a) logits at ``step`` recomputed here from each trace's stored final-norm state.

    Beside the logits each capture stored, this shows the dot product's own rounding on the current
    device (the seed's "GPU-specific dot product"). Needs the final_norm stage in both traces.
    """
    step = comp.last_step if step is None else step
    ids = comp.a.arrays["topk_ids"][step][:k].tolist()
    if int(comp.b.tokens[step]) not in ids:  # B's choice too, where it is not in A's top-k
        ids.append(int(comp.b.tokens[step]))
    rows = []
    for side, tr in (("a", comp.a), ("b", comp.b)):
        here = lens_logits(handle, "final_norm", tr.stage("final_norm")[step:step + 1], ids)[0].double().cpu()
        stored = dict(zip(tr.arrays["topk_ids"][step].tolist(), tr.arrays["topk_logits"][step].tolist()))
        for i, tid in enumerate(ids):
            rows.append({"trace": side, "token_id": tid, "stored logit": stored.get(tid, np.nan),
                         "recomputed here": float(here[i]), "difference": float(here[i]) - stored.get(tid, np.nan)})
    return pd.DataFrame(rows)


@torch.no_grad()
def unembedding_angles(handle: ModelHandle, states: torch.Tensor, ranks: Sequence[int] = (1, 2, 3, 10, 100),
                       chunk_bytes: int = CHUNK_BYTES) -> pd.DataFrame:
    """Angles (degrees) between final-norm states [T, d] and the unembedding rows of the tokens ranked
    ``ranks`` by those states' own logits (float64; the states are not normalised again; equal logits rank
    the lower token id first).

    The float64 logits are computed a vocabulary chunk at a time (each chunk's float64 rows and its
    [T, chunk] logits within ``chunk_bytes``), keeping a running top-max(ranks): no float64 copy of the
    whole unembedding, no [T, V] logits and no full sort of them."""
    W = handle.unembed.weight
    V, d = W.shape
    if max(ranks) > V or min(ranks) < 1:
        raise TraceError(f"ranks must be within 1..{V}")
    x = states.to(device=W.device, dtype=torch.float64)
    bias = getattr(handle.unembed, "bias", None)
    top = top_logit_ids(x, W, max(ranks), bias=bias, chunk_bytes=chunk_bytes)
    rows = []
    for r in ranks:
        ids = top[:, r - 1]
        ang = torch.rad2deg(torch.arccos(cosine_rows(x, W[ids].double()).clamp(-1, 1)))
        rows.append(pd.DataFrame({"step": np.arange(len(x)), "rank": r, "token_id": ids.cpu().numpy(),
                                  "angle_deg": ang.cpu().numpy()}))
    return pd.concat(rows, ignore_index=True)


def _rank_order(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (values, ids) reordered by value descending, equal values by id ascending."""
    by_id = ids.argsort(dim=1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), ids.gather(1, order)


@torch.no_grad()
def top_logit_ids(x: torch.Tensor, W: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Ids [T, k] of the k largest float64 logits x @ W.T (+ bias) of each row of x [T, d], largest first,
    equal logits by lower id (a stable descending argsort of the full logits, truncated to k).

    Matrix-free over the vocabulary: W [V, d] (any dtype) is widened to float64 one chunk of rows at a time,
    the chunk's logits and its top k merged into a running top k; peak memory about ``chunk_bytes``."""
    V, d = W.shape
    T = x.shape[0]
    k = min(int(k), V)
    x = x.to(device=W.device, dtype=torch.float64)
    step = max(k, int(chunk_bytes) // (8 * (d + max(T, 1))))
    best_v = torch.empty(T, 0, dtype=torch.float64, device=W.device)
    best_i = torch.empty(T, 0, dtype=torch.long, device=W.device)
    for start in range(0, V, step):
        stop = min(V, start + step)
        logits = x @ W[start:stop].double().T
        if bias is not None:
            logits = logits + bias[start:stop].double()
        kk = min(k, stop - start)
        vals, idx = torch.topk(logits, kk, dim=1)
        # topk may keep any of several equal values at its boundary: where more than kk logits reach the
        # kk-th value, take that row's chunk by a stable sort instead (the lower ids among the equal ones)
        tied = (logits >= vals[:, -1:]).sum(1) > kk
        for r in torch.nonzero(tied).flatten().tolist():
            o = torch.sort(logits[r], descending=True, stable=True).indices[:kk]
            vals[r], idx[r] = logits[r, o], o
        best_v, best_i = _rank_order(torch.cat([best_v, vals], 1), torch.cat([best_i, idx + start], 1))
        best_v, best_i = best_v[:, :k], best_i[:, :k]
    return best_i


@torch.no_grad()
def norm_alignment(trace: Trace, handle: ModelHandle, steps: Sequence[int] | None = None, k: int = 5) -> pd.DataFrame:
    """The seed's RMSNorm impact: cosine of the last layer's output (pre-norm) and of the final-norm
    state with the unembedding rows of the trace's top-k tokens, per step and rank."""
    last = f"layer_out[{handle.n_layers - 1}]"
    pre, post = trace.stage(last), trace.stage("final_norm")
    steps = range(trace.n_steps) if steps is None else steps
    rows = []
    for t in steps:
        ids = trace.arrays["topk_ids"][t][:k].tolist()
        W = _unembed_rows(handle, ids).double().cpu()
        for name, h in (("pre-norm", pre[t]), ("post-norm", post[t])):
            cos = cosine_rows(W, h)
            rows += [{"step": t, "state": name, "rank": r + 1, "token_id": ids[r], "cosine": float(c)}
                     for r, c in enumerate(cos)]
    return pd.DataFrame(rows)


def embedding_identity(comp: Comparison) -> dict[str, Any]:
    """Whether the embedding rows fed at steps 0..divergence are bitwise equal in the two traces.

    Both traces feed token ids, so with one dtype the rows must be identical (the seed re-embedded
    decoded text to check this, exp4 parts 5-6)."""
    x, y = _comparable(comp.a, comp.b, "embedding", slice(0, comp.last_step + 1))
    equal = fp.bits_equal(x, y).all(dim=1)
    return {"steps": int(len(equal)), "bitwise_equal_rows": int(equal.sum()),
            "max_abs": float((x.double() - y.double()).abs().max()), "compared_in": str(x.dtype)}

