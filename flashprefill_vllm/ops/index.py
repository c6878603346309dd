"""Launcher: pool key blocks, then score + threshold + index write-out. No validation here (see interface.py)."""

from __future__ import annotations

import math

import torch

from ..config import FlashPrefillConfig
from . import configs, reference
from .kernels import _mean_pool_k_kernel, _select_blocks_kernel
from .block_sparse_index import BlockSparseIndex
from .utils import LOG2E, KeyLayout, cdiv



def pool_keys(k: torch.Tensor, cu_seqlens_k: torch.Tensor | None, max_seqlen_k: int, block_size: int,
              block_table: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled keys ``(batch, num_kv_heads, cdiv(max_seqlen_k, B), D)`` in ``k.dtype`` (rows past a sequence unset).

    ``k`` is packed ``(total_k, H, D)`` rows at ``cu_seqlens_k``, or with ``block_table`` a paged cache
    ``(pages, page_size, H, D)`` holding ``seqused_k`` keys per sequence.
    """
    layout = KeyLayout.of(k, cu_seqlens_k, block_table, seqused_k)
    batch = seqused_k.numel() if block_table is not None else cu_seqlens_k.numel() - 1
    hkv, d = k.shape[-2], k.shape[-1]
    nk = cdiv(max_seqlen_k, block_size)
    kbar = torch.empty(batch, hkv, max(nk, 1), d, dtype=k.dtype, device=k.device)
    if nk > 0 and batch > 0:
        _mean_pool_k_kernel[(nk, batch, hkv)](
            k, kbar, layout.cu_seqlens_k, layout.seqused_k, layout.block_table,
            *layout.strides(k),
            kbar.stride(0), kbar.stride(1), kbar.stride(2),
            layout.stride_bt,
            BLOCK_SIZE=block_size, SUB=configs.pool_rows(d, block_size), HEAD_DIM=d, PAGE_SIZE=layout.page_size,
            num_warps=4,
        )
    return kbar


def build_block_index(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None,
                      max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, config: FlashPrefillConfig,
                      block_table: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
                      dense_tail: torch.Tensor | None = None) -> BlockSparseIndex:
    """The index of a packed or paged batch (see ``pool_keys``); ``dense_tail``: per-sequence bool, None = all."""
    bs = config.block_size
    hq, hkv, d = q.shape[1], k.shape[-2], q.shape[2]
    group = hq // hkv
    hpi = group if config.gqa_shared_index else 1
    batch = cu_seqlens_q.numel() - 1
    nq, nk = cdiv(max_seqlen_q, bs), cdiv(max_seqlen_k, bs)
    count = torch.empty(hq // hpi, batch, nq, dtype=torch.int32, device=q.device)
    index = torch.empty(hq // hpi, batch, nq, max(nk, 1), dtype=torch.int32, device=q.device)
    if nq == 0 or batch == 0:
        return BlockSparseIndex(count, index, bs, hpi)
    kbar = pool_keys(k, cu_seqlens_k, max_seqlen_k, bs, block_table, seqused_k)
    layout = KeyLayout.of(k, cu_seqlens_k, block_table, seqused_k)
    launch = configs.select_launch(d, bs)
    _select_blocks_kernel[(nq, batch, hq // hpi)](
        q, kbar, cu_seqlens_q, layout.cu_seqlens_k, layout.seqused_k,
        dense_tail.view(torch.uint8) if dense_tail is not None else cu_seqlens_q,
        count, index, index.view(torch.float32),
        q.stride(0), q.stride(1),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        count.stride(0), count.stride(1), count.stride(2),
        index.stride(0), index.stride(1), index.stride(2),
        softmax_scale * LOG2E, math.log2(config.alpha), config.tau, reference.FLOOR_RANGE_LOG2,
        config.num_sink_blocks, config.num_local_blocks, config.num_dense_tail_blocks, config.min_sparse_len, group,
        HEADS_PER_INDEX=hpi, BLOCK_SIZE=bs, ROWS=launch.rows, K_TILE=launch.k_tile, HEAD_DIM=d,
        PAGED=layout.page_size > 0, TAIL_FLAGS=dense_tail is not None,
        MASS_FLOOR=config.tau > 0.0, FLOOR_STEPS=reference.FLOOR_STEPS,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return BlockSparseIndex(count, index, bs, hpi)
