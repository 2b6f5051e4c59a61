"""`orthoquant report`: runs side by side in a markdown table whose numbers are the runs' own, and charts."""
import json

import pytest

from orthoquant.cli import main
from orthoquant.evaluate.results import fmt, write_results
from orthoquant.runfolder import write_json

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def task(metric, value, higher=True):
    return {"metric": metric, "value": value, "higher_is_better": higher, "metrics": {f"{metric},none": value},
            "samples": 10, "num_fewshot": 0, "version": 1.0}


def fake_run(folder, recipe, ppl, acc, word_ppl, errors):
    """A run folder as `quantize` + `eval` leave it: run.json with per-layer metrics, results.json."""
    folder.mkdir()
    metrics = {str(i): {"seconds": 0.1, "linears": {"self_attn.q_proj": {"loss": 1.0, "relative": e},
                                                    "mlp.down_proj": {"loss": 2.0, "relative": 2 * e}}}
               for i, e in enumerate(errors)}
    write_json(folder / "run.json", {"status": "complete", "metrics": metrics})
    result = {"ppl": {"wikitext2": ppl}, "seqlen": 256, "recipe": {"name": recipe, "calibration": {"seed": 0}},
              "tasks": {"oq_code_nextline": task("acc_norm", acc), "oq_code_ppl": task("word_perplexity", word_ppl, False)},
              "seconds": 1.0}
    write_results(folder, result, {"load": 0.1, "total": 1.0})
    return folder


def read_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return rows[0], {row[0]: row for row in rows[2:]}


def test_report_of_two_runs_writes_table_and_charts_with_the_runs_numbers(tmp_path, capsys):
    rtn = fake_run(tmp_path / "rtn", "rtn-w4a4kv4", 31.5, 0.40625, 123456.789, [0.02, 0.05, 0.03])
    quarot = fake_run(tmp_path / "quarot", "quarot-w4a4kv4", 12.25, 0.59375, 812.5, [0.004, 0.006, 0.005])
    fp = tmp_path / "fp16.json"  # `orthoquant eval MODEL --json fp16.json`: no run folder, no layer metrics
    fp.write_text(json.dumps({"ppl": {"wikitext2": 10.0}, "seqlen": 256, "recipe": None, "seconds": 1.0,
                              "tasks": {"oq_code_nextline": task("acc_norm", 0.65625)}}))
    out = tmp_path / "report"
    assert main(["report", str(fp), str(rtn), f"QuaRot={quarot}", "--out", str(out)]) == 0
    header, rows = read_table((out / "report.md").read_text())
    assert header == ["run", "recipe", "ppl wikitext2 (L=256)", "oq_code_nextline (acc_norm)",
                      "oq_code_ppl (word_perplexity)", "mean rel. error"]
    assert rows["fp16"] == ["fp16", "full precision", fmt(10.0), fmt(0.65625), "–", "–"]
    assert rows["rtn"] == ["rtn", "rtn-w4a4kv4", fmt(31.5), fmt(0.40625), fmt(123456.789),
                           fmt((0.03 + 0.075 + 0.045) / 3)]
    assert rows["QuaRot"] == ["QuaRot", "quarot-w4a4kv4", fmt(12.25), fmt(0.59375), fmt(812.5), fmt(0.0075)]
    assert "| rtn | rtn-w4a4kv4 | 31.5000 |" in capsys.readouterr().out
    numbers = json.loads((out / "report.json").read_text())["numbers"]
    assert numbers["rtn"]["oq_code_ppl (word_perplexity)"] == 123456.789
    for name in ("ppl.png", "tasks.png", "layer_error.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
        assert f"]({name})" in (out / "report.md").read_text()


def test_report_without_layer_metrics_or_tasks_skips_those_charts(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"ppl": {"c4": 9.0}, "seqlen": 64, "recipe": None, "tasks": {}}))
    assert main(["report", str(tmp_path / "a.json"), "--out", str(tmp_path / "r")]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["ppl.png", "report.json", "report.md"]


def test_report_on_a_run_never_evaluated_exits_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r")]) == 2
    assert "has no evaluation results" in capsys.readouterr().err


@pytest.mark.parametrize("values", [[26.704, 26.880, 26.759, 27.14], [0.41, 0.40], [5.0, 5.0], [31.2, float("nan"), 30.9]])
def test_chart_axes_surround_the_data_so_small_gaps_show(values):
    """A 1-2% perplexity gap must span most of its axis: limits around the data, not from 0."""
    from orthoquant.evaluate.charts import axis_limits

    finite = [v for v in values if v == v]
    lo, hi = axis_limits(values)
    assert lo < min(finite) and max(finite) < hi
    spread = max(finite) - min(finite)
    assert (spread / (hi - lo) >= 0.5) if spread else (hi - lo) <= 0.1 * max(finite)
