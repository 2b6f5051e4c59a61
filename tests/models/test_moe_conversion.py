"""Stored MoE checkpoint names are read through transformers' own conversion mapping (models/conversion.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from orthoquant.models import conversion, loading
from orthoquant.models.checkpoint import open_checkpoint
from orthoquant.models.loading import open_model

from helpers import token_windows

CPU = torch.device("cpu")
LEGACY_W1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"


@pytest.fixture(autouse=True)
def fresh_mappings():
    conversion.stored_name_mapping.cache_clear()
    conversion.checkpoint_name_mapping.cache_clear()
    yield
    conversion.stored_name_mapping.cache_clear()
    conversion.checkpoint_name_mapping.cache_clear()


def logits_of(folder, ids) -> torch.Tensor:
    skeleton, _, _, source, _ = open_model(str(folder), "float32", CPU)
    source.materialize(skeleton, "", CPU)
    with torch.no_grad():
        return skeleton(ids).logits


def test_legacy_mixtral_loads_through_transformers_mapping_like_the_hand_table(saved_model, tokenizer, monkeypatch):
    folder = saved_model("mixtral")
    assert LEGACY_W1 in open_checkpoint(folder)  # transformers saves Mixtral under its hub names
    ids = token_windows(2, 16, 3, vocab=len(tokenizer))
    derived = logits_of(folder, ids)
    # today's path: the hand table (a model type transformers has no mapping for falls back to it)
    renamed_stored = loading.renamed_stored
    monkeypatch.setattr(loading, "renamed_stored", lambda entries, model_type: renamed_stored(entries, None))
    assert torch.equal(derived, logits_of(folder, ids))
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    assert float((derived - stock).abs().max() / stock.abs().max()) < 1e-5


@pytest.mark.parametrize("family, model_type", [("mixtral", "mixtral"), ("qwen3-moe", "qwen3_moe")])
def test_transformers_mapping_equals_the_hand_table_on_every_stored_name(family, model_type, saved_model,
                                                                          monkeypatch):
    stored = sorted(open_checkpoint(saved_model(family)))
    by_hand = [conversion.renamed_stored({k: None}, None).popitem()[0] for k in stored]
    monkeypatch.setattr(conversion, "_FALLBACK", ())  # what follows comes from transformers alone
    assert [conversion.stored_name_mapping(model_type)(k) for k in stored] == by_hand
    if family == "mixtral":  # not vacuous: every expert and router name was converted
        assert not any("block_sparse_moe" in name for name in by_hand)


@pytest.mark.parametrize("family, model_type", [("mixtral", "mixtral"), ("qwen3-moe", "qwen3_moe")])
def test_exports_name_tensors_as_transformers_saves_them(family, model_type, saved_model):
    """The write mapping reverses the read one on transformers' own saved names (Mixtral's hub names);
    Qwen3-MoE's are orthoquant's, both ways. CT's tensors of a module move with its weight."""
    stored = sorted(open_checkpoint(saved_model(family)))
    read, write = conversion.stored_name_mapping(model_type), conversion.checkpoint_name_mapping(model_type)
    assert [write(read(k)) for k in stored] == stored
    assert any(read(k) != k for k in stored) == (family == "mixtral")
    packed = conversion.by_module(write)("model.layers.1.mlp.experts.3.up_proj.weight_packed")
    assert packed == {"mixtral": "model.layers.1.block_sparse_moe.experts.3.w3.weight_packed",
                      "qwen3-moe": "model.layers.1.mlp.experts.3.up_proj.weight_packed"}[family]


def test_a_model_type_transformers_does_not_cover_falls_back_to_the_hand_table(monkeypatch):
    rename = conversion.stored_name_mapping("not_a_transformers_model_type")
    assert rename(LEGACY_W1) == "model.layers.0.mlp.experts.0.gate_proj.weight"
    conversion.stored_name_mapping.cache_clear()
    monkeypatch.setattr(conversion, "_FALLBACK", ())
    assert conversion.stored_name_mapping("not_a_transformers_model_type")(LEGACY_W1) == LEGACY_W1


def test_a_converter_of_another_form_is_not_read_as_per_expert_leaves(monkeypatch):
    """Sources concatenated along dim 0 (not the rows of each expert) are not gate and up: names stay."""
    def converter(concat_dim):
        return WeightConverter([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj",
                               operations=[MergeModulelist(dim=0), Concatenate(dim=concat_dim)])
    key = "model.layers.0.mlp.experts.2.w3.weight"
    for concat_dim, expected in ((1, "model.layers.0.mlp.experts.2.up_proj.weight"), (0, key)):
        conversion.stored_name_mapping.cache_clear()
        monkeypatch.setattr(conversion, "_transformers_mapping", lambda model_type: [converter(concat_dim)])
        assert conversion.stored_name_mapping("custom_moe")(key) == expected


def test_a_name_whose_reverse_does_not_read_back_is_refused(monkeypatch):
    """``.a.`` is read as ``.b.``: no stored name reads as orthoquant's ``.a.``, so none is written for it."""
    from transformers.core_model_loading import WeightRenaming

    monkeypatch.setattr(conversion, "_transformers_mapping", lambda model_type: [WeightRenaming(r"\.a\.", ".b.")])
    write = conversion.checkpoint_name_mapping("custom_moe")
    assert write("model.b.weight") == "model.a.weight" and write("model.c.weight") == "model.c.weight"
    with pytest.raises(RuntimeError, match="reads back as model.b.weight"):
        write("model.a.weight")
