"""orthoquant: post-training quantization of causal LMs with Hadamard, WUSH and learned transforms.

The public names load on first use (PEP 562 ``__getattr__``): ``import orthoquant`` and the command
line's ``--help``, ``--version`` and ``recipes`` then start without importing torch or transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name -> the module defining it (imported when the name is first used)
_LAZY = {
    "Recipe": "orthoquant.config", "load_recipe": "orthoquant.recipes",
    "open_run": "orthoquant.pipeline", "quantize": "orthoquant.pipeline",
    "quantize_pretrained": "orthoquant.pipeline", "load_quantized": "orthoquant.export",
    "export_run": "orthoquant.export", "calibration_windows": "orthoquant.data",
}

__all__ = ["Recipe", "load_recipe", "quantize", "quantize_pretrained", "open_run", "load_quantized",
           "export_run", "calibration_windows", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'orthoquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # cached: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
