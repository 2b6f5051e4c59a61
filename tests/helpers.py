"""Helpers shared by test files (fixtures stay in conftest.py).

Synthetic layers (W, H) come from ``scripts/_bench.py`` (on the path through pytest's ``pythonpath``):
tests and benchmarks measure the same kind of layer, and the package itself has no use for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from _bench import factor_layer, second_moment, synthetic_layer  # noqa: F401  (re-exported for the tests)
from orthoquant import quantize
from orthoquant.fitting import deploy, prepare_session
from orthoquant.layerwise import capture_inputs
from orthoquant.models.generic import spec_for
from orthoquant.models.loading import InMemorySource
from orthoquant.models.tiny import TINY_VOCAB, tiny_model
from orthoquant.pipeline import make_plan, prepare_model
from orthoquant.runner import LayerwiseQuantizer
from orthoquant.transforms.learnable import LearnedTransforms
from orthoquant.transforms.sites import Dims

CPU = torch.device("cpu")


def token_windows(n: int, seqlen: int, seed: int = 0, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """(n, seqlen) int64 token ids drawn uniformly below ``vocab`` (a model's ``config.vocab_size`` or its
    tokenizer's length; the tiny models' by default) from a generator seeded with ``seed``."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def tiny_run(tmp_path: Path, recipe, tokenizer, family: str = "llama", nwindows: int = 4, **model_kw):
    """Quantize a tiny ``family`` model sized to ``tokenizer`` on ``nwindows`` token windows of 24 into
    ``tmp_path/run``, which also gets the tokenizer; returns (the in-memory quantized model, the run folder)."""
    vocab, run = len(tokenizer), tmp_path / "run"
    model = quantize(tiny_model(family, vocab_size=vocab, **model_kw), recipe, token_windows(nwindows, 24, vocab=vocab),
                     out=run)
    tokenizer.save_pretrained(run)
    return model, run


class Interrupt(Exception):
    """Stands for a crash in the middle of a run."""


def interrupt_then_resume(quantize_once: Callable[[], object], monkeypatch, at: int = 2,
                          check_interrupted: Callable[[], None] | None = None):
    """Run ``quantize_once()`` until layer ``at`` starts (it then raises, as a crash would), then run it
    again to the end; returns the second call's result.

    :param check_interrupted: called between the two runs (e.g. to look at what the first one left).
    """
    original = LayerwiseQuantizer._quantize_layer

    def stop(self, layer, index, prefix, inputs):
        if index == at:
            raise Interrupt
        return original(self, layer, index, prefix, inputs)

    monkeypatch.setattr(LayerwiseQuantizer, "_quantize_layer", stop)
    with pytest.raises(Interrupt):
        quantize_once()
    monkeypatch.setattr(LayerwiseQuantizer, "_quantize_layer", original)
    if check_interrupted is not None:
        check_interrupted()
    return quantize_once()


def assert_same_run_files(a: Path, b: Path, n_layers: int, rest: bool = True) -> None:
    """The two run folders hold byte-identical layer files (and model-level rest)."""
    names = [f"layers/{i:05d}.safetensors" for i in range(n_layers)] + (["rest.safetensors"] if rest else [])
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@torch.no_grad()
def kl_to(model, reference, windows: torch.Tensor) -> float:
    """Mean per-token KL(reference ‖ model) over ``windows`` (n, seqlen), in batches of 40."""
    total = 0.0
    for ids in windows.split(40):
        p = F.log_softmax(reference(ids).logits, -1)
        q = F.log_softmax(model(ids).logits, -1)
        total += (p.exp() * (p - q)).sum().item()
    return total / windows.numel()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a|: the logit error the family tests bound."""
    return float((a - b).abs().max() / a.abs().max())


def random_learned(model, names, seed: int = 0) -> LearnedTransforms:
    """Random orthogonal rotations (QR of Gaussians) and scales exp(θ), θ ~ N(0, 0.5²) at ``names``."""
    g = torch.Generator().manual_seed(seed)
    arch, dims = spec_for(model.config), Dims.of(model.config)

    def init(kind, index):
        q, r = torch.linalg.qr(torch.randn(kind.shape(dims, arch), generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)

    learned = LearnedTransforms(names, dims, arch, model.config.num_hidden_layers, init)
    with torch.no_grad():
        for p in learned.scales():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return learned


def random_fit_session(model, recipe, names):
    """A fit session on ``model``, prepared as the pipeline prepares it, holding random learned transforms
    (:func:`random_learned`) at ``names``."""
    arch = spec_for(model.config)
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, InMemorySource(), CPU, plan)
    session = prepare_session(model, arch, recipe, plan, CPU)
    session.learned.load_state_dict(random_learned(model, names).state_dict())
    return session


def deployed_logits(model, recipe, transforms, calib: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The pipeline's path after a fit: prepare, hand the transforms to the plan, run the layers on
    ``calib``; the logits of ``ids``."""
    arch = spec_for(model.config)
    plan = make_plan(model, arch, recipe)
    prepare_model(model, arch, InMemorySource(), CPU, plan)
    deploy(model, arch, plan, transforms)
    LayerwiseQuantizer(model, arch, recipe, InMemorySource(), CPU, plan).run_layers(
        capture_inputs(model, arch, [calib], CPU))
    with torch.no_grad():
        return model(ids).logits
