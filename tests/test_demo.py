"""The offline demo: stdlib corpus, byte-level BPE, training loop, build bookkeeping (fast: no DEMO training)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from orthoquant import demo
from orthoquant.demo import DEMO, TEST, DemoSize
from orthoquant.errors import UserError

from helpers import token_windows

TINY = DemoSize(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=96, vocab=320, seqlen=32,
                steps=40, batch=8, lr=1e-2)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test here must work with the hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo.build_corpus(tmp_path_factory.mktemp("corpus"), max_chars=60_000)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    docs = [json.loads(line)["text"] for line in corpus["train_jsonl"].read_text().splitlines()]
    return demo.train_tokenizer(docs, TINY.vocab, tmp_path_factory.mktemp("tok"))


def test_corpus_is_deterministic(corpus, tmp_path):
    again = demo.build_corpus(tmp_path, max_chars=60_000)
    for name, path in corpus.items():
        assert path.read_bytes() == again[name].read_bytes(), name


def test_corpus_is_split_by_file(corpus):
    held_out = corpus["valid"].read_text() + corpus["test"].read_text()
    train_docs = [json.loads(line)["text"] for line in corpus["train_jsonl"].read_text().splitlines()]
    assert len(train_docs) > 1 and held_out
    assert "\n\n".join(train_docs) == corpus["train"].read_text()
    assert not [doc[:60] for doc in train_docs if len(doc) > 200 and doc in held_out]
    paths = demo.stdlib_files()
    assert not [rel for rel in paths if rel.split("/")[0] in {"test", "site-packages"}]
    assert {demo.split_of(rel) for rel in paths} == {"train", "valid", "test"}
    docs = demo.split_documents(max_chars=60_000)
    seen = [rel for split in docs.values() for rel, _ in split]
    assert len(seen) == len(set(seen))
    assert all(demo.split_of(rel) == name for name, split in docs.items() for rel, _ in split)


def test_corpus_cap_keeps_every_split_small(corpus):
    sizes = {name: len(corpus[name].read_text()) for name in ("train", "valid", "test")}
    assert 0 < sizes["valid"] and 0 < sizes["test"]
    assert sizes["train"] < 60_000 + 250_000  # the cap plus at most one whole file


def test_tokenizer_round_trips_and_reloads_offline(tokenizer, tmp_path):
    text = 'def naïve(x):\n\t"""Snow ☃, 日本語."""\n    return x  # ok\n\n\nclass A: pass\n'
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(tokenizer) == TINY.vocab
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text).input_ids == ids and len(loaded) == TINY.vocab
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")


def test_encode_long_matches_plain_encoding(tokenizer, corpus):
    text = corpus["valid"].read_text()
    assert demo.encode_long(tokenizer, text, piece_chars=500).tolist() == tokenizer(text).input_ids


@pytest.mark.parametrize("size", [DEMO, TEST], ids=["demo", "test"])
def test_presets_have_the_shapes_quantization_needs(size):
    group = 128 if size is DEMO else 32
    cfg = size.config()
    assert size.kv_heads < size.heads and size.heads % size.kv_heads == 0
    assert size.hidden % group == 0 and (size.heads * size.head_dim) % group == 0
    assert size.head_dim & (size.head_dim - 1) == 0
    assert size.intermediate % 32 == 0 and size.intermediate & (size.intermediate - 1) != 0
    assert not cfg.tie_word_embeddings and cfg.max_position_embeddings >= 2 * size.seqlen


def test_training_lowers_the_loss_and_reloads_identically(tokenizer, corpus, tmp_path):
    text = corpus["train"].read_text()
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(TINY.config()).eval()
    before = demo.perplexity(untrained, tokenizer, text, TINY.seqlen, max_windows=16)
    model = demo.train_model(TINY, text, tokenizer, seed=0, out_dir=tmp_path, log_every=0)
    after = demo.perplexity(model, tokenizer, text, TINY.seqlen, max_windows=16)
    assert after < 0.7 * before and math.isfinite(after)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = token_windows(2, TINY.seqlen, 1, vocab=TINY.vocab)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert AutoTokenizer.from_pretrained(tmp_path)(text[:500]).input_ids == tokenizer(text[:500]).input_ids


def test_demo_build_is_reused_only_when_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHOQUANT_CACHE", str(tmp_path))
    assert demo.cache_dir() == tmp_path
    built = []

    def fake_build(size, corpus_dir, out_dir, max_chars, seed):
        built.append(out_dir)
        return out_dir

    monkeypatch.setattr(demo, "_build", fake_build)
    monkeypatch.setattr(demo, "pick_threads", lambda size: 1)  # times real DEMO steps otherwise
    model_dir = tmp_path / "demo-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # interrupted: no marker
    assert demo.build_demo_model() == model_dir and built == [model_dir]
    (model_dir / demo.MARKER).write_text("")
    assert demo.build_demo_model() == model_dir and len(built) == 1
    demo.build_demo_model(force=True)
    assert len(built) == 2


def test_install_never_replaces_foreign_folders(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    partial = tmp_path / ".mine.partial"
    partial.mkdir()
    with pytest.raises(UserError):
        demo._install(partial, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_pick_threads_returns_a_usable_count():
    assert demo.pick_threads(TINY, steps=1) in (1, 2, 4)


# ------------------------------------------------------------------ the demo table (issue 20.9)

def _demo_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_rows_are_one_per_method_family_at_separating_settings():
    from orthoquant.recipes import load_recipe
    from orthoquant.evaluate.preset_table import run_folder_name

    cases = _demo_script().DEFAULT_CASES
    recipes = {label: load_recipe(preset, sets) for label, preset, sets in cases}
    families = {r.name.split("-")[0] for r in recipes.values()} | {r.solver.name for r in recipes.values()}
    assert {"rtn", "gptq", "quarot", "spinquant", "ostquant", "wush", "quip"} <= families
    assert len({run_folder_name(label) for label in recipes}) == len(cases)  # one run folder each
    w4a4kv4 = [r for r in recipes.values() if r.kv_cache is not None]
    assert len(w4a4kv4) == 5 and all(r.weights.bits == r.activations.bits == r.kv_cache.bits == 4 for r in w4a4kv4)
    assert 0 < recipes["OSTQuant W4A4KV4 (24-step fit)"].fitting.steps <= 50  # a short fit
    assert {r.weights.format for r in recipes.values() if r.activations is not None} >= {"mxfp4"}
    assert sorted(r.weights.bits for r in recipes.values() if r.weights.bits == 2) == [2, 2]


def test_demo_prints_rows_as_they_finish_then_writes_the_report(trained_model, tmp_path, monkeypatch, capsys):
    script = _demo_script()
    monkeypatch.setattr(script, "build_demo_model", lambda: trained_model)
    monkeypatch.setattr(script, "cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "demo-corpus").symlink_to(trained_model.parent / "corpus")
    out = tmp_path / "demo"
    assert script.main(["--presets", "rtn-w4a16@weights.group_size=32,no-such-preset", "--nsamples", "4",
                        "--seqlen", "64", "--max-windows", "8", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| recipe |") and lines[2].startswith("| FP (unquantized) |")
    assert lines[3].startswith("| rtn-w4a16@weights.group_size=32 |")
    assert sum(line == lines[3] for line in lines) == 2  # as soon as it finished, then in the final table
    report = (out / "report" / "report.md").read_text()
    assert "| FP |" in report and "| rtn-w4a16@weights.group_size:32 |" in report
    assert (out / "report" / "ppl.png").is_file() and (out / "results.md").is_file()
