"""Online transforms in compressed-tensors' ``transform_config``: only the subset vLLM applies.

vLLM (``compressed_tensors/transform/linear.py``) applies online transforms on a Linear's input or
output, of type ``hadamard`` (Sylvester, power-of-two size, optionally block-diagonal via
``head_dim``), and requires the Linear to have no bias. Our recipe sites map onto that as:

| site        | CT scheme | target          | condition                                       |
|-------------|-----------|-----------------|-------------------------------------------------|
| down_input  | R4        | mlp.down_proj   | kind ``hadamard`` (no signs), power-of-two block |

Everything else online (o_input mixes across heads, qk acts after RoPE, random signs, solver
transforms such as WUSH blocks) has no vLLM equivalent and is refused, pointing to the native format.
Stock transformers ignores ``transform_config`` on load; :func:`apply_online` is the fix used by
the reload checks.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from ...hadamard import is_pow2
from ...transforms.sites import SITES
from ..contents import RunContents
from .schemes import refuse

# site -> (CT scheme name, role of the linear whose input it transforms)
CT_INPUT_SITES = {"down_input": ("R4", "down")}


def online_transform_config(contents: RunContents):
    """The TransformConfig of the run's online transforms (None when every transform is fused).

    :raises UserError: for an online transform outside the vLLM subset.
    """
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    groups = {}
    for site in contents.online_sites():
        if site not in CT_INPUT_SITES:
            refuse(f"the online transform at site '{site}' is not a Hadamard on a Linear's input or output")
        spec, width = contents.plan.specs[site], SITES.get(site).width(contents.plan.dims)
        block = spec.block_size or width
        if spec.kind != "hadamard":
            refuse(f"site '{site}' uses kind={spec.kind}: vLLM applies only unsigned (±1) Sylvester Hadamards")
        if not is_pow2(block):
            refuse(f"site '{site}' needs a Hadamard of size {block}, not a power of two (set its block_size)")
        name, role = CT_INPUT_SITES[site]
        if len(contents.arch.roles(role)) != 1:  # a mixture of experts: one per expert, stacked in stock models
            refuse(f"site '{site}' transforms the input of every expert's {role}_proj, and compressed-tensors "
                   "transforms apply to Linear modules, not to fused-MoE experts; export with --format native")
        _require_no_bias(contents, role, site)
        path = contents.arch.path(role)
        groups[name] = TransformScheme(
            type="hadamard", head_dim=block if block != width else None,
            apply=[TransformArgs(targets=[f"re:.*{re.escape(path)}$"], location="input")])
    return TransformConfig(config_groups=groups) if groups else None


def _require_no_bias(contents: RunContents, role: str, site: str) -> None:
    bias = {"down": "mlp_bias", "o": "attention_bias"}.get(role)
    if bias and getattr(contents.config, bias, False):
        refuse(f"site '{site}' transforms the input of a Linear with a bias, which vLLM does not support")


def online_only(config):
    """A copy of a TransformConfig keeping only online applications (weights are already fused)."""
    config = config.model_copy(deep=True)
    for scheme in config.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.is_online()]
    config.config_groups = {k: s for k, s in config.config_groups.items() if s.apply}
    return config


def apply_online(model: nn.Module, folder: Path) -> bool:
    """Apply a checkpoint's online CT transforms to a model stock transformers loaded (it drops them).

    The transform weights are rebuilt by CT from the scheme (type ``hadamard`` is deterministic).
    :returns: True when there was anything to apply.
    """
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    qconfig = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    raw = qconfig.get("transform_config") or {}
    if not raw.get("config_groups"):
        return False
    apply_transform_config(model, online_only(TransformConfig.model_validate(raw)))
    return True
