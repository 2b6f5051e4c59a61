"""Recipes: frozen, typed, validated dataclasses with a strict YAML round trip.

A recipe says what to quantize and how. Every CLI flag maps to one field; ``--set a.b=v`` edits any
field by its dotted path. Unknown keys, out-of-range values and contradictions raise
:class:`~orthoquant.errors.ConfigError` naming the field and the allowed values.

The schema is a leaf: it imports no implementation (``tests/test_imports.py`` holds it to that). Its
fields that name one of a closed set are :mod:`orthoquant.choices` enums, checked here; whether the
implementations can run a recipe (registered names, refinable solvers, ...) is checked once, by
:func:`orthoquant.validate.check_recipe`, which ``load_recipe`` and ``quantize`` run. The dict and YAML
codec is :mod:`orthoquant.config_codec`; the sections of the learned stages (fitting, refinement,
fine-tuning) are :mod:`orthoquant.config_stages`, imported from here; presets and ``load_recipe`` are in
:mod:`orthoquant.recipes`.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .choices import (FORMAT_CHECKS, FP4_BLOCKS, SCALE_RULES, SOLVER_NAMES, Format, Propagate, ScaleDtype, ScaleRule,
                      Site, TransformKind, check_seed, choose, require)
from .config_codec import from_plain, merge_overrides, parse_yaml, to_plain, with_assignments
from .config_stages import FinetuneSpec, FitSpec, RefineSpec
from .errors import ConfigError

RECIPE_VERSION = 1


def _one_of(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    require(value in allowed, f"{name}={value!r} is not allowed; choose one of {allowed}")


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
    :param scale_rule: how a group's scale follows from its range, one of the format's rules
        (:data:`~orthoquant.choices.SCALE_RULES`):
        symmetric ``int``: ``quarot`` (amax/(2^(b-1)-1), amax on the grid) or ``minmax``
        (2·amax/(2^b-1), IST GPTQ and compressed-tensors; the positive max clips to (2^(b-1)-1)/(2^(b-1)-½))
        or ``full_range`` (a signed scale putting the value of largest magnitude on -2^(b-1): every code
        used, step amax/2^(b-1); llama.cpp's Q4_0, AutoRound);
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
        choose(self, {"format": Format, "scale_rule": ScaleRule, "scale_dtype": ScaleDtype})
        require(self.group_size >= -1, f"group_size={self.group_size}: use -1 (per row), 0 (tensor) or > 0")
        require(0 < self.clip_ratio <= 1, f"clip_ratio={self.clip_ratio} must lie in (0, 1]")
        rules = SCALE_RULES[self.format]
        if self.scale_rule == ScaleRule.SPEC:  # the default: each format's own first rule
            object.__setattr__(self, "scale_rule", ScaleRule(rules[0]))
        require(self.scale_rule in rules,
                 f"scale_rule={self.scale_rule!r} is not a {self.format} rule; choose one of {list(rules)} "
                 "(a preset's rule does not carry over when its format is changed)")
        FORMAT_CHECKS[self.format](self)
        require(not self.per_head or self.group_size == -1,
                 f"per_head=true with group_size={self.group_size}: the group size is the model's head_dim; "
                 "leave group_size at -1")
        if self.static and self.format not in STATIC_INPUT_FORMATS:
            require(self.format in STATIC_FORMATS,
                     f"static=True with format={self.format!r}: static scales exist for {list(STATIC_FORMATS)}")
            require(self.group_size == 0, f"static=True with group_size={self.group_size}: a static scale is "
                                           "one per tensor, set group_size=0")
            require(self.symmetric, "static=True with symmetric=False: static scales have no zero point")
            require(not self.clip_search, "static=True with clip_search=True: the clip search is for weights")


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
        choose(self, {"site": Site, "kind": TransformKind}, "transforms.")
        require(self.block_size >= 0, f"transforms.block_size={self.block_size} must be >= 0")
        check_seed("transforms.seed", self.seed)


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
        choose(self, {"propagate": Propagate}, "solver.")
        require(0 < self.damp < 1, f"solver.damp={self.damp} must lie in (0, 1)")
        require(self.blocksize > 0, f"solver.blocksize={self.blocksize} must be positive")


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
        require(self.nsamples > 0, f"calibration.nsamples={self.nsamples} must be positive")
        require(self.seqlen > 1, f"calibration.seqlen={self.seqlen} must be at least 2")
        require(self.batch_size > 0, f"calibration.batch_size={self.batch_size} must be positive")
        check_seed("calibration.seed", self.seed)


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
        require(len(sites) == len(set(sites)), f"transforms: each site may appear once, got {sites}")
        dynamic_act_order = self.solver.act_order and not self.solver.static_groups
        fp_groups = self.weights is not None and self.weights.format in FP4_BLOCKS
        require(not (dynamic_act_order and fp_groups),
                 "solver.act_order with FP4 weights needs solver.static_groups=true (FP4 layouts have no g_idx)")
        static_weights = [self.weights] + [o.weights for o in self.overrides]
        require(not any(w is not None and w.static for w in static_weights),
                 "weights.static=true: weight scales are always stored; static scales are for kv_cache")
        static_inputs = [self.activations] + [o.activations for o in self.overrides]
        require(not any(a is not None and a.static and a.format not in STATIC_INPUT_FORMATS for a in static_inputs),
                 f"activations.static=true is supported for {list(STATIC_INPUT_FORMATS)} activations (a static "
                 "global scale) and kv_cache.static=true; other activations are quantized per call")
        require(self.kv_cache is None or not self.kv_cache.static or self.kv_cache.format in STATIC_FORMATS,
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
        require(isinstance(data, dict), f"{where} must hold a mapping at the top level")
        return cls.from_dict(data)

    def with_overrides(self, assignments: typing.Sequence[str]) -> "Recipe":
        """A copy with ``key.path=value`` assignments applied (values parsed as YAML scalars)."""
        return Recipe.from_dict(with_assignments(self.to_dict(), assignments))
