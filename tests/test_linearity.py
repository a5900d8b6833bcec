"""Logit linearity (seed 004): JVP predictions, out-of-place perturbations, the radius, configs and the command.

Oracles: float64 central differences of the logits along the direction (first and second derivative), a
bitwise comparison of every parameter before and after a full run, and a brute-force scan of synthetic
error/cosine curves for the radius, on fresh random models (session seed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import jvp

import instab_core as ic
from instab_core import linearity as L
from instab_core.cli import main
from instab_core.curvature import composite_layer_norm
from randmodels import SESSION_SEED, random_model_dir

PROMPTS = ["The capital of France is", "Animals live"]
RNG = np.random.default_rng(SESSION_SEED)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("scope", ["full", "last_blocks:1", "embeddings", "attention"])
def test_jvp_and_second_derivative_match_float64_central_differences(model_dir, scope):
    h = ic.load_model(model_dir, dtype="float64")
    params = L.scoped_parameters(h, scope)
    primals = {k: p.detach() for k, p in params.items()}
    f = L.logit_function(h, L.encode_prompts(h, PROMPTS))
    delta = L.random_directions(params, 1, seed=SESSION_SEED)[0]
    _, jd = jvp(f, (primals,), (delta,))
    with composite_layer_norm(h.model):
        _, c2 = jvp(lambda p: jvp(f, (p,), (delta,))[1], (primals,), (delta,))
    step = 1e-4
    with torch.no_grad():
        fp, f0, fm = (f(L.perturbed(params, delta, s)) for s in (step, 0.0, -step))
    fd1 = (fp - fm) / (2 * step)
    fd2 = (fp - 2 * f0 + fm) / step**2
    torch.testing.assert_close(jd, fd1, rtol=1e-6, atol=1e-8 * float(fd1.abs().max()))
    torch.testing.assert_close(c2, fd2, rtol=2e-3, atol=2e-3 * float(fd2.abs().max()))


def test_fused_layer_norm_second_derivative_is_wrong_and_the_composite_is_right():
    """Why composite_layer_norm exists: if torch fixes jvp-of-jvp through F.layer_norm, this test says so."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    ln = torch.nn.LayerNorm(8, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
    x, v = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    step = 1e-4
    with torch.no_grad():
        fd2 = (ln(x + step * v) - 2 * ln(x) + ln(x - step * v)) / step**2
    fused = jvp(lambda p: jvp(ln, (p,), (v,))[1], (x,), (v,))[1]
    with composite_layer_norm(ln):
        comp = jvp(lambda p: jvp(ln, (p,), (v,))[1], (x,), (v,))[1]
    torch.testing.assert_close(comp, fd2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused, fd2, rtol=1e-2, atol=1e-3)
    assert type(ln).forward is torch.nn.LayerNorm.forward and "forward" not in vars(ln)


def test_scopes_take_whole_blocks_embeddings_and_attention(model_dir):
    h = ic.load_model(model_dir)
    named = dict(h.model.named_parameters())
    last = L.scoped_parameters(h, "last_blocks:1")
    block = dict(h.layers[h.n_layers - 1].named_parameters())
    assert sorted(last) == sorted(f"{h.adapter.layers}.{h.n_layers - 1}.{n}" for n in block)
    assert L.n_elements(L.scoped_parameters(h, "full")) == sum(p.numel() for p in named.values())
    emb = L.scoped_parameters(h, "embeddings")
    assert all(named[n].ndim == 2 and "emb" in n or "wte" in n or "wpe" in n for n in emb), list(emb)
    attn = L.scoped_parameters(h, "attention")
    assert attn and all(".attn." in n or ".self_attn." in n for n in attn)


def test_directions_are_unit_norm_and_seeded(model_dir):
    h = ic.load_model(model_dir)
    params = L.scoped_parameters(h, "full")
    a = L.random_directions(params, 3, seed=7)
    b = L.random_directions(params, 3, seed=7)
    for da, db in zip(a, b):
        norm = sum(float((v.double() ** 2).sum()) for v in da.values()) ** 0.5
        assert abs(norm - 1) < 1e-6
        assert all(torch.equal(da[k], db[k]) for k in da)


def test_full_run_leaves_the_model_bitwise_unchanged(model_dir):
    h = ic.load_model(model_dir)
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    for scope in ("full", "embeddings"):
        L.analyze(h, PROMPTS, [0.01, 1.0], scope=scope, num_directions=2, seed=SESSION_SEED, progress=False)
    after = h.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)), k


def test_analysis_error_is_second_order_in_float64(model_dir):
    """In float64 the relative error is ≈ ½r‖c₂‖/‖Jδ‖ at small r, and the second-order fit is far better."""
    h = ic.load_model(model_dir, dtype="float64")
    res = L.analyze(h, PROMPTS, [1e-4, 1e-3], scope="full", num_directions=2, seed=SESSION_SEED, progress=False)
    np.testing.assert_allclose(res.relerr, res.predicted_relerr, rtol=0.05)
    assert (res.second_relerr < 0.05 * res.relerr).all()
    assert (res.cos > 1 - 1e-6).all()


def _radius_oracle(radii, e, c, te, tc):
    best = None
    for r in sorted(radii):
        passing = [e[i] <= te and c[i] >= tc for i in range(len(radii)) if radii[i] <= r]
        if all(passing):
            best = r
    return best


def test_radius_on_synthetic_curves_against_a_scan():
    for _ in range(200):
        n = int(RNG.integers(1, 8))
        radii = list(RNG.permutation(np.round(RNG.uniform(0.01, 10, n), 6)))
        e = RNG.uniform(0, 0.4, n)
        c = RNG.uniform(0.9, 1.0, n)
        got = L.linearity_radius(radii, e, c, 0.2, 0.95)
        assert got == _radius_oracle(radii, e, c, 0.2, 0.95)


def test_radius_on_a_non_monotone_curve():
    radii = [0.1, 0.3, 1.0, 3.0]
    e = np.array([0.05, 0.5, 0.1, 0.9])  # fails at 0.3, passes again at 1.0
    c = np.array([0.99, 0.99, 0.99, 0.5])
    assert L.linearity_radius(radii, e, c, 0.2, 0.95) == 0.1
    assert L.largest_passing_radius(radii, e, c, 0.2, 0.95) == 1.0
    assert L.linearity_radius(radii, np.array([0.3, 0.1, 0.1, 0.1]), c, 0.2, 0.95) is None
    assert L.linearity_radius([1.0], np.array([np.nan]), np.array([1.0]), 0.2, 0.95) is None


def test_bad_inputs_have_clear_messages(model_dir):
    h = ic.load_model(model_dir)
    with pytest.raises(ValueError, match="selects no parameters"):
        L.scoped_parameters(h, "regex:^no_such_parameter$")
    with pytest.raises(ValueError, match="between 1 and"):
        L.scoped_parameters(h, "last_blocks:0")
    with pytest.raises(ValueError, match="unknown param_scope"):
        L.scoped_parameters(h, "mlp-ish")
    for radii in ([0.1, 0.0], [-1.0], []):
        with pytest.raises(ValueError, match="radi"):
            L.analyze(h, PROMPTS, radii, num_directions=1, progress=False)
    hb = ic.load_model(model_dir, dtype="bfloat16")
    with pytest.raises(ValueError, match="rounds to nothing"):
        L.analyze(hb, PROMPTS, [0.1], num_directions=1, progress=False)


def test_yaml_wrong_type_names_the_key(tmp_path, capsys):
    for text, key in [("radii: 0.3\n", "radii"), ("num_directions: two\n", "num_directions"),
                      ("cos_threshold: high\n", "cos_threshold"), ("second_order: 3\n", "second_order"),
                      ("analysis:\n  prompts: [1, 2]\n", "prompts")]:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        assert main(["analyze-logits", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"config key {key!r}" in err, err


def test_command_writes_the_seed_report(model_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("The capital of France is\n\nAnimals live\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model_dir}\nanalysis:\n  num_directions: 2\n  radii: [1e-2, 0.1, 1.0]\n"
                   f"  param_scope: last_blocks:1\n  prompts_file: prompts.txt\n  seed: {SESSION_SEED % 1000}\n"
                   f"  output_dir: {tmp_path / 'out'}\n  report_filename: r.json\n  learning_rate: 3\n")
    with pytest.warns(UserWarning, match="learning_rate"):
        assert main(["analyze-logits", str(cfg)]) == 0
    rep = json.loads((tmp_path / "out" / "r.json").read_text())
    assert set(rep) >= {"0.01", "0.1", "1.0", "linearity_radius", "config"}
    for r in ("0.01", "0.1", "1.0"):
        assert set(rep[r]) >= {"mean_relative_error", "std_relative_error", "mean_cosine_similarity",
                               "std_cosine_similarity"}
    assert rep["config"]["prompts"] == ["The capital of France is", "Animals live"]
    e = [rep[r]["mean_relative_error"] for r in ("0.01", "0.1", "1.0")]
    c = [rep[r]["mean_cosine_similarity"] for r in ("0.01", "0.1", "1.0")]
    assert rep["linearity_radius"] == _radius_oracle([0.01, 0.1, 1.0], e, c, 0.2, 0.95)
    assert "linearity radius" in capsys.readouterr().out
