"""Probe: a prompt, a token position and a target tensor, evaluated for replacement input vectors.

``f(x)`` replaces the input embedding at ``position`` with ``x`` and returns the target at that
position. Targets (named as tensors, not as HF tuple indices):

* ``final_hidden`` — after the final norm (HF ``hidden_states[-1]``; the seed's f);
* ``pre_norm`` — the last decoder layer's output, before the final norm;
* ``layer_out[i]`` — the output of decoder layer i (0-based);
* ``logits`` — the unembedding of ``final_hidden`` (the final norm applied once).

Bitwise comparisons are only meaningful against a reference computed in the same batch shape,
so :meth:`Probe.forward` always runs chunks of exactly ``batch_size`` rows (padding with x0), and
``reference`` is f(x0) computed the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from .models import ModelHandle


class _Stop(Exception):
    """Raised by a capture hook once the target is computed, to skip the rest of the network."""


def run_until(handle: ModelHandle, emb: torch.Tensor, module: torch.nn.Module, take: str = "output",
              **forward_kwargs: Any) -> torch.Tensor:
    """Run the base model on inputs_embeds ``emb`` [n, L, d] only as far as ``module``; return its
    output (``take="output"``, the first element of a tuple) or its first input (``take="input"``).
    ``forward_kwargs`` go to the base model (e.g. ``past_key_values``; default ``use_cache=False``)."""
    captured: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor) -> None:
        captured["out"] = tensor
        raise _Stop

    if take == "output":
        hook = module.register_forward_hook(lambda m, i, o: grab(o[0] if isinstance(o, tuple) else o))
    elif take == "input":
        hook = module.register_forward_pre_hook(lambda m, i: grab(i[0]))
    else:
        raise ValueError(f"take must be 'output' or 'input', got {take!r}")
    try:
        handle.base(inputs_embeds=emb, **{"use_cache": False, **forward_kwargs})
    except _Stop:
        pass
    finally:
        hook.remove()
    if "out" not in captured:
        raise RuntimeError(f"{type(module).__name__} was not called in the forward pass")
    return captured["out"]


@dataclass(frozen=True)
class Target:
    kind: str  # final_hidden | pre_norm | layer_out | logits
    layer: int | None = None

    def __str__(self) -> str:
        return f"layer_out[{self.layer}]" if self.kind == "layer_out" else self.kind


def parse_target(spec: str, n_layers: int) -> Target:
    """Parse a target name; ``layer_out[-1]`` counts from the end."""
    if spec in ("final_hidden", "pre_norm", "logits"):
        return Target(spec)
    m = re.fullmatch(r"layer_out\[(-?\d+)\]", spec.replace(" ", ""))
    if not m:
        raise ValueError(f"unknown target {spec!r}; use final_hidden, pre_norm, logits or layer_out[i]")
    i = int(m.group(1))
    if not -n_layers <= i < n_layers:
        raise ValueError(f"layer_out[{i}] out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return Target("layer_out", i % n_layers)


class Probe:
    """f(X) for a batch of replacement vectors X at one token position of one prompt.

    Attributes: ``ids`` [L] int64, ``E`` [L, d] (model dtype), ``x0`` [d] (model dtype),
    ``position`` (non-negative), ``target``, ``batch_size``, ``reference`` [m] = f(x0) computed in
    a full batch of ``batch_size`` rows, ``rows_evaluated`` (forward rows run, padding included).
    """

    def __init__(self, handle: ModelHandle, text: str, position: int = -1, target: str = "final_hidden",
                 batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.handle = handle
        self.text = text
        self.ids = handle.encode(text)
        L = int(self.ids.shape[0])
        if not -L <= position < L:
            raise ValueError(f"position {position} out of range for a prompt of {L} tokens (valid: {-L}..{L - 1})")
        self.position = position % L
        self.target = parse_target(target, handle.n_layers)
        self.batch_size = batch_size
        with torch.no_grad():
            self.E = handle.embedding(self.ids).detach()
        self.x0 = self.E[self.position].clone()
        if not torch.isfinite(self.x0).all():
            raise ValueError("x0 (the input embedding at the probe position) has non-finite entries")
        self.rows_evaluated = 0
        self.reference = self.forward(self.x0[None])[0]

    # --- evaluation -------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.x0.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.handle.dtype

    def token_texts(self) -> list[str]:
        return [self.handle.tokenizer.decode([int(i)]) for i in self.ids]

    def embeds(self, X: torch.Tensor) -> torch.Tensor:
        """The prompt's input embeddings [n, L, d] with row ``position`` replaced by each row of X [n, d]."""
        n = X.shape[0]
        X = X.to(device=self.x0.device, dtype=self.dtype)
        p, E = self.position, self.E
        return torch.cat([E[:p].expand(n, p, -1), X[:, None, :], E[p + 1:].expand(n, E.shape[0] - p - 1, -1)], dim=1)

    def pad(self, X: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """X [n, d] split into chunks of exactly ``batch_size`` rows (the last padded with x0): (chunk, real rows)."""
        X = X.to(device=self.x0.device, dtype=self.dtype)
        b = self.batch_size
        out = []
        for start in range(0, X.shape[0], b):
            chunk = X[start:start + b]
            k = chunk.shape[0]
            if k < b:
                chunk = torch.cat([chunk, self.x0.expand(b - k, -1)], dim=0)
            out.append((chunk, k))
        return out

    def f_batch(self, X: torch.Tensor) -> torch.Tensor:
        """Differentiable f for X [n, d] in one forward of exactly n rows; returns [n, m]."""
        h, tgt = self.handle, self.target
        if tgt.kind in ("final_hidden", "logits"):
            full = run_until(h, self.embeds(X), h.final_norm)
        elif tgt.kind == "pre_norm":
            full = run_until(h, self.embeds(X), h.final_norm, take="input")
        else:
            full = run_until(h, self.embeds(X), h.layers[tgt.layer])
        out = full[:, self.position, :]
        if tgt.kind == "logits":
            out = h.logits(out)
        return out

    def f(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable f for one vector x [d] at batch size 1; returns [m]."""
        return self.f_batch(x[None])[0]

    @torch.no_grad()
    def forward(self, X: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """f for X [n, d] in chunks of exactly ``batch_size`` rows (padded with x0); returns [n, m].

        Every row is computed in the same batch shape as ``reference``.
        """
        if X.shape[0] == 0:
            return self.reference.new_empty((0, self.reference.shape[0]))
        chunks = self.pad(X)
        if progress and len(chunks) > 1:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="forward", unit="batch")
        outs = []
        for chunk, k in chunks:
            outs.append(self.f_batch(chunk)[:k])
            self.rows_evaluated += chunk.shape[0]
        return torch.cat(outs, dim=0)

    def with_batch_size(self, batch_size: int) -> "Probe":
        """The same probe evaluated in another fixed batch shape (``batch_size=1``: the seed's semantics)."""
        return Probe(self.handle, self.text, self.position, str(self.target), batch_size)

    def describe(self) -> dict[str, Any]:
        """Provenance for result manifests."""
        return {
            "text": self.text, "position": self.position, "n_tokens": int(self.ids.shape[0]),
            "token_ids": [int(i) for i in self.ids], "tokens": self.token_texts(),
            "target": str(self.target), "batch_size": self.batch_size,
        }

