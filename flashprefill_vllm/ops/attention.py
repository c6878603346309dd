"""Launcher: index-driven block-sparse attention. No validation here (see interface.py)."""

from __future__ import annotations

import torch

from . import configs
from .kernels import _sparse_attn_fwd_kernel
from .block_sparse_index import BlockSparseIndex
from .utils import LOG2E, KeyLayout, cdiv


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockSparseIndex | None,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                     softmax_scale: float, out: torch.Tensor, lse: torch.Tensor | None, block_size: int,
                     block_table: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None) -> None:
    """Writes ``out`` (and ``lse`` if given). ``index=None`` runs dense causal attention with the same kernel.

    K/V are packed rows at ``cu_seqlens_k``, or with ``block_table`` paged caches holding ``seqused_k`` keys.
    """
    hq, hkv, d = q.shape[1], k.shape[-2], q.shape[2]
    batch = cu_seqlens_q.numel() - 1
    launch = configs.attn_launch(d, block_size)
    n_tiles = cdiv(max_seqlen_q, launch.block_m)
    if n_tiles == 0 or batch == 0:
        return
    layout = KeyLayout.of(k, cu_seqlens_k, block_table, seqused_k)
    dense = index is None
    count = index.block_count if not dense else cu_seqlens_q      # placeholders are never read when dense
    idx = index.block_index if not dense else cu_seqlens_q
    cnt_strides = (count.stride(0), count.stride(1), count.stride(2)) if not dense else (0, 0, 0)
    idx_strides = (idx.stride(0), idx.stride(1), idx.stride(2)) if not dense else (0, 0, 0)
    k_page, k_tok, k_head = layout.strides(k)
    v_page, v_tok, v_head = layout.strides(v)
    _sparse_attn_fwd_kernel[(hq, n_tiles, batch)](
        q, k, v, out, lse if lse is not None else out, cu_seqlens_q, layout.cu_seqlens_k, layout.seqused_k,
        layout.block_table, count, idx,
        q.stride(0), q.stride(1), k_page, k_tok, k_head, v_page, v_tok, v_head, out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0, layout.stride_bt,
        *cnt_strides, *idx_strides,
        softmax_scale * LOG2E, hq // hkv, index.heads_per_index if not dense else 1,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_SIZE=block_size, HEAD_DIM=d,
        DENSE=dense, RETURN_LSE=lse is not None, PAGE_SIZE=layout.page_size,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
