"""Determinism and batch-invariance audits, KV cache check, and amplification against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import amplification as A
from instab_core import numerics as N
from randmodels import SESSION_SEED, random_model_dir

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return ic.load_model(random_model_dir(tmp_path_factory.mktemp("llama"), "llama"))


def _rows(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen) * torch.logspace(-3, 3, d)  # a wide dynamic range: rounding order matters
    comp = torch.randn(64, d, generator=gen)
    return X, comp


W_PLANT = torch.randn(4096, 16, generator=torch.Generator().manual_seed(SESSION_SEED))


def chunked_sum(X: torch.Tensor) -> torch.Tensor:
    """Planted non-invariant op: x·w summed in float32 chunks whose size depends on the batch size."""
    chunk = X.shape[0] + 1
    terms = X[:, :, None] * W_PLANT[None]  # [n, d, 16]
    out = torch.zeros(X.shape[0], W_PLANT.shape[1])
    for s in range(0, X.shape[1], chunk):
        out = out + terms[:, s:s + chunk].sum(dim=1)
    return out


def rowwise_sum(X: torch.Tensor) -> torch.Tensor:
    """Invariant op: every row reduced on its own, in a fixed order."""
    return torch.stack([(x[:, None] * W_PLANT).sum(dim=0) for x in X])


def test_audit_finds_a_planted_batch_size_dependent_reduction():
    X, comp = _rows(3, 4096, SESSION_SEED)
    t = N.invariance_table(chunked_sum, X, comp, batch_sizes=(1, 2, 5, 16), positions=("first", "last"))
    assert t[t.batch_size == 1].invariant.all()
    bigger = t[t.batch_size > 1]
    assert not bigger.invariant.any() and (bigger.max_abs_diff > 0).all()
    assert (bigger.equal_rows == 0).all()


def test_audit_passes_an_invariant_op():
    X, comp = _rows(3, 4096, SESSION_SEED + 1)
    t = N.invariance_table(rowwise_sum, X, comp, batch_sizes=(1, 2, 5, 16), positions=("first", "middle", "last", 3))
    assert t.invariant.all() and (t.max_abs_diff == 0).all()
    assert set(t[t.batch_size == 16].position) == {0, 3, 8, 15}
    assert set(t[t.batch_size == 2].position) == {0, 1}  # integer position 3 does not exist in a batch of 2


def test_thread_counts_are_restored_and_tabulated():
    before = torch.get_num_threads()
    X, comp = _rows(2, 64, SESSION_SEED)
    t = N.invariance_table(lambda Z: Z @ W_PLANT[:64], X, comp, batch_sizes=(1, 4),
                           threads=[1, 2])
    assert torch.get_num_threads() == before
    assert sorted(t.threads.unique()) == [1, 2]
    assert (t[t.threads == 1].equal_rows_vs_first_threads == 2).all()


def test_probe_table_per_dtype_and_old_audit_still_work(llama, tmp_path):
    h64 = ic.load_model(llama.path, dtype="float64")
    probes = [ic.Probe(llama, PROMPT, batch_size=4), ic.Probe(h64, PROMPT, batch_size=4)]
    t = N.probe_invariance_table(probes, rows=2, batch_sizes=(1, 3), seed=SESSION_SEED)
    assert set(t.dtype) == {"float32", "float64"}
    assert len(t) == 2 * (1 + 3)
    audit = N.batch_invariance_audit(probes[0])
    assert isinstance(audit, N.BatchAudit) and audit.rows == 4


def test_invariance_table_bad_inputs():
    X, comp = _rows(2, 4096, 0)
    with pytest.raises(ValueError, match="empty batch_sizes"):
        N.invariance_table(rowwise_sum, X, comp, batch_sizes=())
    with pytest.raises(ValueError, match="unknown position"):
        N.invariance_table(rowwise_sum, X, comp, batch_sizes=(2,), positions=("centre",))
    with pytest.raises(ValueError, match="companion rows"):
        N.invariance_table(rowwise_sum, X, comp[:3], batch_sizes=(8,))
    with pytest.raises(ValueError, match="at least one row"):
        N.invariance_table(rowwise_sum, X[:0], comp, batch_sizes=(2,))


def test_chain_is_bit_identical_in_process_and_across_processes():
    t = N.chain_determinism(dim=32, depth=4, dtype="bfloat16", seed=SESSION_SEED % 1000)
    assert list(t.comparison) == ["in-process run 2 vs run 1", "subprocess vs run 1"]
    assert t.identical.all() and (t.differing == 0).all()
    assert not torch.are_deterministic_algorithms_enabled()  # restored


def test_compare_tensors_sees_one_ulp():
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(SESSION_SEED))
    b = a.clone()
    b[2, 3] = torch.nextafter(b[2, 3], torch.tensor(np.inf))
    r = N.compare_tensors(a, b)
    assert not r["identical"] and r["differing"] == 1
    assert r["max_abs_diff"] == pytest.approx(abs(float(b[2, 3].double() - a[2, 3].double())), rel=0)
    assert N.compare_tensors(a, a.clone())["identical"]
    assert not N.compare_tensors(a, a.double())["identical"]


def test_kv_cache_check_matches_full_forward_closely(llama):
    ids = llama.encode(PROMPT)
    L = ids.shape[0]
    t = N.kv_cache_check(llama, PROMPT, prefix_lengths=[1, L // 2, L - 1])
    assert list(t.steps) == [L - 1, L - L // 2, 1]
    assert (t.max_abs_diff < 1e-4).all()
    assert (t.bitwise_equal == (t.max_abs_diff == 0)).all()
    full = llama.model(input_ids=ids[None], use_cache=False).logits[0, -1]
    assert (t.argmax_full == int(full.argmax())).all()
    with pytest.raises(ValueError, match="out of range"):
        N.kv_cache_check(llama, PROMPT, prefix_lengths=[L])
    with pytest.raises(ValueError, match="empty"):
        N.kv_cache_check(llama, PROMPT, prefix_lengths=[])


# --- amplification -----------------------------------------------------------------------------

def test_ratio_divides_by_the_realised_change():
    rng = np.random.default_rng(SESSION_SEED)
    n = 48
    W = rng.standard_normal((20, n)).astype(np.float32)
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    d = rng.standard_normal(n)
    d /= np.linalg.norm(d)
    eps = [1e-3, 1e-6, 3e-7, 1e-8, 1e-12]
    Wt = torch.from_numpy(W)

    def f(X):  # one row at a time, so the oracle's batch shape cannot change a bit
        return torch.stack([Wt @ row for row in X])

    t = A.realised_amplification(f, torch.from_numpy(x), torch.from_numpy(d), eps)
    for k, e in enumerate(eps):  # by hand, in numpy
        xp = (x.astype(np.float64) + e * d).astype(np.float32)
        dx = np.linalg.norm(xp.astype(np.float64) - x.astype(np.float64))
        dy = np.linalg.norm((Wt @ torch.from_numpy(xp)).double().numpy() - (Wt @ torch.from_numpy(x)).double().numpy())
        assert t.realised_dx[k] == pytest.approx(dx, rel=1e-15)
        assert t.intended_dx[k] == pytest.approx(e, rel=1e-12)
        assert t.changed_coords[k] == int((xp != x).sum())
        if dx == 0:
            assert np.isnan(t.ratio[k]) and t.dy[k] == 0
        else:
            assert t.ratio[k] == pytest.approx(dy / dx, rel=1e-12)
            assert t.ratio_intended[k] == pytest.approx(dy / e, rel=1e-12)
    assert np.isnan(t.ratio.iloc[-1])  # 1e-12 on |x| ~ 10: the input does not change at all
    moved = t[(t.realised_dx > 0)]
    assert (np.abs(moved.realised_dx / moved.intended_dx - 1) > 1e-3).any()  # the seed's denominator is wrong there


def test_linear_ratio_is_bounded_by_the_spectral_norm_at_large_eps():
    rng = np.random.default_rng(SESSION_SEED + 2)
    W = torch.from_numpy(rng.standard_normal((30, 40)))  # float64: no rounding of consequence at eps 1e-3
    x0 = torch.from_numpy(rng.standard_normal(40))
    t = A.linear_amplification(W, x0, [1e-2, 1e-3])
    smax = float(np.linalg.svd(W.numpy(), compute_uv=False)[0])
    assert (t.ratio <= smax * (1 + 1e-9)).all()
    assert t.ratio.to_numpy() == pytest.approx(t.linear_gain.to_numpy(), rel=1e-6)


def test_mlp_function_matches_the_modules(llama):
    layer = llama.layers[1]
    X = torch.randn(5, llama.d_model, generator=torch.Generator().manual_seed(SESSION_SEED))
    with torch.no_grad():
        plain = layer.mlp(X[:, None])[:, 0]
        normed = layer.mlp(layer.post_attention_layernorm(X[:, None]))[:, 0]
        assert torch.equal(A.mlp_function(llama, 1, False)(X), plain)
        assert torch.equal(A.mlp_function(llama, 1, True)(X), normed)
    t = A.mlp_amplification(llama, X[0], [1e-3, 1e-30], layer=1)
    assert list(t.norm) == [False, False, True, True] and np.isnan(t.ratio.iloc[1])


def test_chain_amplification_gain_and_bad_inputs(llama):
    t = A.chain_amplification(dim=16, depth=3, weight_scale=0.5, eps=[1e-2], dtype=torch.float64)
    assert t.ratio[0] == pytest.approx(t.linear_gain[0], rel=1e-9)
    with pytest.raises(ValueError, match="empty ε list"):
        A.chain_amplification(dim=8, eps=[])
    with pytest.raises(ValueError, match="positive"):
        A.realised_amplification(lambda X: X, torch.ones(3), torch.ones(3), [0.0])
    with pytest.raises(IndexError, match="out of range"):
        A.mlp_function(llama, llama.n_layers)
    with pytest.raises(ValueError, match="does not act"):
        A.linear_amplification(torch.ones(3, 4), torch.ones(5))
