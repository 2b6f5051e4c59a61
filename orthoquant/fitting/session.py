"""The model while its transforms are fitted: one copy of the frozen weights, folded on the fly.

The model's own parameters stay untouched (norm-folded, frozen, in the model's dtype). A decoder
layer's weights are folded with the current transforms through the plan's site table — the same
functions deployment folds with (:class:`~orthoquant.transforms.folding.Live` instead of
``IN_PLACE``) — only while that layer runs, and swapped into its modules for the call; nothing
folded outlives its layer. The model-level residual rotation never materialises a folded embedding or
lm_head: embedding rows are gathered first and then rotated by the same row map the embedding fold
applies (``produce``: ``E ← E M`` row by row), and lm_head, whose fold is ``W M⁻ᵀ``, reads
``h M⁻¹`` with its stored weight (``h (W M⁻ᵀ)ᵀ = (h M⁻¹) Wᵀ``). :mod:`.step` drives the layers.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import Recipe
from ..fakequant.attention import set_kv_quantizers
from ..fakequant.inputs import set_input_quantizer
from ..formats import make_format
from ..models.spec import ArchSpec
from ..models.surgery import get_module, layers_of, linears_of
from ..transforms.base import Transform
from ..transforms.folding import Live, consume
from ..transforms.learnable import LearnedTransforms
from ..transforms.plan import GLOBAL, TransformPlan
from .quantizers import install_fitting_quantizers, weight_ste
from .residency import Resident

Tensors = dict[tuple[nn.Module, str], torch.Tensor]


@contextmanager
def swapped(tensors: Tensors) -> Iterator[None]:
    """Within the block, each (module, name) parameter reads as the given tensor."""
    saved = {key: key[0]._parameters[key[1]] for key in tensors}
    try:
        for (module, name), value in tensors.items():
            module._parameters[name] = value
        yield
    finally:
        for (module, name), value in saved.items():
            module._parameters[name] = value


@contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Within the block, activation and KV fake-quantizers are disabled (the teacher's view)."""
    saved = []
    for m in model.modules():
        pipe = getattr(m, "orthoquant_inputs", None)
        if pipe is not None:
            saved.append((pipe, "quantizer", pipe.quantizer))
            pipe.quantizer = None
        if getattr(m, "orthoquant_kv", None) is not None:
            saved.append((m, "orthoquant_kv", m.orthoquant_kv))
            m.orthoquant_kv = None
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def wide(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (folds of bfloat16 weights run at the precision of the float32 masters)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def inverse_rows(t: Transform, x: torch.Tensor) -> torch.Tensor:
    """``x M⁻¹`` over the last axis, from the consumer map alone: ``M⁻¹ = (I M⁻ᵀ)ᵀ``."""
    eye = torch.eye(t.dim, dtype=x.dtype, device=x.device)
    return x @ t.consumer(eye).transpose(0, 1)


class FitSession:
    """A model prepared by :func:`~orthoquant.fitting.fit.prepare_session`: norms folded, parameters
    frozen, and ``learned`` folded on the fly through ``plan``'s site table.

    :param residency: where the frozen decoder layers live between their uses (resident on the
        device, offloaded to CPU memory, or sharded across processes).
    """

    def __init__(self, model: nn.Module, arch: ArchSpec, recipe: Recipe, plan: TransformPlan,
                 learned: LearnedTransforms, device: torch.device, residency: Resident | None = None) -> None:
        self.model, self.arch, self.recipe, self.plan = model, arch, recipe, plan
        self.learned, self.device, self.fit = learned, device, recipe.fitting
        self.layers = layers_of(model, arch)
        self.embed = get_module(model, arch.embed)
        self.norm = get_module(model, arch.final_norm)
        self.head = get_module(model, arch.lm_head)
        self.residency = residency or Resident()
        self.names = {get_module(layer, arch.path(role)): f"{arch.layers}.{i}.{arch.path(role)}"
                      for i, layer in enumerate(self.layers) for role, _ in arch.linears}
        self.names[self.head] = arch.lm_head

    # --- runtime ---------------------------------------------------------------------------------
    def install(self) -> None:
        """Online transforms and the recipe's activation/KV fake-quantizers on every layer."""
        for i, layer in enumerate(self.layers):
            self.plan.attach_layer(layer, i)
            install_fitting_quantizers(layer, f"{self.arch.layers}.{i}.", self.arch, self.recipe)

    def remove_quantizers(self) -> None:
        """The layer-wise solve calibrates on clean inputs: leave no fake-quantizer behind."""
        for layer in self.layers:
            for lin in linears_of(layer, self.arch).values():
                set_input_quantizer(lin, None)
            set_kv_quantizers(get_module(layer, self.arch.attention), None, None)

    def _option(self, value: str) -> bool:
        return value == "on" or value == "bfloat16" or (value == "auto" and self.device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self._option(self.fit.autocast) else nullcontext()

    @property
    def recompute(self) -> bool:
        """Recompute each decoder layer in backward (only layer inputs are kept), unless ``off``."""
        return self.fit.grad_checkpointing != "off"

    # --- folding ---------------------------------------------------------------------------------
    def fold_layer(self, index: int) -> Tensors:
        """Layer ``index``'s weights with the current transforms folded in, in the module's dtype (as
        deployment stores them; differentiable when grad is enabled)."""
        live = Live()
        self.plan.fuse_layer(self.layers[index], index, live, self.learned.live(index))
        return {key: v.to(getattr(key[0], key[1]).dtype) for key, v in live.values.items()}

    def student(self, folded: Tensors) -> Tensors:
        """What the quantized model computes with: weights fake-quantized (straight-through) when the
        recipe trains with weight quantization, else the folded weights themselves."""
        if not self.fit.train_weights:
            return folded
        return {key: self._quantize_weight(*key, v) for key, v in folded.items()}

    def _quantize_weight(self, module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
        spec = self.recipe.weights_for(self.names[module]) if name == "weight" and module in self.names else None
        return value if spec is None else weight_ste(make_format(spec), value)

    def residual(self) -> Transform | None:
        """The learned residual rotation (None when the fit learns none)."""
        return self.learned.live(GLOBAL).get("residual")

    # --- embedding and head ------------------------------------------------------------------------
    def rotate_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Embedding rows (gathered by token) under the learned residual, as its fold writes them."""
        t = self.residual()
        return rows if t is None else t.forward(wide(rows)).to(rows.dtype)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What lm_head's stored weight reads: the final norm, then the residual undone (``h M⁻¹``)."""
        h, t = self.norm(hidden), self.residual()
        return h if t is None else inverse_rows(t, wide(h)).to(h.dtype)

    def student_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """lm_head as the quantized model runs it on :meth:`head_input`'s output. Only a head trained
        with weight fake-quant needs its folded weight ``W M⁻ᵀ`` (quantized); it reads ``h``, so the
        ``M⁻¹`` that :meth:`head_input` applied is mapped back first."""
        spec = self.recipe.weights_for(self.arch.lm_head) if self.fit.train_weights else None
        t = self.residual()
        if spec is None:
            return self.head
        live = Live()
        if t is not None:
            consume(self.head, t, live)
        w = weight_ste(make_format(spec), live.read(self.head, "weight"))
        back = (lambda h: h) if t is None else (lambda h: t.forward(wide(h)).to(h.dtype))
        bias = self.head.bias
        return lambda h: nn.functional.linear(back(h), w.to(h.dtype), None if bias is None else bias.to(h.dtype))
