"""Determinism and batch-invariance audits of the current device.

Bitwise results hold only against a reference computed in the same batch shape. The audit
measures, for a probe, (a) whether a row computed alone (batch 1) equals the same row inside the
probe's fixed batch, and (b) whether a row inside the fixed batch is independent of its position
and of the other rows — (b) is what the batched exact kernels rely on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import fp
from .probe import Probe


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
