"""Writing a compressed-tensors checkpoint, streamed one run file (a decoder layer, then the model-level rest) at
a time: each file's tensors (its linears compressed by :class:`~.compress.PartCompressor`) go to a
:class:`~orthoquant.export.shards.ShardWriter`, so an export holds about one shard, never the model; then
``config.json`` with the whole model's ``quantization_config`` (and ``transform_config``), the generation config
and a README that says how to serve it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...fakequant.static_inputs import BUFFER as INPUT_SCALE
from ...models.conversion import by_module, checkpoint_name_mapping
from ...models.layout import to_stock
from ...models.loading import views_of
from ..base import ExportOptions, save_hf_config
from ..contents import RunContents
from ..shards import ShardWriter, cast_floats
from .compress import PartCompressor
from .schemes import FORMAT_NAME, enum_value


def write(contents: RunContents, out: Path, options: ExportOptions) -> dict[str, Any]:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from transformers import GenerationConfig

    compress, shards = _write_shards(contents, out, options)
    online = sorted(compress.transforms.config_groups) if compress.transforms is not None else []
    GenerationConfig.from_model_config(contents.config).save_pretrained(out)  # as save_pretrained writes it
    save_hf_config(contents, out, options.dtype,
                   orthoquant={"recipe": contents.recipe.name, "online_transforms": online,
                               "loader": "vllm or orthoquant.load_quantized" if online else "any"})
    config = _stored_names(compress.config, by_module(checkpoint_name_mapping(contents.config.model_type)))
    config.quantization_status = QuantizationStatus.COMPRESSED
    ModelCompressor(quantization_config=config, transform_config=compress.transforms).update_config(str(out))
    _write_readme(out, contents, online)
    kv = config.kv_cache_scheme
    return {"compressed_tensors": {"format": enum_value(compress.config.format), "online_transforms": online,
                                   "kv_cache_scheme": kv.model_dump() if kv is not None else None,
                                   "shards": shards}}


def _write_shards(contents: RunContents, out: Path, options: ExportOptions) -> tuple[PartCompressor, list[str]]:
    """Every tensor of the checkpoint, one run file at a time (the model-level rest, then each layer), in
    stock names (the checkpoint layout of the model type's stock loader, e.g. Mixtral's
    ``block_sparse_moe.experts.N.w1``, :mod:`~orthoquant.models.conversion`); returns the compressor (its
    config, transforms and the linears it wrote) and the shard names."""
    compress = PartCompressor(contents, options)
    writer = ShardWriter(out, options.max_shard_bytes)
    views = views_of(contents.config)  # fused parts merged, Gemma's γ without its 1
    stored = by_module(checkpoint_name_mapping(contents.config.model_type))
    for part in contents.parts(progress=f"export {FORMAT_NAME}"):
        plain = part.plain()
        input_scales = {k[: -len(INPUT_SCALE) - 1]: plain.pop(k) for k in list(plain) if k.endswith(f".{INPUT_SCALE}")}
        tensors = cast_floats(plain, options.dtype)  # norms, embeddings, biases, KV scales
        linears = list(part.linears())
        if linears:
            tensors.update(compress(linears, input_scales))
        writer.add({stored(k): v for k, v in to_stock(tensors, views).items()})
    shards = writer.finish()
    missing = set(compress.specs) - compress.done
    if missing:
        raise RuntimeError(f"the run lacks the quantized linears {sorted(missing)[:3]} its recipe names")
    return compress, shards


def _stored_names(config, stored: Callable[[str], str]):
    """A copy of the CT config whose module names (targets, ignore) are the checkpoint's (``stored`` maps
    tensor names); class-name targets such as ``Linear`` stay as they are."""
    def module(name: str) -> str:
        return stored(f"{name}.weight").rpartition(".")[0]
    groups = {key: group.model_copy(update={"targets": [module(t) for t in group.targets]}, deep=True)
              for key, group in config.config_groups.items()}
    return config.model_copy(update={"config_groups": groups, "ignore": [module(n) for n in config.ignore]},
                             deep=True)


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
