"""Transforms as data: invertible d x d maps acting on row vectors, ``x → x M``.

Convention (DESIGN §2): at a site carrying activations ``x``, a transform ``M`` maps ``x → x M``;
every linear that *reads* the site absorbs ``W → W M⁻ᵀ`` (:meth:`Transform.consumer`), every linear
that *writes* it absorbs ``W → Mᵀ W`` and ``b → b M`` (:func:`fold_producer`). For orthogonal M the
consumer side is ``W → W M``. The fold functions are pure and differentiable: fitting calls them on
the fly, deployment calls them once in float64 and writes the result back.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..hadamard import apply_hadamard, apply_hadamard_transpose


class Transform(ABC):
    """An invertible map of the last axis (width :attr:`dim`)."""

    dim: int
    orthogonal: bool = True

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M`` over the last axis."""

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M⁻ᵀ`` over the last axis (equals :meth:`forward` for orthogonal M)."""
        if self.orthogonal:
            return self.forward(x)
        raise NotImplementedError(f"{type(self).__name__} must define consumer()")

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense d x d matrix M (tests and small sizes only)."""
        return self.forward(torch.eye(self.dim, dtype=dtype))

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild this transform with :meth:`from_state` (serialisable types only)."""
        raise TypeError(f"{type(self).__name__} is not serialisable")

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Transform":
        raise TypeError(f"{cls.__name__} is not serialisable")


def fold_consumer(weight: torch.Tensor, t: Transform) -> torch.Tensor:
    """Weight (out, in) of a linear reading the site: ``W M⁻ᵀ``."""
    return t.consumer(weight)


def fold_producer(weight: torch.Tensor, bias: torch.Tensor | None, t: Transform):
    """Weight (out, in) and bias (out,) of a linear writing the site: ``Mᵀ W`` and ``b M``."""
    w = t.forward(weight.transpose(0, 1)).transpose(0, 1)
    return w, (t.forward(bias) if bias is not None else None)


class Hadamard(Transform):
    """``M = diag(s) · Had_n`` (random Hadamard) or ``Had_n`` when ``signs`` is None.

    :param signs: (n,) ±1, applied before the mixing: ``x → (x ⊙ s) Had_n``.
    """

    def __init__(self, dim: int, signs: torch.Tensor | None = None) -> None:
        self.dim, self.signs = dim, signs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            x = x * self.signs.to(x)
        return apply_hadamard(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M⁻¹ = x @ Mᵀ``."""
        y = apply_hadamard_transpose(x)
        return y * self.signs.to(y) if self.signs is not None else y

    def state(self) -> dict[str, torch.Tensor]:
        signs = self.signs if self.signs is not None else torch.zeros(0)
        return {"dim": torch.tensor(self.dim), "signs": signs}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Hadamard":
        signs = state["signs"]
        return cls(int(state["dim"]), signs if signs.numel() else None)


class HadamardTranspose(Hadamard):
    """``M = Had_nᵀ · diag(s)``, the inverse of :class:`Hadamard` with the same signs: ``x → (x Had_nᵀ) ⊙ s``.

    QuIP#'s output RHT: a linear quantized as ``Had_mᵀ diag(s) W …`` gets its output back with it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Hadamard.inverse(self, x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M⁻¹ = (x ⊙ s) Had_n``."""
        return Hadamard.forward(self, x)


class Dense(Transform):
    """An explicit matrix M (d, d); the consumer side uses a solve, not an inverse."""

    def __init__(self, matrix: torch.Tensor, orthogonal: bool = False) -> None:
        self.M, self.dim, self.orthogonal = matrix, matrix.shape[0], orthogonal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.M.to(x)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        if self.orthogonal:
            return self.forward(x)
        # x M⁻ᵀ = (M⁻¹ xᵀ)ᵀ
        shape = x.shape
        y = torch.linalg.solve(self.M.to(x), x.reshape(-1, self.dim).transpose(0, 1)).transpose(0, 1)
        return y.reshape(shape)

    def state(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.M, "orthogonal": torch.tensor(self.orthogonal)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Dense":
        return cls(state["matrix"], bool(state["orthogonal"]))


class BlockDense(Transform):
    """A block-diagonal map with its own d x d block per slice: ``M = blockdiag(B_1, …, B_k)``.

    In the row convention ``x → x M``, slice i of x maps to ``x_i B_i``. WUSH's column form
    ``x_b → T_b x_b`` is ``B_b = T_bᵀ``.

    :param blocks: (k, d, d).
    """

    def __init__(self, blocks: torch.Tensor, orthogonal: bool = False) -> None:
        self.blocks, self.orthogonal = blocks, orthogonal
        self.dim = blocks.shape[0] * blocks.shape[1]

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        k, d = self.blocks.shape[:2]
        return x.reshape(-1, k, d).transpose(0, 1)  # (k, rows, d)

    def _join(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return y.transpose(0, 1).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._join(torch.bmm(self._split(x), self.blocks.to(x)), x.shape)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        if self.orthogonal:
            return self.forward(x)
        # x_i B_i⁻ᵀ = (B_i⁻¹ x_iᵀ)ᵀ, one solve per block
        y = torch.linalg.solve(self.blocks.to(x), self._split(x).transpose(1, 2)).transpose(1, 2)
        return self._join(y, x.shape)

    def state(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks, "orthogonal": torch.tensor(self.orthogonal)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "BlockDense":
        return cls(state["blocks"], bool(state["orthogonal"]))


class Diagonal(Transform):
    """``M = diag(s)`` with s > 0: producers scale rows by s, consumers divide columns by s."""

    orthogonal = False

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale, self.dim = scale, scale.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale.to(x)

    def state(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Diagonal":
        return cls(state["scale"])


class PerBlock(Transform):
    """The same transform on each of ``blocks`` consecutive slices: ``I_blocks ⊗ M`` (per head)."""

    def __init__(self, inner: Transform, blocks: int) -> None:
        self.inner, self.blocks, self.dim = inner, blocks, inner.dim * blocks
        self.orthogonal = inner.orthogonal

    def _map(self, x: torch.Tensor, fn) -> torch.Tensor:
        return fn(x.reshape(*x.shape[:-1], self.blocks, self.inner.dim)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, self.inner.forward)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, self.inner.consumer)


class AcrossBlocks(Transform):
    """A transform mixing the ``inner.dim`` blocks of width ``block``: ``M ⊗ I_block`` (across heads)."""

    def __init__(self, inner: Transform, block: int) -> None:
        self.inner, self.block, self.dim = inner, block, inner.dim * block
        self.orthogonal = inner.orthogonal

    def _map(self, x: torch.Tensor, fn) -> torch.Tensor:
        y = x.reshape(*x.shape[:-1], self.inner.dim, self.block).transpose(-1, -2)
        return fn(y).transpose(-1, -2).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, self.inner.forward)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, self.inner.consumer)


class Composed(Transform):
    """``M = M_1 M_2 … M_k``: applied in order; consumers ``x M_1⁻ᵀ M_2⁻ᵀ …``."""

    def __init__(self, *parts: Transform) -> None:
        self.parts, self.dim = parts, parts[0].dim
        self.orthogonal = all(p.orthogonal for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p.forward(x)
        return x

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p.consumer(x)
        return x
