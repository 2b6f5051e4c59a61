"""The run folder: recipe, per-layer quantized state, metrics and status.

It is the resume checkpoint (a rerun skips finished layers) and holds everything needed to rebuild
the quantized model: packed codes and scales of each quantized linear, every other parameter as is.

    RUN/run.json           fingerprint (model, recipe), status: running | complete
    RUN/recipe.yaml        the recipe, for people
    RUN/rest.safetensors   embeddings, final norm, lm_head (after folding / transforms)
    RUN/layers/00012.safetensors
    RUN/metrics.json       per-layer solver losses and timings

Every file is written to a temporary name and renamed, so a crash never leaves a file that looks whole.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import QuantSpec
from .errors import UserError
from .formats import QParams, QuantizedTensor, make_format
from .models.checkpoint import read_header
from .transforms.base import Transform
from .transforms.serialize import transform_from_state, transform_state

_QUANT_KEY = "orthoquant.quantized"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True)))


class RunFolder:
    """A run's folder on disk; see the module docstring for the layout."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    def info(self) -> dict[str, Any]:
        if not self.info_path.is_file():
            raise UserError(f"{self.path} is not an orthoquant run folder (no run.json)")
        return json.loads(self.info_path.read_text())

    def start(self, fingerprint: dict[str, Any], recipe_yaml: str) -> bool:
        """Create the folder, or check it belongs to the same run. Returns True if already complete."""
        if self.info_path.is_file():
            info = self.info()
            if info["fingerprint"] != fingerprint:
                raise UserError(
                    f"output folder {self.path} holds a different run (model or recipe differ); "
                    "choose another --out or delete it"
                )
            return info["status"] == "complete"
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"output folder {self.path} is not empty and holds no orthoquant run")
        (self.path / "layers").mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "recipe.yaml", lambda p: p.write_text(recipe_yaml))
        write_json(self.info_path, {"fingerprint": fingerprint, "status": "running"})
        return False

    def finish(self, extra: dict[str, Any]) -> None:
        write_json(self.info_path, {**self.info(), **extra, "status": "complete"})

    def layer_path(self, index: int) -> Path:
        return self.path / "layers" / f"{index:05d}.safetensors"

    @property
    def rest_path(self) -> Path:
        return self.path / "rest.safetensors"


@dataclasses.dataclass
class SolvedLinear:
    """A quantized linear as stored: codes, the spec that made them, and its online transforms."""

    qweight: QuantizedTensor
    spec: QuantSpec
    input_transform: Transform | None = None
    output_transform: Transform | None = None


SIDES = ("input_transform", "output_transform")


def module_state(module: nn.Module, quantized: dict[str, SolvedLinear],
                 exclude: str | None = None) -> tuple[dict, dict]:
    """Tensors and metadata describing ``module``: packed codes for quantized linears, all else as is.

    :param quantized: linear path (relative to ``module``) -> what its solver produced.
    :param exclude: a name prefix whose tensors are left out (the decoder layers, saved apart).
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for path, solved in quantized.items():
        q, spec = solved.qweight, solved.spec
        fmt = make_format(spec)
        tensors[f"{path}.qcodes"] = fmt.pack(q.codes)
        tensors[f"{path}.qscale"] = q.params.scale
        for key, value in (("qzero", q.params.zero), ("qglobal", q.params.global_scale), ("qgidx", q.g_idx)):
            if value is not None:
                tensors[f"{path}.{key}"] = value
        meta[path] = {"spec": dataclasses.asdict(spec), "cols": q.codes.shape[-1]}
        for side in SIDES:
            t = getattr(solved, side)
            if t is not None:
                state, name = transform_state(t, f"{path}.{side}")
                tensors.update(state)
                meta[path][side] = name
    skip = {f"{p}.weight" for p in quantized}
    for name, t in module.state_dict().items():
        if name not in skip and not (exclude and name.startswith(exclude)):
            tensors[name] = t
    return tensors, meta


def save_module(path: Path, module: nn.Module, quantized: dict[str, SolvedLinear],
                extra_meta: dict[str, str] | None = None, exclude: str | None = None) -> None:
    tensors, meta = module_state(module, quantized, exclude)
    metadata = {_QUANT_KEY: json.dumps(meta), **(extra_meta or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_module(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """Raw tensors, quantization metadata and the file's other metadata."""
    read_header(path)  # verified first: a truncated, corrupt or foreign file is an error naming it
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return tensors, json.loads(metadata.get(_QUANT_KEY, "{}")), metadata


def dequantized_weights(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """path.weight -> float32 weight decoded from the stored codes (bit-exact with quantization)."""
    weights = {}
    for path, info in meta.items():
        fmt = make_format(QuantSpec(**info["spec"]))
        codes = fmt.unpack(tensors[f"{path}.qcodes"], info["cols"])
        params = QParams(tensors[f"{path}.qscale"], tensors.get(f"{path}.qzero"), tensors.get(f"{path}.qglobal"))
        weights[f"{path}.weight"] = fmt.dequantize(QuantizedTensor(codes, params, tensors.get(f"{path}.qgidx")))
    return weights


Transforms = dict[str, dict[str, Transform]]


def decoded_state(path: Path) -> tuple[dict[str, torch.Tensor], Transforms]:
    """The state dict stored in ``path`` with quantized weights decoded, and the solver's online
    transforms (linear path -> side -> transform)."""
    tensors, meta, _ = read_module(path)
    transforms: Transforms = {}
    for linear, info in meta.items():
        for side in SIDES:
            if side in info:
                transforms.setdefault(linear, {})[side] = transform_from_state(info[side], tensors, f"{linear}.{side}")
    prefixes = tuple(f"{linear}.{side}." for linear in meta for side in SIDES)
    state = {k: v for k, v in tensors.items() if not is_quant_key(k) and not k.startswith(prefixes)}
    state.update(dequantized_weights(tensors, meta))
    return state, transforms


def load_module(path: Path, module: nn.Module, device: torch.device | str = "cpu") -> Transforms:
    """Fill ``module`` (possibly on meta) from a file written by :func:`save_module`; returns the
    solver's online transforms, to be attached with :func:`orthoquant.runner.attach_solved`."""
    state, transforms = decoded_state(path)
    expected = set(module.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"{path} does not match the model: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    dtypes = {k: v.dtype for k, v in module.state_dict().items()}
    module.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, assign=True)
    module.to(device)
    return transforms


def is_quant_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("qcodes", "qscale", "qzero", "qglobal", "qgidx")
