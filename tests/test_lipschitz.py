"""Finite-difference Lipschitz, exp03 lattice table and rounding injection against independent oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import fp, injection
from instab_core import lipschitz as LZ
from randmodels import SESSION_SEED, random_model_dir

PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def _unit_rows(k: int, d: int, seed: int) -> np.ndarray:
    D = np.random.default_rng(seed).standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def test_fd_equals_jvp_norm_in_true_float64_within_the_truncation_bound(model_dir):
    h = ic.load_model(model_dir, dtype="float64")
    assert h.true_float64
    probe = ic.Probe(h, PROMPT, batch_size=4)
    spec = ic.jacobian.spectrum(probe)
    D = np.vstack([spec.Vt[:2], _unit_rows(3, probe.d, SESSION_SEED)])
    eps = 1e-6
    res = LZ.finite_difference(probe, D, [eps], progress=False)
    Jv = ic.jacobian.jvp_rows(probe, torch.from_numpy(D)).norm(dim=1).numpy()
    # Truncation: |‖Δf‖/ε − ‖Jv‖| ≤ ‖f(x+εv) − f(x) − εJv‖/ε ≤ (ε/2)·‖∂²f[v,v]‖ (Taylor, up to O(ε²));
    # ‖∂²f[v,v]‖ is measured by a central second difference at h = 1e-3 and taken twice (slack 2×).
    # Rounding: ≈ u64·‖f‖/ε ≈ 1e-16·‖f‖/1e-6 = 1e-10·‖f‖, bounded by 1e-8·(1 + ‖f‖).
    hstep = 1e-3
    x0 = probe.x0
    Dt = torch.from_numpy(D)
    X = torch.cat([x0 + hstep * Dt, x0 - hstep * Dt])
    out = probe.forward(X)
    curv = ((out[:len(D)] + out[len(D):] - 2 * probe.reference).norm(dim=1) / hstep ** 2).numpy()
    bound = eps * curv + 1e-8 * (1 + float(probe.reference.norm()))
    err = np.abs(res.table["L"].to_numpy() - Jv)
    assert np.all(err <= bound), (err, bound)
    assert np.all(res.table["input_moved"])
    # σ1 along v1: L ≈ σ1
    assert res.table["L_over_sigma"].isna().all()  # raw rows carry no σ
    dirs = LZ.singular_directions(spec.S, spec.Vt, top_k=1)
    r1 = LZ.finite_difference(probe, dirs, [eps], progress=False)
    assert r1.table["L_over_sigma"].iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_batched_fd_is_bitwise_equal_to_a_batch1_loop_in_the_same_batch_shape(model_dir):
    h = ic.load_model(model_dir)
    probe = ic.Probe(h, PROMPT, batch_size=8)
    D = _unit_rows(2, probe.d, SESSION_SEED + 1)
    eps = LZ.eps_powers(1, 11)
    res = LZ.finite_difference(probe, D, eps, progress=False)
    assert res.rows == res.forward_passes * 8 and res.forward_passes == int(np.ceil(2 * 11 / 8))  # packed across directions
    ref = probe.reference.double()
    ref_lg = h.unembed(probe.reference.expand(8, -1))[0].double()
    L, moved, flips = [], [], []
    for v in D:
        for e in eps:
            x = (probe.x0.double() + e * torch.from_numpy(v)).float()  # formed in float64, rounded once
            y = probe.forward(x[None])[0]  # one row, padded with x0 to the same batch shape of 8
            L.append(float((y.double() - ref).norm()) / e)
            moved.append(bool((x != probe.x0).any()))
            lg = h.unembed(torch.cat([y[None], probe.reference.expand(7, -1)]))[0].double()
            flips.append(int(lg.argmax()) != int(ref_lg.argmax()))
    t = res.table
    assert np.array_equal(t["L"].to_numpy(), np.array(L))
    assert np.array_equal(t["input_moved"].to_numpy(), np.array(moved))
    assert np.array_equal(t["token_changed"].to_numpy(), np.array(flips))
    # where the rounded input did not move, L is 0 and L_realised is undefined — never ‖Δf‖/ε of a non-step
    still = ~t["input_moved"].to_numpy()
    assert np.all(t["L"].to_numpy()[still] == 0) and np.all(np.isnan(t["L_realised"].to_numpy()[still]))
    assert set(t["regime"][still]) <= {"input_unchanged"}


@pytest.mark.parametrize("noise", ["vector", "scalar"])
def test_noise_variants_equal_a_straightforward_loop(model_dir, noise):
    h = ic.load_model(model_dir)
    probe = ic.Probe(h, PROMPT, batch_size=8)
    D = _unit_rows(2, probe.d, SESSION_SEED + 2)
    eps = np.array([1e-3, 1e-6])
    n, seed = 4, SESSION_SEED % 1000
    res = LZ.finite_difference(probe, D, eps, noise=noise, n_samples=n, seed=seed, max_rows=7, progress=False)
    gen = torch.Generator().manual_seed(seed)
    x0 = probe.x0.double()
    L = []
    for v in torch.from_numpy(D):
        for i, e in enumerate(eps):
            if noise == "vector":  # drawn direction by direction, ε by ε
                u = torch.rand((n, probe.d), generator=gen, dtype=torch.float64) * 2 - 1
            else:
                u = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
            rep1, rep2 = [], []
            for j in range(n):
                if noise == "vector":
                    r = u[j] * e * 1e-2
                    a, b = x0 + e * v + r, x0 + r
                else:
                    r = u[j] * 1e-9
                    a, b = x0 + (e + r) * v, x0 + r * v
                rep1.append(probe.forward(a.float()[None])[0].double())
                rep2.append(probe.forward(b.float()[None])[0].double())
            L.append(float((sum(rep1) / n - sum(rep2) / n).norm()) / e)
    np.testing.assert_allclose(res.table["L"].to_numpy(), np.array(L), rtol=1e-9, atol=0)
    assert res.rows == res.forward_passes * 8 == int(np.ceil(2 * len(eps) * 2 * n / 8)) * 8  # only the last pass padded
    big = LZ.finite_difference(probe, D, eps, noise=noise, n_samples=n, seed=seed, max_rows=4096, progress=False)
    np.testing.assert_allclose(big.table["L"].to_numpy(), res.table["L"].to_numpy(), rtol=1e-12, atol=0)
    assert res.seed_style_passes == 2 * len(eps) * 2 * n


def test_precision_table_counts_ulps_and_decimal_places():
    gen = np.random.default_rng(SESSION_SEED)
    z = gen.standard_normal(64)
    x0 = (np.sign(z) * (0.01 + 0.02 * np.abs(z))).astype(np.float32)  # |x0| ≥ 0.01: ulp ≥ 9e-10 > 40·1e-12
    v = gen.standard_normal(64)
    v /= np.linalg.norm(v)
    eps = [1e-5, 1e-9, 1e-12]
    table, ulps = LZ.precision_table(x0, v, 40.0, eps, decimals=[8, 4])
    for i, e in enumerate(eps):
        x = (x0.astype(np.float64) + e * 40.0 * v).astype(np.float32)
        exact = fp.ulp_distance(torch.from_numpy(x), torch.from_numpy(x0)).numpy()
        assert np.array_equal(ulps[i], exact)
        assert table["changed"][i] == int((x != x0).sum())
        assert table["round_8"][i] == int((np.round(x.astype(np.float64), 8) != np.round(x0.astype(np.float64), 8)).sum())
    assert table["changed"][0] > 0 and table["changed"][2] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rounding_injection_equals_a_direct_hf_forward(model_dir, dtype):
    h = ic.load_model(model_dir, dtype=dtype)
    cs = 2.0 ** np.arange(-4, 3)
    res = injection.rounding_injection(h, PROMPT, cs)
    ids = h.encode(PROMPT)
    E = h.model.get_input_embeddings()(ids).detach()
    emb = torch.stack([E] + [(E + torch.tensor(c, dtype=E.dtype)) - torch.tensor(c, dtype=E.dtype) for c in cs])
    with torch.no_grad():
        out = h.model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
    H = out.hidden_states[-1].double()  # already after the final norm: not normalised again
    lg = out.logits[:, -1].double()
    np.testing.assert_array_equal(res.token_l2, (H[1:] - H[0]).norm(dim=-1).numpy())
    cos = torch.nn.functional.cosine_similarity(H[1:], H[:1].expand_as(H[1:]), dim=-1).numpy()
    np.testing.assert_allclose(res.token_cos, cos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.table["logit_diff"], (lg[1:] - lg[0]).norm(dim=-1).numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(res.table["token_changed"], (lg[1:].argmax(-1) != lg[0].argmax()).numpy())
    assert np.array_equal(res.emb_changed, (emb[1:] != E).sum(-1).numpy())


def test_bad_inputs_give_clear_errors(model_dir):
    h = ic.load_model(model_dir)
    probe = ic.Probe(h, PROMPT, batch_size=4)
    D = _unit_rows(1, probe.d, 0)
    with pytest.raises(ValueError, match="empty ε list"):
        LZ.finite_difference(probe, D, [], progress=False)
    with pytest.raises(ValueError, match="finite and > 0"):
        LZ.finite_difference(probe, D, [1e-3, 0.0], progress=False)
    with pytest.raises(ValueError, match="finite and > 0"):
        LZ.finite_difference(probe, D, [-1e-3], progress=False)
    with pytest.raises(ValueError, match="unknown noise"):
        LZ.finite_difference(probe, D, [1e-3], noise="gauss", progress=False)
    with pytest.raises(ValueError, match="unknown precision"):
        LZ.load_precision(model_dir, "float16")
    with pytest.raises(ValueError, match="unknown precision"):
        LZ.check_precision("fp8")
    S, Vt = np.ones(probe.d), np.eye(probe.d)
    with pytest.raises(ValueError, match="1-based"):
        LZ.singular_directions(S, Vt, top_k=2, dims=[0])
    with pytest.raises(ValueError, match="1-based"):
        LZ.singular_directions(S, Vt, top_k=2, dims=[probe.d + 1])
    with pytest.raises(ValueError, match="top_k"):
        LZ.singular_directions(S, Vt, top_k=probe.d + 1)
    assert LZ.singular_directions(S, Vt, top_k=1, dims=[probe.d]).index.tolist() == [1, probe.d]
    with pytest.raises(ValueError, match="directions must be"):
        LZ.finite_difference(probe, np.ones((1, probe.d + 1)), [1e-3], progress=False)
    layer_probe = ic.Probe(h, PROMPT, target="layer_out[0]", batch_size=4)
    with pytest.raises(ValueError, match="final_hidden or logits"):
        LZ.finite_difference(layer_probe, D, [1e-3], progress=False)
    with pytest.raises(ValueError, match="empty constant list"):
        injection.rounding_injection(h, PROMPT, [])
    with pytest.raises(ValueError, match="not representable"):
        injection.inject(torch.zeros(3), 0.1 + 2.0 ** -40)
