"""The paper details of the fit's gradients: SpinQuant's plain straight-through activation quantizer
(no gradient through the scale) versus OSTQuant's pass-through scale, the clipped-weight mask of the
weight STE, and the global gradient-norm cap."""
import torch

from orthoquant.config import FitSpec, QuantSpec
from orthoquant.fitting import loop
from orthoquant.fitting.quantizers import STES, weight_ste
from orthoquant.formats import make_format
from test_fitting import SMALL, WINDOWS, session_for

A4 = make_format(QuantSpec(bits=4, symmetric=False))


def input_gradient(ste: str, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (STES[ste](A4, x) * upstream).sum().backward()
    return x.grad


def test_plain_ste_gives_the_scale_no_gradient_and_pass_scale_does():
    g = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    torch.testing.assert_close(STES["plain"](A4, x), STES["pass_scale"](A4, x), rtol=0, atol=0)  # same values
    # plain: ∂q/∂x = I exactly, so nothing flows through the min/max that sets the scale
    torch.testing.assert_close(input_gradient("plain", x, upstream), upstream, rtol=0, atol=0)
    # pass_scale: the row's extreme elements also receive the scale's share of the gradient
    moved = (input_gradient("pass_scale", x, upstream) - upstream).abs() > 1e-6
    extremes = (x == x.amax(-1, keepdim=True)) | (x == x.amin(-1, keepdim=True))
    assert moved.any() and not (moved & ~extremes).any()


def test_the_weight_ste_blocks_the_gradient_of_clipped_weights_only():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    fmt = make_format(QuantSpec(bits=4, clip_search=True))  # the MSE clip clips each row's outliers
    q = weight_ste(fmt, w)
    torch.testing.assert_close(q, fmt.quantize_dequantize(w.detach()), rtol=0, atol=0)
    q.sum().backward()
    clipped = (q - w).abs() > 0.5 * fmt.fit(w.detach()).columns(64).scale.expand_as(w) * (1 + 1e-6)
    assert clipped.any() and (~clipped).any()
    assert torch.equal(w.grad, (~clipped).float())


def test_gradient_clipping_caps_the_global_norm_at_every_step(monkeypatch):
    norms, real = [], loop.make_optimizer

    def recording(*args):
        optimizer = real(*args)
        step = optimizer.step

        def step_recording(*a, **k):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
            return step(*a, **k)
        optimizer.step = step_recording
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", recording)
    session = session_for(FitSpec(steps=1, max_grad_norm=0, **SMALL))
    loop.train(session, WINDOWS)
    unclipped = norms.pop()
    assert unclipped > 1e-4
    cap = unclipped / 10
    loop.train(session_for(FitSpec(steps=2, max_grad_norm=cap, **SMALL)), WINDOWS)
    assert len(norms) == 2 and all(abs(n - cap) < 1e-3 * cap for n in norms)


def test_the_fit_installs_the_recipes_ste_and_the_presets_choose_the_papers():
    from orthoquant import load_recipe

    for ste in STES:
        session = session_for(FitSpec(ste=ste, **SMALL))
        assert session.layers[0].self_attn.q_proj.orthoquant_inputs.quantizer.func is STES[ste]
    assert load_recipe("spinquant-w4a4kv4").fitting.ste == "plain"
    assert load_recipe("ostquant-w4a4kv4").fitting.ste == "pass_scale"
