"""The model while its transforms are fitted.

Its own parameters stay untouched (norm-folded, frozen). For each step the site table folds the
current transforms into fresh weight tensors (:class:`~orthoquant.transforms.folding.Live`), which are
swapped into the modules for the forward passes: the teacher pass (quantizers off, no gradient) and
the student pass (activation/KV fake-quant; weight fake-quant if the recipe trains with it).
Gradients land on the swapped tensors; one backward through the folds, layer by layer, carries them
to the transforms' parameters, so a step folds twice (no grad, then with grad per layer) however many
micro-batches it accumulates, and no layer's fold graph outlives its own backward.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import Recipe
from ..fakequant.attention import set_kv_quantizers
from ..fakequant.inputs import set_input_quantizer
from ..formats import make_format
from ..models.spec import ArchSpec
from ..models.surgery import get_module, layers_of, linears_of
from ..transforms.folding import Live
from ..transforms.learnable import LearnedTransforms
from ..transforms.plan import GLOBAL, TransformPlan
from ..transforms.sites import fuse_residual_rest
from .losses import Objective
from .quantizers import install_fitting_quantizers

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


@contextmanager
def checkpointed(layers: nn.ModuleList) -> Iterator[None]:
    """Within the block, decoder layers keep only their inputs and recompute in backward."""
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


class FitSession:
    """A model prepared by :func:`~orthoquant.fitting.loop.fit_transforms`: norms folded, parameters
    frozen, and ``learned`` folded on the fly through ``plan``'s site table."""

    def __init__(self, model: nn.Module, spec: ArchSpec, recipe: Recipe, plan: TransformPlan,
                 learned: LearnedTransforms, device: torch.device) -> None:
        self.model, self.spec, self.recipe, self.plan = model, spec, recipe, plan
        self.learned, self.device, self.fit = learned, device, recipe.fitting
        self.layers = layers_of(model, spec)
        self.body = get_module(model, spec.layers.rpartition(".")[0])
        self.head = get_module(model, spec.lm_head)
        self.names = {get_module(layer, spec.path(role)): f"{spec.layers}.{i}.{spec.path(role)}"
                      for i, layer in enumerate(self.layers) for role, _ in spec.linears}
        self.names[self.head] = spec.lm_head

    # --- runtime ---------------------------------------------------------------------------------
    def install(self) -> None:
        """Online transforms and the recipe's activation/KV fake-quantizers on every layer."""
        for i, layer in enumerate(self.layers):
            self.plan.attach_layer(layer, i)
            install_fitting_quantizers(layer, f"{self.spec.layers}.{i}.", self.spec, self.recipe)

    def remove_quantizers(self) -> None:
        """The layer-wise solve calibrates on clean inputs: leave no fake-quantizer behind."""
        for layer in self.layers:
            for lin in linears_of(layer, self.spec).values():
                set_input_quantizer(lin, None)
            set_kv_quantizers(get_module(layer, self.spec.attention), None, None)

    def _option(self, value: str) -> bool:
        return value == "on" or value == "bfloat16" or (value == "auto" and self.device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self._option(self.fit.autocast) else nullcontext()

    # --- folding ---------------------------------------------------------------------------------
    @staticmethod
    def _cast(live: Live) -> Tensors:
        """Folded values in their module's dtype, as deployment stores them (the cast is differentiable)."""
        return {key: v.to(getattr(key[0], key[1]).dtype) for key, v in live.values.items()}

    def fold_rest(self) -> Tensors:
        """Embedding and lm_head under a learned residual rotation (a recipe's own residual transform
        is already fused there by the pipeline's preparation)."""
        live, residual = Live(), self.learned.live(GLOBAL).get("residual")
        if residual is not None:
            fuse_residual_rest(self.model, self.spec, residual, live)
        return self._cast(live)

    def fold_layer(self, index: int) -> Tensors:
        live = Live()
        self.plan.fuse_layer(self.layers[index], index, live, self.learned.live(index))
        return self._cast(live)

    @torch.no_grad()
    def fold_all(self) -> Tensors:
        tensors = self.fold_rest()
        for i in range(len(self.layers)):
            tensors.update(self.fold_layer(i))
        return tensors

    def _quantize_weight(self, module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
        spec = self.recipe.weights_for(self.names[module]) if name == "weight" and module in self.names else None
        return value if spec is None else make_format(spec).quantize_dequantize(value).to(value.dtype)

    def step_tensors(self) -> tuple[Tensors, Tensors]:
        """(teacher, student) tensors for one step. Student tensors are leaves that collect the
        micro-batches' gradients; weight fake-quant is straight-through (the gradient of the
        quantized weight is passed to the unquantized one)."""
        teacher = self.fold_all()
        quantize = self.fit.train_weights
        student = {key: (self._quantize_weight(*key, v) if quantize else v).detach().requires_grad_()
                   for key, v in teacher.items()}
        return teacher, student

    def backward_through_folds(self, student: Tensors) -> None:
        """Carry the student tensors' gradients to the learned parameters, one fold at a time."""
        folds = [self.fold_rest] + [functools.partial(self.fold_layer, i) for i in range(len(self.layers))]
        for fold in folds:
            with torch.enable_grad():
                values = fold()
            pairs = [(v, student[k].grad.to(v.dtype)) for k, v in values.items()
                     if v.requires_grad and student[k].grad is not None]
            if pairs:
                torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])

    # --- passes ----------------------------------------------------------------------------------
    def hidden(self, ids: torch.Tensor, tensors: Tensors, quantized: bool) -> torch.Tensor:
        """Final normed hidden states (B, T, d) with ``tensors`` swapped in."""
        with swapped(tensors), (nullcontext() if quantized else quantizers_off(self.model)), self.autocast():
            return self.body(input_ids=ids, use_cache=False).last_hidden_state

    def logits(self, ids: torch.Tensor, tensors: Tensors, quantized: bool) -> torch.Tensor:
        with torch.no_grad(), swapped(tensors):
            return self.head(self.hidden(ids, tensors, quantized))

    def micro_step(self, ids: torch.Tensor, teacher: Tensors, student: Tensors, objective: Objective,
                   scale: float) -> float:
        """Loss of one micro-batch (B, T); its gradient, times ``scale``, is added to the student tensors."""
        teacher_hidden = None
        if objective.needs_teacher:
            with torch.no_grad():
                teacher_hidden = self.hidden(ids, teacher, quantized=False)
        w_t = teacher.get((self.head, "weight"), self.head.weight)
        b_t = teacher.get((self.head, "bias"), self.head.bias)

        def teacher_head(h: torch.Tensor) -> torch.Tensor:  # lm_head with the teacher's (unquantized) weight
            return nn.functional.linear(h, w_t.to(h.dtype), None if b_t is None else b_t.to(h.dtype))

        ckpt = checkpointed(self.layers) if self._option(self.fit.grad_checkpointing) else nullcontext()
        with swapped(student), ckpt:
            with self.autocast():
                h = self.body(input_ids=ids, use_cache=False).last_hidden_state
                loss = objective.fn(self.head, h, teacher_head, teacher_hidden, ids, self.fit.top_k,
                                    self.fit.loss_chunk)
            (loss * scale).backward()
        return loss.item()
