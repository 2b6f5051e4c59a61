"""The safetensors file of one stored module (a decoder layer, or the model-level rest): packed codes
and scales of each quantized linear with its spec in the file's metadata, the solver's online
transforms, and every other tensor of the module as is. Run folders and native exports hold them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import QuantSpec
from .errors import UserError
from .formats import QParams, QuantizedTensor, make_format
from .integrity import atomic_write
from .models.checkpoint import read_header
from .transforms.base import Transform
from .transforms.serialize import transform_from_state, transform_state

_QUANT_KEY = "orthoquant.quantized"


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
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


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
    solver's online transforms, to be attached with :func:`orthoquant.runtime.attach_solved`."""
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
