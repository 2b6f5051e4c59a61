"""Every bad input is one line on stderr and exit code 2, never a traceback; a bad request leaves nothing
behind (no run folder to refuse the corrected rerun as "a different run").

One case per class of bad input: ``(id, setup, message)``. ``setup(ctx)`` prepares the files the case
needs and returns the command line; ``message`` is a part of the expected one-line error. Cases marked
``WRITE`` fail while writing (nothing about the request was wrong), so the run folder may exist.
Read-only folders are made with chmod and, as root ignores permission bits, also by refusing the probe
file that ``orthoquant.validate`` creates there.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from orthoquant.cli import main
from orthoquant.recipes import load_recipe
from orthoquant.models.tiny import tiny_model


@dataclass
class Ctx:
    model: Path
    text: Path
    tmp: Path
    run: Path  # a finished run, for the eval cases
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def quantize(self, *extra: str, model: Path | None = None, recipe: str = "rtn-w4a4kv4") -> list[str]:
        return ["quantize", str(model or self.model), "--recipe", recipe, "--calib", str(self.text),
                "--nsamples", "2", "--seqlen", "16", "--out", str(self.out), "--device", "cpu", *extra]

    def eval(self, *extra: str, target: Path | None = None) -> list[str]:
        return ["eval", str(target or self.run), "--ppl", str(self.text), "--seqlen", "16",
                "--max-windows", "2", "--device", "cpu", *extra]

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def model_with(self, **sizes) -> Path:
        folder = self.tmp / ("model-" + "-".join(f"{k}{v}" for k, v in sizes.items()))
        config = json.loads((self.model / "config.json").read_text())
        tiny_model("llama", vocab_size=config["vocab_size"], **sizes).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((self.model / name).read_bytes())
        return folder

    def read_only(self, folder: Path) -> Path:
        """Make ``folder`` read-only (chmod, and for root a refused probe file in it)."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        probe = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return probe(*args, dir=dir, **kwargs)

        self.monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
        return folder

    def fail_writes(self, module, name: str, error: Exception) -> None:
        def fail(*args, **kwargs):
            raise error

        self.monkeypatch.setattr(module, name, fail)


def _existing_run_read_only(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "run.json").write_text(json.dumps({"fingerprint": {}, "status": "running"}))
    c.read_only(c.out)
    return c.quantize()


def _disk_full_while_saving_layers(c: Ctx, error: Exception) -> list[str]:
    import orthoquant.layerfile

    c.fail_writes(orthoquant.layerfile, "save_file", error)
    return c.quantize()


def _eval_read_only_run(c: Ctx) -> list[str]:
    import orthoquant.evaluate.results

    results = c.run / "results.json"
    c.fail_writes(orthoquant.evaluate.results, "write_json",
                  PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(results)))
    return c.eval()


def _eval_json_disk_full(c: Ctx) -> list[str]:
    target, write_text = c.tmp / "result.json", Path.write_text

    def full(self, *args, **kwargs):
        if self == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full disk: no file named
        return write_text(self, *args, **kwargs)

    c.monkeypatch.setattr(Path, "write_text", full)
    return c.eval("--json", str(target))


def _no_cuda(c: Ctx) -> list[str]:
    c.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return c.quantize("--device", "cuda")


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"
# cases failing while writing: the request was fine, so a quantize run stays resumable and eval shows its result
WRITE_QUANTIZE = {"disk-full", "disk-full-safetensors"}
WRITE_EVAL = {"eval-read-only-run", "eval-json-disk-full"}
CASES = [
    # --- the recipe, as text ---
    ("recipe-yaml", lambda c: c.quantize(recipe=str(c.file("r.yaml", "weights: {bits: 4\nsolver: rtn\n"))),
     "r.yaml is not valid YAML at line"),
    ("set-yaml", lambda c: c.quantize("--set", "weights.bits=[4"), "--set 'weights.bits=[4': the value is not valid YAML"),
    ("set-exponent-is-a-number", lambda c: c.quantize("--set", "solver.damp=2e0"), "solver.damp=2.0 must lie in (0, 1)"),
    ("nsamples-0", lambda c: c.quantize("--nsamples", "0"), "calibration.nsamples=0 must be positive"),
    ("seqlen-1", lambda c: c.quantize("--seqlen", "1"), "calibration.seqlen=1 must be at least 2"),
    ("seed-overflow", lambda c: c.quantize("--seed", str(2**70)), f"calibration.seed={2**70}: seeds must lie within"),
    ("dtype", lambda c: c.quantize("--dtype", "banana"), "--dtype banana"),
    # --- the recipe against the model's sizes ---
    ("group-size", lambda c: c.quantize("--set", "weights.group_size=64"),
     "model.layers.0.mlp.down_proj (64x96): group_size 64 does not divide the 96 columns"),
    ("activation-group", lambda c: c.quantize("--set", "activations.group_size=64"),
     "activations of model.layers.0.mlp.down_proj (width 96): group_size 64 does not divide"),
    ("kv-group", lambda c: c.quantize("--set", "kv_cache.group_size=32"),
     "kv_cache (head_dim 16): group_size 32 does not divide the 16 columns"),
    ("block-transform-group", lambda c: c.quantize("--set", "weights.group_size=24", recipe="blockhad-int4-g32"),
     "model.layers.0.self_attn.q_proj (64x64): group_size 24 does not divide the 64 input columns"),
    ("vector-format-solver", lambda c: c.quantize("--set", "solver.name=quip-gptq", recipe="quip-e8p-2bit"),
     "GPTQ codes one column at a time, but the e8p format codes 8 together"),
    ("hadamard-size", lambda c: c.quantize(model=c.model_with(intermediate_size=90), recipe="quarot-w4a4kv4"),
     "transform at down_input (width 90): no Hadamard matrix of order n=90"),
    ("hadamard-block", lambda c: c.quantize(recipe=str(c.file("b.yaml", "transforms: [{site: down_input, block_size: 64}]"))),
     "transforms.block_size=64 does not divide the down_input width 96"),
    ("quip-hadamard", lambda c: c.quantize(model=c.model_with(intermediate_size=90), recipe="quip-int4"),
     "(90x64): no Hadamard matrix of order n=90"),
    ("released-missing", lambda c: c.quantize("--set", f"fitting.released={c.tmp / 'R.bin'}", recipe="ostquant-w4a16"),
     "R.bin does not exist"),
    # --- device and output path ---
    ("device", lambda c: c.quantize("--device", "banana"), "--device 'banana' is not a device; use cpu, cuda or cuda:N"),
    ("device-no-cuda", _no_cuda, "--device cuda was asked for, but torch sees no CUDA device"),
    ("out-is-a-file", lambda c: c.quantize("--out", str(c.file("f", "x"))), "f is a file, not a folder"),
    ("out-below-a-file", lambda c: c.quantize("--out", str(c.file("f", "x") / "run")), "f is a file, not a folder"),
    ("out-read-only", lambda c: c.quantize("--out", str(c.read_only(c.tmp / "ro") / "run")),
     "ro/run: cannot write in"),
    ("run-read-only", _existing_run_read_only, "out: cannot write in"),
    # --- the filesystem while writing ---
    ("disk-full", lambda c: _disk_full_while_saving_layers(c, ENOSPC), "No space left on device (writing"),
    ("disk-full-safetensors", lambda c: _disk_full_while_saving_layers(c, _safetensors_error(SAFETENSORS_ENOSPC)),
     "No space left on device (writing"),
    # --- eval options and outputs ---
    ("eval-seqlen-1", lambda c: c.eval("--seqlen", "1"), "--seqlen 1 must be at least 2"),
    ("eval-seqlen-0", lambda c: c.eval("--seqlen", "0"), "--seqlen 0 must be at least 2"),
    ("eval-seqlen-negative", lambda c: c.eval("--seqlen", "-4"), "--seqlen -4 must be at least 2"),
    ("eval-batch-size-0", lambda c: c.eval("--batch-size", "0"), "--batch-size 0 must be at least 1"),
    ("eval-max-windows-0", lambda c: c.eval("--max-windows", "0"), "--max-windows 0 must be at least 1"),
    ("eval-max-windows-negative", lambda c: c.eval("--max-windows", "-1"), "--max-windows -1 must be at least 1"),
    ("eval-num-fewshot", lambda c: c.eval("--num-fewshot", "-1"), "--num-fewshot -1 must be at least 0"),
    ("eval-limit", lambda c: c.eval("--limit", "0"), "--limit 0.0 must be positive"),
    ("eval-json-is-a-folder", lambda c: c.eval("--json", str(c.tmp)), "is a folder, not a file"),
    ("eval-json-read-only", lambda c: c.eval("--json", str(c.read_only(c.tmp / "ro") / "r.json")),
     "ro/r.json: cannot write in"),
    ("eval-read-only-run", _eval_read_only_run, "results.json: Permission denied"),
    ("eval-json-disk-full", _eval_json_disk_full, "result.json: No space left on device"),
]


def _safetensors_error(message: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(message)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer, text_file):
    """A model folder and a run quantized from it (shared by the eval cases; they must not change it)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    assert main(["quantize", str(root / "model"), "--recipe", "rtn-w4a4kv4", "--calib", str(text_file),
                 "--nsamples", "2", "--seqlen", "16", "--out", str(root / "run"), "--device", "cpu"]) == 0
    return root / "model", root / "run"


def _tree(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in [f, *f.rglob("*")] if p.exists()}


@pytest.mark.parametrize("setup, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(setup, message, request, finished_run, text_file, tmp_path,
                                          monkeypatch, capsys):
    model, run = finished_run
    case = request.node.callspec.id
    ctx = Ctx(model, text_file, tmp_path, run, monkeypatch)
    argv = setup(ctx)
    before = _tree(tmp_path, run)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("orthoquant: error: "), err
    assert message in lines[0]
    if case in WRITE_QUANTIZE:
        assert json.loads((ctx.out / "run.json").read_text())["status"] == "running"
    elif case in WRITE_EVAL:
        assert json.loads(out)["ppl"], "the computed result is printed before the failed write"
    else:  # a bad request writes nothing: no run folder, no file, nothing touched
        assert _tree(tmp_path, run) == before


def test_a_corrected_rerun_is_not_refused(saved_model, text_file, tmp_path, capsys):
    """The group size is refused before the run folder exists, so fixing it is a fresh run, not "a different run"."""
    model, out = saved_model("llama"), tmp_path / "run"
    quantize = ["quantize", str(model), "--recipe", "rtn-w4a16", "--calib", str(text_file), "--nsamples", "2",
                "--seqlen", "16", "--out", str(out), "--device", "cpu", "--set"]
    assert main([*quantize, "weights.group_size=64"]) == 2 and not out.exists()
    assert main([*quantize, "weights.group_size=32"]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_exponents_are_numbers_in_set_and_in_recipe_files(tmp_path):
    """YAML 1.1 reads 1e-30 (an exponent without a dot) as a string; recipes read it as the number it is."""
    assert load_recipe("gptq-w4a16", ["solver.damp=1e-30"]).solver.damp == 1e-30
    path = tmp_path / "r.yaml"
    path.write_text("solver: {name: gptq, damp: 1e-30}\nfitting: {lr_rotation: 1.5e-2, lr_scale: 2E-3}\n")
    recipe = load_recipe(str(path))
    assert (recipe.solver.damp, recipe.fitting.lr_rotation, recipe.fitting.lr_scale) == (1e-30, 1.5e-2, 2e-3)
    assert load_recipe("gptq-w4a16", ["description=1e-3x"]).description == "1e-3x"  # not a number: a string
