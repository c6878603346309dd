"""Public ops: defaults, validation, output allocation. FlashAttention's varlen names and shapes.

On CUDA tensors the ops run the Triton kernels. On CPU tensors they run the plain-torch reference
(``ops/reference.py``), or the Triton kernels under the interpreter when ``TRITON_INTERPRET=1`` is set
before ``triton`` is imported (slow; for tests on small shapes).
"""

from __future__ import annotations

import os

import torch

from ..config import ALLOWED_BLOCK_SIZES, FlashPrefillConfig
from . import reference
from .utils import BlockSparseIndex, block_density

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

__all__ = ["flash_prefill_varlen_func", "flash_prefill_block_index", "block_sparse_attn_varlen_func",
           "BlockSparseIndex", "block_density", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (tokens, heads, head_dim); got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of (torch.float16, torch.bfloat16); got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension; got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}; got {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim; got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}; got {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"num_heads of q ({q.shape[1]}) must be a multiple of num_heads of k/v ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of length batch + 1")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on {q.device}; got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length; got {cu_seqlens_q.numel()} "
                         f"and {cu_seqlens_k.numel()}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int; got {val!r}")
    if max_seqlen_q > max_seqlen_k:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) must not exceed max_seqlen_k ({max_seqlen_k}): queries "
                         "are the last seqlen_q positions of each sequence (bottom-right causal alignment)")
    if softmax_scale is None:
        softmax_scale = q.shape[2] ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0 \
            or softmax_scale == float("inf"):
        raise ValueError(f"softmax_scale must be a positive finite number or None; got {softmax_scale!r}")
    if causal is not True:
        raise NotImplementedError("flash_prefill supports causal attention only (causal=True); run non-causal "
                                  "attention densely")
    return float(softmax_scale)


def _resolve_config(config: FlashPrefillConfig | None, **knobs) -> FlashPrefillConfig:
    if config is not None and not isinstance(config, FlashPrefillConfig):
        raise ValueError(f"config must be a FlashPrefillConfig or None; got {type(config).__name__}")
    return (config or FlashPrefillConfig()).replace(**knobs)


def _alloc_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}; got "
                         f"{(out.dtype, tuple(out.shape), out.device) if isinstance(out, torch.Tensor) else out!r}")
    if out.stride(-1) != 1:
        raise ValueError(f"out must have unit stride in its last dimension; got strides {out.stride()}")
    return out


def flash_prefill_block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                              *, config: FlashPrefillConfig | None = None, **knobs) -> BlockSparseIndex:
    """Selection only: the kept key blocks of every (index head, sequence, query block). See ``BlockSparseIndex``.

    ``knobs`` are ``FlashPrefillConfig`` fields (``alpha``, ``block_size``, ...) overriding ``config``.
    """
    scale = _check_qkv(q, k, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, True)
    cfg = _resolve_config(config, **knobs)
    if _use_triton(q):
        from .index import build_block_index
        return build_block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, cfg)
    return reference.build_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, cfg)[0]


def block_sparse_attn_varlen_func(q, k, v, block_index: BlockSparseIndex | None, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True, *, out=None,
                                  return_lse=False):
    """Causal attention over the key blocks listed in ``block_index`` (``None``: every visible block, i.e. dense).

    The index must list, for each query block, the local blocks from the block of its first row's position through
    the block of its last row's position (indices from ``flash_prefill_block_index`` always do).
    """
    scale = _check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    if block_index is not None:
        if not isinstance(block_index, BlockSparseIndex):
            raise ValueError(f"block_index must be a BlockSparseIndex or None; got {type(block_index).__name__}")
        if block_index.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_index.block_size must be one of {ALLOWED_BLOCK_SIZES}; got "
                             f"{block_index.block_size}")
        hpi = block_index.heads_per_index
        if hpi not in (1, q.shape[1] // k.shape[1]) or block_index.block_count.shape[0] * hpi != q.shape[1]:
            raise ValueError(f"block_index has {block_index.block_count.shape[0]} index heads of {hpi} query heads; "
                             f"q has {q.shape[1]} heads and k {k.shape[1]}")
    out = _alloc_out(q, out)
    block_size = block_index.block_size if block_index is not None else 128
    if _use_triton(q):
        from .attention import sparse_attention
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
        sparse_attention(q, k, v, block_index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, out, lse, block_size)
    else:
        res, lse = reference.sparse_attention(q, k, v, block_index, cu_seqlens_q, cu_seqlens_k, scale,
                                              return_lse=True)
        out.copy_(res)
    return (out, lse) if return_lse else out


def flash_prefill_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                              causal=True, *, alpha=None, block_size=None, num_sink_blocks=None, num_local_blocks=None,
                              num_dense_tail_blocks=None, min_sparse_len=None, gqa_shared_index=None,
                              config: FlashPrefillConfig | None = None, out=None, return_lse=False,
                              return_index=False):
    """Sparse-prefill causal attention over a packed varlen batch.

    Args:
        q: ``(total_q, num_heads, head_dim)``; k, v: ``(total_k, num_kv_heads, head_dim)``. fp16 or bf16,
            head_dim 64/128/256, any strides with a unit last stride (views into a fused QKV buffer are fine).
            Query head ``h`` uses KV head ``h // (num_heads // num_kv_heads)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` prefix sums of the lengths.
        max_seqlen_q, max_seqlen_k: Python ints bounding the lengths (they size the grid; no host sync).
        softmax_scale: the model's scale; ``None`` means ``head_dim ** -0.5``.
        causal: must be True. When ``seqlen_q < seqlen_k`` the queries are the last ``seqlen_q`` positions
            (bottom-right alignment, as in FlashAttention): query row p sees keys ``<= seqlen_k - seqlen_q + p``.
        alpha, block_size, num_sink_blocks, num_local_blocks, num_dense_tail_blocks, min_sparse_len,
            gqa_shared_index: override the fields of ``config`` (``FlashPrefillConfig()`` by default).
            Sequences with ``seqlen_k < min_sparse_len`` attend densely; if every sequence does, no selection runs.
        out: optional ``(total_q, num_heads, head_dim)`` output buffer (written in place and returned).
        return_lse: also return the natural-log LSE ``(num_heads, total_q)`` fp32.
        return_index: also return the ``BlockSparseIndex`` used (``None`` when the whole batch ran dense);
            ``block_density(index, cu_seqlens_q, cu_seqlens_k)`` reads the density it chose.

    Returns:
        ``out``, or a tuple ``(out[, lse][, index])`` when ``return_lse`` / ``return_index`` are set.
    """
    scale = _check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    cfg = _resolve_config(config, alpha=alpha, block_size=block_size, num_sink_blocks=num_sink_blocks,
                          num_local_blocks=num_local_blocks, num_dense_tail_blocks=num_dense_tail_blocks,
                          min_sparse_len=min_sparse_len, gqa_shared_index=gqa_shared_index)
    out = _alloc_out(q, out)
    index = None
    if max_seqlen_k >= cfg.min_sparse_len:
        index = flash_prefill_block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                          config=cfg)
    res = block_sparse_attn_varlen_func(q, k, v, index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        scale, True, out=out, return_lse=return_lse)
    if not (return_lse or return_index):
        return res
    extra = (res if return_lse else (res,))
    return (*extra, index) if return_index else extra
