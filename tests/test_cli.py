"""The CLI contract: quantize → eval JSON, and every kind of bad input exits 2 with a clear message."""
import json
import subprocess
import sys

import pytest

from orthoquant import __version__
from orthoquant.cli import COMMANDS, main


def quantize_args(model, text_file, out, *extra):
    return ["quantize", str(model), "--recipe", "rtn-w4a4kv4", "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "32", "--out", str(out), "--device", "cpu", *extra]


def test_quantize_then_eval_writes_the_contract_json(saved_model, text_file, tmp_path, capsys):
    model = saved_model("qwen2")
    assert main(quantize_args(model, text_file, tmp_path / "run")) == 0
    progress = capsys.readouterr().err  # the layer bar names each stage as it happens
    assert all(f"layer 2/2: {stage}" in progress for stage in ("calibrate", "solve", "propagate"))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and set(info["metrics"]) == {"0", "1"}
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run"), "--ppl", str(text_file), "--seqlen", "32",
                 "--max-windows", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"ppl", "seqlen", "tasks", "recipe", "partial", "seconds"}
    assert result["partial"] == {"max_windows": 6}
    assert result["seqlen"] == 32 and result["recipe"]["name"] == "rtn-w4a4kv4"
    q_ppl = result["ppl"]["calib.txt"]
    assert main(["eval", str(model), "--ppl", str(text_file), "--seqlen", "32", "--max-windows", "6",
                 "--json", str(out)]) == 0
    fp = json.loads(out.read_text())
    assert fp["recipe"] is None and fp["ppl"]["calib.txt"] != q_ppl
    # rerunning the same command finds the run complete and changes nothing
    before = (tmp_path / "run" / "layers" / "00001.safetensors").read_bytes()
    assert main(quantize_args(model, text_file, tmp_path / "run")) == 0
    assert (tmp_path / "run" / "layers" / "00001.safetensors").read_bytes() == before


def _unknown_arch(saved_model):
    folder = saved_model("llama")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case, extra, message", [
    ("arch", [], "no arch spec: only weight-only RTN/GPTQ and W8A8 run on it); full support: Gemma2ForCausalLM"),
    ("key", ["--set", "weights.bitz=3"], r"unknown key(s) ['bitz'] in weights"),
    ("bits", ["--set", "weights.bits=12"], "bits=12: the int format takes bits in [2, 8]"),
    ("preset", ["--recipe", "no-such-preset"], "unknown recipe preset 'no-such-preset'"),
    ("calib", ["--calib", "/nonexistent/calib.txt"], "/nonexistent/calib.txt"),
    ("short", ["--nsamples", "100000"], "fewer than nsamples"),
    ("seqlen", ["--seqlen", "5000"], "seqlen 5000 exceeds the model's max_position_embeddings 256"),
])
def test_bad_input_exits_2_with_a_clear_message(case, extra, message, saved_model, text_file, tmp_path, capsys):
    model = _unknown_arch(saved_model) if case == "arch" else saved_model("llama")
    out = tmp_path / "run"
    assert main(quantize_args(model, text_file, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "orthoquant: error:" in err and message in err
    assert not (out / "run.json").exists() or json.loads((out / "run.json").read_text())["status"] != "complete"


def test_output_folder_holding_another_run_exits_2(saved_model, text_file, tmp_path, capsys):
    model = saved_model("llama")
    assert main(quantize_args(model, text_file, tmp_path / "run")) == 0
    assert main(quantize_args(model, text_file, tmp_path / "run", "--set", "weights.bits=3")) == 2
    assert "holds a different run" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(quantize_args(model, text_file, tmp_path / "other")) == 2
    assert "not empty" in capsys.readouterr().err


def test_eval_of_an_unfinished_run_exits_2(saved_model, text_file, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"fingerprint": {}, "status": "running"}))
    assert main(["eval", str(tmp_path / "run"), "--ppl", str(text_file)]) == 2
    assert "not complete" in capsys.readouterr().err


def test_console_entry_lists_recipes():
    out = subprocess.run([sys.executable, "-m", "orthoquant.cli", "recipes"], capture_output=True, text=True,
                         check=True).stdout
    assert "rtn-w4a4kv4" in out and "fp16" in out


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, entry in COMMANDS.items():
        assert any(line.split() == [name, *entry.help.split()] for line in lines), name
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"orthoquant {__version__}"


# What a fresh interpreter imports for `--help`, `--version`, `recipes` and each command's parser
# (building a command's parser may load its module, never torch).
IMPORT_PROBE = """
import json, sys
from orthoquant.cli import COMMANDS, build_parser, main
for argv in (["--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit:
        pass
main(["recipes"])
build_parser()
print(json.dumps([m for m in ("torch", "transformers") if m in sys.modules]))
"""


def test_help_version_and_recipes_import_neither_torch_nor_transformers():
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []
