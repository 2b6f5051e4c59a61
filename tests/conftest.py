"""Shared fixtures: tiny random models of every family (in memory and saved), a tokenizer, text files,
and a small model trained once per session (≤ 30 s) for tests that need real perplexities."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from orthoquant.models.tiny import tiny_model

torch.set_num_threads(1)

WORDS = ("alpha beta gamma delta epsilon quant rotation hadamard matrix layer token scale group "
         "weight act cache norm fold gptq lattice orthogonal stiefel kernel").split()


def make_text(n_docs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))) for _ in range(n_docs)]
    return "\n\n".join(docs)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from orthoquant.demo import train_tokenizer

    return train_tokenizer([make_text(300, seed=1)], 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(make_text(400, seed=2))
    return path


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """Factory: save a randomized tiny model of a family with the session tokenizer, return its folder."""

    def save(family: str = "llama", **overrides) -> Path:
        model = tiny_model(family, vocab_size=len(tokenizer), **overrides)
        folder = tmp_path / f"{family}-model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A small Llama trained on standard-library text inside the session; returns its folder.

    Its held-out text is ``folder.parent / "corpus" / "test.txt"``.
    """
    from orthoquant.demo import build_test_model

    return build_test_model(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def trained_data(trained_model):
    """(folder, calibration windows (32, 64) from train.txt, every held-out window (~650, 64) of valid.txt)."""
    from transformers import AutoTokenizer

    from orthoquant.data import calibration_windows, evaluation_tokens, perplexity_windows

    tokenizer = AutoTokenizer.from_pretrained(trained_model)
    corpus = trained_model.parent / "corpus"
    calib = calibration_windows(tokenizer, str(corpus / "train.txt"), 32, 64, seed=0)
    held_out = perplexity_windows(evaluation_tokens(tokenizer, str(corpus / "valid.txt"), 64), 64)
    return trained_model, calib, held_out
