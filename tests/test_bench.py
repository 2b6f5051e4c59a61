"""scripts/_bench.py: what every benchmark measures with (peak memory, timing, tables, synthetic layers)."""
import json
import mmap
import time
from argparse import Namespace

import torch

from _bench import (PeakMemory, factor_layer, markdown_table, publish, repeat_times, second_moment,
                    synthetic_layer)


def test_peak_memory_sees_an_allocation_freed_before_the_block_ends():
    mib = 64
    with PeakMemory("cpu") as mem:
        # a fresh mapping: resident once touched, whatever memory earlier tests freed, and gone at close()
        block = mmap.mmap(-1, mib * 2**20)
        for page in range(0, len(block), mmap.PAGESIZE):
            block[page] = 1
        time.sleep(0.1)  # many sampling intervals
        block.close()
    assert mem.peak_mib > 0.9 * mib
    assert mem.high_mib == mem.base_mib + mem.peak_mib


def test_repeat_times_counts_each_call_and_orders_best_below_median():
    calls = []
    times = repeat_times(lambda: calls.append(time.sleep(0.001 * (1 + len(calls)))), 3)
    assert len(calls) == 4 and len(times.seconds) == 3  # one warm-up
    assert times.best == min(times.seconds) <= times.median and times.best >= 0.002


def test_markdown_table_is_header_rule_and_rows():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_publish_prints_the_table_and_writes_args_rows_and_table_only_where_asked(tmp_path, capsys):
    rows, text = [{"layers": 2}], markdown_table(["layers"], [["2"]])
    out = tmp_path / "new" / "bench.json"
    publish(text, rows, Namespace(out=str(out), steps=3))
    assert json.loads(out.read_text()) == {"args": {"out": str(out), "steps": 3}, "rows": rows, "table": text}
    publish(text, rows, Namespace(out=None))
    assert capsys.readouterr().out == f"{text}\n{text}\n"
    assert [f.name for f in tmp_path.rglob("*") if f.is_file()] == ["bench.json"]


def test_synthetic_second_moments_are_positive_definite_and_factor_layers_reproducible():
    W, H = synthetic_layer(16, 48, seed=3)
    assert W.shape == (16, 48) and H.dtype == torch.float64
    assert torch.linalg.eigvalsh(H).min() > 0
    W1, X1 = factor_layer(8, 200, 64, seed=1, outliers=4)
    W2, X2 = factor_layer(8, 200, 64, seed=1, outliers=4)
    assert torch.equal(W1, W2) and torch.equal(X1, X2) and X1.shape == (64, 200)
    direct = sum(torch.outer(x, x) for x in X1.double()) / len(X1)
    torch.testing.assert_close(second_moment(X1), direct, rtol=1e-12, atol=0)


def test_peer_table_gives_each_method_its_mean_over_seeds_and_their_range():
    from bench_peers import our_cases, table

    fp = {"setting": "", "method": "FP", "ppl": 10.0, "seconds": 0.0, "cpu_seconds": 0.0}
    run = lambda method, ppl, cpu, seed=None: {"setting": "w4g128", "method": method, "seed": seed, "ppl": ppl,  # noqa: E731
                                               "seconds": cpu, "cpu_seconds": cpu}
    rows = [fp, run("w4g128 GPTQ", 10.3, 2.0), run("w4g128 AutoRound", 10.1, 30.0, 0),
            run("w4g128 AutoRound", 10.3, 50.0, 1)]
    lines = table(rows, 256).splitlines()
    peer = next(line for line in lines if line.startswith("| w4g128 AutoRound"))
    cells = [c.strip() for c in peer.strip("|").split("|")]
    assert cells[1:5] == ["2", "10.2000", "+2.00%", "+1.00% … +3.00%"] and cells[6:] == ["40", "20.0x"]
    learned = [case for case in our_cases("w4g128", 200, [0, 3]) if case[3] is not None]
    assert len(learned) == 4 and {c[2][-1] for c in learned} == {"refine.seed=0", "refine.seed=3"}


def test_peer_bench_refuses_bad_seeds_before_any_work(capsys):
    from bench_peers import main

    assert main(["--seeds", "a,b"]) == 2 and main(["--seeds", "-1"]) == 2
    assert "--seeds" in capsys.readouterr().err
