"""Shared checks: index equality up to near-threshold ties, selection invariants, varlen batch builders."""

from __future__ import annotations

import math

import torch

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.ops.utils import BlockSparseIndex, cdiv

# Blocks whose log-energy lies this close (nats) to the threshold may differ between kernel and reference: the
# kernel sums q.kbar products in another order and in log2 space, and pools keys in another order, so a pooled key
# can round to the neighbouring fp16/bf16 value (bf16 has 8 mantissa bits: ~0.4% of a logit of ~10 is 0.04 nats).
TIE_EPS = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1, torch.float32: 1e-4}


def cu_from_lens(lens, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def rows(index: BlockSparseIndex, h: int, b: int, i: int) -> set[int]:
    c = int(index.block_count[h, b, i])
    return set(index.block_index[h, b, i, :c].tolist())


def assert_same_index(got: BlockSparseIndex, want: BlockSparseIndex, energies, lens_q, alpha: float,
                      dtype=torch.float16):
    """Same kept sets per (index head, sequence, query block), excusing only blocks within TIE_EPS of the threshold."""
    assert got.block_count.shape == want.block_count.shape
    assert got.heads_per_index == want.heads_per_index and got.block_size == want.block_size
    mismatched = 0
    for b, lq in enumerate(lens_q):
        nq = cdiv(lq, want.block_size)
        for h in range(want.block_count.shape[0]):
            for i in range(nq):
                diff = rows(got, h, b, i) ^ rows(want, h, b, i)
                if not diff:
                    continue
                e = energies[b][h, i]
                thr = e.max().item() + math.log(alpha)
                for j in diff:
                    assert abs(e[j].item() - thr) < TIE_EPS[dtype], (
                        f"seq {b} head {h} qblock {i}: block {j} differs (log-energy {e[j].item():.4f}, threshold "
                        f"{thr:.4f}); kernel {sorted(rows(got, h, b, i))} vs reference {sorted(rows(want, h, b, i))}")
                    mismatched += 1
    return mismatched


def assert_index_invariants(index: BlockSparseIndex, lens_q, lens_k, cfg: FlashPrefillConfig):
    """Sink, window, dense tail, causality, ascending ids, no empty row, nothing past the sequence."""
    bs = index.block_size
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        ctx = lk - lq
        nq = cdiv(lq, bs)
        assert (index.block_count[:, b, nq:] == 0).all(), "query blocks past the sequence must be empty"
        for h in range(index.block_count.shape[0]):
            for i in range(nq):
                c = int(index.block_count[h, b, i])
                ids = index.block_index[h, b, i, :c].tolist()
                assert c >= 1, "no query block may be empty"
                assert ids == sorted(set(ids)), f"ids must be strictly ascending: {ids}"
                d_first = (ctx + i * bs) // bs
                d_last = (ctx + min((i + 1) * bs, lq) - 1) // bs
                assert ids[-1] <= d_last, "a block past the diagonal was kept (causality)"
                kept = set(ids)
                must = set(range(min(cfg.num_sink_blocks, d_last + 1)))
                must |= set(range(max(0, d_first - cfg.num_local_blocks + 1), d_last + 1))
                if i >= nq - cfg.num_dense_tail_blocks or lk < cfg.min_sparse_len:
                    must |= set(range(d_last + 1))
                assert must <= kept, f"seq {b} head {h} qblock {i}: forced blocks {sorted(must - kept)} missing"
