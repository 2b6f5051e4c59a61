"""Fitting losses: chunked results and gradients equal direct, unchunked references, and no more
than ``chunk`` tokens' logits exist at a time, forward or backward."""
import pytest
import torch
import torch.nn.functional as F

from orthoquant.fitting import losses
from orthoquant.fitting.losses import cross_entropy, kl, kl_top, mse, teacher_top_k

N, D, V, K, CHUNK = 37, 6, 50, 10, 8  # N not a multiple of CHUNK: the last chunk is short


def setup():
    g = torch.Generator().manual_seed(0)
    w_s = (torch.randn(V, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    w_t = torch.randn(V, D, generator=g, dtype=torch.float64) * 2
    h_s = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    h_t = h_s.detach() + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return w_s, w_t, h_s, h_t


class Recorder:
    """A linear head that remembers the most rows it was ever asked for."""

    def __init__(self, w):
        self.w, self.most, self.calls = w, 0, 0

    def __call__(self, h):
        self.most, self.calls = max(self.most, h.shape[0]), self.calls + 1
        return h @ self.w.T


CHUNKS = -(-N // CHUNK)


def kl_top_reference(z_s, z_t, k):
    """OSTQuant's kl_top with post_attn: full softmaxes, restricted to the teacher's top-k, no renormalising."""
    _, idx = z_t.topk(k, dim=-1)
    p = F.softmax(z_t, -1).gather(-1, idx)
    log_q = F.log_softmax(z_s, -1).gather(-1, idx)
    return F.kl_div(log_q, p, reduction="batchmean")


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_kl_top_equals_the_unchunked_reference_in_value_and_gradient():
    w_s, w_t, h_s, h_t = setup()
    head = Recorder(w_s)
    target = teacher_top_k(lambda h: h @ w_t.T, h_t, K, CHUNK)
    ours = kl_top(head, h_s, target, CHUNK)
    ref = kl_top_reference(h_s @ w_s.T, h_t @ w_t.T, K)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(ours, w_s, h_s), grads(ref, w_s, h_s)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # at most CHUNK tokens' logits at once, and recomputed in backward (two calls per chunk): nothing
    # of the forward's logits is kept for the backward pass
    assert head.most == CHUNK and head.calls == 2 * CHUNKS
    # restricted, not renormalised: smaller than the full KL, and not a KL over the top-k alone
    full = kl(lambda h: h @ w_s.T, h_s, lambda h: h @ w_t.T, h_t, CHUNK)
    assert 0 < ours.item() < full.item()


def test_teacher_top_k_keeps_full_softmax_log_probabilities():
    _, w_t, _, h_t = setup()
    top = teacher_top_k(lambda h: h @ w_t.T, h_t, K, CHUNK)
    logp = F.log_softmax(h_t @ w_t.T, -1)
    torch.testing.assert_close(top.logp, logp.gather(-1, top.index))
    assert torch.equal(top.index.sort(-1).values, logp.topk(K, -1).indices.sort(-1).values)


@pytest.mark.parametrize("name", ["kl", "ce", "mse"])
def test_other_losses_equal_their_references(name):
    w_s, w_t, h_s, h_t = setup()
    z_s, z_t = h_s @ w_s.T, h_t @ w_t.T
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    head = Recorder(w_s)
    ours, ref = {
        "kl": lambda: (kl(head, h_s, lambda h: h @ w_t.T, h_t, CHUNK),
                       F.kl_div(F.log_softmax(z_s, -1), F.log_softmax(z_t, -1), reduction="batchmean", log_target=True)),
        "ce": lambda: (cross_entropy(head, h_s, labels, CHUNK), F.cross_entropy(z_s, labels)),
        "mse": lambda: (mse(head, h_s, lambda h: h @ w_t.T, h_t, CHUNK), F.mse_loss(z_s, z_t)),
    }[name]()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(ours, w_s, h_s), grads(ref, w_s, h_s)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert head.most == CHUNK and head.calls == 2 * CHUNKS


def test_kl_top_through_a_linear_head_takes_the_fused_path_with_the_same_value_and_gradients(monkeypatch):
    w_s, w_t, h_s, h_t = setup()
    head = torch.nn.Linear(D, V, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w_s)
        head.bias.normal_()
    target = teacher_top_k(lambda h: h @ w_t.T, h_t, K, CHUNK)
    generic = kl_top(lambda h: head(h), h_s, target, CHUNK)
    calls = []
    real = torch.autograd.Function.apply.__func__
    monkeypatch.setattr(losses._KLTopLinear, "apply", classmethod(lambda cls, *a: calls.append(1) or real(cls, *a)))
    fused = kl_top(head, h_s, target, CHUNK)
    assert len(calls) == CHUNKS  # the fused function, once per chunk
    torch.testing.assert_close(fused, generic, rtol=1e-12, atol=1e-14)
    params = (h_s, head.weight, head.bias)
    for a, b in zip(grads(fused, *params), grads(generic, *params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
