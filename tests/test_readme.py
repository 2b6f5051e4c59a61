"""The README's Python example runs: its block is extracted and executed on a tiny local model."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_python_example_runs_on_a_tiny_model(saved_model, text_file, tmp_path, monkeypatch):
    (block,) = python_blocks()
    folder = saved_model("llama")
    local = (block.replace('"meta-llama/Llama-3.2-1B"', repr(str(folder)))  # no hub: a tiny local model
             .replace('"wikitext2"', repr(str(text_file))).replace("nsamples=128", "nsamples=4")
             .replace("seqlen=2048", "seqlen=32"))
    assert local.count(str(folder)) == 1 and str(text_file) in local
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(local, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "x" / "tokenizer_config.json").is_file()
    assert namespace["report"]["format"] == "compressed-tensors" and namespace["stock"] is not None
