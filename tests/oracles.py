"""Independent oracles, written without the kernels' algorithms (numpy, scans, loops)."""

from __future__ import annotations

import numpy as np


def g(x0: np.float32, s: np.ndarray, d: np.float32, mode: str) -> np.ndarray:
    """fl32(x0 + s*d) in numpy, for float32 scales ``s``."""
    s = np.asarray(s, dtype=np.float32)
    if mode == "fp32":
        return (np.float32(x0) + (s * np.float32(d)).astype(np.float32)).astype(np.float32)
    return (np.float64(x0) + s.astype(np.float64) * np.float64(d)).astype(np.float32)


def _bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).view(np.int32)


def coordinate_breakpoints(x0: float, d: float, s_max: float, mode: str, limit: int) -> list[np.float32]:
    """The float32 scales in (0, s_max] where fl32(x0 + s·d) changes, for one coordinate.

    For the current value c, the real solution of x0 + s·d = midpoint(c, next float32 after c)
    gives a candidate; a scan of ±64 float32 neighbours of it finds the exact first s where the
    value moves. The scan window must bracket the change, else the oracle raises.
    """
    x0, d = np.float32(x0), np.float32(d)
    if d == 0:
        return []
    direction = np.float32(np.inf if d > 0 else -np.inf)
    c = np.float32(x0)
    out: list[np.float32] = []
    s_max32 = np.float32(s_max)
    last = np.float32(0)
    while len(out) < limit:
        if _bits(g(x0, s_max32, d, mode)) == _bits(c):
            break
        nxt = np.nextafter(c, direction)
        mid = (np.float64(c) + np.float64(nxt)) / 2
        s_real = max((mid - np.float64(x0)) / np.float64(d), 0.0)
        center = np.float32(s_real).view(np.int32)
        start = max(int(center) - 64, int(last.view(np.int32)))
        if c == 0:  # from ±0 the first change can be a sign flip at a far smaller s than the midpoint's
            start = int(last.view(np.int32))
            if int(center) + 65 - start > 5_000_000:
                raise AssertionError("oracle scan from a zero coordinate too long; use a larger |d|")
        window = np.arange(start, int(center) + 65, dtype=np.int64)
        svals = window.astype(np.int32).view(np.float32)
        svals = svals[(svals > last) & (svals <= s_max32)]
        vals = g(x0, svals, d, mode)
        moved = _bits(vals) != _bits(c)
        if not moved.any():
            raise AssertionError(f"oracle window missed the change of x0={x0!r} d={d!r} from c={c!r}")
        k = int(np.argmax(moved))
        if k == 0 and svals[0] > np.nextafter(last, np.float32(np.inf)) and _bits(g(x0, np.nextafter(svals[0], np.float32(0)), d, mode)) != _bits(c):
            raise AssertionError("oracle window starts after the change")
        out.append(svals[k])
        c = vals[k]
        last = svals[k]
    return out


def ray_breakpoints(x0: np.ndarray, d: np.ndarray, s_max: float, mode: str, limit: int) -> np.ndarray:
    """All distinct breakpoints of a ray up to s_max (at most ``limit`` per coordinate), sorted."""
    allb: list[np.float32] = []
    for xi, di in zip(x0, d):
        allb.extend(coordinate_breakpoints(xi, di, s_max, mode, limit))
    return np.unique(np.array(allb, dtype=np.float32))  # breakpoints are positive: no signed zeros


def first_change_scan(states_out: np.ndarray, reference: np.ndarray, threshold: float) -> int:
    """Index of the first row of ``states_out`` that differs from ``reference`` (loop), or -1."""
    for k, row in enumerate(states_out):
        if threshold == 0.0:
            if row.tobytes() != reference.tobytes():
                return k
        elif np.max(np.abs(row.astype(np.float64) - reference.astype(np.float64))) > threshold:
            return k
    return -1
