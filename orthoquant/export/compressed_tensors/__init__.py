"""The compressed-tensors export format (registered on import)."""
from . import writer  # noqa: F401
