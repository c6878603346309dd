"""Argument validation of the public op: every bad input is a ValueError naming the argument."""

import pytest
import torch

from flashprefill_vllm.ops import block_sparse_attn_varlen_func, flash_prefill_varlen_func

from helpers import cu_from_lens


def _inputs(hq=4, hkv=2, d=64, L=32, dtype=torch.float16):
    q = torch.randn(L, hq, d, dtype=dtype)
    k = torch.randn(L, hkv, d, dtype=dtype)
    return q, k, torch.randn_like(k), cu_from_lens([L])


def _call(**over):
    q, k, v, cu = _inputs()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=32, max_seqlen_k=32)
    args.update(over)
    return flash_prefill_varlen_func(**args)


@pytest.mark.parametrize("over,needle", [
    (dict(alpha=0.0), "alpha must be a number in (0, 1]"),
    (dict(alpha=1.01), "alpha"),
    (dict(block_size=32), "block_size must be one of (64, 128, 256); got 32"),
    (dict(q=torch.randn(32, 4, 64)), "q.dtype must be one of"),
    (dict(q=torch.randn(32, 4, 96, dtype=torch.float16)), "head_dim"),
    (dict(q=torch.randn(32, 3, 64, dtype=torch.float16)), "must be a multiple of num_heads of k/v"),
    (dict(q=torch.randn(32, 4, 64, dtype=torch.float16).transpose(0, 2).contiguous().transpose(0, 2)), "unit stride"),
    (dict(k=torch.randn(32, 2, 64, dtype=torch.bfloat16)), "share one dtype"),
    (dict(v=torch.randn(31, 2, 64, dtype=torch.float16)), "k and v must have the same shape"),
    (dict(q=torch.randn(32, 4 * 64, dtype=torch.float16)), "q must be a 3-D tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 32])), "cu_seqlens_q must be a contiguous 1-D int32 tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 9, 32, 7], dtype=torch.int32)[::2]), "strides (2,)"),
    (dict(cu_seqlens_k=torch.tensor([0, 9, 32, 7], dtype=torch.int32)[::2]), "cu_seqlens_k must be a contiguous"),
    (dict(tau=1.5), "tau must be a number in [0, 1]"),
    (dict(cu_seqlens_k=cu_from_lens([16, 16])), "same length"),
    (dict(max_seqlen_q=-1), "max_seqlen_q must be a non-negative int"),
    (dict(max_seqlen_q=33), "must not exceed max_seqlen_k"),
    (dict(softmax_scale=-1.0), "softmax_scale must be a positive finite number"),
    (dict(out=torch.empty(32, 4, 64)), "out must be a torch.float16 tensor of shape"),
    (dict(config="fast"), "config must be a FlashPrefillConfig"),
])
def test_bad_arguments_raise_value_error(over, needle):
    with pytest.raises(ValueError) as err:
        _call(**over)
    assert needle in str(err.value)


def test_non_causal_is_not_silently_ignored():
    with pytest.raises(NotImplementedError, match="causal"):
        _call(causal=False)


def test_foreign_index_is_rejected():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="block_index must be a BlockSparseIndex"):
        block_sparse_attn_varlen_func(q, k, v, (1, 2), cu, cu, 32, 32)


def test_return_shapes_cpu_reference():
    q, k, v, cu = _inputs()
    out, lse, index = _call(q=q, k=k, v=v, return_lse=True, return_index=True, min_sparse_len=0)
    assert out.shape == q.shape and lse.shape == (4, 32) and index.block_count.shape == (4, 1, 1)  # one list per query head by default


def _paged_call(**over):
    """A valid paged call (one sequence: 32 keys in two 16-slot pages, the last 8 of them queried), overridden."""
    q = torch.randn(8, 4, 64, dtype=torch.float16)
    kv = torch.randn(2, 3, 16, 2, 64, dtype=torch.float16)
    args = dict(q=q, k=kv[0], v=kv[1], cu_seqlens_q=cu_from_lens([8]), cu_seqlens_k=None, max_seqlen_q=8,
                max_seqlen_k=32, block_table=torch.tensor([[2, 1]], dtype=torch.int32),
                seqused_k=torch.tensor([32], dtype=torch.int32))
    args.update(over)
    return flash_prefill_varlen_func(**args)


@pytest.mark.parametrize("over,needle", [
    (dict(k=torch.randn(32, 2, 64, dtype=torch.float16)),
     "k must be a 4-D tensor (num_pages, page_size, num_kv_heads, head_dim) paged cache, as block_table is given"),
    (dict(v=torch.randn(3, 8, 2, 64, dtype=torch.float16)), "k and v must have the same shape"),
    (dict(cu_seqlens_k=cu_from_lens([32])), "cu_seqlens_k must be None when block_table is given"),
    (dict(seqused_k=None), "seqused_k is required when block_table is given"),
    (dict(seqused_k=torch.tensor([32])), "seqused_k must be a contiguous 1-D int32 tensor of length 1"),
    (dict(seqused_k=torch.tensor([32, 32], dtype=torch.int32)), "seqused_k must be a contiguous 1-D int32 tensor"),
    (dict(block_table=torch.tensor([[2, 1]])), "block_table must be a 2-D int32 tensor (batch=1, max_pages_per_seq)"),
    (dict(block_table=torch.tensor([2, 1], dtype=torch.int32)), "block_table must be a 2-D int32 tensor"),
    (dict(block_table=torch.tensor([[2, 1], [0, 0]], dtype=torch.int32)), "block_table must be a 2-D int32 tensor"),
    (dict(block_table=torch.tensor([[2, 0], [1, 0]], dtype=torch.int32).T[:1]), "block_table must have unit stride"),
    (dict(k=torch.randn(3, 0, 2, 64, dtype=torch.float16), v=torch.randn(3, 0, 2, 64, dtype=torch.float16)),
     "page_size (k.shape[1]) must be positive"),
    (dict(block_table=None, cu_seqlens_k=cu_from_lens([32])), "k must be a 3-D tensor (tokens, heads, head_dim)"),
    (dict(dense_tail=torch.tensor([1])), "dense_tail must be None or a contiguous 1-D torch.bool tensor of length 1"),
    (dict(dense_tail=torch.tensor([True, False])), "dense_tail must be None or a contiguous 1-D torch.bool tensor"),
    (dict(max_seqlen_k=4), "must not exceed max_seqlen_k"),
])
def test_bad_paged_arguments_raise_value_error(over, needle):
    with pytest.raises(ValueError) as err:
        _paged_call(**over)
    assert needle in str(err.value)


def test_seqused_k_needs_block_table():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="seqused_k is only supported together with block_table"):
        flash_prefill_varlen_func(q, k, v, cu, cu, 32, 32, seqused_k=torch.tensor([32], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k must be a contiguous 1-D int32 tensor"):
        flash_prefill_varlen_func(q, k, v, cu, None, 32, 32)


@pytest.mark.parametrize("fn", ["index", "attn"])
def test_paged_arguments_checked_by_every_entry_point(fn):
    from flashprefill_vllm.ops import flash_prefill_block_index
    q = torch.randn(8, 4, 64, dtype=torch.float16)
    kv = torch.randn(2, 3, 16, 2, 64, dtype=torch.float16)
    bt, cu_q = torch.tensor([[2, 1]], dtype=torch.int32), cu_from_lens([8])
    with pytest.raises(ValueError, match="seqused_k is required"):
        if fn == "index":
            flash_prefill_block_index(q, kv[0], cu_q, None, 8, 32, block_table=bt)
        else:
            block_sparse_attn_varlen_func(q, kv[0], kv[1], None, cu_q, None, 8, 32, block_table=bt)
