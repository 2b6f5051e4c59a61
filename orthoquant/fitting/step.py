"""One fitting step, layer by layer: every micro-batch of the step passes through decoder layer i
before layer i+1 runs, and back again in reverse.

Why layer-major rather than one micro-batch at a time: a layer's fold (``W M`` for every weight, a
GEMM as large as the layer's forward on ``hidden`` tokens) is then computed once per step instead of
once per micro-batch, and an offloaded or sharded layer is fetched once per pass. Per step and layer:

1. forward: fold without gradient; the teacher (folded weights, quantizers off) and the student
   (fake-quantized) run every micro-batch; only the student's layer input is kept (activation
   checkpointing per decoder layer: nothing of the layer's internals survives its call);
2. the loss of each micro-batch on its final hidden states, whose gradient is kept;
3. backward, last layer first: fold again with gradient, its outputs cut off as leaves that the
   recomputed forward of every micro-batch sends gradients to (the weights' gradients sum over the
   micro-batches), then one backward through the fold carries them to the transforms.

Memory beyond the frozen weights: one layer's folded weights (with gradient and the fold's graph in
step 3), the transforms and their optimiser state, and the kept inputs: (layers + 1) · micro-batches ·
batch · seqlen · hidden values (in CPU memory when the layers are offloaded). With
``grad_checkpointing: off`` each layer's graph is kept from the forward instead of being recomputed
(faster, activation memory of every layer and micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layerwise import _to, capture_inputs
from .losses import Objective
from .session import FitSession, Tensors, quantizers_off, swapped


@dataclass
class Record:
    """A layer's forward kept for its backward: the student's input per micro-batch and, without
    recomputation, the leaves the forward's graph hangs from and each micro-batch's output."""

    inputs: list[torch.Tensor]
    leaves: Tensors | None = None
    outputs: list[torch.Tensor] | None = None


def _leaves(folded: Tensors) -> Tensors:
    return {key: v.detach().requires_grad_() for key, v in folded.items()}


class LayerMajorStep:
    """Runs ``session``'s layers over a step's micro-batches (see the module docstring)."""

    def __init__(self, session: FitSession, batches: list[torch.Tensor]) -> None:
        self.s = session
        self.batches = [b.to(session.device) for b in batches]
        with session.residency.whole(session.embed):
            captured = capture_inputs(session.model, session.arch, self.batches, session.device, session.device)
        self.rows, self.captured = captured.hidden, captured
        self.n = len(session.layers)

    def _run(self, index: int, tensors: Tensors, hidden: list[torch.Tensor], grad: bool = False,
             batch: int | None = None) -> list[torch.Tensor]:
        """Layer ``index`` with ``tensors`` swapped in, on every micro-batch (or only on ``batch``)."""
        s, layer = self.s, self.s.layers[index]
        per_batch = self.captured.kwargs_for(layer)  # each layer's own masks (Gemma's sliding windows)
        kwargs = per_batch if batch is None else [per_batch[batch]]
        with torch.set_grad_enabled(grad), swapped(tensors), s.autocast():
            return [s.residency.call(layer, h, _to(kw, s.device)) for h, kw in zip(hidden, kwargs)]

    def forward(self, teacher: bool, train: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor] | None,
                                                                  list[Record]]:
        """Final hidden states of the student and (if asked) the teacher, and (``train``) the records
        for backward."""
        s = self.s
        with torch.no_grad():
            student = [s.rotate_rows(r) for r in self.rows]
        clean = list(student) if teacher else None
        records: list[Record] = []
        for i, layer in enumerate(s.layers):
            with s.residency.use(i, i + 1 if i + 1 < self.n else None):
                with torch.no_grad():
                    folded = s.fold_layer(i)
                if teacher:
                    with quantizers_off(layer):
                        clean = self._run(i, folded, clean)
                if s.recompute or not train:
                    if train:
                        records.append(Record([s.residency.stash(h) for h in student]))
                    with torch.no_grad():
                        student = self._run(i, s.student(folded), student)
                else:
                    leaves, inputs = _leaves(folded), [h.detach().requires_grad_() for h in student]
                    outputs = self._run(i, s.student(leaves), inputs, grad=True)
                    records.append(Record(inputs, leaves, outputs))
                    student = [y.detach() for y in outputs]
        return student, clean, records

    def backward(self, records: list[Record], grads: list[torch.Tensor]) -> None:
        """Carry the final hidden states' gradients through the layers and folds to the transforms."""
        s = self.s
        for i in reversed(range(self.n)):
            record = records[i]
            with s.residency.use(i, i - 1 if i > 0 else None):
                with torch.enable_grad():
                    folded = s.fold_layer(i)
                if record.outputs is None:  # recompute the layer with its graph, one micro-batch at a time
                    leaves = _leaves(folded)
                    weights = s.student(leaves)
                    for m, h in enumerate(record.inputs):
                        x = s.residency.fetch(h).detach().requires_grad_()
                        torch.autograd.backward(self._run(i, weights, [x], grad=True, batch=m)[0], grads[m])
                        grads[m] = x.grad
                    del weights
                else:
                    leaves = record.leaves
                    for y, g in zip(record.outputs, grads):
                        torch.autograd.backward(y, g)
                    grads = [x.grad for x in record.inputs]
                records[i] = None  # its inputs and graph are no longer needed
                pairs = [(v, leaves[k].grad) for k, v in folded.items()
                         if v.requires_grad and leaves[k].grad is not None]
                if pairs:
                    torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
        with torch.enable_grad():  # the embedding rows' rotation
            rotated = [s.rotate_rows(r) for r in self.rows]
        pairs = [(x, g) for x, g in zip(rotated, grads) if x.requires_grad]
        if pairs:
            torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])

    def _loss(self, objective: Objective, head, student: torch.Tensor, clean: torch.Tensor | None,
              ids: torch.Tensor) -> torch.Tensor:
        s = self.s
        with s.autocast():
            teacher = None
            if clean is not None:
                with torch.no_grad():
                    teacher = s.head_input(clean)
            return objective.fn(head, s.head_input(student), s.head, teacher, ids, s.fit.top_k, s.fit.loss_chunk)

    @torch.no_grad()
    def loss(self, objective: Objective) -> float:
        """Mean loss over the micro-batches, without gradients (the held-out loss)."""
        student, clean, _ = self.forward(objective.needs_teacher, train=False)
        with self.s.residency.whole(self.s.head):
            head = self.s.student_head()
            total = sum(self._loss(objective, head, student[m], clean[m] if clean else None, ids).item()
                        for m, ids in enumerate(self.batches))
        return total / len(self.batches)

    def run(self, objective: Objective, scale: float) -> float:
        """Forward, loss and backward of the step; gradients (times ``scale``) land on the transforms.
        Returns the mean loss over the micro-batches."""
        s = self.s
        student, clean, records = self.forward(objective.needs_teacher)
        grads, total = [], 0.0
        with s.residency.whole(s.head):  # one gather for every micro-batch of the step
            head = s.student_head()
            for m, ids in enumerate(self.batches):
                h = student[m].detach().requires_grad_()
                with torch.enable_grad():
                    loss = self._loss(objective, head, h, clean[m] if clean is not None else None, ids)
                    (loss * scale).backward()
                grads.append(h.grad)
                total += loss.item()
            del head
        del student, clean
        self.backward(records, grads)
        return total / len(self.batches)

    @torch.no_grad()
    def observe(self, visit) -> None:
        """The teacher's forward (folded weights, quantizers off) with ``visit(index, layer)``, a
        context manager, around each layer's calls (statistics hooks)."""
        s, clean = self.s, [self.s.rotate_rows(r) for r in self.rows]
        for i, layer in enumerate(s.layers):
            with s.residency.use(i, i + 1 if i + 1 < self.n else None), quantizers_off(layer), visit(i, layer):
                clean = self._run(i, s.fold_layer(i), clean)

    @torch.no_grad()
    def logits(self, quantized: bool) -> list[torch.Tensor]:
        """Logits of each micro-batch as the fit sees them: the student's (``quantized``: activation,
        KV and, if trained with it, weight fake-quant) or the teacher's."""
        student, clean, _ = self.forward(teacher=not quantized)
        with self.s.residency.whole(self.s.head):
            hidden, head = (student, self.s.student_head()) if quantized else (clean, self.s.head)
            return [head(self.s.head_input(h)) for h in hidden]
