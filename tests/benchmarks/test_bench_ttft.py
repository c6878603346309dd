"""The TTFT benchmark's log reading and argument checks (the timing itself needs a GPU and vLLM)."""

import argparse
import importlib.util
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ttft.py"
spec = importlib.util.spec_from_file_location("bench_ttft", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _line(layer, tokens, cached, pct):
    tail = f" ({cached} cached tokens before them)" if cached else ""
    return f"INFO FlashPrefill model.layers.{layer}.attn: 1 prefill(s), {tokens} tokens, kept {pct}% of causal key blocks{tail}"


def test_densities_from_log_splits_prompts_and_chunks():
    log = "\n".join([
        "[sched] max_num_batched_tokens=256",
        # A 512-token prompt in two 256-token chunks, two layers; then a 128-token prompt that ran stock.
        _line(0, 256, 0, 50), _line(1, 256, 0, 50), _line(0, 256, 256, 25), _line(1, 256, 256, 25),
        "[ttft] density L=512 ttft=12.0 ms",
        "[ttft] density L=128 ttft=3.0 ms",
    ])
    by_length, by_chunk = bench.densities_from_log(log, 128)
    assert by_length == {512: pytest.approx((0.5 * 3 + 0.25 * 7) / 10), 128: 1.0}
    assert [(c["start"], c["tokens"], c["density"]) for c in by_chunk[512]] == [(0, 256, 0.5), (256, 256, 0.25)]
    assert 128 not in by_chunk


@pytest.mark.parametrize("text", ["0", "8192", "default"])
def test_chunk_size_accepts(text):
    assert bench._chunk_size(text) == text


@pytest.mark.parametrize("text", ["-1", "8", "auto", "1e4"])
def test_chunk_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="'default'"):
        bench._chunk_size(text)
