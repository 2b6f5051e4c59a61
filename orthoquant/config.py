"""Recipes: frozen, typed, validated dataclasses with a strict YAML round trip.

A recipe says what to quantize and how. Every CLI flag maps to one field; ``--set a.b=v`` edits any
field by its dotted path. Unknown keys, out-of-range values and contradictions raise
:class:`~orthoquant.errors.ConfigError` naming the field and the allowed values.

The schema is a leaf: it imports no implementation (``tests/test_imports.py`` holds it to that). Its
fields that name one of a closed set are :mod:`orthoquant.choices` enums, checked here; whether the
implementations can run a recipe (registered names, refinable solvers, ...) is checked once, by
:func:`orthoquant.validate.check_recipe`, which ``load_recipe`` and ``quantize`` run. The dict and YAML
codec is :mod:`orthoquant.config_codec`; presets and ``load_recipe`` are in :mod:`orthoquant.recipes`.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .choices import (FORMAT_CHECKS, FP4_BLOCKS, SCALE_RULES, Autocast, Choice, FitInit, FitLoss, FitOptimizer,
                      FitParam, Format, GradCheckpointing, Offload, Propagate, RefineMethod, RefineOptimizer,
                      RefineStart, RefineTarget, ScaleDtype, ScaleRule, Schedule, Site, SOLVER_NAMES, Ste, TransformKind)
from .config_codec import from_plain, merge_overrides, parse_yaml, to_plain, with_assignments
from .errors import ConfigError

RECIPE_VERSION = 1


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Seeds go to a 64-bit torch.Generator after per-layer mixing (transforms.plan.layer_seed): keep them well inside
SEED_LIMIT = 2**32


def _check_seed(name: str, seed: int) -> None:
    _require(-SEED_LIMIT < seed < SEED_LIMIT, f"{name}={seed}: seeds must lie within ±2**32")


def _one_of(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    _require(value in allowed, f"{name}={value!r} is not allowed; choose one of {allowed}")


def _choose(obj: Any, fields: dict[str, type[Choice]], prefix: str = "") -> None:
    """Turn the named fields of the frozen dataclass ``obj`` (plain strings or members) into members of
    their :class:`Choice`; a value outside it raises naming ``prefix + field`` and the choices."""
    for name, choice in fields.items():
        object.__setattr__(obj, name, choice.of(prefix + name, getattr(obj, name)))


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor (weights, activations or KV cache) is quantized.

    :param format: number format (:data:`~orthoquant.choices.Format`): ``int``, ``mxfp4``, ``nvfp4``,
        ``fp8``, ``e8p``; what each allows is :data:`~orthoquant.choices.FORMAT_CHECKS`.
    :param bits: bits per value (int: 2..8; the float formats fix it).
    :param symmetric: symmetric (no zero point) or asymmetric.
    :param group_size: -1 per row (channel/token), 0 per tensor, g > 0 per group of g columns.
    :param clip_ratio: static clipping of the range (activations 0.9, KV 0.95 in QuaRot), in (0, 1].
    :param clip_search: MSE search for the clip of each group (weights; grid 100 down to 0.2, |e|^2.4).
    :param scale_rule: how a group's scale follows from its range, one of the format's ``scale_rules``:
        symmetric ``int``: ``quarot`` (amax/(2^(b-1)-1), amax on the grid) or ``minmax``
        (2·amax/(2^b-1), IST GPTQ and compressed-tensors; the positive max clips to (2^(b-1)-1)/(2^(b-1)-½));
        ``mxfp4``: ``spec`` (OCP MX, 2^(floor(log2 amax)-2)) or ``three_quarters``. The default ``spec``
        reads as the format's first rule (``quarot`` for int: a recipe without the key keeps its results).
    :param scale_dtype: dtype scales are rounded to when quantizing (the dtype they are exported in);
        ``auto`` is resolved from the model's dtype when quantizing (:mod:`orthoquant.autoscale`: float16
        for a float16 model, else bfloat16), and the run records the resolved value. Presets say ``auto``.
    :param static: one scale per tensor calibrated once on the calibration data and stored with the
        run, instead of each call's own range: the KV cache as vLLM's FP8 KV cache (``group_size=0``,
        symmetric ``fp8`` or ``int``), and NVFP4 activations, whose per-tensor global scale becomes
        compressed-tensors' static ``input_global_scale`` (block scales stay per call), so results no
        longer depend on the batch (:mod:`orthoquant.fakequant.static_inputs`).
    :param per_head: one group per attention head: ``group_size`` resolves to the model's head_dim
        when the quantizer is installed (SpinQuant's and OSTQuant's o_proj input; activations only).
    """

    format: Format = "int"
    bits: int = 4
    symmetric: bool = True
    group_size: int = -1
    clip_ratio: float = 1.0
    clip_search: bool = False
    scale_rule: ScaleRule = "spec"
    scale_dtype: ScaleDtype = "float32"
    static: bool = False
    per_head: bool = False

    def __post_init__(self) -> None:
        _choose(self, {"format": Format, "scale_rule": ScaleRule, "scale_dtype": ScaleDtype})
        _require(self.group_size >= -1, f"group_size={self.group_size}: use -1 (per row), 0 (tensor) or > 0")
        _require(0 < self.clip_ratio <= 1, f"clip_ratio={self.clip_ratio} must lie in (0, 1]")
        rules = SCALE_RULES[self.format]
        if self.scale_rule == ScaleRule.SPEC:  # the default: each format's own first rule
            object.__setattr__(self, "scale_rule", ScaleRule(rules[0]))
        _require(self.scale_rule in rules,
                 f"scale_rule={self.scale_rule!r} is not a {self.format} rule; choose one of {list(rules)} "
                 "(a preset's rule does not carry over when its format is changed)")
        FORMAT_CHECKS[self.format](self)
        _require(not self.per_head or self.group_size == -1,
                 f"per_head=true with group_size={self.group_size}: the group size is the model's head_dim; "
                 "leave group_size at -1")
        if self.static and self.format not in STATIC_INPUT_FORMATS:
            _require(self.format in STATIC_FORMATS,
                     f"static=True with format={self.format!r}: static scales exist for {list(STATIC_FORMATS)}")
            _require(self.group_size == 0, f"static=True with group_size={self.group_size}: a static scale is "
                                           "one per tensor, set group_size=0")
            _require(self.symmetric, "static=True with symmetric=False: static scales have no zero point")
            _require(not self.clip_search, "static=True with clip_search=True: the clip search is for weights")


    def for_head_dim(self, head_dim: int) -> "QuantSpec":
        """This spec with ``per_head`` resolved: groups of ``head_dim`` columns."""
        return dataclasses.replace(self, group_size=head_dim, per_head=False) if self.per_head else self


# Formats whose static (calibrated, per-tensor) scale is one number.
STATIC_FORMATS = ("fp8", "int")
# Input formats whose static part is the per-tensor global scale (block scales stay dynamic).
STATIC_INPUT_FORMATS = ("nvfp4",)


@dataclass(frozen=True)
class Override:
    """Per-module settings, chosen by a regular expression searched in the module's full name.

    :param pattern: e.g. ``mlp.down_proj`` or ``layers\\.0\\.``.
    :param weights: replaces the recipe's weight spec for matching modules (None: inherit).
    :param activations: replaces the recipe's activation spec for matching modules (None: inherit).
    :param fp: keep matching modules entirely in full precision.
    """

    pattern: str
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    fp: bool = False

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"overrides.pattern={self.pattern!r} is not a regular expression: {e}") from None


@dataclass(frozen=True)
class TransformSpec:
    """A transform at a site (see ``orthoquant.transforms.sites`` for the table of sites).

    :param site: ``residual`` (R1), ``attn_value`` (R2), ``o_input``, ``down_input`` (R4), ``qk`` (R3).
    :param kind: ``hadamard`` or ``random_hadamard`` (diag(±1)·H, signs from ``seed``).
    :param seed: seed of the random signs (per-layer sites derive one seed per layer from it).
    :param block_size: > 0 for a block-diagonal Hadamard of that size (widths with no construction).
    """

    site: Site
    kind: TransformKind = "hadamard"
    seed: int = 0
    block_size: int = 0

    def __post_init__(self) -> None:
        _choose(self, {"site": Site, "kind": TransformKind}, "transforms.")
        _require(self.block_size >= 0, f"transforms.block_size={self.block_size} must be >= 0")
        _check_seed("transforms.seed", self.seed)


@dataclass(frozen=True)
class SolverSpec:
    """The weight solver and its settings (GPTQ's defaults).

    :param true_sequential: solve a layer's linears in groups, each calibrated on the outputs of the
        groups already solved (QuaRot's order: q/k/v → o → gate/up → down).
    :param propagate: what the next layer is calibrated on: the outputs of this layer with quantized
        weights and activations/KV in ``fp`` (QuaRot, SpinQuant and OSTQuant run GPTQ before attaching
        activation quantizers; their presets set it) or also fake-quantized (``quantized``).
    """

    name: str = "rtn"
    damp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False
    propagate: Propagate = "quantized"

    def __post_init__(self) -> None:
        _one_of("solver.name", self.name, sorted(SOLVER_NAMES))
        _choose(self, {"propagate": Propagate}, "solver.")
        _require(0 < self.damp < 1, f"solver.damp={self.damp} must lie in (0, 1)")
        _require(self.blocksize > 0, f"solver.blocksize={self.blocksize} must be positive")


@dataclass(frozen=True)
class CalibSpec:
    """Calibration text: source (wikitext2, c4, pile, or a .txt/.jsonl/datasets path) and windows."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    moe_all_experts: bool = False  # MoE: every token through every expert while collecting statistics

    def __post_init__(self) -> None:
        _require(self.nsamples > 0, f"calibration.nsamples={self.nsamples} must be positive")
        _require(self.seqlen > 1, f"calibration.seqlen={self.seqlen} must be at least 2")
        _require(self.batch_size > 0, f"calibration.batch_size={self.batch_size} must be positive")
        _check_seed("calibration.seed", self.seed)


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
        _require(len(set(self.params)) == len(self.params), f"fitting.params repeats a name: {self.params}")
        _require(not {"R_ov", "R2"} <= set(self.params), "fitting.params: choose R_ov or R2, not both")
        _choose(self, {"init": FitInit, "optimizer": FitOptimizer, "loss": FitLoss, "schedule": Schedule,
                       "grad_checkpointing": GradCheckpointing, "autocast": Autocast, "offload": Offload,
                       "ste": Ste}, "fitting.")
        _require(self.max_grad_norm >= 0, f"fitting.max_grad_norm={self.max_grad_norm} must be >= 0")
        for name in ("top_k", "batch_size", "grad_accum", "loss_chunk"):
            _require(getattr(self, name) > 0, f"fitting.{name}={getattr(self, name)} must be positive")
        _require(self.seqlen > 1, f"fitting.seqlen={self.seqlen} must be at least 2")
        for name in ("steps", "checkpoint_every", "qsur_samples", "stabilize", "nsamples", "eval_samples"):
            _require(getattr(self, name) >= 0, f"fitting.{name}={getattr(self, name)} must be >= 0")
        _require(self.lr_rotation >= 0 and self.lr_scale >= 0, "fitting learning rates must be >= 0")
        _check_seed("fitting.seed", self.seed)


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
            _require(getattr(self, name) >= 0, f"finetune.{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "susv_lr", "e2e_lr", "e2e_susv_lr"):
            _require(getattr(self, name) > 0, f"finetune.{name}={getattr(self, name)} must be positive")
        _require(self.batch_size > 0 and self.loss_chunk > 0, "finetune.batch_size and loss_chunk must be positive")
        _require(0 < self.holdout < 1, f"finetune.holdout={self.holdout} must lie in (0, 1)")
        _require(self.seqlen == 0 or self.seqlen > 1, f"finetune.seqlen={self.seqlen} must be 0 or at least 2")
        _require(bool(self.source) or not (self.nsamples or self.seqlen),
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

    def __post_init__(self) -> None:
        _choose(self, {"target": RefineTarget, "start": RefineStart, "method": RefineMethod,
                       "optimizer": RefineOptimizer}, "refine.")
        _require(self.iters >= 0, f"refine.iters={self.iters} must be >= 0")
        _require(self.batch_size > 0, f"refine.batch_size={self.batch_size} must be positive")
        _require(self.patience >= 0, f"refine.patience={self.patience} must be >= 0")
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"refine.{name}={value} must be positive (or null: auto)")


# Sections left out of ``Recipe.to_dict`` while they are None, so that recipes and run fingerprints
# written before a section existed stay the same.
_OPTIONAL_SECTIONS = ("refine", "finetune")


@dataclass(frozen=True)
class Recipe:
    """A complete quantization recipe.

    :param weights: weight quantization of the targeted linears (None: weights stay in full precision).
    :param activations: fake-quant of every targeted linear's input (None: full precision).
    :param kv_cache: fake-quant of keys (after RoPE and online Q/K transforms) and values, per head
        vector (None: full precision); ``kv_cache.static`` calibrates one key and one value scale per
        layer on the calibration data instead (stored in the run as ``self_attn.k_scale``/``v_scale``).
    :param overrides: per-module exceptions, the last matching one wins.
    :param ignore: regular expressions of linears never quantized (lm_head and embeddings by default).
    :param transforms: Hadamard transforms per site (QuaRot / SpinQuant placement), fused or online.
    :param fitting: learn transforms end to end before the layer-wise solve (None: no fitting).
    :param finetune: QuIP#'s in-layer and end-to-end fine-tuning of sign vectors and norms (None: off).
    :param refine: learn the rounding of each solved layer by block reconstruction (None: no refinement).
    """

    name: str = "custom"
    description: str = ""
    version: int = RECIPE_VERSION
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    kv_cache: QuantSpec | None = None
    overrides: tuple[Override, ...] = ()
    ignore: tuple[str, ...] = ("lm_head",)
    transforms: tuple[TransformSpec, ...] = ()
    solver: SolverSpec = field(default_factory=SolverSpec)
    calibration: CalibSpec = field(default_factory=CalibSpec)
    fitting: FitSpec | None = None
    refine: RefineSpec | None = None
    finetune: FinetuneSpec | None = None

    def __post_init__(self) -> None:
        _one_of("version", self.version, [RECIPE_VERSION])
        sites = [t.site for t in self.transforms]
        _require(len(sites) == len(set(sites)), f"transforms: each site may appear once, got {sites}")
        dynamic_act_order = self.solver.act_order and not self.solver.static_groups
        fp_groups = self.weights is not None and self.weights.format in FP4_BLOCKS
        _require(not (dynamic_act_order and fp_groups),
                 "solver.act_order with FP4 weights needs solver.static_groups=true (FP4 layouts have no g_idx)")
        static_weights = [self.weights] + [o.weights for o in self.overrides]
        _require(not any(w is not None and w.static for w in static_weights),
                 "weights.static=true: weight scales are always stored; static scales are for kv_cache")
        static_inputs = [self.activations] + [o.activations for o in self.overrides]
        _require(not any(a is not None and a.static and a.format not in STATIC_INPUT_FORMATS for a in static_inputs),
                 f"activations.static=true is supported for {list(STATIC_INPUT_FORMATS)} activations (a static "
                 "global scale) and kv_cache.static=true; other activations are quantized per call")
        _require(self.kv_cache is None or not self.kv_cache.static or self.kv_cache.format in STATIC_FORMATS,
                 f"kv_cache.static=true with format={getattr(self.kv_cache, 'format', None)!r}: static "
                 f"scales exist for {list(STATIC_FORMATS)} in the KV cache")

    # --- per-module resolution ------------------------------------------------------------------
    def _override(self, module: str) -> Override | None:
        hits = [o for o in self.overrides if re.search(o.pattern, module)]
        return hits[-1] if hits else None

    def is_ignored(self, module: str) -> bool:
        o = self._override(module)
        return any(re.search(p, module) for p in self.ignore) or (o is not None and o.fp)

    def weights_for(self, module: str) -> QuantSpec | None:
        """The weight spec of the linear named ``module`` (None: keep it in full precision)."""
        if self.is_ignored(module):
            return None
        o = self._override(module)
        return o.weights if o is not None and o.weights is not None else self.weights

    def activations_for(self, module: str) -> QuantSpec | None:
        if self.is_ignored(module):
            return None
        o = self._override(module)
        return o.activations if o is not None and o.activations is not None else self.activations

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        plain = to_plain(self)
        return {k: v for k, v in plain.items() if not (k in _OPTIONAL_SECTIONS and v is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return from_plain(cls, merge_overrides(data), "recipe")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "the recipe") -> "Recipe":
        data = parse_yaml(text, where) or {}
        _require(isinstance(data, dict), f"{where} must hold a mapping at the top level")
        return cls.from_dict(data)

    def with_overrides(self, assignments: typing.Sequence[str]) -> "Recipe":
        """A copy with ``key.path=value`` assignments applied (values parsed as YAML scalars)."""
        return Recipe.from_dict(with_assignments(self.to_dict(), assignments))
