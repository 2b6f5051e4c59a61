"""The fit checkpoint as safetensors plus JSON: never a pickle, so a planted file cannot run code.

A checkpoint is the dict ``{"step", "losses", "complete", "params", "optimizer"}`` (``params`` the
learned parameters' state dict, ``optimizer`` the optimiser's). Its tensors are stored as
safetensors entries (``params.<name>``, ``optimizer.<index>.<name>``); everything else (step, losses,
the optimiser's param groups and its non-tensor state such as geoopt's integer step) is one JSON
document in the file's metadata. Python's JSON writes floats by ``repr``, which reads back to the
same double, so a resumed fit continues bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import UserError

_META_KEY = "orthoquant.fit"
_PARAMS, _OPTIMIZER = "params.", "optimizer."


def write_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (see the module docstring) to ``path`` as one safetensors file."""
    tensors = {_PARAMS + k: v for k, v in state["params"].items()}
    plain: dict[str, dict] = {}
    for index, param_state in state["optimizer"]["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{_OPTIMIZER}{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    meta = {"step": state["step"], "losses": state["losses"], "complete": state["complete"],
            "param_groups": state["optimizer"]["param_groups"], "plain_state": plain}
    # copies on the CPU: safetensors refuses tensors that share storage, and these are small
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(path),
              metadata={_META_KEY: json.dumps(meta)})


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The state written by :func:`write_checkpoint`; anything else (a pickle, a truncated or foreign
    file) is a :class:`UserError` naming the file, and no code in it runs."""
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {})[_META_KEY])
        optimizer = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith(_OPTIMIZER):
                index, name = key[len(_OPTIMIZER):].split(".", 1)
                optimizer["state"].setdefault(int(index), {})[name] = value
        for index, values in meta["plain_state"].items():
            optimizer["state"].setdefault(int(index), {}).update(values)
        params = {k[len(_PARAMS):]: v for k, v in tensors.items() if k.startswith(_PARAMS)}
        return {"step": int(meta["step"]), "losses": meta["losses"], "complete": bool(meta["complete"]),
                "params": params, "optimizer": optimizer}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a valid fit checkpoint ({type(e).__name__}: {e}); "
                        "delete it to fit from the start") from None
