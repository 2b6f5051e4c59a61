"""The native orthoquant format: anything a run can hold (online transforms, WUSH blocks, FP4, lattice
codes, W4A4 with KV-cache quantization), as safetensors only.

Layout (a finished run folder, so :func:`orthoquant.open_run` reopens it, plus a manifest)::

    OUT/orthoquant_config.json      format, recipe, versions, dtype, sha256 of every file, checks
    OUT/run.json, recipe.yaml, config.json, tokenizer files
    OUT/rest.safetensors            embeddings, final norm, lm_head
    OUT/layers/00000.safetensors    per decoder layer: packed codes (.qcodes), scales (.qscale) and
                                    zeros, solver transforms (matrices), static KV-cache scales
                                    (float32, as stored), norms and biases
    OUT/transforms.safetensors      the recipe's Hadamards: ±1 sign vectors per site and layer, with
                                    the sha256 of every H_K in the metadata (a reader needs no seeds)

Loading rebuilds the transforms from the recipe seeds, as a run does, and refuses to go on if they
differ from the stored signs or H_K digests.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..device import DTYPES
from ..errors import UserError
from ..fakequant.kvcache import SCALE_NAMES
from ..fakequant.static_inputs import BUFFER as INPUT_SCALE
from ..hadamard import hadamard_digest
from ..layerfile import SIDES, read_module
from ..runfolder import write_json
from ..runtime import open_run
from ..transforms.base import AcrossBlocks
from ..transforms.sites import SITES
from .base import EXPORT_FORMATS, ExportFormat, ExportOptions, save_hf_config
from .contents import RunContents, exact_in

log = logging.getLogger(__name__)

TRANSFORMS_FILE = "transforms.safetensors"
_META_KEY = "orthoquant.transforms"
# Scales of these formats are rounded to QuantSpec.scale_dtype when quantizing, so they are stored in
# it; FP4 scales (E8M0 / E4M3 values with an FP32 tensor factor) stay float32.
_SCALES_IN_SCALE_DTYPE = ("int", "fp8")


def _check(contents: RunContents, dtype: torch.dtype) -> None:
    """Every finished run fits the native format."""


def _layer_file(contents: RunContents, path: Path, out: Path, dtype: torch.dtype) -> None:
    """Rewrite one run file: full-precision tensors in ``dtype``, scales in their storage dtype."""
    tensors, meta, metadata = read_module(path)
    keep = tuple(f"{p}.{side}." for p in meta for side in SIDES)  # solver transforms keep their dtype
    kv_scales = {f"{contents.arch.attention}.{name}" for name in SCALE_NAMES}  # static KV scales too
    kv_scales |= {f"{path}.{INPUT_SCALE}" for path in meta}  # and static NVFP4 input scales
    result = {}
    for key, value in tensors.items():
        if key.endswith(".qscale"):
            value = _stored_scale(value, meta[key[: -len(".qscale")]]["spec"])
        elif value.is_floating_point() and not key.endswith((".qzero", ".qglobal")) and not key.startswith(keep) \
                and key not in kv_scales:
            value = value.to(dtype)
        result[key] = value.contiguous()
    target = out / path.relative_to(contents.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(result, str(target), metadata=metadata)


def _stored_scale(scale: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    if spec["format"] not in _SCALES_IN_SCALE_DTYPE:
        return scale
    dtype = DTYPES[spec["scale_dtype"]]
    if not exact_in(scale, dtype):  # the quantizer rounded them: anything else is a corrupt run
        raise UserError(f"scales of a {spec['format']} linear are not {spec['scale_dtype']} values as the recipe says")
    return scale.to(dtype)


def _unwrap_signs(t) -> torch.Tensor | None:
    """The ±1 vector of a (possibly block-diagonal or across-heads) random Hadamard, else None."""
    while isinstance(t, AcrossBlocks):
        t = t.inner
    return getattr(t, "signs", None)


def _site_indices(contents: RunContents, site: str) -> list[int]:
    """Layer indices a site's transform exists for (-1: one model-level transform)."""
    per_layer = SITES.get(site).per_layer and site != "residual"
    return list(range(contents.n_layers)) if per_layer else [-1]


def plan_record(contents: RunContents) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Sign vectors (int8 ±1) keyed ``site.index`` and per-site metadata of the recipe's transforms."""
    tensors, sites = {}, {}
    for site, spec in contents.plan.specs.items():
        width = SITES.get(site).width(contents.plan.dims)
        block = spec.block_size or width
        sites[site] = {"kind": spec.kind, "seed": spec.seed, "width": width, "block": block,
                       "online": SITES.get(site).online, "hadamard_sha256": hadamard_digest(block),
                       "layers": _site_indices(contents, site)}
        for index in sites[site]["layers"]:
            signs = _unwrap_signs(contents.plan.transform(site, index))
            if signs is not None:
                tensors[f"{site}.{index}"] = signs.to(torch.int8)
    return tensors, sites


def _write(contents: RunContents, out: Path, options: ExportOptions) -> dict[str, Any]:
    dtype = options.dtype
    (out / "layers").mkdir(parents=True, exist_ok=True)
    for _, path in contents.files():  # only the files it owns: never a stray or linked file of the run
        _layer_file(contents, path, out, dtype)
    signs, sites = plan_record(contents)
    save_file(signs, str(out / TRANSFORMS_FILE), metadata={_META_KEY: json.dumps(sites)})
    (out / "recipe.yaml").write_text(contents.recipe.to_yaml())
    write_json(out / "run.json", {"fingerprint": {"export_of": str(contents.path)}, "status": "complete"})
    save_hf_config(contents, out, dtype)
    prefixes = {path.relative_to(contents.path).as_posix(): prefix for prefix, path in contents.files()}
    return {"transforms": sites, "prefixes": prefixes}


def _check_plan(folder: Path) -> None:
    """The transforms rebuilt from the recipe seeds must be the stored ones (signs and H_K)."""
    contents = RunContents(folder, manifest_checked=True)
    expected, sites = plan_record(contents)
    with safe_open(str(folder / TRANSFORMS_FILE), "pt") as f:
        stored_sites = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        stored = {k: f.get_tensor(k) for k in f.keys()}
    same_signs = stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in stored)
    if stored_sites != sites or not same_signs:
        raise UserError(
            f"{folder / TRANSFORMS_FILE}: this orthoquant rebuilds different transforms from the recipe "
            "(random signs or Hadamard matrices changed between versions); load it with the version in "
            "orthoquant_config.json")


def _load(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    _check_plan(folder)
    model, *_ = open_run(folder, device, dtype, manifest_checked=True)  # load_quantized checked it
    return model


NATIVE = ExportFormat("native", _check, _write, _load, exact=True)
EXPORT_FORMATS.add(NATIVE.name, NATIVE)
