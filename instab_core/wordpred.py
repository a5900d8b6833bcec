"""Word-by-word prediction: for each word of a document, what the model predicted from all preceding text.

The seed's ``pdf_word_by_word_prediction`` re-tokenised ``" ".join(words[:i+1])`` for every word and ran a
fresh forward pass on it (O(N²) token-forwards), scored only the first token of ``" " + word`` from a
separate tokenisation, and extracted the PDF with PyMuPDF (AGPL). Here:

* **Documents.** :func:`read_document` reads a PDF (with ``pypdf``, page texts joined by newlines) or a
  UTF-8 text file. Unreadable, encrypted or text-less PDFs, missing files and empty texts raise
  :class:`DocumentError` with a one-line message saying what to do.
* **Words.** :func:`split_words`: the document's whitespace is normalised (``" ".join(text.split())``: PDF
  line breaks and paragraph gaps become single spaces) and the words are the whitespace-separated pieces.
  Word i owns the characters from the end of word i−1 to its own end, so its **leading space belongs to it**
  and the prediction of word i is P(" word" | all text before the space).
* **Tokens.** The whole normalised text is tokenised **once**, with the tokenizer's offset mapping; each token
  belongs to the word in whose character span it ends. A word's tokens [a, b) are predicted from the exact
  ids before a (no decoded text is re-tokenised). A tokenizer that puts characters of two words into one token
  is refused (:class:`DocumentError`), since a word-level prediction would then be ill defined.
* **Per word:** the first token's logit, probability and rank; the top-2 tokens (by id, with their text,
  logits and probabilities); whether greedy top-1 is the first token; the word's log-probability under teacher
  forcing (sum of its tokens' conditional log-probabilities); whether the greedy continuation reproduces the
  word's token ids (true iff the argmax is the next true token at every one of its positions — with teacher
  forcing the greedy path and the true path share their context up to the first miss); and the seed's cosine
  measures between the final hidden state h (after the final norm, applied once: the base model's output, as
  ``hidden_states[-1]``) and the unembedding rows of the target, top-1 and top-2 tokens, and between the rows.
* **O(N).** Tokens are fed in chunks that extend a KV cache (``past_key_values``), so every token is run once.
* **Window policy** (``context``, ``stride``). With ``context=None`` the whole document is one sequence, which
  must fit ``max_position_embeddings``. With ``context=C`` every forward sequence is at most C tokens: the
  tokenizer's prefix (BOS) followed by a window of at most ``C − prefix`` document tokens. The first window
  scores every target it can; each next window moves its end by ``stride`` tokens, is run from an empty KV cache
  (positions restart after the prefix), and scores only the targets the previous windows did not reach. So each
  prediction sees the prefix and at least ``C − prefix − stride + 1`` preceding document tokens, or all of the
  preceding text where that is shorter. Cost: about N·(C − prefix)/stride token-forwards.
* **Checkpoints.** With ``run=`` (an :class:`instab_core.results.Run`), each segment (a chunk of tokens, or a
  window) saves its per-token arrays with ``run.save``; a resumed run loads them instead of recomputing. In
  full-context mode the KV cache of finished chunks is rebuilt by re-running their forwards with the same chunk
  boundaries (the same bits); windows are independent.

All probabilities are softmax of the model's logits computed in float64; cosines are in float64.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .models import ModelHandle
from .sweep import cosine_rows
from .zoo import ZOO_DIR

DOCUMENTS_DIR: Path = ZOO_DIR / "documents"
SAMPLE_TEXT: Path = DOCUMENTS_DIR / "sample.txt"
SAMPLE_PDF: Path = DOCUMENTS_DIR / "sample.pdf"
CHECKPOINT_PREFIX = "wordpred"

# per-token arrays computed for every target token, checkpointed per segment
TOKEN_FIELDS: tuple[str, ...] = (
    "logprob", "logit", "rank", "top_ids", "top_logits", "top_probs", "history",
    "cos_h_target", "cos_h_top1", "cos_h_top2", "cos_top1_target", "cos_top2_target",
)


class DocumentError(ValueError):
    """A document that cannot be read or scored; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Documents


def read_pdf(path: str | Path) -> str:
    """The text of every page of a PDF (``pypdf``), joined by newlines.

    PDFs encrypted with an empty user password (owner-password only: every viewer opens them) are
    decrypted with the empty password; any other encryption is refused.
    """
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    p = Path(path).expanduser()
    if not p.is_file():
        raise DocumentError(f"no such file: {p}")
    try:
        reader = PdfReader(p)
        if reader.is_encrypted and not reader.decrypt(""):  # PasswordType.NOT_DECRYPTED is 0
            raise DocumentError(f"{p} is an encrypted PDF: decrypt it first "
                                "(e.g. `qpdf --decrypt --password=... in out`)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError(f"cannot read {p} as a PDF ({type(exc).__name__}: {exc}); check the file, "
                            "or pass its text as a .txt file") from exc
    if not pages:
        raise DocumentError(f"{p} has no pages")
    text = "\n".join(page.rstrip("\n") for page in pages)  # a page break is a line break, not a paragraph break
    if not text.strip():
        raise DocumentError(f"{p} has no extractable text (a scanned PDF? run OCR first and pass the text file)")
    return text


def read_document(path: str | Path) -> str:
    """A ``.pdf`` via :func:`read_pdf`, anything else as a UTF-8 text file; refuses missing and empty files."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DocumentError(f"no such file: {p}")
    if p.suffix.lower() == ".pdf":
        return read_pdf(p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{p} is not UTF-8 text (a PDF needs the .pdf suffix)") from exc
    if not text.strip():
        raise DocumentError(f"{p} is empty: pass a document with text")
    return text


def _pdf_escape(line: str) -> str:
    try:
        line.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"write_pdf writes Latin-1 text only; {line[exc.start:exc.end]!r} is not") from exc
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters (longer words stay whole); a blank line between paragraphs."""
    lines: list[str] = []
    for para in text.split("\n\n"):
        words = para.split()
        if not words:
            continue
        cur = words[0]
        for w in words[1:]:
            if len(cur) + 1 + len(w) > width:
                lines.append(cur)
                cur = w
            else:
                cur += " " + w
        lines += [cur, ""]
    return lines[:-1]


def write_pdf(text: str, path: str | Path, width: int = 90, lines_per_page: int = 60) -> Path:
    """Write ``text`` as a minimal, deterministic PDF (Helvetica 10 pt, A4, one text stream per page).

    Paragraphs (separated by blank lines) are wrapped at ``width`` characters; a blank line is written as a single
    space, so that text extraction keeps the paragraph breaks. No dates or ids are written,
    so the same text gives the same bytes. Latin-1 text only.
    """
    lines = _wrap(text, width)
    if not lines:
        raise ValueError("empty text: nothing to write")
    pages = [lines[i:i + lines_per_page] for i in range(0, len(lines), lines_per_page)]
    n = len(pages)
    # objects: 1 catalog, 2 page tree, 3 font, then (page, content) pairs
    objs: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        ("<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(n)) + f"] /Count {n} >>").encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, page in enumerate(pages):
        body = "BT /F1 10 Tf 12 TL 56 790 Td\n" + "".join(f"({_pdf_escape(ln or ' ')}) Tj T*\n" for ln in page) + "ET"
        stream = body.encode("latin-1")
        objs.append((f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >> >> "
                     f"/Contents {5 + 2 * i} 0 R >>").encode())
        objs.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for k, obj in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{k} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    p = Path(path)
    p.write_bytes(bytes(out))
    return p


def paragraph_index(text: str) -> np.ndarray:
    """Paragraph number [n_words] (int64) of each word of ``split_words(text)``; paragraphs are separated by blank
    lines (lines holding only spaces or tabs count as blank)."""
    paras = [p for p in re.split(r"\n[ \t]*\n", text) if p.split()]
    return np.repeat(np.arange(len(paras), dtype=np.int64), [len(p.split()) for p in paras])


def write_sample_pdf(path: str | Path = SAMPLE_PDF) -> Path:
    """The bundled sample PDF, generated from the bundled sample text."""
    return write_pdf(SAMPLE_TEXT.read_text(encoding="utf-8"), path)


# ---------------------------------------------------------------------------------------------
# Words and tokens


@dataclass
class Words:
    """A whitespace-normalised text and its words; word i spans characters [starts[i], ends[i])."""

    text: str
    words: list[str]
    starts: np.ndarray  # [n] int64
    ends: np.ndarray  # [n] int64


def split_words(text: str) -> Words:
    """``" ".join(text.split())`` and its whitespace-separated words with their character spans."""
    if not isinstance(text, str):
        raise DocumentError(f"expected a text, got {type(text).__name__}")
    words = text.split()
    if not words:
        raise DocumentError("empty text: the document has no words")
    norm = " ".join(words)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    ends = np.cumsum(lengths + 1) - 1
    return Words(text=norm, words=words, starts=ends - lengths, ends=ends)


@dataclass
class Tokenized:
    """The whole text tokenised once. ``ids`` [N] int64, ``offsets`` [N, 2] character spans (prefix tokens (0, 0)),
    ``prefix`` = number of leading special tokens (BOS), ``spans`` [n_words, 2] = each word's tokens [a, b)."""

    words: Words
    ids: np.ndarray
    offsets: np.ndarray
    prefix: int
    spans: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    def sha256(self) -> str:
        return hashlib.sha256(self.ids.astype(np.int64).tobytes()).hexdigest()


BLOCK_WORDS = 100_000  # words per tokenizer call (bounds the tokenizer's memory on long documents)


def tokenize_words(tokenizer: Any, words: Words, block_words: int = BLOCK_WORDS) -> Tokenized:
    """Tokenise ``words.text`` with offsets and give each word its token span (see the module docstring).

    Documents longer than ``block_words`` words are tokenised in blocks cut before a word's space, and every cut is
    checked to give the same ids as one call across it."""
    if not getattr(tokenizer, "is_fast", False):
        raise DocumentError("word-by-word prediction needs a fast tokenizer (character offsets); "
                            f"{type(tokenizer).__name__} has none")
    ids, offsets = _encode_in_blocks(tokenizer, words, block_words)
    special = set(getattr(tokenizer, "all_special_ids", []))
    prefix = 0
    while prefix < len(ids) and int(ids[prefix]) in special and tuple(offsets[prefix]) == (0, 0):
        prefix += 1
    body = slice(prefix, None)
    if np.isin(ids[body], list(special - {getattr(tokenizer, "unk_token_id", None)})).any():
        raise DocumentError("the tokenizer adds special tokens inside or after the text; word-by-word prediction "
                            "needs only a prefix (BOS)")
    # token t belongs to the first word whose end is >= the token's end
    owner = np.searchsorted(words.ends, offsets[body, 1], side="left")
    if (owner >= len(words.words)).any():
        raise DocumentError("token offsets reach past the text: the tokenizer normalises the text; it cannot be "
                            "mapped to words")
    counts = np.bincount(owner, minlength=len(words.words))
    if (counts == 0).any():
        i = int(np.flatnonzero(counts == 0)[0])
        raise DocumentError(f"the tokenizer merges word {i} ({words.words[i]!r}) into a token of the next word; "
                            "word-level predictions need token boundaries at word boundaries")
    b = prefix + np.cumsum(counts)
    a = b - counts
    span_start = np.concatenate([[0], words.ends[:-1]])
    if (offsets[a, 0] < span_start).any():
        i = int(np.flatnonzero(offsets[a, 0] < span_start)[0])
        raise DocumentError(f"a token straddles words {i - 1} and {i} ({words.words[i - 1]!r}, {words.words[i]!r}); "
                            "word-level predictions need token boundaries at word boundaries")
    tok = Tokenized(words=words, ids=ids, offsets=offsets, prefix=prefix, spans=np.stack([a, b], axis=1))
    _check_seams(tokenizer, tok, block_words)
    return tok


def _encode(tokenizer: Any, text: str, special: bool) -> tuple[np.ndarray, np.ndarray]:
    # split_special_tokens: a literal "<s>" in a document is text, not the BOS token
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special, verbose=False,
                    split_special_tokens=True)
    return (np.asarray(enc["input_ids"], dtype=np.int64),
            np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2))


def _block_text_start(words: Words, i: int) -> int:
    """Where a block starting at word i begins in the text: at the space that belongs to word i."""
    return 0 if i == 0 else int(words.starts[i]) - 1


def _encode_in_blocks(tokenizer: Any, words: Words, block_words: int) -> tuple[np.ndarray, np.ndarray]:
    """The text tokenised in blocks of ``block_words`` words cut before a word's space (memory bounded by a block:
    one call on a 50 MB text took 9.4 GB), the special prefix from the first block only."""
    n = len(words.words)
    cuts = list(range(0, n, block_words))
    bar = None
    if len(cuts) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cuts), desc="tokenising", unit="block")
    all_ids, all_offsets = [], []
    for k, i in enumerate(cuts):
        j = min(n, i + block_words)
        lo, hi = _block_text_start(words, i), int(words.ends[j - 1])
        ids, offsets = _encode(tokenizer, words.text[lo:hi], special=k == 0)
        if k > 0:
            offsets = offsets + lo
        all_ids.append(ids)
        all_offsets.append(offsets)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return np.concatenate(all_ids), np.concatenate(all_offsets)


SEAM_WORDS = 16  # words each side of a block boundary re-tokenised in one piece to prove the cut changed nothing


def _check_seams(tokenizer: Any, tok: Tokenized, block_words: int) -> None:
    """Blocks are only valid where tokenising across a cut gives the same ids as tokenising each side; prove it at
    every cut (a tokenizer whose tokens depend on text beyond the word boundary is refused)."""
    words = tok.words
    for i in range(block_words, len(words.words), block_words):
        a, b = max(0, i - SEAM_WORDS), min(len(words.words), i + SEAM_WORDS)
        lo, hi = _block_text_start(words, a), int(words.ends[b - 1])
        ids, _ = _encode(tokenizer, words.text[lo:hi], special=False)
        if not np.array_equal(ids, tok.ids[tok.spans[a, 0]:tok.spans[b - 1, 1]]):
            raise DocumentError(f"this tokenizer tokenises words {a}..{b - 1} differently when the text is cut before "
                                f"word {i}, so a document of {len(words.words)} words cannot be tokenised in blocks: "
                                f"pass max_words <= {block_words}")


# ---------------------------------------------------------------------------------------------
# The plan: which tokens each forward segment feeds and which targets it scores


@dataclass(frozen=True)
class Segment:
    """One unit of work. ``fresh``: start from an empty KV cache and feed the prefix first (when ``lo`` ≥ prefix);
    then feed ids[lo:hi]. Position j in [lo, hi) predicts target j + 1; targets [t0, t1) are scored here."""

    fresh: bool
    lo: int
    hi: int
    t0: int
    t1: int


def plan_segments(n_tokens: int, prefix: int, context: int | None = None, stride: int | None = None,
                  chunk: int = 256, max_pos: int | None = None) -> list[Segment]:
    """The segments that score every target t in [max(prefix, 1), n_tokens) exactly once (module docstring)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    first = max(prefix, 1)
    if n_tokens <= first:
        raise DocumentError("nothing to predict: the text has a single token and the tokenizer adds no BOS")
    last = n_tokens - 1  # the last position fed (exclusive): position n-2 predicts the last token
    if context is None:
        if stride is not None:
            raise ValueError("stride applies to the window policy only: pass context= as well")
        if max_pos is not None and last > max_pos:
            raise DocumentError(f"the document has {n_tokens} tokens but the model has {max_pos} positions: "
                                "pass context=<window tokens> and stride=<tokens> (the sliding-window policy)")
        segs = []
        for lo in range(0, last, chunk):
            hi = min(lo + chunk, last)
            segs.append(Segment(fresh=lo == 0, lo=lo, hi=hi, t0=max(lo + 1, first), t1=hi + 1))
        return segs
    C = context - prefix
    if C < 2:
        raise ValueError(f"context={context} leaves {C} document tokens after the {prefix}-token prefix; "
                         f"use >= {prefix + 2}")
    if max_pos is not None and context > max_pos:
        raise ValueError(f"context={context} exceeds the model's {max_pos} positions")
    if stride is None:
        stride = max(1, C // 2)
    if not 1 <= stride <= C:
        raise ValueError(f"stride must be in 1..{C} (context minus the prefix), got {stride}")
    hi = min(last, prefix + C)
    segs = [Segment(fresh=True, lo=prefix, hi=hi, t0=first, t1=hi + 1)]
    while hi < last:
        new_hi = min(last, hi + stride)
        segs.append(Segment(fresh=True, lo=new_hi - C, hi=new_hi, t0=hi + 1, t1=new_hi + 1))
        hi = new_hi
    return segs


# ---------------------------------------------------------------------------------------------
# The kernel


@torch.no_grad()
def token_statistics(handle: ModelHandle, hidden: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-target statistics from final hidden states ``hidden`` [n, d] (after the final norm, model dtype) that
    predict token ids ``targets`` [n]. Logits = unembedding(hidden) in the model's dtype; log-probabilities by
    float64 log-softmax; cosines in float64 with the unembedding rows; ``rank`` = number of tokens with a strictly
    larger logit than the target (0: the target is a top-1). Arrays on the CPU."""
    logits = handle.logits(hidden)  # lm_head and the family's post-head steps (softcap, scaling)
    logp = torch.log_softmax(logits.double(), dim=-1)
    rows = torch.arange(targets.shape[0], device=targets.device)
    tgt_logit = logits[rows, targets]
    top = logits.topk(2, dim=-1)
    W = handle.unembed.weight
    hd = hidden.double()
    w_t, w_1, w_2 = (W[i].double() for i in (targets, top.indices[:, 0], top.indices[:, 1]))
    out = {
        "logprob": logp[rows, targets], "logit": tgt_logit.float(), "rank": (logits > tgt_logit[:, None]).sum(-1),
        "top_ids": top.indices, "top_logits": top.values.float(), "top_probs": logp.gather(1, top.indices).exp(),
        "cos_h_target": cosine_rows(hd, w_t), "cos_h_top1": cosine_rows(hd, w_1),
        "cos_h_top2": cosine_rows(hd, w_2),
        "cos_top1_target": cosine_rows(w_1, w_t), "cos_top2_target": cosine_rows(w_2, w_t),
    }
    return {k: v.cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def _feed(handle: ModelHandle, ids: torch.Tensor, cache: Any, chunk: int) -> tuple[torch.Tensor, Any]:
    """Feed ids [L] onto ``cache`` (None: empty) in pieces of ``chunk`` tokens; final hidden states [L, d]."""
    outs = []
    for s in range(0, ids.shape[0], chunk):
        o = handle.base(input_ids=ids[None, s:s + chunk], past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        outs.append(o.last_hidden_state[0])
    return torch.cat(outs, dim=0), cache


def _segment_stats(handle: ModelHandle, tok: Tokenized, seg: Segment, ids: torch.Tensor, cache: Any,
                   chunk: int) -> tuple[dict[str, np.ndarray], Any]:
    if seg.fresh:
        cache = None
        pre = ids[:tok.prefix] if seg.lo >= tok.prefix else ids[:0]
        fed = torch.cat([pre, ids[seg.lo:seg.hi]])
        base = pre.shape[0]  # index in ``fed`` of position seg.lo
    else:
        fed = ids[seg.lo:seg.hi]
        base = 0
    hidden, cache = _feed(handle, fed, cache, chunk)
    start = base + (seg.t0 - 1 - seg.lo)  # the row that predicts target t0
    n = seg.t1 - seg.t0
    # statistics in pieces of ``chunk`` rows: a [rows, vocab] float64 log-softmax is the largest temporary
    parts = [token_statistics(handle, hidden[start + r:start + min(n, r + chunk)],
                              ids[seg.t0 + r:seg.t0 + min(n, r + chunk)]) for r in range(0, n, chunk)]
    stats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # tokens attended to by each prediction: the fed sequence up to and including its row
    history = np.arange(start + 1, start + 1 + n, dtype=np.int64) if seg.fresh or seg.lo == 0 else \
        np.arange(seg.lo + start + 1, seg.lo + start + 1 + n, dtype=np.int64)
    stats["history"] = history
    return stats, cache


@dataclass
class WordPrediction:
    """Per-token arrays (``tokens[name][t]`` for target t; entries before the first target are unused) and the
    per-word view (:meth:`table`)."""

    tok: Tokenized
    tokens: dict[str, np.ndarray]
    token_text: dict[int, str]
    first_target: int
    context: int | None
    stride: int | None
    segments: int
    computed_segments: int
    resumed_segments: int
    first_window_end: int = 0  # targets before this index were scored in the first segment
    token_forwards: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        return self.tok.words.words

    @property
    def scored(self) -> np.ndarray:
        """Indices of the scored words (all, unless the tokenizer adds no BOS: then the first word has no context)."""
        return np.flatnonzero(self.tok.spans[:, 0] >= self.first_target)

    def word_arrays(self) -> dict[str, np.ndarray]:
        """Per scored word: first-token statistics, word log-probability, greedy matches, history; numpy arrays."""
        idx = self.scored
        a, b = self.tok.spans[idx, 0], self.tok.spans[idx, 1]
        T, ids = self.tokens, self.tok.ids
        hit = (T["top_ids"][:, 0] == ids).astype(np.int64)
        csum_lp = np.concatenate([[0.0], np.cumsum(T["logprob"])])
        csum_hit = np.concatenate([[0], np.cumsum(hit)])
        csum_hist = np.minimum.reduceat(T["history"], a) if len(a) else np.zeros(0, np.int64)
        out = {
            "word_index": idx, "token_start": a, "n_tokens": b - a, "target_id": ids[a],
            "target_logit": T["logit"][a], "target_prob": np.exp(T["logprob"][a]), "target_logprob": T["logprob"][a],
            "target_rank": T["rank"][a], "word_logprob": csum_lp[b] - csum_lp[a],
            "top1_id": T["top_ids"][a, 0], "top2_id": T["top_ids"][a, 1],
            "top1_logit": T["top_logits"][a, 0], "top2_logit": T["top_logits"][a, 1],
            "top1_prob": T["top_probs"][a, 0], "top2_prob": T["top_probs"][a, 1],
            "greedy_first": hit[a].astype(bool), "greedy_word": (csum_hit[b] - csum_hit[a]) == (b - a),
            "history": T["history"][a], "min_history": csum_hist,
        }
        for k in ("cos_h_target", "cos_h_top1", "cos_h_top2", "cos_top1_target", "cos_top2_target"):
            out[k] = T[k][a]
        return out

    def table(self) -> pd.DataFrame:
        """One row per scored word, with the token texts of the target and the top-2."""
        w = self.word_arrays()
        df = pd.DataFrame(w)
        df.insert(1, "word", [self.words[i] for i in w["word_index"]])
        for col in ("target", "top1", "top2"):
            df.insert(df.columns.get_loc(f"{col}_id") + 1, f"{col}_text",
                      [self.token_text[int(i)] for i in w[f"{col}_id"]])
        df["word_prob"] = np.exp(df["word_logprob"])
        return df

    def min_history_after_first_window(self) -> int | None:
        """Fewest tokens any prediction outside the first window attended to (None: one window or no windows)."""
        if self.context is None or self.first_window_end >= self.tok.n_tokens:
            return None
        return int(self.tokens["history"][self.first_window_end:].min())

    def summary(self) -> dict[str, Any]:
        w = self.word_arrays()
        return {
            "words": len(self.words), "scored_words": int(len(w["word_index"])), "tokens": self.tok.n_tokens,
            "multi_token_words": int((w["n_tokens"] > 1).sum()),
            "accuracy_first_token": float(w["greedy_first"].mean()), "accuracy_word": float(w["greedy_word"].mean()),
            "mean_target_prob": float(w["target_prob"].mean()),
            "mean_word_surprisal_nats": float(-w["word_logprob"].mean()),
            "token_perplexity": float(math.exp(-self.tokens["logprob"][self.first_target:].mean())),
            "min_history": int(w["min_history"].min()),
            "min_history_after_first_window": self.min_history_after_first_window(),
            "context": self.context, "stride": self.stride,
            "segments": self.segments, "token_forwards": self.token_forwards,
        }


def _check_checkpoint(data: dict[str, np.ndarray], seg: Segment, sha: str) -> None:
    got = (int(data["t0"]), int(data["t1"]), str(data["ids_sha256"]))
    if got != (seg.t0, seg.t1, sha):
        raise DocumentError(f"checkpoint for targets {got[:2]} of document {got[2][:12]} does not match this run "
                            f"(targets {seg.t0, seg.t1}, document {sha[:12]}): delete the .partial run folder")


def predict_words(handle: ModelHandle, text: str, context: int | None = None, stride: int | None = None,
                  chunk: int = 256, run: Any = None, progress: bool = True) -> WordPrediction:
    """Word-by-word prediction of ``text`` (module docstring): one KV-cached pass (``context=None``) or sliding
    windows of ``context`` tokens moved by ``stride`` (default: half the window). ``chunk``: tokens per forward
    call (bounds memory). ``run``: a results Run whose ``save``/``load`` checkpoint each segment."""
    tok = tokenize_words(handle.tokenizer, split_words(text))
    segs = plan_segments(tok.n_tokens, tok.prefix, context, stride, chunk, handle.max_positions)
    if context is not None and stride is None:
        stride = max(1, (context - tok.prefix) // 2)
    ids = torch.as_tensor(tok.ids, device=handle.device)
    sha = tok.sha256()
    n = tok.n_tokens
    tokens: dict[str, np.ndarray] = {}
    cache: Any = None
    computed = resumed = forwards = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n - segs[0].t0, desc="word-by-word", unit="tok")
    for k, seg in enumerate(segs):
        key = f"{CHECKPOINT_PREFIX}_{k:05d}"
        data = run.load(key) if run is not None else None
        if data is not None:
            _check_checkpoint(data, seg, sha)
            stats = {f: data[f] for f in TOKEN_FIELDS}
            resumed += 1
            # full-context mode: the next chunk extends this chunk's cache, so rebuild it (same boundaries, same bits)
            needs_cache = context is None and k + 1 < len(segs)
            if needs_cache:
                fed = ids[seg.lo:seg.hi]
                _, cache = _feed(handle, fed, None if seg.fresh else cache, chunk)
                forwards += int(fed.shape[0])
        else:
            stats, cache = _segment_stats(handle, tok, seg, ids, cache, chunk)
            forwards += (seg.hi - seg.lo) + (tok.prefix if seg.fresh and seg.lo >= tok.prefix else 0)
            computed += 1
            if run is not None:
                run.save(key, {**stats, "t0": np.int64(seg.t0), "t1": np.int64(seg.t1), "ids_sha256": np.array(sha)})
        for f in TOKEN_FIELDS:
            if f not in tokens:
                shape = (n,) + stats[f].shape[1:]
                tokens[f] = np.zeros(shape, dtype=stats[f].dtype)
            tokens[f][seg.t0:seg.t1] = stats[f]
        if bar is not None:
            bar.update(seg.t1 - seg.t0)
    if bar is not None:
        bar.close()
    used = set(tok.ids.tolist()) | set(tokens["top_ids"][segs[0].t0:].ravel().tolist())
    token_text = {i: handle.tokenizer.decode([i]) for i in sorted(used)}
    return WordPrediction(tok=tok, tokens=tokens, token_text=token_text, first_target=segs[0].t0, context=context,
                          stride=stride if context is not None else None, segments=len(segs),
                          computed_segments=computed, resumed_segments=resumed, token_forwards=forwards,
                          first_window_end=segs[0].t1 if context is not None else n,
                          params={"context": context, "stride": stride, "chunk": chunk})


def predict_document(handle: ModelHandle, path: str | Path = SAMPLE_PDF, **kwargs: Any) -> WordPrediction:
    """:func:`predict_words` on the text of a PDF or text file (:func:`read_document`)."""
    return predict_words(handle, read_document(path), **kwargs)


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each index (fewer at the start); float64 [n]."""
    x = np.asarray(x, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)
