"""Loading models without holding them whole: a meta-device skeleton plus per-module materialisation.

A 70B model in bf16 is 140 GB, so the runner builds the model on the meta device and fills one
decoder layer at a time from the safetensors shards (``WeightSource.materialize``), then frees it.
Small in-memory models use :class:`InMemorySource`, for which both operations are no-ops.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..device import release_memory, resolve_dtype, use_mmap_for_large_blocks
from ..errors import UserError
from .checkpoint import TensorEntry, check_skeleton, open_checkpoint, read_entry
from .conversion import renamed_stored
from .layout import StoredViews, stored_views, to_layout_
from .multimodal import is_multimodal, text_config, text_entries
from .spec import ArchSpec
from .generic import spec_for

log = logging.getLogger(__name__)
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # huggingface_hub's repo id shape
# config.json fields that size the model: positive integers where present (null: the default)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")
_DIVIDES = (("num_attention_heads", "hidden_size"), ("num_key_value_heads", "num_attention_heads"))


def _is_local_path(model: str) -> bool:
    """Whether ``model`` can only mean a local path: not shaped as a hub id (``name`` or ``org/name``),
    or ``org/...`` where ``org`` is a local folder (``models/foo`` next to a ``models`` folder)."""
    head = model.split("/", 1)[0]
    return not _HUB_ID.fullmatch(model) or ".." in model or ("/" in model and Path(head).is_dir())


def resolve_model_path(model: str) -> Path:
    """A local Hugging Face folder as is, else a hub id downloaded (weights as safetensors only)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return path
    if path.exists():
        raise UserError(f"model path {model} is a file, not a Hugging Face model folder")
    if _is_local_path(model):  # a typo in a path must not turn into a hub download
        raise UserError(f"model folder {model} does not exist ({os.path.abspath(model)})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated: say which model and why
        raise UserError(f"no local folder {model} exists, and fetching '{model}' from the hub failed: {e}") from None


def read_config_json(folder: Path) -> dict:
    """``folder/config.json`` as a dict, its model sizes checked (see :data:`_SIZES`)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    for key in _SIZES:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserError(f"{path}: {key} must be a positive integer, not {value!r}")
    for part, whole in _DIVIDES:
        if config.get(part) and config.get(whole) and config[whole] % config[part]:
            raise UserError(f"{path}: {part}={config[part]} does not divide {whole}={config[whole]}")
    return config


def load_config(path: Path):
    read_config_json(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as e:  # transformers' own checks
        raise UserError(f"{path / 'config.json'}: {' '.join(str(e).split())}") from None
    config = text_config(config)  # a multimodal checkpoint (Gemma 3 4B+): its text model
    spec_for(config)  # an unsupported architecture fails here, before any weight is read
    return config


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def build_skeleton(config, dtype: torch.dtype, layout: bool = True) -> nn.Module:
    """The model with parameters on the meta device (buffers such as RoPE frequencies are real), in
    orthoquant's layout (:mod:`.layout`) unless ``layout`` is False (the stock class as it is)."""
    # init_empty_weights creates each parameter on the CPU, then moves it to meta: the whole model is
    # allocated once, block by block. Under glibc's dynamic threshold those blocks came from the brk
    # heap and left it model-sized; later layers were carved from it, and freed parts of it stay
    # resident, so peak memory grew with depth. With the threshold fixed first they are mmaps,
    # never touched and unmapped at once.
    use_mmap_for_large_blocks()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_for(config))
    if layout:
        to_layout_(model, spec_for(config))  # Conv1D, fused linears, (1 + γ) norms: orthoquant's layout
    return model.eval()


def views_of(config) -> StoredViews:
    """How orthoquant's layout of ``config``'s model maps onto its stock checkpoint."""
    return stored_views(spec_for(config), config, build_skeleton(config, torch.float32))


def attention_for(config) -> str:
    """SDPA where the model class supports it; else (Gemma 2's soft-capping) eager. orthoquant's own
    attention function replaces either once the model is prepared."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", True) else "eager"


class WeightSource:
    """Fills parameters of a module from storage. Base class: an in-memory model (nothing to do)."""

    streaming = False

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        module.to(device)

    def release(self, module: nn.Module) -> None:
        module.to("cpu")


InMemorySource = WeightSource


class SafetensorsSource(WeightSource):
    """Parameters read tensor by tensor from a folder of safetensors shards, with plain file I/O (not
    through safetensors' mmap: pages of a memory-mapped shard count in the process's resident set once
    touched, so peak memory would grow with the size of the checkpoint). Every shard's header is
    verified when the source is made (:mod:`.checkpoint`).

    :param folder: holds ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
    :param dtype: dtype the floating-point parameters are cast to.
    :param aliases: name -> name to read instead (tied lm_head -> embedding).
    :param views: how parameters of orthoquant's layout are read from stock tensors (:mod:`.layout`).
    :param text_only: the folder holds a multimodal checkpoint; read its text model (:mod:`.multimodal`).
    :param model_type: the config's ``model_type``: stored names are read as transformers converts them
        for it (Mixtral's ``block_sparse_moe.experts.N.w1`` is ``mlp.experts.N.gate_proj``, :mod:`.conversion`).
    """

    streaming = True

    def __init__(self, folder: Path, dtype: torch.dtype, aliases: dict[str, str] | None = None,
                 views: StoredViews = StoredViews(), text_only: bool = False, model_type: str | None = None) -> None:
        use_mmap_for_large_blocks()
        self.folder, self.dtype, self.aliases = folder, dtype, aliases or {}
        self.entries: dict[str, TensorEntry] = open_checkpoint(folder)  # every header verified here
        if text_only:  # a multimodal checkpoint: its text model's tensors, under the causal LM's names
            self.entries = text_entries(self.entries)
        self.entries = renamed_stored(self.entries, model_type)
        self.transposed, self.offsets, self.experts = views.transposed, views.offsets, views.experts
        self.slices = {k: v for k, v in views.slices.items() if v[0] in self.entries}  # biases may be absent

    def check(self, skeleton: nn.Module) -> None:
        """Every parameter of ``skeleton`` is stored with its shape (before anything is read or written)."""
        as_read = {k: dataclasses.replace(e, shape=e.shape[::-1]) if k in self.transposed else e
                   for k, e in self.entries.items()}
        fused = {stored for stored, _, _ in self.slices.values()} | {v[0] for v in self.experts.values()}
        as_read = {k: e for k, e in as_read.items() if k not in fused}
        as_read.update({name: dataclasses.replace(self.entries[stored], shape=(end - start, *self.entries[stored].shape[1:]))
                        for name, (stored, start, end) in self.slices.items()})
        as_read.update({name: dataclasses.replace(self.entries[stored], shape=(end - start, self.entries[stored].shape[2]))
                        for name, (stored, _, start, end) in self.experts.items()})
        check_skeleton(as_read, skeleton, self.aliases, self.folder / "config.json")

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.experts:  # one expert of a stacked (transformers 5) checkpoint
            stored, expert, start, end = self.experts[name]
            return self.tensor(stored)[expert, start:end].contiguous()
        if name in self.slices:  # a part of a fused linear: its rows of the stored tensor
            stored, start, end = self.slices[name]
            return self.tensor(stored)[start:end].contiguous()
        key = name if name in self.entries else self.aliases.get(name, name)
        if key not in self.entries:
            raise UserError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        t = read_entry(self.entries[key])
        t = t.T.contiguous() if key in self.transposed else t
        if name in self.offsets:  # Gemma's γ is stored without its 1 (added in float64, then cast)
            return (t.double() + self.offsets[name]).to(self.dtype)
        return t.to(self.dtype) if t.is_floating_point() else t

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        for name, param in list(module.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            value = self.tensor(f"{prefix}{name}").to(device)
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        module.to(device)

    def release(self, module: nn.Module) -> None:
        device = next(module.parameters()).device
        module.to("meta")
        release_memory(device)


def open_model(model: str, dtype_name: str, device: torch.device):
    """Resolve ``model``, read its config and tokenizer, and build a streaming skeleton.

    :returns: (model skeleton, tokenizer, ArchSpec, SafetensorsSource, resolved path).
    """
    path = resolve_model_path(model)
    config = load_config(path)
    dtype = resolve_dtype(dtype_name, device, getattr(config, "dtype", None))
    skeleton = build_skeleton(config, dtype)
    arch: ArchSpec = spec_for(config)
    # a tied lm_head is often not stored; an untied one must be (else config and weights disagree)
    tied = getattr(config, "tie_word_embeddings", False)
    aliases = {f"{arch.lm_head}.weight": f"{arch.embed}.weight"} if tied else {}
    multimodal = is_multimodal(AutoConfig.from_pretrained(path))
    stored = set(renamed_stored(open_checkpoint(path), config.model_type))
    source = SafetensorsSource(path, dtype, aliases, stored_views(arch, config, skeleton, stored), text_only=multimodal,
                               model_type=config.model_type)
    source.check(skeleton)
    return skeleton, load_tokenizer(path), arch, source, path
