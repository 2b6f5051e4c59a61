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


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) of ``ids`` (batch, seq) and the token count."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll.double()), target.numel()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> float:
    """exp(mean NLL) of an in-memory model over ``windows`` (n, seqlen)."""
    total, count = 0.0, 0
    for ids in tqdm(windows.split(batch_size), desc="perplexity", unit="batch"):
        nll, n = window_nll(model(input_ids=ids.to(device), use_cache=False).logits, ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def soft_cap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft-capping (Gemma 2), which its forward applies after lm_head."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def streamed_perplexity(model: nn.Module, spec: ArchSpec, source: WeightSource, windows: torch.Tensor,
                        device: torch.device, batch_size: int = 1) -> float:
    """The same number as :func:`perplexity`, holding only one decoder layer at a time.

    The non-layer modules (embedding, final norm, lm_head) must already be materialised on ``device``.
    """
    batches = list(windows.split(batch_size))
    inputs = capture_inputs(model, spec, batches, device)
    layers = layers_of(model, spec)
    for i in tqdm(range(len(layers)), desc="perplexity (streamed)", unit="layer"):
        source.materialize(layers[i], f"{spec.layers}.{i}.", device)
        inputs.hidden = run_layer(layers[i], inputs, device)
        source.release(layers[i])
    head = get_module(model, spec.lm_head)
    total, count = 0.0, 0
    for hidden, ids in zip(inputs.hidden, batches):
        nll, n = window_nll(soft_cap(model, head(final_hidden(model, spec, hidden.to(device)))), ids)
        total, count = total + nll, count + n
    return math.exp(total / count)
