"""Fisher information at a residual-stream site (seed 002) against explicit dense matrices on fresh random models.

Oracles: the dense Jacobian of the downstream logits (torch.autograd.functional.jacobian) and an explicit
Jᵀ(diag p − ppᵀ)J in float64; torch.linalg.eigh of that matrix; the seed's Fisher in closed form
(∇log p_c = W_c − Σ_j p_j W_j); layer outputs captured from a plain forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import fisher as fi
from randmodels import SESSION_SEED, random_model_dir

TEXT = "Many wild animals live here."
RNG = np.random.default_rng(SESSION_SEED)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def handle(request, tmp_path_factory):
    return ic.load_model(random_model_dir(tmp_path_factory.mktemp(request.param), request.param, layers=3),
                         dtype="float64")


@pytest.fixture(scope="module")
def site(handle):
    return fi.find_site(handle, TEXT)


def _dense_fisher_oracle(handle, site, layer):
    h = fi.residual(handle, site.ids, layer, site.position)
    g = fi.downstream(handle, site.ids, layer, site.position)
    J = torch.autograd.functional.jacobian(lambda x: g(x[None])[0], h).double()  # [V, d]
    p = torch.softmax(g(h[None])[0].double(), dim=-1)
    M = torch.diag(p) - p[:, None] * p[None, :]
    return h, g, J.T @ M @ J


def test_site_is_the_token_before_the_word(handle, site):
    w = fi.word_tokens(handle, " animals")
    assert site.ids[site.position + 1:site.position + 1 + len(w)].tolist() == w
    assert site.word_token == w[0]
    logits = handle.model(input_ids=site.ids[None]).logits[0, site.position]
    assert site.argmax == int(logits.argmax()) and site.keep == (site.argmax == w[0])


def test_downstream_with_the_same_h_reproduces_the_model(handle, site):
    layer = 1
    h = fi.residual(handle, site.ids, layer, site.position)
    out = handle.model(input_ids=site.ids[None], output_hidden_states=True)
    assert torch.allclose(h, out.hidden_states[layer + 1][0, site.position], rtol=0, atol=1e-12)
    logits = fi.downstream(handle, site.ids, layer, site.position)(h[None])[0]
    assert torch.allclose(logits, out.logits[0, site.position], rtol=0, atol=1e-10)


@pytest.mark.parametrize("layer", [0, 2])
def test_fisher_vector_products_match_the_dense_matrix(handle, site, layer):
    h, g, F = _dense_fisher_oracle(handle, site, layer)
    mv = fi.fisher_matvec(lambda x: g(x[None])[0], h)
    for _ in range(3):
        v = torch.from_numpy(RNG.standard_normal(h.shape[0]))
        assert torch.allclose(mv(v), F @ v, rtol=1e-9, atol=1e-12 * float(F.abs().max()))
    assert torch.allclose(fi.dense_fisher(lambda x: g(x[None])[0], h), F, rtol=1e-9, atol=1e-14)


def test_lanczos_eigenpairs_match_eigh_of_the_dense_matrix(handle, site):
    layer = 1
    h, g, F = _dense_fisher_oracle(handle, site, layer)
    vals, vecs = torch.linalg.eigh(F)
    vals, vecs = vals.flip(0).numpy(), vecs.flip(1).numpy()
    _, eg = fi.exact_fisher(handle, site.ids, layer, site.position, k=3, max_residual=1e-8, seed=int(RNG.integers(1000)))
    assert np.allclose(eg.values, vals[:3], rtol=1e-8)
    for i in range(3):
        if abs(vals[i] - vals[i + 1]) > 1e-6 * vals[0]:  # a well-separated eigenvalue has a unique direction
            assert abs(eg.vectors[:, i] @ vecs[:, i]) > 1 - 1e-8


def test_a_failed_eigensolve_raises():
    d = 12
    with pytest.raises(fi.FisherError):  # a negative-definite "Fisher": no positive top eigenvalue
        fi.top_eigenpairs(lambda v: -v, d, k=2)
    noise = np.random.default_rng(SESSION_SEED)
    with pytest.raises(fi.FisherError):  # an operator that is not a fixed matrix fails the residual check or ARPACK
        fi.top_eigenpairs(lambda v: torch.from_numpy(noise.standard_normal(d)), d, k=2)
    with pytest.raises(ValueError, match="k must be"):
        fi.top_eigenpairs(lambda v: v, d, k=d)


def test_seed_fisher_matches_its_closed_form(handle, site):
    h = fi.residual(handle, site.ids, 1, site.position)
    subset = 20
    vals, vecs = fi.seed_fisher(handle, h, subset)
    W = handle.unembed.weight.double().numpy()
    z = W @ h.numpy()
    p = np.exp(z - z.max())
    p /= p.sum()
    top = np.argsort(-p)[:subset]
    G = W[top] - p @ W  # ∇log p_c for the full-vocabulary softmax
    F = G.T @ (p[top, None] * G)
    ref = np.linalg.eigvalsh(F)[::-1]
    assert np.allclose(vals, ref, rtol=1e-9, atol=1e-12 * ref[0])
    assert np.allclose(F @ vecs[:, 0], vals[0] * vecs[:, 0], atol=1e-9 * vals[0])


def test_the_hook_changes_exactly_the_intended_position_and_layer(handle, site):
    layer, p = 1, site.position
    plain = handle.model(input_ids=site.ids[None], output_hidden_states=True).hidden_states
    h = plain[layer + 1][0, p]  # from the same full-length forward, so replacing h by itself is the identity
    _, same = fi.run_with_replacement(handle, site.ids, layer, p, h[None], capture=True)
    for l in range(handle.n_layers - 1):  # hidden_states[l + 1] is layer l's output (the last is after the norm)
        assert torch.equal(same[l], plain[l + 1])  # replacing h by itself changes no bit
    H = h + torch.from_numpy(RNG.standard_normal(h.shape[0]))
    _, pert = fi.run_with_replacement(handle, site.ids, layer, p, H[None], capture=True)
    L = site.ids.shape[0]
    for l in range(handle.n_layers):
        for pos in range(L):
            unchanged = l < layer or pos < p or (l == layer and pos != p)
            assert torch.equal(pert[l][0, pos], same[l][0, pos]) == unchanged, (l, pos)
    assert torch.equal(pert[layer][0, p], H)


def test_kl_calibrated_steps_give_the_predicted_kl(handle, site):
    """½ s² λ is the second-order KL along the top eigenvector: the Fisher is the Hessian of KL(p(h) ‖ p(h'))."""
    layer = 1
    h, eg = fi.exact_fisher(handle, site.ids, layer, site.position, k=1, max_residual=1e-8)
    lam = float(eg.values[0])
    kappas = [1e-6, 1e-5]
    steps = [np.sqrt(2 * k / lam) for k in kappas]
    t = fi.sweep(handle, site, layer, h, eg.vectors[:, 0], [0.0, *steps])
    assert t.kl.iloc[0] == 0 and not t.argmax_changed.iloc[0]
    assert np.allclose(t.kl.iloc[1:].to_numpy(), kappas, rtol=2e-2)
    assert len(t.top_ids.iloc[0]) == 5


def test_study_tables(handle):
    sents = [TEXT, "Small animals hide under leaves."]
    layers = [0, 2]
    if not any(fi.find_site(handle, s).keep for s in sents):  # the seed's filter keeps none on a random model
        with pytest.raises(ValueError, match="filter keeps none"):
            fi.study(handle, sents, layers=layers, argmax_fallback=False, progress=False)
    st = fi.study(handle, sents, layers=layers, k=2, subset=10, scales=(0.0, 1.0), kl_levels=(1e-3,),
                  filter_argmax=False, progress=False)
    n = len(sents)
    assert len(st.comparison) == n * len(layers) and len(st.eigen) == n * len(layers) * 2
    assert ((st.comparison.abs_cos >= 0) & (st.comparison.abs_cos <= 1 + 1e-12)).all()
    assert len(st.sweeps) == n * len(layers) * (2 + 2)
    S = st.similarity(0)
    assert S.shape == (n, n) and np.allclose(np.diag(S), 1)


def test_spread_layers_scales_the_seed_choice():
    assert fi.spread_layers(32) == list(fi.SEED_LAYERS_32)
    assert fi.spread_layers(4) == [0, 1, 2, 3]
    assert fi.spread_layers(1) == [0]


def test_bad_inputs(handle, site):
    with pytest.raises(ValueError, match="does not contain"):
        fi.find_site(handle, "No such word in this sentence.")
    with pytest.raises(ValueError, match="out of range"):
        fi.residual(handle, site.ids, handle.n_layers, site.position)
    with pytest.raises(ValueError, match="out of range"):
        fi.downstream(handle, site.ids, -1, site.position)
    with pytest.raises(ValueError, match="out of range"):
        fi.study(handle, [TEXT], layers=[handle.n_layers], progress=False)
    with pytest.raises(ValueError, match="subset"):
        fi.seed_fisher(handle, fi.residual(handle, site.ids, 0, site.position), subset=0)
