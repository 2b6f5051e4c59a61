"""The demo's / benchmarks' perplexity table: each row is what `orthoquant quantize` + `eval` give."""
import json
import math

import pytest
import torch

from orthoquant import load_recipe
from orthoquant.evaluate.preset_table import parse_case, preset_perplexities, table_row, write_preset_table
from orthoquant.evaluate.run_eval import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def table(trained_model, tmp_path_factory):
    corpus = trained_model.parent / "corpus"
    out = tmp_path_factory.mktemp("table")
    cases = ["fp16", ("rtn-w4-g32", "rtn-w4a16", ["weights.group_size=32"])]
    seen = []
    rows = preset_perplexities(str(trained_model), cases, str(corpus / "train.txt"), str(corpus / "test.txt"),
                               out, nsamples=4, seqlen=64, max_windows=8, on_row=seen.append)
    assert seen == rows  # each row is handed out as soon as it is measured
    return rows, out, corpus


def test_noise_is_the_paired_standard_error_of_the_change(table):
    rows, _, _ = table
    fp, rtn = rows[0], rows[2]
    assert len(fp.window_losses) == 8 and fp.noise_against(fp) == 0.0
    assert rows[1].noise_against(fp) < 1e-6  # fp16 (norms folded): the same loss on every window
    diff = rtn.window_losses - fp.window_losses
    assert math.log(rtn.ppl / fp.ppl) == pytest.approx(float(diff.mean()), rel=1e-9)  # ppl is exp(mean loss)
    assert 0 < rtn.noise_against(fp) < 1
    assert table_row(rtn, fp).split(" | ")[3] == f"{rtn.noise_against(fp):.2%}"


def test_rows_are_fp_then_each_case_in_order(table):
    rows, _, _ = table
    assert [r.name for r in rows] == ["FP (unquantized)", "fp16", "rtn-w4-g32"]
    assert rows[1].ppl == pytest.approx(rows[0].ppl, rel=1e-6)  # fp16 quantizes nothing
    assert rows[2].ppl != pytest.approx(rows[0].ppl, rel=1e-4)  # 4 bits do change the model


def test_a_case_is_its_preset_with_overrides_and_scores_as_eval_does(table):
    rows, out, corpus = table
    recipe = load_recipe(str(out / "rtn-w4-g32" / "recipe.yaml"))
    assert recipe.name == "rtn-w4a16" and recipe.weights.group_size == 32 and recipe.calibration.nsamples == 4
    assert json.loads((out / "fp.json").read_text())["ppl"]["test.txt"] == rows[0].ppl  # for `report`
    ppl = evaluate(str(out / "rtn-w4-g32"), [str(corpus / "test.txt")], 64, CPU, max_windows=8)["ppl"]["test.txt"]
    assert rows[2].ppl == pytest.approx(ppl, rel=1e-9)


def test_written_table_names_every_row(table, tmp_path):
    rows, _, _ = table
    text = write_preset_table(rows, 64, tmp_path)
    assert all(r.name in text for r in rows) and "+0.00%" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seqlen"] == 64 and saved["ppl"]["rtn-w4-g32"] == rows[2].ppl


def test_demo_preset_entries_carry_their_overrides():
    assert parse_case("gptq-w4a16") == ("gptq-w4a16", "gptq-w4a16", [])
    entry = "rtn-w4a16@weights.group_size=128@weights.bits=3"
    label, preset, sets = parse_case(entry)
    assert (label, preset, sets) == (entry, "rtn-w4a16", ["weights.group_size=128", "weights.bits=3"])
    recipe = load_recipe(preset, sets)
    assert (recipe.weights.group_size, recipe.weights.bits) == (128, 3)
