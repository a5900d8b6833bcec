"""Rounding injection: add then subtract a constant c on every input embedding, E' = fl(fl(E + c) − c).

In exact arithmetic E' = E; in the model's dtype the low bits of every entry with |e| well below c are
rounded away (for |e| < ulp(c)/2 the entry becomes 0). It is a perturbation made of rounding error
only (the seed's llama/gpt ``model_perturbation_test``). All constants and the reference (c = 0,
E unchanged) run as rows of ONE batch, so every row is compared with a reference of the same batch shape.

The final hidden state is read after the final norm, applied once (the seed's "after norm" applied
it a second time to HF's ``hidden_states[-1]``, which is already normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from .models import ModelHandle
from .probe import run_until


def inject(E: torch.Tensor, c: float) -> torch.Tensor:
    """fl(fl(E + c) − c) in E's dtype, E [..., d]."""
    cc = torch.tensor(c, dtype=E.dtype, device=E.device)
    if float(cc) != float(c):
        raise ValueError(f"c={c!r} is not representable in {E.dtype}: use powers of two")
    return (E + cc) - cc


def final_hidden_batch(handle: ModelHandle, emb: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm, once) for inputs_embeds ``emb`` [n, L, d] → [n, L, d]."""
    with torch.no_grad():
        return run_until(handle, emb, handle.final_norm)


@dataclass
class InjectionResult:
    """``table``: one row per constant (last-token prediction and input/output change summaries);
    ``token_l2`` / ``token_cos`` [C, L] float64: per-token L2 and cosine of the final hidden state
    against the reference; ``emb_changed`` [C, L] int: entries of each token's embedding that changed."""

    table: pd.DataFrame
    token_l2: np.ndarray
    token_cos: np.ndarray
    emb_changed: np.ndarray
    tokens: list[str]
    forward_passes: int


def rounding_injection(handle: ModelHandle, text: str, constants: Iterable[float]) -> InjectionResult:
    """Inject every c in ``constants`` on all tokens of ``text``; one forward of 1 + len(constants) rows."""
    cs = [float(c) for c in constants]
    if not cs:
        raise ValueError("empty constant list: pass e.g. 2.0 ** np.arange(-10, 6)")
    if any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError("every constant c must be finite and > 0")
    ids = handle.encode(text)
    with torch.no_grad():
        E = handle.embedding(ids)
    emb = torch.stack([E] + [inject(E, c) for c in cs])  # row 0: the reference
    H = final_hidden_batch(handle, emb)
    with torch.no_grad():
        logits = handle.logits(H[:, -1, :]).double()
    Hd = H.double()
    ref, pert = Hd[0], Hd[1:]
    l2 = (pert - ref).norm(dim=-1).cpu().numpy()
    cos = torch.nn.functional.cosine_similarity(pert, ref[None].expand_as(pert), dim=-1).cpu().numpy()
    changed = (emb[1:] != E[None]).sum(dim=-1).cpu().numpy()
    p = torch.softmax(logits, dim=-1)
    t0 = int(logits[0].argmax())
    t = logits[1:].argmax(dim=-1)
    tok = handle.tokenizer
    table = pd.DataFrame({
        "c": cs, "log2_c": np.log2(cs),
        "emb_entries_changed": changed.sum(axis=1), "emb_l2": (emb[1:].double() - E.double()).norm(dim=(1, 2)).cpu().numpy(),
        "orig_token": tok.decode([t0]), "pert_token": [tok.decode([int(i)]) for i in t],
        "orig_prob": float(p[0, t0]), "pert_prob": p[1:].gather(1, t[:, None])[:, 0].cpu().numpy(),
        "orig_token_prob_after": p[1:, t0].cpu().numpy(),
        "logit_diff": (logits[1:] - logits[0]).norm(dim=-1).cpu().numpy(),
        "token_changed": (t != t0).cpu().numpy(),
        "last_l2": l2[:, -1], "last_cos": cos[:, -1], "max_token_l2": l2.max(axis=1),
        "min_token_cos": cos.min(axis=1),
    })
    return InjectionResult(table=table, token_l2=l2, token_cos=cos, emb_changed=changed,
                           tokens=[tok.decode([int(i)]) for i in ids], forward_passes=1)
