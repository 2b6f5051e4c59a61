"""Reading a compressed-tensors export back with orthoquant's own decoders.

compressed-tensors decompresses FP4 weights in bfloat16 on CPU, which is coarser than the run's
float32 weights; decoding the stored codes and scales with our formats reproduces them (bit for bit
for INT, FP8 and MXFP4; NVFP4 within one float32 ulp, as CT stores the inverse of our tensor scale).
The weight spec of each linear comes from the recipe in the manifest.

Table :data:`DECODERS`: our format -> (codes from the stored tensors, scale parameters).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...config import QuantSpec, Recipe
from ...formats import QParams, QuantizedTensor, make_format
from ...formats.packing import unpack_codes, unpack_nibbles
from ...models.conversion import by_module, stored_name_mapping
from ...models.loading import read_config_json
from ..base import dense_reload
from ..shards import read_tensors

Stored = dict[str, torch.Tensor]  # one linear's CT tensors, names relative to it (weight_packed, ...)
# Tensor names CT stores in place of a quantized linear's weight.
CT_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale",
            "input_global_scale", "input_scale")


def _int_codes(t: Stored, spec: QuantSpec, cols: int) -> torch.Tensor:
    if "weight_packed" in t:
        return unpack_codes(t["weight_packed"], spec.bits, cols)
    return (t["weight"].to(torch.int16) + 2 ** (spec.bits - 1)).to(torch.uint8)  # int-quantized: signed int8


def _scale(t: Stored, spec: QuantSpec, rows: int) -> QParams:
    scale = t["weight_scale"].float()  # CT: (1,) per tensor, (out, 1) per channel, (out, groups)
    return QParams(scale.reshape(1, 1) if spec.group_size == 0 else scale.reshape(rows, -1))


Codes = Callable[[Stored, QuantSpec, int], torch.Tensor]
Params = Callable[[Stored, QuantSpec, int], QParams]
DECODERS: dict[str, tuple[Codes, Params]] = {
    "int": (_int_codes, _scale),
    "fp8": (lambda t, spec, cols: t["weight"].view(torch.uint8), _scale),
    "nvfp4": (lambda t, spec, cols: unpack_nibbles(t["weight_packed"], cols),
              lambda t, spec, rows: QParams(t["weight_scale"].float(),
                                      global_scale=(1 / t["weight_global_scale"].float()).reshape(()))),
    "mxfp4": (lambda t, spec, cols: unpack_nibbles(t["weight_packed"], cols),
              lambda t, spec, rows: QParams(torch.exp2(t["weight_scale"].float() - 127))),  # E8M0 exponents
}


def decode_linear(stored: Stored, spec: QuantSpec, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) float32 weight of one linear from its CT tensors."""
    codes_of, params_of = DECODERS[spec.format]
    q = QuantizedTensor(codes_of(stored, spec, cols), params_of(stored, spec, rows))
    return make_format(spec).dequantize(q)


def dense_state(folder: Path, recipe: Recipe, shapes: dict[str, tuple[int, int]],
                keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a CT export with every quantized linear decoded to float32.

    :param shapes: full linear name -> (out, in) of every Linear of the model skeleton.
    :param keep: read only the tensors whose names it accepts (one decoder layer's).
    """
    ours = by_module(stored_name_mapping(read_config_json(folder).get("model_type")))  # Mixtral's w1: gate_proj
    tensors = {ours(k): v for k, v in read_tensors(folder, keep).items()}
    owners = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    # biases, and static input scales (a model whose recipe has them expects them; others ignore them)
    state = {k: v for k, v in tensors.items()
             if k.rsplit(".", 1)[0] not in owners or k.endswith((".bias", ".input_global_scale"))}
    for owner in owners:
        spec = recipe.weights_for(owner)
        if spec is None or owner not in shapes:
            raise ValueError(f"{owner} is quantized in the checkpoint but not by the recipe")
        stored = {name: tensors[f"{owner}.{name}"] for name in (*CT_NAMES, "weight") if f"{owner}.{name}" in tensors}
        state[f"{owner}.weight"] = decode_linear(stored, spec, *shapes[owner])
    return state


def load(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Weights decoded by :func:`dense_state` (not CT's bf16 decompression); online transforms from the
    recipe, which stock transformers would drop."""
    return dense_reload(folder, manifest, device, dtype, dense_state)
