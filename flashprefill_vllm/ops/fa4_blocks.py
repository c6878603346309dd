"""Our ``BlockSparseIndex`` as FlashAttention-4 (CuTe DSL) block-sparse tensors: "full" and "masked" key blocks.

FA4's forward (vLLM 0.26: ``vllm.vllm_flash_attn.cute.interface._flash_attn_fwd(..., block_sparse_tensors=...)``)
takes, per (batch, query head, query tile), a count and ascending ids of *masked* key blocks (the mask is applied to
them) and of *full* key blocks (no mask needed). The kernel walks each list from its last entry down, masked list
first, and applies the key-length mask only to the first block it processes, so both lists must be ascending and a
block that runs past the end of the keys must be in the masked list.

Here, for a query tile holding rows at positions ``p0 .. p1`` (bottom-right causal: position = ``seqlen_k -
seqlen_q + row``):

- full:   kept blocks whose last key is at or before ``p0`` and that are not a partial last key block;
- masked: the other kept blocks that start at or before ``p1`` (at most two per tile: the blocks of ``p0`` and
  ``p1``); kept blocks past ``p1`` see no query and are dropped.

Because our ids are ascending, the full list is a prefix of each row of ``block_index`` (reused as is) and the masked
list is the next at most two entries. Only query tile = key block = our block size maps one to one; anything else
raises ``ValueError``. Builds tensors only: no vLLM import, no kernel launch.

Two layouts, as FA4 reads them (SM90 ``block_sparse_utils.get_curr_blocksparse_tensors``):

- batched (``varlen=False``, q as ``(batch, seqlen_q, heads, d)``, all sequences the same lengths):
  counts ``(batch, heads, M)``, ids ``(batch, heads, M, width)`` with ``width <= cdiv(seqlen_k, tile_n)``;
- varlen (``varlen=True``, q as ``(total_q, heads, d)`` with ``cu_seqlens_q``): counts ``(heads, total_m_blocks)``,
  ids ``(heads, sum_b M_b * N_b)``, row ``m`` of sequence ``b`` at ``cu_block_idx_offsets[b] + m * N_b`` with
  ``N_b = cdiv(seqlen_k_b, tile_n)``; ``cu_total_m_blocks`` ``(batch + 1,)`` prefix sums of ``M_b``. This layout
  reads the sequence lengths on the host (one sync).

Heads: FA4 takes one list per query head or one list for all heads (head dim 1, broadcast). A list per KV group
(``heads_per_index > 1``) is repeated over the group's query heads, which also turns FA4's pack-GQA off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .block_sparse_index import BlockSparseIndex
from .utils import cdiv, seqlens_k

# Masked key blocks per query tile when query tile == key block: the blocks of the tile's first and last rows.
MAX_MASKED_PER_TILE = 2


class FA4BlockSparse(NamedTuple):
    """FA4's ``BlockSparseTensorsTorch`` fields, same names and order (its first seven), all int32 on the index's
    device: ``BlockSparseTensorsTorch(*t)`` or ``BlockSparseTensorsTorch(**t._asdict())`` rebuilds it."""

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor
    cu_total_m_blocks: torch.Tensor | None
    cu_block_idx_offsets: torch.Tensor | None
    block_size: tuple[int, int]


def sm90_tile(head_dim: int, head_dim_v: int | None = None, sparse_block_q: int = 128) -> tuple[int, int]:
    """FA4's SM90 forward tile ``(tile_m, tile_n)`` for causal, non-local attention with a query sparse block of
    ``sparse_block_q`` rows (vLLM 0.26 ``interface._tile_size_fwd_sm90``, restated)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    if head_dim <= 96:   # 192 x 128 unless the sparse query block is no multiple of 192
        return (192 if sparse_block_q % 192 == 0 else 128), 128
    if head_dim <= 128:
        return 128, 128
    if head_dim <= 192:
        return 128, (128 if dv <= 128 else 112)
    if head_dim <= 256:
        return 128, 80
    return 64, 64


def _tile_bounds(lq: torch.Tensor, lk: torch.Tensor, nq: int, bs: int):
    """Per (sequence, query tile): last fully visible key block, last visible key block, tile in range."""
    m = torch.arange(nq, device=lq.device)[None, :]
    lq, lk = lq.long()[:, None], lk.long()[:, None]
    ctx = lk - lq
    p0 = ctx + m * bs                                   # position of the tile's first row
    p1 = ctx + torch.minimum((m + 1) * bs, lq) - 1      # ... and of its last row
    # Full: the block's nominal last key (j + 1) * bs - 1 is at or before p0. As p0 <= seqlen_k - 1, this also
    # keeps a partial last key block (which needs the key-length mask) out of the full list.
    j_full = torch.div(p0 + 1, bs, rounding_mode="floor") - 1
    j_last = torch.div(p1, bs, rounding_mode="floor")
    in_range = m * bs < lq
    return j_full, j_last, in_range


def fa4_block_sparse(index: BlockSparseIndex, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None,
                     num_heads: int, *, seqused_k: torch.Tensor | None = None, head_dim: int | None = None,
                     head_dim_v: int | None = None, tile: tuple[int, int] | None = None,
                     varlen: bool = True, host_lengths: tuple[int, int] | None = None) -> FA4BlockSparse:
    """FA4 block-sparse tensors equivalent to ``index`` under bottom-right causal attention (``causal=True``).

    ``num_heads``: query heads (``index.block_count.shape[0] * index.heads_per_index``). The FA4 tile is ``tile``
    if given, else :func:`sm90_tile` of ``head_dim`` (default ``(128, 128)``); it must equal
    ``(index.block_size, index.block_size)``. Key lengths come from ``seqused_k`` when the keys are paged.
    Pass FA4 ``causal=True`` with these tensors: the masked list relies on its causal mask.
    ``host_lengths``: the batch's ``(seqlen_q, seqlen_k)`` known on the host (batched layout only): the tensors are
    then sized from them (``cdiv(seqlen_q, B)`` query tiles, as FA4 wants) with no host sync; without it the
    batched layout reads the longest key length from the device (one sync).
    """
    bs = index.block_size
    if tile is None:
        tile = sm90_tile(head_dim, head_dim_v, bs) if head_dim is not None else (128, 128)
    if tuple(tile) != (bs, bs):
        raise ValueError(f"FA4 tile {tuple(tile)} differs from the index's {bs}x{bs} blocks: only a block size equal "
                         f"to FA4's query tile and key tile maps one to one (SM90: 128x128 for head_dim 64-128)")
    h_idx, batch, nq, nk_cap = index.block_index.shape
    if index.block_count.shape != (h_idx, batch, nq):
        raise ValueError(f"block_count {tuple(index.block_count.shape)} does not match block_index "
                         f"{tuple(index.block_index.shape)}")
    if h_idx * index.heads_per_index != num_heads:
        raise ValueError(f"index has {h_idx} heads x heads_per_index {index.heads_per_index}, "
                         f"but num_heads is {num_heads}")
    if cu_seqlens_q.numel() != batch + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences, the index {batch}")
    dev = index.block_index.device
    cu_q = cu_seqlens_q.to(dev)
    lq = (cu_q[1:] - cu_q[:-1]).long()
    lk = seqlens_k(None if cu_seqlens_k is None else cu_seqlens_k.to(dev),
                   None if seqused_k is None else seqused_k.to(dev)).long()

    j_full, j_last, in_range = _tile_bounds(lq, lk, nq, bs)          # (batch, nq)
    cnt = index.block_count.long()
    ids = index.block_index.long()
    slot = torch.arange(nk_cap, device=dev)
    valid = (slot < cnt[..., None]) & in_range[None, :, :, None]     # (H_idx, batch, nq, nk_cap)
    full_cnt = (valid & (ids <= j_full[None, ..., None])).sum(-1)
    mask_cnt = (valid & (ids <= j_last[None, ..., None])).sum(-1) - full_cnt
    width = min(MAX_MASKED_PER_TILE, nk_cap)
    take = (full_cnt[..., None] + torch.arange(width, device=dev)).clamp_(max=nk_cap - 1)
    mask_idx = torch.gather(index.block_index, 3, take)
    mask_idx = torch.where(torch.arange(width, device=dev) < mask_cnt[..., None], mask_idx, 0).int()
    full_idx = torch.where(valid, index.block_index, 0).int()
    full_cnt, mask_cnt = full_cnt.int(), mask_cnt.int()

    def per_head(t: torch.Tensor) -> torch.Tensor:
        # (H_idx, ...) -> one list per query head, or a single broadcast list.
        if index.heads_per_index == 1 or h_idx == 1:
            return t
        return t.repeat_interleave(index.heads_per_index, dim=0)

    full_cnt, full_idx, mask_cnt, mask_idx = map(per_head, (full_cnt, full_idx, mask_cnt, mask_idx))

    if not varlen:
        if batch > 1 and not (bool((lq == lq[0]).all()) and bool((lk == lk[0]).all())):
            raise ValueError("the batched FA4 layout needs equal seqlen_q and equal seqlen_k over the batch; "
                             "use varlen=True")
        if host_lengths is not None:
            m, nk = cdiv(host_lengths[0], bs), cdiv(host_lengths[1], bs)
            if m > nq or nk > nk_cap:
                raise ValueError(f"host_lengths {tuple(host_lengths)} need {m} query blocks and {nk} key slots; the "
                                 f"index has {nq} and {nk_cap}")
        else:
            m, nk = nq, (cdiv(int(lk.max()), bs) if batch else 0)
        return FA4BlockSparse(mask_cnt[:, :, :m].transpose(0, 1).contiguous(),
                              mask_idx[:, :, :m].transpose(0, 1).contiguous(),
                              full_cnt[:, :, :m].transpose(0, 1).contiguous(),
                              full_idx[:, :, :m, :max(nk, 1)].transpose(0, 1).contiguous(), None, None, (bs, bs))

    # Varlen: sequence b's rows, each nk_b wide, one after the other (host lengths: one sync).
    lq_h, lk_h = lq.tolist(), lk.tolist()
    nq_b = [cdiv(x, bs) for x in lq_h]
    nk_b = [cdiv(x, bs) for x in lk_h]
    if any(n > nq for n in nq_b) or any(n > nk_cap for n in nk_b):
        raise ValueError(f"index ({nq} query blocks, {nk_cap} key slots) is smaller than the sequences need "
                         f"(max {max(nq_b, default=0)}, {max(nk_b, default=0)})")
    heads = full_cnt.shape[0]
    counts_f, counts_m, rows_f, rows_m = [], [], [], []
    for b in range(batch):
        m, n = nq_b[b], nk_b[b]
        counts_f.append(full_cnt[:, b, :m])
        counts_m.append(mask_cnt[:, b, :m])
        rows_f.append(full_idx[:, b, :m, :n].reshape(heads, m * n))
        wide = torch.zeros(heads, m, n, dtype=torch.int32, device=dev)
        w = min(width, n)
        wide[..., :w] = mask_idx[:, b, :m, :w]
        rows_m.append(wide.reshape(heads, m * n))
    cu_m = torch.tensor([0] + nq_b, device=dev).cumsum(0).int()
    cu_off = torch.tensor([0] + [a * c for a, c in zip(nq_b, nk_b)], device=dev).cumsum(0).int()

    def cat(parts):
        return torch.cat(parts, dim=1).contiguous() if parts else torch.zeros(heads, 0, dtype=torch.int32, device=dev)

    return FA4BlockSparse(cat(counts_m), cat(rows_m), cat(counts_f), cat(rows_f), cu_m, cu_off, (bs, bs))


def fa4_kept_mask(t: FA4BlockSparse, seq: int, head: int, seqlen_q: int, seqlen_k: int,
                  *, full: bool = True, masked: bool = True) -> torch.Tensor:
    """Bool ``(cdiv(seqlen_q, B), cdiv(seqlen_k, B))``: the key blocks FA4 visits for one (sequence, head), read
    back from either layout (for tests and the benchmark's check)."""
    bs = t.block_size[0]
    nq, nk = cdiv(seqlen_q, bs), cdiv(seqlen_k, bs)
    out = torch.zeros(nq, nk + 1, dtype=torch.bool, device=t.full_block_cnt.device)
    lists = ([(t.full_block_cnt, t.full_block_idx)] if full else []) + \
            ([(t.mask_block_cnt, t.mask_block_idx)] if masked else [])
    for cnt, idx in lists:
        if t.cu_total_m_blocks is None:
            h = head if cnt.shape[1] > 1 else 0
            c = cnt[seq, h, :nq].long()
            ids = idx[seq, h, :nq].long()
        else:
            h = head if cnt.shape[0] > 1 else 0
            m0 = int(t.cu_total_m_blocks[seq])
            off = int(t.cu_block_idx_offsets[seq])
            c = cnt[h, m0:m0 + nq].long()
            ids = idx[h, off:off + nq * nk].view(nq, nk).long()
        ok = torch.arange(ids.shape[-1], device=ids.device)[None, :] < c[:, None]
        out.scatter_(1, torch.where(ok, ids, nk), True)   # unused slots land in the extra column
    return out[:, :nk]
