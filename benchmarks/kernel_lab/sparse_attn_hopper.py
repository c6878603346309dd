"""Experimental Hopper-oriented variant of the block-sparse prefill attention kernel (kernel lab, not the product).

Scope: packed (non-paged) K/V rows at ``cu_seqlens_k``, bf16, head_dim 64 / 128, causal (bottom-right aligned),
``block_size`` a multiple of 128 (the index format of ``flashprefill_vllm.ops.block_sparse_index``; one list per
query head or per KV group). Output semantics are those of ``flashprefill_vllm.ops.attention.sparse_attention``
for that case, without the LSE.

The work split is the product kernel's: one program per (query head, 128-row query tile, sequence), walking the
tile's ascending kept-block list, the off-diagonal blocks in an unmasked loop and the trailing (diagonal) blocks in
a masked one. What a variant can change, each behind a constexpr so ``bench_kernel_lab.py`` can compare them:

- ``TMA``: Q / K / V loads and the O store through device-side tensor descriptors (``tl.make_tensor_descriptor``,
  one descriptor per (sequence, head), so the sequence end is the descriptor's bound and TMA zero-fills past it).
  On a GPU this needs a global-memory scratch allocator: the launcher installs one (``triton.set_allocator``).
- ``PREFETCH``: the next step's block id is loaded one iteration ahead, so the K/V address of step i+1 does not
  wait on a dependent scalar load at the top of that iteration. (Loading the whole list into registers up front was
  not done: picking element i out of a register tensor costs a reduction per step in Triton.)
- ``LOOP_STAGES``: ``tl.range(..., num_stages=LOOP_STAGES)`` on the off-diagonal loop (0: the kernel-level
  ``num_stages`` applies, as in the product kernel).
- ``WARP_SPEC``: ``tl.range(..., warp_specialize=True)`` on the off-diagonal loop (producer / consumer warp groups;
  Hopper and later).
- ``MASK_ALL``: one masked loop over every kept block (no diagonal split) -- a control, expected slower.
- Always: ``exp2`` with the softmax scale folded into one FMA (``qk * scale - m``), the max taken on the raw logits.

Launch options outside the kernel: ``block_n`` (64 or 128), ``num_warps``, ``num_stages``. ``VARIANTS`` lists the
named combinations the benchmark and the CPU check run. Nothing here has been timed on a GPU yet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex

LOG2E = 1.4426950408889634
BLOCK_M = 128


@triton.jit
def _hopper_steps(
    acc, l_i, m_i, b_q, p_k, p_v, desc_k, desc_v, stride_kt, stride_vt, p_idx, step_lo, step_hi, pos_q, seqlen_k,
    qk_scale,
    SUBS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, TMA: tl.constexpr, PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """Online-softmax steps ``step_lo .. step_hi`` of one tile; step s reads key block ``idx[s // SUBS]``,
    sub-block ``s % SUBS`` (BLOCK_N keys)."""
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    if PREFETCH:
        j_next = tl.load(p_idx + step_lo // SUBS, mask=step_lo < step_hi, other=0)
    for step in tl.range(step_lo, step_hi, num_stages=LOOP_STAGES if LOOP_STAGES > 0 else None,
                         warp_specialize=WARP_SPEC):
        if PREFETCH:
            j_cur = j_next
            j_next = tl.load(p_idx + (step + 1) // SUBS, mask=step + 1 < step_hi, other=0)
        else:
            j_cur = tl.load(p_idx + step // SUBS)
        kb = j_cur * BLOCK_SIZE + (step % SUBS) * BLOCK_N          # first key of this step, in the sequence
        if TMA:
            b_k = desc_k.load([kb, 0])
        else:
            o_k = kb.to(tl.int64) + o_n
            if MASKED:
                b_k = tl.load(p_k + o_k[:, None] * stride_kt + o_d[None, :], mask=(o_k < seqlen_k)[:, None],
                              other=0.0)
            else:
                b_k = tl.load(p_k + o_k[:, None] * stride_kt + o_d[None, :])
        qk = tl.dot(b_q, tl.trans(b_k))                                # raw logits, fp32
        if MASKED:
            qk = tl.where((kb + o_n)[None, :] <= pos_q[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])               # scale folded into one FMA
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            b_v = desc_v.load([kb, 0])
        else:
            if MASKED:
                b_v = tl.load(p_v + o_k[:, None] * stride_vt + o_d[None, :], mask=(o_k < seqlen_k)[:, None],
                              other=0.0)
            else:
                b_v = tl.load(p_v + o_k[:, None] * stride_vt + o_d[None, :])
        acc = tl.dot(p.to(b_v.dtype), b_v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sparse_attn_hopper_kernel(
    Q, K, V, O, CU_Q, CU_K, COUNT, INDEX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cnt_h, stride_cnt_b, stride_cnt_i,
    stride_idx_h, stride_idx_b, stride_idx_i,
    qk_scale, gqa_group, heads_per_index,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,    # selection block: a multiple of BLOCK_M and of BLOCK_N
    HEAD_DIM: tl.constexpr,
    TMA: tl.constexpr,
    PREFETCH: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    MASK_ALL: tl.constexpr,
):
    i_h = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)    # longest tiles first
    i_b = tl.program_id(2)
    q_start = tl.load(CU_Q + i_b).to(tl.int64)
    seqlen_q = (tl.load(CU_Q + i_b + 1) - tl.load(CU_Q + i_b)).to(tl.int32)
    k_start = tl.load(CU_K + i_b).to(tl.int64)
    seqlen_k = (tl.load(CU_K + i_b + 1) - tl.load(CU_K + i_b)).to(tl.int32)
    row0 = i_m * BLOCK_M
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
        j_mask = (ctx + row0 + 1) // BLOCK_SIZE        # first key block reaching past the tile's first row
        n_masked = tl.maximum(d_last - j_mask + 1, 0)
        i_sel = row0 // BLOCK_SIZE
        i_ih = i_h // heads_per_index
        cnt = tl.load(COUNT + i_ih * stride_cnt_h + i_b * stride_cnt_b + i_sel * stride_cnt_i)
        sel_last_pos = ctx + tl.minimum((i_sel + 1) * BLOCK_SIZE, seqlen_q) - 1
        n_blocks = cnt - (sel_last_pos // BLOCK_SIZE - d_last)   # drop window blocks past this tile's last row
        p_idx = INDEX + i_ih * stride_idx_h + i_b * stride_idx_b + i_sel * stride_idx_i
        if MASK_ALL:
            n_full = n_blocks * 0
        else:
            n_full = n_blocks - n_masked
        step_hi = (n_blocks - 1) * SUBS + (last_pos - d_last * BLOCK_SIZE) // BLOCK_N + 1

        p_k = K + k_start * stride_kt + i_kvh * stride_kh
        p_v = V + k_start * stride_vt + i_kvh * stride_vh
        if TMA:
            desc_q = tl.make_tensor_descriptor(Q + q_start * stride_qt + i_h * stride_qh, shape=[seqlen_q, HEAD_DIM],
                                               strides=[stride_qt, 1], block_shape=[BLOCK_M, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(p_k, shape=[seqlen_k, HEAD_DIM], strides=[stride_kt, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            desc_v = tl.make_tensor_descriptor(p_v, shape=[seqlen_k, HEAD_DIM], strides=[stride_vt, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            b_q = desc_q.load([row0, 0])
        else:
            desc_k = p_k   # placeholders: never used as descriptors
            desc_v = p_v
            b_q = tl.load(Q + (q_start + o_m)[:, None] * stride_qt + i_h * stride_qh + o_d[None, :],
                          mask=m_m[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc, l_i, m_i = _hopper_steps(acc, l_i, m_i, b_q, p_k, p_v, desc_k, desc_v, stride_kt, stride_vt, p_idx,
                                      0, n_full * SUBS, pos_q, seqlen_k, qk_scale,
                                      SUBS=SUBS, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                                      MASKED=False, TMA=TMA, PREFETCH=PREFETCH, LOOP_STAGES=LOOP_STAGES,
                                      WARP_SPEC=WARP_SPEC)
        # The diagonal: one or two blocks, masked, never pipelined or specialised.
        acc, l_i, m_i = _hopper_steps(acc, l_i, m_i, b_q, p_k, p_v, desc_k, desc_v, stride_kt, stride_vt, p_idx,
                                      n_full * SUBS, step_hi, pos_q, seqlen_k, qk_scale,
                                      SUBS=SUBS, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                                      MASKED=True, TMA=TMA, PREFETCH=PREFETCH, LOOP_STAGES=0, WARP_SPEC=False)
        acc = acc / l_i[:, None]
        if TMA:
            desc_o = tl.make_tensor_descriptor(O + q_start * stride_ot + i_h * stride_oh, shape=[seqlen_q, HEAD_DIM],
                                               strides=[stride_ot, 1], block_shape=[BLOCK_M, HEAD_DIM])
            desc_o.store([row0, 0], acc.to(O.dtype.element_ty))   # rows past the sequence are clipped
        else:
            tl.store(O + (q_start + o_m)[:, None] * stride_ot + i_h * stride_oh + o_d[None, :],
                     acc.to(O.dtype.element_ty), mask=m_m[:, None])


class Variant(NamedTuple):
    """One launch of the kernel: constexpr switches plus launch options."""
    name: str
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    prefetch: bool = False
    loop_stages: int = 0
    warp_spec: bool = False
    mask_all: bool = False


def _variants(head_dim: int) -> list[Variant]:
    # Base launch = the product kernel's config for this head_dim (configs.py): D128 (128x128, 8 warps, 3 stages),
    # D64 (128x64, 4 warps, 3 stages). Ordered roughly from least to most risky on a real GPU.
    bn, w = (128, 8) if head_dim == 128 else (64, 4)
    v = [
        Variant("ptr", bn, w, 3),
        Variant("ptr_prefetch", bn, w, 3, prefetch=True),
        Variant("ptr_loop2", bn, w, 3, loop_stages=2),
        Variant("ptr_mask_all", bn, w, 3, mask_all=True),
    ]
    if head_dim == 64:
        v += [Variant("ptr_bn128", 128, 4, 3), Variant("ptr_bn128_w8", 128, 8, 3)]
    else:
        v += [Variant("ptr_w4", 128, 4, 2)]
    v += [
        Variant("tma", bn, w, 3, tma=True),
        Variant("tma_prefetch", bn, w, 3, tma=True, prefetch=True),
        Variant("tma_loop3", bn, w, 3, tma=True, loop_stages=3),
        Variant("tma_ws", bn, w, 3, tma=True, warp_spec=True),
    ]
    if head_dim == 64:
        v += [Variant("tma_bn128", 128, 4, 3, tma=True)]
    return v


VARIANTS: dict[int, list[Variant]] = {d: _variants(d) for d in (64, 128)}

_ALLOCATOR_SET = False


def _ensure_allocator(device: torch.device):
    """Device-side tensor descriptors need global scratch at launch (128 B per descriptor per program)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET or device.type != "cuda":
        return

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)
    _ALLOCATOR_SET = True


def kernel_args(q, k, v, index: BlockSparseIndex, cu_seqlens_q, cu_seqlens_k, softmax_scale, out):
    """Positional runtime arguments of ``_sparse_attn_hopper_kernel`` (also used to build compile signatures)."""
    count, idx = index.block_count, index.block_index
    return (q, k, v, out, cu_seqlens_q, cu_seqlens_k, count, idx,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            count.stride(0), count.stride(1), count.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
            softmax_scale * LOG2E, q.shape[1] // k.shape[1], index.heads_per_index)


def kernel_constexprs(variant: Variant, head_dim: int, block_size: int) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=variant.block_n, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                TMA=variant.tma, PREFETCH=variant.prefetch, LOOP_STAGES=variant.loop_stages,
                WARP_SPEC=variant.warp_spec, MASK_ALL=variant.mask_all)


def sparse_attention_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockSparseIndex,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                            softmax_scale: float, out: torch.Tensor, block_size: int,
                            variant: Variant | str = "ptr") -> None:
    """Writes ``out`` like ``flashprefill_vllm.ops.attention.sparse_attention`` (packed K/V, index given, no LSE).

    q ``(total_q, Hq, D)``, k / v ``(total_k, Hkv, D)`` with a contiguous last dim; ``variant`` a ``Variant`` or
    the name of one in ``VARIANTS[D]``.
    """
    d = q.shape[2]
    if isinstance(variant, str):
        variant = next(x for x in VARIANTS[d] if x.name == variant)
    assert d in (64, 128) and block_size % BLOCK_M == 0 and block_size % variant.block_n == 0
    assert index is not None and index.block_size == block_size
    batch = cu_seqlens_q.numel() - 1
    n_tiles = triton.cdiv(max_seqlen_q, BLOCK_M)
    if n_tiles == 0 or batch == 0:
        return
    if variant.tma:
        _ensure_allocator(q.device)
    _sparse_attn_hopper_kernel[(q.shape[1], n_tiles, batch)](
        *kernel_args(q, k, v, index, cu_seqlens_q, cu_seqlens_k, softmax_scale, out),
        **kernel_constexprs(variant, d, block_size),
        num_warps=variant.num_warps, num_stages=variant.num_stages,
    )
