"""Word-by-word prediction against a direct re-forward, the window policy, the PDF round trip, resume, bad inputs.

Oracle: for every word, one Hugging Face forward (no KV cache) of the causal-LM on the exact token ids before the
word's last token — the logits at the word's positions and ``hidden_states[-1]`` come from the model's own head,
not from this module's base-model + unembedding path — and, for the greedy check, an explicit greedy decoding
loop from the word's context. Fresh random models (session seed).

Tolerance: the KV-cached pass runs the same arithmetic in other shapes (a chunk of queries against the cached
keys instead of the whole sequence), so its reductions round differently and agreement is to a few float32 ULPs
of the logits, not bitwise: log-probabilities to 2e-5 absolute per token (a float32 logit near 10 has ULP 1e-6),
probabilities to 2e-5 relative, cosines to 2e-6 — about ten times the largest gaps measured on these random
models (1.5e-6 in a word's log-probability, 1.2e-6 relative in a probability, 1.6e-7 in a cosine).
"""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

import instab_core as ic
from instab_core import wordpred as wp
from randmodels import SESSION_SEED, random_model_dir

RNG = np.random.default_rng(SESSION_SEED)
LP_ATOL, P_RTOL, COS_ATOL = 2e-5, 2e-5, 2e-6


def random_text(n_words: int, rng: np.random.Generator = RNG) -> str:
    """Words of 1-6 random letters (some with punctuation), joined by random whitespace runs."""
    alphabet = list(string.ascii_letters) + list(".,;()'-")
    words = ["".join(rng.choice(alphabet, size=rng.integers(1, 7))) for _ in range(n_words)]
    seps = rng.choice([" ", "  ", "\n", " \n\n "], size=n_words - 1, p=[0.7, 0.1, 0.1, 0.1])
    return words[0] + "".join(s + w for s, w in zip(seps, words[1:]))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def handle(request, tmp_path_factory):
    return ic.load_model(random_model_dir(tmp_path_factory.mktemp(request.param), request.param))


@torch.no_grad()
def reforward(h: ic.ModelHandle, ids: np.ndarray, spans: np.ndarray, window=None, prefix: int = 1
              ) -> dict[str, np.ndarray]:
    """The seed's O(N²) method on exact token ids: per word, one forward without cache on the ids before its last
    token; ``window(t)`` gives the first document token the prediction of target t may see (prefix kept)."""
    model, W = h.model, h.unembed.weight.double()
    ids_t = torch.as_tensor(ids)
    out: dict[str, list] = {k: [] for k in ("word_logprob", "target_prob", "top1", "top2", "greedy_first",
                                            "greedy_word", "cos_h_target", "cos_h_top1", "cos_h_top2",
                                            "cos_top1_target", "cos_top2_target")}
    for a, b in spans:
        lps, greedy, first = [], True, None
        for t in range(a, b):  # one forward per target when windowed (contexts differ), else one per word
            if window is None and t > a:
                break
            lo = 0 if window is None else window(t)
            end = b - 1 if window is None else t
            ctx = ids_t[:end] if lo == 0 else torch.cat([ids_t[:prefix], ids_t[lo:end]])
            o = model(input_ids=ctx[None], use_cache=False, output_hidden_states=True)
            rows = range(a - 1, b - 1) if window is None else [ctx.shape[0] - 1]
            for j, r in enumerate(rows):
                tt = a + j if window is None else t
                logp = torch.log_softmax(o.logits[0, r].double(), -1)
                lps.append(float(logp[ids[tt]]))
                greedy &= int(o.logits[0, r].argmax()) == int(ids[tt])
            if first is None:
                r0 = ctx.shape[0] - 1 if window is not None else a - 1
                first = (o.logits[0, r0], o.hidden_states[-1][0, r0].double())
        logits, hid = first
        p = torch.softmax(logits.double(), -1)
        top = logits.topk(2).indices
        t_id = int(ids[a])
        cos = torch.nn.functional.cosine_similarity
        out["word_logprob"].append(sum(lps))
        out["target_prob"].append(float(p[t_id]))
        out["top1"].append(int(top[0]))
        out["top2"].append(int(top[1]))
        out["greedy_first"].append(int(top[0]) == t_id)
        out["greedy_word"].append(greedy)
        out["cos_h_target"].append(float(cos(hid, W[t_id], dim=0)))
        out["cos_h_top1"].append(float(cos(hid, W[top[0]], dim=0)))
        out["cos_h_top2"].append(float(cos(hid, W[top[1]], dim=0)))
        out["cos_top1_target"].append(float(cos(W[top[0]], W[t_id], dim=0)))
        out["cos_top2_target"].append(float(cos(W[top[1]], W[t_id], dim=0)))
    return {k: np.asarray(v) for k, v in out.items()}


@torch.no_grad()
def greedy_reproduces(h: ic.ModelHandle, ids: np.ndarray, a: int, b: int) -> bool:
    """Greedy decoding from the exact context ids[:a] for b − a steps, fed back as ids (no cache)."""
    ctx = torch.as_tensor(ids[:a])
    for t in range(a, b):
        nxt = int(h.model(input_ids=ctx[None], use_cache=False).logits[0, -1].argmax())
        if nxt != int(ids[t]):
            return False
        ctx = torch.cat([ctx, torch.tensor([nxt])])
    return True


def _compare(w: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    err = np.abs(w["word_logprob"] - ref["word_logprob"])  # a sum over the word's tokens: tolerance per token
    assert (err <= LP_ATOL * w["n_tokens"]).all(), f"word log-prob differs by up to {err.max():.3g}"
    np.testing.assert_allclose(w["target_prob"], ref["target_prob"], rtol=P_RTOL, atol=1e-12)
    for k in ("cos_h_target", "cos_h_top1", "cos_h_top2", "cos_top1_target", "cos_top2_target"):
        same_ids = (w["top1_id"] == ref["top1"]) & (w["top2_id"] == ref["top2"])
        np.testing.assert_allclose(w[k][same_ids], ref[k][same_ids], atol=COS_ATOL, err_msg=k)
    # top-2 ids and greedy flags can only differ where the oracle's logits are within rounding of a tie
    agree = (w["top1_id"] == ref["top1"]) & (w["top2_id"] == ref["top2"])
    assert agree.mean() > 0.9, f"top-2 ids agree on only {agree.mean():.0%} of words"
    assert (w["greedy_first"] == ref["greedy_first"])[agree].all()


def test_kv_cache_pass_matches_direct_reforward(handle):
    """Target probabilities, word probabilities (teacher forcing over multi-token words), top-2, greedy flags and
    cosines of the O(N) pass equal the per-word re-forward, for small chunks (many cache extensions)."""
    text = random_text(14)
    res = wp.predict_words(handle, text, chunk=5, progress=False)
    w = res.word_arrays()
    assert res.segments > 3 and (w["n_tokens"] > 1).sum() >= 10  # multi-token words, across many chunks
    ref = reforward(handle, res.tok.ids, res.tok.spans)
    _compare(w, ref)
    # the full-context pass saw the whole preceding text
    assert (w["history"] == w["token_start"]).all()


def test_greedy_word_is_the_greedy_continuation(handle):
    """greedy_word is true exactly when greedy decoding from the word's context reproduces its token ids; checked on
    a text made of the model's own greedy output (so some words are reproduced) and on random text."""
    ids = handle.encode("ab")
    with torch.no_grad():
        for _ in range(30):
            ids = torch.cat([ids, handle.model(input_ids=ids[None]).logits[0, -1].argmax()[None]])
    own = handle.tokenizer.decode(ids[1:].tolist(), skip_special_tokens=True)
    for text in (own, random_text(8)):
        if not text.split():
            continue
        res = wp.predict_words(handle, text, progress=False)
        w = res.word_arrays()
        expect = [greedy_reproduces(handle, res.tok.ids, a, b) for a, b in res.tok.spans[w["word_index"]]]
        assert list(w["greedy_word"]) == expect


def test_word_spans_decode_to_the_words():
    """On the bundled BPE tokenizer each word's tokens decode to its leading space plus the word; the text is
    tokenised once (the concatenated spans are the whole id sequence)."""
    h = ic.load_model("tiny-llama")
    words = wp.split_words(wp.SAMPLE_TEXT.read_text(encoding="utf-8"))
    tok = wp.tokenize_words(h.tokenizer, words)
    assert tok.prefix == 1 and tok.spans[0, 0] == 1 and tok.spans[-1, 1] == tok.n_tokens
    assert (tok.spans[1:, 0] == tok.spans[:-1, 1]).all()
    for i in RNG.choice(len(words.words), size=60, replace=False):
        a, b = tok.spans[i]
        assert h.tokenizer.decode(tok.ids[a:b].tolist()) == (" " if i else "") + words.words[i]
    assert (tok.spans[:, 1] - tok.spans[:, 0] > 1).any()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_tokenising_in_blocks_equals_one_call(model):
    """Long documents are tokenised in blocks of words; on random word sequences (block sizes 1..50) the ids, offsets
    and spans equal those of one call on the whole text."""
    h = ic.load_model(model)
    vocab = wp.split_words(wp.SAMPLE_TEXT.read_text(encoding="utf-8")).words
    words = wp.split_words(" ".join(RNG.choice(vocab, size=400)))
    whole = wp.tokenize_words(h.tokenizer, words, block_words=len(words.words))
    for block in (1, 7, 50):
        parts = wp.tokenize_words(h.tokenizer, words, block_words=block)
        np.testing.assert_array_equal(parts.ids, whole.ids)
        np.testing.assert_array_equal(parts.offsets, whole.offsets)
        np.testing.assert_array_equal(parts.spans, whole.spans)


def test_a_tokenizer_that_reads_across_the_cut_is_refused():
    """The seam check is not vacuous: a tokenizer whose ids depend on the text before a word fails it."""
    h = ic.load_model("tiny-llama")
    tokenizer = h.tokenizer

    class ContextDependent:
        is_fast = True
        all_special_ids = tokenizer.all_special_ids

        def __call__(self, text, **kw):
            enc = tokenizer(text, **kw)
            if len(text) > 300:  # long inputs (one whole call, or a seam window) get every id shifted
                enc["input_ids"] = [i if i in self.all_special_ids else (i + 1) % 2048 for i in enc["input_ids"]]
            return enc

    words = wp.split_words(" ".join(["animals"] * 400))
    with pytest.raises(wp.DocumentError, match="differently when the text is cut"):
        wp.tokenize_words(ContextDependent(), words, block_words=40)


@pytest.mark.parametrize("context,stride", [(12, 4), (9, 7), (10, 1)])
def test_window_policy_matches_reforward_in_the_same_window(handle, context, stride):
    """Sliding windows: each target is predicted from BOS + the document tokens [lo, t) of its window, where window
    k ends at min(N-1, P+C + k·stride) and starts C = context − P tokens before its end; the result equals a
    re-forward on exactly that context, and each prediction after the first window sees >= C − stride + 1 tokens."""
    text = random_text(10)
    res = wp.predict_words(handle, text, context=context, stride=stride, chunk=4, progress=False)
    tok = res.tok
    P, N, C = tok.prefix, tok.n_tokens, context - tok.prefix
    ends = [min(N - 1, P + C)]
    while ends[-1] < N - 1:
        ends.append(min(N - 1, ends[-1] + stride))

    def window(t: int) -> int:
        k = next(k for k, e in enumerate(ends) if t <= e)
        return 0 if k == 0 else ends[k] - C

    hist = np.array([(t if window(t) == 0 else P + t - window(t)) for t in range(res.first_target, N)])
    np.testing.assert_array_equal(res.tokens["history"][res.first_target:], hist)
    later = np.array([window(t) > 0 for t in range(res.first_target, N)])
    assert later.any() and (hist[later] - P >= C - stride + 1).all()
    assert (hist <= context).all()
    ref = reforward(handle, tok.ids, tok.spans, window=window, prefix=P)
    _compare(res.word_arrays(), ref)


def test_pdf_round_trip(tmp_path):
    """write_pdf → pypdf extraction gives the same words (escaping of (, ) and backslash included); the bundled
    sample PDF is exactly what the generator writes from the bundled sample text."""
    text = random_text(300).replace("q", "\\").replace("Q", "(")
    text = "Title line\n\n" + text
    got = wp.read_pdf(wp.write_pdf(text, tmp_path / "doc.pdf", width=60, lines_per_page=20))
    assert wp.split_words(got).words == wp.split_words(text).words
    assert len(wp.read_pdf(tmp_path / "doc.pdf").split("\n")) > 20  # several pages
    np.testing.assert_array_equal(wp.paragraph_index(got), wp.paragraph_index(text))  # paragraph breaks survive
    assert wp.write_sample_pdf(tmp_path / "sample.pdf").read_bytes() == wp.SAMPLE_PDF.read_bytes()
    pdf, txt = wp.read_document(wp.SAMPLE_PDF), wp.read_document(wp.SAMPLE_TEXT)
    assert wp.split_words(pdf).words == wp.split_words(txt).words
    np.testing.assert_array_equal(wp.paragraph_index(pdf), wp.paragraph_index(txt))


class _Interrupt(Exception):
    pass


class _InterruptingRun:
    """A results Run that raises after ``after`` checkpoint saves (a crash mid-document)."""

    def __init__(self, run, after: int) -> None:
        self.run, self.after = run, after

    def load(self, key):
        return self.run.load(key)

    def save(self, key, arrays):
        if self.after == 0:
            raise _Interrupt
        self.run.save(key, arrays)
        self.after -= 1


@pytest.mark.parametrize("context", [None, 10])
def test_resume_after_interruption_gives_the_same_result(handle, tmp_path, context):
    text = random_text(12)
    params = {"text": text, "context": context}
    whole = wp.predict_words(handle, text, context=context, chunk=6, progress=False)
    run = ic.results.start_run("wordpred_test", params, model=handle, root=tmp_path)
    with pytest.raises(_Interrupt):
        wp.predict_words(handle, text, context=context, chunk=6, run=_InterruptingRun(run, 2), progress=False)
    run.release()  # the interrupted process is gone
    again = ic.results.start_run("wordpred_test", params, model=handle, root=tmp_path)
    assert again.resumed and again.run_id == run.run_id
    res = wp.predict_words(handle, text, context=context, chunk=6, run=again, progress=False)
    assert res.resumed_segments == 2 and res.computed_segments == res.segments - 2
    for k in wp.TOKEN_FIELDS:
        np.testing.assert_array_equal(res.tokens[k], whole.tokens[k], err_msg=k)
    # a checkpoint of another document is refused, not silently reused
    with pytest.raises(wp.DocumentError, match="does not match"):
        wp.predict_words(handle, text + " extra", context=context, chunk=6, run=again, progress=False)


def test_bad_inputs(handle, tmp_path):
    from pypdf import PdfWriter

    with pytest.raises(wp.DocumentError, match="no such file"):
        wp.read_document(tmp_path / "missing.pdf")
    (tmp_path / "empty.txt").write_text("  \n ")
    with pytest.raises(wp.DocumentError, match="empty"):
        wp.read_document(tmp_path / "empty.txt")
    (tmp_path / "junk.pdf").write_bytes(b"this is not a PDF at all")
    with pytest.raises(wp.DocumentError, match="cannot read"):
        wp.read_pdf(tmp_path / "junk.pdf")
    (tmp_path / "zero.pdf").write_bytes(b"")
    with pytest.raises(wp.DocumentError, match="cannot read"):
        wp.read_pdf(tmp_path / "zero.pdf")
    w = PdfWriter()
    w.add_blank_page(200, 200)
    w.write(tmp_path / "blank.pdf")
    with pytest.raises(wp.DocumentError, match="no extractable text"):
        wp.read_pdf(tmp_path / "blank.pdf")
    wp.write_pdf("secret words", tmp_path / "plain.pdf")
    w = PdfWriter(clone_from=tmp_path / "plain.pdf")
    w.encrypt(user_password="pw", owner_password="owner")
    w.write(tmp_path / "locked.pdf")
    with pytest.raises(wp.DocumentError, match="encrypted"):
        wp.read_pdf(tmp_path / "locked.pdf")
    with pytest.raises(wp.DocumentError, match="empty text"):
        wp.predict_words(handle, " \n\t ", progress=False)
    text = random_text(6)
    with pytest.raises(ValueError, match="context"):
        wp.predict_words(handle, text, context=2, progress=False)
    with pytest.raises(ValueError, match="stride"):
        wp.predict_words(handle, text, context=8, stride=8, progress=False)
    with pytest.raises(ValueError, match="context="):
        wp.predict_words(handle, text, stride=3, progress=False)
    with pytest.raises(wp.DocumentError, match="positions"):  # the random models have 128 positions
        wp.predict_words(handle, "ab " * 100, progress=False)


@pytest.mark.parametrize("text,ids,offsets,what", [
    ("ab cd", [0, 5, 6], [(0, 0), (0, 4), (4, 5)], "merges word 0"),  # "ab c" + "d": word 0 owns no token
    ("ab cd ef", [0, 5, 6, 7, 8], [(0, 0), (0, 1), (1, 4), (4, 5), (5, 8)], "straddles words 0 and 1"),
])
def test_tokenizer_that_merges_words_is_refused(text, ids, offsets, what):
    """A token holding characters of two words makes word-level scoring ill defined: refused, naming the words."""

    class Fake:
        is_fast = True
        all_special_ids = [0]
        unk_token_id = None

        def __call__(self, text, **kw):
            return {"input_ids": ids, "offset_mapping": offsets}

    with pytest.raises(wp.DocumentError, match=what):
        wp.tokenize_words(Fake(), wp.split_words(text))


def test_rolling_mean_against_a_loop():
    x = RNG.random(50)
    got = wp.rolling_mean(x, 7)
    want = [x[max(0, i - 6):i + 1].mean() for i in range(50)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
