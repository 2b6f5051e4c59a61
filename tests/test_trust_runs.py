"""Trust in run folders and exports: a resume refuses changed inputs and names the change, every run
file is checked against its sha256 (a bad layer of an unfinished run is recomputed, a complete run
with a bad file is an error), an export loads only once verified, manifests stay inside their folder,
and one process at a time writes a run folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from orthoquant.cli import main
from orthoquant.recipes import load_recipe
from orthoquant.errors import UserError
from orthoquant.export import load_quantized
from orthoquant.export.verify import FAILED_MANIFEST, MANIFEST, PROVISIONAL_MANIFEST, CorruptExportError
from orthoquant.integrity import atomic_write, temporary_name
from orthoquant.models.tiny import tiny_model
from orthoquant.pipeline import open_run
from orthoquant.runfolder import RunFolder
from orthoquant.runner import LayerwiseQuantizer

LAYERS = 3


def quantize_args(model, calib, out, *extra):
    return ["quantize", str(model), "--recipe", "rtn-w4a4kv4", "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "32", "--out", str(out), "--device", "cpu", "--set", "solver.name=gptq", *extra]


def eval_args(target, calib):
    return ["eval", str(target), "--ppl", str(calib), "--seqlen", "32", "--max-windows", "2", "--device", "cpu"]


class Interrupt(Exception):
    pass


def quantize_until(monkeypatch, args, stop_at):
    """Run ``quantize`` and kill it (an exception) when it reaches layer ``stop_at``."""
    original = LayerwiseQuantizer._quantize_layer

    def stop(self, layer, index, prefix, inputs):
        if index == stop_at:
            raise Interrupt
        return original(self, layer, index, prefix, inputs)

    with monkeypatch.context() as m:
        m.setattr(LayerwiseQuantizer, "_quantize_layer", stop)
        with pytest.raises(Interrupt):
            main(args)


def run_bytes(run):
    """Every stored tensor file of a run: relative name -> bytes."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*.safetensors"))}


@pytest.fixture
def inputs(saved_model, text_file, tmp_path):
    """(model folder, a private copy of the calibration text) that a test may change."""
    calib = tmp_path / "calib.txt"
    calib.write_text(text_file.read_text())
    return saved_model("llama", num_hidden_layers=LAYERS), calib


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- content fingerprint --------------------------------------------------------------------------
def _new_weights(model, calib):
    tiny_model("llama", seed=1, vocab_size=json.loads((model / "config.json").read_text())["vocab_size"],
               num_hidden_layers=LAYERS).save_pretrained(model)  # same shapes, other values, in place
    return []


def _new_text(model, calib):
    calib.write_text(calib.read_text() + "\n\nsome more calibration text")
    return []


CHANGES = {
    "weights": (_new_weights, "the model's weights differ (model.safetensors header/size/sampled bytes)"),
    "calibration": (_new_text, "the calibration text differs (calib.txt)"),
    "dtype": (lambda model, calib: ["--dtype", "bfloat16"], "dtype float32 → bfloat16"),
    "recipe": (lambda model, calib: ["--set", "weights.bits=3"], "weights.bits 4 → 3"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_after_a_change_exits_2_naming_it(change, inputs, tmp_path, monkeypatch, capsys):
    model, calib = inputs
    quantize_until(monkeypatch, quantize_args(model, calib, tmp_path / "run"), stop_at=1)
    before = run_bytes(tmp_path / "run")
    make_change, message = CHANGES[change]
    extra = make_change(model, calib)
    capsys.readouterr()
    assert main(quantize_args(model, calib, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a different run" in err and message in err, err
    assert "another --out or delete the folder" in err
    assert run_bytes(tmp_path / "run") == before  # nothing was touched


def test_resume_keeps_earlier_metrics_and_seconds_and_equals_uninterrupted(inputs, tmp_path, monkeypatch):
    model, calib = inputs
    assert main(quantize_args(model, calib, tmp_path / "full")) == 0
    quantize_until(monkeypatch, quantize_args(model, calib, tmp_path / "run"), stop_at=2)
    partial = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(partial["metrics"]) == {"0", "1"} and partial["seconds"] > 0
    partial["seconds"] = 1000.0  # as if the first attempt had run for long: the total must keep it
    (tmp_path / "run" / "run.json").write_text(json.dumps(partial))
    began = time.perf_counter()
    assert main(quantize_args(model, calib, tmp_path / "run")) == 0
    resumed = time.perf_counter() - began
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(info["metrics"]) == {str(i) for i in range(LAYERS)}
    assert info["metrics"]["0"] == partial["metrics"]["0"] and info["metrics"]["1"] == partial["metrics"]["1"]
    assert 1000.0 < info["seconds"] < 1000.0 + resumed
    assert run_bytes(tmp_path / "run") == run_bytes(tmp_path / "full")


def test_the_fingerprint_names_hub_sources_datasets_folders_device_and_version(tmp_path):
    from orthoquant.fingerprint import calibration_fingerprint, describe_changes, run_fingerprint

    tokens = torch.arange(8).reshape(2, 4)
    hub = calibration_fingerprint("wikitext2", tokens)["hub"]  # read from the registry, no download
    assert (hub["id"], hub["config"], hub["split"]) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "data.arrow").write_bytes(b"one")
    before = calibration_fingerprint(str(tmp_path / "saved"), tokens)
    (tmp_path / "saved" / "data.arrow").write_bytes(b"two")
    after = calibration_fingerprint(str(tmp_path / "saved"), tokens)
    assert before["text_sha256"] != after["text_sha256"]
    a = run_fingerprint({}, before, torch.float32, torch.device("cpu"), {"name": "r"})
    b = {**run_fingerprint({}, after, torch.float32, torch.device("cuda"), {"name": "r"}), "orthoquant": "9.9"}
    assert describe_changes(a, b) == ["the calibration text differs (saved)", "device cpu → cuda",
                                      f"orthoquant version {a['orthoquant']} → 9.9"]
    retokenized = {**a, "calibration": {**before, "tokens_sha256": "0" * 64}}  # same text, other tokenizer
    assert describe_changes(a, retokenized) == [
        "the calibration tokens differ (same text: the tokenizer or the sampling changed)"]


# --- integrity of run folders -----------------------------------------------------------------------
@pytest.fixture
def finished_run(inputs, tmp_path):
    model, calib = inputs
    assert main(quantize_args(model, calib, tmp_path / "run")) == 0
    return tmp_path / "run", calib


def test_run_json_records_every_file_it_wrote(finished_run):
    run, _ = finished_run
    files = json.loads((run / "run.json").read_text())["files"]
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"run.json", "run.lock"}
    assert {"recipe.yaml", "rest.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert {f"layers/{i:05d}.safetensors" for i in range(LAYERS)} <= set(files)


def test_a_flipped_byte_in_a_layer_file_fails_eval_and_export(finished_run, tmp_path, capsys):
    run, calib = finished_run
    flip_byte(run / "layers" / "00001.safetensors")
    for args in (eval_args(run, calib), ["export", str(run), "--format", "native", "--out", str(tmp_path / "x")]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "layers/00001.safetensors does not match its recorded sha256" in err and "bit-exact" not in err
    assert not (tmp_path / "x").exists()


def test_a_deleted_or_corrupt_layer_of_an_unfinished_run_is_recomputed(inputs, tmp_path, monkeypatch):
    model, calib = inputs
    assert main(quantize_args(model, calib, tmp_path / "full")) == 0
    quantize_until(monkeypatch, quantize_args(model, calib, tmp_path / "run"), stop_at=2)
    (tmp_path / "run" / "layers" / "00000.safetensors").unlink()
    flip_byte(tmp_path / "run" / "layers" / "00001.safetensors")
    assert main(quantize_args(model, calib, tmp_path / "run")) == 0
    assert run_bytes(tmp_path / "run") == run_bytes(tmp_path / "full")


@pytest.mark.parametrize("name", ["layers/00002.safetensors", "rest.safetensors", "tokenizer.json"])
def test_a_complete_run_with_a_deleted_file_is_an_error_never_nothing_to_do(name, finished_run, tmp_path, capsys):
    run, calib = finished_run
    model = tmp_path / "llama-model"
    (run / name).unlink()
    for args in (quantize_args(model, calib, run), eval_args(run, calib),
                 ["export", str(run), "--format", "native", "--out", str(tmp_path / "x")]):
        capsys.readouterr()
        assert main(args) == 2, args[0]
        err = capsys.readouterr().err
        assert f"{name} is missing" in err and "delete the folder" in err, err


def test_a_symlinked_run_file_is_refused(finished_run, tmp_path, capsys):
    run, calib = finished_run
    copy = tmp_path / "tokenizer.json"
    copy.write_bytes((run / "tokenizer.json").read_bytes())  # same bytes: only the link is wrong
    (run / "tokenizer.json").unlink()
    (run / "tokenizer.json").symlink_to(copy)
    assert main(eval_args(run, calib)) == 2
    assert "tokenizer.json is a symbolic link" in capsys.readouterr().err


def test_an_old_run_json_without_records_still_opens_and_is_complete(finished_run, inputs, capsys):
    run, calib = finished_run
    model, _ = inputs
    info = json.loads((run / "run.json").read_text())
    info.pop("files")
    recipe = info["fingerprint"]["recipe"]
    info["fingerprint"] = {"model": str(model.resolve()), "recipe": recipe}
    (run / "run.json").write_text(json.dumps(info))
    assert main(quantize_args(model, calib, run)) == 0  # the same run: already complete
    assert main(eval_args(run, calib)) == 0
    info["status"] = "running"
    (run / "run.json").write_text(json.dumps(info))
    assert main(quantize_args(model, calib, run)) == 2
    assert "older orthoquant" in capsys.readouterr().err


# --- exports are verified or not loadable ----------------------------------------------------------
def test_an_export_failing_verification_does_not_load(finished_run, tmp_path, monkeypatch, capsys):
    import orthoquant.export.api as api
    from orthoquant.export.verify import ExportCheckError

    run, calib = finished_run
    out = tmp_path / "native"

    def broken(*args, **kwargs):
        raise ExportCheckError("injected failure of the verification")

    monkeypatch.setattr(api, "verify_streamed", broken)  # the comparison with the run
    assert main(["export", str(run), "--format", "native", "--out", str(out)]) == 2
    assert (out / FAILED_MANIFEST).is_file() and not (out / MANIFEST).exists()
    _refused_everywhere(out, calib, capsys)


def test_an_export_killed_during_verification_does_not_load(finished_run, tmp_path, capsys):
    run, calib = finished_run
    out = tmp_path / "native"
    kill_in_verification = (
        "import os, signal, sys\n"
        "import orthoquant.export.api as api\n"
        "api.verify_streamed = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from orthoquant.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", kill_in_verification, "export", str(run), "--format", "native",
                           "--out", str(out)], capture_output=True, cwd=os.getcwd(),
                          env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / PROVISIONAL_MANIFEST).is_file() and not (out / MANIFEST).exists()
    _refused_everywhere(out, calib, capsys)


def _refused_everywhere(out, calib, capsys):
    with pytest.raises(UserError, match="unverified export"):
        load_quantized(out)
    with pytest.raises(UserError, match="without a verified manifest"):
        open_run(out, torch.device("cpu"))  # a native export is a run folder too: not through this door
    capsys.readouterr()
    assert main(eval_args(out, calib)) == 2
    assert "unverified export" in capsys.readouterr().err


def test_a_verified_export_loads_and_its_provisional_manifest_is_gone(finished_run, tmp_path):
    run, _ = finished_run
    assert main(["export", str(run), "--format", "native", "--out", str(run / "native")]) == 0  # --out inside
    names = {p.relative_to(run / "native").as_posix() for p in (run / "native").rglob("*")}
    assert PROVISIONAL_MANIFEST not in names and FAILED_MANIFEST not in names
    assert not [n for n in names if n.startswith("native")]  # the export never copies itself
    load_quantized(run / "native")


@pytest.fixture
def export(finished_run, tmp_path):
    run, _ = finished_run
    assert main(["export", str(run), "--format", "native", "--out", str(tmp_path / "native")]) == 0
    return tmp_path / "native"


def test_a_native_export_exports_again(export, tmp_path):
    assert main(["export", str(export), "--format", "native", "--out", str(tmp_path / "again")]) == 0
    load_quantized(tmp_path / "again")


def test_native_export_copies_only_its_own_files(finished_run, tmp_path):
    run, _ = finished_run
    (run / "notes.json").write_text("{}")
    (run / "extra").mkdir()
    (run / "extra" / "stray.safetensors").write_bytes(b"not mine")
    (run / "hostname.yaml").symlink_to("/etc/hostname")
    assert main(["export", str(run), "--format", "native", "--out", str(tmp_path / "native")]) == 0
    names = {p.relative_to(tmp_path / "native").as_posix() for p in (tmp_path / "native").rglob("*")}
    assert not {"notes.json", "extra", "extra/stray.safetensors", "hostname.yaml"} & names
    assert not [p for p in (tmp_path / "native").rglob("*") if p.is_symlink()]


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "layers/../../run/run.json"])
def test_a_manifest_name_outside_the_export_is_refused(name, export):
    manifest = json.loads((export / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (export / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptExportError, match="not a file inside the export"):
        load_quantized(export)


def test_a_symlink_in_an_export_is_refused_even_with_the_right_bytes(export, tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_bytes((export / "tokenizer.json").read_bytes())
    (export / "tokenizer.json").unlink()
    (export / "tokenizer.json").symlink_to(target)
    with pytest.raises(CorruptExportError, match="tokenizer.json is a symbolic link"):
        load_quantized(export)


# --- one writer per run folder; per-process temporary names -----------------------------------------
def test_a_second_quantize_on_a_locked_run_folder_exits_2_at_once(inputs, tmp_path, monkeypatch, capsys):
    import orthoquant.pipeline as pipeline

    model, calib = inputs
    out = tmp_path / "run"
    with RunFolder(out).locked(), monkeypatch.context() as m:  # as a first process quantizing into --out
        m.setattr(pipeline, "open_model", lambda *a: pytest.fail("loaded the model before checking the lock"))
        assert main(quantize_args(model, calib, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is in use by another orthoquant process" in err
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing else was written
    recipe = load_recipe("rtn-w4a16", [f"calibration.source={calib}", "calibration.nsamples=4",
                                       "calibration.seqlen=32"])
    with RunFolder(out).locked(), monkeypatch.context() as m:  # taken while the second one prepared:
        m.setattr(RunFolder, "refuse_if_busy", lambda self: None)  # the lock itself refuses
        with pytest.raises(UserError, match="in use by another orthoquant process"):
            pipeline.quantize_pretrained(str(model), recipe, out, torch.device("cpu"))
    assert main(quantize_args(model, calib, out)) == 0  # once released the run goes ahead


def test_a_lock_held_by_another_process_is_refused(inputs, tmp_path, capsys):
    model, calib = inputs
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)\n", str(out / "run.lock")],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert main(quantize_args(model, calib, out)) == 2
        assert "in use by another orthoquant process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_temporary_names_are_per_process_and_never_left_behind(tmp_path):
    target = tmp_path / "file.json"
    names = {temporary_name(target) for _ in range(3)}
    assert len(names) == 3 and all(str(os.getpid()) in n.name for n in names)

    def fail(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "run"
    (run / "layers").mkdir(parents=True)
    (run / "run.lock").touch()
    stale = [temporary_name(run / "run.json"), temporary_name(run / "layers" / "00000.safetensors")]
    for path in stale:  # as a killed process leaves them
        path.write_text("half")
    with RunFolder(run).locked():
        assert not any(p.exists() for p in stale)
