"""Trust in what is read: a truncated, corrupt or mismatched checkpoint, a nonsense config.json or a
missing local path is one line and exit 2 naming the file (and tensor) before anything is written.
(tests/models/test_no_pickle.py: no file is ever unpickled.)"""
import json
import pathlib
import random

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from orthoquant.cli import main
from orthoquant.errors import UserError
from orthoquant.models.checkpoint import open_checkpoint, read_entry, read_header

WEIGHTS = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj.weight"


def quantize_args(model, text_file, out):
    return ["quantize", str(model), "--recipe", "rtn-w4a16", "--calib", str(text_file), "--nsamples", "2",
            "--seqlen", "16", "--out", str(out), "--device", "cpu"]


def eval_args(model, text_file, out):
    return ["eval", str(model), "--ppl", str(text_file), "--seqlen", "16", "--max-windows", "2",
            "--device", "cpu", "--json", str(out)]


def error_line(capsys) -> str:
    """The one line of the CLI's error (stderr has nothing else of it: no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "orthoquant: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rewrite_header(file: pathlib.Path, change) -> None:
    """Apply ``change`` to the parsed header of ``file`` and write it back before the same data."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def cut(fraction: float | None = None, nbytes: int = 0):
    def corrupt(folder):
        file = folder / WEIGHTS
        entries, data = read_header(file), file.read_bytes()
        size = len(data) - (nbytes or int(fraction * len(data)))
        file.write_bytes(data[:size])
        first_cut = min((e for e in entries.values() if e.end > size), key=lambda e: e.begin)
        return [str(file), f"tensor {first_cut.key}", "past the end of the file"]
    return corrupt


def shift_offsets(file: pathlib.Path, key: str, by: int) -> None:
    rewrite_header(file, lambda h: h[key].__setitem__("data_offsets", [o + by for o in h[key]["data_offsets"]]))


def offsets_past_end(folder):
    file = folder / WEIGHTS
    key = max(read_header(file).values(), key=lambda e: e.end).key
    shift_offsets(file, key, 1000)
    return [str(file), f"tensor {key}", "past the end of the file"]


def overlap(folder):
    """The second tensor in the data section moved 4 bytes back, into the first."""
    file = folder / WEIGHTS
    first, second = sorted(read_header(file).values(), key=lambda e: e.begin)[:2]
    shift_offsets(file, second.key, -4)
    return [str(file), f"tensor {second.key}", f"would overlap tensor {first.key}"]


def trailing_bytes(folder):
    with open(folder / WEIGHTS, "ab") as f:
        f.write(b"\0" * 8)
    return [str(folder / WEIGHTS), "trailing bytes"]


def header_length(folder):
    file = folder / WEIGHTS
    data = file.read_bytes()
    file.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    return [str(file), "the header claims"]


def corrupt_header(folder):
    file = folder / WEIGHTS
    data = bytearray(file.read_bytes())
    data[9:14] = b"\xff\x00{]:"
    file.write_bytes(bytes(data))
    return [str(file), "corrupt safetensors header"]


def header_edit(key, field, value, *message):
    def corrupt(folder):
        rewrite_header(folder / WEIGHTS, lambda h: h[key].__setitem__(field, value(h)))
        return [str(folder / WEIGHTS), f"tensor {key}", *message]
    return corrupt


def vocab(folder):
    config_edit(vocab_size=10)(folder)
    return [str(folder / WEIGHTS), "tensor model.embed_tokens.weight", f"{folder / 'config.json'} implies [10,"]


def fewer_layers(folder):
    config_edit(num_hidden_layers=1)(folder)
    return [str(folder / WEIGHTS), "tensor model.layers.1.", "has no place in the model", str(folder / "config.json")]


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def indexed(change, message):
    """The single file behind an index whose map ``change`` edits; the error names the index."""
    def corrupt(folder):
        shard = folder / "model-00001-of-00001.safetensors"
        (folder / WEIGHTS).rename(shard)
        weight_map = {key: shard.name for key in read_header(shard)}
        change(folder, weight_map)
        write_index(folder, weight_map)
        return [message]
    return corrupt


def other_shard(folder, weight_map):
    save_file({"x": torch.zeros(2)}, str(folder / "model-extra.safetensors"))
    weight_map[Q] = "model-extra.safetensors"


def config_edit(**values):
    def corrupt(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))
        return [str(folder / "config.json"), *values]
    return corrupt


def config_text(text, message):
    def corrupt(folder):
        (folder / "config.json").write_text(text)
        return [str(folder / "config.json"), message]
    return corrupt


CHECKPOINT_CASES = {
    "cut-1-byte": cut(nbytes=1),
    "cut-30-percent": cut(0.3),
    "offsets-past-end": offsets_past_end,
    "trailing-bytes": trailing_bytes,
    "header-length-past-end": header_length,
    "corrupt-header": corrupt_header,
    "unknown-dtype": header_edit(Q, "dtype", lambda h: "F31", "unknown dtype 'F31'"),
    "span-disagrees-with-shape": header_edit(Q, "shape", lambda h: [64, 65], "needs"),
    "overlap": overlap,
    "shape-mismatch": header_edit(Q, "shape", lambda h: [32, 128], "config.json implies"),
    "integer-weights": header_edit(Q, "dtype", lambda h: "I32", "stored as torch.int32"),
    "vocab-mismatch": vocab,
    "fewer-layers-in-config": fewer_layers,
    "index-missing-shard": indexed(lambda f, m: m.update({Q: "model-00002-of-00002.safetensors"}),
                                   "names shard model-00002-of-00002.safetensors, which does not exist"),
    "index-tensor-not-in-shard": indexed(other_shard, f"places tensor {Q} in model-extra.safetensors"),
    "index-shard-outside": indexed(lambda f, m: m.update({Q: "../model.safetensors"}), "not a file name inside"),
    "index-lacks-lm-head": indexed(lambda f, m: m.pop("lm_head.weight"), "tensor lm_head.weight is missing"),
}
CONFIG_CASES = {
    "bad-json": config_text("{not json", "not a readable JSON config"),
    "not-an-object": config_text("[1, 2]", "not a JSON object"),
    "negative-hidden": config_edit(hidden_size=-8),
    "zero-layers": config_edit(num_hidden_layers=0),
    "text-vocab": config_edit(vocab_size="many"),
    "heads-not-dividing-hidden": config_edit(num_attention_heads=5),
    "kv-heads-not-dividing-heads": config_edit(num_key_value_heads=3),
}


@pytest.mark.parametrize("corrupt", [*CHECKPOINT_CASES.values(), *CONFIG_CASES.values()],
                         ids=[*CHECKPOINT_CASES, *CONFIG_CASES])
def test_a_bad_checkpoint_or_config_exits_2_naming_it_before_anything_is_written(
        corrupt, saved_model, text_file, tmp_path, capsys):
    folder = saved_model("llama")
    expected = corrupt(folder)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(quantize_args(folder, text_file, out)) == 2
    line = error_line(capsys)
    assert all(part in line for part in expected), (expected, line)
    assert not out.exists()


@pytest.mark.parametrize("case", ["cut-1-byte", "cut-30-percent", "vocab-mismatch", "index-missing-shard"])
def test_eval_of_a_bad_model_exits_2_and_writes_nothing(case, saved_model, text_file, tmp_path, capsys):
    folder = saved_model("llama")
    expected = CHECKPOINT_CASES[case](folder)
    out = tmp_path / "eval.json"
    assert main(eval_args(folder, text_file, out)) == 2
    line = error_line(capsys)
    assert all(part in line for part in expected) and not out.exists(), line


def test_eval_of_a_model_with_a_bad_config_exits_2(saved_model, text_file, tmp_path, capsys):
    folder = saved_model("llama")
    expected = CONFIG_CASES["bad-json"](folder)
    assert main(eval_args(folder, text_file, tmp_path / "eval.json")) == 2
    line = error_line(capsys)
    assert all(part in line for part in expected), line


def verdict(check, path):
    try:
        check(path)
        return "ok"
    except (UserError, SafetensorError):
        return "refused"


def safe_open_check(path):
    with safe_open(str(path), "pt") as f:
        list(f.keys())


FILE_CASES = ["cut-1-byte", "cut-30-percent", "offsets-past-end", "trailing-bytes", "header-length-past-end",
              "corrupt-header", "unknown-dtype", "span-disagrees-with-shape", "overlap"]


@pytest.mark.parametrize("case", FILE_CASES)
def test_the_header_checks_refuse_what_safe_open_refuses(case, saved_model):
    folder = saved_model("llama")
    assert verdict(read_header, folder / WEIGHTS) == verdict(safe_open_check, folder / WEIGHTS) == "ok"
    CHECKPOINT_CASES[case](folder)
    assert verdict(safe_open_check, folder / WEIGHTS) == "refused"
    assert verdict(read_header, folder / WEIGHTS) == "refused"


def test_the_header_checks_agree_with_safe_open_on_random_corruptions(saved_model):
    """Seeded byte flips anywhere in the length field and header, and random cuts of the file."""
    file = saved_model("llama") / WEIGHTS
    original = file.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    rng, disagreements, refused = random.Random(0), [], 0
    for trial in range(300):
        data = bytearray(original)
        if trial % 3 == 0:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(header_end)] = rng.choice(b'0123456789{}[]":,. \xff' + bytes([rng.randrange(256)]))
        file.write_bytes(bytes(data))
        ours, reference = verdict(read_header, file), verdict(safe_open_check, file)
        refused += reference == "refused"
        if ours != reference:
            disagreements.append((trial, ours, reference))
    assert not disagreements
    assert 100 < refused < 300  # the flips exercised both verdicts


def test_a_file_cut_after_opening_is_a_short_read_error(saved_model):
    folder = saved_model("llama")
    entries = open_checkpoint(folder)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[:-1])
    last = max(entries.values(), key=lambda e: e.end)
    with pytest.raises(UserError, match=rf"{last.key}: read \d+ of {last.end - last.begin} bytes"):
        read_entry(last)
    torch.testing.assert_close(read_entry(entries[Q]), torch.frombuffer(
        bytearray(data[entries[Q].begin:entries[Q].end]), dtype=torch.float32).reshape(entries[Q].shape))


@pytest.fixture
def no_hub(monkeypatch):
    """Records hub downloads instead of making them; each fails as offline."""
    import huggingface_hub

    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    return calls


@pytest.mark.parametrize("model, message", [
    ("./nope", "model folder ./nope does not exist"),
    ("../nope", "model folder ../nope does not exist"),
    ("models/nope", "model folder models/nope does not exist"),  # models/ is a local folder: a path
    ("a/b/c", "model folder a/b/c does not exist"),  # not shaped as a hub id
    ("/abs/nope", "model folder /abs/nope does not exist"),
    ("models/", "model folder models has no config.json"),
])
def test_a_missing_local_path_is_not_sent_to_the_hub(model, message, no_hub, text_file, tmp_path, monkeypatch,
                                                     capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert main(quantize_args(model, text_file, tmp_path / "run")) == 2
    assert message in error_line(capsys)
    assert no_hub == [] and not (tmp_path / "run").exists()


def test_a_hub_id_goes_to_the_hub_and_its_failure_says_no_local_folder_exists(no_hub, text_file, tmp_path,
                                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(quantize_args("some-org/some-model", text_file, tmp_path / "run")) == 2
    err = error_line(capsys)
    assert no_hub == ["some-org/some-model"]
    assert "no local folder some-org/some-model exists" in err and "offline" in err


def test_a_tied_model_reads_its_unstored_lm_head_from_the_embedding(saved_model, text_file, tmp_path):
    folder = saved_model("llama-tied")  # an untied one must store it ("index-lacks-lm-head" above)
    assert "lm_head.weight" not in read_header(folder / WEIGHTS)
    assert main(quantize_args(folder, text_file, tmp_path / "run")) == 0
