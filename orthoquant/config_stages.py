"""The recipe sections of the optional learned stages: end-to-end fitting of transforms
(:class:`FitSpec`), QuIP#'s fine-tuning (:class:`FinetuneSpec`) and learned rounding (:class:`RefineSpec`).

Part of the recipe schema (import them from :mod:`orthoquant.config`): a leaf like it, range and
closed-set checks only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .choices import (Autocast, ComputeDtype, FitInit, FitLoss, FitOptimizer, FitParam, GradCheckpointing, Offload,
                      RefineMethod, RefineOptimizer, RefineStart, RefineTarget, Schedule, Ste, check_seed, choose,
                      require)


@dataclass(frozen=True)
class FitSpec:
    """End-to-end fitting of learnable transforms (OSTQuant, SpinQuant) before the layer-wise solve.

    Defaults are OSTQuant's (100 steps, global batch 16, RiemannianAdam, lr 0.016897 / 0.0017899,
    linear decay, KL-Top with k = 1000) on the fit's own data: ``source`` packed into ``seqlen``-token
    windows (OSTQuant: every window of WikiText-2 train, ``nsamples = 0``; SpinQuant: 800 × 2048),
    separate from GPTQ's calibration windows. An in-memory :func:`orthoquant.quantize` without
    ``fit_windows`` trains on its calibration windows.

    :param params: learnable parameters (``orthoquant.transforms.learnable.PARAMS``): R_res, R_ov (one
        rotation per KV head), R2 (one per layer shared by heads), S_attn, S_ffn, S_ov, S_qk, S_up_down.
    :param init: rotations start as ``hadamard`` (random) or ``klt`` (weight-covariance eigenvectors x
        random Hadamard, OSTQuant's W4A4 init); scales start at 1.
    :param optimizer: ``riemannian_adam`` (geoopt, OSTQuant) or ``cayley_sgd`` (SpinQuant's Cayley SGD:
        geoopt's canonical-Stiefel Cayley retraction with SpinQuant's step cap min(lr, 1/‖W‖₁), lr in
        SpinQuant's units; :mod:`orthoquant.fitting.cayley`).
    :param loss: ``kl_top``, ``kl``, ``ce`` (next-token cross-entropy, SpinQuant) or ``mse`` (logits).
    :param batch_size: sequences per micro-batch on each process; a step sees
        batch_size x grad_accum x processes sequences.
    :param schedule: learning-rate decay to 0 over ``steps``: ``linear``, ``cosine`` or ``constant``.
    :param train_weights: fake-quantize weights with the recipe's weight format during fitting (W4A16).
    :param loss_chunk: tokens per chunk of the loss (memory O(chunk x vocab)).
    :param checkpoint_every: steps between fit checkpoints in the run folder (0: only at the end).
    :param grad_checkpointing: recompute each decoder layer in backward, keeping only its inputs
        (``auto`` and ``on``), or keep every layer's graph from the forward (``off``: faster, activation
        memory of the whole step).
    :param offload: ``none`` (the frozen weights stay on the device) or ``cpu`` (they stay in CPU memory,
        pinned on CUDA, and stream to the device one decoder layer at a time, the next one prefetched).
    :param autocast: ``auto`` (bfloat16 on CUDA, off on CPU), ``bfloat16`` or ``off``.
    :param qsur_samples: calibration windows QSUR is measured on before and after fitting (0: skip).
    :param ste: gradient of the activation/KV fake-quantizers: ``plain`` straight-through (SpinQuant)
        or ``pass_scale``, through the rounding and the dynamic scale (OSTQuant).
    :param max_grad_norm: clip the transforms' global gradient norm to this before each step (the
        papers' Trainer default, 1.0; 0: no clipping).
    :param source: text the fit trains on (any calibration source: wikitext2, c4, pile, a local path).
    :param nsamples: windows of the fit data; 0 takes every packed window of ``source``.
    :param seqlen: tokens per fit window.
    :param eval_samples: fit windows held out from training, whose loss is logged after every step
        (``eval_losses`` in the metrics; 0: none).
    :param released: a released SpinQuant ``R.bin`` or OSTQuant parameter file to use instead of fitting.
    """

    params: tuple[FitParam, ...] = ("R_res", "R_ov", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down")
    init: FitInit = "hadamard"
    optimizer: FitOptimizer = "riemannian_adam"
    loss: FitLoss = "kl_top"
    top_k: int = 1000
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 4
    lr_rotation: float = 0.016897
    lr_scale: float = 0.0017899
    schedule: Schedule = "linear"
    momentum: float = 0.0
    stabilize: int = 10
    train_weights: bool = False
    seed: int = 0
    loss_chunk: int = 1024
    checkpoint_every: int = 10
    grad_checkpointing: GradCheckpointing = "auto"
    offload: Offload = "none"
    autocast: Autocast = "auto"
    qsur_samples: int = 8
    ste: Ste = "pass_scale"
    max_grad_norm: float = 1.0
    source: str = "wikitext2"
    nsamples: int = 0
    seqlen: int = 2048
    eval_samples: int = 4
    released: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(FitParam.of("fitting.params", p) for p in self.params))
        require(len(set(self.params)) == len(self.params), f"fitting.params repeats a name: {self.params}")
        require(not {"R_ov", "R2"} <= set(self.params), "fitting.params: choose R_ov or R2, not both")
        choose(self, {"init": FitInit, "optimizer": FitOptimizer, "loss": FitLoss, "schedule": Schedule,
                       "grad_checkpointing": GradCheckpointing, "autocast": Autocast, "offload": Offload,
                       "ste": Ste}, "fitting.")
        require(self.max_grad_norm >= 0, f"fitting.max_grad_norm={self.max_grad_norm} must be >= 0")
        for name in ("top_k", "batch_size", "grad_accum", "loss_chunk"):
            require(getattr(self, name) > 0, f"fitting.{name}={getattr(self, name)} must be positive")
        require(self.seqlen > 1, f"fitting.seqlen={self.seqlen} must be at least 2")
        for name in ("steps", "checkpoint_every", "qsur_samples", "stabilize", "nsamples", "eval_samples"):
            require(getattr(self, name) >= 0, f"fitting.{name}={getattr(self, name)} must be >= 0")
        require(self.lr_rotation >= 0 and self.lr_scale >= 0, "fitting learning rates must be >= 0")
        check_seed("fitting.seed", self.seed)


@dataclass(frozen=True)
class FinetuneSpec:
    """QuIP#'s fine-tuning of what stays continuous (``lib/algo/finetune.py``; :mod:`orthoquant.finetune`).

    In-layer: the layer's linears are quantized group by group (q/k/v, o, gate/up, down); after each
    group but the last, the layer's remaining FP linears, its norm weights and the sign vectors SU/SV of
    its quantized linears (now real-valued) are trained with Adam to reproduce the FP layer's outputs on
    FP inputs (MSE), one epoch after another, keeping the epoch of least loss on a held-out slice of the
    calibration rows and stopping after ``patience`` epochs without a better one. End to end: SU/SV and
    norms of every layer (and ``lm_head`` when ``tune_lm_head``) against the FP model's softmax (soft
    cross-entropy), the teacher's logits recomputed in chunks from its cached final hidden states.
    Defaults are the paper's; ``layer_epochs: 0`` and ``e2e_epochs: 0`` turn each part off.

    :param layer_epochs: in-layer epochs (QuIP#: 5). :param e2e_epochs: end-to-end epochs (QuIP#: 1 to 5).
    :param lr: / :param susv_lr: in-layer Adam learning rates of weights and norms / of SU and SV.
    :param e2e_lr: / :param e2e_susv_lr: the same end to end.
    :param batch_size: sequences per optimizer step (QuIP#: batch 4 x update_freq 2).
    :param holdout: share of the calibration rows held out for selection (QuIP#: 128 of 384).
    :param patience: epochs without a lower held-out loss before stopping (QuIP#: 3).
    :param tune_lm_head: train lm_head's weight end to end too.
    :param loss_chunk: tokens per chunk of the end-to-end loss (memory O(chunk x vocab)).
    :param seed: seed of the batch order.
    :param source: / :param nsamples: / :param seqlen: the fine-tuning data (QuIP#'s devset), drawn as
        calibration windows are; ``source: ""`` fine-tunes on the calibration windows themselves, and
        ``nsamples`` / ``seqlen`` 0 take the calibration's.
    """

    layer_epochs: int = 0
    e2e_epochs: int = 0
    lr: float = 5e-5
    susv_lr: float = 5e-4
    e2e_lr: float = 1e-5
    e2e_susv_lr: float = 1e-4
    batch_size: int = 8
    holdout: float = 1 / 3
    patience: int = 3
    tune_lm_head: bool = False
    loss_chunk: int = 1024
    seed: int = 0
    source: str = ""
    nsamples: int = 0
    seqlen: int = 0

    def __post_init__(self) -> None:
        for name in ("layer_epochs", "e2e_epochs", "patience", "nsamples"):
            require(getattr(self, name) >= 0, f"finetune.{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "susv_lr", "e2e_lr", "e2e_susv_lr"):
            require(getattr(self, name) > 0, f"finetune.{name}={getattr(self, name)} must be positive")
        require(self.batch_size > 0 and self.loss_chunk > 0, "finetune.batch_size and loss_chunk must be positive")
        require(0 < self.holdout < 1, f"finetune.holdout={self.holdout} must lie in (0, 1)")
        require(self.seqlen == 0 or self.seqlen > 1, f"finetune.seqlen={self.seqlen} must be 0 or at least 2")
        require(bool(self.source) or not (self.nsamples or self.seqlen),
                 "finetune.nsamples/seqlen choose windows of finetune.source: set it too")

    @property
    def active(self) -> bool:
        return self.layer_epochs > 0 or self.e2e_epochs > 0


@dataclass(frozen=True)
class RefineSpec:
    """Learned rounding by block reconstruction after each layer's solve (AutoRound's SignRound on top
    of RTN/GPTQ and the recipe's transforms; :mod:`orthoquant.refine`). ``iters: 0`` turns it off.

    :param method: what is learned: ``round`` (per-weight offsets in [-1/2, 1/2] and per-group scale
        factors; the zero point follows them for asymmetric INT).
    :param iters: optimizer steps per layer (AutoRound: 200).
    :param lr: step size of the offsets; None: 1/iters (AutoRound's default), linearly decayed to 0.
    :param scale_lr: step size of the scale factors; None: ``lr``.
    :param batch_size: calibration sequences per step (AutoRound: 8).
    :param optimizer: ``signsgd`` (AutoRound) or ``adam``.
    :param patience: stop a layer after this many steps without a lower batch loss (0: run every step).
    :param tune_scales: learn the per-group scale factors too (AutoRound's min-max tuning).
    :param target: what the quantized layer (fed the quantized model's activations) is fit to:
        ``fp_model``, the FP model's output at that depth (AutoRound: each layer also corrects the error
        its inputs carry), or ``fp_layer``, the FP layer's output on the same quantized inputs.
    :param start: codes the learning starts from: ``solver`` (the solver's) or ``rtn`` (round to nearest in
        the same format, AutoRound's start, anchored at the FP weights); either way the layer keeps the
        solver's codes where they reconstruct better, so GPTQ + ``start: rtn`` is the better of the two.
    :param seed: seed of the batch order (each layer derives its own).
    :param compute_dtype: what the layer computes in while learning: ``model`` (its own dtype) or
        ``bfloat16`` (AutoRound's: several times faster matrix products on GPUs and AMX CPUs; the loss,
        targets and learned parameters stay float32, and whether a layer keeps the learned codes is
        decided on its loss in the model's dtype), ``float16``, ``float32``.
    """

    method: RefineMethod = "round"
    iters: int = 200
    lr: float | None = None
    scale_lr: float | None = None
    batch_size: int = 8
    optimizer: RefineOptimizer = "signsgd"
    patience: int = 0
    tune_scales: bool = True
    target: RefineTarget = "fp_model"
    start: RefineStart = "solver"
    seed: int = 0
    compute_dtype: ComputeDtype = "model"

    def __post_init__(self) -> None:
        choose(self, {"target": RefineTarget, "start": RefineStart, "method": RefineMethod,
                       "optimizer": RefineOptimizer, "compute_dtype": ComputeDtype}, "refine.")
        require(self.iters >= 0, f"refine.iters={self.iters} must be >= 0")
        require(self.batch_size > 0, f"refine.batch_size={self.batch_size} must be positive")
        require(self.patience >= 0, f"refine.patience={self.patience} must be >= 0")
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            require(value is None or value > 0, f"refine.{name}={value} must be positive (or null: auto)")
