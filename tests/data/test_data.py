"""Calibration/evaluation text: local sources, window sampling, and the hub table (with a fake hub)."""
from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from orthoquant.data import (SOURCES, HubSource, calibration_windows, evaluation_tokens,
                             perplexity_windows, source_label)
from orthoquant.data import windows as windows_mod
from orthoquant.errors import ConfigError, DataError, UnknownNameError

C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz"}


def char_tokenizer(template: str = "<s> $A") -> PreTrainedTokenizerFast:
    """Character-level tokenizer whose special tokens follow ``template`` (Llama: BOS only)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(single=template,
                                                           special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def words(n: int, seed: int, alphabet: str = "abcdefghij") -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(alphabet, k=rng.randint(1, 7))) for _ in range(n))


def ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text)["input_ids"])


def is_slice(window: torch.Tensor, stream: torch.Tensor) -> bool:
    n = window.numel()
    return stream.numel() >= n and bool((stream.unfold(0, n, 1) == window).all(1).any())


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(words(40, seed=i) for i in range(20)))
    return path


# ---- local sources ---------------------------------------------------------------------------------

def test_txt_windows_are_seeded_contiguous_slices(tok, txt):
    stream = ids(tok, txt.read_text())
    w = calibration_windows(tok, str(txt), nsamples=8, seqlen=32, seed=0)
    assert w.shape == (8, 32) and w.dtype == torch.long
    assert all(is_slice(row, stream) for row in w)
    assert torch.equal(w, calibration_windows(tok, str(txt), 8, 32, seed=0))
    assert not torch.equal(w, calibration_windows(tok, str(txt), 8, 32, seed=1))


def test_txt_evaluation_is_the_whole_file(tok, txt):
    assert torch.equal(evaluation_tokens(tok, str(txt), seqlen=16), ids(tok, txt.read_text())[None])


def test_jsonl_documents_joined_with_blank_line(tok, tmp_path):
    docs = [words(30, seed=i) for i in range(6)] + [""]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "meta": i}) for i, d in enumerate(docs)) + "\n\n")
    stream = ids(tok, "\n\n".join(docs))
    assert torch.equal(evaluation_tokens(tok, str(path), 16), stream[None])
    assert all(is_slice(row, stream) for row in calibration_windows(tok, str(path), 4, 24))


def test_saved_dataset_and_datasetdict_splits(tok, tmp_path):
    train, test = [words(40, i) for i in range(5)], [words(40, 10 + i) for i in range(3)]
    datasets.Dataset.from_dict({"text": test}).save_to_disk(str(tmp_path / "flat"))
    assert torch.equal(evaluation_tokens(tok, str(tmp_path / "flat"), 16), ids(tok, "\n\n".join(test))[None])
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                               "test": datasets.Dataset.from_dict({"text": test})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert torch.equal(evaluation_tokens(tok, str(tmp_path / "dd"), 16), ids(tok, "\n\n".join(test))[None])
    train_stream = ids(tok, "\n\n".join(train))
    assert all(is_slice(r, train_stream) for r in calibration_windows(tok, str(tmp_path / "dd"), 4, 32))
    datasets.DatasetDict({"train": dd["train"]}).save_to_disk(str(tmp_path / "no_test"))
    with pytest.raises(DataError, match="'test'"):
        evaluation_tokens(tok, str(tmp_path / "no_test"), 16)


def test_too_short_source_names_the_numbers(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc " * 50)  # 200 chars + BOS = 201 tokens
    with pytest.raises(DataError, match=r"short\.txt has 201 tokens.*4 × 64 = 256"):
        calibration_windows(tok, str(path), nsamples=4, seqlen=64)
    with pytest.raises(DataError, match="201 tokens"):
        evaluation_tokens(tok, str(path), seqlen=202)
    assert evaluation_tokens(tok, str(path), seqlen=201).shape == (1, 201)


def test_missing_empty_and_malformed_sources(tok, tmp_path):
    missing = tmp_path / "nope" / "calib.txt"
    with pytest.raises(DataError, match=str(missing)):
        calibration_windows(tok, str(missing), 1, 8)
    with pytest.raises(DataError, match=str(missing)):
        evaluation_tokens(tok, str(missing), 8)
    (tmp_path / "empty.txt").write_text(" \n\n ")
    with pytest.raises(DataError, match="no text"):
        calibration_windows(tok, str(tmp_path / "empty.txt"), 1, 8)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        evaluation_tokens(tok, str(tmp_path / "bad.jsonl"), 8)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported"):
        evaluation_tokens(tok, str(tmp_path / "data.csv"), 8)


def test_unknown_name_lists_known_sources(tok):
    with pytest.raises(UnknownNameError, match="'wikitext3'.*known: c4, pile, wikitext2"):
        calibration_windows(tok, "wikitext3", 1, 8)


def test_sizes_must_be_positive(tok, txt):
    with pytest.raises(ConfigError, match="nsamples"):
        calibration_windows(tok, str(txt), 0, 8)


def test_source_label(tmp_path):
    assert source_label("c4") == "c4"
    assert source_label(str(tmp_path / "my.jsonl")) == "my.jsonl"
    assert source_label(str(tmp_path / "folder") + "/") == "folder"


@pytest.mark.parametrize("template", ["<s> $A", "<s> $A </s>", "$A"])
def test_chunked_encoding_matches_one_call(template, monkeypatch):
    tok = char_tokenizer(template)
    text = "\n".join(words(20, seed=i) for i in range(30)) + "\n" + "x" * 300
    monkeypatch.setattr(windows_mod, "CHUNK_THRESHOLD_CHARS", 100)
    monkeypatch.setattr(windows_mod, "CHUNK_CHARS", 64)
    chunks = windows_mod._chunks(text, 64)
    assert "".join(chunks) == text and len(chunks) > 10
    assert all(c.endswith("\n") or len(c) == 64 for c in chunks[:-1])
    assert torch.equal(windows_mod.encode(tok, text), ids(tok, text))  # special tokens once, at the ends


# ---- perplexity windows ----------------------------------------------------------------------------

def test_perplexity_windows_tile_the_stream_and_drop_the_tail():
    tokens = torch.arange(100)[None]
    w = perplexity_windows(tokens, 32)
    assert w.shape == (3, 32)
    assert torch.equal(w.reshape(-1), torch.arange(96))  # no overlap, no gap, tail 96..99 dropped
    assert perplexity_windows(tokens, 100).shape == (1, 100)
    with pytest.raises(DataError):
        perplexity_windows(tokens, 101)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        perplexity_windows(torch.arange(100), 10)


# ---- hub sources (fake load_dataset) ---------------------------------------------------------------

def test_hub_table():
    assert SOURCES.names() == ["c4", "pile", "wikitext2"]
    assert SOURCES.get("wikitext2") == HubSource("Salesforce/wikitext", "wikitext-2-raw-v1",
                                                 splits={"calib": "train", "eval": "test"}, joiner="\n\n")
    assert SOURCES.get("c4") == HubSource("allenai/c4", None, C4_FILES,
                                          {"calib": "train", "eval": "validation"}, "text", " ",
                                          per_document=True, eval_docs=1100, eval_windows=256)
    assert SOURCES.get("pile") == HubSource("mit-han-lab/pile-val-backup", None, None,
                                            {"calib": "validation", "eval": "validation"}, "text", " ",
                                            per_document=True, eval_docs=1100, eval_windows=256)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace ``datasets.load_dataset``; ``hub.splits[(path, split)]`` holds the documents."""
    class Hub:
        calls: list = []
        splits: dict = {}

        def __call__(self, path, name=None, data_files=None, split=None, **kw):
            self.calls.append(dict(path=path, name=name, data_files=data_files, split=split, **kw))
            return datasets.Dataset.from_dict({"text": self.splits[(path, split)]})

    hub = Hub()
    hub.calls, hub.splits = [], {}
    monkeypatch.setattr(datasets, "load_dataset", hub)
    return hub


def test_wikitext2_joins_train_and_test(tok, fake_hub):
    train, test = [words(20, i) for i in range(10)] + [""], ["", words(30, 99)]
    fake_hub.splits = {("Salesforce/wikitext", "train"): train, ("Salesforce/wikitext", "test"): test}
    w = calibration_windows(tok, "wikitext2", 5, 16, seed=3)
    assert all(is_slice(r, ids(tok, "\n\n".join(train))) for r in w)
    assert torch.equal(evaluation_tokens(tok, "wikitext2", 8), ids(tok, "\n\n".join(test))[None])
    assert fake_hub.calls == [
        dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", data_files=None, split="train"),
        dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", data_files=None, split="test")]


def test_c4_eval_joins_1100_docs_and_truncates(tok, fake_hub):
    docs = [words(2, i) for i in range(1100)] + ["ZZZZ"] * 50
    fake_hub.splits = {("allenai/c4", "validation"): docs}
    full = ids(tok, " ".join(docs[:1100]))
    assert 256 * 8 < full.numel() < 256 * 64
    assert torch.equal(evaluation_tokens(tok, "c4", seqlen=8), full[None, :256 * 8])
    assert torch.equal(evaluation_tokens(tok, "c4", seqlen=64), full[None])  # doc 1100 never joined
    assert fake_hub.calls[0] == dict(path="allenai/c4", name=None, split="validation",
                                     data_files={"validation": C4_FILES["validation"]})


def test_c4_calibration_windows_of_distinct_long_documents(tok, fake_hub):
    docs = [words(3, i) if i % 3 else words(40, i) for i in range(300)]  # every third doc is long
    fake_hub.splits = {("allenai/c4", "train"): docs}
    w = calibration_windows(tok, "c4", nsamples=12, seqlen=48, seed=0)
    assert w.shape == (12, 48)
    doc_ids = [ids(tok, d) for d in docs]
    hosts = [[j for j, d in enumerate(doc_ids) if is_slice(row, d)] for row in w]
    assert all(h and all(j % 3 == 0 for j in h) for h in hosts)
    assert len({h[0] for h in hosts}) == 12
    assert torch.equal(w, calibration_windows(tok, "c4", 12, 48, seed=0))
    assert not torch.equal(w, calibration_windows(tok, "c4", 12, 48, seed=1))
    assert fake_hub.calls[0] == dict(path="allenai/c4", name=None, split="train",
                                     data_files={"train": C4_FILES["train"]})
    with pytest.raises(DataError, match="100 documents longer than seqlen = 48.*nsamples = 101"):
        calibration_windows(tok, "c4", nsamples=101, seqlen=48)


def test_pile_calibrates_after_its_eval_documents(tok, fake_hub):
    docs = [words(6, i, alphabet="XYZ") for i in range(1100)] + [words(40, i) for i in range(30)]
    fake_hub.splits = {("mit-han-lab/pile-val-backup", "validation"): docs}
    w = calibration_windows(tok, "pile", nsamples=20, seqlen=8)  # eval docs are long enough too
    assert not torch.isin(w, ids(tok, "XYZ")[1:]).any()
    assert torch.equal(evaluation_tokens(tok, "pile", 4096), ids(tok, " ".join(docs[:1100]))[None])
    assert [c["split"] for c in fake_hub.calls] == ["validation", "validation"]
    assert all(c["path"] == "mit-han-lab/pile-val-backup" and c["data_files"] is None
               for c in fake_hub.calls)


def test_hub_failure_is_a_data_error(tok, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="allenai/c4.*local .txt/.jsonl"):
        evaluation_tokens(tok, "c4", 8)


# ---- token cache ------------------------------------------------------------------------------------

@pytest.fixture
def small_cache(tmp_path, monkeypatch):
    """Cache texts of any length, into a fresh folder."""
    from orthoquant.data import token_cache

    monkeypatch.setenv("ORTHOQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(token_cache, "MIN_CACHED_CHARS", 10)
    return tmp_path / "cache" / "tokens"


def test_token_cache_returns_what_tokenizing_gives(tok, small_cache, monkeypatch):
    from orthoquant.data import windows

    text = words(3000, 1)
    first = windows.encode(tok, text)
    assert len(list(small_cache.iterdir())) == 1
    monkeypatch.setattr(windows, "_encode", lambda *a: pytest.fail("a cached text was tokenized again"))
    again = windows.encode(tok, text)
    assert again.dtype == torch.long and torch.equal(again, first) and torch.equal(first, ids(tok, text))


def test_token_cache_keys_on_text_and_tokenizer(tok, small_cache):
    from orthoquant.data import windows

    text = words(3000, 2)
    windows.encode(tok, text)
    other = char_tokenizer("<s> $A </s>")  # same vocabulary, different special tokens
    assert torch.equal(windows.encode(other, text), ids(other, text))
    assert torch.equal(windows.encode(tok, text + "a"), ids(tok, text + "a"))
    assert len(list(small_cache.iterdir())) == 3


def test_corrupt_token_cache_entry_is_rebuilt(tok, small_cache):
    from orthoquant.data import windows

    text = words(3000, 3)
    windows.encode(tok, text)
    (entry,) = small_cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:20])
    assert torch.equal(windows.encode(tok, text), ids(tok, text))
    assert torch.equal(windows.encode(tok, text), ids(tok, text))  # and the rewritten entry reads back
