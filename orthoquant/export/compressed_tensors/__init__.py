"""compressed-tensors export: a stock model with quantized weights that transformers and vLLM load.

The writer streams the run, one stored file (a decoder layer, then the model-level rest) at a time: it builds
just that file's quantized linears holding the run's dequantized weights, lets the compressed-tensors library
attach its schemes and compress them, checks that its codes are ours and keeps ours, and writes them with the
file's other tensors into shards, so an export holds about one shard, never the model. ``config.json`` gets the
whole model's ``quantization_config`` (plus ``transform_config`` for the vLLM subset of online transforms).
Scales are stored as quantized: CT keeps INT/FP8 scales in the model dtype (FP4 ones pass through it), so they
must already be exact in it (``weights.scale_dtype`` rounds them when quantizing).

NVFP4's static ``input_global_scale`` is the one the run calibrated and quantized with (``activations.static``,
:mod:`orthoquant.fakequant.static_inputs`), written as stored; only runs with dynamic NVFP4 inputs (older
presets) have it calibrated at export. The KV cache is exported where vLLM serves it: FP8 with static per-tensor
scales (``kv_cache.static``), which the run calibrated and quantized with (:mod:`orthoquant.fakequant.kvcache`).
They are written as CT writes them, ``<attention>.k_scale`` / ``<attention>.v_scale`` (vLLM remaps them to its
``attn.k_scale``), with ``quantization_config.kv_cache_scheme`` = {type: float, num_bits: 8, strategy: tensor,
symmetric, dynamic: false}. Dynamic, grouped or non-FP8 KV caches are refused.

| module            | owns                                                                              |
|-------------------|-----------------------------------------------------------------------------------|
| `checks`          | what a checkpoint can hold, refused before anything is written                     |
| `schemes`         | our specs as CT ``QuantizationArgs``; our codes in CT's compressed layouts         |
| `transforms`      | the vLLM subset of online transforms as ``transform_config``                       |
| `static_scales`   | NVFP4 input scales calibrated at export (runs with dynamic inputs)                 |
| `compress`        | the model's ``quantization_config``; one run file compressed by the CT library      |
| `writer`          | shards, ``config.json``, README                                                    |
| `read`            | the export decoded by our formats (orthoquant's loader, streamed verification)     |
| `stock`           | the reload in stock transformers, compared with the run                            |
"""
from ..base import EXPORT_FORMATS, ExportFormat
from .checks import check, split_fused_groups
from .read import dense_state, load
from .schemes import FORMAT_NAME
from .stock import stock_transformers
from .writer import write

COMPRESSED = ExportFormat(FORMAT_NAME, check, write, load, exact=False, stock_checks=(stock_transformers,),
                          dtype_checked=True, decode=dense_state, overridable=split_fused_groups)
EXPORT_FORMATS.add(COMPRESSED.name, COMPRESSED)
