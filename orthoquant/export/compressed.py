"""compressed-tensors export: a stock model with quantized weights that transformers and vLLM load.

The writer builds the stock model class with the run's (fused, dequantized) weights, lets the
compressed-tensors library attach its schemes and compress, checks that its codes are ours and keeps
ours, and writes ``config.json``'s ``quantization_config`` (plus ``transform_config`` for the vLLM
subset of online transforms, see :mod:`.ct_transforms`). Scales are stored as quantized: CT keeps
INT/FP8 scales in the model dtype (FP4 ones pass through it), so they must already be exact in it
(``weights.scale_dtype`` rounds them when quantizing).

Static activation scales that CT needs but our dynamic quantizers do not have (NVFP4's
``input_global_scale``) are calibrated at export, see :mod:`.calibrate`. KV-cache quantization is
refused: CT/vLLM serve static per-tensor FP8 KV scales, our recipes quantize K/V dynamically.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Recipe
from ..errors import UserError
from ..models.loading import build_skeleton
from .base import EXPORT_FORMATS, ExportFormat, ExportOptions, cast_floats, dense_reload, quiet_transformers
from .contents import QuantizedLinear, RunContents, require_scales_in
from .ct_read import dense_state
from .ct_schemes import (CT_DECOMPRESS_DTYPE, input_args, refuse, scheme_key, set_weight_params, store_codes,
                         weight_args)
from .ct_transforms import apply_online, online_transform_config
from .verify import ExportCheckError, compare_logits, compare_weights, relative_tolerance

log = logging.getLogger(__name__)
FORMAT_NAME = "compressed-tensors"


def _check(contents: RunContents, dtype: torch.dtype) -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UserError("--format compressed-tensors needs the compressed-tensors package "
                        "(pip install compressed-tensors)") from None
    if contents.recipe.kv_cache is not None:
        refuse("KV-cache quantization (vLLM takes static per-tensor FP8 k/v scales; orthoquant quantizes "
                "keys and values dynamically per call)")
    online_transform_config(contents)
    quantized = set()
    for part in contents.parts():
        for lin in part.linears():
            _check_linear(lin, contents.recipe, dtype)
            quantized.add(lin.name)
    if not quantized:
        refuse("no linear is quantized")
    linears = [contents.layer_prefix(i) + path for i in range(contents.n_layers) for _, path in contents.arch.linears]
    dropped = [n for n in linears + [contents.arch.lm_head]
               if n not in quantized and contents.recipe.activations_for(n) is not None]
    if dropped:
        refuse(f"{dropped[0]} quantizes its input but not its weight (no compressed-tensors scheme)")


def _check_linear(lin: QuantizedLinear, recipe: Recipe, dtype: torch.dtype) -> None:
    weight_args(lin.spec)
    input_args(recipe.activations_for(lin.name))
    if lin.transforms:
        refuse(f"{lin.name} carries a solver transform ({', '.join(lin.transforms.values())}) that must run online")
    if lin.g_idx is not None:
        refuse(f"{lin.name} uses act-order groups (g_idx), which compressed-tensors no longer stores "
                "(set solver.static_groups=true, or use --format gptq)")
    require_scales_in(lin, dtype, FORMAT_NAME)  # CT's scale parameters take the model dtype


def dense_model(contents: RunContents, dtype: torch.dtype) -> tuple[nn.Module, dict[str, QuantizedLinear]]:
    """The stock model class holding the run's weights (quantized ones dequantized), no orthoquant hooks."""
    model = build_skeleton(contents.config, dtype)
    state, linears = {}, {}
    for part in contents.parts():
        state.update(part.plain())
        for lin in part.linears():
            linears[lin.name] = lin
            state[f"{lin.name}.weight"] = lin.dequantized()
    try:
        model.load_state_dict(cast_floats(state, dtype), strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"run {contents.path} does not match its config.json: {e}") from None
    return model.eval(), linears


def _quantization_config(contents: RunContents, model: nn.Module, linears: dict[str, QuantizedLinear]):
    """One config group per distinct (weights, inputs) scheme; every other Linear is ignored."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    groups: dict[str, tuple[dict, dict | None, list[str]]] = {}
    for name, lin in linears.items():
        w, a = weight_args(lin.spec), input_args(contents.recipe.activations_for(name))
        groups.setdefault(scheme_key(w, a), (w, a, []))[2].append(name)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    single = len(groups) == 1
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=["Linear"] if single else names, weights=QuantizationArgs(**w),
            input_activations=QuantizationArgs(**a) if a is not None else None)
        for i, (w, a, names) in enumerate(groups.values())}
    return QuantizationConfig(config_groups=config_groups, ignore=others,
                              quantization_status=QuantizationStatus.FROZEN)


def _write(contents: RunContents, out: Path, options: ExportOptions) -> dict[str, Any]:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.transform import apply_transform_config

    from .calibrate import set_static_input_scales

    # CT re-quantizes our dequantized weights to find the codes: in float32 that is exact, in bf16 its
    # division rounds (INT8 codes near 127 come back off by one), so compress first, cast after.
    model, linears = dense_model(contents, torch.float32)
    transforms = online_transform_config(contents)
    if transforms is not None:  # before quantization: CT hooks the input transform ahead of the quantizer
        apply_transform_config(model, transforms)
    apply_quantization_config(model, _quantization_config(contents, model, linears))
    for name, lin in linears.items():
        set_weight_params(model.get_submodule(name), lin)
    set_static_input_scales(model, contents, list(linears), options)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    for name, lin in linears.items():
        module = model.get_submodule(name)
        store_codes(module, lin, _value(module.quantization_scheme.format))
    online = sorted(transforms.config_groups) if transforms is not None else []
    _cast_for_save(model, options.dtype)
    model.config.orthoquant = {"recipe": contents.recipe.name, "online_transforms": online,
                               "loader": "vllm or orthoquant.load_quantized" if online else "any"}
    model.save_pretrained(out)
    compressor.update_config(str(out))
    _write_readme(out, contents, online)
    return {"compressed_tensors": {"format": _value(compressor.quantization_config.format),
                                   "online_transforms": online}}


def _value(enum_or_str) -> str:
    """CT formats are enums in some places and plain strings in others."""
    return getattr(enum_or_str, "value", enum_or_str)


def _cast_for_save(model: nn.Module, dtype: torch.dtype) -> None:
    """float32 tensors to the export dtype, except CT's float32 tensor scales (NVFP4 global scales);
    scales were checked to be exact in ``dtype``, FP8/E8M0 ones already have their own dtype."""
    for name, param in model.named_parameters():
        if param.dtype == torch.float32 and not name.endswith("global_scale"):
            param.data = param.data.to(dtype)
    model.config.dtype = dtype


def _write_readme(out: Path, contents: RunContents, online: list[str]) -> None:
    lines = [f"# {contents.recipe.name} (compressed-tensors, exported by orthoquant)", "",
             contents.recipe.description, "",
             "Every rotation is fused into the weights." if not online else
             f"**Online transforms ({', '.join(online)}) must run at inference.** vLLM applies them from "
             "`transform_config`; stock transformers drops them silently on load, which gives wrong outputs. "
             "Load with vLLM or with `orthoquant.load_quantized(path)`.", "",
             "- vLLM: `vllm serve <path>`",
             "- transformers: `AutoModelForCausalLM.from_pretrained(<path>)` (needs compressed-tensors; "
             "weights are dequantized on CPU and activations run unquantized)"
             + (" - not for this checkpoint, see above" if online else ""),
             "- orthoquant: `orthoquant.load_quantized(<path>)` re-attaches online transforms and the "
             "recipe's activation fake-quant"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _load(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Weights decoded by :mod:`.ct_read` (not CT's bf16 decompression); online transforms from the
    recipe, which stock transformers would drop."""
    return dense_reload(folder, manifest, device, dtype, dense_state)


def _stock_transformers(folder: Path, contents: RunContents, reference: nn.Module, batches: list[torch.Tensor],
                        dtype: torch.dtype) -> dict[str, Any]:
    """Reload with stock transformers (+ compressed-tensors) and compare weights and logits.

    Weight-only checkpoints load the default way a user would (decompressed on the first forward).
    With activation schemes CT's quantized forward fails on CPU for FP4 in float32 (it decompresses in
    bfloat16), so the documented ``dequantize=True`` path is used; activations then run unquantized,
    and the logits are reported, not checked.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    fake_quant = contents.recipe.activations is not None
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fake_quant else {}
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    transforms = apply_online(model, folder)  # what vLLM does; transformers drops them
    logits = compare_logits(reference, model, batches)
    names = reference_linears(contents)
    weights = compare_weights(reference, model, names)
    tol = relative_tolerance(decompression_dtype(contents, names, dtype))
    if weights["max_rel_diff"] > tol or (not fake_quant and logits["max_rel_diff"] > tol):
        raise ExportCheckError(f"stock transformers reload of {folder} differs from the run: "
                               f"logits {logits['max_rel_diff']:.3g}, weights {weights['max_rel_diff']:.3g} "
                               f"(tolerance {tol:.3g})")
    note = "activations run unquantized in stock transformers (vLLM quantizes them)" if fake_quant else None
    return {"stock_transformers": {**logits, "weights": weights, "online_transforms_applied_with_ct": transforms,
                                   "tolerance": tol, "note": note}}


def reference_linears(contents: RunContents) -> list[str]:
    return [lin.name for part in contents.parts() for lin in part.linears()]


def decompression_dtype(contents: RunContents, names: list[str], dtype: torch.dtype) -> torch.dtype:
    """The coarser of the model dtype and the dtype CT decompresses these linears' formats in."""
    formats = {contents.recipe.weights_for(n).format for n in names}
    coarse = [CT_DECOMPRESS_DTYPE[f] for f in formats if f in CT_DECOMPRESS_DTYPE]
    return max([dtype, *coarse], key=lambda d: torch.finfo(d).eps)


COMPRESSED = ExportFormat(FORMAT_NAME, _check, _write, _load, exact=False, stock_checks=(_stock_transformers,))
EXPORT_FORMATS.add(COMPRESSED.name, COMPRESSED)
