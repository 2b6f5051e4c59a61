"""Export finished runs as checkpoints (compressed-tensors, GPTQ v1, native) and load them back.

    from orthoquant.export import export_run, load_quantized
    report = export_run("runs/l3-8b", "l3-8b-w4a16", format="compressed-tensors")
    model = load_quantized("l3-8b-w4a16")
"""
from .api import export_run, load_quantized
from .base import EXPORT_FORMATS, ExportFormat, ExportOptions

__all__ = ["export_run", "load_quantized", "EXPORT_FORMATS", "ExportFormat", "ExportOptions"]
