import torch
from torch import nn

from orthoquant.stats import InputStats, collect_input_stats


def test_running_mean_equals_direct_second_moment():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 12, generator=g) * (i + 1) for i in range(5)]
    stats = InputStats(12)
    for b in batches:
        stats.update(b)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert stats.tokens == x.shape[0]
    direct = x.T @ x / x.shape[0]
    # per-batch products are float32 by design: tolerance = float32 rounding of the largest entry
    torch.testing.assert_close(stats.H, direct, rtol=0, atol=1e-6 * float(direct.abs().max()))
    torch.testing.assert_close(stats.absmax, x.abs().amax(0).float())


def test_hooks_record_inputs_and_are_removed():
    lin = nn.Linear(6, 4)
    x = torch.randn(10, 6)
    with collect_input_stats({"lin": lin}) as stats:
        lin(x)
    lin(x * 100)  # after the block: not recorded
    direct = (x.T @ x / 10).double()
    torch.testing.assert_close(stats["lin"].H, direct, rtol=0, atol=1e-6 * float(direct.abs().max()))
    assert stats["lin"].tokens == 10
