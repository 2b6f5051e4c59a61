"""``scale_dtype: auto``: the dtype stored scales are rounded to, chosen when quantizing so that the run
exports without re-quantizing.

Exports store weight (INT, FP8, E8P) and static KV scales in a fixed dtype: compressed-tensors in the
model's dtype, GPTQ in float16. A scale exports exactly only if it is already a value of that dtype, and
scales are rounded when quantizing, never at export (the codes were chosen with the rounded scale). So
``auto`` takes the dtype that serves the most exports of the model:

- a float16 model -> ``float16``: exact in float16 (compressed-tensors, GPTQ) and float32;
- a bfloat16, float32 or float64 model -> ``bfloat16``: a bfloat16 value (8 significant bits) inside
  float16's normal range [6.1e-5, 65504] is exact in float16 (11 bits) and float32, so these scales
  serve compressed-tensors in bfloat16, float16 and float32 and GPTQ's float16 scales.

The edge: a scale below float16's smallest normal 6.1e-5 (weights of magnitude below ~4e-4 in INT4) or
above 65504 may not be float16-exact; the export checks find such a scale and refuse with the reason,
and ``run.json``'s ``exports`` record says so right after quantizing.

FP4 formats (MXFP4's E8M0, NVFP4's E4M3 group scales with a float32 tensor scale) ignore
``scale_dtype``: their scales are exact in every export dtype already. The library's
:class:`~orthoquant.config.QuantSpec` default stays ``float32`` (a spec built in Python keeps its
bit-exact results); presets say ``auto``.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import QuantSpec, Recipe

AUTO = "auto"
# model dtype -> the scale dtype that `auto` resolves to (see the module docstring for why)
AUTO_SCALE_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "bfloat16",
                    torch.float64: "bfloat16"}


def auto_scale_dtype(model_dtype: torch.dtype) -> str:
    """The scale dtype ``auto`` means for a model computing in ``model_dtype``."""
    return AUTO_SCALE_DTYPE.get(model_dtype, "bfloat16")


def _resolved(spec: QuantSpec | None, name: str) -> QuantSpec | None:
    if spec is None or spec.scale_dtype != AUTO:
        return spec
    return dataclasses.replace(spec, scale_dtype=name)


def resolve_auto_scales(recipe: Recipe, model_dtype: torch.dtype) -> Recipe:
    """A copy of ``recipe`` with every ``scale_dtype: auto`` replaced by :func:`auto_scale_dtype`; the run
    records (recipe.yaml, fingerprint) this resolved recipe, so it reopens and exports without the model."""
    name = auto_scale_dtype(model_dtype)
    overrides = tuple(dataclasses.replace(o, weights=_resolved(o.weights, name),
                                          activations=_resolved(o.activations, name)) for o in recipe.overrides)
    return dataclasses.replace(recipe, weights=_resolved(recipe.weights, name),
                               activations=_resolved(recipe.activations, name),
                               kv_cache=_resolved(recipe.kv_cache, name), overrides=overrides)
