"""The exact boundary kernel against a brute-force scan of every distinct input state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import boundary, fp
from instab_core.results import start_run
from oracles import first_change_scan, g, ray_breakpoints
from randmodels import SESSION_SEED, random_model_dir

PROMPT = "The capital of France is"



def _directions(probe: ic.Probe, rays: int, seed: int) -> np.ndarray:
    gen = np.random.default_rng(seed)
    D = gen.standard_normal((rays, probe.d))
    spec = ic.jacobian.spectrum(probe)
    D[0], D[1] = spec.Vt[0], spec.Vt[-1]
    return (D / np.linalg.norm(D, axis=1, keepdims=True)).astype(np.float32)


def brute_force(probe: ic.Probe, d: np.ndarray, s_max: float, mode: str, threshold: float):
    """Every distinct input state up to s_max (oracle lattice), every one evaluated; first change by a loop."""
    x0 = probe.x0.float().numpy()
    bps = ray_breakpoints(x0, d, s_max, mode, limit=100_000)
    X = np.stack([np.array([g(xi, s, di, mode) for xi, di in zip(x0, d)]) for s in bps])
    out = probe.forward(torch.from_numpy(X)).numpy()
    k = first_change_scan(out, probe.reference.numpy(), threshold)
    return bps, k, X, out


def short_s_max(probe: ic.Probe, d: np.ndarray, mode: str, states: int = 25) -> float:
    """A scale that leaves about ``states`` distinct inputs on the ray (a short ray)."""
    bps = ray_breakpoints(probe.x0.float().numpy(), d, 1e-5, mode, limit=states)
    return float(bps[min(states, len(bps)) - 1])


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
@pytest.mark.parametrize("thresholded", [False, True])
def test_exact_matches_brute_force(handle, mode, thresholded):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = _directions(probe, 5, SESSION_SEED)
    for r, d in enumerate(D):
        s_max = short_s_max(probe, d, mode)
        threshold = 0.0
        if thresholded:  # a threshold that some states stay under, so the model "absorbs" them
            _, _, _, out = brute_force(probe, d, s_max, mode, 0.0)
            delta = np.abs(out.astype(np.float64) - probe.reference.numpy()).max(axis=1)
            threshold = float(np.quantile(delta, 0.6))
        bps, k, X, out = brute_force(probe, d, s_max, mode, threshold)
        res = boundary.first_output_change(probe, torch.from_numpy(d), s_max, mode=mode, threshold=threshold,
                                           progress=False)
        assert res.s_in[0] == bps[0]
        if k < 0:
            assert res.status[0] == "stable" and np.isnan(res.s_out[0]) and res.absorbed[0] == len(bps)
            continue
        assert res.status[0] == "found", f"ray {r}"
        assert res.s_out[0] == bps[k], f"ray {r}: kernel {res.s_out[0]!r}, brute force {bps[k]!r}"
        assert res.absorbed[0] == k
        assert res.s_below[0] == np.nextafter(bps[k], np.float32(0))
        assert res.emb_l2[0] == pytest.approx(np.linalg.norm(X[k].astype(np.float64) - probe.x0.numpy()), rel=1e-12)
        assert res.hid_l2[0] == pytest.approx(
            np.linalg.norm(out[k].astype(np.float64) - probe.reference.numpy()), rel=1e-12)


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_ray_states_is_the_brute_force_profile_of_one_ray(handle, mode):
    """The explorer's kernel: every input state along the ray, with the output at each, equals the brute-force
    scan, and its first changed state is the boundary kernel's s_out with the same number absorbed."""
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    d = _directions(probe, 3, SESSION_SEED + 7)[2]
    s_max = short_s_max(probe, d, mode, states=30)
    bps, k, X, out = brute_force(probe, d, s_max, mode, 0.0)
    states = boundary.ray_states(probe, torch.from_numpy(d), s_max, mode=mode)
    np.testing.assert_array_equal(states.s.to_numpy(), bps)
    np.testing.assert_array_equal(states.coords_changed.to_numpy(), (X != probe.x0.numpy()).sum(axis=1))
    ref = probe.reference.numpy().astype(np.float64)
    np.testing.assert_allclose(states.output_l2.to_numpy(), np.linalg.norm(out - ref, axis=1), rtol=1e-12)
    brute_changed = np.array([row.tobytes() != probe.reference.numpy().tobytes() for row in out])
    np.testing.assert_array_equal(states.changed.to_numpy(), brute_changed)
    res = boundary.first_output_change(probe, torch.from_numpy(d), s_max, mode=mode, progress=False)
    if k >= 0:
        assert res.s_out[0] == states.s[states.changed].iloc[0] and res.absorbed[0] == k
    capped = boundary.ray_states(probe, torch.from_numpy(d), s_max, mode=mode, max_states=5)
    np.testing.assert_array_equal(capped.s.to_numpy(), bps[:5])


def test_lattice_summary_counts_rays_found_at_their_first_input_change(handle):
    """rays_sout_eq_sin counts found rays with nothing absorbed; the median ratio is over found rays only."""
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = torch.from_numpy(_directions(probe, 6, SESSION_SEED + 9))
    res = boundary.first_output_change(probe, D, 1e-6, progress=False)
    got = res.lattice_summary()
    found = [r for r in range(6) if res.status[r] == "found"]
    assert got["rays_found"] == len(found) > 0
    assert got["rays_sout_eq_sin"] == sum(res.s_out[r] == res.s_in[r] for r in found)
    assert got["median_sout_over_sin"] == pytest.approx(float(np.median([float(res.s_out[r]) / float(res.s_in[r])
                                                                          for r in found])))


def test_batched_rays_equal_one_ray_at_a_time(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = torch.from_numpy(_directions(probe, 12, SESSION_SEED + 1))
    together = boundary.first_output_change(probe, D, 1e-6, progress=False)
    for r in range(0, 12, 5):
        alone = boundary.first_output_change(probe, D[r:r + 1], 1e-6, progress=False)
        assert alone.s_out[0] == together.s_out[r] or np.isnan(alone.s_out[0]) and np.isnan(together.s_out[r])
        assert alone.absorbed[0] == together.absorbed[r]
    idx = np.array([0, 5, 10])  # the page compares a sample of rays through rays(idx)
    assert together.rays(idx).table().equals(together.table().iloc[idx].reset_index(drop=True))


def test_spaced_rays_are_distinct_sorted_and_keep_both_ends():
    rng = np.random.default_rng(SESSION_SEED)
    for n, k in [(1, 1), (5, 10), (1000, 200), *zip(rng.integers(1, 500, 20), rng.integers(0, 600, 20))]:
        got = boundary.spaced_rays(int(n), int(k))
        assert len(got) == len(set(got.tolist())) <= min(n, k) and (np.diff(got) > 0).all()
        if k >= 2:
            assert got[0] == 0 and got[-1] == n - 1
        if k >= n:
            assert got.tolist() == list(range(n)), "asking for every ray gives every ray"
    with pytest.raises(ValueError, match="k >= 0"):
        boundary.spaced_rays(10, -1)


def test_batch1_semantics_matches_brute_force_at_batch1(handle):
    probe1 = ic.Probe(handle, PROMPT, batch_size=1)
    d = _directions(probe1, 3, SESSION_SEED + 2)[2]
    s_max = short_s_max(probe1, d, "fp32")
    bps, k, _, _ = brute_force(probe1, d, s_max, "fp32", 0.0)
    res = boundary.first_output_change(ic.Probe(handle, PROMPT, batch_size=8), torch.from_numpy(d), s_max,
                                       semantics="batch1", progress=False)
    assert res.params["batch_size"] == 1
    if k >= 0:
        assert res.s_out[0] == bps[k] and res.absorbed[0] == k
    else:
        assert res.status[0] == "stable"


def test_bisect_finds_the_same_boundary_when_the_change_is_monotone(handle):
    """The seed's method on bits equals the exact answer on rays where every later state also changed."""
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = torch.from_numpy(_directions(probe, 6, SESSION_SEED + 3))
    exact = boundary.first_output_change(probe, D, 1e-6, progress=False)
    bis = boundary.first_output_change(probe, D, 1e-6, method="bisect", progress=False)
    assert bis.states.max() <= 33
    np.testing.assert_array_equal(bis.s_in, exact.s_in)
    disagree = boundary.compare_methods(exact, bis)
    for r in range(len(D)):
        if r in set(disagree.ray):
            assert bis.s_out[r] > exact.s_out[r]  # bisection can only land on a later transition
        else:
            assert bis.absorbed[r] == exact.absorbed[r]


class ParityProbe:
    """Output = parity of the number of moved coordinates: "changed" is not monotone in s.

    A stand-in for the model in a test of the search logic only (the real-model tests are above).
    """

    def __init__(self, d: int, seed: int, batch_size: int = 4, position_dependent: bool = False):
        gen = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(d, generator=gen) * 0.05
        self.dtype = torch.float32
        self.d = d
        self.batch_size = batch_size
        self.rows_evaluated = 0
        self.position_dependent = position_dependent
        self.reference = self.forward(self.x0[None])[0]

    def f_batch(self, X: torch.Tensor) -> torch.Tensor:
        moved = (~fp.bits_equal(X, self.x0.expand_as(X))).sum(dim=1) % 2
        out = moved.float()[:, None]
        if self.position_dependent:
            out = out + 1e-3 * torch.arange(X.shape[0]).float()[:, None]
        return out

    def forward(self, X: torch.Tensor, progress: bool = False) -> torch.Tensor:
        pad = (-X.shape[0]) % self.batch_size
        Xp = torch.cat([X, self.x0.expand(pad, -1)]) if pad else X
        self.rows_evaluated += Xp.shape[0]
        return torch.cat([self.f_batch(c) for c in Xp.split(self.batch_size)])[: X.shape[0]]

    def with_batch_size(self, b: int) -> "ParityProbe":
        return self


def test_exact_is_not_fooled_by_non_monotone_change():
    probe = ParityProbe(16, SESSION_SEED)
    gen = np.random.default_rng(SESSION_SEED)
    D = gen.standard_normal((20, 16)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    s_max = 2e-7
    exact = boundary.first_output_change(probe, torch.from_numpy(D), s_max, audit=False, progress=False)
    bis = boundary.first_output_change(probe, torch.from_numpy(D), s_max, method="bisect", audit=False,
                                       progress=False)
    x0 = probe.x0.numpy()
    wrong = 0
    for r, d in enumerate(D):
        bps = ray_breakpoints(x0, d, s_max, "fp32", limit=100_000)
        parity = [int((np.array([g(xi, s, di, "fp32") for xi, di in zip(x0, d)]).view(np.int32)
                       != x0.view(np.int32)).sum() % 2) for s in bps]
        k = parity.index(1)
        assert exact.s_out[r] == bps[k] and exact.absorbed[r] == k
        wrong += int(not (bis.s_out[r] == bps[k]))
    assert wrong > 0, "bisection should miss the first change on some non-monotone rays"
    assert len(boundary.compare_methods(exact, bis)) == wrong


def test_position_dependent_batches_are_refused():
    probe = ParityProbe(8, SESSION_SEED, position_dependent=True)
    with pytest.raises(boundary.BatchVarianceError, match="semantics='batch1'"):
        boundary.first_output_change(probe, torch.ones(1, 8) / 8 ** 0.5, 1e-6, progress=False)


def test_max_states_caps_the_work(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = torch.from_numpy(_directions(probe, 2, SESSION_SEED + 4))
    res = boundary.first_output_change(probe, D, 1e-4, threshold=1e9, max_states=6, progress=False)
    assert list(res.status) == ["capped", "capped"]
    assert (res.states <= 6 + 4).all() and np.isnan(res.s_out).all()


def test_interrupted_run_resumes_from_checkpoint(handle, tmp_path):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = torch.from_numpy(_directions(probe, 8, SESSION_SEED + 5))
    full = boundary.first_output_change(probe, D, 1e-6, ray_block=4, progress=False)

    class Interrupt(Exception):
        pass

    run = start_run("test-boundary", {"rays": 8}, model=handle, root=tmp_path)
    saves = []

    class FailingSecondSave:
        def load(self, key):
            return run.load(key)

        def save(self, key, arrays):
            if saves:
                raise Interrupt
            saves.append(key)
            run.save(key, arrays)

    with pytest.raises(Interrupt):
        boundary.first_output_change(probe, D, 1e-6, ray_block=4, checkpoint=FailingSecondSave(), progress=False)
    run.release()  # the interrupted process is gone
    again = start_run("test-boundary", {"rays": 8}, model=handle, root=tmp_path)
    assert again.resumed and again.partial_path == run.partial_path
    resumed = boundary.first_output_change(probe, D, 1e-6, ray_block=4, checkpoint=again, progress=False)
    np.testing.assert_array_equal(resumed.s_out, full.s_out)
    np.testing.assert_array_equal(resumed.absorbed, full.absorbed)
    assert resumed.rows < full.rows  # the first block came from the checkpoint


@pytest.mark.parametrize("bad, message", [
    (dict(s_max=0.0), "s_max must be a positive"),
    (dict(s_max=-1e-6), "s_max must be a positive"),
    (dict(s_max=float("nan")), "s_max must be a positive"),
    (dict(threshold=-1.0), "threshold"),
    (dict(directions=torch.zeros(2, 0)), "shape"),
    (dict(directions="zero"), "zero norm"),
    (dict(directions="nan"), "non-finite"),
    (dict(method="walk"), "method"),
    (dict(mode="fp16"), "mode"),
])
def test_bad_inputs_get_clear_errors(handle, bad, message):
    probe = ic.Probe(handle, PROMPT, batch_size=4)
    kwargs = dict(directions=torch.ones(1, probe.d) / probe.d ** 0.5, s_max=1e-6, progress=False)
    kwargs.update(bad)
    if kwargs["directions"] == "zero":
        kwargs["directions"] = torch.zeros(1, probe.d)
    elif kwargs["directions"] == "nan":
        kwargs["directions"] = torch.full((1, probe.d), float("nan"))
    with pytest.raises(ValueError, match=message):
        boundary.first_output_change(probe, **kwargs)


def test_low_precision_models_are_refused(tmp_path):
    h = ic.load_model(random_model_dir(tmp_path, "llama"), dtype="bfloat16")
    with pytest.raises(ValueError, match="float32 or float64"):
        boundary.first_output_change(ic.Probe(h, PROMPT, batch_size=2), torch.ones(1, h.d_model), 1e-6)


def test_crossing_distances_verify_and_match_a_dense_jacobian(handle):
    """Each found boundary re-verifies, and linear_response equals ‖J Δx‖ with the dense J."""
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    D = torch.from_numpy(_directions(probe, 4, SESSION_SEED + 6))
    res = boundary.first_output_change(probe, D, 1e-6, progress=False)
    table = boundary.crossing_distances(probe, D, res.s_out, res.s_below, "fp32", 0.0, sigma_1=1.0)
    found = np.isfinite(res.s_out)
    assert (table.unchanged_below[found] & table.changed_at[found]).all()
    J = ic.jacobian.jacobian(probe).double()
    for r in np.flatnonzero(found):
        dx = fp.perturb(probe.x0, torch.tensor(res.s_out[r]), D[r], "fp32").double() - probe.x0.double()
        assert table.linear_response[r] == pytest.approx(float((J @ dx).norm()), rel=1e-4)
        assert table.emb_l2[r] == pytest.approx(float(dx.norm()), rel=1e-12)


# --- prefix_cache: the last token against a KV cache of the prompt prefix -------------------------

def direct_cached(handle, probe: ic.Probe, X: np.ndarray) -> np.ndarray:
    """Oracle for the prefix-cache semantics, written with Hugging Face's own API only: the prefix run
    once at batch 1 with ``use_cache``, its cache repeated to ``batch_size`` rows, then each padded
    chunk of rows as the last token (final hidden state = HF ``hidden_states[-1]``, after the final norm)."""
    ids = probe.ids
    b = probe.batch_size
    rows = torch.as_tensor(X, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for start in range(0, rows.shape[0], b):
            chunk = rows[start:start + b]
            k = chunk.shape[0]
            chunk = torch.cat([chunk, probe.x0.expand(b - k, -1)]) if k < b else chunk
            prefix = handle.model(input_ids=ids[None, :-1], use_cache=True)
            cache = prefix.cache
            cache.batch_repeat_interleave(b)
            res = handle.model(inputs_embeds=chunk[:, None, :], cache=cache, use_cache=True,
                               output_hidden_states=True)
            out.append(res.hidden_states[-1][:k, 0].numpy())
    return np.concatenate(out)


def test_prefix_cached_forward_equals_a_direct_cached_evaluation(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    cached = boundary.prefix_cached(probe)
    gen = torch.Generator().manual_seed(SESSION_SEED)
    X = probe.x0 + 1e-3 * torch.randn(11, probe.d, generator=gen)
    want = direct_cached(handle, probe, X.numpy())
    got = cached.forward(X).numpy()
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    ref = direct_cached(handle, probe, probe.x0[None].numpy())[0]
    np.testing.assert_array_equal(cached.reference.numpy().view(np.int32), ref.view(np.int32))
    # Relation to the full-sequence semantics: the same function, agreeing to rounding (not bitwise).
    full = probe.forward(X).double()
    scale = full.abs().max()
    assert ((cached.forward(X).double() - full).abs().max() / scale) < 1e-5
    # Every target is the last position's tensor, as in the full-sequence probe.
    for target in ("logits", "pre_norm", "layer_out[0]"):
        p = ic.Probe(handle, PROMPT, target=target, batch_size=4)
        c = boundary.prefix_cached(p)
        assert c.reference.shape == p.reference.shape
        assert ((c.reference.double() - p.reference.double()).abs().max() / p.reference.abs().max()) < 1e-5


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_prefix_cache_boundary_matches_brute_force_of_the_direct_evaluation(handle, mode):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    ref = direct_cached(handle, probe, probe.x0[None].numpy())[0]
    D = _directions(probe, 4, SESSION_SEED + 7)
    x0 = probe.x0.float().numpy()
    for r, d in enumerate(D):
        s_max = short_s_max(probe, d, mode)
        bps = ray_breakpoints(x0, d, s_max, mode, limit=100_000)
        X = np.stack([np.array([g(xi, s, di, mode) for xi, di in zip(x0, d)]) for s in bps])
        k = first_change_scan(direct_cached(handle, probe, X), ref, 0.0)
        res = boundary.first_output_change(probe, torch.from_numpy(d), s_max, mode=mode, prefix_cache=True,
                                           progress=False)
        assert res.params["prefix_cache"] and res.params["tokens_per_row"] == 1
        if k < 0:
            assert res.status[0] == "stable" and res.absorbed[0] == len(bps)
            continue
        assert res.status[0] == "found" and res.s_out[0] == bps[k], f"ray {r}"
        assert res.absorbed[0] == k


def test_prefix_cache_needs_the_last_token(handle):
    probe = ic.Probe(handle, PROMPT, position=2, batch_size=4)
    with pytest.raises(ValueError, match="last one"):
        boundary.first_output_change(probe, torch.ones(1, probe.d) / probe.d ** 0.5, 1e-6, prefix_cache=True,
                                     progress=False)


def test_prefix_cache_batch1_and_the_cached_probe_reused(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    cached = boundary.prefix_cached(probe)
    D = torch.from_numpy(_directions(probe, 3, SESSION_SEED + 8))
    a = boundary.first_output_change(probe, D, 1e-6, prefix_cache=True, progress=False)
    b = boundary.first_output_change(cached, D, 1e-6, progress=False)
    np.testing.assert_array_equal(a.s_out, b.s_out)
    c = boundary.first_output_change(cached, D, 1e-6, semantics="batch1", progress=False)
    assert c.params["batch_size"] == 1 and c.params["prefix_cache"]
    assert isinstance(cached.with_batch_size(1), boundary.PrefixCachedProbe)
