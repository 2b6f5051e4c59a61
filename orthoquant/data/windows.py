"""Token tensors for calibration and perplexity: tokenizing sources and cutting windows.

Calibration follows GPTQ/QuaRot: joined sources are tokenized once and ``nsamples`` random windows are
cut from the stream; per-document sources (c4, pile) take one random window from each of ``nsamples``
random documents longer than ``seqlen`` tokens. All randomness comes from a seeded ``torch.Generator``.
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, DataError
from .sources import Corpus, open_source
from .token_cache import cached_encode

logger = logging.getLogger(__name__)

# Texts longer than this are tokenized in newline-aligned chunks (batched, so the Rust tokenizer runs
# them in parallel and never holds one giant encoding). Below it the text is tokenized in one call,
# exactly as GPTQ does: wikitext2 test (~1.3 MB) and GPTQ's c4 eval text (~2.5 MB) stay bit-identical.
CHUNK_THRESHOLD_CHARS = 4_000_000
CHUNK_CHARS = 1_000_000
# Documents tokenized per batch while looking for long-enough documents (order is kept, so the
# result is the same as tokenizing them one by one).
DOC_BATCH = 64


# ---- tokenizing -----------------------------------------------------------------------------------

def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens ``tokenizer`` puts before and after a text (Llama: ``[bos], []``), found by probing."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(content) + 1):
        if full[k:k + len(content)] == content:
            return full[:k], full[k + len(content):]
    return [], []


def _chunks(text: str, size: int) -> list[str]:
    """``text`` cut after the last newline within every ``size`` characters (at ``size`` if none)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut >= start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` with the special tokens ``tokenizer(text)`` adds.

    Long texts are tokenized in newline-aligned chunks; ids at chunk seams may differ from a single
    call, but the result is deterministic. Texts over a megabyte are cached (:mod:`.token_cache`).

    :return: LongTensor (T,).
    """
    return cached_encode(tokenizer, text, lambda t: _encode(tokenizer, t))


def _encode(tokenizer, text: str) -> torch.Tensor:
    if len(text) <= CHUNK_THRESHOLD_CHARS:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    head, tail = _special_affixes(tokenizer)
    parts = tokenizer(_chunks(text, CHUNK_CHARS), add_special_tokens=False)["input_ids"]
    return torch.cat([torch.tensor(p, dtype=torch.long) for p in [head, *parts, tail]])


# ---- windows --------------------------------------------------------------------------------------

def _stream_windows(stream: torch.Tensor, label: str, nsamples: int, seqlen: int,
                    gen: torch.Generator) -> torch.Tensor:
    """``nsamples`` windows at random offsets of ``stream`` (T,); windows may overlap, as in GPTQ."""
    need = nsamples * seqlen
    if stream.numel() < need:
        raise DataError(f"calibration source {label} has {stream.numel()} tokens, fewer than nsamples × "
                        f"seqlen = {nsamples} × {seqlen} = {need}; lower --nsamples/--seqlen or give "
                        "more text")
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples, 1), generator=gen)
    return stream[starts + torch.arange(seqlen)]


def _document_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int,
                      gen: torch.Generator) -> torch.Tensor:
    """GPTQ's c4 sampling: random documents with more than ``seqlen`` tokens, one random window each.

    Documents are visited in a seeded random order without repetition, so the search ends (with a
    DataError) when too few documents are long enough, and no document is used twice.
    """
    count = max(0, len(corpus.documents) - corpus.first_doc)
    order = (corpus.first_doc + torch.randperm(count, generator=gen)).tolist()
    windows: list[list[int]] = []
    for b in range(0, count, DOC_BATCH):
        batch = [corpus.documents[i] for i in order[b:b + DOC_BATCH]]
        for ids in tokenizer(batch)["input_ids"]:
            if len(ids) > seqlen:
                start = int(torch.randint(0, len(ids) - seqlen + 1, (1,), generator=gen))
                windows.append(ids[start:start + seqlen])
                if len(windows) == nsamples:
                    return torch.tensor(windows, dtype=torch.long)
    raise DataError(f"calibration source {corpus.label} has {len(windows)} documents longer than seqlen = "
                    f"{seqlen} tokens, fewer than nsamples = {nsamples}; lower --nsamples/--seqlen")


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Random calibration windows of ``source``, reproducible from ``seed``.

    :param tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text)["input_ids"]``).
    :param source: registered name (``SOURCES``) or a local .txt/.jsonl/datasets-folder path.
    :param nsamples: number of windows.
    :param seqlen: tokens per window.
    :param seed: seed of the ``torch.Generator`` drawing documents and offsets.
    :return: LongTensor (nsamples, seqlen).
    :raises DataError: the source is missing or has too few tokens.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    corpus = open_source(source, "calib")
    gen = torch.Generator().manual_seed(seed)
    if corpus.per_document:
        windows = _document_windows(tokenizer, corpus, nsamples, seqlen, gen)
    else:
        windows = _stream_windows(encode(tokenizer, corpus.text()), corpus.label, nsamples, seqlen, gen)
    logger.info("calibration: %d × %d tokens from %s (seed %d)", nsamples, seqlen, corpus.label, seed)
    return windows


def fitting_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Training sequences of a learned-transform fit, packed as OSTQuant and SpinQuant pack them: the
    source's text tokenized once (cached as calibration text is) and cut into consecutive,
    non-overlapping windows. ``nsamples = 0`` takes every window (OSTQuant: the whole packed train
    split); otherwise a seeded random ``nsamples`` of them, in stream order (SpinQuant: 800 × 2048).
    Per-document sources (c4, pile) give one random window from each of ``nsamples`` documents.

    :return: LongTensor (n, seqlen): a view of the token stream when every window is taken, so the
        micro-batches gathered from it are the only copies.
    :raises DataError: the source packs into fewer than ``nsamples`` windows (or none).
    """
    _check_positive(seqlen=seqlen)
    corpus = open_source(source, "calib")
    gen = torch.Generator().manual_seed(seed)
    if corpus.per_document:
        if nsamples == 0:
            raise ConfigError(f"fitting.nsamples=0 packs a whole text, but {corpus.label} is read per document; "
                              "set fitting.nsamples")
        return _document_windows(tokenizer, corpus, nsamples, seqlen, gen)
    stream = encode(tokenizer, corpus.text())
    n = stream.numel() // seqlen
    if n == 0 or n < nsamples:
        raise DataError(f"fitting source {corpus.label} has {stream.numel()} tokens: {n} windows of fitting.seqlen = "
                        f"{seqlen}, fewer than fitting.nsamples = {max(nsamples, 1)}; lower fitting.nsamples/"
                        "fitting.seqlen or give more text")
    packed = stream[:n * seqlen].view(n, seqlen)
    if nsamples:
        packed = packed[torch.randperm(n, generator=gen)[:nsamples].sort().values]
    logger.info("fitting: %d × %d tokens from %s", packed.shape[0], seqlen, corpus.label)
    return packed


def evaluation_tokens(tokenizer, source: str, seqlen: int) -> torch.Tensor:
    """The perplexity stream of ``source``: wikitext2 test joined with "\\n\\n"; c4/pile GPTQ-style
    (first 1100 documents joined with " ", first ``256 * seqlen`` tokens); a local source whole.

    :param seqlen: window length; the stream must hold at least one window.
    :return: LongTensor (1, T).
    """
    _check_positive(seqlen=seqlen)
    corpus = open_source(source, "eval")
    tokens = encode(tokenizer, corpus.text())
    if corpus.max_windows is not None:
        tokens = tokens[:corpus.max_windows * seqlen]
    if tokens.numel() < seqlen:
        raise DataError(f"evaluation source {corpus.label} has {tokens.numel()} tokens, fewer than one "
                        f"window of seqlen = {seqlen}; lower --seqlen or give more text")
    logger.info("evaluation: %d tokens from %s", tokens.numel(), corpus.label)
    return tokens[None]


def perplexity_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows over ``tokens``, dropping the tail (GPTQ/QuaRot: n = T // seqlen).

    :param tokens: LongTensor (1, T).
    :return: LongTensor (T // seqlen, seqlen), a view of ``tokens``.
    """
    _check_positive(seqlen=seqlen)
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must have shape (1, T), got {tuple(tokens.shape)}")
    n = tokens.shape[1] // seqlen
    if n == 0:
        raise DataError(f"{tokens.shape[1]} tokens hold no window of seqlen = {seqlen}")
    return tokens[0, :n * seqlen].view(n, seqlen)
