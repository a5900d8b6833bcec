"""Decision geometry: tie points, flip scans, logit-gap grids and their statistics, against independent oracles.

Oracles: numpy float arithmetic for the inputs, one-row evaluations for the cells, brute-force scans for the
first flips, and plain Python loops for every grid statistic, on fresh random inputs (session seed).
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import decision as dc
from instab_core import fp
from randmodels import SESSION_SEED, random_model_dir

PROMPT = "The capital of France is"
RNG = np.random.default_rng(SESSION_SEED)



@pytest.fixture(scope="module")
def probe(handle):
    return ic.Probe(handle, PROMPT, target="logits", batch_size=8)


@pytest.fixture(scope="module")
def tie(probe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dc.tie_point(probe)


def _gaps(probe, X, t1, t2):
    out = probe.forward(torch.as_tensor(X))
    return (out[:, t1] - out[:, t2]).numpy()


def _assert_float_tie(probe, res):
    """G(x) == 0, or x and its partner differ by one ULP in one coordinate and G changes sign between them."""
    x = res.x.numpy()
    gx, gp = _gaps(probe, np.stack([x, res.partner.numpy()]), res.t1, res.t2)
    assert gx == res.gap
    if gx == 0:
        return
    p = res.partner.numpy()
    moved = np.flatnonzero(x.view(np.int32) != p.view(np.int32))
    assert moved.tolist() == [res.partner_coord]
    i = moved[0]
    assert p[i] in (np.nextafter(x[i], np.float32(np.inf)), np.nextafter(x[i], np.float32(-np.inf)))
    assert float(gx) * float(gp) < 0


# --- tie points ---------------------------------------------------------------------------------


def test_root_tie_is_a_float32_tie(probe, tie):
    assert tie.method == "root" and tie.exact_tie
    _assert_float_tie(probe, tie)
    assert set(tie.top2_at_x) == {tie.t1, tie.t2}  # the tied pair is the top-2 there
    assert tie.evals.rows > 0 and tie.evals.backward > 0
    assert tie.distance > 0 and math.isclose(tie.distance, float((tie.x.double() - probe.x0.double()).norm()))


def test_root_tie_converges_to_the_nearest_point_condition(probe, tie):
    if tie.converged:
        assert tie.alignment < -0.999  # x − x0 is antiparallel to ∇G at the tie (G decreases from x0)
    else:
        assert "not met" in tie.message


def test_root_tie_on_the_bundled_model():
    """The bundled model is confident (top-1/top-2 gap ≈ 5.9): the search must genuinely move x."""
    h = ic.load_model("tiny-llama")
    probe = ic.Probe(h, PROMPT, target="logits", batch_size=64)
    res = dc.tie_point(probe)
    assert res.exact_tie and res.converged and not res.pair_changed
    assert res.tokens[res.t1] == " Paris"
    assert res.lower_bound > 0.1 and 0.5 * res.lower_bound < res.distance < 2 * res.lower_bound
    _assert_float_tie(probe, res)
    near = dc.nearest_tokens(probe, res.x, k=2)
    assert near.distance.iloc[0] == pytest.approx(res.distance)  # nearest real token: x0's own (" is")


def test_pair_change_repick_and_stop(tmp_path):
    """Find a fixed case where the argmax first moves to a third token; 'stop' raises, 'repick' records it."""
    found = 0
    for seed in range(12):
        h = ic.load_model(random_model_dir(tmp_path / f"m{seed}", "llama", seed=seed))
        for text in (PROMPT, "Hello world", "abc"):
            probe = ic.Probe(h, text, target="logits", batch_size=8)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dc.tie_point(probe, pair_policy="stop")
                continue
            except dc.TieSearchError as e:
                assert "top-2 pair changed" in str(e) and "repick" in str(e)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = dc.tie_point(probe, pair_policy="repick")
            assert res.pair_changed and res.events and "re-picked" in res.events[0]
            assert res.t2 != res.pair_start[1] and res.t1 == res.pair_start[0]
            assert set(res.top2_at_x) == {res.t1, res.t2}
            _assert_float_tie(probe, res)
            found += 1
            break
        if found >= 2:
            break
    assert found >= 1, "no pair change in 36 fixed cases (2 of the first 18 change on torch 2.13)"


def test_tie_search_that_cannot_converge_reports(probe):
    with pytest.raises(dc.TieSearchError, match="no decision boundary"):
        dc.tie_point(probe, max_scale=1e-6)
    with pytest.raises(dc.TieSearchError, match="not converged"):
        dc.tie_point(probe, method="adam_geometric", iterations=3)
    res = dc.tie_point(probe, method="adam_geometric", iterations=3, strict=False)
    assert not res.converged and not res.exact_tie and "not converged after 3 iterations" in res.message
    res = dc.tie_point(probe, method="adam_direct", iterations=3, strict=False)
    assert not res.converged and len(res.history) == 3


def test_adam_keeps_the_best_iterate(probe):
    res = dc.tie_point(probe, method="adam_geometric", iterations=20, strict=False)
    hist = res.history
    best = hist.objective.abs().idxmin()
    assert res.distance == pytest.approx(hist.distance[best], rel=1e-6)


def test_bad_tie_arguments(probe):
    with pytest.raises(ValueError, match="unknown tie method"):
        dc.tie_point(probe, method="newton")
    with pytest.raises(ValueError, match="pair_policy"):
        dc.tie_point(probe, pair_policy="ignore")


# --- flip scans -----------------------------------------------------------------------------------


def _brute_force_first_flips(probe, x, d, eps):
    """One row per ε (padded into the same batch shape), inputs in numpy float32, first flips by loops."""
    ref = int(probe.forward(torch.from_numpy(x)[None])[0].argmax())
    tokens = []
    for e in eps:
        X = (x + (np.float32(e) * d).astype(np.float32)).astype(np.float32)
        tokens.append(int(probe.forward(torch.from_numpy(X)[None])[0].argmax()))
    pos = neg = np.nan
    for e, t in zip(eps, tokens):
        if e > 0 and t != ref:
            pos = float(e)
            break
    for e, t in zip(eps[::-1], tokens[::-1]):
        if e < 0 and t != ref:
            neg = float(e)
            break
    return tokens, pos, neg


def test_flip_scan_first_flips_match_brute_force(probe, tie):
    x = tie.x.numpy()
    D = RNG.standard_normal((2, probe.d))
    D = (D / np.linalg.norm(D, axis=1, keepdims=True)).astype(np.float32)
    g = dc.gap_gradient(probe, tie.x, tie.t1, tie.t2)
    D[1] = (g / g.norm()).numpy()
    eps = dc.eps_grid(3e-6, 1e-7)
    scan = dc.flip_scan(probe, tie.x, torch.from_numpy(D), eps, names=["random", "gradient"])
    table = scan.first_flips()
    for k in range(2):
        tokens, pos, neg = _brute_force_first_flips(probe, x, D[k], eps)
        np.testing.assert_array_equal(scan.tokens[k], tokens)
        np.testing.assert_equal(table["first flip ε > 0"][k], pos)
        np.testing.assert_equal(table["first flip ε < 0"][k], neg)
        flipped = np.flatnonzero(np.array(tokens) != scan.reference_token)
        np.testing.assert_equal(table["seed's first flip (most negative ε)"][k], eps[flipped[0]] if flipped.size else np.nan)
    assert scan.reference_token == int(probe.forward(tie.x[None])[0].argmax())
    assert len(scan.table()) == 2 * len(eps)


def test_eps_grid_is_the_seeds_with_an_exact_zero():
    e = dc.eps_grid(1e-6, 1e-9)
    assert len(e) == 2001 and e[1000] == 0 and e.dtype == np.float32
    np.testing.assert_allclose(e, np.arange(-1e-6, 1e-6 + 1e-9, 1e-9).astype(np.float32), atol=1e-15)


def test_flip_scan_rejects_zero_direction(probe):
    with pytest.raises(ValueError, match="zero norm"):
        dc.flip_scan(probe, probe.x0, torch.zeros(1, probe.d), dc.eps_grid(1e-6, 1e-7))


# --- grids ----------------------------------------------------------------------------------------


def _directions(probe, k=2):
    D = RNG.standard_normal((k, probe.d))
    return (D / np.linalg.norm(D, axis=1, keepdims=True)).astype(np.float32)


def _numpy_inputs(x, h1, h2, a, b, mode):
    if mode == "fp32":
        return np.stack([((x + ai * h1) + bj * h2).astype(np.float32) for ai in a for bj in b])
    return np.stack([(x.astype(np.float64) + np.float64(ai) * h1.astype(np.float64) + np.float64(bj) * h2.astype(np.float64)
                      ).astype(np.float32) for ai in a for bj in b])


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_grid_cells_equal_direct_evaluations(probe, tie, mode):
    x = tie.x.numpy()
    h1, h2 = _directions(probe)
    a = dc.grid_axis(-3e-6, 3e-6, n=9)
    b = dc.grid_axis(-2e-6, 4e-6, n=7)
    grid = dc.gap_grid(probe, tie.x, torch.from_numpy(h1), torch.from_numpy(h2), a, b, pair=(tie.t1, tie.t2), mode=mode)
    X = _numpy_inputs(x, h1, h2, a, b, mode)
    assert grid.G.shape == (9, 7) and grid.G.dtype == np.float32
    cells = RNG.choice(X.shape[0], size=12, replace=False)
    for r in cells:
        i, j = divmod(int(r), 7)
        one = probe.forward(torch.from_numpy(X[r])[None])[0]  # the same cell alone, in the same batch shape
        assert np.float32(one[tie.t1] - one[tie.t2]) == grid.G[i, j]
        assert int(one.argmax()) == grid.top[i, j]
    audit = ic.numerics.batch_invariance_audit(probe)
    if audit.batch_invariant:  # rows are batch invariant here: batch-1 evaluations must agree too
        for r in cells[:4]:
            one = probe.f_batch(torch.from_numpy(X[r])[None])[0]
            assert np.float32(one[tie.t1] - one[tie.t2]) == grid.G[divmod(int(r), 7)]
    # otherwise only the same batch shape is bitwise comparable (checked above); the audit says so


def test_grid_state_labels_are_the_distinct_inputs(probe, tie):
    h1, h2 = _directions(probe)
    # scales of a few ULPs of x's finest coordinate, so that many cells share an input
    x = tie.x.numpy()
    ulp = np.spacing(np.abs(x))
    span = 3 * float(np.min(ulp / np.maximum(np.abs(h1), np.abs(h2))))
    a = dc.grid_axis(-span, span, n=11)
    b = dc.grid_axis(-span / 2, span, n=9)
    grid = dc.gap_grid(probe, tie.x, torch.from_numpy(h1), torch.from_numpy(h2), a, b, pair=(tie.t1, tie.t2))
    X = _numpy_inputs(tie.x.numpy(), h1, h2, a, b, "fp32")
    _, oracle = np.unique(X.view(np.int32), axis=0, return_inverse=True)
    kernel = grid.state.ravel()
    pairs = set(zip(oracle.ravel().tolist(), kernel.tolist()))
    assert len(pairs) == len(set(oracle.ravel().tolist())) == len(set(kernel.tolist())) == grid.n_states
    assert kernel[0] == 0 and grid.n_states < X.shape[0]
    summary = dc.lattice_summary(grid)
    assert summary["sign flips with the same input"] == 0 and summary["G differs with the same input"] == 0


def test_grid_linear_prediction(probe, tie):
    h1, h2 = _directions(probe)
    a = dc.grid_axis(-1e-3, 1e-3, n=5)
    grid = dc.gap_grid(probe, tie.x, torch.from_numpy(h1), torch.from_numpy(h2), a, a, pair=(tie.t1, tie.t2),
                       linear=True)
    g = dc.gap_gradient(probe, tie.x, tie.t1, tie.t2).double().numpy()
    X = _numpy_inputs(tie.x.numpy(), h1, h2, a, a, "fp32").astype(np.float64)
    expect = grid.gap_center + (X - tie.x.numpy().astype(np.float64)) @ g
    np.testing.assert_allclose(grid.G_lin.ravel(), expect, rtol=1e-12, atol=1e-15)


def test_grid_is_chunked_and_spills_to_disk(probe, tie, tmp_path):
    h1, h2 = (torch.from_numpy(v) for v in _directions(probe))
    a = dc.grid_axis(-1e-6, 1e-6, n=23)
    b = dc.grid_axis(-1e-6, 1e-6, n=19)
    big = dc.gap_grid(probe, tie.x, h1, h2, a, b)
    small = dc.gap_grid(probe, tie.x, h1, h2, a, b, memory_bytes=1)
    assert big.chunks == 1 and small.chunk_rows == probe.batch_size
    assert small.chunks == math.ceil(23 * 19 / probe.batch_size)
    np.testing.assert_array_equal(big.G.view(np.int32), small.G.view(np.int32))
    np.testing.assert_array_equal(big.state, small.state)
    with pytest.raises(MemoryError, match="out_dir"):
        dc.gap_grid(probe, tie.x, h1, h2, a, b, max_result_bytes=1000)
    disk = dc.gap_grid(probe, tie.x, h1, h2, a, b, max_result_bytes=1000, memory_bytes=1, out_dir=tmp_path)
    assert isinstance(disk.G, np.memmap) and (tmp_path / "G.npy").is_file() and not (tmp_path / "hash.npy").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "G.npy").view(np.int32), big.G.view(np.int32))
    np.testing.assert_array_equal(np.asarray(disk.state), big.state)


# --- the grid's fast rows (prefix run once, lm_head blocks) against the plain rows ------------------


def _grids_equal(fast, plain):
    np.testing.assert_array_equal(np.asarray(fast.G).view(np.int32), np.asarray(plain.G).view(np.int32))
    np.testing.assert_array_equal(fast.top, plain.top)
    np.testing.assert_array_equal(fast.state, plain.state)
    assert fast.n_states == plain.n_states and fast.gap_center == plain.gap_center
    if plain.G_lin is not None:
        np.testing.assert_array_equal(fast.G_lin, plain.G_lin)


@pytest.mark.parametrize("position", [-1, 9, 0])
@pytest.mark.parametrize("scale", [1e-6, 3e-1])
def test_grid_fast_rows_equal_the_plain_rows(handle, position, scale):
    """The default (fast) grid equals fast=False bit for bit, and each cell equals the cell alone through
    probe.forward; on the CPU the prefix route (all but position 0) and the head route (32-column blocks of a
    98-token vocabulary) must actually run. scale 3e-1 moves the argmax off the pair: uncertified batches."""
    probe = ic.Probe(handle, PROMPT, position=position, target="logits", batch_size=8)
    x = probe.x0 + torch.from_numpy(RNG.standard_normal(probe.d).astype(np.float32)) * 1e-3
    h1, h2 = (torch.from_numpy(v) for v in _directions(probe))
    a = dc.grid_axis(-scale, scale, n=int(RNG.integers(5, 12)))
    b = dc.grid_axis(-scale / 2, scale, n=int(RNG.integers(5, 12)))
    t1, t2 = dc.top2(probe.forward(x[None])[0])
    fast = dc.gap_grid(probe, x, h1, h2, a, b, pair=(t1, t2), linear=True, head_block=32)
    plain = dc.gap_grid(probe, x, h1, h2, a, b, pair=(t1, t2), linear=True, fast=False)
    _grids_equal(fast, plain)
    assert plain.path["prefix"] == plain.path["head"] == "fast=False"
    if probe.x0.device.type == "cpu":
        assert fast.path["prefix"] == ("used" if probe.position > 0 else "no prefix (position 0)")
        assert fast.path["head"] == "used" and fast.path["head_columns"] < 98
        assert fast.path["tokens_per_row"] == len(probe.ids) - probe.position if probe.position else len(probe.ids)
    X = _numpy_inputs(x.numpy(), h1.numpy(), h2.numpy(), a, b, "fp32")
    for r in RNG.choice(X.shape[0], size=6, replace=False):
        i, j = divmod(int(r), len(b))
        one = probe.forward(torch.from_numpy(X[r])[None])[0]
        assert np.float32(one[t1] - one[t2]) == fast.G[i, j] and int(one.argmax()) == fast.top[i, j]
    outside = ~np.isin(plain.top, np.concatenate([np.arange(c * 32, c * 32 + 32) for c in {t1 // 32, t2 // 32}]))
    if outside.any() and fast.path["head"] == "used":  # argmax off the pair's blocks: the full head on those batches
        assert fast.path["full_head_batches"] > 0 and fast.path["plain_batches"] == 2  # the reference, the verified


def test_grid_fast_rows_with_a_pair_that_is_not_the_top(probe, tie):
    """A pair below the reference's top 2 (its blocks are added to the pair's): still the plain rows."""
    ref = probe.forward(tie.x[None])[0]
    order = ref.argsort(descending=True).tolist()
    pair = (order[5], order[40])
    h1, h2 = (torch.from_numpy(v) for v in _directions(probe))
    a = dc.grid_axis(-1e-2, 1e-2, n=9)
    fast = dc.gap_grid(probe, tie.x, h1, h2, a, a, pair=pair, head_block=4)
    _grids_equal(fast, dc.gap_grid(probe, tie.x, h1, h2, a, a, pair=pair, fast=False))


def test_grid_fast_routes_that_differ_are_not_used(probe, tie, monkeypatch):
    """A route that changes one bit of the first batch is rejected there; the grid stays the plain rows, and the
    eager attention override never outlives a call."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    h1, h2 = (torch.from_numpy(v) for v in _directions(probe))
    a = dc.grid_axis(-1e-6, 1e-6, n=7)
    plain = dc.gap_grid(probe, tie.x, h1, h2, a, a, fast=False)
    real_prefix, real_head = dc._GridRows.prefix_hidden, dc._GridRows.head_blocks

    def nudged(f):
        def g(self, H):
            out = f(self, H).clone()
            out.view(torch.int32)[-1, 0] ^= 1  # one ULP in one entry of the last row
            return out
        return g

    monkeypatch.setattr(dc._GridRows, "prefix_hidden", nudged(real_prefix))
    g = dc.gap_grid(probe, tie.x, h1, h2, a, a, head_block=4)
    assert g.path["prefix"] == "not bitwise equal to the plain rows" and g.path["tokens_per_row"] == len(probe.ids)
    _grids_equal(g, plain)
    monkeypatch.setattr(dc._GridRows, "prefix_hidden", real_prefix)
    monkeypatch.setattr(dc._GridRows, "head_blocks", nudged(real_head))
    g = dc.gap_grid(probe, tie.x, h1, h2, a, a, head_block=4)
    assert g.path["head"] == "not bitwise equal to the full head" and g.path["head_columns"] == probe.reference.shape[0]
    _grids_equal(g, plain)
    assert "eager" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_grid_head_certificate_bounds_every_other_logit(probe, tie):
    """The certificate's bound is above every logit outside the blocks on fresh hidden states near h_ref, and a
    certified row's argmax over the blocks is its argmax over the whole vocabulary. The blocks are taken as the full
    head computes them: the kernel uses its own block matmuls only where its first batch shows them bitwise equal
    (a 4-column matmul need not be: on GPT-2's tied head it is not, and at a tie point one ULP flips the argmax)."""
    ev = dc._GridRows(probe, tie.x)
    t1, t2 = dc.top2(ev.ref)
    ev.prepare(t1, t2, True, 4)
    assert ev.head_reason == "candidate"
    for scale in (1e-6, 1e-3, 1e-1):
        X = tie.x + scale * torch.from_numpy(RNG.standard_normal((probe.batch_size, probe.d)).astype(np.float32))
        H, L = ev.plain(X)
        H64 = H.double()
        c = (H64 - ev.h_ref64).norm(dim=1) + ev.gamma * (H64.norm(dim=1) + ev.h_ref_norm)
        bound = ev.m_out + ev.n_out * c
        outside = torch.ones(ev.vocab, dtype=torch.bool)
        outside[ev.idx] = False
        assert bool((L[:, outside].double().max(dim=1).values <= bound).all())
        inside = L[:, ev.idx]
        ok = ev.certified(H, inside)
        np.testing.assert_array_equal(ev.idx[inside.argmax(dim=1)][ok].numpy(), L.argmax(dim=1)[ok].numpy())
        if scale == 1e-6:  # next to the reference the argmax is certified, so the check above is not vacuous
            assert bool(ok.all())


def test_grid_head_blocks_are_one_shape_and_keep_each_column_once(probe, tie):
    """A pair in the vocabulary's last, partial block: every block still computes exactly ``block`` columns (a
    narrower matmul runs another CPU kernel), the kept columns are distinct and increasing, and the blocks equal
    the full head's columns bit for bit."""
    ev = dc._GridRows(probe, tie.x)
    V, block = ev.vocab, 16  # the pair and the top 2: at most 4 blocks, fewer columns than the 98 tokens
    assert V % block, "the test needs a vocabulary that is not a multiple of the block"
    t1, t2 = V - 1, int(RNG.integers(0, V - block))
    ev.prepare(t1, t2, True, block)
    assert ev.head_reason == "candidate"
    assert all(c1 - c0 == block for c0, c1, _ in ev.cols)
    idx = ev.idx.tolist()
    assert idx == sorted(set(idx)) and {t1, t2} <= set(idx) and idx[-1] == V - 1
    H, L = ev.plain(tie.x + 1e-3 * torch.from_numpy(RNG.standard_normal((probe.batch_size, probe.d)).astype(np.float32)))
    assert fp.bits_equal(ev.head_blocks(H), L[:, ev.idx]).all()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3_text", "gpt_neox", "phi", "falcon", "granite",
                                    "mixtral"])
def test_grid_fast_rows_equal_the_plain_rows_in_other_families(family, tmp_path):
    """Whatever route each family allows (softcapped or scaled heads keep the full head; mixture-of-experts
    models no prefix route, since the experts' batch shapes follow the data), the plain rows. The same batches
    on both sides, so the position-invariance audit (which a random MoE model can fail) is not needed here."""
    from randmodels import family_model_dir

    h = ic.load_model(family_model_dir(tmp_path / family, family))
    probe = ic.Probe(h, PROMPT, target="logits", batch_size=8)
    x = probe.x0.clone()
    h1, h2 = (torch.from_numpy(v) for v in _directions(probe))
    a = dc.grid_axis(-1e-3, 1e-3, n=7)
    fast = dc.gap_grid(probe, x, h1, h2, a, a, head_block=64, audit=False)
    _grids_equal(fast, dc.gap_grid(probe, x, h1, h2, a, a, fast=False, audit=False))
    assert set(fast.path) == {"prefix", "tokens_per_row", "head", "head_columns", "plain_batches", "full_head_batches"}
    assert h.adapter.mixture_of_experts == (family == "mixtral")
    if h.adapter.mixture_of_experts:
        assert fast.path["prefix"].startswith("mixture of experts")


def test_grid_rejects_bad_input(probe, tie):
    h1 = torch.from_numpy(_directions(probe, 1)[0])
    a = dc.grid_axis(-1e-6, 1e-6, n=3)
    with pytest.raises(ValueError, match="h2 has zero norm"):
        dc.gap_grid(probe, tie.x, h1, torch.zeros(probe.d), a, a)
    with pytest.raises(ValueError, match="non-finite"):
        dc.gap_grid(probe, tie.x, h1, torch.full((probe.d,), float("nan")), a, a)
    with pytest.raises(ValueError, match="entries"):
        dc.gap_grid(probe, tie.x, h1, torch.ones(3), a, a)
    with pytest.raises(ValueError, match="token pair"):
        dc.gap_grid(probe, tie.x, h1, h1, a, a, pair=(1, 1))
    with pytest.raises(ValueError, match="grid mode"):
        dc.gap_grid(probe, tie.x, h1, h1, a, a, mode="fp16")
    with pytest.raises(ValueError, match="e_min < e_max"):
        dc.grid_axis(1.0, -1.0, n=3)


def test_grid_axis_matches_the_seed():
    a = dc.grid_axis(-1e-8, 1e-8, step=1e-10)
    assert len(a) == 201 and a.dtype == np.float32 and a[100] == 0
    np.testing.assert_array_equal(a, np.linspace(-1e-8, 1e-8, 201).astype(np.float32))


def test_crop_is_the_nearest_index_window():
    G = RNG.standard_normal((30, 20)).astype(np.float32)
    a = np.linspace(-1, 1, 30).astype(np.float32)
    b = np.linspace(-2, 2, 20).astype(np.float32)
    grid = dc.GapGrid(a=a, b=b, G=G, top=np.zeros_like(G, dtype=np.int32), state=np.arange(600).reshape(30, 20),
                      n_states=600, x=np.zeros(3, np.float32), h1=np.ones(3, np.float32), h2=np.ones(3, np.float32),
                      pair=(0, 1), mode="fp32", batch_size=1, rows=0, chunks=0, chunk_rows=0, seconds=0.0)
    sub = dc.crop(grid, (-0.5, 0.5), (1.3, -0.1))
    i0 = min(range(30), key=lambda i: abs(a[i] + 0.5))
    i1 = min(range(30), key=lambda i: abs(a[i] - 0.5))
    j0 = min(range(20), key=lambda j: abs(b[j] + 0.1))
    j1 = min(range(20), key=lambda j: abs(b[j] - 1.3))
    np.testing.assert_array_equal(sub.G, G[i0:i1 + 1, j0:j1 + 1])
    np.testing.assert_array_equal(sub.a, a[i0:i1 + 1])
    assert sub.n_states == sub.G.size


# --- statistics against loops ---------------------------------------------------------------------


def _random_grid(rows, cols, smooth):
    """A random gap map; ``smooth`` adds spatial structure, some exact zeros included."""
    G = RNG.standard_normal((rows, cols))
    if smooth:
        G = G + np.linspace(-3, 3, cols)[None, :] + np.linspace(-2, 2, rows)[:, None]
    G[RNG.random((rows, cols)) < 0.05] = 0.0
    return G.astype(np.float32)


def _loop_stats(G):
    rows, cols = G.shape
    B = [[1 if G[i, j] >= 0 else 0 for j in range(cols)] for i in range(rows)]
    flips = pairs = 0
    for i in range(rows):
        for j in range(cols):
            for di, dj in ((1, 0), (0, 1)):
                if i + di < rows and j + dj < cols:
                    pairs += 1
                    flips += B[i][j] != B[i + di][j + dj]

    def components(cls):
        seen, count, sizes = set(), 0, []
        for i in range(rows):
            for j in range(cols):
                if B[i][j] == cls and (i, j) not in seen:
                    count += 1
                    queue, size = deque([(i, j)]), 0
                    seen.add((i, j))
                    while queue:
                        a, b = queue.popleft()
                        size += 1
                        for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                            na, nb = a + da, b + db
                            if 0 <= na < rows and 0 <= nb < cols and B[na][nb] == cls and (na, nb) not in seen:
                                seen.add((na, nb))
                                queue.append((na, nb))
                    sizes.append(size)
        return count, max(sizes) if sizes else 0

    n = rows * cols
    mean = sum(map(sum, B)) / n
    z = [[B[i][j] - mean for j in range(cols)] for i in range(rows)]
    num = wsum = 0.0
    for i in range(rows):
        for j in range(cols):
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= i + di < rows and 0 <= j + dj < cols:
                    num += z[i][j] * z[i + di][j + dj]
                    wsum += 1
    den = sum(v * v for row in z for v in row)
    moran = n / wsum * num / den if den else float("nan")
    ents = []
    for i in range(2, rows - 2):
        for j in range(2, cols - 2):
            p = sum(B[a][b] for a in range(i - 2, i + 3) for b in range(j - 2, j + 3)) / 25
            ents.append(0.0 if p in (0, 1) else -p * math.log2(p) - (1 - p) * math.log2(1 - p))
    grads = []
    G64 = G.astype(np.float64)
    for i in range(rows):
        for j in range(cols):
            F = G64
            gi = (F[i + 1, j] - F[i - 1, j]) / 2 if 0 < i < rows - 1 else (F[1, j] - F[0, j] if i == 0 else F[i, j] - F[i - 1, j])
            gj = (F[i, j + 1] - F[i, j - 1]) / 2 if 0 < j < cols - 1 else (F[i, 1] - F[i, 0] if j == 0 else F[i, j] - F[i, j - 1])
            grads.append(math.hypot(float(gi), float(gj)))
    sign = lambda v: (float(v) > 0) - (float(v) < 0)
    crossings = sum(sign(G[i, j]) != sign(G[i, j + 1]) for i in range(rows) for j in range(cols - 1))
    crossings += sum(sign(G[i, j]) != sign(G[i + 1, j]) for i in range(rows - 1) for j in range(cols))
    npos = sum(map(sum, B))
    chi2 = 2 * (npos - n / 2) ** 2 / (n / 2)
    return {
        "flip_ratio": flips / pairs, "regions_pos": components(1)[0], "regions_neg": components(0)[0],
        "largest_region_pos": components(1)[1], "largest_region_neg": components(0)[1], "morans_i": moran,
        "mean_local_entropy": sum(ents) / len(ents), "gradient_mean": sum(grads) / len(grads),
        "gradient_max": max(grads), "zero_crossings": crossings, "crossing_density": crossings / (rows + cols),
        "chi2": chi2, "chi2_p": math.erfc(math.sqrt(chi2 / 2)), "G ≥ 0 cells": npos,
    }


@pytest.mark.parametrize("shape,smooth", [((13, 17), False), ((24, 9), True), ((6, 7), True)])
def test_statistics_match_loops(shape, smooth):
    G = _random_grid(*shape, smooth)
    got = dc.grid_statistics(G)
    want = _loop_stats(G)
    for k, v in want.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert got["regions_total"] == want["regions_pos"] + want["regions_neg"]
    checks = [got["flip_ratio"] > 0.3, got["regions_total"] > 10, abs(got["morans_i"]) < 0.3,
              got["entropy_ratio"] > 0.7, got["crossing_density"] > 5, got["chi2_p"] > 0.05]
    assert got["randomness_score"] == sum(checks) == len(got["randomness_indicators"])


def test_morans_i_equals_the_seeds_dense_formula():
    B = (RNG.random((7, 6)) < 0.4).astype(float)
    flat = B.ravel()
    n = flat.size
    W = np.zeros((n, n))
    for i in range(7):
        for j in range(6):
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= i + di < 7 and 0 <= j + dj < 6:
                    W[i * 6 + j, (i + di) * 6 + j + dj] = 1
    z = flat - flat.mean()
    dense = n * np.sum(W * np.outer(z, z)) / (W.sum() * np.sum(z ** 2))
    assert dc.morans_i(B) == pytest.approx(dense, rel=1e-12)
    assert (dc.four_neighbour_weights((7, 6)).toarray() == W).all()
    assert math.isnan(dc.morans_i(np.ones((4, 4))))


@pytest.mark.parametrize("pixels", [0, 1, 3])
def test_dilation_matches_a_loop(pixels):
    mask = RNG.random((15, 12)) < 0.08
    want = mask.copy()
    for _ in range(pixels):
        old = want.copy()
        for i in range(15):
            for j in range(12):
                want[i, j] = old[max(0, i - 1):i + 2, max(0, j - 1):j + 2].any()
    np.testing.assert_array_equal(dc.dilate(mask, pixels), want)
    G = np.where(mask, -1.0, 1.0)
    grown, cls = dc.dilate_class(G, pixels, "minority")
    assert cls == "G < 0"
    np.testing.assert_array_equal(grown, (~want).astype(np.uint8))
    grown, cls = dc.dilate_class(-G, pixels, "positive")
    np.testing.assert_array_equal(grown, want.astype(np.uint8))


def test_input_edges_and_sign():
    S = np.array([[0, 0, 1], [0, 2, 1], [3, 3, 3]])
    e = dc.input_edges(S)
    np.testing.assert_array_equal(np.isfinite(e), [[False, True, False], [True, True, True], [False, False, False]])
    assert dc.sign_crossings(np.array([[1.0, 0.0, -1.0], [1.0, 1.0, 1.0]])) == (2, 2)


def test_load_tie_reads_an_exp06_run_and_checks_it(tmp_path):
    """load_tie returns what an exp06 run saved, and refuses a run whose x0 is not this prompt's."""
    from instab_core.results import start_run

    h = ic.load_model(random_model_dir(tmp_path / "m", "llama"))
    probe = ic.Probe(h, "The capital of France is", target="logits", batch_size=4)
    x = probe.x0 + 1e-3
    D = torch.eye(probe.d)[:3]
    params = dict(text=probe.text, position=probe.position, dtype="float32", batch_size=4, method="root")
    run = start_run("exp06", params, model=h, root=tmp_path / "r")
    run.save_arrays("tie", x0=probe.x0, x=x, pair=np.array([5, 7]), gap=np.float32(0.0))
    run.save_arrays("spectrum", x=x, D=D, S=np.array([3.0, 2.0, 1.0]))
    path = run.finish()
    tie = dc.load_tie(h, str(path), batch_size=4)
    assert (tie.t1, tie.t2) == (5, 7) and torch.equal(tie.x, x) and torch.equal(tie.D, D)
    assert tie.upstream[0].path == path and tie.probe.batch_size == 4
    bad = start_run("exp06", {**params, "note": "x0 from elsewhere"}, model=h, root=tmp_path / "r")
    bad.save_arrays("tie", x0=probe.x0 + 1.0, x=x, pair=np.array([5, 7]), gap=np.float32(0.0))
    bad.save_arrays("spectrum", x=x, D=D, S=np.array([3.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="x0 differs"):
        dc.load_tie(h, str(bad.finish()), batch_size=4)
