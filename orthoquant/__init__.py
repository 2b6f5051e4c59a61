"""orthoquant: post-training quantization of causal LMs with Hadamard, WUSH and learned transforms."""
__version__ = "0.1.0"

from .config import Recipe, load_recipe  # noqa: E402
from .pipeline import open_run, quantize, quantize_pretrained  # noqa: E402
from .export import load_quantized  # noqa: E402
from .export import export_run  # noqa: E402
from .data import calibration_windows  # noqa: E402

__all__ = ["Recipe", "load_recipe", "quantize", "quantize_pretrained", "open_run", "load_quantized", "__version__"]
__all__ += ["export_run", "calibration_windows"]
