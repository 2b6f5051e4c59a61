"""Hadamard construction (stored, Paley I/II, GF(p^k)) and the fast transforms against their references.

Fast-vs-reference tolerances follow fast-hadamard-transform's test: the fp32 fast result may be off
the fp64 reference by a few times the fp32 reference's own error, plus a tiny atol.
"""
import sys

import pytest
import scipy.linalg
import torch

from orthoquant.errors import ConfigError
from orthoquant.hadamard import (
    apply_hadamard,
    apply_hadamard_ref,
    apply_hadamard_transpose,
    apply_hadamard_transpose_ref,
    apply_random_hadamard,
    apply_random_hadamard_ref,
    apply_random_hadamard_transpose,
    block_hadamard,
    hadamard_base,
    hadamard_digest,
    hadamard_factor,
    hadamard_matrix,
    hadamard_source,
    random_signs,
    stored_orders,
)
from orthoquant.hadamard import cuda as had_cuda
from orthoquant.hadamard.construct import _check_hadamard, sylvester
from orthoquant.hadamard.fwht import _two_factor_ref
from orthoquant.hadamard.paley import paley1, paley2

STORED = (12, 20, 28, 36, 52, 60, 92, 108, 116, 140, 156, 172, 188, 236)
# (kind, q): prime fields and GF(9), GF(25), GF(27), GF(49), GF(81), GF(121), GF(125), GF(243), GF(343)
PALEY = [(1, q) for q in (3, 7, 11, 19, 27, 43, 67, 243, 343)] + [
    (2, q) for q in (5, 9, 13, 25, 37, 49, 73, 81, 121, 125, 461)
]
# hidden / intermediate / head_dim widths of Llama-2/3, Mistral, Qwen2.5, Qwen3 (wush_quip.md §3.2)
MODEL_WIDTHS = {
    64: (1, 64), 128: (1, 128), 768: (12, 64), 896: (28, 32), 1024: (1, 1024), 1536: (12, 128),
    2048: (1, 2048), 2560: (20, 128), 3072: (12, 256), 3584: (28, 128), 4096: (1, 4096),
    4864: (76, 64), 5120: (20, 256), 6144: (12, 512), 8192: (1, 8192), 8960: (140, 64),
    9728: (76, 128), 11008: (172, 64), 12288: (12, 1024), 13824: (108, 128), 14336: (28, 512),
    17408: (68, 256), 18944: (148, 128), 25600: (100, 256), 27648: (108, 256),
    28672: (28, 1024), 29568: (924, 32),
}
SMALL = [(k, m) for k in (1,) + STORED + (44, 68, 76, 100, 124, 148, 924)
         for m in (1, 2, 8, 64, 512, 2048) if k * m <= 2048 and k * m > 1]
IMPOSSIBLE = (6, 3, 5, 0, -4, 268, 536, 13696, 2.0, True)
PAIRS = ((apply_hadamard, apply_hadamard_ref), (apply_hadamard_transpose, apply_hadamard_transpose_ref))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_matches_ref(out32, ref32, ref64, factor=4.0, atol=1e-6):
    """|fast32 - ref64| ≤ factor·|ref32 - ref64| + atol (the reference's own fp32 error sets the bar)."""
    ref_err = (ref32.double() - ref64).abs().max().item()
    err = (out32.double() - ref64).abs().max().item()
    assert err <= factor * ref_err + atol, f"error {err:.3g} vs reference's own {ref_err:.3g}"


def assert_hadamard(h, k):
    hd = h.double()
    assert h.shape == (k, k) and hd.abs().eq(1).all()
    assert torch.equal(hd @ hd.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("k", STORED)
def test_stored_tables_are_hadamard(k):
    assert stored_orders() == STORED and hadamard_source(k) == "stored"
    assert_hadamard(hadamard_base(k), k)


@pytest.mark.parametrize("kind,q", PALEY)
def test_paley_is_hadamard(kind, q):
    h = paley1(q) if kind == 1 else paley2(q)
    assert_hadamard(h, q + 1 if kind == 1 else 2 * (q + 1))


def test_runtime_check_rejects_a_corrupt_matrix():
    h = hadamard_base(76)
    _check_hadamard(h, 76)
    h[5, 7] *= -1
    with pytest.raises(RuntimeError, match="H_76"):
        _check_hadamard(h, 76)
    assert torch.equal(hadamard_base(76), paley2(37))  # hadamard_base hands out copies


@pytest.mark.parametrize("n,km", sorted(MODEL_WIDTHS.items()))
def test_factorisation_of_model_widths(n, km):
    assert hadamard_factor(n) == km
    assert hadamard_source(km[0]) is not None


def test_integer_scalars_are_orders():
    assert hadamard_factor(torch.tensor(11008)) == hadamard_factor(11008) == (172, 64)


@pytest.mark.parametrize("k,source", [(44, "paley1(q=43)"), (68, "paley1(q=67)"), (76, "paley2(q=37)"),
                                      (100, "paley2(q=49)"), (148, "paley2(q=73)"), (924, "paley2(q=461)")])
def test_constructed_factors(k, source):
    assert hadamard_source(k) == source
    assert_hadamard(hadamard_base(k), k)


@pytest.mark.parametrize("n", IMPOSSIBLE)
def test_impossible_order_names_n(n):
    with pytest.raises(ConfigError, match=str(n)):
        hadamard_factor(n)
    if type(n) is int and n > 0:
        with pytest.raises(ConfigError, match=str(n)):
            apply_hadamard(torch.zeros(1, n))


def test_sylvester_is_scipys_and_kronecker_splits():
    for m in (1, 2, 8, 256):
        assert torch.equal(sylvester(m).long(), torch.from_numpy(scipy.linalg.hadamard(m)))
    assert torch.equal(sylvester(512), torch.kron(sylvester(16), sylvester(32)))


@pytest.mark.parametrize("n", [1, 2, 12, 24, 136, 400, 924, 1376])
def test_dense_matrix_is_orthonormal_kronecker(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    k, m = hadamard_factor(n)
    want = torch.kron(hadamard_base(k).double(), torch.from_numpy(scipy.linalg.hadamard(m)).double())
    torch.testing.assert_close(h * n**0.5, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k,m", SMALL)
def test_fast_paths_match_dense_reference(k, m):
    x32 = torch.randn(6, k * m, generator=_gen(k * m))
    x64 = x32.double()
    for fast, ref in PAIRS:
        ref32, ref64 = ref(x32), ref(x64)
        for differentiable in (False, True):
            assert_matches_ref(fast(x32, differentiable=differentiable), ref32, ref64)


@pytest.mark.parametrize("n", sorted(MODEL_WIDTHS))
def test_fast_paths_match_reference_at_model_widths(n):
    x32 = torch.randn(3, n, generator=_gen(n))
    x64 = x32.double()
    for fast, ref in PAIRS:
        ref32, ref64 = ref(x32), ref(x64)
        for differentiable in (False, True):
            assert_matches_ref(fast(x32, differentiable=differentiable), ref32, ref64)


@pytest.mark.parametrize("n", [4096, 2752, 1848, 640])
def test_two_factor_reference_equals_dense(n):
    x = torch.randn(4, n, generator=_gen(n), dtype=torch.float64)
    h = hadamard_matrix(n)
    torch.testing.assert_close(_two_factor_ref(x, False), x @ h, atol=1e-12, rtol=0)
    torch.testing.assert_close(_two_factor_ref(x, True), x @ h.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [64, 96, 112, 152, 400, 688, 924])
def test_gradients_match_dense(n):
    x = torch.randn(5, n, generator=_gen(n), dtype=torch.float64)
    g = torch.randn(5, n, generator=_gen(n + 1), dtype=torch.float64)
    s = random_signs(n, seed=n)
    h = hadamard_matrix(n)
    cases = [(apply_hadamard, lambda v: v @ h), (apply_hadamard_transpose, lambda v: v @ h.T),
             (lambda v: apply_random_hadamard(v, s), lambda v: (v * s.double()) @ h)]
    for fast, dense in cases:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        (fast(a) * g).sum().backward()  # default picks the autograd path
        (dense(b) * g).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_no_grad_path_refuses_grad_inputs():
    x = torch.randn(2, 48, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        apply_hadamard(x, differentiable=False)
    with torch.no_grad():
        apply_hadamard(x, differentiable=False)


@pytest.mark.parametrize("n", [48, 152, 400, 472, 4096, 29568])
def test_apply_then_transpose_is_identity(n):
    x = torch.randn(3, n, generator=_gen(n), dtype=torch.float64)
    s = random_signs(n, seed=7)
    torch.testing.assert_close(apply_hadamard_transpose(apply_hadamard(x)), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(apply_hadamard(apply_hadamard_transpose(x)), x, atol=1e-12, rtol=0)
    back = apply_random_hadamard_transpose(apply_random_hadamard(x, s), s)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)


def test_transpose_differs_for_non_symmetric_k():
    x = torch.randn(2, 12 * 4, generator=_gen(0), dtype=torch.float64)
    assert not torch.allclose(apply_hadamard(x), apply_hadamard_transpose(x))


def test_random_signs_are_seeded_and_private():
    state = torch.get_rng_state()
    a, b, c = random_signs(4096, 1), random_signs(4096, 1), random_signs(4096, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and set(a.unique().tolist()) == {-1.0, 1.0}


def test_random_hadamard_is_signs_then_mixing():
    n = 76 * 4
    x32 = torch.randn(4, n, generator=_gen(3))
    s = random_signs(n, seed=11)
    want64 = (x32.double() * s.double()) @ hadamard_matrix(n)
    ref32 = apply_random_hadamard_ref(x32, s)
    torch.testing.assert_close(apply_random_hadamard_ref(x32.double(), s), want64, atol=1e-12, rtol=0)
    for differentiable in (False, True):
        assert_matches_ref(apply_random_hadamard(x32, s, differentiable), ref32, want64)


def test_dtypes_shapes_and_strides():
    x = torch.randn(2, 3, 100 * 4, generator=_gen(5))
    want = apply_hadamard_ref(x.double())
    y16 = apply_hadamard(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and y16.shape == x.shape
    torch.testing.assert_close(y16.double(), apply_hadamard(x.bfloat16().double()), atol=0.02, rtol=0.02)
    assert apply_hadamard(x.double()).dtype == torch.float64
    wide = torch.randn(6, 2 * 400, generator=_gen(6))[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(apply_hadamard(wide), apply_hadamard(wide.contiguous()), atol=0, rtol=0)
    assert_matches_ref(apply_hadamard(x), apply_hadamard_ref(x), want)


@pytest.mark.parametrize("n,block", [(96, 32), (48, 12), (400, 100)])
def test_block_hadamard(n, block):
    b = block_hadamard(n, block)
    torch.testing.assert_close(b @ b.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    hb = hadamard_matrix(block)
    for i in range(n // block):
        for j in range(n // block):
            blk = b[i * block:(i + 1) * block, j * block:(j + 1) * block]
            assert torch.equal(blk, hb if i == j else torch.zeros_like(hb))


@pytest.mark.parametrize("n,block", [(96, 40), (96, 0), (36, 6), (13696, 428)])
def test_block_hadamard_errors(n, block):
    with pytest.raises(ConfigError):
        block_hadamard(n, block)


def test_digest_pins_the_matrix():
    assert hadamard_digest(11008) == hadamard_digest(11008)
    assert len({hadamard_digest(n) for n in (11008, 5504, 9728, 4096)}) == 4


def test_cuda_kernel_only_where_it_matches():
    assert had_cuda.kernel_applies(4096, torch.bfloat16) and had_cuda.kernel_applies(8, torch.float32)
    never = ((4, torch.float32), (12 * 256, torch.float32), (65536, torch.float32), (4096, torch.float64))
    for n, dtype in never:  # padding below 8, 12N variant, beyond the kernel, unsupported dtype
        assert not had_cuda.kernel_applies(n, dtype)
    if "fast_hadamard_transform" not in sys.modules:  # importing orthoquant must not load it
        assert not had_cuda._kernel.cache_info().currsize


def test_cuda_probe_accepts_only_our_matrix(monkeypatch):
    n = 256
    sylv = torch.from_numpy(scipy.linalg.hadamard(n)).float()
    perm = torch.randperm(n, generator=_gen(0))
    # the package's contract: hadamard_transform(x, scale) = x @ Hᵀ · scale
    good = lambda x, scale: (x @ sylv.T) * scale  # noqa: E731
    bad = lambda x, scale: (x @ sylv[perm].T) * scale  # noqa: E731  (row-permuted: not ours)
    for kernel, ok in ((good, True), (bad, False)):
        monkeypatch.setattr(had_cuda, "_kernel", lambda k=kernel: k)
        assert had_cuda._probe.__wrapped__(n, torch.float32, torch.device("cpu")) is ok
    monkeypatch.setattr(had_cuda, "_kernel", lambda: None)
    assert not had_cuda.kernel_usable(n, torch.float32, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    for n in (4096, 11008, 25600):
        x = torch.randn(8, n, generator=_gen(n))
        ref32, ref64 = apply_hadamard_ref(x), apply_hadamard_ref(x.double())
        for differentiable in (False, True):
            assert_matches_ref(apply_hadamard(x.cuda(), differentiable=differentiable).cpu(), ref32, ref64)
