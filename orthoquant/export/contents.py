"""What every exporter reads from a finished run folder: recipe, config, architecture, transform plan,
and per stored file its quantized linears (unpacked codes and scales) and its other tensors.

Files are read one at a time (the rest file, then each decoder layer), so exporters that write per
file hold about one layer in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import QuantSpec, Recipe
from ..errors import UserError
from ..formats import QParams, QuantizedTensor, make_format
from ..models.spec import ArchSpec
from ..models.generic import spec_for
from ..layerfile import SIDES, is_quant_key, read_module
from ..runfolder import RunFolder
from ..transforms.plan import TransformPlan
from ..transforms.sites import SITES, Dims
from .verify import check_manifest

# Files next to the weights that a Hugging Face loader reads (tokenizer and generation settings).
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass
class QuantizedLinear:
    """One quantized linear as stored in the run; codes are unpacked on first use.

    :param name: full module name, e.g. ``model.layers.3.mlp.down_proj``.
    :param spec: the weight spec that produced the codes.
    :param packed: (out, words) int32 packed codes as stored.
    :param params: scales (out or 1, n_groups), zeros and tensor scale as stored.
    :param g_idx: (in,) group of each column under act-order, else None.
    :param cols: in_features.
    :param transforms: names of the solver's online transform types on this linear, by side.
    """

    name: str
    spec: QuantSpec
    packed: torch.Tensor
    params: QParams
    g_idx: torch.Tensor | None
    cols: int
    transforms: dict[str, str] = field(default_factory=dict)
    _q: QuantizedTensor | None = field(default=None, repr=False)

    @property
    def q(self) -> QuantizedTensor:
        """Unpacked codes (out, in) uint8 with their parameters."""
        if self._q is None:
            codes = make_format(self.spec).unpack(self.packed, self.cols)
            self._q = QuantizedTensor(codes, self.params, self.g_idx)
        return self._q

    def dequantized(self) -> torch.Tensor:
        """(out, in) float32 weight, bit-exact with what the run's model computes with."""
        return make_format(self.spec).dequantize(self.q)


@dataclass
class RunPart:
    """One stored file of the run: ``prefix`` turns its tensor names into full model names."""

    prefix: str
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    metadata: dict[str, str]

    def linears(self) -> Iterator[QuantizedLinear]:
        """The file's quantized linears, codes still packed."""
        t = self.tensors
        for path, info in self.meta.items():
            params = QParams(t[f"{path}.qscale"], t.get(f"{path}.qzero"), t.get(f"{path}.qglobal"))
            yield QuantizedLinear(self.prefix + path, QuantSpec(**info["spec"]), t[f"{path}.qcodes"], params,
                                  t.get(f"{path}.qgidx"), info["cols"], {s: info[s] for s in SIDES if s in info})

    def plain(self) -> dict[str, torch.Tensor]:
        """Full-name tensors that are neither codes/scales nor solver-transform state (norms, biases, embeddings)."""
        transform_prefixes = tuple(f"{p}.{side}." for p in self.meta for side in SIDES)
        return {self.prefix + k: v for k, v in self.tensors.items()
                if not is_quant_key(k) and not k.startswith(transform_prefixes)}


class RunContents:
    """A finished run folder opened for export.

    Every file is checked against its sha256 first: the records in run.json, or for a native export
    its manifest.

    :param run_dir: the folder written by ``orthoquant quantize`` (or a native export).
    :param manifest_checked: ``run_dir`` is a native export whose manifest the caller has checked.
    """

    def __init__(self, run_dir: Path | str, manifest_checked: bool = False) -> None:
        from transformers import AutoConfig

        self.run = RunFolder(run_dir)
        info = self.run.info()
        if info.get("status") != "complete":
            raise UserError(f"run {self.run.path} is not complete; finish it with `orthoquant quantize` first")
        if not self.run.is_export:
            self.run.verify()
        elif not manifest_checked:
            check_manifest(self.run.path)
        self.recipe = Recipe.from_yaml((self.run.path / "recipe.yaml").read_text())
        self.config = AutoConfig.from_pretrained(self.run.path)
        self.run.require_records(int(self.config.num_hidden_layers))
        self.arch: ArchSpec = spec_for(self.config)
        self.plan = TransformPlan(self.recipe.transforms, Dims.of(self.config), self.arch)
        self.n_layers = int(self.config.num_hidden_layers)

    @property
    def path(self) -> Path:
        return self.run.path

    def open_model(self, device: torch.device, dtype: torch.dtype, stream: bool = False):
        """The run's quantized model as :func:`orthoquant.open_run` builds it (files checked above)."""
        from ..pipeline import open_run

        return open_run(self.path, device, dtype, stream=stream, manifest_checked=self.run.is_export)

    def layer_prefix(self, index: int) -> str:
        return f"{self.arch.layers}.{index}."

    def files(self) -> list[tuple[str, Path]]:
        """(name prefix, path) of every stored file: the model-level rest first, then each layer."""
        files = [("", self.run.rest_path)]
        files += [(self.layer_prefix(i), self.run.layer_path(i)) for i in range(self.n_layers)]
        for _, path in files:
            if not path.is_file():
                raise UserError(f"run {self.path} is missing {path.relative_to(self.path)}")
        return files

    def parts(self, progress: str | None = None) -> Iterator[RunPart]:
        """Each stored file, read when reached; with ``progress``, one bar (of that name) over the files."""
        files = list(self.files())
        if progress is not None:
            from tqdm import tqdm

            files = tqdm(files, desc=progress, unit="file")
        for prefix, path in files:
            tensors, meta, metadata = read_module(path)
            yield RunPart(prefix, path, tensors, meta, metadata)

    def online_sites(self) -> list[str]:
        """The recipe's transform sites that run at inference (not fully fused into weights)."""
        return [s for s in self.plan.specs if SITES.get(s).online]

    def stored_dtype(self) -> torch.dtype:
        """The dtype the run stored its full-precision tensors in (that of the embedding)."""
        tensors, _, _ = read_module(self.run.rest_path)
        return tensors[f"{self.arch.embed}.weight"].dtype

    def side_files(self) -> list[Path]:
        """Tokenizer and generation files of the run: regular files only, a symbolic link is never followed."""
        paths = [self.path / name for name in HF_SIDE_FILES]
        return [p for p in paths if p.is_file() and not p.is_symlink()]


def exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every value of ``t`` survives a round trip through ``dtype``."""
    return bool(torch.equal(t.to(dtype).to(t.dtype), t))


def require_scales_in(linear: QuantizedLinear, dtype: torch.dtype, where: str) -> None:
    """Raise a :class:`UserError` unless the linear's scales are exactly representable in ``dtype``."""
    if not exact_in(linear.params.scale, dtype):
        name = str(dtype).removeprefix("torch.")
        raise UserError(
            f"{where} stores the scales of {linear.name} in {name}, but this run's scales "
            f"(weights.scale_dtype={linear.spec.scale_dtype}) are not exactly representable in {name}; "
            f"re-quantize with --set weights.scale_dtype={name} (scales are rounded when quantizing, never at "
            "export), or export with a wider --dtype"
        )
