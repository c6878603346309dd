"""The decode A/B benchmark's log parsing and summary (the timing itself needs a GPU and vLLM)."""

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "bench_decode.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

LOG = """INFO noise
[diag] plugin run 0: 9001 tok/s  {'dispatch_NONE': 1, 'fa_build': 256, 'attn_forward': 24, 'dispatch_FULL': 255}  fa_build_s=42.7ms fp_build_s=46.7ms
[diag] plugin run 1: 8932 tok/s  {'dispatch_PIECEWISE': 1, 'fa_build': 256, 'attn_forward': 24, 'dispatch_FULL': 255}  fa_build_s=44.8ms fp_build_s=48.8ms
[diag] plugin run 2: 9240 tok/s  {'dispatch_PIECEWISE': 1, 'fa_build': 256, 'attn_forward': 24, 'dispatch_FULL': 255}  fa_build_s=43.1ms fp_build_s=46.8ms
[diag] qwen0.5b plugin median 9001 tok/s
"""


def test_parse_log_reads_rates_counters_and_builder_times():
    runs = bench.parse_log(LOG)
    assert [r["tok_s"] for r in runs] == [9001, 8932, 9240]
    assert runs[1]["counts"]["dispatch_FULL"] == 255 and runs[1]["counts"]["attn_forward"] == 24
    assert runs[0]["fa_build_ms"] == pytest.approx(42.7) and runs[0]["fp_build_ms"] == pytest.approx(46.7)


def test_process_record_drops_the_first_run(tmp_path):
    log = tmp_path / "qwen_plugin_1.log"
    log.write_text(LOG)
    rec = bench.process_record("plugin", 1, log)
    assert rec["median_tok_s"] == pytest.approx((8932 + 9240) / 2)


def test_summarize_compares_medians_of_process_medians():
    procs = [{"setting": "stock", "median_tok_s": x} for x in (100.0, 120.0, 110.0)] + \
            [{"setting": "plugin", "median_tok_s": x} for x in (99.0, 121.0, None)]
    s = bench.summarize(procs)
    assert s["stock"]["median"] == 110.0 and s["plugin"]["median"] == 110.0
    assert s["plugin_change"] == pytest.approx(0.0)
