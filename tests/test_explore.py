"""Live explorers: each control redraws from the kernel for that one setting, and batch runs skip them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import boundary, decision, explore, linearity
from randmodels import SESSION_SEED

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def probe():
    return ic.Probe(ic.load_model("tiny-llama"), PROMPT, batch_size=16)


def _rays(probe: ic.Probe, n: int) -> torch.Tensor:
    D = torch.randn(n, probe.d, generator=torch.Generator().manual_seed(SESSION_SEED), dtype=torch.float64)
    return (D / D.norm(dim=1, keepdim=True)).float()


def test_batch_runs_skip_explorers(monkeypatch, capsys):
    monkeypatch.setenv(ic.book.BATCH_ENV, "1")
    assert not explore.live()
    assert explore.show(lambda: pytest.fail("an explorer was built in a batch run")) is None
    assert capsys.readouterr().out.strip() == explore.SKIPPED
    monkeypatch.delenv(ic.book.BATCH_ENV)
    assert explore.live()  # pytest's parent is no papermill


def test_ray_slider_shows_that_rays_states(probe):
    D = _rays(probe, 4)
    ex = explore.ray_explorer(probe, D, s_max=1e-7, max_states=40)
    assert ex.draws == 1 and ex.status.value.startswith("drawn in")
    for ray in (2, 3):
        ex.controls["ray"].value = ray
        states = boundary.ray_states(probe, D[ray], 1e-7, mode="fp64", max_states=40)
        shown = np.concatenate([t.x for t in ex.figure.data if t.yaxis == "y2"])  # input-change panel: every state
        np.testing.assert_array_equal(np.sort(shown), states.s.to_numpy())
    assert ex.draws == 3


def test_an_impossible_control_value_is_reported_and_the_figure_kept(probe):
    ex = explore.ray_explorer(probe, _rays(probe, 2), s_max=1e-7, max_states=20)
    before = ex.figure
    ex.controls["s_max"].value = 1e-10  # below every ray's first input change
    assert "raise s_max" in ex.status.value and ex.figure is before and ex.draws == 1


def test_gap_grid_window_is_recomputed_and_the_overlay_toggle_is_not(probe, monkeypatch):
    calls = []
    real = decision.gap_grid
    monkeypatch.setattr(decision, "gap_grid", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    D = _rays(probe, 3)
    ex = explore.gap_grid_explorer(probe, probe.x0, D, [(1, 2), (1, 3)], pair=(1, 2), half_width=1e-7, cells=11)
    ex.controls["lattice"].value = False
    assert len(calls) == 1
    ex.controls["half_width"].value = 1e-9
    assert len(calls) == 2 and calls[-1].min() == pytest.approx(-1e-9) and calls[-1].max() == pytest.approx(1e-9)
    direct = real(probe, probe.x0, D[0], D[1], calls[-1], calls[-1], pair=(1, 2), audit=False)
    np.testing.assert_array_equal(ex.figure.data[0].z, np.asarray(direct.G).T)  # a true zoom, not a resampling


def test_frame_slider_draws_each_frame_once():
    drawn = []
    ex = explore.frame_explorer("frames", [0, 1, 2], lambda k: drawn.append(k) or ic.plots.line([0, 1], {"y": [k, k]}),
                                "step")
    for k in (1, 2, 1, 0):
        ex.controls["key"].value = k
        assert list(ex.figure.data[0].y) == [k, k]
    assert drawn == [0, 1, 2]


def test_linearity_explorer_point_equals_the_kernel(probe):
    h = probe.handle
    prompts, radii = ["The capital of France is"], [1e-2, 1.0]
    res = linearity.analyze(h, prompts, radii, scope="last_blocks:1", num_directions=2, seed=3, second_order=False,
                            progress=False)
    resp = linearity.step_response(h, prompts, "last_blocks:1", 1, 2, seed=3)
    for j, r in enumerate(radii):
        relerr, cos = linearity.relerr_cos(*resp.at(r))
        assert relerr[0] == res.relerr[1, j, 0] and cos[0] == res.cos[1, j, 0]
    ex = explore.linearity_explorer(h, prompts, ["last_blocks:1"], 2, seed=3, radius=1.0)
    ex.controls["direction"].value = 1
    assert f"relative error {res.relerr[1, 1, 0]:.3g}" in ex.figure.layout.title.text


def test_fisher_explorer_kl_equals_the_studys_sweep():
    from instab_core import fisher
    from instab_core.zoo.corpus import ANIMAL_SENTENCES, ANIMALS_WORD

    h = ic.load_model("tiny-llama")
    st = fisher.study(h, ANIMAL_SENTENCES[:3], word=ANIMALS_WORD, layers=[1], k=1, scales=[1.0], kl_levels=[],
                      progress=False)
    ex = explore.fisher_explorer(h, st, ANIMALS_WORD, alpha=1.0, top=5)
    kept = st.sites.index[st.sites.used].tolist()
    row = st.sweeps[(st.sweeps.kind == "seed") & (st.sweeps.site == kept[0]) & (st.sweeps.layer == 1)
                    & (st.sweeps.label == 1.0)].iloc[0]
    assert f"KL = {row.kl:.3g} nats" in ex.figure.layout.title.text
    assert list(ex.figure.data[0].x) == [repr(t) for t in row.top_tokens]
    assert list(ex.figure.data[0].y) == pytest.approx(row.top_probs, rel=1e-5)


def test_trace_step_frames_show_each_steps_stage_differences(tmp_path):
    from instab_core import trace as tr

    h = ic.load_model("tiny-llama")
    a = tr.capture(h, PROMPT, tmp_path / "a", steps=4, stop_at_eos=False, progress=False)
    b = tr.capture(ic.load_model("tiny-llama", dtype="bfloat16"), PROMPT, tmp_path / "b", steps=4, stop_at_eos=False,
                   progress=False)
    c = tr.compare(a, b)
    steps = explore.frame_steps(c.last_step)
    assert steps[-1] == c.last_step and steps == sorted(set(steps))
    frames = explore.trace_step_frames(c, steps)
    for step, fig in frames.items():
        expected = c.at(step)["rel_l2"]
        assert list(fig.data[0].x) == c.stages
        np.testing.assert_array_equal(fig.data[0].y, expected.where(expected > 0).to_numpy(dtype=np.float64))
    ex = explore.trace_step_explorer(c)
    assert ex.figure is not None and ex.controls["key"].value == c.last_step, ex.status.value
