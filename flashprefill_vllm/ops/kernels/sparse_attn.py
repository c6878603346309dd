"""Index-driven block-sparse causal attention (varlen, GQA, bottom-right alignment).

One program per (query head, query tile, sequence). It walks the tile's ascending kept-block list and loads only
those key blocks ("physical jump"), in BLOCK_N-key steps, each step's block id read one step ahead. Blocks that lie
fully before the tile's first row run unmasked; the causal mask is applied only to the trailing blocks that reach the
diagonal. The index builder guarantees those trailing blocks (the local window) are always listed.

K/V are packed rows (``cu_seqlens_k``) or a paged cache: then each key row's address goes through the block table
(page ``block_table[b, t // page_size]``, slot ``t % page_size``) and the key counts come from ``seqused_k``.
"""

import triton
import triton.language as tl

from ..utils import LN2
from .paging import _page_slots, _seq_k_range

_LN2 = tl.constexpr(LN2)   # a Triton kernel reads module globals only as constexprs


@triton.jit
def _attn_steps(
    acc, l_i, m_i, b_q, p_k, p_v, bt_row, stride_kp, stride_kt, stride_vp, stride_vt, p_idx, step_lo, step_hi, pos_q,
    seqlen_k, qk_scale_log2,
    SUBS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, DENSE: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    if not DENSE:
        # The next step's block id is loaded one step ahead, so a step's K/V addresses never wait on a dependent
        # scalar load (kernel lab: x1.02-1.09 per kept block at head_dim 128 on an H100, bench_kernel_lab.py).
        j_next = tl.load(p_idx + step_lo // SUBS, mask=step_lo < step_hi, other=0)
    for step in range(step_lo, step_hi):
        if DENSE:
            i_j = step // SUBS
        else:
            i_j = j_next
            j_next = tl.load(p_idx + (step + 1) // SUBS, mask=step + 1 < step_hi, other=0)
        o_k = i_j.to(tl.int64) * BLOCK_SIZE + (step % SUBS) * BLOCK_N + o_n                 # key positions
        m_k = o_k < seqlen_k
        if PAGE_SIZE > 0:
            page, slot = _page_slots(bt_row, o_k, m_k, PAGE_SIZE, MASKED)
            o_kr = page * stride_kp + slot * stride_kt
            o_vr = page * stride_vp + slot * stride_vt
            if MASKED:
                b_k = tl.load(p_k + o_kr[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
                b_v = tl.load(p_v + o_vr[:, None] + o_d[None, :], mask=m_k[:, None], other=0.0)
            else:
                b_k = tl.load(p_k + o_kr[:, None] + o_d[None, :])
                b_v = tl.load(p_v + o_vr[:, None] + o_d[None, :])
        elif MASKED:
            b_k = tl.load(p_k + o_k[:, None] * stride_kt + o_d[None, :], mask=m_k[:, None], other=0.0)
            b_v = tl.load(p_v + o_k[:, None] * stride_vt + o_d[None, :], mask=m_k[:, None], other=0.0)
        else:
            b_k = tl.load(p_k + o_k[:, None] * stride_kt + o_d[None, :])
            b_v = tl.load(p_v + o_k[:, None] * stride_vt + o_d[None, :])
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale_log2                                   # [BLOCK_M, BLOCK_N]
        if MASKED:
            b_s = tl.where(o_k[None, :] <= pos_q[:, None], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        b_p = tl.exp2(b_s - m_new[:, None])
        b_alpha = tl.exp2(m_i - m_new)
        l_i = l_i * b_alpha + tl.sum(b_p, axis=1)
        acc = acc * b_alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sparse_attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, SEQUSED_K, BLOCK_TABLE, COUNT, INDEX,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, stride_bt,
    stride_cnt_h, stride_cnt_b, stride_cnt_i,
    stride_idx_h, stride_idx_b, stride_idx_i,
    qk_scale_log2, gqa_group, heads_per_index,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,   # selection block (multiple of BLOCK_M and of BLOCK_N)
    HEAD_DIM: tl.constexpr,
    DENSE: tl.constexpr,        # ignore the index: every causally visible block
    RETURN_LSE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,    # 0: packed K/V rows (CU_K); > 0: K/V are paged caches read through BLOCK_TABLE
):
    i_h = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)   # longest tiles first
    i_b = tl.program_id(2)
    q_start = tl.load(CU_Q + i_b).to(tl.int64)
    seqlen_q = tl.load(CU_Q + i_b + 1).to(tl.int64) - q_start
    k_start, seqlen_k = _seq_k_range(CU_K, SEQUSED_K, i_b, PAGE_SIZE > 0)
    row0 = i_m.to(tl.int64) * BLOCK_M
    if row0 < seqlen_q:
        SUBS: tl.constexpr = BLOCK_SIZE // BLOCK_N
        ctx = seqlen_k - seqlen_q
        o_m = row0 + tl.arange(0, BLOCK_M)
        m_m = o_m < seqlen_q
        pos_q = ctx + o_m
        o_d = tl.arange(0, HEAD_DIM)
        i_kvh = i_h // gqa_group
        last_pos = ctx + tl.minimum(row0 + BLOCK_M, seqlen_q) - 1
        d_last = last_pos // BLOCK_SIZE
        j_mask = (ctx + row0 + 1) // BLOCK_SIZE       # first key block reaching past the tile's first row
        n_masked = tl.maximum(d_last - j_mask + 1, 0)
        p_idx = INDEX
        if DENSE:
            n_blocks = d_last + 1
        else:
            i_sel = row0 // BLOCK_SIZE
            cnt = tl.load(COUNT + (i_h // heads_per_index) * stride_cnt_h + i_b * stride_cnt_b + i_sel * stride_cnt_i)
            sel_last_pos = ctx + tl.minimum((i_sel + 1) * BLOCK_SIZE, seqlen_q) - 1
            # The selection row may reach further than this tile: drop its trailing (window) blocks past d_last.
            n_blocks = cnt - (sel_last_pos // BLOCK_SIZE - d_last)
            p_idx = INDEX + (i_h // heads_per_index) * stride_idx_h + i_b * stride_idx_b + i_sel * stride_idx_i
        n_full = n_blocks - n_masked
        # Sub-steps of the last block that start after the tile's last row see nothing: skip them.
        step_hi = (n_blocks - 1) * SUBS + (last_pos - d_last * BLOCK_SIZE) // BLOCK_N + 1

        p_q = Q + (q_start + o_m)[:, None] * stride_qt + i_h * stride_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
        p_k = K + k_start * stride_kt + i_kvh * stride_kh
        p_v = V + k_start * stride_vt + i_kvh * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        bt_row = BLOCK_TABLE + i_b * stride_bt
        # Blocks wholly before the tile's first row need no causal mask; the trailing ones (the diagonal) do.
        acc, l_i, m_i = _attn_steps(acc, l_i, m_i, b_q, p_k, p_v, bt_row, stride_kp, stride_kt, stride_vp, stride_vt,
                                    p_idx, 0, n_full * SUBS, pos_q, seqlen_k, qk_scale_log2, SUBS=SUBS,
                                    BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=False,
                                    DENSE=DENSE, PAGE_SIZE=PAGE_SIZE)
        acc, l_i, m_i = _attn_steps(acc, l_i, m_i, b_q, p_k, p_v, bt_row, stride_kp, stride_kt, stride_vp, stride_vt,
                                    p_idx, n_full * SUBS, step_hi, pos_q, seqlen_k, qk_scale_log2, SUBS=SUBS,
                                    BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASKED=True,
                                    DENSE=DENSE, PAGE_SIZE=PAGE_SIZE)
        acc = acc / l_i[:, None]
        p_o = O + (q_start + o_m)[:, None] * stride_ot + i_h * stride_oh + o_d[None, :]
        tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None])
        if RETURN_LSE:
            # Natural-log LSE of the scaled logits: (m + log2 l) / log2(e).
            lse = (m_i + tl.log2(l_i)) * _LN2
            tl.store(LSE + i_h * stride_lse_h + q_start + o_m, lse, mask=m_m)
