"""compressed-tensors export: a stock model with quantized weights that transformers and vLLM load.

The writer streams the run, one stored file (a decoder layer, then the model-level rest) at a time:
it builds just that file's quantized linears holding the run's dequantized weights, lets the
compressed-tensors library attach its schemes and compress them, checks that its codes are ours and
keeps ours, and hands them with the file's other tensors to a :class:`~orthoquant.export.shards.ShardWriter`, so an
export holds about one shard, never the model. ``config.json`` gets the whole model's
``quantization_config`` (plus ``transform_config`` for the vLLM subset of online transforms, see
:mod:`.transforms`). Scales are stored as quantized: CT keeps INT/FP8 scales in the model dtype
(FP4 ones pass through it), so they must already be exact in it (``weights.scale_dtype`` rounds them
when quantizing).

NVFP4's static ``input_global_scale`` is the one the run calibrated and quantized with
(``activations.static``, :mod:`orthoquant.fakequant.static_inputs`), written as stored; only runs with
dynamic NVFP4 inputs (older presets) have it calibrated at export, see :mod:`.static_scales`. The KV cache is exported
where vLLM serves it: FP8 with static per-tensor scales (``kv_cache.static``), which the run calibrated
and quantized with (:mod:`orthoquant.fakequant.kvcache`). They are written as CT writes them,
``<attention>.k_scale`` / ``<attention>.v_scale`` (vLLM remaps them to its ``attn.k_scale``), with
``quantization_config.kv_cache_scheme`` = {type: float, num_bits: 8, strategy: tensor, symmetric,
dynamic: false}. Dynamic, grouped or non-FP8 KV caches are refused.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import QuantSpec, Recipe
from ...errors import UserError
from ...fakequant.kvcache import SCALE_NAMES, kv_scales
from ...fakequant.static_inputs import BUFFER as INPUT_SCALE, is_static_input
from ...models.layout import to_layout_, to_stock
from ...models.loading import build_skeleton, views_of
from ...models.surgery import layers_of
from ..base import EXPORT_FORMATS, ExportFormat, ExportOptions, dense_reload, save_hf_config
from ..contents import QuantizedLinear, RunContents, RunPart, exact_in, require_scales_in
from ..shards import ShardWriter, cast_floats, read_tensors
from ..verify import ExportCheckError, compare_logits, compare_weights, quiet_transformers, relative_tolerance
from .read import dense_state
from .schemes import (CT_DECOMPRESS_DTYPE, input_args, kv_cache_args, refuse, scheme_key, set_weight_params,
                      store_codes, weight_args)
from .static_scales import input_global_scale, static_input_amax
from .transforms import apply_online, online_transform_config

log = logging.getLogger(__name__)
FORMAT_NAME = "compressed-tensors"


def _check(contents: RunContents, dtype: torch.dtype) -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UserError("--format compressed-tensors needs the compressed-tensors package "
                        "(pip install compressed-tensors)") from None
    kv = kv_cache_args(contents.recipe.kv_cache)
    online_transform_config(contents)
    quantized = set()
    for part in contents.parts():
        for lin in part.linears():
            _check_linear(lin, contents.recipe, dtype)
            quantized.add(lin.name)
        if kv is not None and part.prefix:
            _check_kv_scales(part, contents, dtype)
    if not quantized:
        refuse("no linear is quantized")
    unplanned = sorted(quantized ^ set(planned_linears(contents)))
    if unplanned:
        raise UserError(f"run {contents.path} quantized {unplanned[:3]} other than its recipe says; "
                        "its quantization_config could not describe it")
    dropped = [n for n in _arch_linears(contents)
               if n not in quantized and contents.recipe.activations_for(n) is not None]
    if dropped:
        refuse(f"{dropped[0]} quantizes its input but not its weight (no compressed-tensors scheme)")


def split_fused_groups(contents: RunContents) -> list[str]:
    """Linears that share an input and that vLLM fuses into one GEMM (q/k/v, gate/up) but that the recipe
    quantizes with different schemes (or leaves some in full precision): vLLM runs a fused module with one
    scheme, so such a checkpoint does not serve as quantized. One line per split group."""
    split = []
    for index in range(contents.n_layers):
        for roles in contents.arch.input_groups():
            names = [contents.layer_prefix(index) + contents.arch.path(r) for r in roles]
            schemes = {n: _scheme_of(contents.recipe, n) for n in names}
            if len(set(schemes.values())) > 1:
                split.append(f"{', '.join(names)} are fused by vLLM but quantized with different schemes")
    return split


def _scheme_of(recipe: Recipe, name: str) -> str:
    spec = recipe.weights_for(name)
    return "full precision" if spec is None else scheme_key(weight_args(spec), input_args(recipe.activations_for(name)))


def _check_linear(lin: QuantizedLinear, recipe: Recipe, dtype: torch.dtype) -> None:
    weight_args(lin.spec)
    input_args(recipe.activations_for(lin.name))
    if lin.transforms:
        refuse(f"{lin.name} carries a solver transform ({', '.join(lin.transforms.values())}) that must run online")
    if lin.g_idx is not None:
        refuse(f"{lin.name} uses act-order groups (g_idx), which compressed-tensors no longer stores "
                "(set solver.static_groups=true, or use --format gptq)")
    require_scales_in(lin, dtype, FORMAT_NAME)  # CT's scale parameters take the model dtype


def _check_kv_scales(part: RunPart, contents: RunContents, dtype: torch.dtype) -> None:
    """The layer's static KV scales exist and are exact in ``dtype`` (CT stores them in the model dtype)."""
    for name in SCALE_NAMES:
        key = f"{contents.arch.attention}.{name}"
        scale = part.tensors.get(key)
        if scale is None:
            raise UserError(f"run {contents.path} has no {part.prefix}{key}: its layers were quantized without "
                            "static KV-cache scales; re-run `orthoquant quantize` into a new folder")
        if not exact_in(scale, dtype):
            kind = str(dtype).removeprefix("torch.")
            raise UserError(f"{FORMAT_NAME} stores the KV-cache scale {part.prefix}{key} in {kind}, but the run's "
                            f"scale (kv_cache.scale_dtype={contents.recipe.kv_cache.scale_dtype}) is not exactly "
                            f"representable in {kind}; re-quantize with --set kv_cache.scale_dtype={kind}, or "
                            "export with a wider --dtype")


def _arch_linears(contents: RunContents) -> list[str]:
    """Every linear the runner may quantize: each layer's, then lm_head."""
    layers = [contents.layer_prefix(i) + path for i in range(contents.n_layers) for _, path in contents.arch.linears]
    return layers + [contents.arch.lm_head]


def planned_linears(contents: RunContents) -> dict[str, QuantSpec]:
    """Full name -> weight spec of every linear the run quantized (the recipe decides, as in the runner)."""
    return {n: s for n in _arch_linears(contents) if (s := contents.recipe.weights_for(n)) is not None}


def _quantization_config(contents: RunContents):
    """The whole model's CT config (one group per distinct (weights, inputs) scheme, its CT format set;
    every other Linear of the model ignored; the KV-cache scheme) and each quantized linear's group."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    specs = planned_linears(contents)
    groups: dict[str, tuple[dict, dict | None, list[str]]] = {}
    for name, spec in specs.items():
        w, a = weight_args(spec), input_args(contents.recipe.activations_for(name))
        groups.setdefault(scheme_key(w, a), (w, a, []))[2].append(name)
    skeleton = build_skeleton(contents.config, torch.float32)  # meta: names only
    others = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in specs]
    single = len(groups) == 1
    config_groups, group_of = {}, {}
    for i, (w, a, names) in enumerate(groups.values()):
        scheme = QuantizationScheme(targets=["Linear"] if single else names, weights=QuantizationArgs(**w),
                                    input_activations=QuantizationArgs(**a) if a is not None else None)
        scheme.format = infer_module_format(nn.Linear, scheme)
        config_groups[f"group_{i}"] = scheme
        group_of.update({name: f"group_{i}" for name in names})
    kv = kv_cache_args(contents.recipe.kv_cache)
    formats = {_value(s.format) for s in config_groups.values()}
    config = QuantizationConfig(config_groups=config_groups, ignore=others,
                                kv_cache_scheme=QuantizationArgs(**kv) if kv is not None else None,
                                format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
                                quantization_status=QuantizationStatus.FROZEN)
    return config, group_of


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


class _PartCompressor:
    """Compresses the quantized linears of one run file at a time into CT's tensors."""

    def __init__(self, contents: RunContents, options: ExportOptions) -> None:
        self.config, self.group_of = _quantization_config(contents)
        self.specs = planned_linears(contents)
        self.transforms = online_transform_config(contents)
        self.dtype = options.dtype
        inputs = {key: scheme.input_activations for key, scheme in self.config.config_groups.items()}
        global_scaled = [n for n, key in self.group_of.items()  # NVFP4: a static tensor scale per input
                         if inputs[key] is not None and _value(inputs[key].dynamic) == "local"]
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
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
        from compressed_tensors.transform import apply_transform_config

        for lin in linears:
            if self.specs.get(lin.name) != lin.spec:
                raise RuntimeError(f"{lin.name} is stored with {lin.spec}, its recipe says {self.specs.get(lin.name)}")
        # CT re-quantizes our dequantized weights to find the codes: in float32 that is exact, in bf16 its
        # division rounds (INT8 codes near 127 come back off by one), so compress first, cast after.
        tree = _module_tree(linears)
        if self.transforms is not None:  # before quantization: CT hooks the input transform ahead of the quantizer
            with contextlib.redirect_stderr(io.StringIO()):
                apply_transform_config(tree, self.transforms)
        members: dict[str, list[str]] = {}
        for lin in linears:
            members.setdefault(self.group_of[lin.name], []).append(lin.name)
        part_config = QuantizationConfig(
            config_groups={key: self.config.config_groups[key].model_copy(update={"targets": names}, deep=True)
                           for key, names in members.items()},
            quantization_status=self.config.quantization_status)
        with contextlib.redirect_stderr(io.StringIO()):  # CT's own progress bars, two per layer: ours says it
            apply_quantization_config(tree, part_config)
        for lin in linears:
            module = tree.get_submodule(lin.name)
            set_weight_params(module, lin)
            if hasattr(module, "input_global_scale"):
                stored = input_scales.get(lin.name)
                module.input_global_scale.data = (stored if stored is not None
                                                  else input_global_scale(self.amax[lin.name]))
        with contextlib.redirect_stderr(io.StringIO()):
            ModelCompressor(quantization_config=part_config).compress_model(tree)
        for lin in linears:
            module = tree.get_submodule(lin.name)
            store_codes(module, lin, _value(module.quantization_scheme.format))
        self.done.update(lin.name for lin in linears)
        _cast_for_save(tree, self.dtype)
        return self._untied(tree.state_dict())

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


def _write(contents: RunContents, out: Path, options: ExportOptions) -> dict[str, Any]:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from transformers import GenerationConfig

    compress = _PartCompressor(contents, options)
    writer = ShardWriter(out, options.max_shard_bytes)
    views = views_of(contents.config)  # fused parts merged, Gemma's γ without its 1
    for part in contents.parts(progress=f"export {FORMAT_NAME}"):  # one run file at a time: rest, then each layer
        plain = part.plain()
        input_scales = {k[: -len(INPUT_SCALE) - 1]: plain.pop(k) for k in list(plain) if k.endswith(f".{INPUT_SCALE}")}
        tensors = cast_floats(plain, options.dtype)  # norms, embeddings, biases, KV scales
        linears = list(part.linears())
        if linears:
            tensors.update(compress(linears, input_scales))
        writer.add(to_stock(tensors, views))
    shards = writer.finish()
    missing = set(compress.specs) - compress.done
    if missing:
        raise RuntimeError(f"the run lacks the quantized linears {sorted(missing)[:3]} its recipe names")
    online = sorted(compress.transforms.config_groups) if compress.transforms is not None else []
    GenerationConfig.from_model_config(contents.config).save_pretrained(out)  # as save_pretrained writes it
    save_hf_config(contents, out, options.dtype,
                   orthoquant={"recipe": contents.recipe.name, "online_transforms": online,
                               "loader": "vllm or orthoquant.load_quantized" if online else "any"})
    compress.config.quantization_status = QuantizationStatus.COMPRESSED
    ModelCompressor(quantization_config=compress.config, transform_config=compress.transforms).update_config(str(out))
    _write_readme(out, contents, online)
    kv = compress.config.kv_cache_scheme
    return {"compressed_tensors": {"format": _value(compress.config.format), "online_transforms": online,
                                   "kv_cache_scheme": kv.model_dump() if kv is not None else None,
                                   "shards": shards}}


def _value(enum_or_str) -> str:
    """CT formats are enums in some places and plain strings in others."""
    return getattr(enum_or_str, "value", enum_or_str)


def _cast_for_save(model: nn.Module, dtype: torch.dtype) -> None:
    """float32 tensors to the export dtype, except CT's float32 tensor scales (NVFP4 global scales);
    scales were checked to be exact in ``dtype``, FP8/E8M0 ones already have their own dtype."""
    for name, param in model.named_parameters():
        if param.dtype == torch.float32 and not name.endswith("global_scale"):
            param.data = param.data.to(dtype)


def _write_readme(out: Path, contents: RunContents, online: list[str]) -> None:
    kv = contents.recipe.kv_cache
    lines = [f"# {contents.recipe.name} (compressed-tensors, exported by orthoquant)", "",
             contents.recipe.description, "",
             "Every rotation is fused into the weights." if not online else
             f"**Online transforms ({', '.join(online)}) must run at inference.** vLLM applies them from "
             "`transform_config`; stock transformers drops them silently on load, which gives wrong outputs. "
             "Load with vLLM or with `orthoquant.load_quantized(path)`.", ""]
    if kv is not None:
        lines += [f"The KV cache is FP8 E4M3 with static per-layer scales (`{contents.arch.attention}.k_scale`, "
                  "`v_scale`, "
                  "calibrated by orthoquant on the calibration data and used by its run); serve with "
                  "`vllm serve <path> --kv-cache-dtype fp8` (recent vLLM selects FP8 from `kv_cache_scheme` "
                  "itself; the scales come from the checkpoint either way).", ""]
    stock = ("compressed-tensors' CPU forward quantizes activations and the KV cache with the stored scales"
             if kv is not None else "weights are dequantized on CPU and activations run unquantized")
    serve = "vllm serve <path>" + (" --kv-cache-dtype fp8" if kv is not None else "")
    lines += [f"- vLLM: `{serve}`",
              f"- transformers: `AutoModelForCausalLM.from_pretrained(<path>)` (needs compressed-tensors; {stock})"
              + (" - not for this checkpoint, see above" if online else ""),
              "- orthoquant: `orthoquant.load_quantized(<path>)` re-attaches online transforms and the "
              "recipe's activation fake-quant" + (" and static KV-cache quantization" if kv is not None else "")]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _load(folder: Path, manifest: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Weights decoded by :mod:`.read` (not CT's bf16 decompression); online transforms from the
    recipe, which stock transformers would drop."""
    return dense_reload(folder, manifest, device, dtype, dense_state)


def _stock_transformers(folder: Path, contents: RunContents, reference: nn.Module, batches: list[torch.Tensor],
                        dtype: torch.dtype) -> dict[str, Any]:
    """Reload with stock transformers (+ compressed-tensors) and compare weights and logits.

    Weight-only checkpoints load the default way a user would (decompressed on the first forward).
    With a KV cache, the default load too: CT's quantized forward then quantizes the KV cache with the
    loaded ``k_scale``/``v_scale`` (compared with the run's, bit for bit) and the activations
    dynamically, as vLLM does; the logits are checked where CT's simulation is the run's arithmetic
    (float32, FP8 or no activations: bit-exact). Otherwise, with activation schemes, CT's quantized
    forward fails on CPU for FP4 in float32 (it decompresses in bfloat16), so the documented
    ``dequantize=True`` path is used; activations (and a KV cache, whose scales are then compared in the
    checkpoint) run unquantized, and the logits are reported, not checked.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    def load(**kwargs) -> nn.Module:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()

    names = reference_linears(contents)
    tol = relative_tolerance(decompression_dtype(contents, names, dtype))
    fake_quant = contents.recipe.activations is not None or contents.recipe.kv_cache is not None
    model, simulated, note = None, False, None
    if contents.recipe.kv_cache is not None:
        try:
            model = load()
            if not _attached_kv_scales(model, contents):
                note = _KV_NOT_ATTACHED.format(**_versions())
                model = None
            else:
                transforms = apply_online(model, folder)
                logits = compare_logits(reference, model, batches)  # the first forward decompresses the weights
                simulated = True
        except (RuntimeError, NotImplementedError, ValueError) as e:  # CT's quantized forward on CPU
            note = f"CT's quantized forward failed ({str(e).splitlines()[0][:120]}); "
            model = None
    if model is None:
        kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fake_quant else {}
        model = load(**kwargs)
        transforms = apply_online(model, folder)  # what vLLM does; transformers drops them
        logits = compare_logits(reference, model, batches)
    to_layout_(model, contents.arch)  # stock modules (fused, (1 + γ)) as the run holds them; decompressed by now
    weights = compare_weights(reference, model, names)
    kv = _compare_kv_scales(contents, reference, model if simulated else None, folder)
    mismatch = _simulation_mismatch(contents, dtype) if simulated else None
    checked = not fake_quant or (simulated and mismatch is None)
    if weights["max_rel_diff"] > tol or (checked and logits["max_rel_diff"] > tol) or (kv and not kv["bit_exact"]):
        raise ExportCheckError(f"stock transformers reload of {folder} differs from the run: "
                               f"logits {logits['max_rel_diff']:.3g}, weights {weights['max_rel_diff']:.3g} "
                               f"(tolerance {tol:.3g})" + (f", KV-cache scales {kv}" if kv else ""))
    if simulated:
        note = "activations and KV cache quantized by compressed-tensors' own forward, as vLLM does" + (
            f"; logits not checked: {mismatch}" if mismatch else "")
    elif fake_quant:
        note = (note or "") + ("activations and KV cache run unquantized in stock transformers (vLLM quantizes "
                               "them); KV-cache scales compared in the checkpoint" if kv else
                               "activations run unquantized in stock transformers (vLLM quantizes them)")
    label = ("stock transformers + online transforms re-applied (plain from_pretrained drops them)" if transforms
             else "stock transformers, plain from_pretrained")
    return {"stock_transformers": {**logits, "label": label, "logits_checked": checked, "weights": weights,
                                   "kv_cache_scales": kv, "online_transforms_applied_with_ct": transforms,
                                   "tolerance": tol, "note": note}}


# compressed-tensors recognises an attention module by a `past_key_value(s)` argument of its forward;
# transformers 5.25 renamed it `cache`, so CT 0.20.1 drops `kv_cache_scheme` there and the scales load as
# unused keys (vLLM reads them from the checkpoint either way).
_KV_NOT_ATTACHED = ("stock transformers {transformers} with compressed-tensors {compressed_tensors} did not attach "
                    "the KV-cache scales (CT looks for a past_key_values argument in the attention's forward); ")


def _attached_kv_scales(model: nn.Module, contents: RunContents) -> bool:
    """Whether loading the export in stock transformers attached ``k_scale``/``v_scale`` to every attention."""
    return all(hasattr(model.get_submodule(f"{contents.layer_prefix(i)}{contents.arch.attention}"), name)
               for i in range(contents.n_layers) for name in SCALE_NAMES)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"transformers": version("transformers"), "compressed_tensors": version("compressed-tensors")}


def _simulation_mismatch(contents: RunContents, dtype: torch.dtype) -> str | None:
    """Why CT's quantized CPU forward is not the run's arithmetic (None: it is)."""
    if dtype != torch.float32:
        return f"CT quantizes in {str(dtype).removeprefix('torch.')} arithmetic, orthoquant in float32"
    formats = {a.format for n in planned_linears(contents) if (a := contents.recipe.activations_for(n)) is not None}
    if "int" in formats:
        return "CT simulates INT8 activations with the scale amax/127.5 (vLLM and orthoquant: amax/127)"
    if formats - {"fp8"}:
        return f"CT's simulation of {sorted(formats - {'fp8'})} activations differs from the run's"
    return None


def _compare_kv_scales(contents: RunContents, reference: nn.Module, stock: nn.Module | None,
                       folder: Path) -> dict[str, Any] | None:
    """The run's static KV scales against those the stock model loaded (or, when it did not load them,
    those stored in the checkpoint). None without a KV cache."""
    if contents.recipe.kv_cache is None:
        return None
    stored = read_tensors(folder) if stock is None else None
    exact, count = True, 0
    for index, layer in enumerate(layers_of(reference, contents.arch)):
        attention = f"{contents.layer_prefix(index)}{contents.arch.attention}"
        for name, ours in kv_scales(layer.get_submodule(contents.arch.attention)).items():
            theirs = (stock.get_submodule(attention).get_parameter(name) if stock is not None
                      else stored[f"{attention}.{name}"])
            exact = exact and torch.equal(theirs.detach().float().reshape(-1), ours.float().reshape(-1))
            count += 1
    return {"bit_exact": exact and count == 2 * contents.n_layers, "scales": count,
            "source": "loaded by compressed-tensors" if stock is not None else "checkpoint"}


def reference_linears(contents: RunContents) -> list[str]:
    return list(planned_linears(contents))


def decompression_dtype(contents: RunContents, names: list[str], dtype: torch.dtype) -> torch.dtype:
    """The coarser of the model dtype and the dtype CT decompresses these linears' formats in."""
    formats = {contents.recipe.weights_for(n).format for n in names}
    coarse = [CT_DECOMPRESS_DTYPE[f] for f in formats if f in CT_DECOMPRESS_DTYPE]
    return max([dtype, *coarse], key=lambda d: torch.finfo(d).eps)


COMPRESSED = ExportFormat(FORMAT_NAME, _check, _write, _load, exact=False, stock_checks=(_stock_transformers,),
                          dtype_checked=True, decode=dense_state, overridable=split_fused_groups)
EXPORT_FORMATS.add(COMPRESSED.name, COMPRESSED)
