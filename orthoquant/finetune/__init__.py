"""QuIP#'s fine-tuning of what quantization leaves continuous: in-layer (:mod:`.layer`) and end to end
(:mod:`.e2e`), both through the block-reconstruction mechanism of :mod:`orthoquant.refine.reconstruct`.

Only what the validate step needs (:func:`check_recipe`) is imported here, so checking a recipe loads
no training code.
"""
from __future__ import annotations

from ..errors import ConfigError

# Solvers whose linears carry QuIP#'s sign vectors SU/SV (the randomized Hadamard on both sides).
SIGNED_SOLVERS = ("quip-rtn", "quip-gptq", "quip-ldlq", "quip-ldlq-tune")


def check_recipe(recipe) -> None:
    """Raise :class:`ConfigError` when ``recipe`` asks for fine-tuning it cannot have."""
    if recipe.weights is None:
        raise ConfigError("finetune needs quantized weights: set a weights section")
    if recipe.calibration.nsamples < 2:
        raise ConfigError(f"finetune with calibration.nsamples={recipe.calibration.nsamples}: fine-tuning holds "
                          "sequences out for selection, it needs at least 2")
    if recipe.solver.name not in SIGNED_SOLVERS:
        raise ConfigError(f"finetune with solver.name={recipe.solver.name!r}: fine-tuning trains QuIP#'s sign "
                          f"vectors, choose one of {list(SIGNED_SOLVERS)}")
