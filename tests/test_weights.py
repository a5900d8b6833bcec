"""Weight statistics against numpy and dense SVD, on fresh random matrices and random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import weights as W
from randmodels import SESSION_SEED



def _matrix(seed: int, shape=(37, 53)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=shape) * 0.05 + 0.01).astype(np.float32)  # heavy tails, non-zero mean


def test_stats_match_numpy_on_a_random_matrix():
    a = _matrix(SESSION_SEED)
    st = W.matrix_stats(torch.from_numpy(a))
    x = a.astype(np.float64).ravel()
    c = x - x.mean()
    m2 = (c ** 2).mean()
    assert (st["rows"], st["cols"]) == a.shape
    assert st["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert st["std"] == pytest.approx(x.std(), rel=1e-12)
    assert st["skew"] == pytest.approx((c ** 3).mean() / m2 ** 1.5, rel=1e-10)
    assert st["kurtosis"] == pytest.approx((c ** 4).mean() / m2 ** 2 - 3, rel=1e-10)
    assert (st["min"], st["max"]) == (x.min(), x.max())
    assert st["frac_pos"] == pytest.approx((x > 0).mean()) and st["frac_neg"] == pytest.approx((x < 0).mean())
    for q in W.PERCENTILES:
        assert st[f"abs_p{q:g}"] == pytest.approx(np.percentile(np.abs(x), q), rel=1e-12)
    for b in W.MAGNITUDE_BINS:
        assert st[f"frac_abs_lt_{b:g}"] == pytest.approx((np.abs(x) < b).mean())
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert st["fro"] == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert st["spectral"] == pytest.approx(s[0], rel=1e-12)
    assert st["nuclear"] == pytest.approx(s.sum(), rel=1e-12)


@pytest.mark.parametrize("shape", [(40, 30), (30, 64), (64, 64)])
def test_power_iteration_matches_dense_svd(shape):
    a = _matrix(SESSION_SEED + sum(shape), shape).astype(np.float64)
    s = np.linalg.svd(a, compute_uv=False)
    got = W.spectral_norm_power(torch.from_numpy(a), tol=1e-12, max_iter=20_000)
    assert got == pytest.approx(s[0], rel=1e-8)
    st = W.matrix_stats(torch.from_numpy(a), spectral="power")
    assert st["spectral"] == pytest.approx(s[0], rel=1e-6) and np.isnan(st["nuclear"])


def test_power_iteration_raises_when_not_converged():
    a = torch.from_numpy(_matrix(SESSION_SEED, (50, 50)).astype(np.float64))
    with pytest.raises(W.PowerIterationError, match="did not converge"):
        W.spectral_norm_power(a, max_iter=2)


def test_percentiles_beyond_one_sort_match_numpy():
    v = np.random.default_rng(SESSION_SEED).standard_normal(1001)
    qs = (0.0, 0.1, 33.3, 50.0, 99.99, 100.0)
    assert W.percentiles(torch.from_numpy(v), qs) == pytest.approx(np.percentile(v, qs), rel=1e-14)


def test_table_covers_every_layer_and_projection(handle):
    t = W.weight_statistics(handle, progress=False)
    names = W.projections(handle)
    assert len(t) == handle.n_layers * len(names)
    assert list(t.projection[: len(names)]) == list(names)
    for _, row in t.iterrows():  # every row equals the direct module weight's statistics
        mod = handle.stage_module(int(row.layer), row.projection)
        w = mod.weight.detach().double().numpy()
        assert {row.rows, row.cols} == set(w.shape)
        assert row.fro == pytest.approx(np.linalg.norm(w), rel=1e-12)
        assert row.spectral == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-10)
    if handle.adapter.family == "gpt2":  # Conv1D [in, out] is turned into [out, in]
        q = t[t.projection == "qkv"].iloc[0]
        assert (q.rows, q.cols) == (3 * handle.d_model, handle.d_model)


def test_weight_sample(handle):
    w = W.weight_matrix(handle, 0, "o")
    full = W.weight_sample(handle, 0, "o", n=10**9)
    assert np.array_equal(np.sort(full), np.sort(w.double().numpy().ravel()))
    part = W.weight_sample(handle, 0, "o", n=50, seed=SESSION_SEED)
    assert part.shape == (50,) and np.isin(part, full).all()


def test_bad_inputs(handle):
    with pytest.raises(IndexError, match="out of range"):
        W.weight_matrix(handle, handle.n_layers, "o")
    with pytest.raises(IndexError, match="out of range"):
        W.weight_statistics(handle, layers=[-handle.n_layers - 1], progress=False)
    with pytest.raises(KeyError, match="unknown projection"):
        W.weight_matrix(handle, 0, "act")
    with pytest.raises(KeyError, match="unknown projection"):
        W.weight_statistics(handle, stages=["nope"], progress=False)
    with pytest.raises(ValueError, match="at least one layer"):
        W.weight_statistics(handle, layers=[], progress=False)
    with pytest.raises(ValueError, match="unknown spectral"):
        W.matrix_stats(torch.ones(3, 3), spectral="lanczos")
    with pytest.raises(ValueError, match="non-empty 2-D"):
        W.matrix_stats(torch.ones(3))
