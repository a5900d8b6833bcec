"""Stage sweeps against direct per-stage computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import fp, sweep
from randmodels import SESSION_SEED

PROMPT = "The capital of France is"



def _direction(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def test_hidden_stages_equal_hf_hidden_states_at_batch1(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=1)
    d = _direction(probe.d, SESSION_SEED)
    sw = sweep.stage_sweep(probe, d, np.array([3e-3]))
    emb = probe.embeds(sw.X)
    hs = handle.base(inputs_embeds=emb, output_hidden_states=True, use_cache=False).hidden_states
    p = probe.position
    for i in range(handle.n_layers - 1):
        assert torch.equal(sw.outputs[f"layer_out[{i}]"][0], hs[i + 1][0, p])
    assert torch.equal(sw.outputs["final_norm"][0], hs[-1][0, p])
    assert torch.equal(sw.outputs["embedding"][0], sw.X[0])


def test_submodules_equal_a_manual_forward_of_the_layer(handle):
    """Norms, attention output, MLP of a layer, recomputed by hand from the layer's input at batch 1."""
    probe = ic.Probe(handle, PROMPT, batch_size=1)
    layer = handle.n_layers - 1
    stages = ("input_norm", "o", "post_attn_norm", "up", "down", "mlp")
    sw = sweep.stage_sweep(probe, _direction(probe.d, SESSION_SEED + 1), np.array([1e-3]),
                           submodule_layers=(layer,), submodules=stages)
    emb = probe.embeds(sw.X)
    hs = handle.base(inputs_embeds=emb, output_hidden_states=True, use_cache=False).hidden_states
    x_in = hs[layer]  # the layer's input [1, L, d]
    p = probe.position
    m = lambda s: handle.stage_module(layer, s)  # noqa: E731
    normed = m("input_norm")(x_in)
    assert torch.equal(sw.outputs[f"layer{layer}.input_norm"][0], normed[0, p])
    attn_out = sw.outputs[f"layer{layer}.o"][0]
    h_mid = x_in[0, p] + attn_out  # residual after attention
    post = m("post_attn_norm")(h_mid[None, None])[0, 0]
    assert torch.equal(sw.outputs[f"layer{layer}.post_attn_norm"][0], post)
    # The model runs the projections over the whole sequence (a different GEMM shape from this one
    # row), so their bits may differ: equal to float32 rounding, not bitwise.
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sw.outputs[f"layer{layer}.up"][0], m("up")(post[None, None])[0, 0], **close)
    torch.testing.assert_close(sw.outputs[f"layer{layer}.mlp"][0], m("mlp")(post[None, None])[0, 0], **close)
    assert torch.equal(sw.outputs[f"layer{layer}.down"][0], sw.outputs[f"layer{layer}.mlp"][0])


def test_metrics_match_a_plain_loop(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=4)
    scales = np.array([0.0, 1e-8, 1e-5, 1e-2])
    sw = sweep.stage_sweep(probe, _direction(probe.d, SESSION_SEED + 2), scales)
    stage = f"layer_out[{handle.n_layers - 1}]"
    rows = sw.table[sw.table.stage == stage].reset_index(drop=True)
    ref = sw.reference[stage].numpy().astype(np.float64)
    for k in range(len(scales)):
        a = sw.outputs[stage][k].numpy()
        diff = a.astype(np.float64) - ref
        assert rows.changed[k] == sum(int(x.tobytes() != y.tobytes()) for x, y in zip(a, sw.reference[stage].numpy()))
        assert rows.max_abs[k] == np.abs(diff).max()
        assert rows.l2[k] == pytest.approx(np.sqrt((diff ** 2).sum()), rel=1e-12)
        assert rows["abs>1e-04"][k] == int((np.abs(diff) > 1e-4).sum())
        ulp_total = sum(rows[c][k] for c in sweep.ULP_LABELS)
        assert ulp_total == a.shape[0]
        assert rows["ulp=0"][k] == a.shape[0] - rows.changed[k]
    assert rows.changed[0] == 0  # scale 0 is x0 itself, computed in the same batch shape


def test_input_response_is_a_scan_of_the_input_rows(handle):
    """Scales that leave the float32 input row bitwise x0, and at the first that moves it, the coordinates moved
    and the share of a stage's coordinates changed: the same as a direct comparison, scale by scale."""
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    scales = np.concatenate([[0.0, 1e-13], np.logspace(-9, -3, 5)])
    sw = sweep.stage_sweep(probe, _direction(probe.d, SESSION_SEED + 4), scales)
    got = sw.input_response("layer_out[0]")
    x0 = probe.x0.numpy()
    moved = [k for k in range(len(scales)) if sw.X[k].numpy().tobytes() != x0.tobytes()]
    assert got["scales"] == len(scales) and got["scales_input_unchanged"] == len(scales) - len(moved) >= 2
    k = moved[0]
    assert got["first_input_change"] == k
    assert got["input_coords_changed"] == int((sw.X[k].numpy() != x0).sum()) > 0
    out, ref = sw.outputs["layer_out[0]"][k].numpy(), sw.reference["layer_out[0]"].numpy()
    assert got["stage_pct_changed"] == pytest.approx(100 * np.mean([a.tobytes() != b.tobytes() for a, b in zip(out, ref)]))


def test_rows_do_not_depend_on_their_batch_companions(handle):
    probe = ic.Probe(handle, PROMPT, batch_size=8)
    d = _direction(probe.d, SESSION_SEED + 3)
    scales = np.logspace(-9, -2, 11)
    together = sweep.capture(probe, sweep.states(probe, d, scales))
    one = sweep.capture(probe, sweep.states(probe, d, scales[5:6]))
    for stage, out in together.items():
        assert torch.equal(out[5], one[stage][0]), stage


def test_changed_coordinates_lists_ulp_distances():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0, float(fp.next_up(torch.tensor(2.0))), 3.0])
    assert sweep.changed_coordinates(a, b) == [(1, 1)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(scales=np.array([])), "non-empty"),
    (dict(submodule_layers=(99,), submodules=("mlp",)), "out of range"),
    (dict(submodule_layers=(0,), submodules=("nope",)), "unknown submodule"),
    (dict(mode="fp16"), "mode"),
])
def test_bad_inputs_get_clear_errors(handle, kwargs, message):
    probe = ic.Probe(handle, PROMPT, batch_size=2)
    args = dict(direction=_direction(probe.d, 0), scales=np.array([1e-6]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sweep.stage_sweep(probe, **args)
