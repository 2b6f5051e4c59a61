"""Static FP8 KV-cache scales: calibrated by the run from post-RoPE keys and values, used by its
fake-quant, exported to compressed-tensors exactly (``self_attn.k_scale``/``v_scale`` +
``kv_cache_scheme``) and reproduced by load_quantized and stock transformers; KV caches vLLM cannot
serve are refused. Also the streamed, sharded compressed-tensors writer."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from orthoquant import open_run, quantize
from orthoquant.config import QuantSpec, Recipe
from orthoquant.errors import ConfigError, UserError
from orthoquant.export import export_run, load_quantized
from orthoquant.export.shards import INDEX, ShardWriter, read_tensors
from orthoquant.models.tiny import tiny_model
from orthoquant.layerfile import read_module

from helpers import tiny_run, token_windows
from test_export import recipe_of, rel_diff

FP8_KV = {"format": "fp8", "bits": 8, "group_size": 0, "static": True}
W4G32 = {"format": "int", "bits": 4, "symmetric": True, "group_size": 32}


def kv_of(model, index):
    return model.model.layers[index].self_attn


def stock_quantizes_kv(model) -> bool:
    """False where stock transformers dropped ``kv_cache_scheme`` (>= 5.25 with compressed-tensors 0.20.1:
    see ``orthoquant.export.compressed_tensors.stock``); the lock pins versions where it does not."""
    return hasattr(kv_of(model, 0), "k_scale")


def scales_of(model):
    """[(k_scale, v_scale)] per layer, as float32 (1,) tensors."""
    return [(kv_of(model, i).k_scale.float(), kv_of(model, i).v_scale.float())
            for i in range(len(model.model.layers))]


@pytest.fixture
def kv_run(tmp_path, tokenizer):
    """The FP8 W8A8 + static FP8 KV preset on a tiny Llama: (in-memory quantized model, run folder)."""
    return tiny_run(tmp_path, recipe_of("rtn-w8a8-fp8-kv8"), tokenizer)


@torch.no_grad()
def post_rope_amax(model, index, tokens):
    """max |key| after RoPE and max |value| of layer ``index``, computed outside orthoquant's attention
    function: k_proj/v_proj outputs (their inputs fake-quantized by the run's hooks) and transformers'
    own RoPE on the position embeddings the layer receives."""
    attention = kv_of(model, index)
    seen = {}

    def keep(name, value):
        seen[name] = value  # returns None: the hooks change nothing

    hooks = [attention.k_proj.register_forward_hook(lambda m, a, out: keep("k", out)),
             attention.v_proj.register_forward_hook(lambda m, a, out: keep("v", out)),
             attention.register_forward_pre_hook(lambda m, a, kw: keep("pe", kw["position_embeddings"]),
                                                 with_kwargs=True)]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    head_dim = model.config.head_dim
    k = seen["k"].view(*seen["k"].shape[:2], -1, head_dim).transpose(1, 2)
    cos, sin = seen["pe"]
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return float(k.abs().max()), float(seen["v"].abs().max())


def test_the_run_calibrates_amax_over_448_of_post_rope_keys_and_values(kv_run, tokenizer):
    model, run = kv_run
    tokens = token_windows(4, 24, vocab=len(tokenizer))  # the calibration windows (one batch of 4)
    for index in range(2):
        k_amax, v_amax = post_rope_amax(model, index, tokens)
        k_scale, v_scale = scales_of(model)[index]
        # float32 division, as the format's fit, rounded to the preset's scale_dtype (auto: bfloat16 here)
        assert torch.equal(k_scale, (torch.tensor([k_amax]) / 448).bfloat16().float())
        assert torch.equal(v_scale, (torch.tensor([v_amax]) / 448).bfloat16().float())
        tensors, _, _ = read_module(run / "layers" / f"{index:05d}.safetensors")  # stored with the layer
        assert torch.equal(tensors["self_attn.k_scale"], k_scale) and torch.equal(tensors["self_attn.v_scale"], v_scale)


def test_the_static_scales_are_what_the_run_quantizes_with(kv_run, tokenizer):
    model, run = kv_run
    tokens = token_windows(2, 32, 3, vocab=len(tokenizer))
    reopened, *_ = open_run(run, torch.device("cpu"))
    assert rel_diff(model, reopened, tokens) == 0
    with torch.no_grad():
        quantized = model(tokens).logits
        for i in range(2):
            kv_of(model, i).k_scale.mul_(3)  # read at every call (x3: FP8 barely sees a power of two)
        assert not torch.equal(model(tokens).logits, quantized)


def test_static_fp8_kv_cache_round_trips_through_compressed_tensors(kv_run, tmp_path, tokenizer):
    model, run = kv_run
    report = export_run(run, tmp_path / "ct", "compressed-tensors", verify="stock")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                         "dynamic": False, "group_size": None}  # what vLLM validates
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for i, (k_scale, v_scale) in enumerate(scales_of(model)):
            assert torch.equal(f.get_tensor(f"model.layers.{i}.self_attn.k_scale"), k_scale)  # the run's, exactly
            assert torch.equal(f.get_tensor(f"model.layers.{i}.self_attn.v_scale"), v_scale)
    tokens = token_windows(2, 32, 4, vocab=len(tokenizer))
    loaded = load_quantized(tmp_path / "ct")
    assert rel_diff(model, loaded, tokens) == 0  # export = run, KV quantization included
    assert [tuple(map(torch.Tensor.tolist, s)) for s in scales_of(loaded)] == \
        [tuple(map(torch.Tensor.tolist, s)) for s in scales_of(model)]
    stock_check = report["checks"]["stock_transformers"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # CT quantizes K/V with the stored scales
    if not stock_quantizes_kv(stock):
        assert stock_check["kv_cache_scales"] == {"bit_exact": True, "scales": 4, "source": "checkpoint"}
        assert "did not attach the KV-cache scales" in stock_check["note"] and not stock_check["logits_checked"]
        return
    assert stock_check["logits_checked"] and stock_check["bit_exact"]
    assert stock_check["kv_cache_scales"] == {"bit_exact": True, "scales": 4, "source": "loaded by compressed-tensors"}
    assert rel_diff(model, stock, tokens) == 0
    for layer in stock.model.layers:
        layer.self_attn.quantization_enabled = False  # without CT's KV (and activation) quantization
    assert rel_diff(model, stock, tokens) > 1e-3
    assert "--kv-cache-dtype fp8" in (tmp_path / "ct" / "README.md").read_text()


def _fail_first_forward(real):
    calls = []

    def compare(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("no CPU kernel for this scheme\nsecond line")
        return real(*args)
    return compare


@pytest.mark.parametrize("fallback, reason", [
    ("not_attached", "did not attach the KV-cache scales"),
    ("forward_fails", "CT's quantized forward failed (no CPU kernel for this scheme); ")])
def test_without_cts_quantized_forward_the_stock_check_reports_why_and_compares_the_stored_kv_scales(
        fallback, reason, kv_run, tmp_path, monkeypatch):
    """The stock check's fallbacks, which the locked versions never take by themselves (transformers >= 5.25
    leaves the KV-cache scales unattached; CT's CPU forward lacks some kernels): the export loads decompressed,
    its logits are reported but not checked, and the KV-cache scales are compared in the checkpoint."""
    from orthoquant.export.compressed_tensors import stock

    if fallback == "not_attached":
        monkeypatch.setattr(stock, "_attached_kv_scales", lambda model, contents: False)
    else:
        monkeypatch.setattr(stock, "compare_logits", _fail_first_forward(stock.compare_logits))
    _, run = kv_run
    check = export_run(run, tmp_path / "ct", "compressed-tensors", verify="stock")["checks"]["stock_transformers"]
    assert check["kv_cache_scales"] == {"bit_exact": True, "scales": 4, "source": "checkpoint"}
    assert not check["logits_checked"] and check["label"] == "stock transformers, plain from_pretrained"
    assert reason in check["note"] and check["note"].endswith("KV-cache scales compared in the checkpoint")


def test_native_export_keeps_the_static_scales_in_their_dtype(tmp_path, tokenizer):
    r = recipe_of("rtn-w8a8-fp8-kv8").with_overrides(["weights.scale_dtype=bfloat16"])  # KV scales: float32
    model, run = tiny_run(tmp_path, r, tokenizer)
    report = export_run(run, tmp_path / "native", "native", torch.bfloat16)
    assert report["checks"]["load_quantized"]["bit_exact"]  # a bf16 KV scale would not be the run's
    stored, _, _ = read_module(tmp_path / "native" / "layers" / "00001.safetensors")
    assert stored["self_attn.k_scale"].dtype == torch.float32 and stored["mlp.up_proj.qscale"].dtype == torch.bfloat16
    assert torch.equal(stored["self_attn.v_scale"], kv_of(model, 1).v_scale)


def test_a_resumed_run_reloads_its_static_scales(kv_run, tokenizer):
    model, run = kv_run
    recipe = Recipe.from_yaml((run / "recipe.yaml").read_text())
    again = quantize(tiny_model("llama", vocab_size=len(tokenizer)), recipe, token_windows(4, 24, vocab=len(tokenizer)),
                     out=run)
    assert [tuple(map(torch.Tensor.tolist, s)) for s in scales_of(again)] == \
        [tuple(map(torch.Tensor.tolist, s)) for s in scales_of(model)]
    assert rel_diff(model, again, token_windows(2, 32, 6, vocab=len(tokenizer))) == 0


@pytest.mark.parametrize("kv_cache, message", [
    ({"format": "fp8", "bits": 8, "group_size": -1}, "dynamic KV-cache quantization.*static=true.*--format native"),
    ({"format": "fp8", "bits": 8, "group_size": 16}, "dynamic KV-cache quantization \\(group_size=16"),
    ({"format": "int", "bits": 4, "group_size": 0, "static": True}, "INT4 KV-cache quantization: vLLM serves FP8"),
    ({"format": "int", "bits": 4, "symmetric": False, "group_size": 8}, "INT4 KV-cache quantization"),
])
def test_compressed_tensors_refuses_kv_caches_vllm_cannot_serve(kv_cache, message, tmp_path, tokenizer):
    _, run = tiny_run(tmp_path, recipe_of({"weights": W4G32, "kv_cache": kv_cache}), tokenizer)
    with pytest.raises(UserError, match=message):
        export_run(run, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_static_scales_must_be_exact_in_the_export_dtype(tmp_path, tokenizer):
    r = recipe_of({"weights": {**W4G32, "scale_dtype": "bfloat16"}, "kv_cache": FP8_KV})
    _, run = tiny_run(tmp_path, r, tokenizer)
    with pytest.raises(UserError, match="k_scale.*--set kv_cache.scale_dtype=bfloat16"):
        export_run(run, tmp_path / "ct", "compressed-tensors", torch.bfloat16)
    r = recipe_of({"weights": {**W4G32, "scale_dtype": "bfloat16"}, "kv_cache": {**FP8_KV, "scale_dtype": "bfloat16"}})
    model, run = tiny_run(tmp_path / "bf16", r, tokenizer)
    report = export_run(run, tmp_path / "ct", "compressed-tensors", torch.bfloat16, verify="stock")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.k_scale")
    assert stored.dtype == torch.bfloat16 and torch.equal(stored.float(), kv_of(model, 0).k_scale)
    assert report["checks"]["stock_transformers"]["kv_cache_scales"]["bit_exact"]


@pytest.mark.parametrize("section, spec, message", [
    ("kv_cache", {**FP8_KV, "group_size": 32}, "static=True with group_size=32.*group_size=0"),
    ("kv_cache", {**FP8_KV, "group_size": -1}, "group_size=0"),
    ("kv_cache", {"format": "int", "bits": 8, "symmetric": False, "group_size": 0, "static": True}, "zero point"),
    ("kv_cache", {"format": "nvfp4", "bits": 4, "group_size": 16, "static": True}, "static scales exist for"),
    ("activations", {"format": "fp8", "bits": 8, "group_size": 0, "static": True},
     "activations.static=true is supported for \\[.nvfp4.\\]"),
    ("weights", {"format": "fp8", "bits": 8, "group_size": 0, "static": True}, "weights.static=true"),
])
def test_static_scales_are_validated_in_the_recipe(section, spec, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"name": "x", "weights": W4G32, section: spec})


def test_static_kv_spec_round_trips_through_yaml():
    r = Recipe.from_dict({"name": "x", "weights": W4G32, "kv_cache": FP8_KV})
    assert r.kv_cache == QuantSpec(format="fp8", bits=8, group_size=0, static=True)
    assert Recipe.from_yaml(r.to_yaml()) == r


# --- the streamed, sharded writer ---------------------------------------------------------------
def test_shard_writer_caps_shards_and_never_splits_a_group(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=100)
    sizes = {"a": 60, "b": 60, "c": 30, "d": 200, "e": 10}  # bytes (uint8 tensors)
    for name, size in sizes.items():
        writer.add({f"{name}.x": torch.zeros(size, dtype=torch.uint8)})
    assert writer.finish() == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 360
    assert index["weight_map"] == {"a.x": "model-00001-of-00004.safetensors", "b.x": "model-00002-of-00004.safetensors",
                                   "c.x": "model-00002-of-00004.safetensors", "d.x": "model-00003-of-00004.safetensors",
                                   "e.x": "model-00004-of-00004.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX, *set(index["weight_map"].values())])
    assert {k: v.numel() for k, v in read_tensors(tmp_path).items()} == {f"{k}.x": v for k, v in sizes.items()}
    single = ShardWriter(tmp_path / "one", max_bytes=100)
    (tmp_path / "one").mkdir()
    single.add({"a": torch.zeros(3)})
    assert single.finish() == ["model.safetensors"] and not (tmp_path / "one" / INDEX).exists()


def test_compressed_tensors_streams_one_run_file_at_a_time_into_shards(kv_run, tmp_path, tokenizer, monkeypatch):
    import orthoquant.export.compressed_tensors.compress as ct

    model, run = kv_run
    trees, skeletons, tree, skeleton = [], [], ct._module_tree, ct.build_skeleton
    monkeypatch.setattr(ct, "_module_tree", lambda linears: trees.append([lin.name for lin in linears])
                        or tree(linears))
    monkeypatch.setattr(ct, "build_skeleton", lambda *a: skeletons.append(skeleton(*a)) or skeletons[-1])
    report = export_run(run, tmp_path / "ct", "compressed-tensors", max_shard_bytes=1, verify="stock")
    assert [sorted({n.split(".")[2] for n in names}) for names in trees] == [["0"], ["1"]]  # one layer per tree
    assert skeletons and all(p.is_meta for m in skeletons for p in m.parameters())  # names only, never filled
    index = json.loads((tmp_path / "ct" / INDEX).read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # rest, layer 0, layer 1
    by_shard = {s: {k for k, v in index.items() if v == s} for s in shards}
    assert all(k.startswith("model.layers.0.") for k in by_shard[shards[1]])
    assert all(k.startswith("model.layers.1.") for k in by_shard[shards[2]])
    assert report["checks"]["load_quantized"]["bit_exact"]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    if stock_quantizes_kv(stock):
        assert report["checks"]["stock_transformers"]["bit_exact"]
        assert rel_diff(model, stock, token_windows(2, 32, 7, vocab=len(tokenizer))) == 0
    # one shard or three: the same tensors
    export_run(run, tmp_path / "one", "compressed-tensors")
    one, three = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "ct")
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one)


def test_gptq_shares_the_shard_writer(tmp_path, tokenizer):
    r = recipe_of({"weights": {**W4G32, "scale_dtype": "float16"}})
    model, run = tiny_run(tmp_path, r, tokenizer)
    export_run(run, tmp_path / "gptq", "gptq", max_shard_bytes=1)
    index = json.loads((tmp_path / "gptq" / INDEX).read_text())["weight_map"]
    assert len(set(index.values())) == 3 and "model.layers.1.mlp.down_proj.qweight" in index
    assert rel_diff(model, load_quantized(tmp_path / "gptq"), token_windows(2, 32, 8, vocab=len(tokenizer))) == 0
