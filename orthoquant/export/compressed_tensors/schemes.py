"""Our quantization specs as compressed-tensors (CT) schemes, and our codes in CT's compressed layouts.

Tables, one row per number format:

- :data:`WEIGHT_ARGS` / :data:`INPUT_ARGS`: QuantSpec -> ``QuantizationArgs`` fields (vLLM's schemes:
  W4A16/W8A16 pack-quantized, W8A8 INT8 per-token, FP8, NVFP4 and MXFP4), each refusing what CT or vLLM
  cannot express with a :class:`UserError` that points to the native format; :func:`kv_cache_args`
  likewise for the KV cache (static per-tensor FP8 only).
- :data:`LAYOUTS`: CT compression format -> (our codes in its stored layout, the values a stored tensor
  decodes to). The writer compares CT's own compression of our dequantized weights with our codes and
  then stores ours.

Conventions that make the two agree: our symmetric INT codes are ``signed + 2^(b-1)``, which is how CT
packs its signed ints; E2M1 codes are ``sign << 3 | magnitude`` two per byte, even column low; NVFP4's
CT global scale is the inverse of ours (``448·6 / amax``).
"""
from __future__ import annotations

import json
from typing import Any, Callable

import torch

from ...config import QuantSpec
from ...errors import UserError
from ...formats.fp4 import e2m1_decode
from ...formats.packing import pack_codes, pack_nibbles, unpack_nibbles
from ..contents import QuantizedLinear

FORMAT_NAME = "compressed-tensors"
NATIVE_HINT = "use --format native (loaded with orthoquant.load_quantized)"


def refuse(reason: str) -> None:
    raise UserError(f"compressed-tensors cannot hold this run: {reason}; {NATIVE_HINT}")


def _weight_granularity(spec: QuantSpec) -> dict[str, Any]:
    if spec.group_size > 0:
        return {"strategy": "group", "group_size": spec.group_size}
    return {"strategy": "channel" if spec.group_size == -1 else "tensor"}


def _input_granularity(spec: QuantSpec) -> dict[str, Any]:
    if spec.group_size > 0:
        return {"strategy": "group", "group_size": spec.group_size}
    return {"strategy": "token" if spec.group_size == -1 else "tensor"}


def _int_weights(spec: QuantSpec) -> dict[str, Any]:
    if not spec.symmetric:
        refuse("asymmetric INT weights do not load in transformers 5.23 (pack-quantized zero points)")
    return {"num_bits": spec.bits, "type": "int", "symmetric": True, **_weight_granularity(spec)}


def _fp8_weights(spec: QuantSpec) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, **_weight_granularity(spec)}


def _nvfp4(dynamic: Any) -> dict[str, Any]:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
            "dynamic": dynamic, "scale_dtype": torch.float8_e4m3fn, "zp_dtype": torch.float8_e4m3fn}


def _mxfp4(spec: QuantSpec, dynamic: bool) -> dict[str, Any]:
    if spec.scale_rule != "spec":
        refuse(f"MXFP4 scale_rule={spec.scale_rule!r} needs a 4/3 tensor factor that E8M0 scales cannot store")
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32,
            "dynamic": dynamic, "scale_dtype": torch.uint8, "zp_dtype": torch.uint8}


WEIGHT_ARGS: dict[str, Callable[[QuantSpec], dict[str, Any]]] = {
    "int": _int_weights,
    "fp8": _fp8_weights,
    "nvfp4": lambda spec: _nvfp4(False),
    "mxfp4": lambda spec: _mxfp4(spec, False),
}


def _int_inputs(spec: QuantSpec) -> dict[str, Any]:
    if spec.bits != 8:
        refuse(f"INT{spec.bits} activations: vLLM serves INT8 activations only")
    return {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, **_input_granularity(spec)}


INPUT_ARGS: dict[str, Callable[[QuantSpec], dict[str, Any]]] = {
    "int": _int_inputs,
    "fp8": lambda spec: {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                         **_input_granularity(spec)},
    "nvfp4": lambda spec: _nvfp4("local"),
    "mxfp4": lambda spec: _mxfp4(spec, True),
}
# CT decompresses FP4 weights in bfloat16 on CPU (unpacked values and scales): its own precision floor.
CT_DECOMPRESS_DTYPE = {"nvfp4": torch.bfloat16, "mxfp4": torch.bfloat16}


def weight_args(spec: QuantSpec) -> dict[str, Any]:
    if spec.format not in WEIGHT_ARGS:
        refuse(f"{spec.format} weights have no compressed-tensors scheme")
    return WEIGHT_ARGS[spec.format](spec)


def input_args(spec: QuantSpec | None) -> dict[str, Any] | None:
    """CT arguments of a linear's input quantization (None: activations stay in full precision)."""
    if spec is None:
        return None
    if spec.format not in INPUT_ARGS:
        refuse(f"{spec.format} activations have no compressed-tensors scheme")
    if not spec.symmetric:
        refuse("asymmetric activations are not served by vLLM's compressed-tensors kernels")
    if spec.clip_ratio != 1.0:
        refuse(f"activations.clip_ratio={spec.clip_ratio}: runtimes quantize activations without clipping")
    return INPUT_ARGS[spec.format](spec)


def kv_cache_args(spec: QuantSpec | None) -> dict[str, Any] | None:
    """CT ``kv_cache_scheme`` of the recipe's KV-cache spec (None: the cache stays in full precision).

    vLLM (``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme``) serves ``type=float``,
    ``num_bits=8``, ``strategy=tensor``, symmetric: one static E4M3 scale per layer for keys and one for
    values, stored as ``<attention>.k_scale`` / ``v_scale``.
    """
    if spec is None:
        return None
    hint = "quantize with kv_cache.format=fp8, bits=8, group_size=0, static=true (preset rtn-w8a8-fp8-kv8)"
    if spec.format != "fp8":
        refuse(f"{spec.format.upper()}{spec.bits} KV-cache quantization: vLLM serves FP8 E4M3 KV caches only "
               f"({hint})")
    if not spec.static:
        refuse(f"dynamic KV-cache quantization (group_size={spec.group_size}, scales from each call's keys and "
               f"values): vLLM takes static per-tensor FP8 k/v scales ({hint})")
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def enum_value(enum_or_str) -> str:
    """CT formats are enums in some places and plain strings in others."""
    return getattr(enum_or_str, "value", enum_or_str)


def scheme_key(weights: dict[str, Any], inputs: dict[str, Any] | None) -> str:
    """A hashable identity of a (weights, inputs) pair, for grouping linears into config groups."""
    return json.dumps([weights, inputs], sort_keys=True, default=str)


# --- compressed layouts ------------------------------------------------------------------------
def _signed(lin: QuantizedLinear) -> torch.Tensor:
    return (lin.q.codes.to(torch.int16) - 2 ** (lin.spec.bits - 1)).to(torch.int8)


def _fp4_values(stored: torch.Tensor, lin: QuantizedLinear) -> torch.Tensor:
    return e2m1_decode(unpack_nibbles(stored, lin.q.codes.shape[1]))


Layout = tuple[str, Callable[[QuantizedLinear], torch.Tensor], Callable[[torch.Tensor, QuantizedLinear], torch.Tensor]]
# CT format -> (parameter name, our codes in that layout, the values a stored tensor stands for).
# Integers compare bit for bit; floats by value, so that CT writing +0 where we keep −0 is no error.
LAYOUTS: dict[str, Layout] = {
    "pack-quantized": ("weight_packed", lambda lin: pack_codes(lin.q.codes, lin.spec.bits), lambda t, lin: t),
    "int-quantized": ("weight", _signed, lambda t, lin: t),
    "naive-quantized": ("weight", _signed, lambda t, lin: t),
    "float-quantized": ("weight", lambda lin: lin.q.codes.view(torch.float8_e4m3fn),
                        lambda t, lin: t.float()),
    "nvfp4-pack-quantized": ("weight_packed", lambda lin: pack_nibbles(lin.q.codes), _fp4_values),
    "mxfp4-pack-quantized": ("weight_packed", lambda lin: pack_nibbles(lin.q.codes), _fp4_values),
}


def set_weight_params(module: torch.nn.Module, lin: QuantizedLinear) -> None:
    """Put our scales (and NVFP4's tensor scale) into the parameters CT created on ``module``."""
    scale = lin.params.scale
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    if lin.spec.format == "nvfp4":
        module.weight_global_scale.data = stored_inverse(lin.params.global_scale).reshape(1)


def stored_inverse(scale: torch.Tensor) -> torch.Tensor:
    """The float32 ``s`` whose reciprocal is exactly ``scale`` (CT stores NVFP4's tensor scale inverted).

    ``1 / scale`` itself can miss by an ulp; the format fits ``scale`` as the reciprocal of a float32,
    so a neighbour of ``1 / scale`` always inverts exactly.
    """
    scale = scale.float().reshape(())
    guess = 1 / scale
    for s in (guess, torch.nextafter(guess, guess.new_tensor(float("inf"))),
              torch.nextafter(guess, guess.new_tensor(0.0))):
        if torch.equal(1 / s, scale):
            return s
    raise UserError(f"NVFP4 tensor scale {scale.item()!r} is not the float32 reciprocal of a float32: "
                     "re-quantize the run with this version of orthoquant")


def store_codes(module: torch.nn.Module, lin: QuantizedLinear, ct_format: str) -> None:
    """Check CT's compression of ``module`` against our codes, then keep ours.

    :raises RuntimeError: when CT encoded any value differently (a convention drifted: never write it).
    """
    if ct_format not in LAYOUTS:
        raise RuntimeError(f"{lin.name}: compressed-tensors chose format {ct_format!r}, which orthoquant cannot check")
    name, ours_of, values = LAYOUTS[ct_format]
    param, ours = getattr(module, name), ours_of(lin)
    same = param.shape == ours.shape and param.dtype == ours.dtype and torch.equal(values(param.data, lin),
                                                                                  values(ours, lin))
    if not same:
        raise RuntimeError(f"{lin.name}: compressed-tensors encoded the weights differently from orthoquant's "
                           f"codes ({ct_format}); refusing to write a checkpoint that would not match")
    param.data = ours
