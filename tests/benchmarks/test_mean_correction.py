"""The mean-correction study's per-layer measurement (benchmarks/mean_correction.py) on a small structured input."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mean_correction  # noqa: E402

from flashprefill_vllm.config import FlashPrefillConfig  # noqa: E402
from flashprefill_vllm.synthetic import structured_qkv  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the op's plain-torch reference on CPU


def test_error_falls_as_tau_keeps_more_and_vanishes_at_tau_one():
    q, k, v, _ = structured_qkv([768], 2, 1, 64, block_size=64, seed=3)
    config = FlashPrefillConfig(block_size=64, min_sparse_len=0, num_sink_blocks=1, num_local_blocks=1,
                                num_dense_tail_blocks=1, alpha=0.9)
    rows = mean_correction.evaluate(q, k, v, 0.125, config, [0.0, 0.9, 1.0])
    assert [r["tau"] for r in rows] == [0.0, 0.9, 1.0]
    densities = [r["density"] for r in rows]
    errors = [r["rel_l2_sparse"] for r in rows]
    assert densities == sorted(densities) and densities[0] < 0.6 and densities[-1] > 0.9
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-3 and errors[-1] < 1e-5
    assert rows[-1]["rel_l2_corrected"] < 1e-5            # nothing skipped: nothing to correct
    assert all(r["rel_l2_corrected"] >= 0 for r in rows)
