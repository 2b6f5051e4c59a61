"""QuIP#'s end-to-end fine-tuning (``quantize_llama/finetune_e2e_llama.py``): after every layer is
quantized, the sign vectors SU/SV of every quantized linear, the norm weights (and optionally
``lm_head``) are trained against the full-precision model's softmax (soft cross-entropy).

The teacher is not a second model: the runner's full-precision activation stream ends in the FP model's
last hidden states, and its logits are recomputed from them in no-grad chunks of ``loss_chunk`` tokens
with the final norm and lm_head as they were before training. The student streams its layers as the
runner does (``open_layer``/``close_layer``: from the run folder when the model is streamed): a no-grad
pass keeps each layer's input, then the backward pass reopens one layer at a time, recomputes it from
its input and hands the gradient down, so memory holds one layer and its activations plus the
layer-boundary cache. The trained norms live outside the layers and enter each forward by
substitution (``torch.func.functional_call``); the signs are the solved transforms' own tensors. Selection is QuIP#'s: the epoch of least held-out
loss, early stop after ``patience`` epochs without a better one. Codes never change.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from ..config import FinetuneSpec
from ..layerwise import LayerInputs, _to
from ..models.spec import ArchSpec
from ..models.surgery import get_module
from ..integrity import atomic_write
from ..layerfile import Transforms, read_module
from ..transforms.base import Hadamard
from ..transforms.serialize import transform_state
from .layer import holdout


@dataclass
class LayerAccess:
    """How the student reaches its layers: ``open(i)`` returns layer i ready to run (quantized weights,
    online transforms) on the device, ``close(i)`` lets it go; ``solved[i]`` are its solved transforms."""

    count: int
    open: Callable[[int], nn.Module]
    close: Callable[[int], None]
    solved: list[Transforms]


class EndToEnd:
    """The trainable state of end-to-end fine-tuning and the student/teacher computations."""

    def __init__(self, model: nn.Module, arch: ArchSpec, layers: LayerAccess, ft: FinetuneSpec,
                 device: torch.device) -> None:
        self.model, self.arch, self.layers, self.ft, self.device = model, arch, layers, ft, device
        # the final norm and lm_head modules stay as they are (the teacher's); the student uses float32
        # masters of the trained ones
        self.final = {"norm": get_module(model, arch.final_norm), "head": get_module(model, arch.lm_head)}
        tuned = ("norm", "head") if ft.tune_lm_head else ("norm",)
        self.masters = {k: nn.Parameter(self.final[k].weight.detach().float().clone()) for k in tuned}
        self.signs = [t for s in layers.solved for sides in s.values() for t in sides.values()
                      if isinstance(t, Hadamard) and t.signs is not None]
        for t in self.signs:
            t.signs = nn.Parameter(t.signs.detach().float().clone())
        self.norms = [self._norms_of(i) for i in range(layers.count)]
        self.others = [p for n in self.norms for p in n.values()] + list(self.masters.values())
        self.flags = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)

    def _norms_of(self, i: int) -> dict[str, nn.Parameter]:
        """Layer i's norm weights, as parameters of their own (float32, on the device)."""
        layer = self.layers.open(i)
        try:
            return {name: nn.Parameter(p.detach().float().clone().to(self.device)) for name, p in
                    layer.named_parameters() if type(layer.get_submodule(name.rsplit(".", 1)[0])).__name__
                    .endswith("RMSNorm")}
        finally:
            self.layers.close(i)

    @torch.no_grad()
    def write_norms(self, i: int, layer: nn.Module) -> None:
        """Put the trained norms into layer i (open) for good."""
        for name, p in self.norms[i].items():
            layer.get_parameter(name).copy_(p)

    @torch.no_grad()
    def write_final(self) -> None:
        """Put the trained final norm (and lm_head) into the model for good."""
        for key, p in self.masters.items():
            self.final[key].weight.copy_(p)

    def _student(self, key: str, x: torch.Tensor) -> torch.Tensor:
        module = self.final[key]
        if key not in self.masters:
            return module(x)
        return functional_call(module, {"weight": self.masters[key].to(module.weight.dtype)}, (x,))

    def trained(self) -> list[torch.Tensor]:
        return [t.signs for t in self.signs] + self.others

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([{"params": [t.signs for t in self.signs], "lr": self.ft.e2e_susv_lr},
                                 {"params": self.others, "lr": self.ft.e2e_lr}])

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trained()]

    @torch.no_grad()
    def load(self, state: list[torch.Tensor]) -> None:
        for p, v in zip(self.trained(), state):
            p.copy_(v)

    def release(self) -> None:
        for t in self.signs:
            t.signs = t.signs.detach().clone()
        for p in self.model.parameters():
            p.requires_grad_(self.flags.get(id(p), False))
            p.grad = None

    def _layer(self, i: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        layer = self.layers.open(i)
        try:
            for p in layer.parameters():  # a layer reopened from the run folder comes with fresh parameters
                p.requires_grad_(False)
            subs = {k: v.to(layer.get_parameter(k).dtype) for k, v in self.norms[i].items()}
            out = functional_call(layer, subs, (h,), kwargs, strict=False)
        finally:
            self.layers.close(i)
        return out[0] if isinstance(out, tuple) else out

    def _chunks(self, h: torch.Tensor, teacher: torch.Tensor):
        """(student rows with grad, teacher log-probs) per chunk of ``loss_chunk`` tokens."""
        hs, ts = h.reshape(-1, h.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        for a in range(0, hs.shape[0], self.ft.loss_chunk):
            with torch.no_grad():
                target = F.log_softmax(self.final["head"](self.final["norm"](ts[a:a + self.ft.loss_chunk])).float(), -1)
            yield self._student("head", self._student("norm", hs[a:a + self.ft.loss_chunk])), target

    def loss_and_grad(self, hidden: torch.Tensor, kwargs: dict, teacher: torch.Tensor, backward: bool) -> float:
        """Soft cross-entropy of the student against the teacher on one batch, summed over tokens
        (gradients accumulated into the trained parameters when ``backward``)."""
        kwargs = _to(kwargs, self.device)
        boundary = [hidden.to(self.device)]
        with torch.no_grad():
            for i in range(self.layers.count):
                boundary.append(self._layer(i, boundary[-1], kwargs))
        last = boundary[-1].detach().requires_grad_(backward)
        total = 0.0
        for logits, target in self._chunks(last, teacher.to(self.device)):
            loss = -(target.exp() * F.log_softmax(logits.float(), -1)).sum()
            total += float(loss.detach())
            if backward:
                loss.backward()
        if backward:
            grad = last.grad
            for i in reversed(range(self.layers.count)):
                x = boundary[i].detach().requires_grad_(True)
                torch.autograd.backward(self._layer(i, x, kwargs), grad)
                grad = x.grad
        return total


def finetune_end_to_end(model: nn.Module, arch: ArchSpec, layers: LayerAccess, inputs: LayerInputs,
                        fp_final: LayerInputs, ft: FinetuneSpec, device: torch.device) -> tuple[EndToEnd, dict]:
    """Train SU/SV and norms (and lm_head) end to end, to the selected epoch; the caller writes the norms
    into the layers (:meth:`EndToEnd.write_norms`).

    :param inputs: layer 0's cached inputs. :param fp_final: the FP model's last-layer outputs on them.
    """
    start = time.perf_counter()
    (train, train_t), (valid, valid_t) = holdout(inputs, fp_final.hidden, ft.holdout)
    e2e = EndToEnd(model, arch, layers, ft, device)
    tokens = sum(h.shape[0] * h.shape[1] for h in valid.hidden)

    def held_out() -> float:
        return sum(e2e.loss_and_grad(h, kw, t, backward=False)
                   for h, kw, t in zip(valid.hidden, valid.kwargs, valid_t)) / tokens

    try:
        optimizer, first = e2e.optimizer(), held_out()
        best, best_epoch, best_state, epoch = first, 0, e2e.state(), 0
        order = torch.Generator().manual_seed(ft.seed)
        for epoch in range(1, ft.e2e_epochs + 1):
            for b in torch.randperm(len(train.hidden), generator=order).tolist():
                h, t = train.hidden[b], train_t[b]
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    e2e.loss_and_grad(h, train.kwargs[b], t, backward=True)
                for p in e2e.trained():  # the loss is a sum over tokens: step on its mean
                    if p.grad is not None:
                        p.grad /= h.shape[0] * h.shape[1]
                optimizer.step()
            score = held_out()
            if score < best:
                best, best_epoch, best_state = score, epoch, e2e.state()
            elif epoch - best_epoch >= ft.patience > 0:
                break
        e2e.load(best_state)
    finally:
        e2e.release()
    return e2e, {"start": first, "best": best, "best_epoch": best_epoch, "epochs": epoch,
                 "seconds": time.perf_counter() - start}


def update_stored(path, layer: nn.Module, transforms: Transforms) -> None:
    """Rewrite a stored layer with the layer's current plain tensors (norms) and its transforms' signs;
    codes, scales and metadata stay as they are. The caller records the file's new hash in the run."""
    tensors, _, metadata = read_module(path)
    tensors.update({k: v for k, v in layer.state_dict().items() if k in tensors})
    for linear, sides in transforms.items():
        for side, t in sides.items():
            tensors.update(transform_state(t, f"{linear}.{side}")[0])
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))
