"""``orthoquant quantize`` under ``torchrun --nproc-per-node 2`` (gloo, CPU): the processes share the fit
and its losses are those of one process on the same global batch; unsupported launches exit 2 with
one line before anything is written."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orthoquant.cli import main
from orthoquant.fitting.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def fit_args(model, text_file, out, grad_accum):
    sets = ["solver.name=rtn", "fitting.steps=3", "fitting.batch_size=1", f"fitting.grad_accum={grad_accum}",
            "fitting.top_k=20", "fitting.qsur_samples=0", "fitting.eval_samples=0", f"fitting.source={text_file}",
            "fitting.nsamples=8", "fitting.seqlen=16", "fitting.schedule=constant", "overrides=[]"]
    return ["quantize", str(model), "--recipe", "ostquant-w4a4kv4", "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "16", "--out", str(out), "--device", "cpu", *[a for s in sets for a in ("--set", s)]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun_fit_as_one_process_on_the_same_global_batch(saved_model, text_file, tmp_path):
    model = saved_model("llama")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "orthoquant.cli",
           *fit_args(model, text_file, tmp_path / "two", grad_accum=1)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(fit_args(model, text_file, tmp_path / "one", grad_accum=2)) == 0  # 2 micro-batches = 1 per process
    two, one = (json.loads((tmp_path / r / "run.json").read_text())["metrics"]["fitting"] for r in ("two", "one"))
    assert two["steps_run"] == 3 and two["orthogonality_error"] < 1e-5
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)  # float32 transforms, gloo sums
    assert len(set(one["losses"])) == 3  # the transforms moved between steps
    fitted = [read_checkpoint(tmp_path / r / "fit.safetensors")["params"] for r in ("two", "one")]
    assert fitted[0].keys() == fitted[1].keys()
    for name, value in fitted[0].items():  # the KLT init read the layers through their gathered shards
        torch.testing.assert_close(value, fitted[1][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe,sets,message", [
    ("rtn-w4a4kv4", [], "fits no transforms"),
    ("ostquant-w4a4kv4", ["--set", "fitting.offload=cpu"], "fitting.offload=cpu with 2 processes"),
])
def test_an_unsupported_launch_exits_2_with_one_line(recipe, sets, message, saved_model, text_file, tmp_path,
                                                     monkeypatch, capsys):
    model = saved_model("llama")
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "run"
    assert main(["quantize", str(model), "--recipe", recipe, "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "16", "--out", str(out), "--device", "cpu", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
