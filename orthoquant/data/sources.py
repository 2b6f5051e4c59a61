"""Text sources: hub datasets (wikitext2, c4, pile) and local files, opened as lists of documents.

A *source* is a registered hub name (``SOURCES``) or a local path: a ``.txt`` file (the whole file is
one text), a ``.jsonl`` file (one ``{"text": ...}`` object per line, documents joined with "\\n\\n") or
a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (column "text";
a DatasetDict calibrates on ``train`` and evaluates on ``test``). A registered name wins over a file of
the same name in the working directory; write ``./c4`` for the file.

This module only finds and reads the documents; ``windows`` tokenizes them and cuts windows.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DataError, UnknownNameError
from ..registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    """A text dataset on the Hugging Face hub, read with ``datasets.load_dataset``.

    :param path: hub dataset id.
    :param name: dataset config name, or None.
    :param data_files: split -> file inside the repo; only the file of the requested split is loaded.
    :param splits: role ("calib", "eval") -> split name.
    :param text_field: column holding the text.
    :param joiner: separator joining documents into one stream (the eval stream, and the calibration
        stream of joined sources).
    :param per_document: calibrate GPTQ-style on random windows of random long documents.
    :param eval_docs: evaluate on the first ``eval_docs`` documents only (None: all).
    :param eval_windows: keep the first ``eval_windows * seqlen`` eval tokens (None: all); a count of
        windows rather than tokens because GPTQ's c4 eval keeps ``256 * seqlen`` tokens at any seqlen.
    """

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"calib": "train", "eval": "test"})
    text_field: str = "text"
    joiner: str = "\n\n"
    per_document: bool = False
    eval_docs: int | None = None
    eval_windows: int | None = None


SOURCES: Registry[HubSource] = Registry("text source")
# "Salesforce/wikitext" is the repo the legacy id "wikitext" redirects to; the datasets maintainers
# recommend the namespaced id, and recent huggingface_hub versions no longer resolve bare ids.
SOURCES.add("wikitext2", HubSource("Salesforce/wikitext", "wikitext-2-raw-v1"))
# No config name: GPTQ's old "allenai--c4" config no longer exists; data_files picks GPTQ's shards.
SOURCES.add("c4", HubSource(
    "allenai/c4",
    data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz"},
    splits={"calib": "train", "eval": "validation"},
    joiner=" ", per_document=True, eval_docs=1100, eval_windows=256,
))
# The original pile is gone; AWQ's backup of its validation split is the only split, so calibration
# and evaluation share it: evaluation takes the first 1100 documents (as for c4) and calibration
# draws only from the documents after them.
SOURCES.add("pile", HubSource(
    "mit-han-lab/pile-val-backup",
    splits={"calib": "validation", "eval": "validation"},
    joiner=" ", per_document=True, eval_docs=1100, eval_windows=256,
))


@dataclass(frozen=True)
class Corpus:
    """Documents of one source for one role.

    :param label: name for messages and reports.
    :param documents: the texts (a lazy ``datasets`` column for hub sources).
    :param joiner: separator used to join ``documents`` into one stream.
    :param per_document: sample calibration windows per document instead of from the stream.
    :param first_doc: calibration draws only from documents at or after this index.
    :param max_windows: evaluation keeps the first ``max_windows * seqlen`` tokens (None: all).
    """

    label: str
    documents: Sequence[str]
    joiner: str
    per_document: bool = False
    first_doc: int = 0
    max_windows: int | None = None

    def text(self) -> str:
        return self.joiner.join(self.documents)


def source_label(source: str) -> str:
    """Name of ``source`` for reports: the registered name, or the file/folder name of a path."""
    return source if source in SOURCES else (Path(source).name or source)


# ---- opening sources ------------------------------------------------------------------------------

def _load_hub_split(spec: HubSource, split: str):
    """One split of a hub dataset as a ``datasets.Dataset``; a hub failure becomes a DataError."""
    import datasets  # lazily: importing datasets costs seconds

    files = {split: spec.data_files[split]} if spec.data_files else None
    logger.info("loading %s (%s) split '%s' from the hub", spec.path, spec.name or files, split)
    try:
        return datasets.load_dataset(spec.path, spec.name, data_files=files, split=split)
    except OSError as e:  # ConnectionError, offline mode, missing repo or file
        raise DataError(f"cannot load '{spec.path}' split '{split}' from the hub ({e}); without hub "
                        "access give a local .txt/.jsonl file or a datasets folder") from e


def _hub_corpus(name: str, role: str) -> Corpus:
    spec = SOURCES.get(name)
    split = spec.splits[role]
    dataset = _load_hub_split(spec, split)
    docs = dataset[spec.text_field]
    if role == "eval":
        docs = docs if spec.eval_docs is None else docs[:spec.eval_docs]
        return Corpus(name, docs, spec.joiner, max_windows=spec.eval_windows)
    # Keep calibration off the evaluation documents when both roles read the same split.
    held_out = (spec.eval_docs or 0) if spec.splits["eval"] == split else 0
    return Corpus(name, docs, spec.joiner, spec.per_document, held_out)


def _read_txt(path: Path, role: str) -> list[str]:
    return [path.read_text(encoding="utf-8")]


def _read_jsonl(path: Path, role: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({e})") from e
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: \"text\" is {type(text).__name__}, not a string")
        docs.append(text)
    return docs


def _read_saved(path: Path, role: str) -> list[str]:
    import datasets  # lazily: importing datasets costs seconds

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a folder saved with datasets' save_to_disk ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        split = {"calib": "train", "eval": "test"}[role]
        if split not in data:
            raise DataError(f"{path} has splits {sorted(data)}; the {role} text needs split '{split}'")
        data = data[split]
    if "text" not in data.column_names:
        raise DataError(f"{path} has columns {data.column_names}, no 'text' column")
    return list(data["text"])


LOCAL_READERS: dict[str, Callable[[Path, str], list[str]]] = {".txt": _read_txt, ".jsonl": _read_jsonl}
LOCAL_JOINERS = {".txt": "", ".jsonl": "\n\n", "": "\n\n"}


def _local_corpus(path: Path, role: str) -> Corpus:
    if not path.exists():
        raise DataError(f"text source '{path}' does not exist")
    kind = "" if path.is_dir() else path.suffix.lower()
    reader = _read_saved if kind == "" else LOCAL_READERS.get(kind)
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{kind}'; give a .txt or .jsonl file or a "
                        "folder saved with datasets' save_to_disk")
    try:
        docs = reader(path, role)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e
    # Empty documents stay: they are part of the joined stream (wikitext has many).
    if not any(d.strip() for d in docs):
        raise DataError(f"{path} holds no text")
    logger.info("read %d documents from %s", len(docs), path)
    return Corpus(path.name, docs, LOCAL_JOINERS[kind])


def _looks_like_path(source: str) -> bool:
    return os.path.exists(source) or "/" in source or os.sep in source or \
        Path(source).suffix.lower() in LOCAL_READERS


def open_source(source: str, role: str) -> Corpus:
    """The documents of ``source`` for ``role`` ("calib" or "eval").

    :raises UnknownNameError: ``source`` is neither registered nor path-like.
    :raises DataError: the path is missing, unreadable or holds no text.
    """
    if source in SOURCES:
        return _hub_corpus(source, role)
    if _looks_like_path(source):
        return _local_corpus(Path(source), role)
    raise UnknownNameError(f"unknown text source '{source}'; known: {', '.join(SOURCES.names())}; "
                           "or give a path to a .txt/.jsonl file or a datasets folder")
