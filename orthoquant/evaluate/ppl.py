"""Perplexity over non-overlapping windows, as GPTQ/QuaRot report it (seqlen recorded with the result).

``perplexity`` runs a model held in memory; ``streamed_perplexity`` pushes all windows through one
decoder layer at a time, so a model that does not fit in memory is evaluated with the same numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..layerwise import capture_inputs, final_hidden, run_layer
from ..models.loading import WeightSource
from ..models.spec import ArchSpec
from ..models.surgery import get_module, layers_of


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of each window of ``ids`` (batch, seq), summed over its
    tokens (float64, one value per window; each window predicts seq - 1 tokens)."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape).double().sum(dim=1).cpu()


def ppl_of(window_losses: torch.Tensor) -> float:
    """exp(mean NLL per token) from per-window mean losses (all windows have the same length)."""
    return math.exp(float(window_losses.mean()))


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token NLL of each of ``windows`` (n, seqlen) under an in-memory model (float64, n)."""
    sums = [window_nll(model(input_ids=ids.to(device), use_cache=False).logits, ids)
            for ids in tqdm(windows.split(batch_size), desc="perplexity", unit="batch")]
    return torch.cat(sums) / (windows.shape[1] - 1)


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> float:
    """exp(mean NLL) of an in-memory model over ``windows`` (n, seqlen)."""
    return ppl_of(window_losses(model, windows, device, batch_size))


def soft_cap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft-capping (Gemma 2), which its forward applies after lm_head."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def streamed_window_losses(model: nn.Module, arch: ArchSpec, source: WeightSource, windows: torch.Tensor,
                           device: torch.device, batch_size: int = 1) -> torch.Tensor:
    """The same numbers as :func:`window_losses`, holding only one decoder layer at a time.

    The non-layer modules (embedding, final norm, lm_head) must already be materialised on ``device``.
    """
    batches = list(windows.split(batch_size))
    inputs = capture_inputs(model, arch, batches, device)
    layers = layers_of(model, arch)
    for i in tqdm(range(len(layers)), desc="perplexity (streamed)", unit="layer"):
        source.materialize(layers[i], f"{arch.layers}.{i}.", device)
        inputs.hidden = run_layer(layers[i], inputs, device)
        source.release(layers[i])
    head = get_module(model, arch.lm_head)
    sums = [window_nll(soft_cap(model, head(final_hidden(model, arch, hidden.to(device)))), ids)
            for hidden, ids in zip(inputs.hidden, batches)]
    return torch.cat(sums) / (windows.shape[1] - 1)


def streamed_perplexity(model: nn.Module, arch: ArchSpec, source: WeightSource, windows: torch.Tensor,
                        device: torch.device, batch_size: int = 1) -> float:
    """The same number as :func:`perplexity`, holding only one decoder layer at a time."""
    return ppl_of(streamed_window_losses(model, arch, source, windows, device, batch_size))
