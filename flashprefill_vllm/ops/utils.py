"""Varlen bookkeeping shared by the reference and the Triton launchers: lengths, K/V layouts, base-2 constants."""

from __future__ import annotations

from typing import NamedTuple

import torch


# log2(e) and ln(2): the kernels work in base 2 (exp2 / log2), the reference and the public LSE in base e.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def seqlens_k(cu_seqlens_k: torch.Tensor | None, seqused_k: torch.Tensor | None) -> torch.Tensor:
    """Key count per sequence: ``seqused_k`` when the keys are paged, else the differences of ``cu_seqlens_k``."""
    return seqused_k if seqused_k is not None else cu_seqlens_k[1:] - cu_seqlens_k[:-1]


def gather_pages(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` keys of one sequence of a paged cache ``(pages, page_size, H, D)`` (any strides), copied into
    contiguous ``(n, H, D)`` rows: key t is slot ``t % page_size`` of page ``table_row[t // page_size]``. Reads only
    the ``cdiv(n, page_size)`` pages the sequence uses, so table entries past them (padding) are never read."""
    pages = table_row[:cdiv(n, cache.shape[1])].long()
    return cache.index_select(0, pages).reshape(-1, *cache.shape[2:])[:n]


class KeyLayout(NamedTuple):
    """Where a varlen batch's K/V rows live, as the kernels take it. Placeholders are never read.

    Packed (``page_size == 0``): rows ``cu_seqlens_k[b] ..`` of ``(total_k, H, D)`` tensors. Paged: key t of
    sequence b is slot ``t % page_size`` of page ``block_table[b, t // page_size]`` of ``(pages, page_size, H, D)``
    caches, and ``seqused_k[b]`` keys are valid.
    """

    cu_seqlens_k: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    stride_bt: int
    page_size: int

    @classmethod
    def of(cls, k: torch.Tensor, cu_seqlens_k: torch.Tensor | None, block_table: torch.Tensor | None,
           seqused_k: torch.Tensor | None) -> "KeyLayout":
        if block_table is None:
            return cls(cu_seqlens_k, cu_seqlens_k, cu_seqlens_k, 0, 0)
        return cls(seqused_k, seqused_k, block_table, block_table.stride(0), k.shape[1])

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """``(page, token, head)`` element strides of a K or V tensor (page stride 0 when packed)."""
        return (t.stride(0), t.stride(1), t.stride(2)) if self.page_size else (0, t.stride(0), t.stride(1))
