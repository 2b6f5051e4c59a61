"""Fitting losses as pure functions of final hidden states, computed in chunks of tokens.

Every loss takes the final (normed) hidden states, shape (N, d), and a ``head`` mapping a chunk of
them to logits (n, vocab). Logits are only ever formed for ``chunk`` tokens at a time; with gradients
on, each chunk is checkpointed (its logits are recomputed in backward), so memory stays
O(chunk · vocab) in the backward pass too — never O(N · vocab). Results are means over tokens.

KL-Top (OSTQuant, ``post_attn=True``): p = softmax(z_teacher), q = softmax(z_student), both over the
full vocabulary; I = the teacher's top-k tokens; ``L = mean_t Σ_{i∈I_t} p_i (log p_i − log q_i)``,
with no renormalisation over I. The teacher side is reduced to (N, k) log-probabilities first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..registry import Registry

Head = Callable[[torch.Tensor], torch.Tensor]  # (n, d) hidden -> (n, vocab) logits


@dataclass
class TopK:
    """The teacher's top-k tokens per position.

    :ivar logp: (N, k) float32 full-vocabulary log-probabilities at those tokens.
    :ivar index: (N, k) token ids.
    """

    logp: torch.Tensor
    index: torch.Tensor


def _wide(z: torch.Tensor) -> torch.Tensor:
    """float32 at least: a bfloat16 softmax over a large vocabulary loses the tail."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _log_probs(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(_wide(head(hidden)), dim=-1)


def _chunked_sum(fn: Callable[..., torch.Tensor], chunk: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``Σ_chunks fn(*chunk slices)``; chunks that need gradients are checkpointed."""
    total = None
    for start in range(0, tensors[0].shape[0], chunk):
        parts = [t[start:start + chunk] for t in tensors]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in parts)
        value = checkpoint(fn, *parts, use_reentrant=False) if grad else fn(*parts)
        total = value if total is None else total + value
    return total


@torch.no_grad()
def teacher_top_k(head: Head, hidden: torch.Tensor, k: int, chunk: int) -> TopK:
    """Top-k (by logit) token ids and their full-softmax log-probabilities, chunk by chunk."""
    logps, indices = [], []
    for h in hidden.split(chunk):
        logp = _log_probs(head, h)
        top, index = logp.topk(min(k, logp.shape[-1]), dim=-1)
        logps.append(top)
        indices.append(index)
    return TopK(torch.cat(logps), torch.cat(indices))


class _KLTopLinear(torch.autograd.Function):
    """KL-Top of one chunk through a linear head, with a hand-written backward that holds one
    (chunk, vocab) buffer: ``∂L/∂z = softmax(z) · Σ_I p − scatter_I(p)`` is formed in place in the
    recomputed logits (autograd's would keep logits, log-softmax, the scattered gradient and the
    logits' gradient: four such buffers). Logits are computed in the weight's dtype, autocast off, in
    forward and backward alike."""

    @staticmethod
    def _logits(h, weight, bias):
        with torch.autocast(h.device.type, enabled=False):
            return _wide(F.linear(h.to(weight.dtype), weight, bias))

    @staticmethod
    def forward(ctx, h, weight, bias, logp, index):
        z = _KLTopLinear._logits(h, weight, bias)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        logq = z.gather(-1, index) - lse
        ctx.save_for_backward(h, weight, bias, logp, index, lse)
        return (logp.exp() * (logp - logq)).sum()

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, logp, index, lse = ctx.saved_tensors
        p = logp.exp()
        g = _KLTopLinear._logits(h, weight, bias).sub_(lse).exp_().mul_(p.sum(-1, keepdim=True))
        g = g.scatter_add_(-1, index, -p).mul_(grad).to(weight.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        return (g @ weight if need_h else None, g.transpose(0, 1) @ h.to(weight.dtype) if need_w else None,
                g.sum(0) if need_b and bias is not None else None, None, None)


def kl_top(head: Head, hidden: torch.Tensor, teacher: TopK, chunk: int) -> torch.Tensor:
    """KL-Top of the student ``hidden`` (N, d) against the teacher's :class:`TopK` (mean over N).
    A plain ``nn.Linear`` head takes the fused path (:class:`_KLTopLinear`)."""
    if isinstance(head, torch.nn.Linear):
        total = sum(_KLTopLinear.apply(h, head.weight, head.bias, logp, index) for h, logp, index in
                    zip(hidden.split(chunk), teacher.logp.split(chunk), teacher.index.split(chunk)))
        return total / hidden.shape[0]

    def part(h, logp_t, index):
        logq = _log_probs(head, h).gather(-1, index)
        return (logp_t.exp() * (logp_t - logq)).sum()
    return _chunked_sum(part, chunk, hidden, teacher.logp, teacher.index) / hidden.shape[0]


def kl(head: Head, hidden: torch.Tensor, teacher_head: Head, teacher: torch.Tensor, chunk: int) -> torch.Tensor:
    """Full-vocabulary KL(p_teacher ‖ q_student), mean over tokens."""
    def part(h, t):
        with torch.no_grad():
            logp = _log_probs(teacher_head, t)
        return (logp.exp() * (logp - _log_probs(head, h))).sum()
    return _chunked_sum(part, chunk, hidden, teacher) / hidden.shape[0]


def cross_entropy(head: Head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token cross-entropy: ``hidden`` (N, d) predicts ``labels`` (N,); mean over tokens."""
    def part(h, y):
        return F.cross_entropy(_wide(head(h)), y, reduction="sum")
    return _chunked_sum(part, chunk, hidden, labels) / hidden.shape[0]


def mse(head: Head, hidden: torch.Tensor, teacher_head: Head, teacher: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean squared error between student and teacher logits, mean over tokens and vocabulary."""
    def part(h, t):
        with torch.no_grad():
            z = _wide(teacher_head(t))
        return (_wide(head(h)) - z).pow(2).sum() / z.shape[-1]
    return _chunked_sum(part, chunk, hidden, teacher) / hidden.shape[0]


@dataclass(frozen=True)
class Objective:
    """A loss wired to a fitting batch: ``fn(head, student, teacher_head, teacher, ids, top_k, chunk)``
    with hidden states (B, T, d) and ids (B, T); ``teacher`` is None when ``needs_teacher`` is False."""

    fn: Callable[..., torch.Tensor]
    needs_teacher: bool = True


def _kl_top(head, student, teacher_head, teacher, ids, top_k, chunk):
    target = teacher_top_k(teacher_head, teacher.flatten(0, 1), top_k, chunk)
    return kl_top(head, student.flatten(0, 1), target, chunk)


def _ce(head, student, teacher_head, teacher, ids, top_k, chunk):
    return cross_entropy(head, student[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), chunk)


LOSSES: Registry[Objective] = Registry("fitting loss")
LOSSES.add("kl_top", Objective(_kl_top))
LOSSES.add("kl", Objective(lambda h, s, th, t, ids, k, c: kl(h, s.flatten(0, 1), th, t.flatten(0, 1), c)))
LOSSES.add("mse", Objective(lambda h, s, th, t, ids, k, c: mse(h, s.flatten(0, 1), th, t.flatten(0, 1), c)))
LOSSES.add("ce", Objective(_ce, needs_teacher=False))
