"""The quantized linears of one run file compressed into compressed-tensors' tensors.

:func:`_quantization_config` is the whole model's CT config: one group per distinct (weights, inputs) scheme,
every other Linear ignored, the KV-cache scheme. :class:`PartCompressor` builds one run file's linears as a bare
module tree holding the run's dequantized weights, lets the compressed-tensors library attach its schemes (and
the vLLM subset of online transforms) and compress them, checks that its codes are ours and keeps ours
(:func:`~.schemes.store_codes`).
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from ...fakequant.static_inputs import is_static_input
from ...models.loading import build_skeleton
from ..base import ExportOptions
from ..contents import QuantizedLinear, RunContents
from .checks import planned_linears
from .schemes import enum_value, input_args, kv_cache_args, scheme_key, set_weight_params, store_codes, weight_args
from .static_scales import input_global_scale, static_input_amax
from .transforms import online_transform_config


def _scheme_groups(contents: RunContents) -> list[tuple[dict, dict | None, list[str]]]:
    """(weight args, input args, linear names) of each distinct scheme of the planned linears, in order."""
    groups: dict[str, tuple[dict, dict | None, list[str]]] = {}
    for name, spec in planned_linears(contents).items():
        w, a = weight_args(spec), input_args(contents.recipe.activations_for(name))
        groups.setdefault(scheme_key(w, a), (w, a, []))[2].append(name)
    return list(groups.values())


def _quantization_config(contents: RunContents):
    """The whole model's CT config (one group per distinct (weights, inputs) scheme, its CT format set;
    every other Linear of the model ignored; the KV-cache scheme) and each quantized linear's group."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    specs, groups = planned_linears(contents), _scheme_groups(contents)
    skeleton = build_skeleton(contents.config, torch.float32)  # meta: names only
    others = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in specs]
    single = len(groups) == 1
    config_groups, group_of = {}, {}
    for i, (w, a, names) in enumerate(groups):
        scheme = QuantizationScheme(targets=["Linear"] if single else names, weights=QuantizationArgs(**w),
                                    input_activations=QuantizationArgs(**a) if a is not None else None)
        scheme.format = infer_module_format(nn.Linear, scheme)
        config_groups[f"group_{i}"] = scheme
        group_of.update({name: f"group_{i}" for name in names})
    kv = kv_cache_args(contents.recipe.kv_cache)
    formats = {enum_value(s.format) for s in config_groups.values()}
    config = QuantizationConfig(config_groups=config_groups, ignore=others,
                                kv_cache_scheme=QuantizationArgs(**kv) if kv is not None else None,
                                format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
                                quantization_status=QuantizationStatus.FROZEN)
    return config, group_of


def _no_progress_bars():
    """A context that swallows stderr, where the compressed-tensors library draws its progress bars."""
    return contextlib.redirect_stderr(io.StringIO())


def _module_tree(linears: list[QuantizedLinear]) -> nn.Module:
    """A bare module tree holding only these linears under their full names, with the run's weights."""
    root = nn.Module()
    for lin in linears:
        *path, leaf = lin.name.split(".")
        node = root
        for step in path:
            if step not in node._modules:
                node.add_module(step, nn.Module())
            node = node._modules[step]
        weight = lin.dequantized()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        node.add_module(leaf, linear)
    return root


class PartCompressor:
    """Compresses the quantized linears of one run file at a time into CT's tensors."""

    def __init__(self, contents: RunContents, options: ExportOptions) -> None:
        self.config, self.group_of = _quantization_config(contents)
        self.specs = planned_linears(contents)
        self.transforms = online_transform_config(contents)
        self.dtype = options.dtype
        inputs = {key: scheme.input_activations for key, scheme in self.config.config_groups.items()}
        global_scaled = [n for n, key in self.group_of.items()  # NVFP4: a static tensor scale per input
                         if inputs[key] is not None and enum_value(inputs[key].dynamic) == "local"]
        calibrated = [n for n in global_scaled if not is_static_input(contents.recipe.activations_for(n))]
        self.amax = static_input_amax(contents, calibrated, options)  # the run stored the others' scales
        self.written_transforms: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.done: set[str] = set()

    def __call__(self, linears: list[QuantizedLinear],
                 input_scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CT tensors (full names) of these linears: codes, scales, NVFP4 global scales, transform weights.

        :param input_scales: linear name -> the run's stored static NVFP4 ``input_global_scale``.
        """
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config
        from compressed_tensors.transform import apply_transform_config

        self._require_planned(linears)
        # CT re-quantizes our dequantized weights to find the codes: in float32 that is exact, in bf16 its
        # division rounds (INT8 codes near 127 come back off by one), so compress first, cast after.
        tree, part_config = _module_tree(linears), self._part_config(linears)
        with _no_progress_bars():  # CT's own, two per layer: ours says it
            if self.transforms is not None:  # before quantization: CT hooks the input transform ahead of the quantizer
                apply_transform_config(tree, self.transforms)
            apply_quantization_config(tree, part_config)
            self._set_params(tree, linears, input_scales)
            ModelCompressor(quantization_config=part_config).compress_model(tree)
        for lin in linears:
            module = tree.get_submodule(lin.name)
            store_codes(module, lin, enum_value(module.quantization_scheme.format))
        self.done.update(lin.name for lin in linears)
        _cast_for_save(tree, self.dtype)
        return self._untied(tree.state_dict())

    def _require_planned(self, linears: list[QuantizedLinear]) -> None:
        for lin in linears:
            if self.specs.get(lin.name) != lin.spec:
                raise RuntimeError(f"{lin.name} is stored with {lin.spec}, its recipe says {self.specs.get(lin.name)}")

    def _part_config(self, linears: list[QuantizedLinear]):
        """The model's config narrowed to these linears: their groups, each targeting its members by name."""
        from compressed_tensors.quantization import QuantizationConfig

        members: dict[str, list[str]] = {}
        for lin in linears:
            members.setdefault(self.group_of[lin.name], []).append(lin.name)
        return QuantizationConfig(
            config_groups={key: self.config.config_groups[key].model_copy(update={"targets": names}, deep=True)
                           for key, names in members.items()},
            quantization_status=self.config.quantization_status)

    def _set_params(self, tree: nn.Module, linears: list[QuantizedLinear],
                    input_scales: dict[str, torch.Tensor]) -> None:
        """Our scales into the parameters CT attached, and each NVFP4 input's static tensor scale: the run's
        stored one, else the one calibrated at export."""
        for lin in linears:
            module = tree.get_submodule(lin.name)
            set_weight_params(module, lin)
            if hasattr(module, "input_global_scale"):
                stored = input_scales.get(lin.name)
                module.input_global_scale.data = (stored if stored is not None
                                                  else input_global_scale(self.amax[lin.name]))

    def _untied(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop repeats of shared transform weights: CT ties them and transformers saves them once (under
        the first module's name); a repeat equal to a tensor already written is left out."""
        if self.transforms is None:
            return state
        kept = {}
        for key, value in state.items():
            scheme = next((g for g in self.transforms.config_groups if f".{g}_" in key), None)
            if scheme is None:
                kept[key] = value
                continue
            ident = (key[key.index(f".{scheme}_") + 1:], tuple(value.shape))
            first = self.written_transforms.get(ident)
            if first is None:
                self.written_transforms[ident] = value
                kept[key] = value
            elif not torch.equal(first, value):
                kept[key] = value
        return kept


def _cast_for_save(model: nn.Module, dtype: torch.dtype) -> None:
    """float32 tensors to the export dtype, except CT's float32 tensor scales (NVFP4 global scales);
    scales were checked to be exact in ``dtype``, FP8/E8M0 ones already have their own dtype."""
    for name, param in model.named_parameters():
        if param.dtype == torch.float32 and not name.endswith("global_scale"):
            param.data = param.data.to(dtype)
