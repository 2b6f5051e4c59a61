"""The generic path: any causal LM without an ArchSpec, found from its module tree.

Weight-only RTN/GPTQ and W8A8 need only three things a module tree shows without knowing the family:
the decoder layers (the ModuleList of identical blocks holding most parameters: ``model.layers``,
``transformer.h``, ``model.decoder.layers``), the linears inside them, and which linears read the same
tensor (they share one Hessian; found by hooks at calibration, see :func:`discover_input_groups`).
Transforms and KV quantization need the roles (q, k, v, o, …) an ArchSpec names, so a generic model
refuses them (:func:`.support.check_support`).

GPT-2's ``Conv1D`` computes ``x W + b`` with W stored (in, out); it is turned into an ``nn.Linear``
holding Wᵀ (:func:`linearize_conv1d_`), so every solver, quantizer and run file sees (out, in); the
checkpoint reader transposes those weights (``ArchSpec.transposed``).
"""
from __future__ import annotations

import functools
import json
from typing import Callable

import torch
from torch import nn

from ..errors import UnknownNameError, UserError
from .experts import unstack_experts_
from .spec import ARCHITECTURES, ArchSpec, dense_mlp_layers, full_support

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - every supported transformers has it
    Conv1D = ()


def _sized(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_layers(model: nn.Module) -> str:
    """Path of the ModuleList of identical blocks that holds the most parameters."""
    candidates = [(path, m) for path, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    if not candidates:
        raise UserError(f"{type(model).__name__} has no list of identical decoder layers (an nn.ModuleList); "
                        "orthoquant cannot quantize it layer by layer")
    return max(candidates, key=lambda c: _sized(c[1]))[0]


def _path_of(model: nn.Module, module: nn.Module | None, what: str) -> str:
    for path, m in model.named_modules():
        if m is module and path:
            return path
    raise UserError(f"{type(model).__name__}: cannot find its {what} in the module tree")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


def _outside(path: str, layers: str) -> bool:
    return path != layers and not path.startswith(layers + ".")


def find_final_norm(model: nn.Module, layers: str) -> str:
    """The one normalization module outside the decoder layers (what the last layer's output passes
    through before lm_head)."""
    norms = [p for p, m in model.named_modules() if _outside(p, layers) and _is_norm(m)]
    if len(norms) != 1:
        raise UserError(f"{type(model).__name__}: expected one final norm outside {layers}, found "
                        f"{norms or 'none'}; the generic path cannot tell what lm_head reads")
    return norms[0]


def rest_modules(model: nn.Module, layers: str) -> tuple[str, ...]:
    """The modules outside the decoder layers that own parameters or buffers (each once, outermost
    first: embeddings, positions, final norm, lm_head, rotary)."""
    owners = {name.rpartition(".")[0]
              for name, _ in [*model.named_parameters(), *model.named_buffers()] if _outside(name, layers)}
    if "" in owners:
        raise UserError(f"{type(model).__name__} holds tensors at its top level; the generic path cannot stream it")
    return tuple(sorted(owners))


def linear_paths(layer: nn.Module) -> tuple[str, ...]:
    """Paths of every nn.Linear inside one decoder layer, in registration order."""
    return tuple(p for p, m in layer.named_modules() if isinstance(m, nn.Linear))


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    if conv.weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
    return linear


def linearize_conv1d_(model: nn.Module) -> tuple[str, ...]:
    """Replace every transformers ``Conv1D`` of ``model`` by the equivalent nn.Linear (weight
    transposed), in place; returns the replaced modules' paths."""
    paths = tuple(p for p, m in model.named_modules() if Conv1D and isinstance(m, Conv1D))
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, _linear_from_conv1d(owner.get_submodule(leaf)))
    return paths


def _rotary(model: nn.Module, layers: str) -> str:
    rotary = [p for p, m in model.named_modules() if _outside(p, layers) and type(m).__name__.endswith("RotaryEmbedding")]
    return rotary[0] if rotary else ""


def generic_spec(model: nn.Module, transposed: tuple[str, ...] = ()) -> ArchSpec:
    """The ArchSpec of a model without a registered one, found from its (linearized) module tree.

    :param transposed: paths of the modules that were Conv1D (from :func:`linearize_conv1d_`).
    """
    layers = find_layers(model)
    embed = _path_of(model, model.get_input_embeddings(), "input embeddings")
    lm_head = _path_of(model, model.get_output_embeddings(), "output embeddings (lm_head)")
    first = model.get_submodule(layers)[0]
    stacked = [n for n, p in first.named_parameters() if p.ndim > 2]
    if stacked:  # transformers 5 MoE experts: leaving them unquantized would be silent, so refuse
        raise UserError(f"{type(model).__name__} keeps weights as stacked (3-D) parameters ({', '.join(stacked[:2])}: "
                        "mixture-of-experts experts), which orthoquant does not quantize yet")
    paths = linear_paths(first)
    if not paths:
        raise UserError(f"{type(model).__name__}: its decoder layers ({layers}) hold no linear layer to quantize")
    return ArchSpec(layers=layers, embed=embed, final_norm=find_final_norm(model, layers), lm_head=lm_head,
                    rotary=_rotary(model, layers), attention="", linears=tuple((p, p) for p in paths),
                    norm_groups=(), generic=True, rest=rest_modules(model, layers), transposed=transposed)


@functools.lru_cache(maxsize=8)
def _spec_of_config_json(config_json: str, model_type: str):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **json.loads(config_json))
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{(config.architectures or [model_type])[0]} is not a causal LM transformers can "
                        f"build ({' '.join(str(e).split())})") from None
    unstack_experts_(model)  # MoE experts as per-expert nn.Linear (a stacked layout is no linear)
    return generic_spec(model, linearize_conv1d_(model))


def generic_spec_for_config(config) -> ArchSpec:
    """The generic spec of a config's model, found on an empty (meta) instance of it."""
    state = config.to_dict()
    model_type = state.pop("model_type", None) or config.model_type
    return _spec_of_config_json(json.dumps(state, sort_keys=True, default=str), model_type)


def spec_for(config) -> ArchSpec:
    """The spec of a transformers config (its ``architectures[0]``); an architecture without a
    registered one (:data:`~orthoquant.models.spec.ARCHITECTURES`) gets the generic spec found here."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise UnknownNameError(f"the model config names no architecture; full support: {', '.join(full_support())}")
    arch = ARCHITECTURES.get(archs[0]) if archs[0] in ARCHITECTURES else None
    if arch is None or (arch.experts is not None and dense_mlp_layers(config)):
        return generic_spec_for_config(config)
    return arch.for_config(config)


def discover_input_groups(linears: dict[str, nn.Linear], forward: Callable[[], object]) -> tuple[tuple[str, ...], ...]:
    """Group linears by the input tensor they read (same tensor object: one Hessian), in the order the
    layer first calls them. ``forward`` runs the layer once."""
    seen: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # holds each input alive so its id() stays unique during the forward

    def hook(name):
        def record(_module, args):
            if name not in seen:
                seen[name] = id(args[0])
                keep.append(args[0])
        return record

    handles = [lin.register_forward_pre_hook(hook(name), prepend=True) for name, lin in linears.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name in seen:  # insertion order: call order
        groups.setdefault(seen[name], []).append(name)
    unseen = [n for n in linears if n not in seen]  # never called (e.g. an unused branch): solved alone
    return tuple(tuple(g) for g in groups.values()) + tuple((n,) for n in unseen)
