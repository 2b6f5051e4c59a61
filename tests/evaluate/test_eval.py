"""lm-eval integration: the offline tasks score what the model's log-likelihoods say, rolling perplexity
agrees with ours under the same windowing, and `orthoquant eval --tasks` records tasks (offline)."""
import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is first imported (by lm-eval)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from orthoquant.cli import main  # noqa: E402
from orthoquant.errors import UserError  # noqa: E402
from orthoquant.evaluate.lm_eval import (TaskOptions, _task_manager, expand_tasks, headline_metric,  # noqa: E402
                                         run_tasks)
from orthoquant.evaluate.ppl import perplexity  # noqa: E402
from orthoquant.evaluate.task_paths import LOCAL_TASKS, _Dumper, _Loader, rewrite_config  # noqa: E402
from orthoquant.models.tiny import tiny_model  # noqa: E402

pytest.importorskip("lm_eval")
MC_DATA = LOCAL_TASKS / "oq_code_nextline" / "data.jsonl"
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def fp_model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


def continuation_loglik(model, tokenizer, context: str, choice: str) -> float:
    """log p(choice | context) as lm-eval defines it: the context's trailing whitespace moves to the
    continuation, the pair is encoded whole and split at the context's length, and the input keeps
    the last MAX_LENGTH + 1 tokens."""
    stripped = context.rstrip()
    whole = tokenizer(stripped + context[len(stripped):] + choice).input_ids
    n_cont = len(whole) - len(tokenizer(stripped).input_ids)
    ids = torch.tensor([whole[-(MAX_LENGTH + 1):]])
    with torch.no_grad():
        logp = model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0]
    targets = ids[0, 1:]
    return float(logp[-n_cont:].gather(-1, targets[-n_cont:, None]).sum())


def test_multiple_choice_accuracy_is_the_argmax_of_the_model_logliks(fp_model, tokenizer):
    docs = [json.loads(line) for line in MC_DATA.read_text().splitlines()][:32]
    tasks = run_tasks(fp_model, tokenizer, TaskOptions(("oq_code_nextline",), limit=32, bootstrap_iters=0,
                                                       batch_size=8), MAX_LENGTH)["oq_code_nextline"]
    hits = {"acc": 0, "acc_norm": 0}
    for doc in docs:
        lls = [continuation_loglik(fp_model, tokenizer, doc["context"], c) for c in doc["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # lm-eval: per character of the choice
        hits["acc"] += max(range(4), key=lls.__getitem__) == doc["label"]
        hits["acc_norm"] += max(range(4), key=normed.__getitem__) == doc["label"]
    assert tasks["samples"] == 32 and tasks["metric"] == "acc_norm"
    assert tasks["metrics"]["acc,none"] == pytest.approx(hits["acc"] / 32, abs=1e-9)
    assert tasks["metrics"]["acc_norm,none"] == pytest.approx(hits["acc_norm"] / 32, abs=1e-9)
    assert tasks["value"] == tasks["metrics"]["acc_norm,none"]


def rolling_nll(model, tokens: list[int], length: int) -> tuple[float, int]:
    """Summed NLL of tokens[1:] scored as lm-eval rolls a document: windows of ``length`` predictions
    whose input starts one token back (so no window starts without context); the last window keeps
    a full ``length`` of input and scores only the tokens not yet predicted."""
    total, count = 0.0, 0
    for start in range(1, len(tokens), length):
        end = min(start + length, len(tokens))
        ids = torch.tensor([tokens[max(0, end - 1 - length):end]])
        with torch.no_grad():
            logp = model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0, -(end - start):]
        total -= float(logp.gather(-1, ids[0, -(end - start):, None]).sum())
        count += end - start
    return total, count


def test_rolling_perplexity_equals_ours_on_the_same_windows(fp_model, tokenizer, tmp_path, monkeypatch):
    """lm-eval predicts every token, the first from the prefix token (BOS): with its windows our
    perplexity is its number; our default windows (non-overlapping, a window's first token never
    predicted) give another."""
    text = " ".join(f"gamma {i} delta rotation{i % 7} quant" for i in range(60))
    folder = tmp_path / "tasks" / "roll"
    folder.mkdir(parents=True)
    (folder / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    config = yaml.safe_load((LOCAL_TASKS / "oq_code_ppl" / "oq_code_ppl.yaml").read_text())
    config.update(task="roll", tag=[], dataset_kwargs={"data_files": {"test": "doc.jsonl"}})  # relative
    (folder / "roll.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where `doc.jsonl` does not resolve: paths must not depend on it
    length = 64
    result = run_tasks(fp_model, tokenizer, TaskOptions(("roll",), include_paths=(str(tmp_path / "tasks"),),
                                                        bootstrap_iters=0), length)["roll"]
    tokens = [tokenizer.bos_token_id] + tokenizer(text).input_ids  # prefix token, then lm-eval's encoding
    nll, count = rolling_nll(fp_model, tokens, length)
    assert count == len(tokens) - 1 and count % length != 0 and count > 3 * length  # a short last window
    ours = math.exp(nll / count)
    theirs = math.exp(math.log(result["metrics"]["byte_perplexity,none"]) * len(text.encode()) / count)
    assert theirs == pytest.approx(ours, rel=1e-5)
    assert result["metrics"]["word_perplexity,none"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-5)
    body = tokens[1:]
    plain = perplexity(fp_model, torch.tensor([body[i:i + length] for i in range(0, len(body) - length + 1, length)]),
                       torch.device("cpu"))
    assert abs(plain / ours - 1) > 1e-3


def test_eval_cli_writes_tasks_and_results_files(saved_model, text_file, tmp_path, monkeypatch):
    model = saved_model("llama")
    run = tmp_path / "run"
    assert main(["quantize", str(model), "--recipe", "rtn-w4a4kv4", "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(run), "--device", "cpu"]) == 0
    monkeypatch.chdir(tmp_path)  # task data paths resolve wherever the command runs
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--ppl", str(text_file), "--seqlen", "256", "--max-windows", "2",
                 "--tasks", "oq_code_nextline", "--limit", "4", "--batch-size", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"ppl", "seqlen", "tasks", "recipe", "partial", "seconds"}
    assert result["partial"] == {"max_windows": 2, "limit": 4}
    task = result["tasks"]["oq_code_nextline"]
    assert task["metric"] == "acc_norm" and task["samples"] == 4 and 0 <= task["value"] <= 1
    assert main(["eval", str(run), "--ppl", "", "--tasks", "oq_code_ppl", "--limit", "1", "--max_length", "128"]) == 0
    saved = json.loads((run / "results.json").read_text())
    assert saved["ppl"] == {} and saved["tasks"] == {}  # --max-windows and --limit: partial numbers only
    partial = saved["partial"]
    assert set(partial["tasks"]) == {"oq_code_nextline", "oq_code_ppl"}  # the second call added to the first
    assert partial["ppl"] == result["ppl"] and partial["seqlen"] == 256 and partial["limit"] == 1
    assert saved["versions"]["lm_eval"] and saved["versions"]["torch"] == torch.__version__
    assert saved["seeds"]["calibration"] == 0 and set(saved["timings"]) >= {"load", "tasks", "total"}
    assert "| oq_code_ppl | byte_perplexity |" in (run / "results.md").read_text()


def test_unknown_task_names_are_a_user_error_with_suggestions():
    class Index:  # lm-eval's TaskManager, without reading its 14k YAMLs
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["piqa", "arc_easy", "arc_challenge"] if include_defaults else ["oq_code_ppl"]

    assert _task_manager(Index, [], ["oq_code_ppl"]).all_tasks == ["oq_code_ppl"]  # local: no default index
    assert _task_manager(Index, [], ["piqa"]).all_tasks[0] == "piqa"
    with pytest.raises(UserError, match=r"unknown lm-eval task\(s\): arc_eazy \(did you mean arc_easy"):
        _task_manager(Index, [], ["piqa", "arc_eazy"])


def test_suites_and_the_papers_metric_rule():
    assert expand_tasks(["quarot6", "piqa", "boolq"]) == [
        "piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada_openai", "boolq"]
    assert len(expand_tasks(["ostquant9"])) == 9
    both = {"acc,none": 0.5, "acc_norm,none": 0.6, "perplexity,none": 9.0}
    assert headline_metric("piqa", both) == "acc_norm,none"
    assert headline_metric("winogrande", both) == "acc,none"  # QuaRot's rule would take acc_norm if it existed
    assert headline_metric("lambada_openai", both) == "acc,none"
    assert headline_metric("my_task", {"exact_match,strict-match": 0.3, "acc_stderr,none": "N/A"}) == \
        "exact_match,strict-match"


def test_task_yaml_rewrite_keeps_lm_eval_tags_and_makes_paths_absolute(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    text = "task: t\nprocess_docs: !function utils.process\ndataset_kwargs:\n  data_files: {test: d.jsonl, x: hub/x}\n"
    config = yaml.load(text, Loader=_Loader)
    new = rewrite_config(config, tmp_path)
    assert new["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "d.jsonl"), "x": "hub/x"}
    again = yaml.load(yaml.dump(new, Dumper=_Dumper), Loader=_Loader)
    assert again == new and again["process_docs"].tag == "!function"


def test_an_exported_checkpoint_evaluates_as_its_run_and_is_left_untouched(saved_model, text_file, tmp_path):
    export = pytest.importorskip("orthoquant.export")
    from orthoquant.evaluate.run_eval import target_kind

    run, out = tmp_path / "run", tmp_path / "native"
    assert main(["quantize", str(saved_model("llama")), "--recipe", "rtn-w4a4kv4", "--calib", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(run), "--device", "cpu"]) == 0
    export.export_run(run, out, format="native")
    assert (target_kind(str(out)), target_kind(str(run))) == ("export", "run")
    ppl = {}
    for target in (run, out):
        assert main(["eval", str(target), "--ppl", str(text_file), "--seqlen", "64", "--max-windows", "3",
                     "--json", str(tmp_path / "e.json")]) == 0
        ppl[target] = json.loads((tmp_path / "e.json").read_text())["ppl"]
    assert ppl[out] == ppl[run]
    assert not (out / "results.json").exists()
    export.load_quantized(out)  # its manifest still matches every file


# ---------------------------------------------------------------- lm-eval pass-through (issue 20.5)

def test_perplexity_only_where_asked(saved_model, tmp_path):
    from orthoquant.evaluate.run_eval import choose_ppl_sources

    tasks = TaskOptions(("oq_code_nextline",))
    assert choose_ppl_sources(None, None) == ["wikitext2"]  # `eval RUN` with no flags: as before
    assert choose_ppl_sources(None, tasks) == [] and choose_ppl_sources("", None) == []
    assert choose_ppl_sources("a.txt,b.txt", tasks) == ["a.txt", "b.txt"]
    out = tmp_path / "e.json"  # offline: a wikitext2 perplexity nobody asked for would exit 2
    assert main(["eval", str(saved_model("llama")), "--tasks", "oq_code_nextline", "--limit", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ppl"] == {} and set(result["tasks"]) == {"oq_code_nextline"}


def test_batch_size_auto_gives_the_numbers_of_batch_one(saved_model, text_file, tmp_path, capsys):
    from orthoquant.evaluate.run_eval import perplexity_batch

    model = saved_model("llama")
    ppl = {}
    for batch in ("1", "auto"):
        assert main(["eval", str(model), "--ppl", str(text_file), "--seqlen", "32", "--batch-size", batch,
                     "--json", str(tmp_path / f"{batch}.json")]) == 0
        ppl[batch] = json.loads((tmp_path / f"{batch}.json").read_text())["ppl"]["calib.txt"]
    assert ppl["auto"] == pytest.approx(ppl["1"], rel=1e-9)
    assert perplexity_batch("auto", tiny_model("llama"), 32, torch.device("cpu")) > 1
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(model), "--batch-size", "many"])
    assert stop.value.code == 2 and "neither auto nor a whole number" in capsys.readouterr().err


def test_a_run_folder_evaluates_in_its_models_dtype(tmp_path, monkeypatch):
    from orthoquant.evaluate import run_eval

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert run_eval.config_dtype(tmp_path) == torch.bfloat16
    seen = []
    monkeypatch.setattr(run_eval, "open_run", lambda target, device, dtype, stream: seen.append(dtype) or (0, 1, 2, 3))
    for asked in ("auto", "float32"):
        run_eval._load_run(str(tmp_path), torch.device("cpu"), asked, False)
    assert seen == [torch.bfloat16, torch.float32]


def test_max_length_defaults_to_the_models_context():
    from types import SimpleNamespace

    from orthoquant.evaluate.lm_eval import MAX_LENGTH_CAP, default_max_length

    assert default_max_length(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))) == 256
    assert default_max_length(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10**6))) == MAX_LENGTH_CAP
    assert default_max_length(SimpleNamespace(config=SimpleNamespace())) == 2048


def test_output_path_and_log_samples_write_lm_evals_own_files(fp_model, tokenizer, tmp_path, capsys):
    options = TaskOptions(("oq_code_nextline",), limit=4, bootstrap_iters=0, output_path=str(tmp_path / "lm"),
                          log_samples=True)
    value = run_tasks(fp_model, tokenizer, options)["oq_code_nextline"]["value"]
    results = list((tmp_path / "lm").rglob("results_*.json"))
    samples = list((tmp_path / "lm").rglob("samples_oq_code_nextline_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    assert json.loads(results[0].read_text())["results"]["oq_code_nextline"]["acc_norm,none"] == value
    assert len(samples[0].read_text().splitlines()) == 4
    with pytest.raises(UserError, match="--log-samples needs --output-path"):
        TaskOptions(("oq_code_nextline",), log_samples=True)
    assert main(["eval", "unused", "--tasks", "oq_code_nextline", "--log-samples"]) == 2
    assert "--log-samples needs --output-path" in capsys.readouterr().err


def test_chat_template_and_offline_hub_tasks_are_one_line_errors(fp_model, tokenizer, saved_model, monkeypatch,
                                                                 capsys):
    import lm_eval

    from orthoquant.evaluate.lm_eval import check_chat_template

    assert main(["eval", str(saved_model("llama")), "--tasks", "oq_code_nextline", "--apply-chat-template"]) == 2
    assert "the tokenizer has no chat template" in capsys.readouterr().err
    monkeypatch.setattr(tokenizer, "chat_template", "{{ messages }}")
    check_chat_template(tokenizer, True)  # a tokenizer with a template passes

    def unreachable(**kwargs):  # what `datasets` raises for a hub task that is not cached
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", unreachable)
    with pytest.raises(UserError, match="on the Hugging Face hub, which is offline"):
        run_tasks(fp_model, tokenizer, TaskOptions(("oq_code_nextline",), limit=2))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    with pytest.raises(ConnectionError):  # online, a network failure is not blamed on offline mode
        run_tasks(fp_model, tokenizer, TaskOptions(("oq_code_nextline",), limit=2))


def test_a_partial_evaluation_never_replaces_a_whole_one(tmp_path):
    from orthoquant.evaluate.report import load_run
    from orthoquant.evaluate.results import write_results

    def result(ppl, partial):
        return {"ppl": {"test.txt": ppl}, "seqlen": 64, "tasks": {}, "recipe": None, "partial": partial, "seconds": 1}

    whole, quick = tmp_path / "whole", tmp_path / "quick"
    whole.mkdir(), quick.mkdir()
    write_results(whole, result(10.0, None), {})
    record = write_results(whole, result(12.5, {"max_windows": 3}), {})
    assert record["ppl"] == {"test.txt": 10.0}
    assert record["partial"]["ppl"] == {"test.txt": 12.5} and record["partial"]["max_windows"] == 3
    assert "Partial evaluation (max_windows 3)" in (whole / "results.md").read_text()
    shown = load_run(str(whole))
    assert shown.result["ppl"] == {"test.txt": 10.0} and shown.evaluation == "whole"
    write_results(quick, result(12.5, {"max_windows": 3}), {})
    shown = load_run(str(quick))
    assert shown.result["ppl"] == {"test.txt": 12.5} and shown.evaluation == "partial (max_windows 3)"


def test_the_offline_tasks_are_package_data():
    """Every file of the offline tasks lives inside the package and is named by pyproject's package-data
    patterns, so a wheel (not only a source checkout) carries them."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import orthoquant

    package = Path(orthoquant.__file__).parent
    root = package.parent / "pyproject.toml"
    patterns = tomllib.loads(root.read_text())["tool"]["setuptools"]["package-data"]["orthoquant"]
    files = [p.relative_to(package).as_posix() for p in LOCAL_TASKS.rglob("*") if p.is_file()]
    assert LOCAL_TASKS.is_relative_to(package) and len(files) >= 4
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files
