"""Determinism and batch-invariance audits of the current device.

Bitwise results hold only against a reference computed in the same batch shape. The audit
measures, for a probe, (a) whether a row computed alone (batch 1) equals the same row inside the
probe's fixed batch, and (b) whether a row inside the fixed batch is independent of its position
and of the other rows — (b) is what the batched exact kernels rely on.

Also here: :func:`invariance_table` (any rowwise function: a row alone versus inside batches of
several sizes and positions, across thread counts; :func:`probe_invariance_table` for probes, one
per dtype), :func:`chain_determinism` (a matmul chain run twice in process and once in a fresh
process, bitwise), and :func:`kv_cache_check` (next-token logits with and without the KV cache).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd
import torch

from . import fp
from .probe import Probe

if TYPE_CHECKING:
    from .models import ModelHandle


@dataclass
class BatchAudit:
    """Outcome of :func:`batch_invariance_audit`; ``asdict`` goes into result manifests."""

    device: str
    dtype: str
    batch_size: int
    rows: int
    batch1_equal_rows: int  # rows whose batch-1 output equals the in-batch output bitwise
    batch1_max_abs_diff: float
    position_invariant_rows: int  # rows equal bitwise at another position with other companions
    position_max_abs_diff: float
    threads: int

    @property
    def batch_invariant(self) -> bool:
        return self.batch1_equal_rows == self.rows

    @property
    def position_invariant(self) -> bool:
        return self.position_invariant_rows == self.rows

    def as_dict(self) -> dict:
        return {**asdict(self), "batch_invariant": self.batch_invariant,
                "position_invariant": self.position_invariant}


@torch.no_grad()
def batch_invariance_audit(probe: Probe, rows: int = 4, seed: int = 0) -> BatchAudit:
    """Compare a few near-x0 rows alone, in the fixed batch, and at other positions in it.

    The rows are x0 and x0 + 1e-3·|x0|·(random signs): the kind of inputs experiments feed.
    Costs ``rows`` batch-1 forwards and two fixed-shape batches.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = max(1, min(rows, probe.batch_size))
    x0 = probe.x0
    noise = torch.randint(0, 2, (rows, probe.d), generator=gen).to(x0) * 2 - 1
    X = x0 + 1e-3 * x0.abs() * noise
    X[0] = x0
    alone = torch.cat([probe.f_batch(X[i:i + 1]) for i in range(rows)])
    batched = probe.forward(X)
    b = probe.batch_size
    # Same rows, reversed order, at the end of a batch whose other rows are random companions.
    companions = x0 + 1e-2 * x0.abs() * (torch.rand((b, probe.d), generator=gen).to(x0) - 0.5)
    companions[b - rows:] = X.flip(0)
    moved = probe.f_batch(companions)[b - rows:].flip(0)
    return BatchAudit(
        device=str(x0.device), dtype=str(probe.dtype).removeprefix("torch."), batch_size=b, rows=rows,
        batch1_equal_rows=int(fp.bits_equal(alone, batched).all(dim=1).sum()),
        batch1_max_abs_diff=float((alone.double() - batched.double()).abs().max()),
        position_invariant_rows=int(fp.bits_equal(moved, batched).all(dim=1).sum()),
        position_max_abs_diff=float((moved.double() - batched.double()).abs().max()),
        threads=torch.get_num_threads(),
    )


# ---------------------------------------------------------------------------------------------
# Batch invariance across batch sizes, positions, thread counts and dtypes.

def _with_threads(n: int):
    """Context manager: ``torch.set_num_threads(n)``, restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = torch.get_num_threads()
        torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(old)
    return ctx()


def _positions(spec: Sequence[str] | Sequence[int], b: int) -> list[int]:
    named = {"first": 0, "middle": b // 2, "last": b - 1}
    out = []
    for p in spec:
        if isinstance(p, str):
            if p not in named:
                raise ValueError(f"unknown position {p!r}; use first, middle, last or an integer")
            out.append(named[p])
        else:
            if not -b <= int(p) < b:
                continue  # an integer position beyond a small batch: that batch has no such slot
            out.append(int(p) % b)
    return sorted(set(out))


@torch.no_grad()
def invariance_table(f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, companions: torch.Tensor,
                     batch_sizes: Sequence[int] = (1, 2, 3, 4, 8, 16, 32, 64),
                     positions: Sequence[str] | Sequence[int] = ("first", "middle", "last"),
                     threads: Sequence[int] | None = None, label: str = "") -> pd.DataFrame:
    """Row-wise f of each test row alone versus inside batches, bitwise, as a table.

    ``f`` maps [n, d] -> [n, m] rowwise; ``X`` [r, d] test rows; ``companions`` [>= max(batch_sizes) - 1, d]
    the other rows of each batch. For every thread count (``torch.set_num_threads``, restored),
    batch size b and position p, each test row is placed at p among b - 1 companions and compared
    with f(row) alone (batch 1) at the same thread count, and with f(row) alone at ``threads[0]``.
    Cost: r·(1 + Σ_b |positions(b)|) forwards per thread count.
    Columns: label, dtype, threads, batch_size, position, rows, equal_rows, max_abs_diff,
    equal_rows_vs_first_threads, invariant.
    """
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError("X must be [rows, d] with at least one row")
    if not batch_sizes:
        raise ValueError("empty batch_sizes: pass at least one batch size, e.g. (1, 8, 64)")
    if min(batch_sizes) < 1:
        raise ValueError("batch sizes must be >= 1")
    need = max(batch_sizes) - 1
    if companions.shape[0] < need:
        raise ValueError(f"need {need} companion rows for batch size {max(batch_sizes)}, got {companions.shape[0]}")
    _positions(positions, max(batch_sizes))  # validate names before any forward
    threads = [torch.get_num_threads()] if not threads else list(threads)
    if min(threads) < 1:
        raise ValueError("thread counts must be >= 1")
    rows: list[dict[str, Any]] = []
    first_alone: torch.Tensor | None = None
    for t in threads:
        with _with_threads(t):
            alone = torch.cat([f(X[i:i + 1]) for i in range(X.shape[0])])
            if first_alone is None:
                first_alone = alone
            cross = int(fp.bits_equal(alone, first_alone).all(dim=1).sum())
            for b in batch_sizes:
                for p in _positions(positions, b):
                    got = []
                    for i in range(X.shape[0]):
                        batch = torch.cat([companions[:p], X[i:i + 1], companions[p:b - 1]])
                        got.append(f(batch)[p:p + 1])
                    got_t = torch.cat(got)
                    eq = int(fp.bits_equal(got_t, alone).all(dim=1).sum())
                    rows.append(dict(label=label, dtype=str(X.dtype).removeprefix("torch."), threads=t, batch_size=b,
                                     position=p, rows=int(X.shape[0]), equal_rows=eq,
                                     max_abs_diff=float((got_t.double() - alone.double()).abs().max()),
                                     equal_rows_vs_first_threads=cross, invariant=eq == X.shape[0]))
    return pd.DataFrame(rows)


def probe_invariance_table(probes: Probe | Sequence[Probe], rows: int = 2,
                           batch_sizes: Sequence[int] = (1, 2, 3, 4, 8, 16, 32, 64),
                           positions: Sequence[str] | Sequence[int] = ("first", "middle", "last"),
                           threads: Sequence[int] | None = None, seed: int = 0) -> pd.DataFrame:
    """:func:`invariance_table` for probes (one per dtype: load the model once per dtype).

    Test rows are x0 and x0 + 1e-3·|x0|·(random signs); companions are x0 + 1e-2·|x0|·U(-½, ½).
    """
    if isinstance(probes, Probe):
        probes = [probes]
    if not probes:
        raise ValueError("no probes given")
    tables = []
    for probe in probes:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x0 = probe.x0
        noise = (torch.randint(0, 2, (rows, probe.d), generator=gen) * 2 - 1).to(x0)
        X = x0 + 1e-3 * x0.abs() * noise
        X[0] = x0
        comp = x0 + 1e-2 * x0.abs() * (torch.rand((max(batch_sizes), probe.d), generator=gen).to(x0) - 0.5)
        tables.append(invariance_table(probe.f_batch, X, comp, batch_sizes, positions, threads,
                                       label=f"{probe.handle.name}:{probe.target}"))
    return pd.concat(tables, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Matmul-chain determinism, in process and across processes (the seed's exp10 p1/p2).

@contextmanager
def deterministic(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` inside the block, the previous setting restored."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


@torch.no_grad()
def matmul_chain(dim: int = 256, depth: int = 10, dtype: str = "bfloat16", device: str = "cpu", seed: int = 42,
                 deterministic_algorithms: bool = True) -> torch.Tensor:
    """The seed's p1: x [dim, dim] through ``depth`` random [dim, dim] matmuls; returns the result on the CPU.

    Matrices are N(0, 1/dim) (drawn in float32 on the CPU, so every device gets the same inputs),
    then cast to ``dtype``. On CUDA with deterministic algorithms, CUBLAS_WORKSPACE_CONFIG must be
    set before CUDA starts (e.g. ``:4096:8``).
    """
    from .models import resolve_device, resolve_dtype
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    if dim < 1 or depth < 1:
        raise ValueError("dim and depth must be >= 1")
    if dev.type == "cuda" and deterministic_algorithms and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        raise RuntimeError("deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts "
                           "(export it, or set os.environ before the first CUDA call)")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(dim, dim, generator=gen).to(device=dev, dtype=dt)
    Ws = [(torch.randn(dim, dim, generator=gen) / dim ** 0.5).to(device=dev, dtype=dt) for _ in range(depth)]
    with deterministic(deterministic_algorithms):
        for W in Ws:
            x = x @ W
    return x.cpu()


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Bit-equality and difference statistics of two tensors (the seed's p2)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return {"identical": False, "reason": f"shape/dtype differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"}
    eq = fp.bits_equal(a, b)
    diff = (a.double() - b.double()).abs()
    return {"identical": bool(eq.all()), "elements": int(a.numel()), "differing": int((~eq).sum()),
            "max_abs_diff": float(diff.max()) if a.numel() else 0.0,
            "mean_abs_diff": float(diff.mean()) if a.numel() else 0.0}


def chain_in_subprocess(path: str | os.PathLike, **kwargs: Any) -> None:
    """Run :func:`matmul_chain` in a fresh Python process and save its result to ``path`` (torch.save)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    pkg_parent = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # same thread count as this process
    cmd = [sys.executable, "-m", "instab_core.numerics", "chain", str(path), json.dumps(kwargs)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"chain subprocess failed ({r.returncode}): {r.stderr[-2000:]}")


def chain_determinism(dim: int = 256, depth: int = 10, dtype: str = "bfloat16", device: str = "cpu", seed: int = 42,
                      deterministic_algorithms: bool = True, cross_process: bool = True,
                      workdir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The chain run twice in this process and once in a fresh process, each compared with run 1.

    Returns one row per comparison: comparison, identical, elements, differing, max_abs_diff, mean_abs_diff.
    """
    import tempfile
    kw = dict(dim=dim, depth=depth, dtype=dtype, device=device, seed=seed, deterministic_algorithms=deterministic_algorithms)
    a = matmul_chain(**kw)
    b = matmul_chain(**kw)
    rows = [{"comparison": "in-process run 2 vs run 1", **compare_tensors(a, b)}]
    if cross_process:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = os.path.join(tmp, "chain.pt")
            chain_in_subprocess(path, **kw)
            c = torch.load(path)
        rows.append({"comparison": "subprocess vs run 1", **compare_tensors(a, c)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# KV cache on versus off.

@torch.no_grad()
def kv_cache_check(handle: "ModelHandle", text: str, prefix_lengths: Sequence[int] | None = None) -> pd.DataFrame:
    """Next-token logits at the last prompt token: full forward without cache versus cached prefix + steps.

    For each prefix length k (default: L-1, the greedy step), the first k tokens run with
    ``use_cache=True`` and the remaining L-k tokens are fed one at a time with ``past_key_values``;
    the last step's logits are compared with the full no-cache forward of all L tokens (token ids,
    batch 1 both ways). Columns: prefix_len, steps, bitwise_equal, max_abs_diff, argmax_full,
    argmax_cached, same_argmax.
    """
    ids = handle.encode(text)[None]
    L = ids.shape[1]
    if L < 2:
        raise ValueError("kv_cache_check needs a prompt of at least 2 tokens")
    ks = [L - 1] if prefix_lengths is None else list(prefix_lengths)
    if not ks:
        raise ValueError("empty prefix_lengths")
    for k in ks:
        if not 1 <= k < L:
            raise ValueError(f"prefix length {k} out of range 1..{L - 1} for a prompt of {L} tokens")
    model = handle.model
    full = model(input_ids=ids, use_cache=False).logits[0, -1]
    rows = []
    for k in ks:
        out = model(input_ids=ids[:, :k], use_cache=True)
        past = out.past_key_values
        for j in range(k, L):
            out = model(input_ids=ids[:, j:j + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
        cached = out.logits[0, -1]
        rows.append(dict(prefix_len=k, steps=L - k, bitwise_equal=bool(fp.bits_equal(full, cached).all()),
                         max_abs_diff=float((full.double() - cached.double()).abs().max()),
                         argmax_full=int(full.argmax()), argmax_cached=int(cached.argmax()),
                         same_argmax=int(full.argmax()) == int(cached.argmax())))
    return pd.DataFrame(rows)


def _main(argv: list[str]) -> None:
    import json
    if len(argv) != 3 or argv[0] != "chain":
        raise SystemExit("usage: python -m instab_core.numerics chain OUT.pt '{json kwargs}'")
    torch.save(matmul_chain(**json.loads(argv[2])), argv[1])


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])
