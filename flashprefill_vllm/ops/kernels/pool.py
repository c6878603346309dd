"""Mean pooling of key blocks (one program per (key block, sequence, kv head)), from packed or paged keys."""

import triton
import triton.language as tl

from .paging import _page_slots, _seq_k_range


@triton.jit
def _mean_pool_k_kernel(
    K, KBAR, CU_K, SEQUSED_K, BLOCK_TABLE,
    stride_kp, stride_kt, stride_kh,
    stride_pb, stride_ph, stride_pj,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,   # tokens per key block
    SUB: tl.constexpr,          # rows summed per step (bounds registers for large blocks / head dims)
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,    # 0: packed K rows (CU_K); > 0: K is a paged cache read through BLOCK_TABLE
):
    i_j = tl.program_id(0)
    i_b = tl.program_id(1)
    i_h = tl.program_id(2)
    k_start, seqlen_k = _seq_k_range(CU_K, SEQUSED_K, i_b, PAGE_SIZE > 0)
    blk_start = i_j.to(tl.int64) * BLOCK_SIZE
    if blk_start >= seqlen_k:
        return
    o_d = tl.arange(0, HEAD_DIM)
    b_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in tl.static_range(0, BLOCK_SIZE, SUB):
        o_t = blk_start + s + tl.arange(0, SUB)
        m_t = o_t < seqlen_k
        if PAGE_SIZE > 0:
            page, slot = _page_slots(BLOCK_TABLE + i_b * stride_bt, o_t, m_t, PAGE_SIZE, True)
            p_k = K + (page * stride_kp + slot * stride_kt)[:, None] + i_h * stride_kh + o_d[None, :]
        else:
            p_k = K + (k_start + o_t)[:, None] * stride_kt + i_h * stride_kh + o_d[None, :]
        b_k = tl.load(p_k, mask=m_t[:, None], other=0.0).to(tl.float32)  # [SUB, HEAD_DIM]
        b_sum += tl.sum(b_k, axis=0)
    n = tl.minimum(seqlen_k - blk_start, BLOCK_SIZE).to(tl.float32)
    p_out = KBAR + i_b * stride_pb + i_h * stride_ph + i_j * stride_pj + o_d
    tl.store(p_out, (b_sum / n).to(KBAR.dtype.element_ty))
