"""Export a finished run to a checkpoint format, verify it, and load exports back.

Every export is written into an empty folder, hashed into a provisional manifest, checked against it,
and compared with the run one decoder layer at a time (:mod:`.streamed`: weights, layer outputs on the
same inputs, and logits on a few token windows, never a whole model in memory), plus, with
``verify="full"``, each format's stock-runtime checks (those load whole models, as a user would).
``verify="none"`` skips the comparison and says so in the manifest (``"verification": "none"``): loaders
load such an export (its files are still hash-checked) and log a warning. Only when every check passed is
the manifest written under the name loaders accept; a failed check renames the provisional one to
``orthoquant_config.failed.json``, and an export killed meanwhile keeps the provisional name, so
neither folder ever loads as a good export.

Sizes are bytes per parameter: for the quantized linears, every stored tensor standing for their
weights (codes, scales, zeros, group indices, transform state) over their weight count; for the
checkpoint, all safetensors bytes over all parameters of the model as exported.
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..version import __version__
from ..device import DTYPES, resolve_device
from ..models.conversion import by_module, stored_name_mapping
from ..models.loading import build_skeleton
from ..errors import UserError
from . import compressed_tensors, gptq, native  # noqa: F401  (register the formats)
from .base import EXPORT_FORMATS, ExportFormat, ExportOptions, copy_side_files
from .contents import RunContents
from .exportable import check_format, recorded_summary
from .shards import DEFAULT_SHARD_BYTES
from .streamed import VERIFY_MODES, verify_streamed
from .verify import (FAILED_MANIFEST, MANIFEST, PROVISIONAL_MANIFEST, check_batches, check_manifest,
                     update_manifest, write_manifest)

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"orthoquant": __version__, "torch": torch.__version__}
    for package in ("transformers", "safetensors", "compressed-tensors"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _empty_folder(out: Path | str) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {out} exists and is not empty; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_run(run_dir: Path | str, out: Path | str, format: str = "native", dtype: torch.dtype | None = None,
               calib: str | None = None, batches: int = 2, max_shard_bytes: int | None = None,
               verify: str = "full", device: torch.device | str = "cpu", force: bool = False) -> dict[str, Any]:
    """Write the run in ``run_dir`` as a ``format`` checkpoint in ``out``, reload it and compare.

    :param format: a registered export format: ``native``, ``compressed-tensors`` or ``gptq``.
    :param dtype: dtype of full-precision tensors (None: the run's own).
    :param calib: calibration text for static activation scales some stock formats need.
    :param batches: token batches (2 x 32 tokens each) the reload is compared on.
    :param max_shard_bytes: size cap of a safetensors shard of the stock formats (None: 5 GB); the
        writers stream the run one stored file at a time and hold about one shard.
    :param verify: ``full`` (streamed layer-by-layer weights, layer outputs and logits against the run,
        then the format's stock-runtime reloads), ``weights`` (streamed weights only) or ``none`` (the
        manifest says ``"verification": "none"``; loaders load it with a warning).
    :param device: where the streamed verification computes.
    :param force: export even when the format's overridable checks object (they are then warnings).
    :returns: {"format", "out", "dtype", "sizes": bytes per parameter, "checks": reload results}.
    :raises UserError: the run cannot be held by ``format`` (nothing is written), or a check failed.
    """
    fmt = EXPORT_FORMATS.get(format)
    if verify not in VERIFY_MODES:
        raise UserError(f"--verify {verify!r} is not one of {list(VERIFY_MODES)}")
    device = resolve_device(str(device))
    contents = RunContents(run_dir)
    options = ExportOptions(dtype or contents.stored_dtype(), calib,
                            max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
    _check_servable(fmt, contents, options.dtype)
    _check_overridable(fmt, contents, force)
    out = _empty_folder(out)
    try:
        fields = fmt.write(contents, out, options)
        copy_side_files(contents, out)
        manifest = write_manifest(out, {"format": fmt.name, "format_version": FORMAT_VERSION,
                                        "recipe": contents.recipe.to_dict(), "dtype": _dtype_name(options.dtype),
                                        "source_run": str(contents.path), "versions": _versions(),
                                        "verification": verify, **fields},
                                  PROVISIONAL_MANIFEST)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        checks = _verify(contents, out, fmt, options.dtype, batches, verify, device)
    except BaseException:
        (out / PROVISIONAL_MANIFEST).replace(out / FAILED_MANIFEST)
        raise
    skeleton = build_skeleton(contents.config, options.dtype)  # on meta: parameter counts only
    manifest.update(checks=checks, sizes=measure_sizes(out, manifest, contents, skeleton))
    update_manifest(out, manifest)  # only now does the folder load: every check above passed
    (out / PROVISIONAL_MANIFEST).unlink()
    log.info("exported %s as %s into %s", contents.path, fmt.name, out)
    return {"format": fmt.name, "out": str(out), "dtype": manifest["dtype"], "sizes": manifest["sizes"],
            "checks": checks}


def _check_servable(fmt: ExportFormat, contents: RunContents, dtype: torch.dtype) -> None:
    """The format's check, before anything is written; a refusal also names what the run serves
    (run.json's ``exports``, recorded when quantizing)."""
    try:
        check_format(fmt, contents, dtype)
    except UserError as e:
        summary = recorded_summary(contents)
        raise UserError(f"{e} ({summary})" if summary else str(e)) from None


def _check_overridable(fmt: ExportFormat, contents: RunContents, force: bool) -> None:
    problems = fmt.overridable(contents) if fmt.overridable is not None else []
    if problems and not force:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{fmt.name}: {problems[0]}{more}; quantize them alike (one override for the group), "
                        "or pass --force to export anyway")
    for problem in problems:
        log.warning("%s: %s (exported anyway: --force)", fmt.name, problem)


def _verify(contents: RunContents, out: Path, fmt: ExportFormat, dtype: torch.dtype, n_batches: int,
            mode: str, device: torch.device) -> dict[str, Any]:
    """Compare ``out`` with the run as ``mode`` says (:mod:`.streamed`), then, for ``stock``, reload it in
    the format's stock runtimes (whole models); returns the check results."""
    if mode == "none":
        return {"verification": "none: not compared with the run (export --verify none)"}
    manifest = check_manifest(out, PROVISIONAL_MANIFEST)  # hashes first, as loaders do
    streamed = verify_streamed(contents, out, manifest, fmt, dtype, device, n_batches,
                               "full" if mode == "stock" else mode)
    headline = streamed.get("logits", streamed["weights"])
    checks = {"load_quantized": {**headline, "note": f"streamed layer by layer on {device}"},
              **{k if k.startswith("layer_") else f"layer_{k}": v for k, v in streamed.items() if k != "logits"}}
    if mode == "stock" and fmt.stock_checks:
        reference, *_ = contents.open_model(torch.device("cpu"), dtype)  # stock runtimes load whole models
        batches = check_batches(contents.config, n_batches)
        for stock_check in fmt.stock_checks:
            checks.update(stock_check(out, contents, reference, batches, dtype))
    return checks


# --- sizes, from the safetensors headers (no tensor is loaded) -----------------------------------
def tensor_bytes(path: Path) -> dict[str, int]:
    """Tensor name -> stored bytes, from a safetensors file's header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _owner(key: str, linears: dict[str, int]) -> str | None:
    """The quantized linear a tensor belongs to (its bias excluded: the bias is not the weight)."""
    name = key
    while "." in name:
        name = name.rsplit(".", 1)[0]
        if name in linears:
            return None if key == f"{name}.bias" else name
    return None


def measure_sizes(out: Path, manifest: dict[str, Any], contents: RunContents, model: nn.Module) -> dict[str, Any]:
    """Bytes per parameter of the quantized linears and of the whole checkpoint.

    :param manifest: the export's manifest; its optional ``prefixes`` maps a file to the name prefix of
        its tensors (the native format stores layers under relative names).
    :param model: the quantized model, for the parameter count.
    """
    linears = {lin.name: model.get_submodule(lin.name).weight.numel()
               for part in contents.parts() for lin in part.linears()}
    prefixes = manifest.get("prefixes", {})
    ours = by_module(stored_name_mapping(contents.config.model_type))  # stock names (Mixtral's w1) -> ours
    linear_bytes = total_bytes = 0
    for name in manifest["files"]:
        if not name.endswith(".safetensors"):
            continue
        total_bytes += (out / name).stat().st_size
        for key, size in tensor_bytes(out / name).items():
            if _owner(ours(prefixes.get(name, "") + key), linears) is not None:
                linear_bytes += size
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(linears.values())
    return {"linear_bytes_per_param": linear_bytes / max(linear_params, 1),
            "checkpoint_bytes_per_param": total_bytes / max(params, 1),
            "linear_params": linear_params, "linear_bytes": linear_bytes,
            "params": params, "checkpoint_bytes": total_bytes}


def load_quantized(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The quantized model of an orthoquant export, as the run computes it (online transforms and
    activation/KV fake-quant re-attached), built from the stock transformers model class.

    Every file is checked against the manifest's sha256 first.

    :param dtype: compute dtype (None: the export's).
    :raises UserError: not an export, or a file is missing, truncated, altered or unexpected.
    """
    return _load_checked(Path(path), MANIFEST, torch.device(device), dtype)


def _load_checked(folder: Path, manifest_name: str, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """Check ``folder`` against manifest ``manifest_name``, then load it with its format's loader."""
    manifest = check_manifest(folder, manifest_name)
    if manifest.get("verification") == "none":
        log.warning("%s was exported with --verify none: it was never compared with its run", folder)
    fmt = EXPORT_FORMATS.get(manifest.get("format", "?"))
    dtype = dtype or DTYPES[manifest["dtype"]]
    return fmt.load(folder, manifest, device, dtype).eval()
