"""Generation traces and their comparison, against HF forwards, brute-force scans and planted differences.

Fresh random models (session seed) for every oracle; the planted-difference tests edit a real trace's
arrays at a random step and stage and check that compare/localise find exactly that place.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import trace as tr
from randmodels import SESSION_SEED, random_model_dir

PROMPT = "The capital of France is"
RNG = np.random.default_rng(SESSION_SEED)



@pytest.fixture(scope="module")
def base_trace(handle, tmp_path_factory):
    return tr.capture(handle, PROMPT, tmp_path_factory.mktemp("t") / "a", steps=12, stages="all",
                      stop_at_eos=False, chunk=5, progress=False)


def _planted_copy(src: tr.Trace, dst, edit) -> tr.Trace:
    """A copy of a trace folder whose concatenated arrays are edited by ``edit`` and rewritten as one chunk."""
    shutil.copytree(src.path, dst)
    arrays = {k: v.copy() for k, v in src.arrays.items()}
    edit(arrays)
    for f in (dst / "steps").glob("*.npz"):
        f.unlink()
    np.savez(dst / "steps" / "000000.npz", **arrays)
    return tr.Trace(dst)


def test_capture_matches_hf_hidden_states_at_every_step(handle, base_trace):
    """Stage outputs are the states that produced each token: HF's hidden states of the same prefix."""
    ids = torch.tensor(base_trace.prompt_ids + base_trace.tokens.tolist())
    L = len(base_trace.prompt_ids)
    with torch.no_grad():
        out = handle.model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    for t in range(base_trace.n_steps):
        pos = L + t - 1
        assert int(out.logits[0, pos].argmax()) == int(base_trace.tokens[t])
        for i in range(handle.n_layers - 1):  # HF's last entry is after the final norm
            torch.testing.assert_close(base_trace.stage(f"layer_out[{i}]")[t], hs[i + 1][0, pos], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base_trace.stage("final_norm")[t], hs[-1][0, pos], rtol=1e-5, atol=1e-5)
        # the token-embedding row of the token fed at that position (GPT-2's hs[0] adds positions)
        torch.testing.assert_close(base_trace.stage("embedding")[t], handle.embedding.weight[ids[pos]], rtol=0, atol=0)
        top = torch.topk(out.logits[0, pos], 10)
        np.testing.assert_array_equal(base_trace.arrays["topk_ids"][t][:3], top.indices[:3].numpy())


def test_kv_cache_and_full_recompute_agree_up_to_rounding(handle, base_trace, tmp_path):
    """Without the cache: the same tokens unless the cached run's top two were within rounding of a tie,
    and states equal to float32 rounding (not necessarily bitwise)."""
    full = tr.capture(handle, PROMPT, tmp_path / "b", steps=12, stages="all", use_cache=False, stop_at_eos=False,
                      progress=False)
    comp = tr.compare(base_trace, full)
    if comp.divergence is not None:
        gap = np.diff(base_trace.arrays["topk_logits"][comp.divergence][:2])[0]
        assert abs(gap) < 1e-4 * np.abs(base_trace.arrays["topk_logits"][comp.divergence][0]) + 1e-6
    for stage in comp.stages:
        a = base_trace.stage(stage)[:comp.last_step + 1]
        b = full.stage(stage)[:comp.last_step + 1]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    emb = tr.embedding_identity(comp)
    assert emb["bitwise_equal_rows"] == emb["steps"]


def test_divergence_and_first_stage_found_where_planted(handle, base_trace, tmp_path):
    step = int(RNG.integers(1, base_trace.n_steps))
    stages = base_trace.stages
    k = int(RNG.integers(1, len(stages)))
    planted = stages[k]

    def edit(arr):
        arr["token"][step:] = (arr["token"][step:] + 1) % handle.model.config.vocab_size
        for name in stages[k:]:  # the change propagates downstream of the planted stage
            col = int(RNG.integers(arr[f"stage:{name}"].shape[1]))
            x = arr[f"stage:{name}"]
            x[step, col] = np.nextafter(x[step, col], np.float32(np.inf))

    b = _planted_copy(base_trace, tmp_path / "planted", edit)
    comp = tr.compare(base_trace, b)
    # brute force: first differing token id, then the first stage (network order) with any differing bit
    brute_div = next(t for t in range(base_trace.n_steps) if base_trace.tokens[t] != b.tokens[t])
    brute_stage = next(s for s in stages
                       if not np.array_equal(base_trace.arrays[f"stage:{s}"][brute_div].view(np.int32),
                                             b.arrays[f"stage:{s}"][brute_div].view(np.int32)))
    assert comp.divergence == brute_div == step
    loc = tr.localise(comp, handle)
    assert loc.step == step and loc.first_difference == brute_stage == planted
    assert (comp.at(step - 1).changed == 0).all()
    one_ulp = comp.at(step).loc[planted]
    assert one_ulp.changed == 1 and one_ulp["ulp=1"] == 1


def test_logits_are_matched_by_token_id_when_ranks_swap(base_trace, tmp_path):
    step = int(RNG.integers(base_trace.n_steps))

    def swap(arr):
        for key in ("topk_ids", "topk_logits", "topk_probs"):
            arr[key][step, [0, 1]] = arr[key][step, [1, 0]]

    b = _planted_copy(base_trace, tmp_path / "swapped", swap)
    table = tr.compare(base_trace, b).logits_by_id(step, k=3)
    first, second = (int(i) for i in base_trace.arrays["topk_ids"][step][:2])
    assert table.loc[first, "rank_a"] == 1 and table.loc[first, "rank_b"] == 2
    assert table.loc[second, "rank_a"] == 2 and table.loc[second, "rank_b"] == 1
    assert (table["logit_b − logit_a"].dropna() == 0).all()


def _interrupted_capture(handle, out, forwards: int, **kwargs) -> None:
    """Capture into ``out`` and interrupt it (KeyboardInterrupt) after ``forwards`` model forwards."""
    calls = {"n": 0}

    def crash(module, args):
        calls["n"] += 1
        if calls["n"] > forwards:
            raise KeyboardInterrupt("simulated interruption")

    hd = handle.model.register_forward_pre_hook(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.capture(handle, PROMPT, out, **kwargs)
    finally:
        hd.remove()


@pytest.mark.parametrize("use_cache", [True, False])
def test_interrupted_capture_resumes_to_the_same_bits(handle, tmp_path, use_cache):
    kwargs = dict(steps=11, stages="residual", use_cache=use_cache, stop_at_eos=False, chunk=3, progress=False)
    whole = tr.capture(handle, PROMPT, tmp_path / "whole", **kwargs)
    _interrupted_capture(handle, tmp_path / "cut", int(RNG.integers(4, 10)), **kwargs)
    with pytest.raises(tr.TraceError, match="incomplete"):
        tr.Trace(tmp_path / "cut")
    resumed = tr.capture(handle, PROMPT, tmp_path / "cut", **kwargs)
    assert set(resumed.arrays) == set(whole.arrays)
    for k, v in whole.arrays.items():
        assert np.array_equal(v.view(np.uint8), resumed.arrays[k].view(np.uint8)), k


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # the default (one chunk here), and a chunk of max(ranks) rows
def test_unembedding_angles_against_numpy(handle, base_trace, chunk_bytes):
    states = base_trace.stage("final_norm")
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    got = tr.unembedding_angles(handle, states, ranks=(1, 2, 5), **kw)
    W = handle.unembed.weight.detach().double().numpy()
    x = states.double().numpy()
    order = np.argsort(-(x @ W.T), axis=1, kind="stable")
    for r in (1, 2, 5):
        ids = order[:, r - 1]
        cos = (x * W[ids]).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(W[ids], axis=1))
        rows = got[got["rank"] == r]
        np.testing.assert_array_equal(rows.token_id.to_numpy(), ids)
        np.testing.assert_allclose(rows.angle_deg.to_numpy(), np.degrees(np.arccos(cos)), rtol=1e-10)


@pytest.mark.parametrize("ties", [False, True])
def test_top_logit_ids_chunked_equals_a_stable_full_argsort(ties):
    """The vocabulary-chunked running top-k equals the top k of a stable descending argsort of the whole float64
    logits, for fresh inputs, a bias, and chunks from k rows to the whole vocabulary. ``ties``: small-integer
    inputs, so the logits are exact (any summation order) and full of equal values, straddling chunk boundaries
    and the k-th place; equal logits must rank the lower id first."""
    rng = np.random.default_rng(RNG.integers(2**32))
    T, d, V, k = int(rng.integers(1, 9)), int(rng.integers(2, 12)), int(rng.integers(40, 300)), int(rng.integers(1, 30))
    if ties:
        x = torch.from_numpy(rng.integers(-2, 3, (T, d)).astype(np.float64))
        W = torch.from_numpy(rng.integers(-1, 2, (V, d)).astype(np.float32))
        b = torch.from_numpy(rng.integers(-1, 2, V).astype(np.float32))
    else:
        x = torch.from_numpy(rng.standard_normal((T, d)))
        W = torch.from_numpy(rng.standard_normal((V, d)).astype(np.float32))
        b = torch.from_numpy(rng.standard_normal(V).astype(np.float32))
    for bias in (None, b):
        logits = x.numpy() @ W.double().numpy().T + (0 if bias is None else bias.double().numpy())
        want = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        for rows in (k, k + 1, int(rng.integers(k, V + 1)), V):  # rows of W per chunk
            got = tr.top_logit_ids(x, W, k, bias=bias, chunk_bytes=8 * rows * (d + T))
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"{rows} rows a chunk, bias {bias is not None}")
    assert tr.top_logit_ids(x, W, V + 5).shape == (T, V)  # k beyond the vocabulary: all of it, ordered


@pytest.mark.parametrize("use_cache", [True, False])
def test_every_forward_unembeds_only_its_last_position(handle, tmp_path, use_cache, monkeypatch):
    """The prompt forward and every uncached re-run unembed one position, not the whole sequence: the stored logits
    are bitwise the unembedding of the stored final-norm state alone, equal (to float32 rounding) to the plain
    whole-sequence forward's logits at that position, and every hidden state is bitwise the one computed with
    all positions unembedded."""
    widths = []
    hd = handle.unembed.register_forward_hook(lambda m, i, o: widths.append(i[0].shape[-2]))
    try:
        t = tr.capture(handle, PROMPT, tmp_path / "last", steps=7, stages=["final_norm", "logits"],
                       use_cache=use_cache, stop_at_eos=False, progress=False)
    finally:
        hd.remove()
    assert widths == [1] * 7
    states, logits = t.stage("final_norm"), t.stage("logits")
    with torch.no_grad():
        alone = torch.cat([handle.unembed(states[s].view(1, 1, -1))[0] for s in range(t.n_steps)])
        ids = torch.tensor(t.prompt_ids + t.tokens.tolist())
        plain = handle.model(input_ids=ids[None], use_cache=False).logits[0]  # every position unembedded
    L = len(t.prompt_ids)
    assert torch.equal(logits, alone)
    torch.testing.assert_close(logits, plain[L - 1:L - 1 + t.n_steps], rtol=1e-5, atol=1e-5)
    top = torch.topk(logits, 10)
    np.testing.assert_array_equal(t.arrays["topk_ids"], top.indices.numpy())
    assert torch.equal(torch.from_numpy(t.arrays["topk_logits"]), top.values)
    assert t.tokens.tolist() == logits.argmax(1).tolist()
    # the previous kernel, every position unembedded: the same states bit for bit
    with monkeypatch.context() as m:
        m.setattr(tr, "last_logits_kwargs", lambda h: {})
        full = tr.capture(handle, PROMPT, tmp_path / "full", steps=7, stages="residual", use_cache=use_cache,
                          stop_at_eos=False, progress=False)
    mine = tr.capture(handle, PROMPT, tmp_path / "mine", steps=7, stages="residual", use_cache=use_cache,
                      stop_at_eos=False, progress=False)
    comp = tr.compare(full, mine)
    if comp.divergence is not None:  # only where the previous logits were within rounding of a tie
        gap = np.diff(full.arrays["topk_logits"][comp.divergence][:2])[0]
        assert abs(gap) < 1e-5 * np.abs(full.arrays["topk_logits"][comp.divergence][0]) + 1e-6
    assert (comp.per_step.changed == 0).all()


def test_lens_on_final_norm_reproduces_the_stored_logits(handle, base_trace):
    t = int(RNG.integers(base_trace.n_steps))
    ids = base_trace.arrays["topk_ids"][t][:5].tolist()
    lens = tr.lens_logits(handle, "final_norm", base_trace.stage("final_norm")[t:t + 1], ids)[0]
    np.testing.assert_allclose(lens.numpy(), base_trace.arrays["topk_logits"][t][:5], rtol=1e-5, atol=1e-5)
    with pytest.raises(tr.TraceError, match="residual"):
        tr.lens_logits(handle, "layer0.mlp", base_trace.stage("layer0.mlp")[:1], ids)


def test_batch_rows_record_row_zero_and_threads_are_restored(handle, tmp_path):
    before = torch.get_num_threads()
    t = tr.capture(handle, PROMPT, tmp_path / "b3", steps=4, stages="residual", batch_rows=3, threads=1,
                   stop_at_eos=False, progress=False)
    assert torch.get_num_threads() == before
    assert t.manifest["settings"]["batch_rows"] == 3 and t.manifest["settings"]["threads"] == 1
    assert t.stage("final_norm").shape == (4, handle.d_model)


def test_refuses_pairs_of_different_prompts_or_models(handle, base_trace, tmp_path, tmp_path_factory):
    other = tr.capture(handle, "A different prompt", tmp_path / "p", steps=3, stop_at_eos=False, progress=False)
    with pytest.raises(tr.TraceError, match="different prompts"):
        tr.compare(base_trace, other)
    fam = handle.adapter.family
    h2 = ic.load_model(random_model_dir(tmp_path_factory.mktemp("other"), fam, seed=SESSION_SEED + 1))
    t2 = tr.capture(h2, PROMPT, tmp_path / "m", steps=3, stop_at_eos=False, progress=False)
    with pytest.raises(tr.TraceError, match="different weights"):
        tr.compare(base_trace, t2)


def test_truncated_or_foreign_folders_are_refused(base_trace, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(base_trace.path, cut)
    sorted((cut / "steps").glob("*.npz"))[-1].unlink()
    with pytest.raises(tr.TraceError, match="truncated"):
        tr.Trace(cut).tokens
    with pytest.raises(tr.TraceError, match="not a trace folder"):
        tr.Trace(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(base_trace.path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["complete"] = False
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(tr.TraceError, match="incomplete"):
        tr.Trace(bad)


def test_bad_capture_arguments(handle, tmp_path):
    with pytest.raises(tr.TraceError, match="unknown stage"):
        tr.capture(handle, PROMPT, tmp_path / "x", steps=2, stages=["layer0.nonsense"])
    with pytest.raises(tr.TraceError, match="unknown stage preset"):
        tr.capture(handle, PROMPT, tmp_path / "x", steps=2, stages="everything")
    with pytest.raises(tr.TraceError, match="empty prompt"):
        tr.capture(handle, "  ", tmp_path / "x", steps=2)
    with pytest.raises(tr.TraceError, match="positions"):
        tr.capture(handle, PROMPT, tmp_path / "x", steps=10_000)
    with pytest.raises(tr.TraceError, match="chat template"):
        tr.capture(handle, PROMPT, tmp_path / "x", steps=2, chat=True)
    tr.capture(handle, PROMPT, tmp_path / "y", steps=2, stop_at_eos=False, progress=False)
    with pytest.raises(tr.TraceError, match="other settings"):
        tr.capture(handle, PROMPT, tmp_path / "y", steps=3, stop_at_eos=False, progress=False)


def test_capture_and_compare_commands(handle, tmp_path, capsys):
    from instab_core.cli import main
    common = ["--model", str(handle.path), "--steps", "6", "--no-eos-stop", "--stages", "residual"]
    assert main(["capture", PROMPT, "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["capture", PROMPT, "--out", str(tmp_path / "b"), "--no-cache", *common]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    comp = tr.compare(tmp_path / "a", tmp_path / "b")
    assert report["divergence"] == comp.divergence
    assert [r["stage"] for r in report["localisation"]] == comp.stages
    assert "first stage that differs" in capsys.readouterr().out
    other = tmp_path / "c"
    assert main(["capture", "Another prompt", "--out", str(other), *common]) == 0
    assert main(["compare", str(tmp_path / "a"), str(other), "--no-model"]) == 2
    assert "different prompts" in capsys.readouterr().err


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def handle64(request, tmp_path_factory):
    """A fresh random model in true float64: batch composition must not change the answer beyond rounding."""
    return ic.load_model(random_model_dir(tmp_path_factory.mktemp(f"{request.param}64"), request.param),
                         dtype="float64")


COMPANIONS = ["a much longer companion prompt, padded to nothing", "hi"]  # one longer (pads the traced row), one shorter


@pytest.mark.parametrize("use_cache", [True, False])
def test_companion_rows_are_padded_masked_and_positioned_as_if_alone(handle64, tmp_path, use_cache):
    """The traced row among other prompts (left-padded, masked, own positions) gives its lone tokens and states up to
    float64 rounding; each companion row generates exactly the tokens it generates alone."""
    kw = dict(steps=8, stages="residual", use_cache=use_cache, stop_at_eos=False, chunk=3, progress=False)
    mixed = tr.capture(handle64, PROMPT, tmp_path / "mixed", companions=COMPANIONS, **kw)
    alone = tr.capture(handle64, PROMPT, tmp_path / "alone", **kw)
    assert mixed.tokens.tolist() == alone.tokens.tolist()
    for stage in alone.stages:
        np.testing.assert_allclose(mixed.stage(stage).numpy(), alone.stage(stage).numpy(), rtol=1e-9, atol=1e-11)
    got = mixed.arrays["companion_tokens"]
    assert got.shape == (8, len(COMPANIONS))
    for i, text in enumerate(COMPANIONS):
        own = tr.capture(handle64, text, tmp_path / f"own{i}", **kw)
        assert got[:, i].tolist() == own.tokens.tolist(), text
    assert mixed.manifest["settings"]["companions"][1] == tr.prompt_ids(handle64, "hi").tolist()


def test_interrupted_capture_with_companions_resumes_to_the_same_bits(handle, tmp_path):
    kw = dict(steps=9, stages="residual", stop_at_eos=False, chunk=3, progress=False, companions=COMPANIONS)
    whole = tr.capture(handle, PROMPT, tmp_path / "whole", **kw)
    _interrupted_capture(handle, tmp_path / "cut", 5, **kw)
    resumed = tr.capture(handle, PROMPT, tmp_path / "cut", **kw)
    for k, v in whole.arrays.items():
        assert np.array_equal(v.view(np.uint8), resumed.arrays[k].view(np.uint8)), k
