"""Static NVFP4 input scales: calibrated when each layer is quantized, stored with the layer, used by every
call (evaluation no longer depends on the batch), written as compressed-tensors' input_global_scale, and
runs quantized before them (dynamic inputs) still load and export as before."""
import math

import pytest
import torch
from safetensors import safe_open

from orthoquant import open_run, quantize
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.evaluate.ppl import perplexity
from orthoquant.export import export_run, load_quantized
from orthoquant.fakequant.static_inputs import BUFFER, global_scale_of
from orthoquant.formats import make_format
from orthoquant.models.tiny import tiny_model
from orthoquant.layerfile import read_module

from helpers import token_windows

VOCAB = 300



def nvfp4_run(tmp_path, static=True, preset="rtn-nvfp4"):
    recipe = load_recipe(preset).with_overrides(["calibration.batch_size=4",
                                                 f"activations.static={str(static).lower()}"])
    model = quantize(tiny_model("llama", vocab_size=VOCAB), recipe, token_windows(8, 32, vocab=VOCAB),
                     out=tmp_path / "run")
    return model, tmp_path / "run"


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


@torch.no_grad()
def batch_spread(model, tokens):
    """Largest relative difference between each window's logits alone and inside the batch."""
    together = model(tokens).logits
    alone = torch.cat([model(t[None]).logits for t in tokens])
    return float((together - alone).abs().max() / together.abs().max())


@pytest.fixture
def static_run(tmp_path):
    return nvfp4_run(tmp_path)


def test_every_nvfp4_activation_preset_is_static():
    from orthoquant.recipes import preset_names

    nvfp4 = [n for n in preset_names() if (a := load_recipe(n).activations) is not None and a.format == "nvfp4"]
    assert nvfp4 and all(load_recipe(n).activations.static for n in nvfp4)


def test_static_inputs_make_logits_and_perplexity_batch_invariant(static_run, tmp_path):
    model, run = static_run
    tokens = token_windows(8, 32, 7, vocab=VOCAB)
    assert batch_spread(model, tokens) <= 1e-6
    reopened, *_ = open_run(run, torch.device("cpu"))
    assert batch_spread(reopened, tokens) <= 1e-6
    ppl1, ppl8 = (perplexity(reopened, tokens, torch.device("cpu"), b) for b in (1, 8))
    assert abs(ppl1 - ppl8) <= 1e-6 * ppl1
    dynamic, _ = nvfp4_run(tmp_path / "dynamic", static=False)  # the old behaviour: a batch-wide maximum
    assert batch_spread(dynamic, tokens) > 1e-4


@torch.no_grad()
def test_the_stored_scale_is_448x6_over_the_calibrated_input_amax(static_run):
    model, run = static_run
    names = linear_names(model)
    tensors, _, _ = read_module(run / "layers" / "00000.safetensors")
    for name in [n for n in names if ".layers.0." in n]:
        stored = tensors[f"{name.split('layers.0.')[1]}.{BUFFER}"]
        assert stored.dtype == torch.float32 and stored.shape == (1,)
        assert torch.equal(stored, model.get_submodule(name).input_global_scale)
        assert 0 < float(stored) < math.inf
    # the reciprocal is the dynamic quantizer's global scale of that amax, bit for bit
    fmt = make_format(load_recipe("rtn-nvfp4").activations)
    for amax in (0.37, 3.0, 1234.5):
        x = torch.tensor([[amax, -amax / 3]])
        assert torch.equal((1 / global_scale_of(float(x.abs().max()))).reshape(()), fmt.global_scale(x))


@torch.no_grad()
def test_the_fake_quant_uses_the_stored_scale(static_run):
    model, _ = static_run
    tokens = token_windows(2, 32, 3, vocab=VOCAB)
    before = model(tokens).logits
    model.get_submodule("model.layers.1.mlp.down_proj").input_global_scale.mul_(3)
    assert not torch.equal(model(tokens).logits, before)


def test_compressed_tensors_writes_the_stored_input_global_scale(static_run, tmp_path):
    model, run = static_run
    export_run(run, tmp_path / "ct", "compressed-tensors")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for name in linear_names(model):
            assert torch.equal(f.get_tensor(f"{name}.{BUFFER}"), model.get_submodule(name).input_global_scale), name
    loaded = load_quantized(tmp_path / "ct")
    tokens = token_windows(2, 32, 5, vocab=VOCAB)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    export_run(run, tmp_path / "native", "native")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "native")(tokens).logits, model(tokens).logits)


def test_a_dynamic_run_still_loads_and_exports_with_scales_calibrated_at_export(tmp_path, tokenizer, text_file):
    model, run = nvfp4_run(tmp_path, static=False)  # as runs of the presets before static inputs
    assert not any(BUFFER in m._buffers for m in model.modules())
    reopened, *_ = open_run(run, torch.device("cpu"))
    tokens = token_windows(2, 32, 5, vocab=VOCAB)
    with torch.no_grad():
        assert torch.equal(reopened(tokens).logits, model(tokens).logits)
    tokenizer.save_pretrained(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # export-time calibration needs the tokenizer
        (run / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    export_run(run, tmp_path / "ct", "compressed-tensors", calib=str(text_file))
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        scales = [f.get_tensor(f"{name}.{BUFFER}") for name in linear_names(model)]
    assert all(0 < float(s) < math.inf for s in scales)


def test_a_static_recipe_on_a_layer_without_scales_is_an_error(tmp_path):
    from orthoquant.config import Recipe
    from orthoquant.fakequant.install import install_layer_quantizers
    from orthoquant.models.generic import spec_for

    model, run = nvfp4_run(tmp_path, static=False)
    static = Recipe.from_yaml((run / "recipe.yaml").read_text()).with_overrides(["activations.static=true"])
    with pytest.raises(UserError, match=f"no calibrated {BUFFER}"):
        install_layer_quantizers(model.model.layers[0], "model.layers.0.", spec_for(model.config), static)
