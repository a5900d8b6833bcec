"""Floating-point lattice helpers: ulp, neighbours, ordered-integer views, bitwise comparison,
and the exact breakpoints along a ray at which the float32 input fl32(x0 + s·d) changes.

A perturbation scale ``s`` is always a float32 number, as in the seed scripts (their bisection
rounds every midpoint to float32 and their walk steps with ``nextafter`` on float32).

Two perturbation modes, both ending in a float32 input:

* ``"fp32"``: ``x0 + s*d`` in float32 arithmetic (two roundings: the product, then the sum).
* ``"fp64"``: ``fl32(x0 + s*d)`` with the product and sum in float64, then rounded to float32.

In both modes each coordinate g_i(s) is monotone in s (a composition of monotone roundings), so
the input along a ray is piecewise constant with breakpoints that can be found by bisection on
the float32 bit pattern of s, without the model. "The input changes" means its bit pattern
changes, so a coordinate going from +0 to -0 counts as a change (a distinct input state).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Mode = Literal["fp32", "fp64"]
MODES: tuple[str, ...] = ("fp32", "fp64")

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}
_SIGN_MASK = {torch.float32: 0x7FFFFFFF, torch.float64: 0x7FFFFFFFFFFFFFFF, torch.float16: 0x7FFF,
              torch.bfloat16: 0x7FFF}


def next_up(x: torch.Tensor) -> torch.Tensor:
    """The next representable value above each entry (same dtype)."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def next_down(x: torch.Tensor) -> torch.Tensor:
    """The next representable value below each entry (same dtype)."""
    return torch.nextafter(x, torch.full_like(x, float("-inf")))


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of each entry: the gap from |x| to the next value away from zero."""
    a = x.abs()
    return next_up(a) - a


def ordered_int(x: torch.Tensor) -> torch.Tensor:
    """Integer view of floats that is monotone in the float order, as int64.

    Consecutive representable values map to consecutive integers; +0 and -0 both map to 0.
    Works for float16, bfloat16, float32 and float64.
    """
    if x.dtype not in _INT_VIEW:
        raise TypeError(f"ordered_int needs a floating tensor, got {x.dtype}")
    bits = x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64)
    magnitude = bits & _SIGN_MASK[x.dtype]
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable values between a and b (int64, elementwise; same dtype required)."""
    if a.dtype != b.dtype:
        raise TypeError(f"ulp_distance needs equal dtypes, got {a.dtype} and {b.dtype}")
    return (ordered_int(a) - ordered_int(b)).abs()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bitwise equality (so -0 != +0 and NaN payloads matter)."""
    if a.dtype != b.dtype:
        raise TypeError(f"bits_equal needs equal dtypes, got {a.dtype} and {b.dtype}")
    view = _INT_VIEW[a.dtype]
    return a.contiguous().view(view) == b.contiguous().view(view)


def rows_differ(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Per row of ``a`` [n, m] against ``b`` [m] or [n, m]: True where the row differs.

    ``threshold == 0`` means bitwise; otherwise max |a - b| > threshold (computed in float64).
    Returns a bool tensor [n].
    """
    b = b.expand_as(a)
    if threshold == 0.0:
        return ~bits_equal(a, b).all(dim=-1)
    return (a.double() - b.double()).abs().amax(dim=-1) > threshold


def perturb(x0: torch.Tensor, s: torch.Tensor, d: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The float32 input fl32(x0 + s·d) for the given mode.

    Shapes broadcast: x0 [..., n], s [...] or [..., 1] (float32 scales), d [..., n].
    Returns float32. This is the one place inputs along a ray are formed: the breakpoint
    search and the model evaluation both call it, so they agree bit for bit.
    """
    if x0.dtype != torch.float32 or d.dtype != torch.float32:
        raise TypeError("perturb works on float32 x0 and d (the seed's perturbation is float32)")
    s = torch.as_tensor(s, dtype=torch.float32, device=x0.device)
    if mode == "fp32":
        step = s * d  # rounded to float32 here, as in the seed's fp32 mode
        return x0 + step
    if mode == "fp64":
        return (x0.double() + s.double() * d.double()).float()
    raise ValueError(f"unknown perturbation mode {mode!r}; use one of {MODES}")


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float tensor of any dtype, as int64; monotone in t where t >= 0."""
    return t.contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)


def from_bit_pattern(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floats of ``dtype`` from their bit patterns (held in int64)."""
    return bits.to(_INT_VIEW[dtype]).view(dtype)


def float32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Positive float32 values from their int32 bit patterns (held in int64)."""
    return from_bit_pattern(bits, torch.float32)


def float32_bits(s: torch.Tensor) -> torch.Tensor:
    """Bit patterns (as int64) of non-negative float32 values; their order is the float order."""
    s = torch.as_tensor(s, dtype=torch.float32)
    if (s < 0).any() or torch.isnan(s).any():
        raise ValueError("scales must be non-negative and not NaN")
    return bit_pattern(s)


def next_breakpoints(
    x0: torch.Tensor, d: torch.Tensor, s_from: torch.Tensor, s_max: float, mode: Mode
) -> torch.Tensor:
    """Per coordinate, the smallest float32 s in (s_from, s_max] at which the input changes.

    x0 [n] or [R, n], d [R, n] float32; s_from [R] or [R, n] float32 (a start scale per ray or
    per coordinate). "Changes" means fl32(x0_i + s·d_i) differs from its value at s_from.
    Returns [R, n] float32, +inf where the coordinate does not change up to s_max. Exact: a
    bisection (at most 32 steps) on the bit patterns of positive float32 s, valid because each
    coordinate is monotone in s.
    """
    rays, n = d.shape
    x0 = x0.expand(rays, n)
    s_from = s_from.reshape(rays, -1).expand(rays, n)
    lo = float32_bits(s_from).clone()
    current = perturb(x0, s_from, d, mode)
    changes = ~bits_equal(perturb(x0, torch.tensor(s_max, dtype=torch.float32), d, mode), current)
    # Invariant: the input at lo equals `current`; at hi it differs (where `changes`).
    hi = torch.full_like(lo, int(float32_bits(torch.tensor(s_max, dtype=torch.float32))))
    for _ in range(33):
        gap = hi - lo
        if int(gap.max()) <= 1:
            break
        mid = lo + gap // 2
        moved = ~bits_equal(perturb(x0, float32_from_bits(mid), d, mode), current)
        hi = torch.where(moved, mid, hi)
        lo = torch.where(moved, lo, mid)
    out = float32_from_bits(hi)
    return torch.where(changes & (s_from < s_max), out, torch.full_like(out, float("inf")))


class RayLattice:
    """The distinct float32 input states along rays, walked in increasing s.

    Keeps, per ray and coordinate, the next scale at which that coordinate changes (``frontier``,
    [R, n]). The next state of a ray is at the smallest entry of its row; only the coordinates
    that change there are advanced (one bisection each), so a new state costs O(changed
    coordinates), not O(n).
    """

    def __init__(self, x0: torch.Tensor, D: torch.Tensor, s_max: float, mode: Mode,
                 s_from: torch.Tensor | None = None) -> None:
        self.x0, self.D, self.s_max, self.mode = x0, D, float(s_max), mode
        if s_from is None:
            s_from = torch.zeros(D.shape[0], dtype=torch.float32, device=D.device)
        self.frontier = next_breakpoints(x0, D, s_from, s_max, mode)

    def advance(self, rays: torch.Tensor, count: int) -> torch.Tensor:
        """Pop the next ``count`` breakpoints of each ray in ``rays`` (indices [a]): [a, count] float32,
        ascending, +inf once a ray has no breakpoint left up to s_max."""
        nb = self.frontier[rays]
        out = torch.full((rays.shape[0], count), float("inf"), dtype=torch.float32, device=nb.device)
        for k in range(count):
            m = nb.min(dim=1).values
            out[:, k] = m
            r, i = torch.nonzero((nb == m[:, None]) & torch.isfinite(m)[:, None], as_tuple=True)
            if r.numel() == 0:
                break
            nb[r, i] = next_breakpoints(self.x0[i][:, None], self.D[rays[r], i][:, None], m[r], self.s_max,
                                        self.mode)[:, 0]
        self.frontier[rays] = nb
        return out


def ray_breakpoints(
    x0: torch.Tensor, d: torch.Tensor, s_from: torch.Tensor, s_max: float, mode: Mode, count: int
) -> torch.Tensor:
    """The next ``count`` distinct float32 scales in (s_from, s_max] at which each ray's input changes.

    x0 [n], d [R, n], s_from [R] float32. Returns [R, count] float32 sorted ascending, +inf-padded
    where fewer than ``count`` breakpoints exist up to s_max.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    lattice = RayLattice(x0, d, s_max, mode, s_from.reshape(-1))
    return lattice.advance(torch.arange(d.shape[0], device=d.device), count)
