"""Tokenized long texts, cached on disk: tokenizing the demo's 30 MB training text took ~25 s on one
core for every run, to cut 64 windows from it.

The key is the text's sha256 with the tokenizer's own serialisation (vocabulary, merges, normalizer,
special tokens), so a changed text or tokenizer can never hit a stale entry. Entries are safetensors
(no pickle) written atomically; a corrupt entry is ignored and rewritten.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..cache import cache_dir

log = logging.getLogger(__name__)
MIN_CACHED_CHARS = 1_000_000  # shorter texts tokenize in well under a second


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of everything that decides ``tokenizer``'s ids; None for slow (Python) tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    special = repr((tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "add_bos_token", None),
                    getattr(tokenizer, "add_eos_token", None)))
    return hashlib.sha256((backend.to_str() + special).encode()).hexdigest()


def cached_encode(tokenizer, text: str, encode: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``encode(text)``, read from the cache when this text and tokenizer were seen before."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if len(text) < MIN_CACHED_CHARS or fingerprint is None or os.environ.get("ORTHOQUANT_TOKEN_CACHE") == "0":
        return encode(text)
    key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32] + "-" + fingerprint[:32]
    path = cache_dir() / "tokens" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["ids"].long()
        except Exception as e:  # noqa: BLE001 - a broken entry only costs a re-tokenization
            log.warning("token cache entry %s unreadable (%s); tokenizing again", path, e)
    ids = encode(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"ids": ids.to(torch.int32)}, tmp)
    tmp.replace(path)
    return ids
