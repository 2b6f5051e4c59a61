"""Folds of whole matrices in float64 run in row blocks (:func:`~orthoquant.models.surgery.map_rows_`):
an embedding or lm_head of a large vocabulary never gets a whole float64 copy, and the result is the
whole-matrix fold's: equal to a plainly written fp64 reference, bit-identical in fp32 and bf16 to the
fold that read the whole matrix at once (:func:`produce` / :func:`consume`)."""
import copy

import pytest
import torch

from orthoquant.models import surgery
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import fold_final_norm, get_module, map_rows_, untie_embeddings
from orthoquant.models.tiny import tiny_model
from orthoquant.transforms.base import Dense, Hadamard, Transform
from orthoquant.transforms.folding import consume, produce
from orthoquant.transforms.sites import fuse_residual_rest

F64 = torch.float64


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sylvester(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix, built by Kronecker products (the reference)."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64), h)
    return h / n ** 0.5


def transform_and_matrix(kind: str, d: int) -> tuple[Transform, torch.Tensor]:
    """A transform of width ``d`` and its matrix M written out independently of the transform's code."""
    g = generator(d)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
        return Hadamard(d, signs), torch.diag(signs) @ sylvester(d)
    if kind == "rotation":
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=g))
        return Dense(q, orthogonal=True), q
    m = torch.randn(d, d, dtype=F64, generator=g) / d ** 0.5 + torch.eye(d, dtype=F64) * 2
    return Dense(m), m


KINDS = ("hadamard", "rotation", "invertible")


@pytest.fixture
def blocks_of(monkeypatch):
    """Make map_rows_ fold ``rows`` rows of a ``d``-wide matrix at a time (plus a few spare bytes)."""
    def set_rows(rows: int, d: int) -> None:
        monkeypatch.setattr(surgery, "FOLD_BLOCK_BYTES", rows * d * 8 + 5)
    return set_rows


def model_and_arch(dtype: torch.dtype):
    model = tiny_model("llama", dtype=dtype)
    arch = spec_for(model.config)
    untie_embeddings(model, arch)
    return model, arch


@pytest.mark.parametrize("kind", KINDS)
def test_the_blocked_residual_fold_equals_the_whole_matrix_reference_in_float64(kind, blocks_of):
    model, arch = model_and_arch(F64)
    embed, head = get_module(model, arch.embed).weight, get_module(model, arch.lm_head).weight
    t, m = transform_and_matrix(kind, embed.shape[1])
    expected_embed, expected_head = embed.detach() @ m, head.detach() @ torch.linalg.inv(m).T
    blocks_of(7, embed.shape[1])  # 7 does not divide the vocabulary: the last block is short
    fuse_residual_rest(model, arch, t)
    torch.testing.assert_close(embed.detach(), expected_embed, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.detach(), expected_head, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_the_blocked_residual_fold_is_bit_identical_to_the_whole_matrix_fold(kind, dtype, blocks_of):
    model, arch = model_and_arch(dtype)
    whole = copy.deepcopy(model)
    t, _ = transform_and_matrix(kind, model.config.hidden_size)
    produce(get_module(whole, arch.embed), t)  # the whole-matrix deployment fold
    consume(get_module(whole, arch.lm_head), t)
    blocks_of(7, model.config.hidden_size)
    fuse_residual_rest(model, arch, t)
    for path in (arch.embed, arch.lm_head):
        assert torch.equal(get_module(model, path).weight, get_module(whole, path).weight), path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,rows", [((50, 16), 7), ((1000, 64), 96), ((4099, 128), 1024)])
def test_map_rows_is_bit_identical_to_one_whole_matrix_fold(shape, rows, dtype, blocks_of):
    t, _ = transform_and_matrix("rotation", shape[1])
    w = torch.randn(shape, generator=generator()).to(dtype)
    expected = t.forward(w.double()).to(dtype)
    blocks_of(rows, shape[1])
    map_rows_(w, t.forward)
    assert torch.equal(w, expected)


def test_the_float64_transient_is_one_block_of_rows(blocks_of):
    model, arch = model_and_arch(torch.float32)
    vocab, d = get_module(model, arch.embed).weight.shape
    t, _ = transform_and_matrix("rotation", d)
    seen = []

    class Recording(Transform):  # the rows each fold step gets, in float64
        dim = d

        def forward(self, x):
            seen.append((x.shape[0], x.dtype))
            return t.forward(x)

    blocks_of(7, d)
    fuse_residual_rest(model, arch, Recording())
    assert sum(n for n, _ in seen) == 2 * vocab  # every row of the embedding and of lm_head, once
    assert max(n for n, _ in seen) == 7 and all(dtype == F64 for _, dtype in seen)


def test_the_final_norm_folds_into_lm_head_in_blocks_as_a_whole_product(blocks_of):
    model, arch = model_and_arch(torch.float32)
    norm, head = get_module(model, arch.final_norm), get_module(model, arch.lm_head)
    norm.weight.data = torch.rand(norm.weight.shape, generator=generator()) + 0.5
    expected = (head.weight.detach().double() * norm.weight.detach().double()).float()
    blocks_of(5, head.weight.shape[1])
    fold_final_norm(model, arch)
    assert torch.equal(head.weight, expected) and torch.equal(norm.weight, torch.ones_like(norm.weight))
