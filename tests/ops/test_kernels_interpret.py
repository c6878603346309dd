"""Triton kernels against the reference. On CPU they run under TRITON_INTERPRET=1 (fp16 only: the interpreter
computes bf16 wrongly), on small shapes; the GPU suite (tests/gpu) covers the large randomized space."""

import dataclasses
import os

import pytest
import torch

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm import synthetic
from flashprefill_vllm.ops import flash_prefill_varlen_func, reference
from flashprefill_vllm.ops.block_sparse_index import block_density

from helpers import assert_index_invariants, assert_same_index, cu_from_lens

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # (lens, Hq, Hkv, D, block_size, shared)
    ([1200, 70, 129], 4, 2, 64, 64, True),
    ([1200, 70, 129], 4, 2, 64, 64, False),
    ([520], 2, 2, 128, 128, True),
    ([1, 64, 200], 3, 1, 64, 64, True),
    ([600], 2, 1, 64, 256, False),
]


def _ids(case):
    lens, hq, hkv, d, bs, shared = case
    return f"lens{'-'.join(map(str, lens))}_h{hq}x{hkv}_d{d}_b{bs}_{'shared' if shared else 'perhead'}"


def _fused_qkv_views(q, k, v):
    """Strided views into one (tokens, Hq + 2 Hkv, D) buffer, as vLLM's fused QKV projection produces."""
    hq, hkv = q.shape[1], k.shape[1]
    buf = torch.cat([q, k, v], dim=1)
    return buf[:, :hq], buf[:, hq:hq + hkv], buf[:, hq + hkv:]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_index_and_output_match_reference(case):
    lens, hq, hkv, d, bs, shared = case
    q, k, v, cu = synthetic.structured_qkv(lens, hq, hkv, d, dtype=torch.float16, block_size=bs, num_planted=2)
    q, k, v, cu = (t.to(DEV) for t in (q, k, v, cu))
    q, k, v = _fused_qkv_views(q, k, v)
    assert not q.is_contiguous()
    cfg = FlashPrefillConfig(alpha=0.3, block_size=bs, min_sparse_len=0, num_sink_blocks=1, num_local_blocks=1,
                             num_dense_tail_blocks=1, gqa_shared_index=shared)
    scale = 0.09
    want_idx, energies = reference.build_index(q, k, cu, cu, max(lens), max(lens), scale, cfg)
    out = torch.full_like(q, float("nan"))
    got_out, got_lse, got_idx = flash_prefill_varlen_func(q, k, v, cu, cu, max(lens), max(lens), scale, config=cfg,
                                                          out=out, return_lse=True, return_index=True)
    assert got_out.data_ptr() == out.data_ptr()
    assert_same_index(got_idx, want_idx, energies, lens, cfg.alpha, config=cfg)
    assert_index_invariants(got_idx, lens, lens, cfg)
    if max(lens) >= 1000:
        assert block_density(got_idx, cu, cu) < 0.8, "structured input: the threshold must drop blocks"
    # Attention with the kernel's own index (near-ties may differ from the reference's).
    want_out, want_lse = reference.sparse_attention(q, k, v, got_idx, cu, cu, scale, return_lse=True)
    torch.testing.assert_close(got_out.float(), want_out.float(), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-3, rtol=1e-4)
    assert not torch.isnan(got_out).any()


def test_tiny_alpha_equals_dense_attention():
    lens = [333, 97]
    q, k, v, cu = synthetic.structured_qkv(lens, 4, 2, 64, dtype=torch.float16, block_size=64)
    q, k, v, cu = (t.to(DEV) for t in (q, k, v, cu))
    out, index = flash_prefill_varlen_func(q, k, v, cu, cu, max(lens), max(lens), alpha=1e-30, block_size=64,
                                           min_sparse_len=0, return_index=True)
    assert block_density(index, cu, cu) == 1.0
    dense = reference.sparse_attention(q, k, v, None, cu, cu, 64 ** -0.5)
    torch.testing.assert_close(out.float(), dense.float(), atol=1e-2, rtol=1e-3)


def test_length_gate_runs_dense_without_index():
    lens = [200, 50]
    q, k, v, cu = synthetic.structured_qkv(lens, 2, 1, 64, dtype=torch.float16, block_size=64)
    q, k, v, cu = (t.to(DEV) for t in (q, k, v, cu))
    out, lse, index = flash_prefill_varlen_func(q, k, v, cu, cu, 200, 200, min_sparse_len=4096, return_lse=True,
                                                return_index=True)
    assert index is None
    dense, dense_lse = reference.sparse_attention(q, k, v, None, cu, cu, 64 ** -0.5, return_lse=True)
    torch.testing.assert_close(out.float(), dense.float(), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(lse, dense_lse, atol=1e-3, rtol=1e-4)


def test_queries_shorter_than_keys_bottom_right():
    lk, lq = 400, 150
    q, k, v, cu = synthetic.structured_qkv([lk], 2, 1, 64, dtype=torch.float16, block_size=64)
    q, k, v, cu = (t.to(DEV) for t in (q, k, v, cu))
    cu_q = cu_from_lens([lq], DEV)
    cfg = FlashPrefillConfig(alpha=0.3, block_size=64, min_sparse_len=0, num_local_blocks=2, num_sink_blocks=1)
    want_idx, energies = reference.build_index(q[lk - lq:], k, cu_q, cu, lq, lk, 0.125, cfg)
    out, idx = flash_prefill_varlen_func(q[lk - lq:], k, v, cu_q, cu, lq, lk, 0.125, config=cfg, return_index=True)
    assert_same_index(idx, want_idx, energies, [lq], cfg.alpha, lens_k=[lk], config=cfg)
    assert_index_invariants(idx, [lq], [lk], cfg)
    want = reference.sparse_attention(q[lk - lq:], k, v, idx, cu_q, cu, 0.125)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-3)


def test_pooling_matches_reference():
    from flashprefill_vllm.ops.index import pool_keys
    lens = [300, 1, 128]
    _, k, _, cu = synthetic.structured_qkv(lens, 2, 2, 64, dtype=torch.float16, block_size=128)
    k, cu = k.to(DEV), cu.to(DEV)
    got = pool_keys(k, cu, 300, 128)
    want = reference.pool_keys(k, cu, 300, 128)
    for b, L in enumerate(lens):
        nk = -(-L // 128)
        torch.testing.assert_close(got[b, :, :nk].float(), want[b, :, :nk].float(), atol=2e-3, rtol=1e-3)


# (alpha, tau): the floor binds on most rows / alpha already keeps the floor's share on most rows.
FLOOR_CASES = [(0.9, 0.95), (0.02, 0.3)]


@pytest.mark.parametrize("alpha,tau", FLOOR_CASES, ids=["floor_binds", "alpha_binds"])
@pytest.mark.parametrize("lq", [1100, 300], ids=["fresh", "chunk"])
def test_mass_floor_matches_reference(alpha, tau, lq):
    lk = 1100
    q, k, v, cu = synthetic.structured_qkv([lk], 4, 2, 64, dtype=torch.float16, block_size=64, num_planted=3)
    q, k, v, cu = (t.to(DEV) for t in (q, k, v, cu))
    q = q[lk - lq:]
    cu_q = cu_from_lens([lq], DEV)
    cfg = FlashPrefillConfig(alpha=alpha, tau=tau, block_size=64, min_sparse_len=0, num_sink_blocks=1,
                             num_local_blocks=1, num_dense_tail_blocks=0)
    want_idx, energies = reference.build_index(q, k, cu_q, cu, lq, lk, 0.125, cfg)
    plain_idx, _ = reference.build_index(q, k, cu_q, cu, lq, lk, 0.125, dataclasses.replace(cfg, tau=0.0))
    got_idx = flash_prefill_varlen_func(q, k, v, cu_q, cu, lq, lk, 0.125, config=cfg, return_index=True)[1]
    excused = assert_same_index(got_idx, want_idx, energies, [lq], alpha, lens_k=[lk], config=cfg)
    assert_index_invariants(got_idx, [lq], [lk], cfg)
    added = (want_idx.block_count - plain_idx.block_count).sum().item()
    if tau > 0.5:
        assert added > 0, "the floor must add blocks in this case"
    assert excused <= max(2, added // 10)
