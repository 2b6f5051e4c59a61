"""Text-only loading of multimodal checkpoints whose language model is a supported causal LM.

``google/gemma-3-4b-it`` and its larger siblings are ``Gemma3ForConditionalGeneration``: a vision
tower, a projector and a Gemma 3 text model stored under ``language_model.model.*`` (transformers 5
names it ``model.language_model.*`` in memory and may save it so). orthoquant quantizes the text model:
the config becomes its ``text_config`` as a ``Gemma3ForCausalLM``, and the checkpoint's text tensors are
read under the causal LM's names (the vision tensors are left unread). The run, and its exports, are
then a text-only Gemma 3 that stock transformers and vLLM load as such.
"""
from __future__ import annotations

from .checkpoint import TensorEntry

# multimodal architecture -> the causal LM of its text_config
TEXT_MODELS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# (causal LM name prefix, stored prefix), first match wins
_PREFIXES = (("model.", "language_model.model."), ("model.", "model.language_model."),
             ("lm_head.", "language_model.lm_head."))


def is_multimodal(config) -> bool:
    return (getattr(config, "architectures", None) or [None])[0] in TEXT_MODELS and hasattr(config, "text_config")


def text_config(config):
    """The causal LM config of a multimodal ``config`` (a copy), or ``config`` itself."""
    if not is_multimodal(config):
        return config
    text = config.text_config.__class__.from_dict(config.text_config.to_dict())
    text.architectures = [TEXT_MODELS[config.architectures[0]]]
    text.tie_word_embeddings = getattr(config, "tie_word_embeddings", text.tie_word_embeddings)
    return text


def text_entries(entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """The text model's tensors of a multimodal checkpoint under the causal LM's names."""
    out = {}
    for key, entry in entries.items():
        for ours, stored in _PREFIXES:
            if key.startswith(stored):
                out.setdefault(ours + key[len(stored):], entry)
                break
    return out
