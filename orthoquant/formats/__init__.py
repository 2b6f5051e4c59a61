"""Number formats; importing this package registers every format in :data:`FORMATS`."""
from . import fp4, fp8, integer, lattice  # noqa: F401
from .base import FORMATS, QParams, QuantFormat, QuantizedTensor, make_format

__all__ = ["FORMATS", "QParams", "QuantFormat", "QuantizedTensor", "make_format"]
