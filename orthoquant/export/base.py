"""The table of export formats and what their writers and loaders share.

A format is data: a check that refuses runs it cannot hold (before anything is written), a writer,
a loader that rebuilds the quantized model exactly as :func:`orthoquant.open_run` does, and optional
extra checks against a stock runtime. Adding a format means registering one :class:`ExportFormat`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Recipe
from ..errors import UserError
from ..models.layout import from_stock
from ..models.loading import build_skeleton, views_of
from ..registry import Registry
from ..runtime import Runtime
from .contents import RunContents
from .shards import DEFAULT_SHARD_BYTES


@dataclass(frozen=True)
class ExportOptions:
    """Settings of one export besides the format.

    :param dtype: dtype of full-precision tensors (and of the scales compressed-tensors stores).
    :param calib: text for static activation scales a stock format needs and a dynamic quantizer
        lacks (compressed-tensors NVFP4 ``input_global_scale``): a source name or file; None takes the
        recipe's calibration source.
    :param calib_samples: calibration windows used for those scales.
    :param max_shard_bytes: size cap of one safetensors shard of a stock checkpoint (one decoder
        layer is never split; a layer larger than the cap gets a shard of its own).
    """

    dtype: torch.dtype
    calib: str | None = None
    calib_samples: int = 16
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


Checker = Callable[[RunContents, torch.dtype], None]
Writer = Callable[[RunContents, Path, ExportOptions], dict[str, Any]]
Loader = Callable[[Path, dict[str, Any], torch.device, torch.dtype], nn.Module]
# (folder, recipe, {linear: (out, in)}, keep) -> state dict; ``keep`` selects tensor names (one layer's)
Decoder = Callable[..., dict[str, torch.Tensor]]
# (export folder, run, reference model, token batches, dtype) -> named check results
StockCheck = Callable[[Path, RunContents, nn.Module, list[torch.Tensor], torch.dtype], dict[str, Any]]


@dataclass(frozen=True)
class ExportFormat:
    """One checkpoint format.

    :param check: raise :class:`~orthoquant.errors.UserError` when the run cannot be written in this format.
    :param write: write the checkpoint into an empty folder; returns extra manifest fields.
    :param load: rebuild the quantized model (online transforms and fake-quant attached) from a checked export.
    :param exact: whether ``load`` reproduces the run's logits bit for bit (else within a tolerance).
    :param stock_checks: reloads through stock runtimes (transformers, gptqmodel), run after writing.
    :param decode: the dense state dict of an export (stock formats), read one layer at a time by the
        streamed verification; None: the export is a run folder (native).
    :param overridable: problems that make the checkpoint serve worse than the run (e.g. a fused group
        split across schemes), refused unless the user passes ``force`` (then logged as warnings).
    :param dtype_checked: whether ``check`` depends on the export dtype (compressed-tensors stores scales
        in it; GPTQ always in float16, native as quantized), so the exportability record checks each dtype.
    """

    name: str
    check: Checker
    write: Writer
    load: Loader
    exact: bool = True
    stock_checks: tuple[StockCheck, ...] = ()
    dtype_checked: bool = False
    decode: Decoder | None = None
    overridable: Callable[[RunContents], list[str]] | None = None


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format")


def dense_reload(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 decode: Decoder) -> nn.Module:
    """The stock model class of an export (its ``quantization_config`` dropped) holding the weights
    ``decode`` reads, with the recipe's online transforms and fake-quant attached
    (:meth:`~orthoquant.runtime.Runtime.load_model`; static KV/input scales are stored tensors).

    :param decode: (folder, recipe, {linear name: (out, in)}) -> full state dict, float32 weights.
    """
    model = export_skeleton(folder, dtype)
    runtime = Runtime.of(model.config, Recipe.from_dict(manifest["recipe"]))
    return runtime.load_model(model, lambda m: _load_decoded(m, folder, runtime.recipe, dtype, decode)).to(device)


def _load_decoded(model: nn.Module, folder: Path, recipe: Recipe, dtype: torch.dtype, decode: Decoder) -> None:
    """Fill ``model`` (orthoquant's layout) with the whole state dict ``decode`` reads from the export."""
    config = model.config
    stock = build_skeleton(config, dtype, layout=False)  # the checkpoint's own names and shapes
    shapes = {n: tuple(m.weight.shape) for root in (stock, model)  # MoE experts: stored per expert, as held
              for n, m in root.named_modules() if isinstance(m, nn.Linear)}
    state, expected = from_stock(decode(folder, recipe, shapes), views_of(config)), model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise UserError(f"{folder} lacks {missing[:3]} of its model class")
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)


def export_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The stock model class of an export on the meta device, its ``quantization_config`` dropped."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return build_skeleton(config, dtype)


def save_hf_config(contents: RunContents, out: Path, dtype: torch.dtype, **extra: Any) -> None:
    """The run's config.json with the export dtype (and e.g. a quantization_config) set."""
    config = contents.config.__class__.from_dict(contents.config.to_dict())
    config.dtype = dtype
    for key, value in extra.items():
        setattr(config, key, value)
    config.save_pretrained(out)


def copy_side_files(contents: RunContents, out: Path) -> None:
    """Tokenizer and generation files, byte for byte."""
    for path in contents.side_files():
        shutil.copyfile(path, out / path.name)
