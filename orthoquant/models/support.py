"""What a recipe may ask of a model, checked before anything is read or written.

- A generic model (no ArchSpec) takes weight and activation quantization only: transforms, KV-cache
  quantization and fitting need the roles an ArchSpec names. A mixture of experts with some dense MLP
  layers is generic too (one spec names one MLP layout), and the error says so.
- A family whose residual stream cannot take a fused rotation (Gemma's sandwich norms) refuses the
  residual site and R_res, saying why (``ArchSpec.no_residual``).
- S_qk ties the scales of RoPE's channel pairs (i, i + head_dim/2); with partial rotary (Phi-4-mini,
  Phi-1) RoPE pairs other channels, so S_qk would not commute with it and is refused.
"""
from __future__ import annotations

from ..errors import UserError
from .spec import DENSE_MLP_LAYERS, ArchSpec, full_support


def _partial_rotary(config) -> bool:
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    factor = factor if factor is not None else getattr(config, "partial_rotary_factor", 1.0)
    return factor is not None and factor < 1.0


def check_support(arch: ArchSpec, config, recipe) -> None:
    """Raise UserError (exit 2) naming what this model cannot do that ``recipe`` asks for."""
    name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    sites = {t.site for t in recipe.transforms}
    params = set(recipe.fitting.params) if recipe.fitting is not None else set()
    if arch.generic:
        needs = [what for what, present in (("transforms", bool(sites)),
                                            ("KV-cache quantization", recipe.kv_cache is not None),
                                            ("learned fitting", recipe.fitting is not None),
                                            ("learned rounding (refine)", recipe.refine is not None and recipe.refine.iters > 0),
                                            ("QuIP# fine-tuning", recipe.finetune is not None and recipe.finetune.active))
                 if present]
        if needs:
            why = f" ({DENSE_MLP_LAYERS})" if name in full_support() else ""  # a MoE with dense layers: spec_for
            raise UserError(f"the recipe asks for {' and '.join(needs)}, which need an architecture spec {name} "
                            f"lacks{why} (no arch spec: only weight-only RTN/GPTQ and W8A8 run on it); full support: "
                            f"{', '.join(full_support())}")
    if arch.no_residual and ("residual" in sites or "R_res" in params):
        raise UserError(f"{name}: the recipe rotates the residual stream, which is refused: {arch.no_residual}")
    if "S_qk" in params and _partial_rotary(config):
        raise UserError(f"{name} rotates only part of each head (partial_rotary_factor < 1), so S_qk's RoPE-paired "
                        "scales do not commute with its RoPE; drop S_qk from fitting.params")
