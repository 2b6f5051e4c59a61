"""End-to-end fitting of learnable transforms (OSTQuant, SpinQuant): losses, the loop, QSUR and
imports of released matrices. :func:`fit_transforms` is what the pipeline calls."""
from .fit import deploy, fit_transforms, prepare_session

__all__ = ["deploy", "fit_transforms", "prepare_session"]
