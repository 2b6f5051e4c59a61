"""The compressed-tensors check against stock transformers: the export reloaded as a user would (plus the online
transforms vLLM applies and transformers drops), its weights, logits and KV-cache scales compared with the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...fakequant.kvcache import SCALE_NAMES, kv_scales
from ...models.layout import to_layout_
from ...models.surgery import layers_of
from ..contents import RunContents
from ..shards import read_tensors
from ..verify import ExportCheckError, compare_logits, compare_weights, quiet_transformers, relative_tolerance
from .checks import planned_linears
from .schemes import CT_DECOMPRESS_DTYPE
from .transforms import apply_online


@dataclass(frozen=True)
class _Reload:
    """The export loaded by stock transformers and its logits against the run's."""

    model: nn.Module
    logits: dict[str, Any]
    transforms: bool  # online transforms re-applied with CT (transformers drops them)
    simulated: bool  # CT's quantized forward quantized the activations and the KV cache
    note: str | None = None  # why CT's quantized forward was not used


def stock_transformers(folder: Path, contents: RunContents, reference: nn.Module, batches: list[torch.Tensor],
                       dtype: torch.dtype) -> dict[str, Any]:
    """Reload with stock transformers (+ compressed-tensors) and compare weights and logits.

    Weight-only checkpoints load the default way a user would (decompressed on the first forward).
    With a KV cache, the default load too: CT's quantized forward then quantizes the KV cache with the
    loaded ``k_scale``/``v_scale`` (compared with the run's, bit for bit) and the activations
    dynamically, as vLLM does; the logits are checked where CT's simulation is the run's arithmetic
    (float32, FP8 or no activations: bit-exact). Otherwise, with activation schemes, CT's quantized
    forward fails on CPU for FP4 in float32 (it decompresses in bfloat16), so the documented
    ``dequantize=True`` path is used; activations (and a KV cache, whose scales are then compared in the
    checkpoint) run unquantized, and the logits are reported, not checked.
    """
    names = list(planned_linears(contents))
    tol = relative_tolerance(decompression_dtype(contents, names, dtype))
    fake_quant = contents.recipe.activations is not None or contents.recipe.kv_cache is not None
    reload = _reload(folder, contents, reference, batches, dtype, fake_quant)
    to_layout_(reload.model, contents.arch)  # stock modules (fused, (1 + γ)) as the run holds them, decompressed
    weights, logits = compare_weights(reference, reload.model, names), reload.logits
    kv = _compare_kv_scales(contents, reference, reload.model if reload.simulated else None, folder)
    mismatch = _simulation_mismatch(contents, dtype) if reload.simulated else None
    checked = not fake_quant or (reload.simulated and mismatch is None)
    if weights["max_rel_diff"] > tol or (checked and logits["max_rel_diff"] > tol) or (kv and not kv["bit_exact"]):
        raise ExportCheckError(f"stock transformers reload of {folder} differs from the run: "
                               f"logits {logits['max_rel_diff']:.3g}, weights {weights['max_rel_diff']:.3g} "
                               f"(tolerance {tol:.3g})" + (f", KV-cache scales {kv}" if kv else ""))
    label = ("stock transformers + online transforms re-applied (plain from_pretrained drops them)"
             if reload.transforms else "stock transformers, plain from_pretrained")
    return {"stock_transformers": {**logits, "label": label, "logits_checked": checked, "weights": weights,
                                   "kv_cache_scales": kv, "online_transforms_applied_with_ct": reload.transforms,
                                   "tolerance": tol, "note": _note(reload, fake_quant, mismatch, kv)}}


def _load(folder: Path, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def _reload(folder: Path, contents: RunContents, reference: nn.Module, batches: list[torch.Tensor],
            dtype: torch.dtype, fake_quant: bool) -> _Reload:
    """CT's quantized forward where the run has a KV cache and it works, else the model transformers
    decompresses (``dequantize=True`` when the run quantizes activations or the KV cache)."""
    from transformers import CompressedTensorsConfig

    note = None
    if contents.recipe.kv_cache is not None:
        simulated = _simulated_reload(folder, contents, reference, batches, dtype)
        if isinstance(simulated, _Reload):
            return simulated
        note = simulated
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fake_quant else {}
    model = _load(folder, dtype, **kwargs)
    transforms = apply_online(model, folder)  # what vLLM does; transformers drops them
    return _Reload(model, compare_logits(reference, model, batches), transforms, simulated=False, note=note)


def _simulated_reload(folder: Path, contents: RunContents, reference: nn.Module, batches: list[torch.Tensor],
                      dtype: torch.dtype) -> _Reload | str:
    """The default load, whose CT forward quantizes the KV cache and activations; or why it could not run."""
    try:
        model = _load(folder, dtype)
        if not _attached_kv_scales(model, contents):
            return _KV_NOT_ATTACHED.format(**_versions())
        transforms = apply_online(model, folder)
        logits = compare_logits(reference, model, batches)  # the first forward decompresses the weights
        return _Reload(model, logits, transforms, simulated=True)
    except (RuntimeError, NotImplementedError, ValueError) as e:  # CT's quantized forward on CPU
        return f"CT's quantized forward failed ({str(e).splitlines()[0][:120]}); "


def _note(reload: _Reload, fake_quant: bool, mismatch: str | None, kv: dict[str, Any] | None) -> str | None:
    """What the stock check could not compare, and why."""
    if reload.simulated:
        return "activations and KV cache quantized by compressed-tensors' own forward, as vLLM does" + (
            f"; logits not checked: {mismatch}" if mismatch else "")
    if fake_quant:
        return (reload.note or "") + ("activations and KV cache run unquantized in stock transformers (vLLM "
                                      "quantizes them); KV-cache scales compared in the checkpoint" if kv else
                                      "activations run unquantized in stock transformers (vLLM quantizes them)")
    return reload.note


# compressed-tensors recognises an attention module by a `past_key_value(s)` argument of its forward;
# transformers 5.25 renamed it `cache`, so CT 0.20.1 drops `kv_cache_scheme` there and the scales load as
# unused keys (vLLM reads them from the checkpoint either way).
_KV_NOT_ATTACHED = ("stock transformers {transformers} with compressed-tensors {compressed_tensors} did not attach "
                    "the KV-cache scales (CT looks for a past_key_values argument in the attention's forward); ")


def _attached_kv_scales(model: nn.Module, contents: RunContents) -> bool:
    """Whether loading the export in stock transformers attached ``k_scale``/``v_scale`` to every attention."""
    return all(hasattr(model.get_submodule(f"{contents.layer_prefix(i)}{contents.arch.attention}"), name)
               for i in range(contents.n_layers) for name in SCALE_NAMES)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"transformers": version("transformers"), "compressed_tensors": version("compressed-tensors")}


def _simulation_mismatch(contents: RunContents, dtype: torch.dtype) -> str | None:
    """Why CT's quantized CPU forward is not the run's arithmetic (None: it is)."""
    if dtype != torch.float32:
        return f"CT quantizes in {str(dtype).removeprefix('torch.')} arithmetic, orthoquant in float32"
    formats = {a.format for n in planned_linears(contents) if (a := contents.recipe.activations_for(n)) is not None}
    if "int" in formats:
        return "CT simulates INT8 activations with the scale amax/127.5 (vLLM and orthoquant: amax/127)"
    if formats - {"fp8"}:
        return f"CT's simulation of {sorted(formats - {'fp8'})} activations differs from the run's"
    return None


def _compare_kv_scales(contents: RunContents, reference: nn.Module, stock: nn.Module | None,
                       folder: Path) -> dict[str, Any] | None:
    """The run's static KV scales against those the stock model loaded (or, when it did not load them,
    those stored in the checkpoint). None without a KV cache."""
    if contents.recipe.kv_cache is None:
        return None
    stored = read_tensors(folder) if stock is None else None
    exact, count = True, 0
    for index, layer in enumerate(layers_of(reference, contents.arch)):
        attention = f"{contents.layer_prefix(index)}{contents.arch.attention}"
        for name, ours in kv_scales(layer.get_submodule(contents.arch.attention)).items():
            theirs = (stock.get_submodule(attention).get_parameter(name) if stock is not None
                      else stored[f"{attention}.{name}"])
            exact = exact and torch.equal(theirs.detach().float().reshape(-1), ours.float().reshape(-1))
            count += 1
    return {"bit_exact": exact and count == 2 * contents.n_layers, "scales": count,
            "source": "loaded by compressed-tensors" if stock is not None else "checkpoint"}


def decompression_dtype(contents: RunContents, names: list[str], dtype: torch.dtype) -> torch.dtype:
    """The coarser of the model dtype and the dtype CT decompresses these linears' formats in."""
    formats = {contents.recipe.weights_for(n).format for n in names}
    coarse = [CT_DECOMPRESS_DTYPE[f] for f in formats if f in CT_DECOMPRESS_DTYPE]
    return max([dtype, *coarse], key=lambda d: torch.finfo(d).eps)
