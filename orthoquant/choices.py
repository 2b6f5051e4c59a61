"""The recipe schema's closed vocabularies: every field that names one of a fixed set of choices.

Each set is a :class:`Choice`, a ``str`` enum: a member equals, hashes and formats as its plain string,
so recipe YAML, run JSON and comparisons such as ``spec.format == "mxfp4"`` read as before. The sets
that name an implementation (formats, solvers, transform sites, learnable parameters, fitting losses,
reconstruction optimizers) are keyed the same way in their registries; ``tests/recipes/test_choices.py``
checks that each set and its registry agree, so the schema checks names without importing what it names.
Solvers are the one open set (a library user may register a solver of their own): :data:`SOLVER_NAMES`
starts with the built-in ones and the solver registry adds every name registered to it.

The per-format rules (:data:`FORMAT_CHECKS`, :data:`SCALE_RULES`) are what a recipe may ask of a
format; the arithmetic lives in :mod:`orthoquant.formats`.
"""
from __future__ import annotations

import enum
from typing import Any, Callable

from .errors import ConfigError


class Choice(enum.StrEnum):
    """A closed set of names. ``repr`` is the plain string's, so messages and reprs read ``'int'``."""

    __repr__ = str.__repr__

    @classmethod
    def of(cls, field: str, value: Any) -> "Choice":
        """The member called ``value``; a one-line :class:`ConfigError` naming ``field`` otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{field}={value!r} is not allowed; choose one of {list(cls)}") from None


def _choices(name: str, values: list[str]) -> type[Choice]:
    """A :class:`Choice` called ``name`` whose members are ``values`` (member names: upper case, ``_`` for ``-``)."""
    return Choice(name, [(v.upper().replace("-", "_"), v) for v in values])


Format = _choices("Format", ["int", "mxfp4", "nvfp4", "fp8", "e8p"])
ScaleRule = _choices("ScaleRule", ["spec", "quarot", "minmax", "three_quarters", "full_range"])
ScaleDtype = _choices("ScaleDtype", ["float32", "float16", "bfloat16", "auto"])
TransformKind = _choices("TransformKind", ["hadamard", "random_hadamard"])
Site = _choices("Site", ["residual", "attn_value", "o_input", "down_input", "qk"])
Propagate = _choices("Propagate", ["fp", "quantized"])
FitParam = _choices("FitParam", ["R_res", "R_ov", "R2", "S_attn", "S_ffn", "S_ov", "S_qk", "S_up_down"])
FitInit = _choices("FitInit", ["hadamard", "klt"])
FitOptimizer = _choices("FitOptimizer", ["riemannian_adam", "cayley_sgd"])
FitLoss = _choices("FitLoss", ["kl_top", "kl", "ce", "mse"])
Schedule = _choices("Schedule", ["linear", "cosine", "constant"])
GradCheckpointing = _choices("GradCheckpointing", ["auto", "on", "off"])
Autocast = _choices("Autocast", ["auto", "bfloat16", "off"])
Offload = _choices("Offload", ["none", "cpu"])
Ste = _choices("Ste", ["plain", "pass_scale"])
RefineMethod = _choices("RefineMethod", ["round"])
RefineOptimizer = _choices("RefineOptimizer", ["signsgd", "adam"])
RefineTarget = _choices("RefineTarget", ["fp_model", "fp_layer"])
RefineStart = _choices("RefineStart", ["solver", "rtn"])
ComputeDtype = _choices("ComputeDtype", ["model", "bfloat16", "float16", "float32"])


# Names ``solver.name`` may take: the built-in solvers, and those registered later (Registry(names=...)).
SOLVER_NAMES: set[str] = {"rtn", "gptq", "ldlq", "ldlq-tune", "blockhad-rtn", "blockhad-gptq", "wush-rtn", "wush-gptq",
                          "quip-rtn", "quip-gptq", "quip-ldlq", "quip-ldlq-tune"}


# --- what each format allows -------------------------------------------------------------------
# The values ``scale_rule`` may take per format; the first is what the field's default ``spec`` means.
SCALE_RULES: dict[str, tuple[str, ...]] = {
    Format.INT: ("quarot", "minmax", "full_range"), Format.MXFP4: ("spec", "three_quarters"),
    Format.NVFP4: ("spec",), Format.FP8: ("spec",), Format.E8P: ("spec",),
}
# Elements per shared scale of the FP4 formats (fixed by the OCP MX and NVFP4 layouts).
FP4_BLOCKS = {Format.MXFP4: 32, Format.NVFP4: 16}
# Bits per weight of the E8P codebooks (QuIP#: the 2-bit lattice plus residual stages).
E8P_BITS = (2, 3, 4)


def _check_int(spec: Any) -> None:
    if not 2 <= spec.bits <= 8:
        raise ConfigError(f"bits={spec.bits}: the int format takes bits in [2, 8]")
    if not spec.symmetric and spec.scale_rule != SCALE_RULES[Format.INT][0]:
        raise ConfigError(f"scale_rule={spec.scale_rule!r} with symmetric=False: the rule is for symmetric "
                          "int; asymmetric scales are always (max - min)/(2^b - 1)")


def _check_fp4(spec: Any) -> None:
    name, group = spec.format, FP4_BLOCKS[spec.format]
    if spec.bits != 4:
        raise ConfigError(f"bits={spec.bits}: {name} is a 4-bit format, set bits=4")
    if spec.group_size != group:
        raise ConfigError(f"group_size={spec.group_size}: {name} uses blocks of {group}, set group_size={group}")
    _check_float(spec)


def _check_fp8(spec: Any) -> None:
    if spec.bits != 8:
        raise ConfigError(f"bits={spec.bits}: fp8 is an 8-bit format, set bits=8")
    _check_float(spec)


def _check_float(spec: Any) -> None:
    if not spec.symmetric:
        raise ConfigError(f"symmetric=False: {spec.format} has no zero point, set symmetric=True")
    if spec.clip_search:
        raise ConfigError(f"clip_search=True: the clip search exists for the int format only, not {spec.format}")


def _check_e8p(spec: Any) -> None:
    if spec.bits not in E8P_BITS:
        raise ConfigError(f"bits={spec.bits}: the e8p format takes bits in {list(E8P_BITS)}")
    if spec.group_size not in (0, -1):
        raise ConfigError(f"group_size={spec.group_size}: the e8p format has one scale per tensor (0) or per row (-1)")
    if spec.clip_search or spec.clip_ratio != 1.0:
        raise ConfigError("the e8p format takes no clipping: its scale is RMS / opt_scale (QuIP#)")


# format -> the check of a QuantSpec's fields that format makes (raises ConfigError naming the field)
FORMAT_CHECKS: dict[str, Callable[[Any], None]] = {
    Format.INT: _check_int, Format.MXFP4: _check_fp4, Format.NVFP4: _check_fp4, Format.FP8: _check_fp8,
    Format.E8P: _check_e8p,
}


# --- checks the schema modules share ----------------------------------------------------------
def require(ok: bool, message: str) -> None:
    """Raise a :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


# Seeds go to a 64-bit torch.Generator after per-layer mixing (transforms.plan.layer_seed): keep them well inside
SEED_LIMIT = 2**32


def check_seed(name: str, seed: int) -> None:
    require(-SEED_LIMIT < seed < SEED_LIMIT, f"{name}={seed}: seeds must lie within ±2**32")


def choose(obj: Any, fields: dict[str, type[Choice]], prefix: str = "") -> None:
    """Turn the named fields of the frozen dataclass ``obj`` (plain strings or members) into members of
    their :class:`Choice`; a value outside it raises naming ``prefix + field`` and the choices."""
    for name, choice in fields.items():
        object.__setattr__(obj, name, choice.of(prefix + name, getattr(obj, name)))
