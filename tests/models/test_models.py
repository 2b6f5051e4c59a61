import pytest
import torch

from orthoquant.errors import UnknownNameError
from orthoquant.models.spec import ARCHITECTURES
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import fold_all_norms, untie_embeddings
from orthoquant.models.tiny import FAMILIES, TINY_CONFIGS, tiny_config, tiny_model

from helpers import token_windows

IDS = token_windows(2, 19)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_norm_folding_preserves_logits(family):
    model = tiny_model(family)
    before = logits(model)
    arch = spec_for(model.config)
    fold_all_norms(model, arch)
    after = logits(model)
    assert (after - before).abs().max() < 1e-5 * before.abs().max()
    folded = {f".{g.norm}.weight" for g in arch.norm_groups}  # Gemma's sandwich norms are not folded
    for name, p in model.named_parameters():
        if name.endswith(tuple(folded)) or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_are_randomized(family):
    model = tiny_model(family)
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.std() > 0.1  # Hugging Face's γ = 1 would hide folding bugs
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if family == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.std() > 0.1


def test_skipping_a_fold_is_detected():
    """The invariance test can fail: folding γ into only some consumers changes the logits."""
    model = tiny_model("llama")
    before = logits(model)
    layer = model.model.layers[0]
    gamma = layer.input_layernorm.weight.detach().clone()
    layer.self_attn.q_proj.weight.data *= gamma
    layer.input_layernorm.weight.data.fill_(1.0)  # k and v never received γ
    assert (logits(model) - before).abs().max() > 1e-2


def test_tied_embeddings_are_untied_before_edits():
    model = tiny_model("llama-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    arch = spec_for(model.config)
    untie_embeddings(model, arch)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.lm_head.weight.data.mul_(2)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_an_architecture_without_a_spec_gets_the_generic_one():
    arch = spec_for(tiny_config("gpt2"))
    assert arch.generic and arch.layers == "transformer.h" and arch.norm_groups == ()
    with pytest.raises(UnknownNameError, match="names no architecture; full support: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        spec_for(tiny_config("llama", architectures=[]))


def test_every_family_is_registered():
    for family in FAMILIES:
        assert tiny_config(family).architectures[0] in ARCHITECTURES
