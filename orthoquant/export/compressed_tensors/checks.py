"""What a compressed-tensors checkpoint can hold, checked before anything is written.

- :func:`check`: every quantized linear has a CT scheme vLLM serves (:mod:`.schemes`), carries no solver
  transform that must run online and no act-order ``g_idx``, and has scales exact in the export dtype; static
  KV-cache scales exist and are exact; online transforms are in the vLLM subset (:mod:`.transforms`); the run
  quantized exactly the linears its recipe names, since the ``quantization_config`` is built from the recipe
  (:func:`planned_linears`).
- :func:`split_fused_groups`: the overridable problem, linears vLLM fuses but the recipe quantizes with
  different schemes.
"""
from __future__ import annotations

import torch

from ...config import QuantSpec, Recipe
from ...errors import UserError
from ...fakequant.kvcache import SCALE_NAMES
from ..contents import QuantizedLinear, RunContents, RunPart, exact_in, require_scales_in
from .schemes import FORMAT_NAME, input_args, kv_cache_args, refuse, scheme_key, weight_args
from .transforms import online_transform_config


def check(contents: RunContents, dtype: torch.dtype) -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UserError("--format compressed-tensors needs the compressed-tensors package "
                        "(pip install compressed-tensors)") from None
    kv = kv_cache_args(contents.recipe.kv_cache)
    online_transform_config(contents)
    quantized = set()
    for part in contents.parts():
        for lin in part.linears():
            _check_linear(lin, contents.recipe, dtype)
            quantized.add(lin.name)
        if kv is not None and part.prefix:
            _check_kv_scales(part, contents, dtype)
    if not quantized:
        refuse("no linear is quantized")
    unplanned = sorted(quantized ^ set(planned_linears(contents)))
    if unplanned:
        raise UserError(f"run {contents.path} quantized {unplanned[:3]} other than its recipe says; "
                        "its quantization_config could not describe it")
    dropped = [n for n in _arch_linears(contents)
               if n not in quantized and contents.recipe.activations_for(n) is not None]
    if dropped:
        refuse(f"{dropped[0]} quantizes its input but not its weight (no compressed-tensors scheme)")


def split_fused_groups(contents: RunContents) -> list[str]:
    """Linears that share an input and that vLLM fuses into one GEMM (q/k/v, gate/up) but that the recipe
    quantizes with different schemes (or leaves some in full precision): vLLM runs a fused module with one
    scheme, so such a checkpoint does not serve as quantized. One line per split group."""
    split = []
    for index in range(contents.n_layers):
        for roles in contents.arch.input_groups():
            names = [contents.layer_prefix(index) + contents.arch.path(r) for r in roles]
            schemes = {n: _scheme_of(contents.recipe, n) for n in names}
            if len(set(schemes.values())) > 1:
                split.append(f"{', '.join(names)} are fused by vLLM but quantized with different schemes")
    return split


def _scheme_of(recipe: Recipe, name: str) -> str:
    spec = recipe.weights_for(name)
    return "full precision" if spec is None else scheme_key(weight_args(spec), input_args(recipe.activations_for(name)))


def _check_linear(lin: QuantizedLinear, recipe: Recipe, dtype: torch.dtype) -> None:
    weight_args(lin.spec)
    input_args(recipe.activations_for(lin.name))
    if lin.transforms:
        refuse(f"{lin.name} carries a solver transform ({', '.join(lin.transforms.values())}) that must run online")
    if lin.g_idx is not None:
        refuse(f"{lin.name} uses act-order groups (g_idx), which compressed-tensors no longer stores "
                "(set solver.static_groups=true, or use --format gptq)")
    require_scales_in(lin, dtype, FORMAT_NAME)  # CT's scale parameters take the model dtype


def _check_kv_scales(part: RunPart, contents: RunContents, dtype: torch.dtype) -> None:
    """The layer's static KV scales exist and are exact in ``dtype`` (CT stores them in the model dtype)."""
    for name in SCALE_NAMES:
        key = f"{contents.arch.attention}.{name}"
        scale = part.tensors.get(key)
        if scale is None:
            raise UserError(f"run {contents.path} has no {part.prefix}{key}: its layers were quantized without "
                            "static KV-cache scales; re-run `orthoquant quantize` into a new folder")
        if not exact_in(scale, dtype):
            kind = str(dtype).removeprefix("torch.")
            raise UserError(f"{FORMAT_NAME} stores the KV-cache scale {part.prefix}{key} in {kind}, but the run's "
                            f"scale (kv_cache.scale_dtype={contents.recipe.kv_cache.scale_dtype}) is not exactly "
                            f"representable in {kind}; re-quantize with --set kv_cache.scale_dtype={kind}, or "
                            "export with a wider --dtype")


def _arch_linears(contents: RunContents) -> list[str]:
    """Every linear the runner may quantize: each layer's, then lm_head."""
    layers = [contents.layer_prefix(i) + path for i in range(contents.n_layers) for _, path in contents.arch.linears]
    return layers + [contents.arch.lm_head]


def planned_linears(contents: RunContents) -> dict[str, QuantSpec]:
    """Full name -> weight spec of every linear the run quantized (the recipe decides, as in the runner)."""
    return {n: s for n in _arch_linears(contents) if (s := contents.recipe.weights_for(n)) is not None}
