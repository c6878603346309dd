"""bench_fa4_sparse.py's CPU parts: the dry run, and the chunked-prefill case's index and paged read."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_fa4_sparse as bench  # noqa: E402
from bench_op import BS, HQ, Timer, fixed_density_index  # noqa: E402

from flashprefill_vllm.ops.reference import index_to_mask  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the op's plain-torch reference on CPU


def test_chunk_index_is_the_last_rows_of_the_whole_prompt_index():
    L, C = 2048, 512
    whole = fixed_density_index(HQ, L, 0.5, 1, torch.device("cpu"))
    chunk = bench.fixed_density_chunk_index(HQ, L, C, 0.5, torch.device("cpu"))
    assert chunk.block_index.shape[2] == C // BS
    got = index_to_mask(chunk, 0, C, L)           # bottom-right: the chunk's rows are the prompt's last rows
    want = index_to_mask(whole, 0, L, L)[:, (L - C) // BS:]
    assert torch.equal(got, want) and got.any() and not got.all()


def test_chunk_case_on_cpu_reads_the_paged_cache_right():
    timer = Timer(torch.device("cpu"), warmup=0, budget_s=0.0, min_reps=1, max_reps=1)
    rec = bench.chunk_case(1024, 256, 64, timer, None, "no FA4 here")
    assert rec["ours_paged"]["ms"] > 0 and rec["gather"]["ms"] > 0
    assert rec["fa4_sparse_b"] == {"ms": None, "error": "no FA4 here"}
    assert 0 < rec["density"] < 1


def test_dry_run_exits_zero(tmp_path):
    assert bench.main(["--dry-run", "--head-dims", "64", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "bench_fa4_sparse_cpu.json").exists()


def test_dry_run_with_model_heads(tmp_path, monkeypatch):
    import json
    for name in ("HQ", "HKV", "POLICIES"):          # --heads sets the module's shape: restore it afterwards
        monkeypatch.setattr(bench, name, getattr(bench, name))
    assert bench.main(["--dry-run", "--head-dims", "64", "--heads", "14/2", "--out-dir", str(tmp_path)]) == 0
    shape = json.loads((tmp_path / "bench_fa4_sparse_cpu.json").read_text())["shape"]
    assert (shape["num_heads"], shape["num_kv_heads"]) == (14, 2)
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--heads", "14/3"])
