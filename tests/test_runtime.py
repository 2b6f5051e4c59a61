"""The model at inference has one home (orthoquant.runtime): a run opened from any entry point is refused
with one message until it is complete, and the runtime a reopened run installs is the one quantizing
installed (online transforms, static KV scales, fake-quantizers)."""
import pytest
import torch

from orthoquant import open_run, quantize
from orthoquant.cli import main
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.export.contents import RunContents
from orthoquant.fakequant.kvcache import kv_scales
from orthoquant.models.tiny import tiny_model
from orthoquant.runner import LayerwiseQuantizer

from helpers import Interrupt, token_windows

CPU = torch.device("cpu")
# QuaRot W4A4KV4 with the KV scales static: online Hadamards (Q/K, o_proj and down_proj inputs), stored
# per-tensor KV scales and activation fake-quant all have to be reinstalled on a reopened run.
OVERRIDES = ["calibration.batch_size=4", "kv_cache.static=true", "kv_cache.group_size=0", "kv_cache.symmetric=true"]


def windows(n=8, seqlen=24, seed=0):
    return token_windows(n, seqlen, seed)


@pytest.fixture
def unfinished_run(tmp_path, monkeypatch):
    """A run folder whose quantization crashed at layer 1 (run.json says "running")."""
    def crash(self, layer, index, prefix, inputs):
        raise Interrupt

    monkeypatch.setattr(LayerwiseQuantizer, "_quantize_layer", crash)
    with pytest.raises(Interrupt):
        quantize(tiny_model("llama"), load_recipe("rtn-w4a16", OVERRIDES[:1]), windows(), out=tmp_path / "run")
    monkeypatch.undo()
    return tmp_path / "run"


def test_an_unfinished_run_is_refused_with_one_message_by_every_entry_point(unfinished_run, text_file, tmp_path,
                                                                            capsys):
    with pytest.raises(UserError, match="is not complete") as refused:
        open_run(unfinished_run, CPU)
    message = str(refused.value)
    with pytest.raises(UserError) as by_contents:
        RunContents(unfinished_run)
    assert str(by_contents.value) == message
    capsys.readouterr()
    assert main(["export", str(unfinished_run), "--format", "native", "--out", str(tmp_path / "native")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "native").exists()
    assert main(["eval", str(unfinished_run), "--ppl", str(text_file)]) == 2
    assert message in capsys.readouterr().err


def runtime_of(model) -> tuple[list, dict[str, torch.Tensor]]:
    """What runs in each decoder layer besides its weights: (per layer its number of online Q/K ops, whether
    keys/values are quantized, and per linear its input-pipeline ops per stage and whether its input is
    quantized; every layer's stored KV scales by name)."""
    structure, scales = [], {}
    for i, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        linears = {name: ({stage: len(ops) for stage, ops in m.orthoquant_inputs.stages.items()},
                          m.orthoquant_inputs.quantizer is not None)
                   for name, m in layer.named_modules() if hasattr(m, "orthoquant_inputs")}
        structure.append((len(getattr(attention, "orthoquant_qk", ())), attention.orthoquant_kv is not None, linears))
        scales.update({f"{i}.{name}": t for name, t in kv_scales(attention).items()})
    return structure, scales


def test_a_reopened_run_runs_the_model_quantizing_left(tmp_path):
    recipe = load_recipe("quarot-w4a4kv4", OVERRIDES)
    model = quantize(tiny_model("llama", num_hidden_layers=3), recipe, windows(), out=tmp_path / "run")
    w = windows(seed=1)
    with torch.no_grad():
        reference = model(w).logits
    structure, scales = runtime_of(model)
    assert all(qk and kv for qk, kv, _ in structure) and len(scales) == 2 * len(structure)
    assert structure[0][2]["mlp.down_proj"] == ({"plan": 1, "solver": 0}, True)  # R4 online, then fake-quant
    reopened = {
        "open_run": lambda: open_run(tmp_path / "run", CPU)[0],
        "export": lambda: RunContents(tmp_path / "run").open_model(CPU, torch.float32)[0],
        "resume": lambda: quantize(tiny_model("llama", num_hidden_layers=3), recipe, windows(), out=tmp_path / "run"),
    }
    for how, reopen in reopened.items():
        loaded = reopen()
        their_structure, their_scales = runtime_of(loaded)
        assert their_structure == structure, how
        assert their_scales.keys() == scales.keys() and all(torch.equal(their_scales[k], scales[k]) for k in scales)
        with torch.no_grad():
            assert torch.equal(loaded(w).logits, reference), how
