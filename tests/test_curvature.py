"""Per-sample curvature by nested JVPs, the divergence, learned directions and their recovery on toys (seed 003).

Oracles: dense per-sample Hessians (torch.autograd.functional.hessian) on the toys and on a random MLP away
from its reference point, float64 central second differences through a random GPT-2's attention matrix,
numpy for the divergences and block projections; the superposition toy's known features for recovery.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian

import instab_core as ic
from instab_core import curvature as cv
from instab_core import toys
from randmodels import SESSION_SEED, random_model_dir

GEN = torch.Generator().manual_seed(SESSION_SEED)


@pytest.fixture(scope="module")
def superposition():
    return toys.superposition_toy(seed=0)


@pytest.fixture(scope="module")
def xor():
    return toys.xor_toy(seed=0)


def _dense(div_all, w0, U):
    """C[n, k] = u_kᵀ H_n u_k from dense Hessians of each sample's divergence."""
    N = div_all(w0).shape[0]
    out = torch.empty(N, U.shape[0], dtype=torch.float64)
    for n in range(N):
        H = hessian(lambda w: div_all(w)[n], w0)
        out[n] = torch.einsum("kp,pq,kq->k", U, H, U)
    return out


@pytest.mark.parametrize("name", ["superposition", "xor"])
def test_nested_jvp_curvature_matches_dense_hessians_on_the_toys(name, request):
    toy = request.getfixturevalue(name)
    U = torch.randn(4, toy.w0.numel(), generator=GEN, dtype=torch.float64)
    # at w0 and at a random point away from it (where the residual terms of the Hessian are nonzero)
    for w in (toy.w0, toy.w0 + 0.1 * torch.randn(toy.w0.shape, generator=GEN, dtype=torch.float64)):
        got = cv.curvature_matrix(toy.div_all(), w, U)
        torch.testing.assert_close(got, _dense(toy.div_all(), w, U), rtol=1e-9, atol=1e-12)


def test_nested_jvp_curvature_matches_a_dense_hessian_on_a_random_tanh_mlp():
    """Curvature of a smooth net with a KL against a different reference: every Hessian term counts."""
    P = 3 * 4 + 4 + 4 * 3 + 3
    w0 = torch.randn(P, generator=GEN, dtype=torch.float64)
    X = torch.randn(6, 3, generator=GEN, dtype=torch.float64)

    def net(w, x):
        W1, b1, W2, b2 = w[:12].reshape(4, 3), w[12:16], w[16:28].reshape(3, 4), w[28:]
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    ref = net(torch.randn(P, generator=GEN, dtype=torch.float64), X)
    for kind in ("kl", "mse"):
        div_all = lambda w, kind=kind: cv.divergence(net(w, X), ref, kind)  # noqa: E731
        U = torch.randn(5, P, generator=GEN, dtype=torch.float64)
        torch.testing.assert_close(cv.curvature_matrix(div_all, w0, U, chunk=2), _dense(div_all, w0, U),
                                   rtol=1e-9, atol=1e-12)


def test_gpt2_attention_curvature_matches_central_differences(tmp_path):
    h = ic.load_model(random_model_dir(tmp_path, "gpt2"), dtype="float64")
    case = toys.gpt2_attention_case(h, layer=1, samples=4, length=6, seed=SESSION_SEED % 1000)
    div_all = case.div_all()
    U = torch.randn(3, case.w0.numel(), generator=GEN, dtype=torch.float64)
    U = U / U.norm(dim=1, keepdim=True)
    C = cv.curvature_matrix(div_all, case.w0, U)
    step = 1e-3
    with torch.no_grad():
        fd = torch.stack([(div_all(case.w0 + step * u) - 2 * div_all(case.w0) + div_all(case.w0 - step * u)) / step**2
                          for u in U], 1)
    torch.testing.assert_close(C, fd, rtol=1e-4, atol=1e-6 * float(fd.abs().max()))
    assert (C >= -1e-12).all()  # at w0 the KL is at its minimum: the curvature is a Fisher quadratic form
    assert sum(len(b) for b in case.blocks) == case.w0.numel()


def test_divergences_against_numpy():
    a = torch.randn(7, 5, generator=GEN, dtype=torch.float64)
    b = torch.randn(7, 5, generator=GEN, dtype=torch.float64)
    p = np.exp(a.numpy()) / np.exp(a.numpy()).sum(1, keepdims=True)
    q = np.exp(b.numpy()) / np.exp(b.numpy()).sum(1, keepdims=True)
    np.testing.assert_allclose(cv.divergence(a, b, "kl").numpy(), (p * np.log(p / q)).sum(1), rtol=1e-12)
    np.testing.assert_allclose(cv.divergence(a, b, "mse").numpy(), ((a - b).numpy() ** 2).mean(1), rtol=1e-12)
    assert (cv.divergence(a, a, "kl") == 0).all()
    with pytest.raises(ValueError, match="unknown divergence"):
        cv.divergence(a, b, "l1")


def test_block_fractions_are_the_best_cosine_within_a_block():
    U = torch.randn(3, 10, generator=GEN, dtype=torch.float64).numpy()
    blocks = [np.array([0, 3, 4]), np.array([1, 2, 9])]
    F = cv.block_fractions(U, blocks)
    for k in range(3):
        for b, idx in enumerate(blocks):
            v = np.zeros(10)
            v[idx] = U[k, idx]  # the projection is the best-matching vector supported on the block
            best = U[k] @ v / (np.linalg.norm(U[k]) * np.linalg.norm(v))
            assert abs(F[k, b] - best) < 1e-12
            other = np.zeros(10)
            other[idx] = np.random.default_rng(SESSION_SEED + k).normal(size=len(idx))
            assert U[k] @ other / (np.linalg.norm(U[k]) * np.linalg.norm(other)) <= F[k, b] + 1e-12


def test_superposition_toy_recovers_its_features(superposition):
    """Seed 0, 6 directions, 200 steps: every one of the 5 features has a learned direction with cosine
    >= 0.75 to it, and every learned direction has cosine >= 0.6 to its best-matching feature."""
    res = cv.learn_directions(superposition.div_all(), superposition.w0, n_directions=6, steps=200, seed=0,
                              progress=False)
    F = cv.block_fractions(res.U, superposition.blocks)
    assert F.max(0).min() >= 0.75, np.round(F, 3)
    assert F.max(1).min() >= 0.6, np.round(F, 3)
    # the optimisation did what it claims: more concentrated curvature, less interference than at the start
    l_high0, l_low0 = cv.losses(torch.from_numpy(res.C_init), torch.from_numpy(res.U_init), res.c0)
    l_high1, l_low1 = cv.losses(torch.from_numpy(res.C), torch.from_numpy(res.U), res.c0)
    assert l_high1 < l_high0
    F0 = cv.block_fractions(res.U_init, superposition.blocks)
    assert F.max(1).mean() > F0.max(1).mean() + 0.2


def test_bad_inputs(superposition):
    d = superposition.div_all()
    with pytest.raises(ValueError, match="directions must be"):
        cv.curvature_matrix(d, superposition.w0, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_directions"):
        cv.learn_directions(d, superposition.w0, n_directions=0, progress=False)
    zero = lambda w: (w * 0).sum()[None]  # noqa: E731  (a divergence that never bends)
    with pytest.raises(ValueError, match="does not bend"):
        cv.learn_directions(zero, superposition.w0, n_directions=2, steps=1, progress=False)
