"""Where a sequence's keys live: packed rows (``cu_seqlens_k``) or a paged cache (``block_table`` + ``seqused_k``).

Jit helpers shared by the kernels (no kernel here). Paging is a constexpr switch, so the contiguous specialisation
compiles exactly the code it had before paging existed.
"""

import triton
import triton.language as tl


@triton.jit
def _seq_k_range(CU_K, SEQUSED_K, i_b, PAGED: tl.constexpr):
    """``(k_start, seqlen_k)`` of sequence ``i_b`` as int64: its first packed key row and its key count.

    Paged keys have no packed row: ``k_start`` is 0 and the count is ``seqused_k[i_b]``.
    """
    if PAGED:
        k_start = tl.full([], 0, tl.int64)
        seqlen_k = tl.load(SEQUSED_K + i_b).to(tl.int64)
    else:
        k_start = tl.load(CU_K + i_b).to(tl.int64)
        seqlen_k = tl.load(CU_K + i_b + 1).to(tl.int64) - k_start
    return k_start, seqlen_k


@triton.jit
def _page_slots(BT_ROW, o_t, m_t, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """``(page, slot)`` (int64) of key positions ``o_t`` of one sequence: page ``BT_ROW[t // PAGE_SIZE]``, slot
    ``t % PAGE_SIZE``; key t then starts at element ``page * stride_page + slot * stride_slot`` of the cache.

    With ``MASKED`` the table is read only where ``m_t`` holds (positions past the sequence may lie past its row).
    """
    if MASKED:
        page = tl.load(BT_ROW + o_t // PAGE_SIZE, mask=m_t, other=0)
    else:
        page = tl.load(BT_ROW + o_t // PAGE_SIZE)
    return page.to(tl.int64), o_t % PAGE_SIZE
