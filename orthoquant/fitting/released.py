"""Released transform files of the papers, imported as our transforms (no refitting).

- SpinQuant ``R.bin`` (``optimize_rotation.py``): ``{"R1": (d, d), "model.layers.{i}.self_attn.R2":
  (head_dim, head_dim)}``, both in the row convention ``x → x R`` (readers take ``W R``): R1 is the
  residual rotation, R2 the attn_value rotation shared by the heads.
- OSTQuant (``ost_train.py`` saves its trainable parameters): ``R_res.weight`` and, per layer,
  ``model.layers.{i}.R_S_modules.{S_norm_qkv, S_norm_upgate, S_qk, S_ov, S_up_down}.weight`` and
  ``....R_ov.weight.{kv head}``. Its scales are divisors of the activations (norm γ / s, v rows / s,
  up rows / s) except S_qk, which multiplies keys; its deployment scales v before rotating it by R_ov.

OSTQuant applies S_qk before RoPE without tying RoPE pairs (its issue #21): such scales are kept as
released — the deployed model then reproduces the paper's, which is not equivalent to full precision
— and a warning says so. Its S_up_down is folded where it is exact (before the down_proj Hadamard).
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from ..models.spec import ArchSpec
from ..transforms.base import BlockDense, Composed, Dense, Diagonal, Transform
from ..transforms.plan import GLOBAL
from ..transforms.sites import Dims

log = logging.getLogger(__name__)
Learned = dict[tuple[str, int], Transform]
_OST_KEY = re.compile(r"layers\.(\d+)\.R_S_modules\.(\w+)\.weight(?:\.(\d+))?$")
_SPIN_KEY = re.compile(r"layers\.(\d+)\.self_attn\.R2$")


def _rotation(m: torch.Tensor) -> Dense:
    return Dense(m.double(), orthogonal=True)


def spinquant_transforms(state: dict[str, torch.Tensor]) -> Learned:
    """SpinQuant's R1 / R2 as residual and attn_value rotations."""
    out: Learned = {("residual", GLOBAL): _rotation(state["R1"])}
    for key, value in state.items():
        if m := _SPIN_KEY.search(key):
            out[("attn_value", int(m.group(1)))] = _rotation(value)
    return out


def _ost_layers(state: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: name -> tensor, with R_ov's per-head list stacked into (kv_heads, hd, hd)."""
    layers: dict[int, dict[str, list]] = {}
    for key, value in state.items():
        if m := _OST_KEY.search(key):
            entry = layers.setdefault(int(m.group(1)), {}).setdefault(m.group(2), [])
            entry.append((int(m.group(3) or 0), value.double()))
    return {i: {name: torch.stack([v for _, v in sorted(vals)]) if name == "R_ov" else vals[0][1]
                for name, vals in entry.items()} for i, entry in layers.items()}


def _warn_untied(s_qk: torch.Tensor, dims: Dims, index: int) -> None:
    half = s_qk.reshape(-1, dims.head_dim).split(dims.head_dim // 2, dim=-1)
    if not torch.equal(half[0], half[1]):
        log.warning("layer %d: OSTQuant's S_qk differs within RoPE pairs; kept as released, so the model "
                    "is not function-preserving (as the paper's own deployment)", index)


def ostquant_layer(params: dict[str, torch.Tensor], dims: Dims, index: int) -> dict[str, Transform]:
    """Site -> transform of one layer's OSTQuant parameters."""
    out: dict[str, Transform] = {}
    for name, site in (("S_norm_qkv", "attn_norm"), ("S_norm_upgate", "mlp_norm"), ("S_up_down", "up_down")):
        if name in params:
            out[site] = Diagonal(1 / params[name])
    if "S_qk" in params:
        _warn_untied(params["S_qk"], dims, index)
        out["qk_scale"] = Diagonal(params["S_qk"])
    ov = [t for t in (Diagonal(1 / params["S_ov"]) if "S_ov" in params else None,
                      BlockDense(params["R_ov"], orthogonal=True) if "R_ov" in params else None) if t is not None]
    if ov:
        out["attn_value"] = ov[0] if len(ov) == 1 else Composed(*ov)
    return out


def ostquant_transforms(state: dict[str, torch.Tensor], dims: Dims) -> Learned:
    out: Learned = {}
    for key, value in state.items():
        if key.endswith("R_res.weight"):
            out[("residual", GLOBAL)] = _rotation(value)
    for index, params in sorted(_ost_layers(state).items()):
        out.update({(site, index): t for site, t in ostquant_layer(params, dims, index).items()})
    return out


def import_released(path: Path, dims: Dims, arch: ArchSpec, n_layers: int) -> Learned:
    """The transforms of a released SpinQuant or OSTQuant file, keyed as the plan expects."""
    if not path.is_file():
        raise UserError(f"fitting.released: {path} does not exist")
    try:  # the papers release torch.save files: read them without unpickling anything but tensors
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"fitting.released: {path} is not a plain tensor file; refused (it holds objects "
                        "other than tensors, and unpickling them could run code)") from None
    except (RuntimeError, EOFError, ValueError) as e:  # truncated or not a torch file
        raise UserError(f"fitting.released: {path} is not a plain tensor file; refused ({e})") from None
    if not isinstance(state, dict):
        raise UserError(f"fitting.released: {path} holds a {type(state).__name__}, not a dict of tensors")
    if "R1" in state:
        learned = spinquant_transforms(state)
    elif any(k.endswith("R_res.weight") or _OST_KEY.search(k) for k in state):
        if arch.qk_norms is not None and any(".S_qk." in k for k in state):
            raise ConfigError("OSTQuant's S_qk scales q/k rows, which Qwen3's q/k norms undo; "
                              "this file does not fit the model")
        learned = ostquant_transforms(state, dims)
    else:
        raise UserError(f"{path} holds neither SpinQuant's R1/R2 nor OSTQuant's R_res/R_S_modules")
    bad = sorted({i for _, i in learned if i >= n_layers})
    if bad:
        raise UserError(f"{path} has transforms for layers {bad}, but the model has {n_layers} layers")
    log.info("imported %d transforms from %s", len(learned), path)
    return learned
