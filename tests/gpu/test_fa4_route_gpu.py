"""The FA4 route on the GPU: ``flash_prefill_varlen_func(..., seqlens_host=...)`` (FA4's block-sparse forward)
against the same call without it (our Triton kernel) and the fp32 reference, on the inputs vLLM hands the op: q/k/v
views of a fused QKV buffer, fresh prompts, and chunks whose keys sit in a shuffled paged cache with NaN in every
slot that holds no key. Skipped where FA4 cannot run (not Hopper, or vllm.vllm_flash_attn.cute not importable)."""

import pytest
import torch

from flashprefill_vllm import synthetic
from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.ops import fa4_route, flash_prefill_varlen_func, reference

pytestmark = pytest.mark.gpu

CFG = FlashPrefillConfig(alpha=0.3, tau=0.9, min_sparse_len=0)


@pytest.fixture
def fa4_calls(monkeypatch):
    """Skip where FA4 cannot run; count the route's calls."""
    reason = fa4_route.unavailable_reason(torch.device("cuda"), torch.bfloat16, 128, 128)
    if reason is not None:
        pytest.skip(f"FA4 route unavailable here: {reason}")
    calls = []
    real = fa4_route.fa4_attend

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fa4_route, "fa4_attend", spy)
    return calls


def _fused(q, k, v):
    """q/k/v as strided views of one fused (tokens, (hq + 2 hkv) * d) buffer, as vLLM passes them."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    buf = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=1)
    return (buf[:, :hq * d].view(n, hq, d), buf[:, hq * d:(hq + hkv) * d].view(n, hkv, d),
            buf[:, (hq + hkv) * d:].view(n, hkv, d))


@pytest.mark.parametrize("d,hq,hkv", [(64, 14, 2), (128, 12, 2), (128, 32, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fresh_prompt_matches_triton_and_reference(fa4_calls, d, hq, hkv, dtype):
    L = 5000
    q, k, v, _ = synthetic.structured_qkv([L], hq, hkv, d, dtype=dtype, seed=d + hq, block_size=128, device="cuda")
    q, k, v = _fused(q, k, v)
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    out4, index = flash_prefill_varlen_func(q, k, v, cu, cu, L, L, config=CFG, seqlens_host=(L, L),
                                            return_index=True)
    assert len(fa4_calls) == 1
    outt = flash_prefill_varlen_func(q, k, v, cu, cu, L, L, config=CFG)
    want = reference.sparse_attention(q, k, v, index, cu, cu, d ** -0.5)
    torch.testing.assert_close(out4.float(), outt.float(), atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(out4.float(), want.float(), atol=2e-2, rtol=1.6e-2)
    causal_blocks = index.block_count.shape[0] * 40 * 41 // 2      # 40 blocks of 128 cover the 5000 rows
    assert index.block_count.sum() < 0.9 * causal_blocks             # the selection skipped blocks


@pytest.mark.parametrize("page", [16, 128])
@pytest.mark.parametrize("d", [64, 128])
def test_chunk_over_paged_cache_matches_triton_and_reference(fa4_calls, page, d):
    lq, lk, hq, hkv, dtype = 1500, 6000, 8, 2, torch.bfloat16
    q, k, v, _ = synthetic.structured_qkv([lk], hq, hkv, d, dtype=dtype, seed=page + d, block_size=128, device="cuda")
    q = q[lk - lq:].contiguous()
    npg = -(-lk // page)
    perm = torch.randperm(npg + 9, device="cuda")[:npg]
    kc, vc = (torch.full((npg + 9, page, hkv, d), float("nan"), dtype=dtype, device="cuda") for _ in range(2))
    for cache, src in ((kc, k), (vc, v)):
        flat = cache[perm].view(-1, hkv, d)
        flat[:lk] = src
        cache[perm] = flat.view(npg, page, hkv, d)
    table = torch.cat([perm, torch.zeros(3, dtype=perm.dtype, device="cuda")]).int()[None]
    used = torch.tensor([lk], dtype=torch.int32, device="cuda")
    cu_q = torch.tensor([0, lq], dtype=torch.int32, device="cuda")
    args = (q, kc, vc, cu_q, None, lq, lk)
    out4, index = flash_prefill_varlen_func(*args, config=CFG, block_table=table, seqused_k=used,
                                            seqlens_host=(lq, lk), return_index=True)
    assert len(fa4_calls) == 1
    outt = flash_prefill_varlen_func(*args, config=CFG, block_table=table, seqused_k=used)
    want = reference.sparse_attention(q, k, v, index, cu_q, torch.tensor([0, lk], dtype=torch.int32, device="cuda"),
                                      d ** -0.5)
    assert not out4.isnan().any()
    torch.testing.assert_close(out4.float(), outt.float(), atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(out4.float(), want.float(), atol=2e-2, rtol=1.6e-2)


def test_one_list_per_kv_group_is_repeated_over_its_query_heads(fa4_calls):
    """gqa_shared_index: FA4 gets the group's list once per query head (pack-GQA off), same output as Triton."""
    L, cfg = 4096, CFG.replace(gqa_shared_index=True)
    q, k, v, _ = synthetic.structured_qkv([L], 32, 8, 128, dtype=torch.bfloat16, seed=7, block_size=128, device="cuda")
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    out4, index = flash_prefill_varlen_func(q, k, v, cu, cu, L, L, config=cfg, seqlens_host=(L, L), return_index=True)
    assert len(fa4_calls) == 1 and index.heads_per_index == 4
    outt = flash_prefill_varlen_func(q, k, v, cu, cu, L, L, config=cfg)
    torch.testing.assert_close(out4.float(), outt.float(), atol=2e-2, rtol=1.6e-2)


def test_kernel_triton_keeps_fa4_off(fa4_calls, monkeypatch):
    monkeypatch.setenv("FLASHPREFILL_KERNEL", "triton")
    L = 2048
    q, k, v, _ = synthetic.structured_qkv([L], 4, 2, 128, dtype=torch.bfloat16, seed=0, block_size=128, device="cuda")
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    flash_prefill_varlen_func(q, k, v, cu, cu, L, L, config=CFG, seqlens_host=(L, L))
    assert fa4_calls == []
