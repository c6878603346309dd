"""Shared checks: index equality up to near-threshold ties, selection invariants, varlen batch builders."""

from __future__ import annotations

import math

import torch

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.ops import reference
from flashprefill_vllm.ops.reference import index_to_mask
from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex
from flashprefill_vllm.ops.utils import cdiv

# Blocks whose log-energy lies this close (nats) to the threshold may differ between kernel and reference: the
# kernel sums q.kbar products in another order and in log2 space, and pools keys in another order, so a pooled key
# can round to the neighbouring fp16/bf16 value (bf16 has 8 mantissa bits: ~0.4% of a logit of ~10 is 0.04 nats).
TIE_EPS = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1, torch.float32: 1e-4}


def cu_from_lens(lens, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _forced(nq: int, nk: int, lq: int, lk: int, cfg: FlashPrefillConfig) -> torch.Tensor:
    """Sink and local blocks ``(nq, nk)`` as the selection forces them (the mass floor counts them as kept)."""
    bs = cfg.block_size
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    d_first = (lk - lq + i * bs) // bs
    return (j < cfg.num_sink_blocks) | (j >= d_first - cfg.num_local_blocks + 1)


def _on_mass_boundary(e: torch.Tensor, forced: torch.Tensor, tau: float, tol: float) -> torch.Tensor:
    """Blocks ``(..., NK)`` whose inclusion decides whether a row reaches the mass floor, to within a share ``tol`` of
    the row's energy: the kernel's energies differ from the reference's by rounding, so either may keep them."""
    w = torch.exp(torch.where(torch.isfinite(e), e - e.amax(-1, keepdim=True), float("-inf"))).nan_to_num(0.0)
    total = w.sum(-1, keepdim=True)
    forced = forced.expand_as(w)
    heavier = ((e[..., None, :] > e[..., :, None]) | forced[..., None, :]).float()       # [.., j, k]: k kept before j
    above = (heavier * w[..., None, :]).sum(-1)
    target = tau * total
    return torch.minimum((above - target).abs(), (above + w - target).abs()) <= tol * total


def assert_same_index(got: BlockSparseIndex, want: BlockSparseIndex, energies, lens_q, alpha: float,
                      dtype=torch.float16, lens_k=None, config: FlashPrefillConfig | None = None):
    """Same kept sets per (index head, sequence, query block), excusing only blocks within TIE_EPS of the threshold
    (with a mass floor, ``config.tau > 0``: the reference's row threshold, or on the floor's mass boundary).

    Returns the number of excused blocks."""
    assert got.block_count.shape == want.block_count.shape
    assert got.heads_per_index == want.heads_per_index and got.block_size == want.block_size
    lens_k = lens_k or lens_q
    excused = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq == 0:
            continue
        diff = index_to_mask(got, b, lq, lk) ^ index_to_mask(want, b, lq, lk)       # (H_idx, nq, nk)
        if not diff.any():
            continue
        e = energies[b]
        floor = config is not None and config.tau > 0
        if floor:
            forced = _forced(e.shape[1], e.shape[2], lq, lk, config).to(e.device)
            thr = reference.row_thresholds(e, forced, config)
        else:
            thr = e.amax(-1, keepdim=True) + math.log(alpha)
        gap = (e - thr).abs()
        bad = diff & ~(gap < TIE_EPS[dtype])
        if floor:
            bad &= ~_on_mass_boundary(e, forced, config.tau, 2 * TIE_EPS[dtype])
        if bad.any():
            h, i, j = bad.nonzero()[0].tolist()
            raise AssertionError(f"seq {b} head {h} qblock {i}: block {j} differs (log-energy {e[h, i, j]:.4f}, "
                                 f"threshold {thr[h, i, 0]:.4f}); {int(bad.sum())} such blocks")
        excused += int(diff.sum())
    return excused


def assert_index_invariants(index: BlockSparseIndex, lens_q, lens_k, cfg: FlashPrefillConfig):
    """Sink, window, dense tail, causality, ascending ids, no empty row, nothing past the sequence."""
    bs = index.block_size
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        ctx = lk - lq
        nq, nk = cdiv(lq, bs), cdiv(lk, bs)
        assert (index.block_count[:, b, nq:] == 0).all(), "query blocks past the sequence must be empty"
        if nq == 0:
            continue
        cnt = index.block_count[:, b, :nq].long()
        assert (cnt >= 1).all(), "no query block may be empty"
        ids = index.block_index[:, b, :nq, :nk].long()
        slot = torch.arange(nk, device=ids.device)
        valid = slot[None, None, :] < cnt[..., None]
        ascending = (ids[..., 1:] > ids[..., :-1]) | ~valid[..., 1:]
        assert ascending.all(), "ids must be strictly ascending"
        i = torch.arange(nq, device=ids.device)[:, None]
        j = slot[None, :]
        d_first = (ctx + i * bs) // bs
        d_last = (ctx + torch.clamp((i + 1) * bs, max=lq) - 1) // bs
        kept = index_to_mask(index, b, lq, lk)
        assert not (kept & (j > d_last)[None]).any(), "a block past the diagonal was kept (causality)"
        must = (j < cfg.num_sink_blocks) | (j >= d_first - cfg.num_local_blocks + 1)
        if lk < cfg.min_sparse_len:
            must = torch.ones_like(must)
        must = (must | (i >= nq - cfg.num_dense_tail_blocks)) & (j <= d_last)
        missing = must[None] & ~kept
        assert not missing.any(), f"seq {b}: forced blocks missing at (head, qblock, block) {missing.nonzero()[0].tolist()}"
