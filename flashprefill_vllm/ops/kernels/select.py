"""Block scores, max-relative threshold, always-kept blocks and index write-out, in one kernel.

One program per (query block, sequence, index head). Pass 1 streams the pooled keys in chunks of K_TILE blocks
and writes each block's log2-energy ``log2 sum_{rows, heads} 2^x`` into the program's own index row (bit-cast
fp32 scratch), combining the group's heads / row sub-tiles online, so no O((L/B)^2) float buffer exists. With the
mass floor on (``MASS_FLOOR``), the row is read once more to sum its energies and, when the alpha threshold keeps
less than a share ``tau`` of them, ``FLOOR_STEPS`` more times to bisect the threshold that does (the reference's
``floor_log2_threshold``: no sort). Pass 2 reads the row back, keeps ``lse_j >= threshold`` plus the forced blocks
and compacts the ascending ids in place (writes never overtake reads: position <= block id).

Key lengths come from ``cu_seqlens_k`` or, for keys in a paged cache, from ``seqused_k`` (the kernel reads only
q and the pooled keys). Optional per-sequence flags switch the dense tail off (chunks that do not end the prompt).
"""

import triton
import triton.language as tl

from .paging import _seq_k_range


@triton.jit
def _row_energy(p_scr, n_score, row_max, rel_thr, num_sink, local_lo, K_TILE: tl.constexpr):
    """Over one row's scratch log2-energies: the energy (relative to ``row_max``) of the forced blocks and of the
    blocks at or above ``row_max + rel_thr``, and the row's total energy (the mass floor's ``S(t)`` and ``S(-inf)``)."""
    o_kt = tl.arange(0, K_TILE)
    kept = 0.0
    total = 0.0
    for j0 in range(0, n_score, K_TILE):
        o_j = j0 + o_kt
        b_rel = tl.load(p_scr + o_j, mask=o_j < n_score, other=float("-inf")) - row_max
        b_e = tl.exp2(b_rel)
        forced = (o_j < num_sink) | (o_j >= local_lo)
        kept += tl.sum(tl.where(forced | (b_rel >= rel_thr), b_e, 0.0), axis=0)
        total += tl.sum(b_e, axis=0)
    return kept, total


@triton.jit
def _select_blocks_kernel(
    Q, KBAR, CU_Q, CU_K, SEQUSED_K, DENSE_TAIL, COUNT, INDEX, SCRATCH,
    stride_qt, stride_qh,
    stride_pb, stride_ph, stride_pj,
    stride_cnt_h, stride_cnt_b, stride_cnt_i,
    stride_idx_h, stride_idx_b, stride_idx_i,
    qk_scale_log2, log2_alpha, tau, floor_range_log2,
    num_sink, num_local, num_tail, min_sparse_len, gqa_group,
    HEADS_PER_INDEX: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,         # query rows per scoring step (BLOCK_SIZE is split into BLOCK_SIZE // ROWS steps)
    K_TILE: tl.constexpr,       # pooled keys per chunk
    HEAD_DIM: tl.constexpr,
    PAGED: tl.constexpr,        # key lengths from SEQUSED_K instead of CU_K
    TAIL_FLAGS: tl.constexpr,   # DENSE_TAIL holds one flag (uint8) per sequence; otherwise every tail is dense
    MASS_FLOOR: tl.constexpr,   # tau > 0: lower the threshold until the kept blocks hold a share tau of the energy
    FLOOR_STEPS: tl.constexpr,  # bisection steps of the mass floor
):
    i_q = tl.program_id(0)
    i_b = tl.program_id(1)
    i_hi = tl.program_id(2)
    q_start = tl.load(CU_Q + i_b).to(tl.int64)
    seqlen_q = tl.load(CU_Q + i_b + 1).to(tl.int64) - q_start
    _, seqlen_k = _seq_k_range(CU_K, SEQUSED_K, i_b, PAGED)
    p_cnt = COUNT + i_hi * stride_cnt_h + i_b * stride_cnt_b + i_q * stride_cnt_i
    row0 = i_q.to(tl.int64) * BLOCK_SIZE
    if row0 >= seqlen_q:
        tl.store(p_cnt, 0)
    else:
        ctx = seqlen_k - seqlen_q
        n_qblocks = (seqlen_q + BLOCK_SIZE - 1) // BLOCK_SIZE
        last_pos = ctx + tl.minimum(row0 + BLOCK_SIZE, seqlen_q) - 1
        d_first = (ctx + row0) // BLOCK_SIZE
        n_vis = last_pos // BLOCK_SIZE + 1
        p_row = INDEX + i_hi * stride_idx_h + i_b * stride_idx_b + i_q * stride_idx_i
        p_scr = SCRATCH + i_hi * stride_idx_h + i_b * stride_idx_b + i_q * stride_idx_i
        o_kt = tl.arange(0, K_TILE)
        in_tail = i_q >= n_qblocks - num_tail
        if TAIL_FLAGS:
            in_tail = in_tail & (tl.load(DENSE_TAIL + i_b) != 0)
        dense = in_tail | (seqlen_k < min_sparse_len)
        if dense:
            for j0 in range(0, n_vis, K_TILE):
                o_j = j0 + o_kt
                tl.store(p_row + o_j, o_j.to(tl.int32), mask=o_j < n_vis)
            tl.store(p_cnt, n_vis.to(tl.int32))
        else:
            # Blocks scored by at least the last row: block end min((j+1)B, Lk) - 1 <= last_pos.
            n_score = (last_pos + 1) // BLOCK_SIZE + ((last_pos == seqlen_k - 1) & (seqlen_k % BLOCK_SIZE != 0)).to(tl.int64)
            o_r = tl.arange(0, ROWS)
            o_d = tl.arange(0, HEAD_DIM)
            max_lse = tl.full([K_TILE], float("-inf"), tl.float32)
            for u in tl.static_range(HEADS_PER_INDEX * (BLOCK_SIZE // ROWS)):
                i_hq = i_hi * HEADS_PER_INDEX + u // (BLOCK_SIZE // ROWS)
                i_kvh = i_hq // gqa_group
                rows = row0 + (u % (BLOCK_SIZE // ROWS)) * ROWS + o_r
                m_r = rows < seqlen_q
                pos = ctx + rows
                p_q = Q + (q_start + rows)[:, None] * stride_qt + i_hq * stride_qh + o_d[None, :]
                b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)                       # [ROWS, HEAD_DIM]
                p_kbar = KBAR + i_b * stride_pb + i_kvh * stride_ph
                for j0 in range(0, n_score, K_TILE):
                    o_j = j0 + o_kt
                    m_j = o_j < n_score
                    b_kbar = tl.load(p_kbar + o_j[:, None] * stride_pj + o_d[None, :], mask=m_j[:, None], other=0.0)
                    b_x = tl.dot(b_q, tl.trans(b_kbar)) * qk_scale_log2                 # [ROWS, K_TILE]
                    blk_end = tl.minimum((o_j + 1) * BLOCK_SIZE, seqlen_k) - 1
                    m_x = m_r[:, None] & m_j[None, :] & (blk_end[None, :] <= pos[:, None])
                    b_x = tl.where(m_x, b_x, float("-inf"))
                    b_m = tl.max(b_x, axis=0)                                           # [K_TILE]
                    b_m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
                    b_lse = b_m_safe + tl.log2(tl.sum(tl.exp2(b_x - b_m_safe[None, :]), axis=0))
                    if u > 0:
                        b_prev = tl.load(p_scr + o_j, mask=m_j, other=float("-inf"))
                        b_hi = tl.maximum(b_prev, b_lse)
                        b_hi_safe = tl.where(b_hi == float("-inf"), 0.0, b_hi)
                        b_lse = b_hi_safe + tl.log2(tl.exp2(b_prev - b_hi_safe) + tl.exp2(b_lse - b_hi_safe))
                    tl.store(p_scr + o_j, b_lse, mask=m_j)
                    if u == HEADS_PER_INDEX * (BLOCK_SIZE // ROWS) - 1:
                        max_lse = tl.maximum(max_lse, tl.where(m_j, b_lse, float("-inf")))
                # NOTE: the next step (or pass 2) reads scratch written by other threads of this program.
                tl.debug_barrier()
            row_max = tl.max(max_lse, axis=0)
            thr = row_max + log2_alpha
            local_lo = d_first - num_local + 1
            if MASS_FLOOR:
                row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
                kept, total = _row_energy(p_scr, n_score, row_max, log2_alpha, num_sink, local_lo, K_TILE)
                target = tau * total
                if kept < target:
                    lo = -floor_range_log2
                    hi = log2_alpha
                    for _step in tl.static_range(FLOOR_STEPS):
                        mid = (lo + hi) * 0.5
                        kept, _total = _row_energy(p_scr, n_score, row_max, mid, num_sink, local_lo, K_TILE)
                        ok = kept >= target
                        lo = tl.where(ok, mid, lo)
                        hi = tl.where(ok, hi, mid)
                    thr = row_max + lo
            cnt = 0
            for j0 in range(0, n_vis, K_TILE):
                o_j = j0 + o_kt
                b_lse = tl.load(p_scr + o_j, mask=o_j < n_score, other=float("-inf"))
                # NOTE: in-place compaction; every thread must hold this chunk before any id is written over it.
                tl.debug_barrier()
                keep = ((b_lse > float("-inf")) & (b_lse >= thr)) | (o_j < num_sink) | (o_j >= local_lo)
                keep = keep & (o_j < n_vis)
                k_i = keep.to(tl.int32)
                dst = cnt + tl.cumsum(k_i, axis=0) - 1
                tl.store(p_row + dst, o_j.to(tl.int32), mask=keep)
                cnt += tl.sum(k_i, axis=0)
            tl.store(p_cnt, cnt)
