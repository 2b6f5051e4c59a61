"""Stored tensor names -> the names of orthoquant's modules, through transformers' own checkpoint conversion.

transformers 5 loads hub checkpoints through a per-model-type list of transforms
(``transformers.conversion_mapping.get_checkpoint_conversion_mapping``): ``WeightRenaming``s (a name
pattern -> a name) and ``WeightConverter``s (several stored tensors -> one, e.g. every expert's
``w1``/``w3`` stacked and concatenated into ``experts.gate_up_proj``). orthoquant reads tensors one by
one through its verified reader and holds experts per expert (:mod:`.experts`), so it takes from that list:

- every renaming, applied as transformers applies them (``apply_renamings``): Mixtral's
  ``block_sparse_moe.`` is ``mlp.``;
- of each stacking converter whose operations it understands (``MergeModulelist(0)``, then
  ``Concatenate(1)`` of its sources in order), only which stored leaf becomes which part of the stacked
  tensor: Mixtral's ``experts.N.w1``/``w3`` are the first/second half of ``gate_up_proj``, i.e.
  orthoquant's ``experts.N.gate_proj``/``up_proj``; ``w2`` is ``down_proj``. No tensor is stacked.

Exports write the other way (:func:`checkpoint_name_mapping`): each renaming reversed as transformers'
``save_pretrained`` reverses it (``WeightTransform.reverse_transform``, last first), so a Mixtral export is
stored under the hub's (and vLLM's) ``block_sparse_moe.experts.N.w1`` names, which stock transformers reads;
Qwen3-MoE's names are its own. :func:`by_module` carries a ``.weight`` name mapping over to every tensor
of that module (compressed-tensors' ``weight_packed``, ``weight_scale``...).

A model type transformers has no mapping for (or a transformers without ``conversion_mapping``, 4.x,
which pyproject still admits) falls back to :data:`_FALLBACK`, the hand table of Mixtral's names that
orthoquant used before; no supported architecture needs it with transformers 5. Exports of such a type keep
orthoquant's names.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable

from .experts import STACKED_PARTS

# Mixtral's per-expert names, for a model type transformers has no conversion mapping for
_FALLBACK = ((re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
             (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
             (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
             (re.compile(r"\.block_sparse_moe\.gate\."), r".mlp.gate."))
# a converter source of one stored expert leaf: ``<head>*.<leaf>.weight`` (``*`` the expert's index)
_EXPERT_SOURCE = re.compile(r"(?P<head>[\w.]*)\*\.(?P<leaf>\w+)\.weight")


def _fallback(key: str) -> str:
    for pattern, name in _FALLBACK:
        if pattern.search(key):
            return pattern.sub(name, key)
    return key


def _transformers_mapping(model_type: str | None) -> list | None:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: no conversion mapping
        return None
    return get_checkpoint_conversion_mapping(model_type) if model_type else None


def _stacks_in_order(converter) -> bool:
    """Whether ``converter`` stacks each source over the experts (dim 0), then concatenates the sources
    in their listed order (dim 1): the only form whose parts map to orthoquant's per-expert leaves."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", ()))
    kinds = [(type(op), op.dim) for op in ops]
    expected = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(converter.source_patterns) > 1 else [])
    return kinds == expected


def _expert_renamings(converter) -> list:
    """Stored expert leaf -> orthoquant's per-expert leaf, as ``WeightRenaming``s (``w1`` -> ``gate_proj``)."""
    from transformers.core_model_loading import WeightRenaming

    stacked = converter.target_patterns[0].rsplit(".", 1)[-1]
    parts = STACKED_PARTS.get(stacked, ())
    sources = [_EXPERT_SOURCE.fullmatch(s) for s in converter.source_patterns]
    if len(sources) != len(parts) or not all(sources) or not _stacks_in_order(converter):
        return []
    return [WeightRenaming(rf"{m['head']}(\d+)\.{m['leaf']}\.weight", rf"{m['head']}\1.{ours}.weight")
            for m, ours in zip(sources, parts) if m["leaf"] != ours]


def _read_renamings(model_type: str | None) -> list | None:
    """transformers' renamings for ``model_type``, then its stacked experts' leaves as per-expert renamings;
    None where transformers has no mapping for it."""
    mapping = _transformers_mapping(model_type)
    if mapping is None:
        return None
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    return renamings + [r for t in mapping if isinstance(t, WeightConverter) for r in _expert_renamings(t)]


@lru_cache(maxsize=None)
def stored_name_mapping(model_type: str | None) -> Callable[[str], str]:
    """Stored tensor name -> orthoquant's name for checkpoints of ``model_type`` (a config's ``model_type``)."""
    renamings = _read_renamings(model_type)
    if renamings is None:
        return _fallback
    from transformers.core_model_loading import apply_renamings

    return lambda key: apply_renamings(key, renamings)


@lru_cache(maxsize=None)
def checkpoint_name_mapping(model_type: str | None) -> Callable[[str], str]:
    """orthoquant's tensor name -> the name ``model_type``'s stock loader reads (the reverse of
    :func:`stored_name_mapping`); raises where that name does not read back as ``key``."""
    renamings = _read_renamings(model_type)
    if renamings is None:
        return lambda key: key
    from transformers.core_model_loading import apply_renamings

    reverse = [r.reverse_transform() for r in renamings[::-1]]
    read = stored_name_mapping(model_type)

    def stored(key: str) -> str:
        name = apply_renamings(key, reverse)
        if read(name) != key:  # renamings that chain or merge names have no reverse
            raise RuntimeError(f"{key}: its {model_type} checkpoint name {name} reads back as {read(name)}")
        return name
    return stored


def by_module(rename: Callable[[str], str]) -> Callable[[str], str]:
    """``rename`` (a mapping of ``<module>.weight`` names) applied to any tensor of a module, under its own
    leaf: compressed-tensors' ``<module>.weight_packed`` moves with ``<module>.weight``."""
    def renamed(key: str) -> str:
        module, _, leaf = key.rpartition(".")
        if not module:
            return key
        moved = rename(f"{module}.weight")
        return f"{moved[: -len('.weight')]}.{leaf}" if moved.endswith(".weight") else key
    return renamed


def renamed_stored(entries: dict, model_type: str | None) -> dict:
    """``entries`` (stored name -> anything) under orthoquant's names for ``model_type``'s checkpoints."""
    rename = stored_name_mapping(model_type)
    return {rename(key): entry for key, entry in entries.items()}
