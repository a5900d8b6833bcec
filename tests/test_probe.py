"""Probe targets name the right tensors (science rule 4), against Hugging Face's own outputs."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import instab_core as ic
from randmodels import CHARS, SESSION_SEED, random_model_dir

RNG = random.Random(SESSION_SEED)
# a fresh printable prompt per session (the char tokenizer encodes every printable character)
TEXT = "The capital of France is " + "".join(RNG.choice(CHARS) for _ in range(6)).strip() + "x"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def handle(request, tmp_path_factory):
    return ic.load_model(random_model_dir(tmp_path_factory.mktemp(request.param), request.param, layers=3))


@pytest.fixture(scope="module")
def hf(handle):
    """HF's own forward of the prompt at batch size 1: hidden_states and logits."""
    ids = handle.encode(TEXT)
    with torch.no_grad():
        out = handle.model(ids[None], output_hidden_states=True)
    return ids, out


def _positions(n_tokens: int) -> list[int]:
    """The last position (as -1) and a random non-last one."""
    return [-1, RNG.randrange(1, n_tokens - 1)]


def test_hf_hidden_states_layout(handle, hf):
    _, out = hf
    assert len(out.hidden_states) == handle.n_layers + 1  # embeddings, then one per layer (last: after the norm)


@pytest.mark.parametrize("which", ["last", "random"])
def test_final_hidden_is_hf_hidden_states_last(handle, hf, which):
    ids, out = hf
    pos = _positions(len(ids))[which == "random"]
    probe = ic.Probe(handle, TEXT, position=pos, batch_size=1)
    assert probe.position == pos % len(ids)
    assert torch.equal(probe.ids, ids)
    assert torch.equal(probe.reference, out.hidden_states[-1][0, pos])


@pytest.mark.parametrize("which", ["last", "random"])
def test_layer_out_is_hf_hidden_states_i_plus_1(handle, hf, which):
    ids, out = hf
    pos = _positions(len(ids))[which == "random"]
    for i in range(handle.n_layers - 1):  # the last entry of hidden_states is after the final norm
        probe = ic.Probe(handle, TEXT, position=pos, target=f"layer_out[{i}]", batch_size=1)
        assert torch.equal(probe.reference, out.hidden_states[i + 1][0, pos]), i


@pytest.mark.parametrize("which", ["last", "random"])
def test_final_norm_of_pre_norm_is_final_hidden(handle, hf, which):
    ids, out = hf
    pos = _positions(len(ids))[which == "random"]
    pre = ic.Probe(handle, TEXT, position=pos, target="pre_norm", batch_size=1)
    last = ic.Probe(handle, TEXT, position=pos, target=f"layer_out[{handle.n_layers - 1}]", batch_size=1)
    fin = ic.Probe(handle, TEXT, position=pos, batch_size=1)
    with torch.no_grad():
        normed = handle.final_norm(pre.reference[None])[0]
    assert torch.equal(normed, fin.reference)
    assert torch.equal(pre.reference, last.reference)  # pre_norm is the last layer's output
    assert not torch.equal(pre.reference, fin.reference)  # ... and the norm was not applied to it
    assert torch.equal(ic.Probe(handle, TEXT, position=pos, target="layer_out[-1]", batch_size=1).reference,
                       pre.reference)


@pytest.mark.parametrize("which", ["last", "random"])
def test_logits_are_the_unembedding_of_final_hidden(handle, hf, which):
    """Measured: HF's logits[0, pos] are NOT bitwise equal to the probe's (tens to ~1000 ulp on
    near-zero logits, most entries differ): HF multiplies lm_head over all L positions at once, the
    probe over one row, and the GEMM sums in a different order. So: bitwise against the unembedding
    of HF's own hidden_states[-1] row, and within the dot-product rounding bound against HF's logits.
    """
    ids, out = hf
    pos = _positions(len(ids))[which == "random"]
    probe = ic.Probe(handle, TEXT, position=pos, target="logits", batch_size=1)
    assert probe.reference.shape == (handle.model.config.vocab_size,)
    with torch.no_grad():
        row = out.hidden_states[-1][:, pos]  # [1, d]
        assert torch.equal(probe.reference, handle.unembed(row)[0])
        # |fl(w·h) - w·h| <= gamma_d * sum |w_i h_i|, gamma_d ~ d u; the bound holds for both sums
        W = handle.unembed.weight.double()
        mag = W.abs() @ row[0].double().abs()
    u = 2.0 ** -24
    bound = 2 * handle.d_model * u * mag
    assert ((probe.reference.double() - out.logits[0, pos].double()).abs() <= bound).all()
    # the final norm is applied once: unembedding the pre-norm state would be a different vector
    pre = ic.Probe(handle, TEXT, position=pos, target="pre_norm", batch_size=1).reference
    with torch.no_grad():
        assert not torch.allclose(handle.unembed(pre[None])[0], probe.reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("target", ["final_hidden", "logits", "layer_out[0]"])
def test_reference_is_forward_of_x0_in_the_same_shape(handle, target):
    probe = ic.Probe(handle, TEXT, target=target, batch_size=4)
    before = probe.rows_evaluated
    out = probe.forward(probe.x0[None])
    assert probe.rows_evaluated == before + 4
    assert torch.equal(out[0], probe.reference)
    # x0 is the prompt's own embedding row
    assert torch.equal(probe.x0, handle.embedding.weight[probe.ids[probe.position]])


def test_forward_pads_to_the_batch_shape_and_returns_n_rows(handle):
    probe = ic.Probe(handle, TEXT, batch_size=4)
    assert probe.rows_evaluated == 4  # the reference: one full batch
    gen = torch.Generator().manual_seed(SESSION_SEED)
    n = 4 * 2 + 1 + int(torch.randint(3, (1,), generator=gen))  # 9..11: not a multiple of 4
    X = probe.x0 + 1e-2 * torch.randn(n, probe.d, generator=gen)
    out = probe.forward(X)
    assert out.shape == (n, probe.d)
    assert probe.rows_evaluated == 4 + 12  # three batches of 4, padding included
    # each row equals the same row evaluated inside a batch of the same shape, padded with x0
    for k in (0, n - 1):
        batch = torch.cat([X[k:k + 1], probe.x0.expand(3, -1)])
        with torch.no_grad():
            assert torch.equal(out[k], probe.f_batch(batch)[0])
    # rows are distinct inputs: outputs differ from the reference
    assert not torch.equal(out[0], probe.reference)


def test_f_is_differentiable_and_matches_forward_at_batch1(handle):
    probe = ic.Probe(handle, TEXT, batch_size=1)
    x = probe.x0.clone().requires_grad_(True)
    y = probe.f(x)
    # not y.sum(): after a LayerNorm with unit gain the entries sum to a constant (GPT-2 at init)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(SESSION_SEED))
    (y @ w).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.equal(y.detach(), probe.reference)


def test_describe(handle):
    probe = ic.Probe(handle, TEXT, position=2, target="layer_out[-1]", batch_size=3)
    d = probe.describe()
    assert d["position"] == 2 and d["batch_size"] == 3 and d["text"] == TEXT
    assert d["target"] == f"layer_out[{handle.n_layers - 1}]"
    assert d["token_ids"] == probe.ids.tolist() and d["n_tokens"] == len(probe.ids) == len(d["tokens"])


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_prompt(handle, text):
    with pytest.raises(ValueError, match="empty prompt"):
        ic.Probe(handle, text)


def test_position_out_of_range_both_signs(handle):
    L = len(handle.encode(TEXT))
    ic.Probe(handle, TEXT, position=L - 1, batch_size=1)
    ic.Probe(handle, TEXT, position=-L, batch_size=1)
    for pos in (L, -L - 1, L + 7):
        with pytest.raises(ValueError, match="out of range"):
            ic.Probe(handle, TEXT, position=pos)


@pytest.mark.parametrize("target", ["hidden", "layer_out", "layer_out[x]", "logits[0]", "final"])
def test_unknown_target(handle, target):
    with pytest.raises(ValueError, match="unknown target"):
        ic.Probe(handle, TEXT, target=target)


def test_layer_out_index_out_of_range(handle):
    n = handle.n_layers
    for i in (n, -n - 1, 99):
        with pytest.raises(ValueError, match="out of range"):
            ic.Probe(handle, TEXT, target=f"layer_out[{i}]")


@pytest.mark.parametrize("bs", [0, -1])
def test_batch_size_must_be_positive(handle, bs):
    with pytest.raises(ValueError, match="batch_size"):
        ic.Probe(handle, TEXT, batch_size=bs)


def test_non_finite_x0(handle):
    broken = copy.copy(handle)
    broken.model = copy.deepcopy(handle.model)
    ids = handle.encode(TEXT)
    pos = RNG.randrange(len(ids))
    with torch.no_grad():
        broken.embedding.weight[ids[pos], RNG.randrange(handle.d_model)] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ic.Probe(broken, TEXT, position=pos)
    assert torch.isfinite(handle.embedding.weight).all()  # the original is untouched
