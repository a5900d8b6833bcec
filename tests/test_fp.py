"""fp helpers against numpy, and the ray breakpoints against an independent oracle."""

import numpy as np
import pytest
import torch

from instab_core import fp
from oracles import g, ray_breakpoints
from randmodels import SESSION_SEED


@pytest.fixture
def rng():
    return np.random.default_rng(SESSION_SEED)


def _interesting(rng, dtype):
    finfo = np.finfo(dtype)
    special = np.array([0.0, -0.0, finfo.tiny, -finfo.tiny, finfo.smallest_subnormal, 1.0, -1.0, 2.0, 0.5,
                        finfo.max / 2], dtype=dtype)
    random = (rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500)).astype(dtype)
    return np.concatenate([special, random])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_next_up_down_and_ulp_match_numpy(rng, dtype):
    x = _interesting(rng, dtype)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(fp.next_up(t).numpy(), np.nextafter(x, dtype(np.inf)))
    np.testing.assert_array_equal(fp.next_down(t).numpy(), np.nextafter(x, dtype(-np.inf)))
    np.testing.assert_array_equal(fp.ulp(t).numpy(), np.spacing(np.abs(x)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ordered_int_counts_representable_values(rng, dtype):
    x = _interesting(rng, dtype)
    t = torch.from_numpy(x)
    up = torch.from_numpy(np.nextafter(x, dtype(np.inf)))
    finite_up = torch.isfinite(up)
    steps = fp.ordered_int(up) - fp.ordered_int(t)
    # one representable step is one integer, except -0 -> smallest subnormal, which is +0 -> subnormal
    assert torch.all(steps[finite_up] == 1)
    order = np.argsort(x, kind="stable")
    ints = fp.ordered_int(t).numpy()[order]
    assert np.all(np.diff(ints) >= 0)
    assert fp.ordered_int(torch.tensor([0.0, -0.0], dtype=t.dtype)).tolist() == [0, 0]


def test_ulp_distance_matches_nextafter_walk(rng):
    a = rng.standard_normal(50).astype(np.float32)
    k = rng.integers(0, 40, 50)
    b = a.copy()
    for i in range(50):
        for _ in range(k[i]):
            b[i] = np.nextafter(b[i], np.float32(np.inf))
    assert fp.ulp_distance(torch.from_numpy(a), torch.from_numpy(b)).tolist() == k.tolist()


def test_bits_equal_distinguishes_signed_zero():
    assert not bool(fp.bits_equal(torch.tensor(0.0), torch.tensor(-0.0)))
    assert bool(fp.bits_equal(torch.tensor(1.5), torch.tensor(1.5)))


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_perturb_matches_numpy_arithmetic(rng, mode):
    x0 = (rng.standard_normal(64) * 0.05).astype(np.float32)
    d = rng.standard_normal(64).astype(np.float32)
    for s in np.float32([1e-9, 3.3e-7, 1e-3]):
        got = fp.perturb(torch.from_numpy(x0), torch.tensor(s), torch.from_numpy(d), mode).numpy()
        want = np.array([g(x, s, di, mode) for x, di in zip(x0, d)])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_ray_breakpoints_match_oracle(rng, mode):
    n = 12
    x0 = (rng.standard_normal(n) * 0.05).astype(np.float32)
    x0[0] = 0.0  # a zero coordinate flips at the first subnormal step
    x0[1] = np.float32(2.0 ** -6)  # a power of two: the lattice below is twice as fine
    D = rng.standard_normal((3, n)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    D[2, 0] = 0.0  # a coordinate that never moves
    s_max = 2e-8
    count = 10
    got = fp.ray_breakpoints(torch.from_numpy(x0), torch.from_numpy(D), torch.zeros(3), s_max, mode, count).numpy()
    for r in range(3):
        want = ray_breakpoints(x0, D[r], s_max, mode, count)[:count]
        fin = got[r][np.isfinite(got[r])]
        np.testing.assert_array_equal(fin, want)


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_first_breakpoint_is_first_input_change_by_direct_scan(rng, mode):
    """s_in: the input equals x0 at every float32 s scanned below it and differs at it."""
    x0 = (rng.standard_normal(32) * 0.05).astype(np.float32)
    d = rng.standard_normal(32).astype(np.float32)
    d /= np.linalg.norm(d)
    s_in = fp.ray_breakpoints(torch.from_numpy(x0), torch.from_numpy(d)[None], torch.zeros(1), 1.0, mode, 1)[0, 0]
    s_in = np.float32(s_in)
    below = np.arange(max(1, int(s_in.view(np.int32)) - 200_000), int(s_in.view(np.int32)), dtype=np.int64)
    svals = np.concatenate([below.astype(np.int32).view(np.float32),
                            rng.uniform(0, float(s_in), 2000).astype(np.float32)])
    svals = svals[svals < s_in]
    states = np.stack([g(xi, svals, di, mode) for xi, di in zip(x0, d)], axis=1)
    assert (states.view(np.int32) == x0.view(np.int32)).all()
    assert (np.array([g(xi, s_in, di, mode) for xi, di in zip(x0, d)]).view(np.int32) != x0.view(np.int32)).any()


def test_next_breakpoints_is_inf_when_nothing_moves():
    x0 = torch.tensor([1.0, 2.0])
    d = torch.tensor([[1.0, 0.0]])
    b = fp.next_breakpoints(x0, d, torch.zeros(1), 1e-12, "fp32")
    assert torch.isinf(b).all()
