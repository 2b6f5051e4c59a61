"""The table of export formats and what their writers and loaders share.

A format is data: a check that refuses runs it cannot hold (before anything is written), a writer,
a loader that rebuilds the quantized model exactly as :func:`orthoquant.open_run` does, and optional
extra checks against a stock runtime. Adding a format means registering one :class:`ExportFormat`.
"""
from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import Recipe
from ..errors import UserError
from ..fakequant.attention import use_orthoquant_attention
from ..fakequant.install import prepare_layer_scales
from ..models.checkpoint import open_checkpoint, read_entry
from ..models.layout import from_stock
from ..models.loading import build_skeleton, views_of
from ..models.generic import spec_for
from ..models.surgery import layers_of
from ..registry import Registry
from ..runner import install_runtime
from ..transforms.plan import TransformPlan
from ..transforms.sites import Dims
from .contents import RunContents


# Shards of stock checkpoints are written whole, so this bounds the memory an export holds.
DEFAULT_SHARD_BYTES = 5 * 10**9
INDEX = "model.safetensors.index.json"


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


def attach_runtime(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Install the recipe's online transforms and activation/KV fake-quant on a model whose weights are
    already the run's (fused, dequantized) weights, the same way a run folder is reopened."""
    arch = spec_for(model.config)
    plan = TransformPlan(recipe.transforms, Dims.of(model.config), arch)
    for index, layer in enumerate(layers_of(model, arch)):
        install_runtime(layer, index, arch, recipe, plan, {})
    use_orthoquant_attention(model)
    return model.eval()


def dense_reload(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 decode: Decoder) -> nn.Module:
    """The stock model class of an export (its ``quantization_config`` dropped) holding the weights
    ``decode`` reads, with the recipe's online transforms and fake-quant attached.

    :param decode: (folder, recipe, {linear name: (out, in)}) -> full state dict, float32 weights.
    """
    model = export_skeleton(folder, dtype)
    recipe = Recipe.from_dict(manifest["recipe"])
    arch = spec_for(model.config)
    for index, layer in enumerate(layers_of(model, arch)):  # static KV/input scales are stored tensors
        prepare_layer_scales(layer, f"{arch.layers}.{index}.", arch, recipe)
    config = model.config
    stock = build_skeleton(config, dtype, layout=False)  # the checkpoint's own names and shapes
    shapes = {n: tuple(m.weight.shape) for root in (stock, model)  # MoE experts: stored per expert, as held
              for n, m in root.named_modules() if isinstance(m, nn.Linear)}
    state, expected = from_stock(decode(folder, recipe, shapes), views_of(config)), model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise UserError(f"{folder} lacks {missing[:3]} of its model class")
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)
    return attach_runtime(model, recipe).to(device)


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


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports (unexpected CT keys such as input_global_scale) and warnings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


class ShardWriter:
    """Writes a checkpoint's tensors into safetensors shards as they are produced, one group (a run
    file: a decoder layer, or the model-level rest) at a time, so that an export holds about one
    shard. Files are named as Hugging Face names them: ``model.safetensors`` when one shard holds
    everything, else ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``.

    :param max_bytes: a shard is written when the next group would take it past this size; a group
        is never split, so a group larger than ``max_bytes`` gets a shard of its own.
    """

    def __init__(self, out: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if max_bytes <= 0:
            raise UserError(f"the maximum shard size must be positive, got {max_bytes} bytes")
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []  # temporary file, its keys, its tensor bytes
        self.keys: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one group of tensors (full names); writes the pending shard first if the group would
        overflow it."""
        repeated = self.keys & tensors.keys()
        if repeated:
            raise ValueError(f"tensors written twice: {sorted(repeated)[:3]}")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.keys |= tensors.keys()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        """Write the pending tensors as one shard (under a temporary name until :meth:`finish`)."""
        if not self.pending:
            return
        path = self.out / f"shard-{len(self.written):05d}.safetensors.partial"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending, name the shards and write the index; returns the shard file names."""
        self.flush()
        if len(self.written) == 1:
            self.written[0][0].replace(self.out / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (path, keys, _) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            path.replace(self.out / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": sum(size for *_, size in self.written)}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names


def read_tensors(folder: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint (``keep``: only the names it accepts, the
    others are never read), its headers verified and its shard names confined to ``folder``
    (:func:`~orthoquant.models.checkpoint.open_checkpoint`)."""
    return {key: read_entry(entry) for key, entry in open_checkpoint(folder).items() if keep is None or keep(key)}


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype``; integer ones (codes, indices) untouched."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
