"""Device and dtype choice. The only module that names CUDA."""
from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None picks CUDA when present. Asking for absent CUDA is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device, config_dtype: torch.dtype | None = None) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 matmuls are slow there) and the checkpoint's dtype on CUDA."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if isinstance(config_dtype, str):
            config_dtype = DTYPES.get(config_dtype)
        return config_dtype or torch.bfloat16
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on an accelerator since the last reset, None on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
