"""The op's public index type, ``BlockSparseIndex``, and what can be read from one (visible blocks, density)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .utils import seqlens_k


class BlockSparseIndex(NamedTuple):
    """Kept key blocks per (index head, sequence, query block), in a row-padded CSR layout.

    ``block_index[h, b, i, :block_count[h, b, i]]`` are the ascending key-block ids that query block ``i`` of
    sequence ``b`` attends to through index head ``h``; entries past the count are scratch (undefined).
    Rows are padded to a fixed capacity so the index is built with no host sync and no data-dependent allocation.

    - ``block_count``: int32 ``(num_index_heads, batch, cdiv(max_seqlen_q, block_size))``
    - ``block_index``: int32 ``(num_index_heads, batch, cdiv(max_seqlen_q, block_size), cdiv(max_seqlen_k, block_size))``
    - ``block_size``: tokens per query block and per key block
    - ``heads_per_index``: query heads sharing one index head: 1 (one list per query head) or the GQA group size
      (one list per KV group). Query head ``h`` reads index head ``h // heads_per_index``.

    Query block ``i`` holds query rows ``[i * block_size, (i + 1) * block_size)`` of its sequence; key block ``j``
    holds keys ``[j * block_size, (j + 1) * block_size)``. With ``seqlen_q < seqlen_k`` the queries are the last
    ``seqlen_q`` positions (bottom-right causal alignment).
    """

    block_count: torch.Tensor
    block_index: torch.Tensor
    block_size: int
    heads_per_index: int


def causal_block_counts(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None, num_q_blocks: int,
                        block_size: int, seqused_k: torch.Tensor | None = None) -> torch.Tensor:
    """Number of causally visible key blocks per (sequence, query block); 0 for query blocks past the sequence.

    Query block i of a sequence with context ``ctx = seqlen_k - seqlen_q`` sees key blocks ``0 .. d_last`` where
    ``d_last`` is the block of its last row's position ``ctx + min((i + 1) * B, seqlen_q) - 1``. Key lengths come
    from ``seqused_k`` when given (paged keys; ``cu_seqlens_k`` may then be None).
    """
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[:, None]
    lk = seqlens_k(cu_seqlens_k, seqused_k).long()[:, None]
    i = torch.arange(num_q_blocks, device=cu_seqlens_q.device)[None, :]
    last_row = torch.minimum((i + 1) * block_size, lq) - 1
    visible = (lk - lq + last_row) // block_size + 1
    return torch.where(i * block_size < lq, visible, torch.zeros_like(visible))


def block_density(index: BlockSparseIndex, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None,
                  per_sequence: bool = False, *, seqused_k: torch.Tensor | None = None):
    """Fraction of causally visible (query block, key block) pairs the index keeps, over all heads.

    Returns a float (or a list of floats, one per sequence, with ``per_sequence=True``). Reads the GPU, so it
    synchronises: call it for logging and benchmarks, not on the serving hot path. For an index built over paged
    keys pass ``seqused_k`` (and ``cu_seqlens_k=None``).
    """
    visible = causal_block_counts(cu_seqlens_q, cu_seqlens_k, index.block_count.shape[2], index.block_size,
                                  seqused_k)
    kept = index.block_count.long().sum(0)  # (batch, num_q_blocks)
    heads = index.block_count.shape[0]
    kept_b = kept.sum(1).double()
    vis_b = visible.sum(1).double() * heads
    if per_sequence:
        return [(k / v).item() if v > 0 else float("nan") for k, v in zip(kept_b.cpu(), vis_b.cpu())]
    total = vis_b.sum()
    return (kept_b.sum() / total).item() if total > 0 else float("nan")
