"""Paged K/V (block_table + seqused_k) and per-sequence dense tails: the reference on CPU, then the Triton kernels
(under TRITON_INTERPRET=1 on CPU, fp16, small shapes) against it.

The caches come from ``synthetic.to_paged``: shuffled pages, NaN in every slot that holds no key and in the page the
table rows are padded with, so reading a key the kernels should not read shows up as NaN.
"""

import os

import pytest
import torch

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm import synthetic
from flashprefill_vllm.ops import flash_prefill_varlen_func, block_sparse_attn_varlen_func, interface, reference
from flashprefill_vllm.ops.block_sparse_index import block_density, causal_block_counts

from helpers import assert_index_invariants, assert_same_index, cu_from_lens

needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.1


def _chunked_batch(lens_q, lens_k, hq, hkv, d, dtype, block_size=64, device="cpu"):
    """Packed ``(q, k, v, cu_q, cu_k)``: sequence i has ``lens_k[i]`` keys and its last ``lens_q[i]`` queries."""
    qs, ks, vs = [], [], []
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        q, k, v, _ = synthetic.structured_qkv([lk], hq, hkv, d, dtype=dtype, block_size=block_size, seed=i)
        qs.append(q[lk - lq:])
        ks.append(k)
        vs.append(v)
    return (torch.cat(qs).to(device), torch.cat(ks).to(device), torch.cat(vs).to(device),
            cu_from_lens(lens_q, device), cu_from_lens(lens_k, device))


def _cfg(**over):
    base = dict(alpha=0.3, block_size=64, min_sparse_len=0, num_sink_blocks=1, num_local_blocks=1,
                num_dense_tail_blocks=1)
    return FlashPrefillConfig(**{**base, **over})


# ---------------------------------------------------------------- reference (plain torch)

@pytest.mark.parametrize("page_size,head_major", [(16, False), (32, True), (128, False)])
def test_paged_reference_equals_packed(page_size, head_major):
    lens_q, lens_k = [700, 40, 150], [700, 129, 300]
    q, k, v, cu_q, cu_k = _chunked_batch(lens_q, lens_k, 4, 2, 64, torch.float32)
    kc, vc, bt, su = synthetic.to_paged(k, v, cu_k, page_size, seed=page_size, head_major=head_major)
    assert kc.is_contiguous() != head_major
    assert torch.equal(reference.gather_paged(kc, bt, su), k)
    cfg = _cfg(alpha=0.2)
    tail = torch.tensor([True, False, True])
    want = reference.flash_prefill(q, k, v, cu_q, cu_k, 700, 700, SCALE, cfg, dense_tail=tail)
    got = reference.flash_prefill(q, kc, vc, cu_q, None, 700, 700, SCALE, cfg, block_table=bt, seqused_k=su,
                                  dense_tail=tail)
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(g, w)
    assert torch.equal(got[2].block_count, want[2].block_count)
    assert not torch.isnan(got[0]).any()
    assert block_density(got[2], cu_q, None, seqused_k=su) == block_density(want[2], cu_q, cu_k)


def test_dense_tail_false_equals_no_tail_rule():
    """A sequence whose flag is off is selected as if ``num_dense_tail_blocks`` were 0; one with it on, as usual."""
    lens = [900, 900]
    q, k, v, cu = synthetic.structured_qkv(lens, 2, 1, 64, dtype=torch.float32, block_size=64)
    cfg = _cfg(alpha=0.5, num_dense_tail_blocks=3)
    mixed, _ = reference.build_index(q, k, cu, cu, 900, 900, SCALE, cfg, dense_tail=torch.tensor([False, True]))
    no_tail, _ = reference.build_index(q, k, cu, cu, 900, 900, SCALE, cfg.replace(num_dense_tail_blocks=0))
    all_tail, _ = reference.build_index(q, k, cu, cu, 900, 900, SCALE, cfg)
    explicit, _ = reference.build_index(q, k, cu, cu, 900, 900, SCALE, cfg, dense_tail=torch.tensor([True, True]))
    assert torch.equal(mixed.block_count[:, 0], no_tail.block_count[:, 0])
    assert torch.equal(mixed.block_count[:, 1], all_tail.block_count[:, 1])
    assert torch.equal(explicit.block_count, all_tail.block_count)
    visible = causal_block_counts(cu, cu, mixed.block_count.shape[2], 64)
    assert (all_tail.block_count[:, 0, -3:] == visible[0, -3:]).all()
    assert (mixed.block_count[:, 0, -3:] < visible[0, -3:]).any(), "structured input: the tail must go sparse"


@pytest.mark.parametrize("page_size", [16, 128])
def test_chunked_prefill_equals_whole_prompt(page_size):
    """Two block-aligned chunks (the first without its dense tail, the second over the cached first) select the
    same blocks and produce the same output as the whole prompt in one call."""
    L, cut = 900, 512
    q, k, v, cu = synthetic.structured_qkv([L], 4, 2, 64, dtype=torch.float32, block_size=64)
    cfg = _cfg(alpha=0.2, num_dense_tail_blocks=2, num_local_blocks=2)
    whole_out, whole_lse, whole = reference.flash_prefill(q, k, v, cu, cu, L, L, SCALE, cfg)
    kc, vc, bt, su = synthetic.to_paged(k, v, cu, page_size, seed=3)
    outs, lses = [], []
    for lo, hi, tail in ((0, cut, False), (cut, L, True)):
        out, lse, index = reference.flash_prefill(q[lo:hi], kc, vc, cu_from_lens([hi - lo]), None, hi - lo, hi, SCALE,
                                                  cfg, block_table=bt, seqused_k=torch.tensor([hi], dtype=torch.int32),
                                                  dense_tail=torch.tensor([tail]))
        nq = index.block_count.shape[2]
        assert torch.equal(index.block_count[:, 0], whole.block_count[:, 0, lo // 64: lo // 64 + nq])
        outs.append(out)
        lses.append(lse)
    torch.testing.assert_close(torch.cat(outs), whole_out)
    torch.testing.assert_close(torch.cat(lses, dim=1), whole_lse)


def test_public_op_reference_path_takes_paged_inputs(monkeypatch):
    """The public op without Triton (CPU, no interpreter) runs the reference on the paged caches."""
    monkeypatch.setattr(interface, "_use_triton", lambda t: False)
    lens_q, lens_k = [100, 200], [300, 200]
    q, k, v, cu_q, cu_k = _chunked_batch(lens_q, lens_k, 4, 2, 64, torch.float16)
    kc, vc, bt, su = synthetic.to_paged(k, v, cu_k, 32)
    tail = torch.tensor([False, True])
    got = flash_prefill_varlen_func(q, kc, vc, cu_q, None, 200, 300, SCALE, block_table=bt, seqused_k=su,
                                    dense_tail=tail, config=_cfg(), return_lse=True, return_index=True)
    want = flash_prefill_varlen_func(q, k, v, cu_q, cu_k, 200, 300, SCALE, dense_tail=tail, config=_cfg(),
                                     return_lse=True, return_index=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2].block_count, want[2].block_count)


# ---------------------------------------------------------------- kernels against the reference

KERNEL_CASES = [
    # (page_size, head_major, block_size, shared): pages smaller and larger than the block, one not a power of 2
    (16, False, 64, False),
    (128, True, 64, True),
    (48, False, 128, False),
]


@needs_kernels
@pytest.mark.parametrize("page_size,head_major,block_size,shared", KERNEL_CASES,
                         ids=[f"page{c[0]}_{'hnd' if c[1] else 'nhd'}_b{c[2]}_{'shared' if c[3] else 'perhead'}"
                              for c in KERNEL_CASES])
def test_paged_kernels_match_reference(page_size, head_major, block_size, shared):
    # Cached context (q_len < k_len), a fresh prompt, a single new token; tail off for the first (a middle chunk).
    lens_q, lens_k = [100, 200, 1], [330, 200, 70]
    q, k, v, cu_q, cu_k = _chunked_batch(lens_q, lens_k, 4, 2, 64, torch.float16, block_size, DEV)
    kc, vc, bt, su = synthetic.to_paged(k, v, cu_k, page_size, seed=page_size, head_major=head_major)
    tail = torch.tensor([False, True, True], device=DEV)
    cfg = _cfg(block_size=block_size, gqa_shared_index=shared)
    mq, mk = max(lens_q), max(lens_k)
    out, lse, index = flash_prefill_varlen_func(q, kc, vc, cu_q, None, mq, mk, SCALE, block_table=bt, seqused_k=su,
                                                dense_tail=tail, config=cfg, return_lse=True, return_index=True)
    want_idx, energies = reference.build_index(q, kc, cu_q, None, mq, mk, SCALE, cfg, block_table=bt, seqused_k=su,
                                               dense_tail=tail)
    assert_same_index(index, want_idx, energies, lens_q, cfg.alpha, lens_k=lens_k, config=cfg)
    assert_index_invariants(index, lens_q, lens_k, cfg.replace(num_dense_tail_blocks=0))
    want, want_lse = reference.sparse_attention(q, kc, vc, index, cu_q, None, SCALE, return_lse=True, block_table=bt,
                                                seqused_k=su)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    # The packed kernels on the same data: the same index, and the same output.
    p_out, p_lse, p_index = flash_prefill_varlen_func(q, k, v, cu_q, cu_k, mq, mk, SCALE, dense_tail=tail, config=cfg,
                                                      return_lse=True, return_index=True)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        assert torch.equal(reference.index_to_mask(index, b, lq, lk), reference.index_to_mask(p_index, b, lq, lk))
    torch.testing.assert_close(out, p_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, p_lse, atol=0, rtol=0)


@needs_kernels
@pytest.mark.parametrize("page_size", [16, 256])
def test_paged_dense_mode_equals_dense_attention(page_size):
    lens_q, lens_k = [90, 150], [250, 150]
    q, k, v, cu_q, cu_k = _chunked_batch(lens_q, lens_k, 2, 1, 64, torch.float16, device=DEV)
    kc, vc, bt, su = synthetic.to_paged(k, v, cu_k, page_size)
    out, lse = block_sparse_attn_varlen_func(q, kc, vc, None, cu_q, None, 150, 250, SCALE, block_table=bt,
                                             seqused_k=su, return_lse=True)
    want, want_lse = reference.sparse_attention(q, k, v, None, cu_q, cu_k, SCALE, return_lse=True)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("page_size,block_size", [(32, 128), (256, 64)])
def test_paged_pooling_matches_reference(page_size, block_size):
    from flashprefill_vllm.ops.index import pool_keys
    lens = [300, 1, 128]
    _, k, v, cu = synthetic.structured_qkv(lens, 2, 2, 64, dtype=torch.float16, block_size=block_size)
    k, v, cu = k.to(DEV), v.to(DEV), cu.to(DEV)
    kc, _, bt, su = synthetic.to_paged(k, v, cu, page_size)
    got = pool_keys(kc, None, 300, block_size, bt, su)
    want = reference.pool_keys(k, cu, 300, block_size)
    for b, L in enumerate(lens):
        nk = -(-L // block_size)
        torch.testing.assert_close(got[b, :, :nk].float(), want[b, :, :nk].float(), atol=2e-3, rtol=1e-3)
