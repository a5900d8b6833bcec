"""KL ε-level-sets and their normals (seed 000) against float64 finite differences on fresh random models.

Oracles: float64 central differences of the KL computed from a plain Hugging Face forward (inputs_embeds);
the sequential (batch-1) central-difference normal; an explicit dense Jᵀ(diag p − ppᵀ)J; Mahalanobis
distances computed in numpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import levelsets as L
from randmodels import SESSION_SEED, random_model_dir

RNG = np.random.default_rng(SESSION_SEED)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def handle(model_dir):
    return ic.load_model(model_dir, dtype="float64")


def _kl_oracle(handle, target, X):
    """KL(t ‖ softmax(logits)) from a plain HF forward of [BOS, x] per row, float64 numpy."""
    bos = handle.embedding(torch.tensor([handle.tokenizer.bos_token_id]))
    out = []
    for x in torch.as_tensor(X):
        emb = torch.cat([bos, x[None].to(bos.dtype)])[None]
        z = handle.model(inputs_embeds=emb).logits[0, -1].double().numpy()
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        t = np.asarray(target)
        out.append(float(np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - logp), 0.0))))
    return np.array(out)


def _random_target(handle):
    V = handle.unembed.weight.shape[0]
    return RNG.dirichlet(np.full(V, 0.5))


@pytest.fixture(scope="module")
def setting(handle):
    """A level set through a random point x1 (ε = KL(x1)), with a random target distribution."""
    target = _random_target(handle)
    x1 = L.sample_vocab_ellipse(handle, 1, seed=int(RNG.integers(1 << 30)))[0]
    eps = float(_kl_oracle(handle, target, x1[None])[0])
    return L.LevelSet(handle, target, eps, tolerance=1e-6), x1


def test_kl_matches_a_plain_forward(handle, setting):
    ls, x1 = setting
    X = L.sample_vocab_ellipse(handle, 3, seed=int(RNG.integers(1 << 30)))
    assert np.allclose(ls.value(X).numpy(), _kl_oracle(handle, ls.target.numpy(), X), rtol=1e-10)


def test_analytic_normal_matches_float64_central_differences(handle, setting):
    ls, x = setting
    d, h = x.shape[0], 1e-5
    E = torch.eye(d, dtype=torch.float64) * h
    target = ls.target.numpy()
    g = (_kl_oracle(handle, target, x[None] + E) - _kl_oracle(handle, target, x[None] - E)) / (2 * h)
    n = ls.analytic_normal(x[None])[0].numpy()
    assert np.allclose(n, g / np.linalg.norm(g), atol=1e-6)


def test_projection_reaches_the_level_set(handle, setting):
    ls, _ = setting
    X = L.sample_vocab_ellipse(handle, 6, seed=int(RNG.integers(1 << 30)))
    pr = ls.project(X, max_iters=200)
    assert pr.converged.all()
    kl = _kl_oracle(handle, ls.target.numpy(), pr.points)
    assert np.all(np.abs(kl - ls.epsilon) < ls.epsilon * ls.tolerance * 1.01)
    rep = pr.report()
    assert len(rep) == 6 and (rep.rel_error < ls.tolerance).all() and (rep.iterations >= 0).all()


def test_a_non_converged_projection_is_never_silent(handle, setting):
    ls, _ = setting
    X = L.sample_vocab_ellipse(handle, 3, seed=int(RNG.integers(1 << 30))) * 3
    far = np.abs(ls.value(X).numpy() - ls.epsilon) >= ls.tol_abs
    if not far.any():
        pytest.skip("every start point happens to lie on the level set")
    with pytest.raises(L.LevelSetError, match="did not reach"):
        ls.project(X, method="adam", max_iters=1)
    with pytest.warns(UserWarning, match="did not reach"):
        pr = ls.project(X, method="adam", max_iters=1, strict=False)
    assert (~pr.converged == far).all()


@pytest.mark.parametrize("variant,method", [("seed", "adam"), ("signed", "newton")])
def test_batched_central_differences_equal_the_sequential_reference(handle, setting, variant, method):
    ls, x = setting
    kw = dict(delta=1e-2, method=method, max_iters=15, variant=variant)
    seq = L.central_difference_normal(ls, x, sequential=True, **kw)
    for batch_size in (None, 5):
        bat = L.central_difference_normal(ls, x, batch_size=batch_size, **kw)
        assert np.allclose(bat.a, seq.a, rtol=1e-7, atol=1e-12) and np.allclose(bat.b, seq.b, rtol=1e-7, atol=1e-12)
        assert (bat.converged_plus == seq.converged_plus).all() and (bat.converged_minus == seq.converged_minus).all()
        assert np.allclose(bat.normal, seq.normal, atol=1e-6)


def test_central_differences_on_a_coordinate_subset_are_the_full_method_restricted(handle, setting):
    ls, x = setting
    kw = dict(delta=1e-2, method="newton", max_iters=15, variant="signed")
    full = L.central_difference_normal(ls, x, **kw)
    S = L.cd_coordinates(x.shape[0], int(RNG.integers(2, x.shape[0])), seed=int(RNG.integers(1 << 30)))
    sub = L.central_difference_normal(ls, x, dims=S, **kw)
    assert (sub.dims == S).all() and sub.normal.shape == S.shape
    assert np.allclose(sub.a, full.a[S], rtol=1e-7, atol=1e-12) and np.allclose(sub.b, full.b[S], rtol=1e-7, atol=1e-12)
    assert L.cosine(sub.normal, full.normal[S]) > 1 - 1e-9
    for bad in ([], [0, 0], [x.shape[0]], [-1]):
        with pytest.raises(ValueError, match="dims must be distinct coordinates"):
            L.central_difference_normal(ls, x, dims=bad, **kw)


def test_cd_coordinates_are_all_or_a_distinct_sorted_subset():
    for _ in range(20):
        d = int(RNG.integers(1, 300))
        k = int(RNG.integers(1, 2 * d + 1))
        S = L.cd_coordinates(d, k, seed=int(RNG.integers(1 << 30)))
        assert S.size == min(d, k) and np.unique(S).size == S.size and (np.diff(S) > 0).all() and 0 <= S[0] and S[-1] < d
    assert (L.cd_coordinates(7, None) == np.arange(7)).all()
    with pytest.raises(ValueError, match=">= 1 or None"):
        L.cd_coordinates(7, 0)


@pytest.mark.parametrize("method", ["newton", "adam"])
def test_projection_in_memory_chunks_equals_each_row_alone(handle, setting, method, monkeypatch):
    """Chunked evaluation (two rows per chunk) and active-row compaction leave every row's answer as when it is
    projected alone at batch 1: rows are independent."""
    ls, x1 = setting  # x1 is on the level set: its row stops at step 0 while the others move
    X = torch.cat([x1[None], L.sample_vocab_ellipse(handle, 4, seed=int(RNG.integers(1 << 30)))])
    kw = dict(method=method, max_iters=8, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged rows are compared too
        alone = [ls.project(X[i:i + 1], **kw) for i in range(5)]
        monkeypatch.setattr(L, "CHUNK_BYTES", 2 * 40 * ls.target.shape[0])
        assert [r.stop - r.start for r in ls._row_chunks(5)] == [2, 2, 1]
        chunked = ls.project(X, **kw)
    assert np.allclose(chunked.points.numpy(), torch.cat([a.points for a in alone]).numpy(), rtol=1e-9, atol=1e-12)
    assert (chunked.iterations == np.concatenate([a.iterations for a in alone])).all()
    assert (chunked.converged == np.concatenate([a.converged for a in alone])).all()
    assert chunked.iterations[0] == 0 and chunked.iterations.max() > 0


def test_signed_central_differences_converge_to_the_analytic_normal(handle, setting):
    """Where δ·|∂ᵢKL| clears the tolerance band the signed differences resolve the normal; the coordinates left
    at zero are exactly those whose step stays inside the band (x ± δeᵢ is already on the level set)."""
    ls, x = setting
    delta = 1e-4
    cd = L.central_difference_normal(ls, x, delta=delta, method="newton", variant="signed", max_iters=50)
    assert cd.n_unconverged == 0
    analytic = ls.analytic_normal(x[None])[0].numpy()
    resolved = cd.normal != 0
    assert L.cosine(cd.normal[resolved], analytic[resolved]) > 0.999
    grad = ls.value_and_grad(x[None])[1][0].double().numpy()
    assert (delta * np.abs(grad[~resolved]) <= 2 * ls.tol_abs).all()


def test_fisher_normal_near_the_minimum(handle):
    """Target = the model's distribution at x*: the Fisher normal G(x − x*) agrees with ∇KL on a small level set,
    and G·v matches an explicit dense Jᵀ(diag p − ppᵀ)J."""
    xs = L.sample_vocab_ellipse(handle, 1, seed=int(RNG.integers(1 << 30)))[0]
    with torch.no_grad():
        p = torch.softmax(L.LevelSet(handle, 0, 1.0).logits(xs[None])[0].double(), -1)
    ls = L.LevelSet(handle, p, 1e-6, tolerance=1e-4)
    d = xs.shape[0]
    X = ls.quadratic_starts(xs, 3, seed=int(RNG.integers(1000)))
    assert np.allclose(ls.value(X).numpy(), ls.epsilon, rtol=0.2)  # the quadratic model of KL holds near x*
    pts = ls.project(X, max_iters=200).points
    fn = ls.fisher_normal(pts, xs)
    an = ls.analytic_normal(pts)
    assert ((fn * an).sum(1) > 0.99).all()
    J = torch.autograd.functional.jacobian(lambda y: ls.logits(y[None])[0], pts[0]).double()
    q = torch.softmax(ls.logits(pts[0][None])[0].double(), -1)
    G = J.T @ (torch.diag(q) - q[:, None] * q[None]) @ J
    v = torch.from_numpy(RNG.standard_normal(d))
    assert torch.allclose(ls.fisher_matvec(pts[0])(v), G @ v, rtol=1e-9, atol=1e-12 * float(G.abs().max()))


def test_tangent_directions_stay_on_the_level_set_to_second_order(handle, setting):
    ls, x = setting
    s = np.array([1e-4, 1e-3])
    t = L.tangent_profile(ls, x, s, n_tangent=2, seed=int(RNG.integers(1000)))
    normal = t[t.direction == "normal"].kl_minus_eps.abs().to_numpy()
    tangent = t[t.direction != "normal"].kl_minus_eps.abs().to_numpy().reshape(2, 2)
    g = float(ls.value_and_grad(x[None])[1].norm())
    assert np.allclose(normal, s * g, rtol=2e-2)  # linear along the normal, with slope ‖∇KL‖
    assert (tangent < 1e-2 * normal[None]).all()  # second order along a tangent
    walk = L.tangent_walk(ls, x, n_steps=3, step=1e-2)
    assert (walk.kl_after_rel.abs() < ls.tolerance).all() and walk.distance_from_start.is_monotonic_increasing


def test_vocab_ellipse_samples_lie_inside_the_ellipse(handle):
    W = handle.embedding.weight.detach().double().numpy()
    mu, C = W.mean(0), np.cov(W.T)
    X = L.sample_vocab_ellipse(handle, 50, radius=0.5, seed=int(RNG.integers(1 << 30))).numpy() - mu
    maha = np.sqrt(np.einsum("nd,de,ne->n", X, np.linalg.pinv(C), X))
    assert (maha <= 0.5 * np.sqrt(W.shape[1]) * (1 + 1e-8)).all() and maha.max() > 0.25 * np.sqrt(W.shape[1])


def test_bad_inputs(handle, model_dir):
    V = handle.unembed.weight.shape[0]
    for eps in (0.0, -1e-6):
        with pytest.raises(ValueError, match="epsilon must be > 0"):
            L.LevelSet(handle, 3, eps)
    bad_targets = [np.full(V, 1.0), -np.eye(V)[0], np.full(V - 1, 1 / (V - 1)), np.full(V, np.nan)]
    for t in bad_targets:
        with pytest.raises(ValueError, match="probability distribution"):
            L.LevelSet(handle, t, 1e-6)
    with pytest.raises(ValueError, match="out of range"):
        L.LevelSet(handle, V, 1e-6)
    for dt in ("float16", "bfloat16"):
        with pytest.raises(ValueError, match="16-bit floats cannot represent"):
            L.LevelSet(ic.load_model(model_dir, dtype=dt), 3, 1e-6)
    with pytest.raises(ValueError, match="delta"):
        L.central_difference_normal(L.LevelSet(handle, 3, 1.0), torch.zeros(handle.d_model, dtype=torch.float64), delta=0)
