"""Toy models with ground truth for the sparse-direction decomposition (seed 003), trained here.

Every toy is functional in a flat float64 parameter vector w (so curvature along a direction is a plain
nested jvp), trained deterministically from a seed in a few seconds on one core, and carries its ground
truth as parameter blocks (index sets of w):

* :func:`xor_toy` — a 2-H-1 ReLU network on the four XOR points, binary outputs (KL divergence); block j =
  hidden unit j's incoming weights, bias and outgoing weight.
* :func:`superposition_toy` — Elhage et al.'s toy model of superposition: n sparse features in m < n
  dimensions, x̂ = ReLU(WᵀW x + b) (MSE divergence); block i = feature i's column W[:, i] and its bias b_i.
* :func:`gpt2_attention_case` — one attention weight matrix of tiny-gpt2 (no ground truth; blocks = the
  rows belonging to each head, a candidate structure only).

A toy whose training does not reach its target raises (no silent fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, vmap

from .curvature import composite_layer_norm, divergence


@dataclass
class Toy:
    """A trained toy: parameters w0 [P] (float64), samples X [N, ...], one-sample forward, ground truth."""

    name: str
    w0: torch.Tensor
    X: torch.Tensor
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (w [P], x) -> outputs [C]
    kind: str  # divergence: "kl" or "mse"
    blocks: list[np.ndarray]
    block_names: list[str]
    info: dict = field(default_factory=dict)

    def div_all(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """w -> [N] divergences D(f, x_n, w) against the outputs at w0 (vmapped over samples)."""
        ref = vmap(lambda x: self.forward(self.w0, x))(self.X).detach()

        def d(w: torch.Tensor) -> torch.Tensor:
            return vmap(lambda x, r: divergence(self.forward(w, x), r, self.kind))(self.X, ref)

        return d


def _split(w: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, i = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(w[i:i + n].reshape(s))
        i += n
    return out


# --- XOR -----------------------------------------------------------------------------------------

def xor_toy(hidden: int = 2, seed: int = 0, steps: int = 2000, lr: float = 0.05) -> Toy:
    """2-``hidden``-1 ReLU net, trained on XOR with full-batch Adam (float64); outputs [0, z] logits."""
    shapes = [(hidden, 2), (hidden,), (1, hidden), (1,)]
    X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)

    def forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        W1, b1, W2, b2 = _split(w, shapes)
        z = W2 @ torch.relu(W1 @ x + b1) + b2
        return torch.cat([torch.zeros_like(z), z])  # two-class logits: KL between Bernoulli outputs

    P = sum(int(np.prod(s)) for s in shapes)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(P, generator=gen, dtype=torch.float64) - 0.5) * 2.0
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        logits = vmap(lambda x: forward(w, x))(X)
        loss = torch.nn.functional.cross_entropy(logits, y.long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    w0 = w.detach()
    p = torch.softmax(vmap(lambda x: forward(w0, x))(X), -1)[:, 1]
    if not bool(((p > 0.5) == (y > 0.5)).all()):
        raise RuntimeError(f"xor_toy(seed={seed}, hidden={hidden}) did not learn XOR (p = {p.tolist()}); "
                           "try another seed or more hidden units")
    off = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    blocks = [np.array([off[0] + 2 * j, off[0] + 2 * j + 1, off[1] + j, off[2] + j]) for j in range(hidden)]
    return Toy("xor", w0, X, forward, "kl", blocks, [f"hidden {j}" for j in range(hidden)],
               info={"loss": float(loss.detach()), "p": p.tolist(), "shapes": shapes})


# --- toy model of superposition --------------------------------------------------------------------

def sparse_features(n: int, features: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """[n, features]: each feature active with probability 1 − sparsity, value uniform in [0, 1]."""
    active = torch.rand(n, features, generator=gen, dtype=torch.float64) > sparsity
    return active * torch.rand(n, features, generator=gen, dtype=torch.float64)


def superposition_toy(features: int = 5, dims: int = 2, sparsity: float = 0.9, seed: int = 0, steps: int = 3000,
                      batch: int = 1024, lr: float = 0.01, samples: int = 40) -> Toy:
    """Train x̂ = ReLU(WᵀW x + b) (W [dims, features]) on sparse features with MSE (float64, Adam).

    Samples for the curvature: ``samples`` draws from the same distribution with at least one active
    feature. Raises unless every feature is represented (‖W[:, i]‖ > 0.5) — the superposition regime.
    """
    shapes = [(dims, features), (features,)]
    gen = torch.Generator().manual_seed(seed)

    def forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        W, b = _split(w, shapes)
        return torch.relu(W.T @ (W @ x) + b)

    w = torch.cat([torch.randn(dims * features, generator=gen, dtype=torch.float64) * 0.3,
                   torch.zeros(features, dtype=torch.float64)]).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        x = sparse_features(batch, features, sparsity, gen)
        loss = ((vmap(lambda xi: forward(w, xi))(x) - x) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w0 = w.detach()
    W = w0[: dims * features].reshape(dims, features)
    norms = W.norm(dim=0)
    if not bool((norms > 0.5).all()):
        raise RuntimeError(f"superposition_toy(seed={seed}): features {torch.nonzero(norms <= 0.5).ravel().tolist()} "
                           f"are not represented (column norms {norms.tolist()}); lower sparsity or train longer")
    X = sparse_features(8 * samples, features, sparsity, gen)
    X = X[(X > 0).any(1)][:samples]
    blocks = [np.array([d * features + i for d in range(dims)] + [dims * features + i]) for i in range(features)]
    return Toy("superposition", w0, X, forward, "mse", blocks, [f"feature {i}" for i in range(features)],
               info={"loss": float(loss.detach()), "column_norms": norms.tolist(), "shapes": shapes})


# --- one attention weight matrix of tiny-gpt2 --------------------------------------------------------

@dataclass
class ModelCase:
    """A real model restricted to one weight matrix: w0 [P] flattened, samples = token windows [N, L]."""

    name: str
    param_name: str
    w0: torch.Tensor
    X: torch.Tensor
    div_all_fn: Callable[[torch.Tensor], torch.Tensor]
    blocks: list[np.ndarray]
    block_names: list[str]
    info: dict = field(default_factory=dict)

    def div_all(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.div_all_fn


def gpt2_attention_case(h, layer: int = 0, matrix: str = "c_proj", samples: int = 16, length: int = 12,
                        seed: int = 0) -> ModelCase:
    """tiny-gpt2's ``transformer.h[layer].attn.<matrix>.weight`` as w; samples = ``samples`` windows of
    ``length`` tokens from the bundled corpus; D = KL of the next-token distribution at the last position.

    ``c_proj`` (Conv1D, weight [in, out]) has its input rows grouped by head, so ``blocks`` are the heads'
    rows — a candidate structure, not ground truth.
    """
    from .zoo.corpus import build_documents

    if h.adapter.family != "gpt2":
        raise ValueError(f"gpt2_attention_case needs a GPT-2 model (got {h.adapter.family})")
    pname = f"{h.adapter.layers}.{layer}.attn.{matrix}.weight"
    named = dict(h.model.named_parameters())
    if pname not in named:
        raise ValueError(f"{pname} is not a parameter of {h.name}")
    shape = named[pname].shape
    w0 = named[pname].detach().reshape(-1).clone()
    # per document: one call on the whole corpus warns that it exceeds the model's context (it is only sliced)
    ids = torch.cat([torch.as_tensor(h.tokenizer(doc, verbose=False)["input_ids"]) for doc in build_documents()])
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(ids) - length, size=samples, replace=False)
    X = torch.stack([ids[s:s + length] for s in starts]).to(h.device)
    model = h.model

    def logits(w: torch.Tensor) -> torch.Tensor:
        with composite_layer_norm(model):  # nested jvps through the fused LayerNorm are wrong in torch
            return functional_call(model, {pname: w.reshape(shape)}, args=(),
                                   kwargs={"input_ids": X, "use_cache": False}).logits[:, -1]

    with torch.no_grad():
        ref = logits(w0)

    def div_all(w: torch.Tensor) -> torch.Tensor:
        return divergence(logits(w), ref, "kl")

    n_head = model.config.n_head
    blocks, names = [], []
    if matrix == "c_proj":
        hd = shape[0] // n_head
        idx = np.arange(shape[0] * shape[1]).reshape(shape[0], shape[1])
        blocks = [idx[k * hd:(k + 1) * hd].ravel() for k in range(n_head)]
        names = [f"head {k}" for k in range(n_head)]
    return ModelCase("gpt2-attention", pname, w0, X, div_all, blocks, names,
                     info={"shape": list(shape), "samples": samples, "length": length})
