"""The decode A/B benchmark's log parsing and summary (the timing itself needs a GPU and vLLM)."""

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
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


def test_host_adjusted_change_recovers_the_effect_at_equal_host_speed():
    # tok/s inversely proportional to the host's step time; the plugin 3% slower at equal host speed; the plugin's
    # processes happen to land on slower hosts, so the raw medians exaggerate the effect.
    hosts = {"stock": [30.0, 40.0, 35.0, 31.0], "plugin": [42.0, 44.0, 33.0, 39.0]}
    procs = [{"setting": s, "median_fa_build_ms": h, "median_tok_s": 4e5 / h * (0.97 if s == "plugin" else 1.0)}
             for s, hs in hosts.items() for h in hs]
    change, se = bench.host_adjusted_change(procs)
    assert change == pytest.approx(-0.03, abs=1e-9) and se < 1e-6
    assert bench.summarize(procs)["plugin_change"] < -0.1        # the raw medians: far off
    assert bench.host_adjusted_change(procs[:3] + procs[4:5]) is None   # too few processes
    assert bench.host_adjusted_change([p for p in procs if p["setting"] == "stock"] * 2) is None
