"""Exports: compressed-tensors reloads in stock transformers, native reloads bit-exactly for every preset,
the GPTQ layout matches a plain unpacker, a flipped byte anywhere is caught, and the CLI contract."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orthoquant import open_run
from orthoquant.autoscale import resolve_auto_scales
from orthoquant.cli import main
from orthoquant.config import Recipe
from orthoquant.recipes import load_recipe, preset_names
from orthoquant.errors import UserError
from orthoquant.export import export_run, load_quantized
from orthoquant.export.command import format_report
from orthoquant.export.verify import MANIFEST, CorruptExportError
from orthoquant.layerfile import read_module

from helpers import tiny_run, token_windows

ROTATED = {"transforms": [{"site": "residual", "kind": "random_hadamard", "seed": 0},
                          {"site": "attn_value", "kind": "hadamard"}]}
W4G32 = {"format": "int", "bits": 4, "symmetric": True, "group_size": 32}


def recipe_of(base: dict | str) -> Recipe:
    """A preset by name or a recipe from a dict, in calibration batches of 4."""
    data = load_recipe(base).to_dict() if isinstance(base, str) else {"name": "test", **base}
    data["calibration"] = {**data.get("calibration", {}), "batch_size": 4}
    return Recipe.from_dict(data)



@torch.no_grad()
def rel_diff(a_model, b_model, tokens):
    a, b = a_model(tokens).logits.float(), b_model(tokens).logits.float()
    return float((a - b).abs().max() / a.abs().max())


def stored_codes(run):
    """Full linear name -> (packed codes as the run stores them, scales)."""
    codes = {}
    for path in sorted((run / "layers").iterdir()):
        tensors, meta, _ = read_module(path)
        for lin in meta:
            codes[f"model.layers.{int(path.stem)}.{lin}"] = (tensors[f"{lin}.qcodes"], tensors[f"{lin}.qscale"])
    return codes


# --- compressed-tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_rotated_w4a16_compressed_tensors_loads_in_stock_transformers(family, dtype, tmp_path, tokenizer):
    scale_dtype = str(dtype).removeprefix("torch.")
    r = recipe_of({**ROTATED, "weights": {**W4G32, "scale_dtype": scale_dtype}, "solver": {"name": "gptq"}})
    model, run = tiny_run(tmp_path, r, tokenizer, family)
    export_run(run, tmp_path / "ct", "compressed-tensors", dtype)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # dtype from config.json
    assert stock.dtype == dtype
    tokens = token_windows(2, 32, 5, vocab=len(tokenizer))
    if dtype == torch.float32:
        assert rel_diff(model, stock, tokens) <= 1e-5
    else:  # the run's model computing in bf16 (its weights rounded once to bf16) vs the stock reload
        reference, *_ = open_run(run, torch.device("cpu"), torch.bfloat16)
        assert rel_diff(reference, stock, tokens) <= 2 * torch.finfo(torch.bfloat16).eps
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        for name, (packed, scale) in stored_codes(run).items():
            assert torch.equal(f.get_tensor(f"{name}.weight_packed"), packed), name  # same packed integers
            assert torch.equal(f.get_tensor(f"{name}.weight_scale").float(), scale.float()), name
            assert f.get_tensor(f"{name}.weight_scale").dtype == dtype


def test_online_hadamard_in_transform_config_needs_load_quantized(tmp_path, tokenizer):
    transforms = ROTATED["transforms"] + [{"site": "down_input", "kind": "hadamard", "block_size": 32}]
    model, run = tiny_run(tmp_path, recipe_of({"transforms": transforms, "weights": W4G32}), tokenizer)
    report = export_run(run, tmp_path / "ct", "compressed-tensors", verify="stock")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    scheme = config["quantization_config"]["transform_config"]["config_groups"]["R4"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 32
    assert [a["location"] for a in scheme["apply"]] == ["input"]
    assert config["orthoquant"]["online_transforms"] == ["R4"]
    assert "must run at inference" in (tmp_path / "ct" / "README.md").read_text()
    tokens = token_windows(2, 32, 6, vocab=len(tokenizer))
    assert rel_diff(model, load_quantized(tmp_path / "ct"), tokens) <= 1e-5
    assert rel_diff(model, AutoModelForCausalLM.from_pretrained(tmp_path / "ct"), tokens) > 1e-2  # drops R4
    stock = report["checks"]["stock_transformers"]  # with CT's own transforms, as vLLM applies them
    assert stock["online_transforms_applied_with_ct"] and stock["max_rel_diff"] <= 1e-5
    assert "re-applied" in stock["label"]  # what the printed line names: not a plain from_pretrained
    printed = format_report(report)
    assert "re-applied" in printed and "stock_transformers" not in printed


def plain_nibbles(packed, cols):
    """Two 4-bit codes per byte, column 2j in the low nibble (written out, not our unpacker)."""
    out = torch.empty(packed.shape[0], cols, dtype=torch.uint8)
    for j in range(cols):
        out[:, j] = (packed[:, j // 2].to(torch.int32) >> 4 * (j % 2)) & 0xF
    return out


def run_codes(run, name):
    """Unpacked codes of one linear as the run stores them."""
    from orthoquant.config import QuantSpec
    from orthoquant.formats import make_format

    index, path = int(name.split(".")[2]), name.split(".", 3)[3]
    tensors, meta, _ = read_module(run / "layers" / f"{index:05d}.safetensors")
    return make_format(QuantSpec(**meta[path]["spec"])).unpack(tensors[f"{path}.qcodes"], meta[path]["cols"])


@pytest.mark.parametrize("preset, key, dtype", [
    ("rtn-w8a8", "weight", torch.bfloat16), ("rtn-w8a8-fp8", "weight", torch.float32),
    ("rtn-mxfp4", "weight_packed", torch.float32), ("rtn-nvfp4", "weight_packed", torch.float32)])
def test_activation_schemes_in_compressed_tensors(preset, key, dtype, tmp_path, tokenizer, text_file):
    r = recipe_of(preset)
    if dtype == torch.bfloat16:  # INT8 codes times bf16 scales do not fit bf16: CT must not re-round them
        r = r.with_overrides(["weights.scale_dtype=bfloat16"])
    model, run = tiny_run(tmp_path, r, tokenizer)
    report = export_run(run, tmp_path / "ct", "compressed-tensors", dtype, calib=str(text_file), verify="stock")
    tokens = token_windows(2, 32, 7, vocab=len(tokenizer))
    reference = model if dtype == torch.float32 else open_run(run, torch.device("cpu"), dtype)[0]
    assert rel_diff(reference, load_quantized(tmp_path / "ct"), tokens) <= 1e-5  # our runtime re-attached
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"] is not None
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    ct, ours = stored[f"{name}.{key}"], run_codes(run, name)
    if preset == "rtn-w8a8":  # signed int8 = our unsigned code - 128
        assert torch.equal((ct.to(torch.int16) + 128).to(torch.uint8), ours)
    elif preset == "rtn-w8a8-fp8":  # E4M3 bytes
        assert torch.equal(ct.view(torch.uint8), ours)
    else:  # E2M1 codes; CT may write +0 where we keep -0 (code 8): the same value
        plain = plain_nibbles(ct, ct.shape[1] * 2)
        assert torch.equal(torch.where(ours == 8, 0, ours), torch.where(plain == 8, 0, plain))
    assert report["checks"]["stock_transformers"]["weights"]["max_rel_diff"] <= 2 * torch.finfo(torch.bfloat16).eps


# --- native: every preset ----------------------------------------------------------------------
def _tiny_sizes(node):
    """Group sizes above 32 (presets' 128) shrunk to 32, which divides the tiny widths 64 and 96."""
    if isinstance(node, dict):
        return {k: 32 if k == "group_size" and isinstance(v, int) and v > 32 else _tiny_sizes(v)
                for k, v in node.items()}
    return [_tiny_sizes(v) for v in node] if isinstance(node, list) else node


def tiny_preset(name):
    data = _tiny_sizes(load_recipe(name).to_dict())
    if data.get("fitting"):  # a few steps show the learned transforms round-trip; quality is not tested here
        data["fitting"].update(steps=2, batch_size=2, grad_accum=1, qsur_samples=0, checkpoint_every=0,
                               eval_samples=0)
    return recipe_of(data)


@pytest.mark.parametrize("preset", preset_names())
def test_native_round_trip_is_bit_exact_for_every_preset(preset, tmp_path, tokenizer):
    r = tiny_preset(preset)  # every preset must adapt to the tiny widths; a ConfigError is a failure
    model, run = tiny_run(tmp_path, r, tokenizer, num_hidden_layers=1)
    report = export_run(run, tmp_path / "native", "native")
    assert report["checks"]["load_quantized"]["bit_exact"]
    loaded = load_quantized(tmp_path / "native")
    tokens = token_windows(2, 20, 8, vocab=len(tokenizer))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    names = [p.name for p in tmp_path.joinpath("native").rglob("*") if p.is_file()]
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # safetensors only
    manifest = json.loads((tmp_path / "native" / MANIFEST).read_text())
    resolved = resolve_auto_scales(r, torch.float32)  # the run records scale_dtype: auto resolved
    assert manifest["recipe"] == resolved.to_dict() and {"torch", "transformers", "orthoquant"} <= set(manifest["versions"])
    assert set(manifest["files"]) == {p.relative_to(tmp_path / "native").as_posix()
                                      for p in (tmp_path / "native").rglob("*") if p.is_file() and p.name != MANIFEST}


def test_native_stores_the_random_signs(tmp_path, tokenizer):
    from orthoquant.hadamard import random_signs
    from orthoquant.transforms.plan import layer_seed

    _, run = tiny_run(tmp_path, recipe_of({**ROTATED, "weights": W4G32}), tokenizer)
    export_run(run, tmp_path / "native", "native")
    with safe_open(str(tmp_path / "native" / "transforms.safetensors"), "pt") as f:
        signs = f.get_tensor("residual.-1")
        sites = json.loads(f.metadata()["orthoquant.transforms"])
    assert torch.equal(signs.float(), random_signs(64, layer_seed(0, -1)))  # a reader needs no seeds
    assert sites["attn_value"]["hadamard_sha256"] and sites["residual"]["kind"] == "random_hadamard"


# --- GPTQ ---------------------------------------------------------------------------------------
def plain_gptq_weight(tensors, owner, bits, cols):
    """Dequantize one GPTQ v1 linear with loops and shifts: W[o, i] = s[g, o] (q[i, o] - (z[g, o] + 1))."""
    per = 32 // bits
    qweight = tensors[f"{owner}.qweight"].to(torch.int64) & 0xFFFFFFFF  # the unsigned 32-bit words
    qzeros = tensors[f"{owner}.qzeros"].to(torch.int64) & 0xFFFFFFFF
    scales, g_idx = tensors[f"{owner}.scales"].float(), tensors[f"{owner}.g_idx"].long()
    rows = qweight.shape[1]
    q = torch.empty(cols, rows, dtype=torch.int64)
    for i in range(cols):
        q[i] = (qweight[i // per] >> (bits * (i % per))) & (2**bits - 1)
    z = torch.empty(qzeros.shape[0], rows, dtype=torch.int64)
    for o in range(rows):
        z[:, o] = (qzeros[:, o // per] >> (bits * (o % per))) & (2**bits - 1)
    return ((q - (z[g_idx] + 1)).float() * scales[g_idx]).T


@pytest.mark.parametrize("bits, group, act_order", [(4, 32, True), (8, -1, False)])
def test_gptq_layout_matches_a_plain_unpacker(bits, group, act_order, tmp_path, tokenizer):
    weights = {"format": "int", "bits": bits, "symmetric": True, "group_size": group, "scale_dtype": "float16"}
    r = recipe_of({**ROTATED, "weights": weights, "solver": {"name": "gptq", "act_order": act_order}})
    model, run = tiny_run(tmp_path, r, tokenizer)
    export_run(run, tmp_path / "gptq", "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config == {**config, "quant_method": "gptq", "format": "gptq", "bits": bits, "group_size": group,
                      "sym": True, "desc_act": act_order}
    tensors = {}
    for shard in (tmp_path / "gptq").glob("model*.safetensors"):  # one shard, or model-0000i-of-0000n
        tensors.update(load_file(shard))
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (96 * bits // 32, 64)
    assert tensors["model.layers.0.mlp.down_proj.qzeros"].shape == (96 // group if group > 0 else 1, 64 * bits // 32)
    for name, module in model.named_modules():
        if f"{name}.qweight" in tensors:
            w = plain_gptq_weight(tensors, name, bits, module.in_features)
            assert torch.equal(w, module.weight.float()), name
    if act_order:
        assert not torch.equal(tensors["model.layers.0.mlp.down_proj.g_idx"].long(), torch.arange(96) // 32)


def test_gptq_reloads_with_gptqmodel(tmp_path, tokenizer):
    # not a skip: gptqmodel 7.6.0 installs with torch 2.13 (`make install` puts it in with --no-deps)
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        pytest.fail("gptqmodel is not installed: run `make install` (gptqmodel==7.6.0 --no-deps, see Makefile)")
    r = recipe_of({"weights": {**W4G32, "scale_dtype": "float16"}})
    model, run = tiny_run(tmp_path, r, tokenizer)
    report = export_run(run, tmp_path / "gptq", "gptq", verify="stock")
    assert report["checks"]["gptqmodel"]["max_rel_diff"] < 2e-2
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", device_map="cpu")
    assert rel_diff(model, stock, token_windows(2, 32, 9, vocab=len(tokenizer))) < 2e-2


# --- integrity ----------------------------------------------------------------------------------
@pytest.fixture
def exports(tmp_path, tokenizer):
    """A native, a compressed-tensors and a GPTQ export of one small run."""
    r = recipe_of({**ROTATED, "weights": {**W4G32, "scale_dtype": "float16"}})
    _, run = tiny_run(tmp_path, r, tokenizer)
    for fmt in ("native", "compressed-tensors", "gptq"):
        export_run(run, tmp_path / fmt, fmt)
    return tmp_path


@pytest.mark.parametrize("fmt", ["native", "compressed-tensors", "gptq"])
def test_a_flipped_byte_in_any_file_is_detected(fmt, exports):
    folder = exports / fmt
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    assert len(files) >= 3
    for path in files:
        data = bytearray(path.read_bytes())
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptExportError, match=str(path)):
            load_quantized(folder)
        path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
        with pytest.raises(CorruptExportError, match=f"{path}.*truncated"):
            load_quantized(folder)
        path.write_bytes(bytes(data))
    load_quantized(folder)  # restored: loads again
    stray = folder / "model-extra.safetensors"
    stray.write_bytes(files[0].read_bytes())
    with pytest.raises(CorruptExportError, match="not part of the export"):
        load_quantized(folder)


# --- refusals and the CLI -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt, change, message", [
    ("compressed-tensors", {"transforms": ROTATED["transforms"] + [{"site": "o_input", "kind": "hadamard"}]},
     "site 'o_input'.*--format native"),
    ("compressed-tensors", {"weights": {**W4G32, "symmetric": False}}, "asymmetric INT weights.*--format native"),
    ("compressed-tensors", {"kv_cache": {"format": "int", "bits": 8}}, "KV-cache.*--format native"),
    ("gptq", {"activations": {"format": "int", "bits": 8}}, "weight-only.*--format native"),
    ("gptq", {}, "not exactly representable in float16.*--set weights.scale_dtype=float16"),
])
def test_formats_refuse_what_they_cannot_hold_before_writing(fmt, change, message, tmp_path, tokenizer):
    _, run = tiny_run(tmp_path, recipe_of({**ROTATED, "weights": W4G32, **change}), tokenizer)
    with pytest.raises(UserError, match=message):
        export_run(run, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_cli_export_prints_bytes_per_parameter_and_refuses_online_transforms(tmp_path, tokenizer, capsys):
    transforms = ROTATED["transforms"] + [{"site": "qk", "kind": "hadamard"}]
    weights = {**W4G32, "scale_dtype": "bfloat16"}
    _, run = tiny_run(tmp_path, recipe_of({"transforms": transforms, "weights": weights}), tokenizer)
    assert main(["export", str(run), "--format", "native", "--out", str(tmp_path / "n"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "quantized linears: 0.5625 bytes/parameter" in out  # 4 bits + a bf16 scale per 32 weights
    assert "whole checkpoint:" in out and "load_quantized       bit-exact" in out
    assert main(["export", str(run), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "site 'qk'" in err and "--format native" in err and not (tmp_path / "ct").exists()


def test_nvfp4_tensor_scale_is_stored_as_an_exact_inverse():
    """CT stores 448·6/amax and readers invert it: the stored value must invert to the run's scale exactly
    (a 1-ulp weight change flips 4-bit activation roundings; the demo model's export missed by 1e-3)."""
    from orthoquant.config import QuantSpec
    from orthoquant.export.compressed_tensors.schemes import stored_inverse
    from orthoquant.formats import make_format

    fmt = make_format(QuantSpec(format="nvfp4", bits=4, group_size=16))
    amaxes = torch.logspace(-3, 3, 2000, dtype=torch.float64).float()
    scales = [fmt.global_scale(torch.stack([a, -a / 3])) for a in amaxes]
    assert all(torch.equal(1 / stored_inverse(g), g) for g in scales)
    assert all(torch.equal(g, 1 / ((448.0 * 6.0) / a)) for g, a in zip(scales, amaxes))
    naive = [amax / (448.0 * 6.0) for amax in amaxes]  # a scale not fitted as a reciprocal can miss
    assert any(not torch.equal(1 / (1 / g), g) for g in naive)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_export_shows_one_bar_of_its_own_over_the_run_files(fmt, tmp_path, tokenizer, capsys):
    """One bar named after the export, a step per run file (the rest, then each layer); compressed-tensors'
    own bars (two per layer) are not shown."""
    _, run = tiny_run(tmp_path, recipe_of({"weights": {**W4G32, "scale_dtype": "float16"}}), tokenizer)
    capsys.readouterr()
    assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt), "--verify", "weights"]) == 0
    err = capsys.readouterr().err
    assert f"export {fmt}: 100%" in err and "3/3" in err  # rest + 2 layers
    assert "Compressing model" not in err and "Applying quantization config" not in err
