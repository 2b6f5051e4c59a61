"""Data for the offline demo model: the Python standard library as a corpus, and a byte-level BPE.

Every machine with Python has its standard library: its modules and their docstrings are the text.
The split into train / valid / test is by file (a hash of the path), so held-out perplexity is
measured on files the model never saw.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterable

import torch
from transformers import PreTrainedTokenizerFast

from .errors import DataError

log = logging.getLogger(__name__)

SPLIT_PERCENT = {"valid": 5, "test": 5}  # the rest is train
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_MAX_FILE_CHARS = 250_000  # pydoc_data/topics.py (757k) alone would be most of a held-out split
_PIECE_END = re.compile(r"\S(?=\n)")  # see encode_long


# ----------------------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Relative paths of the stdlib's modules, sorted; test suites and installed packages left out."""
    root, rels = stdlib_root(), []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_PARTS]  # pruned: never even listed
        base = Path(folder).relative_to(root).as_posix()
        rels += [name if base == "." else f"{base}/{name}" for name in files
                 if name.endswith(".py") and not name.startswith("_sysconfigdata")]  # build-machine specific
    return sorted(rels)


def read_document(rel: str) -> str | None:
    """The source of ``rel`` as one document, or ``None`` for unreadable, huge or generated files."""
    try:
        text = (stdlib_root() / rel).read_text(encoding="utf-8").replace("\r\n", "\n").strip()
    except (UnicodeDecodeError, OSError):
        return None  # a few platforms ship latin-1 data files; losing them costs nothing
    if not text or len(text) > _MAX_FILE_CHARS or "gencodec.py" in text[:400]:  # codec tables
        return None
    return text


def _rank(rel: str, seed: int) -> int:
    # sha256, not hash(): Python salts str hashes per process, and the split must never move
    return int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "big")


def split_of(rel: str, seed: int = 0) -> str:
    """The split (``train`` / ``valid`` / ``test``) of the file ``rel``: a pure function of path and seed."""
    bucket = _rank(rel, seed) % 100
    if bucket < SPLIT_PERCENT["valid"]:
        return "valid"
    return "test" if bucket < SPLIT_PERCENT["valid"] + SPLIT_PERCENT["test"] else "train"


def split_documents(max_chars: int | None = None, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """``(path, text)`` documents of each split; files are only read until their split's share is full.

    Without a cap every split is in path order; with one, in hash order, so a small corpus still
    samples the whole library, and each split gets its 90/5/5 share of ``max_chars`` in whole files.
    """
    rels: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for rel in stdlib_files():
        rels[split_of(rel, seed)].append(rel)
    out = {}
    for name, names in rels.items():
        budget = None
        if max_chars is not None:
            names = sorted(names, key=lambda rel: _rank(rel, seed + 1))
            budget = max_chars * SPLIT_PERCENT.get(name, 100 - sum(SPLIT_PERCENT.values())) // 100
        docs, total = [], 0
        for rel in names:
            if budget is not None and docs and total >= budget:
                break
            text = read_document(rel)
            if text is not None:
                docs.append((rel, text))
                total += len(text)
        if not docs:
            raise DataError(f"the {name} split of the stdlib corpus is empty")
        out[name] = docs
    return out


def _write_atomic(path: Path, text: str) -> None:
    # write-then-rename: a reader (or a concurrent build) never sees half a file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def build_corpus(out_dir: Path, max_chars: int | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the stdlib corpus to ``out_dir``: ``{train,valid,test}.txt`` and ``train.jsonl``.

    Documents are whole source files, separated by a blank line in the ``.txt`` files; the split is by
    file, so no document is in two splits. The same Python always gives the same bytes.

    :param max_chars: cap on the total characters (each split keeps its 90/5/5 share); ``None``: all.
    :returns: ``{"train": ..., "valid": ..., "test": ..., "train_jsonl": ...}`` paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: [text for _, text in docs] for name, docs in split_documents(max_chars, seed).items()}
    paths = {name: out_dir / f"{name}.txt" for name in splits}
    for name, texts in splits.items():
        _write_atomic(paths[name], "\n\n".join(texts))
    paths["train_jsonl"] = out_dir / "train.jsonl"
    _write_atomic(paths["train_jsonl"], "".join(json.dumps({"text": text}) + "\n" for text in splits["train"]))
    log.info("corpus in %s: %s", out_dir, {k: f"{len(v)} files" for k, v in splits.items()})
    return paths


# -------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | None) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE of exactly ``vocab_size`` tokens (``<s>``, ``</s>``, ``<pad>`` included).

    Like Llama's, the tokenizer prepends ``<s>``. Saved with ``save_pretrained(out_dir)`` (when given)
    so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text round-trips
    )
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise DataError(f"corpus too small for a {vocab_size}-token BPE ({tok.get_vocab_size()} tokens)")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def encode_long(tokenizer, text: str, piece_chars: int = 100_000) -> torch.Tensor:
    """``tokenizer(text).input_ids`` as a tensor, for texts of megabytes: pieces encoded in parallel.

    Pieces end after a non-space character followed by a newline: the byte-level pre-tokenizer always
    breaks there, so the ids equal those of the whole text.
    """
    pieces, start = [], 0
    while start < len(text):
        cut = _PIECE_END.search(text, start + piece_chars)
        end = cut.end() if cut else len(text)
        pieces.append(text[start:end])
        start = end
    ids = [tokenizer.bos_token_id] if tokenizer(" ").input_ids[:1] == [tokenizer.bos_token_id] else []
    for piece_ids in tokenizer(pieces, add_special_tokens=False).input_ids:
        ids.extend(piece_ids)
    return torch.tensor(ids, dtype=torch.long)
