"""Dense Jacobian against float64 central differences; SVD and matrix-free top-k against the dense J."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core.jacobian import ConvergenceError, jacobian, jvp_rows, spectrum, top_singular
from randmodels import SESSION_SEED, random_model_dir

TEXT = "Hello world, numerics!"
FAMILIES = ["llama", "gpt2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {fam: random_model_dir(tmp_path_factory.mktemp(fam), fam) for fam in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def probe64(request, dirs):
    h = ic.load_model(dirs[request.param], dtype="float64")
    assert h.true_float64
    return ic.Probe(h, TEXT, batch_size=1)


@pytest.fixture(scope="module", params=FAMILIES)
def probe32(request, dirs):
    return ic.Probe(ic.load_model(dirs[request.param]), TEXT, batch_size=1)


def _random_point(probe: ic.Probe, seed: int) -> torch.Tensor:
    """x0 plus noise of 10% of x0's per-coordinate RMS: a point the model never saw."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(probe.d, generator=gen, dtype=torch.float64).to(probe.dtype)
    return probe.x0 + 0.1 * probe.x0.norm() / probe.d ** 0.5 * noise


def _central(probe: ic.Probe, x: torch.Tensor, h: float) -> torch.Tensor:
    """[m, d] central differences (f(x + h e_j) - f(x - h e_j)) / 2h, one batched forward."""
    eye = torch.eye(probe.d, dtype=probe.dtype)
    with torch.no_grad():
        return ((probe.f_batch(x + h * eye) - probe.f_batch(x - h * eye)) / (2 * h)).T


@pytest.fixture(scope="module")
def dense(probe64):
    x = _random_point(probe64, SESSION_SEED)
    return x, jacobian(probe64, x)


def test_dense_jacobian_matches_float64_central_differences(probe64, dense):
    """D(h) = J + c h^2 + O(h^4) (truncation; c = f'''/6) + O(eps |f| / h) (rounding).

    With h = 1e-4 in float64 the rounding term is ~1e-16 * 10 / 1e-4 = 1e-11, and the truncation
    term of D(h/2) is (D(h) - D(h/2)) / 3 up to O(h^4) (Richardson). Measured on random models:
    |J - D(h/2)| equals that estimate to ~1%, and it is ~1e-8 of max|J|. We allow twice the estimate
    plus 1e-9 max|J| for rounding: an error in J above ~1e-7 relative fails.
    """
    x, J = dense
    assert J.shape == (probe64.d, probe64.d) and J.dtype == torch.float64
    h = 1e-4
    D1, D2 = _central(probe64, x, h), _central(probe64, x, h / 2)
    trunc = (D1 - D2).abs().max() / 3
    scale = J.abs().max()
    assert trunc < 1e-5 * scale  # the FD oracle is accurate enough to mean something
    err = (J - D2).abs().max()
    assert err <= 2 * trunc + 1e-9 * scale, (float(err), float(trunc), float(scale))


def test_jacobian_default_point_is_x0_and_chunking_does_not_matter(probe64):
    J = jacobian(probe64)
    assert torch.equal(J, jacobian(probe64, probe64.x0.clone()))
    J7 = jacobian(probe64, chunk_size=7)
    assert torch.allclose(J, J7, rtol=1e-12, atol=1e-12 * float(J.abs().max()))


def test_logits_jacobian_has_shape_vocab_by_d(dirs):
    h = ic.load_model(dirs["llama"], dtype="float64")
    probe = ic.Probe(h, TEXT, target="logits", batch_size=1)
    x = _random_point(probe, SESSION_SEED + 1)
    J = jacobian(probe, x, chunk_size=32)
    assert J.shape == (h.model.config.vocab_size, h.d_model)
    # chain rule: logits = W final_hidden, so J_logits = W J_final_hidden
    Jh = jacobian(ic.Probe(h, TEXT, batch_size=1), x)
    W = h.unembed.weight
    assert torch.allclose(J, W @ Jh, rtol=1e-10, atol=1e-12 * float(J.abs().max()))
    # and one column against central differences
    D = _central(probe, x, 1e-5)
    assert (J - D).abs().max() <= 1e-6 * J.abs().max()


def test_jvp_rows_are_rows_of_J_times_V(probe64, dense):
    x, J = dense
    gen = torch.Generator().manual_seed(SESSION_SEED + 2)
    n = 11
    V = torch.randn(n, probe64.d, generator=gen, dtype=torch.float64)
    JV = jvp_rows(probe64, V, x, chunk=4)  # chunks of 4, 4, 3
    assert JV.shape == (n, probe64.d) and JV.dtype == torch.float64
    ref = V @ J.T
    assert torch.allclose(JV, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_spectrum_reconstructs_J(probe64, dense):
    x, J = dense
    sp = spectrum(probe64, x)
    assert sp.method == "dense"
    S_ref = torch.linalg.svdvals(J)
    np.testing.assert_allclose(sp.S, S_ref.numpy(), rtol=1e-12, atol=1e-12 * float(S_ref[0]))
    assert np.all(np.diff(sp.S) <= 0)
    recon = sp.U @ np.diag(sp.S) @ sp.Vt
    np.testing.assert_allclose(recon, J.numpy(), atol=1e-12 * float(S_ref[0]))
    np.testing.assert_allclose(sp.Vt @ sp.Vt.T, np.eye(len(sp.S)), atol=1e-12)
    assert sp.residual < 1e-12


def _check_sign_convention(Vt: np.ndarray) -> None:
    idx = np.abs(Vt).argmax(axis=1)
    assert np.all(Vt[np.arange(len(Vt)), idx] > 0)


def test_sign_convention_dense(probe64, dense):
    _check_sign_convention(spectrum(probe64, dense[0]).Vt)


def test_top_singular_matches_dense_svd(probe64, dense):
    x, J = dense
    k = 5
    U, S, Vt = torch.linalg.svd(J)
    top = top_singular(probe64, k, x, seed=SESSION_SEED % 1000)
    assert top.S.shape == (k,) and top.Vt.shape == (k, probe64.d) and top.U.shape == (probe64.d, k)
    np.testing.assert_allclose(top.S, S[:k].numpy(), rtol=1e-4)
    assert top.residual <= 1e-4
    _check_sign_convention(top.Vt)
    S = S.numpy()
    checked = 0
    for i in range(k):
        gaps = [S[i - 1] - S[i] if i > 0 else np.inf, S[i] - S[i + 1]]
        if min(gaps) <= 0.01 * S[i]:
            continue  # no spectral gap: the singular vector is not determined
        cos = abs(float(top.Vt[i] @ Vt[i].numpy()))
        assert cos > 0.999, (i, cos)
        checked += 1
    assert checked >= 1
    # U columns are the matching left singular vectors: J v_i = s_i u_i
    Jv = J.numpy() @ top.Vt.T
    np.testing.assert_allclose(Jv, top.U * top.S, atol=1e-3 * S[0])


def test_top_singular_and_dense_directions_agree_in_sign(probe64, dense):
    """With the sign convention, the two methods give the same vectors, not just the same lines."""
    x, J = dense
    sp = spectrum(probe64, x)
    top = top_singular(probe64, 3, x, tol=1e-8, max_iter=500)
    gap_ok = (sp.S[:3] - sp.S[1:4]) > 0.01 * sp.S[:3]
    gap_ok[1:] &= (sp.S[:2] - sp.S[1:3]) > 0.01 * sp.S[1:3]
    for i in np.flatnonzero(gap_ok):
        assert float(top.Vt[i] @ sp.Vt[i]) > 0.999


def test_top_singular_raises_instead_of_returning_unconverged(probe64):
    with pytest.raises(ConvergenceError, match="did not converge"):
        top_singular(probe64, 3, max_iter=1, tol=1e-12)


def test_directions_are_Vt_rounded_once_to_float32(probe32):
    sp = spectrum(probe32)
    assert sp.Vt.dtype == np.float64 and sp.S.dtype == np.float64
    dirs = sp.directions
    assert dirs.dtype == torch.float32 and dirs.shape == sp.Vt.shape
    np.testing.assert_array_equal(dirs.numpy(), sp.Vt.astype(np.float32))
    top = top_singular(probe32, 2)
    np.testing.assert_array_equal(top.directions.numpy(), top.Vt.astype(np.float32))


def test_float32_jacobian_is_close_to_float64(dirs):
    h32, h64 = ic.load_model(dirs["gpt2"]), ic.load_model(dirs["gpt2"], dtype="float64")
    J32 = jacobian(ic.Probe(h32, TEXT, batch_size=1))
    J64 = jacobian(ic.Probe(h64, TEXT, batch_size=1))
    assert J32.dtype == torch.float32
    assert (J32.double() - J64).abs().max() <= 1e-4 * J64.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x_is_rejected(probe32, bad):
    x = probe32.x0.clone()
    x[int(SESSION_SEED % probe32.d)] = bad
    with pytest.raises(ValueError, match="non-finite"):
        jacobian(probe32, x)
    with pytest.raises(ValueError, match="non-finite"):
        spectrum(probe32, x)
    with pytest.raises(ValueError, match="non-finite"):
        top_singular(probe32, 2, x)


@pytest.mark.parametrize("k", [0, -1, "d+1"])
def test_k_out_of_range(probe32, k):
    k = probe32.d + 1 if k == "d+1" else k
    with pytest.raises(ValueError, match="k must be in"):
        top_singular(probe32, k)
