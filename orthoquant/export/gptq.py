"""GPTQ v1 export (AutoGPTQ / gptqmodel / vLLM ``"format": "gptq"``), symmetric INT weights only.

Per linear ``L`` with weight (out O, in I), group size GS (I for per-channel), b bits::

    L.qweight  int32 (I·b/32, O)   codes packed along in, LSB first (8 nibbles per word for b=4)
    L.qzeros   int32 (I/GS, O·b/32) zero − 1 packed along out (v1 stores 2^(b−1) − 1 for symmetric)
    L.scales   fp16  (I/GS, O)
    L.g_idx    int32 (I,)          group of each input column (permuted under act-order)
    W[o, i] = scales[g_idx[i], o] · (q[i, o] − (qzeros[g_idx[i], o] + 1))

Our symmetric codes are unsigned with zero 2^(b−1), exactly GPTQ's. Shards are written one run file at
a time (:class:`~.shards.ShardWriter`). Loading for transformers needs gptqmodel; orthoquant's own
loader decodes the tensors above (exact).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Recipe
from ..errors import UserError
from ..formats.packing import pack_codes, unpack_codes
from .base import EXPORT_FORMATS, ExportFormat, ExportOptions, dense_reload, save_hf_config
from .contents import QuantizedLinear, RunContents, require_scales_in
from .shards import ShardWriter, cast_floats, read_tensors
from .verify import ExportCheckError, compare_logits, quiet_transformers

log = logging.getLogger(__name__)
BITS = (2, 3, 4, 8)
GPTQMODEL_TOLERANCE = 2e-2  # relative logits: its torch kernel measured 2e-3..5e-3 on tiny models


def _refuse(reason: str) -> None:
    raise UserError(f"GPTQ cannot hold this run: {reason}; use --format native (or compressed-tensors)")


def _check(contents: RunContents, dtype: torch.dtype) -> None:
    recipe = contents.recipe
    if recipe.activations is not None or recipe.kv_cache is not None:
        _refuse("GPTQ checkpoints are weight-only, the recipe quantizes activations or the KV cache")
    if contents.online_sites():
        _refuse(f"online transforms at {contents.online_sites()} cannot be stored")
    if any(".experts." in f".{path}" for _, path in contents.arch.linears):
        # measured: gptqmodel's reload of per-expert GPTQ weights gives logits 0.65-0.74 (relative) away from the run
        _refuse("its layers are a mixture of experts, which GPTQ loaders do not reload as quantized")
    shapes = set()
    for part in contents.parts():
        quantized = {lin.name: lin for lin in part.linears()}
        _check_layer_covered(contents, part.prefix, quantized)
        for lin in quantized.values():
            _check_linear(lin)
            shapes.add((lin.spec.bits, lin.spec.group_size))
    if len(shapes) > 1:
        _refuse(f"one bits/group_size for every linear is needed, the run mixes {sorted(shapes)}")


def _check_layer_covered(contents: RunContents, prefix: str, quantized: dict[str, QuantizedLinear]) -> None:
    """GPTQ loaders quantize every Linear of every decoder layer and nothing outside them."""
    if not prefix:
        if quantized:
            _refuse(f"{sorted(quantized)} outside the decoder layers are quantized")
        return
    missing = [prefix + path for _, path in contents.arch.linears if prefix + path not in quantized]
    if missing:
        _refuse(f"{missing[0]} is kept in full precision")


def _check_linear(lin: QuantizedLinear) -> None:
    spec = lin.spec
    if spec.format != "int" or not spec.symmetric or spec.bits not in BITS:
        _refuse(f"{lin.name} is {spec.format} {spec.bits}-bit symmetric={spec.symmetric}; "
                f"v1 stores symmetric int{'/'.join(map(str, BITS))}")
    if spec.group_size == 0:
        _refuse("per-tensor scales have no GPTQ layout")
    if lin.transforms:
        _refuse(f"{lin.name} carries an online solver transform")
    require_scales_in(lin, torch.float16, "GPTQ")


def gptq_tensors(lin: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The four GPTQ v1 tensors of one linear (names relative to it)."""
    q, bits = lin.q, lin.spec.bits
    rows, cols = q.codes.shape
    groups = lin.params.scale.shape[1]
    zeros = torch.full((groups, rows), 2 ** (bits - 1) - 1, dtype=torch.uint8)
    g_idx = q.g_idx if q.g_idx is not None else torch.arange(cols) // (cols // groups)
    return {"qweight": pack_codes(q.codes, bits).T.contiguous(), "qzeros": pack_codes(zeros, bits),
            "scales": lin.params.scale.T.to(torch.float16).contiguous(), "g_idx": g_idx.to(torch.int32)}


def _write(contents: RunContents, out: Path, options: ExportOptions) -> dict[str, Any]:
    writer, spec, desc_act = ShardWriter(out, options.max_shard_bytes), None, False
    for part in contents.parts(progress="export gptq"):
        tensors = cast_floats(part.plain(), options.dtype)
        for lin in part.linears():
            spec, desc_act = lin.spec, desc_act or lin.g_idx is not None
            tensors.update({f"{lin.name}.{k}": v for k, v in gptq_tensors(lin).items()})
        writer.add(tensors)
    writer.finish()
    qconfig = {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": desc_act,
               "sym": True, "format": "gptq", "true_sequential": contents.recipe.solver.true_sequential,
               "damp_percent": contents.recipe.solver.damp}
    save_hf_config(contents, out, options.dtype, quantization_config=qconfig)
    return {"gptq": qconfig}


def _decode(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """(out, in) float32 weight from one linear's GPTQ v1 tensors (the docstring's formula)."""
    qweight, scales, g_idx = tensors["qweight"], tensors["scales"].float(), tensors["g_idx"].long()
    rows = qweight.shape[1]
    codes = unpack_codes(qweight.T.contiguous(), bits, g_idx.numel()).float()
    zeros = unpack_codes(tensors["qzeros"], bits, rows).float() + 1
    return (codes - zeros[g_idx].T) * scales[g_idx].T


def load_state(folder: Path, recipe: Recipe | None = None, shapes=None, keep=None) -> dict[str, torch.Tensor]:
    """The dense state dict of a GPTQ export: every GPTQ linear decoded, other tensors as stored
    (``keep``: only the tensors whose names it accepts)."""
    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    state = read_tensors(folder, keep)
    owners = {k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}
    for owner in owners:
        parts = {s: state.pop(f"{owner}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        state[f"{owner}.weight"] = _decode(parts, bits)
    return state


def _load(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    return dense_reload(folder, manifest, device, dtype, load_state)


def _stock_gptqmodel(folder: Path, contents: RunContents, reference: nn.Module, batches: list[torch.Tensor],
                     dtype: torch.dtype) -> dict[str, Any]:
    """Reload with transformers + gptqmodel when installed (its CPU kernel rounds: ~2e-3 relative)."""
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        return {"gptqmodel": "skipped: gptqmodel is not installed (the latest needs torch>=2.14; "
                             "`make install` puts gptqmodel==7.6.0 in with --no-deps, which works with torch 2.13)"}
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu").eval()
        result = compare_logits(reference, model, batches)
    except RuntimeError as e:  # its CPU kernels take group sizes 32/64/128/256 only, for one
        log.warning("transformers + gptqmodel could not run %s: %s", folder, e)
        return {"gptqmodel": f"FAILED to run (a gptqmodel kernel limit, not checked): {str(e).splitlines()[0]}"}
    if result["max_rel_diff"] > GPTQMODEL_TOLERANCE:  # a zero off by one (v1/v2) gives 0.5 and more
        raise ExportCheckError(f"transformers + gptqmodel reload of {folder} differs from the run by "
                               f"{result['max_rel_diff']:.3g} relative (allowed {GPTQMODEL_TOLERANCE})")
    return {"gptqmodel": {**result, "tolerance": GPTQMODEL_TOLERANCE,
                          "note": "gptqmodel's CPU kernel rounds differently; a format error gives > 0.5"}}


GPTQ = ExportFormat("gptq", _check, _write, _load, exact=True, stock_checks=(_stock_gptqmodel,), decode=load_state)
EXPORT_FORMATS.add(GPTQ.name, GPTQ)
