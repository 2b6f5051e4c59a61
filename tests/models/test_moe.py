"""Mixture of experts (Qwen3-MoE, Mixtral; 4 experts, top-2), weight-only: experts held as
per-expert nn.Linear, each solved on its routed tokens, the router kept in full precision,
``calibration.moe_all_experts``, a starved expert damped and logged."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoquant import open_run
from orthoquant.config import Recipe
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.export import export_run
from orthoquant.models.experts import ExpertList
from orthoquant.models.layout import to_layout_
from orthoquant.models.generic import spec_for
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import quantize, quantize_pretrained

from helpers import token_windows

CPU = torch.device("cpu")
WINDOWS = token_windows(8, 24)
IDS = token_windows(2, 21, 3)


def recipe(name, *sets):
    return load_recipe(name, ["calibration.batch_size=4", *sets])


def starve_expert(model, expert: int = 3):
    """Routers never choose ``expert`` (its logit is -inf) unless asked for every expert (top_k = all)."""
    for layer in model.model.layers:
        router = layer.mlp.gate
        original = router.forward.__func__

        def forward(self, hidden_states, original=original):
            hooked = self.weight.data.clone()
            self.weight.data[expert] = 0
            logits, scores, indices = original(self, hidden_states)
            self.weight.data = hooked
            if self.top_k < self.num_experts:  # recompute without the starved expert
                probs = torch.softmax(logits.float().index_fill(-1, torch.tensor([expert]), float("-inf")), -1)
                scores, indices = torch.topk(probs, self.top_k, dim=-1)
                scores = (scores / scores.sum(-1, keepdim=True)).to(logits.dtype)
            return logits, scores, indices
        router.forward = forward.__get__(router)
    return model


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
@torch.no_grad()
def test_experts_as_linears_compute_the_same_function(family):
    model = tiny_model(family)
    ref = model(IDS).logits
    to_layout_(model, spec_for(model.config))
    assert isinstance(model.model.layers[0].mlp.experts, ExpertList)
    assert torch.equal(model(IDS).logits, ref)


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_each_expert_is_solved_on_its_tokens_and_the_router_stays_fp(family, saved_model, text_file, tmp_path):
    folder, losses = saved_model(family), {}
    stock = AutoModelForCausalLM.from_pretrained(folder)
    sets = [f"calibration.source={text_file}", "calibration.nsamples=8", "calibration.seqlen=32"]
    for solver in ("rtn", "gptq"):
        run = quantize_pretrained(str(folder), recipe(f"{solver}-w4a16", *sets), tmp_path / solver, CPU)
        losses[solver] = {k: v["loss"] for k, v in run.info()["metrics"]["0"]["linears"].items()}
        model, *_ = open_run(run.path, CPU)
        for i, layer in enumerate(model.model.layers):  # full precision: only the mlp norm's γ folded into it
            stock_layer = stock.model.layers[i]
            gamma = stock_layer.post_attention_layernorm.weight.double()
            assert torch.equal(layer.mlp.gate.weight, (stock_layer.mlp.gate.weight.double() * gamma).float())
        assert export_run(run.path, tmp_path / f"{solver}-native", "native")["checks"]["load_quantized"]["bit_exact"]
    experts = {k for k in losses["gptq"] if ".experts." in k}
    assert len(experts) == 4 * 3
    assert all(losses["gptq"][k] < losses["rtn"][k] for k in losses["rtn"]), losses


def test_a_starved_expert_is_damped_and_logged_or_gets_all_tokens(caplog):
    with caplog.at_level(logging.WARNING, logger="orthoquant.models.experts"):
        quantize(starve_expert(tiny_model("qwen3-moe")), recipe("gptq-w4a16"), WINDOWS)
    starved = [r.getMessage() for r in caplog.records if "mlp.experts.3." in r.getMessage()]
    assert starved and all("saw 0 calibration tokens" in m for m in starved)
    assert not [r for r in caplog.records if "mlp.experts.0." in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orthoquant.models.experts"):
        model = quantize(starve_expert(tiny_model("qwen3-moe")), recipe("gptq-w4a16", "calibration.moe_all_experts=true"),
                         WINDOWS)
    assert not caplog.records  # every expert saw every token while statistics were collected
    with torch.no_grad():  # propagation and inference still route as the model does: expert 3 unused
        assert torch.isfinite(model(IDS).logits).all()


# the per-expert layout the hub holds, stock transformers reads and vLLM's fused-MoE loader reads
HUB_EXPERT_NAMES = {"qwen3-moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}


@pytest.mark.parametrize("family", sorted(HUB_EXPERT_NAMES))
def test_w4a16_compressed_tensors_per_expert_reloads_in_stock_transformers(family, tmp_path):
    from safetensors import safe_open

    r = recipe("gptq-w4a16-g128", "weights.group_size=32")
    model = quantize(tiny_model(family), r, WINDOWS, out=tmp_path / "run")
    report = export_run(tmp_path / "run", tmp_path / "ct", "compressed-tensors", verify="stock")
    assert report["checks"]["stock_transformers"]["bit_exact"]
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed_bytes = sum(f.get_tensor(k).nbytes for k in keys if k.endswith(".weight_packed"))
    block, leaves = HUB_EXPERT_NAMES[family]
    for e in range(4):
        for leaf in leaves:
            names = {f"model.layers.0.{block}.experts.{e}.{leaf}.{t}"
                     for t in ("weight_packed", "weight_scale", "weight_shape")}
            assert names <= keys
    assert f"model.layers.0.{block}.gate.weight" in keys  # the router, in full precision
    assert report["sizes"]["linear_bytes"] > packed_bytes  # every expert's codes and scales counted as a linear's
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        a, b = model(IDS).logits, stock(IDS).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5


@pytest.mark.parametrize("family", sorted(HUB_EXPERT_NAMES))
def test_a_gptq_export_of_experts_is_refused_before_anything_is_written(family, tmp_path):
    quantize(tiny_model(family), recipe("gptq-w4a16-g128", "weights.group_size=32"), WINDOWS, out=tmp_path / "run")
    with pytest.raises(UserError, match="mixture of experts"):
        export_run(tmp_path / "run", tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()


def test_a_mixed_scheme_mixtral_export_targets_its_linears_by_their_hub_names(tmp_path):
    """Two weight schemes (o_proj at 8 bits): each CT group names its linears, the experts by the
    checkpoint's names (``w1``/``w3``/``w2``), and the stock reload holds."""
    import json

    r = recipe("gptq-w4a16-g128", "weights.group_size=32")
    weights = r.to_dict()["weights"]
    r = Recipe.from_dict({**r.to_dict(), "overrides": [{"pattern": "o_proj", "weights": {**weights, "bits": 8}}]})
    quantize(tiny_model("mixtral"), r, WINDOWS, out=tmp_path / "run")
    report = export_run(tmp_path / "run", tmp_path / "ct", "compressed-tensors", verify="stock")
    assert report["checks"]["stock_transformers"]["bit_exact"]
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = {t for group in groups.values() for t in group["targets"]}
    assert {f"model.layers.1.block_sparse_moe.experts.3.{leaf}" for leaf in ("w1", "w3", "w2")} <= targets
    assert not any(".mlp." in t for t in targets)


@pytest.mark.parametrize("family, stacked", [("qwen3-moe", False), ("qwen3-moe", True), ("mixtral", False)])
def test_streamed_checkpoint_reads_every_expert(family, stacked, saved_model, text_file, tmp_path, tokenizer):
    """Per-expert names (as transformers saves and the hub holds them; Mixtral's w1/w3/w2) and the stacked
    3-D layout of transformers 5's modules."""
    from safetensors.torch import save_file

    folder = saved_model(family)
    if stacked:
        state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    sets = [f"calibration.source={text_file}", "calibration.nsamples=4", "calibration.seqlen=32"]
    run = quantize_pretrained(str(folder), recipe("fp16", *sets), tmp_path / "run", CPU)
    model, *_ = open_run(run.path, CPU)
    ids = token_windows(2, 32, 3, vocab=len(tokenizer))
    with torch.no_grad():
        a, b = AutoModelForCausalLM.from_pretrained(folder)(ids).logits, model(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
