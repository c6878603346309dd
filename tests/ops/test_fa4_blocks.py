"""``ops/fa4_blocks.py`` on CPU: our index as FA4 full / masked block lists, checked against ``reference.index_to_mask``
(same kept blocks, no block in both lists) and against an element-level causal mask (a full block needs no mask at
all, a masked block needs one), in both FA4 layouts, per-head and shared (GQA) lists."""

import pytest
import torch

from flashprefill_vllm.ops.fa4_blocks import FA4BlockSparse, fa4_block_sparse, fa4_kept_mask, sm90_tile
from flashprefill_vllm.ops.reference import index_to_mask, mask_to_ids
from flashprefill_vllm.ops.block_sparse_index import BlockSparseIndex
from flashprefill_vllm.ops.utils import cdiv

from helpers import cu_from_lens


def _random_index(lens_q, lens_k, h_idx, hpi, bs, density, seed) -> BlockSparseIndex:
    """Random kept blocks among the causally visible ones, the block of each tile's last row always kept."""
    gen = torch.Generator().manual_seed(seed)
    nq, nk = cdiv(max(lens_q), bs), cdiv(max(lens_k), bs)
    count = torch.zeros(h_idx, len(lens_q), nq, dtype=torch.int32)
    ids = torch.full((h_idx, len(lens_q), nq, nk), -1, dtype=torch.int32)
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        m, n = cdiv(lq, bs), cdiv(lk, bs)
        i = torch.arange(m)[:, None]
        j = torch.arange(n)[None, :]
        last = (lk - lq + torch.clamp((i + 1) * bs, max=lq) - 1) // bs
        keep = (j <= last) & ((torch.rand(h_idx, m, n, generator=gen) < density) | (j == last))
        c, x = mask_to_ids(keep)
        count[:, s, :m] = c
        ids[:, s, :m, :n] = x
    return BlockSparseIndex(count, ids, bs, hpi)


def _element_allowed(lq, lk):
    """(lq, lk) bool: bottom-right causal."""
    return torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]


def _check(t: FA4BlockSparse, index: BlockSparseIndex, lens_q, lens_k, num_heads):
    bs = index.block_size
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        allowed = _element_allowed(lq, lk)
        want_all = index_to_mask(index, s, lq, lk)
        for h in range(num_heads):
            full = fa4_kept_mask(t, s, h, lq, lk, masked=False)
            masked = fa4_kept_mask(t, s, h, lq, lk, full=False)
            assert not (full & masked).any(), f"seq {s} head {h}: a block in both lists"
            assert torch.equal(full | masked, want_all[h // index.heads_per_index]), f"seq {s} head {h}: kept blocks"
            for m, j in full.nonzero().tolist():
                tile = allowed[m * bs:(m + 1) * bs, j * bs:(j + 1) * bs]
                assert tile.shape[1] == bs and tile.all(), f"seq {s} head {h}: full block ({m}, {j}) needs a mask"
            for m, j in masked.nonzero().tolist():
                tile = allowed[m * bs:(m + 1) * bs, j * bs:(j + 1) * bs]
                assert tile.any(), f"seq {s} head {h}: masked block ({m}, {j}) sees no query"
                assert tile.shape[1] < bs or not tile.all(), f"seq {s} head {h}: masked block ({m}, {j}) needs no mask"


def _ascending(t: FA4BlockSparse):
    """Every list FA4 reads is strictly ascending (it walks them from the last entry down)."""
    for cnt, idx in ((t.full_block_cnt, t.full_block_idx), (t.mask_block_cnt, t.mask_block_idx)):
        if t.cu_total_m_blocks is None:
            rows = [(c, idx[b, h, m]) for b in range(cnt.shape[0]) for h in range(cnt.shape[1])
                    for m, c in enumerate(cnt[b, h].tolist())]
        else:
            rows = []
            for b in range(t.cu_total_m_blocks.numel() - 1):
                m0, m1 = t.cu_total_m_blocks[b:b + 2].tolist()
                off0, off1 = t.cu_block_idx_offsets[b:b + 2].tolist()
                n = (off1 - off0) // max(m1 - m0, 1)
                for h in range(cnt.shape[0]):
                    for m in range(m1 - m0):
                        rows.append((int(cnt[h, m0 + m]), idx[h, off0 + m * n: off0 + (m + 1) * n]))
        for c, row in rows:
            assert torch.all(row[1:c] > row[:max(c - 1, 0)])


CASES = [  # (lens_q, lens_k): fresh prefills (aligned and ragged), then queries shorter than keys
    ([64, 40, 17], [64, 40, 17]),
    ([48], [48]),
    ([16, 23, 40], [80, 61, 40]),
    ([5, 64], [77, 100]),
]


@pytest.mark.parametrize("lens_q,lens_k", CASES)
@pytest.mark.parametrize("hpi", [1, 2])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_varlen_matches_index(lens_q, lens_k, hpi, density):
    bs, h_idx = 8, 3
    index = _random_index(lens_q, lens_k, h_idx, hpi, bs, density, seed=len(lens_q) + hpi)
    t = fa4_block_sparse(index, cu_from_lens(lens_q), cu_from_lens(lens_k), h_idx * hpi, tile=(bs, bs))
    heads = h_idx * hpi
    assert t.full_block_cnt.shape == t.mask_block_cnt.shape == (heads, sum(cdiv(x, bs) for x in lens_q))
    assert t.full_block_idx.shape == (heads, sum(cdiv(a, bs) * cdiv(b, bs) for a, b in zip(lens_q, lens_k)))
    assert all(x.dtype == torch.int32 for x in t[:6])
    assert t.cu_total_m_blocks.tolist()[-1] == t.full_block_cnt.shape[1]
    _check(t, index, lens_q, lens_k, heads)
    _ascending(t)


@pytest.mark.parametrize("lq,lk", [(64, 64), (37, 37), (24, 70)])
@pytest.mark.parametrize("hpi", [1, 4])
def test_batched_matches_index(lq, lk, hpi):
    bs, h_idx, batch = 8, 2, 2
    index = _random_index([lq] * batch, [lk] * batch, h_idx, hpi, bs, 0.4, seed=lq)
    t = fa4_block_sparse(index, cu_from_lens([lq] * batch), cu_from_lens([lk] * batch), h_idx * hpi, tile=(bs, bs),
                         varlen=False)
    assert t.cu_total_m_blocks is None and t.cu_block_idx_offsets is None
    assert t.full_block_cnt.shape == (batch, h_idx * hpi, cdiv(lq, bs))
    assert t.full_block_idx.shape[:3] == (batch, h_idx * hpi, cdiv(lq, bs))
    assert t.full_block_idx.shape[3] <= cdiv(lk, bs) and t.mask_block_idx.shape[3] == 2
    _check(t, index, [lq] * batch, [lk] * batch, h_idx * hpi)
    _ascending(t)


def test_fresh_prefill_dense_split():
    """Dense causal, aligned: tile m has m full blocks and one masked (its diagonal)."""
    bs, L = 8, 40
    index = _random_index([L], [L], 1, 1, bs, 1.0, seed=0)
    t = fa4_block_sparse(index, cu_from_lens([L]), cu_from_lens([L]), 1, tile=(bs, bs), varlen=False)
    assert t.full_block_cnt[0, 0].tolist() == list(range(L // bs))
    assert t.mask_block_cnt[0, 0].tolist() == [1] * (L // bs)
    assert t.mask_block_idx[0, 0, :, 0].tolist() == list(range(L // bs))


def test_shared_single_list_broadcasts():
    """One index head for all query heads stays one list (FA4 broadcasts a head dim of 1)."""
    index = _random_index([32], [32], 1, 4, 8, 0.5, seed=1)
    t = fa4_block_sparse(index, cu_from_lens([32]), cu_from_lens([32]), 4, tile=(8, 8))
    assert t.full_block_cnt.shape[0] == 1
    _check(t, index, [32], [32], 4)


def test_paged_key_lengths_from_seqused_k():
    lens_q, lens_k = [16, 9], [40, 33]
    index = _random_index(lens_q, lens_k, 2, 1, 8, 0.5, seed=2)
    t = fa4_block_sparse(index, cu_from_lens(lens_q), None, 2, seqused_k=torch.tensor(lens_k, dtype=torch.int32),
                         tile=(8, 8))
    _check(t, index, lens_q, lens_k, 2)


def test_sm90_tiles():
    assert sm90_tile(128) == (128, 128)
    assert sm90_tile(64) == (128, 128)          # a 128-row sparse block rules out the 192-row tile
    assert sm90_tile(64, sparse_block_q=192) == (192, 128)
    assert sm90_tile(256) == (128, 80)


def test_block_128_head_dims():
    index = _random_index([300], [300], 2, 1, 128, 0.5, seed=3)
    for d in (64, 128):
        t = fa4_block_sparse(index, cu_from_lens([300]), cu_from_lens([300]), 2, head_dim=d)
        assert t.block_size == (128, 128)
        _check(t, index, [300], [300], 2)


def test_unmappable_raises():
    cu = cu_from_lens([64])
    idx64 = _random_index([64], [64], 2, 1, 64, 0.5, seed=4)
    with pytest.raises(ValueError, match="tile"):
        fa4_block_sparse(idx64, cu, cu, 2, head_dim=128)
    idx128 = _random_index([256], [256], 2, 1, 128, 0.5, seed=4)
    with pytest.raises(ValueError, match="tile"):
        fa4_block_sparse(idx128, cu_from_lens([256]), cu_from_lens([256]), 2, head_dim=256)
    with pytest.raises(ValueError, match="num_heads"):
        fa4_block_sparse(idx128, cu_from_lens([256]), cu_from_lens([256]), 3, head_dim=128)
    uneven = _random_index([16, 8], [16, 8], 1, 1, 8, 0.5, seed=5)
    with pytest.raises(ValueError, match="varlen=True"):
        fa4_block_sparse(uneven, cu_from_lens([16, 8]), cu_from_lens([16, 8]), 1, tile=(8, 8), varlen=False)
