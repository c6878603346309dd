"""The plain-torch spec on CPU: dense limit, selection invariants, varlen/GQA consistency, bottom-right alignment."""

import pytest
import torch

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm import synthetic
from flashprefill_vllm.ops import reference
from flashprefill_vllm.ops.block_sparse_index import block_density, causal_block_counts

from helpers import assert_index_invariants, cu_from_lens

TINY_ALPHA = 1e-30  # alpha -> 0: every scored block passes the threshold


def _dense(q, k, v, cu_q, cu_k, scale):
    return reference.sparse_attention(q, k, v, None, cu_q, cu_k, scale, return_lse=True)


def _sdpa_loop(q, k, v, lens, scale):
    """Independent dense check: torch SDPA per sequence (fp32, causal, GQA by repeat)."""
    outs, start = [], 0
    g = q.shape[1] // k.shape[1]
    for L in lens:
        qs, ks, vs = (t[start:start + L].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                    .transpose(0, 1))
        start += L
    return torch.cat(outs)


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
def test_tiny_alpha_keeps_everything_and_equals_dense(block_size, shared):
    lens = [700, 129, 1]
    q, k, v, cu = synthetic.structured_qkv(lens, 4, 2, 64, dtype=torch.float32, block_size=block_size)
    scale = 0.11
    cfg = FlashPrefillConfig(alpha=TINY_ALPHA, block_size=block_size, min_sparse_len=0, gqa_shared_index=shared)
    out, lse, index = reference.flash_prefill(q, k, v, cu, cu, max(lens), max(lens), scale, cfg)
    assert block_density(index, cu, cu) == 1.0
    dense_out, dense_lse = _dense(q, k, v, cu, cu, scale)
    torch.testing.assert_close(out, dense_out)
    torch.testing.assert_close(lse, dense_lse)
    torch.testing.assert_close(out, _sdpa_loop(q, k, v, lens, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_selection_invariants_and_real_sparsity(block_size):
    lens = [4000, 1000, 300]
    q, k, v, cu = synthetic.structured_qkv(lens, 4, 2, 64, dtype=torch.bfloat16, block_size=block_size)
    cfg = FlashPrefillConfig(alpha=0.1, block_size=block_size, min_sparse_len=0)
    index, _ = reference.build_index(q, k, cu, cu, max(lens), max(lens), 0.125, cfg)
    assert_index_invariants(index, lens, lens, cfg)
    if block_size == 64:
        # Structured input: far blocks get dropped on the long sequence.
        assert block_density(index, cu, cu, per_sequence=True)[0] < 0.8


def test_min_sparse_len_gates_per_sequence():
    lens = [2000, 600]
    q, k, v, cu = synthetic.structured_qkv(lens, 2, 1, 64, dtype=torch.bfloat16, block_size=64)
    cfg = FlashPrefillConfig(alpha=0.5, block_size=64, min_sparse_len=1000)
    index, _ = reference.build_index(q, k, cu, cu, max(lens), max(lens), 0.125, cfg)
    dens = block_density(index, cu, cu, per_sequence=True)
    assert dens[1] == 1.0 and dens[0] < 1.0


def test_shared_index_has_one_list_per_kv_group():
    lens = [1500]
    q, k, v, cu = synthetic.structured_qkv(lens, 8, 2, 64, dtype=torch.bfloat16, block_size=64)
    shared, _ = reference.build_index(q, k, cu, cu, 1500, 1500, 0.125,
                                     FlashPrefillConfig(block_size=64, min_sparse_len=0, gqa_shared_index=True))
    per_head, _ = reference.build_index(q, k, cu, cu, 1500, 1500, 0.125,
                                       FlashPrefillConfig(block_size=64, min_sparse_len=0, gqa_shared_index=False))
    assert shared.block_count.shape[0] == 2 and shared.heads_per_index == 4
    assert per_head.block_count.shape[0] == 8 and per_head.heads_per_index == 1


def test_varlen_batch_equals_per_sequence():
    lens = [900, 257, 64]
    q, k, v, cu = synthetic.structured_qkv(lens, 4, 1, 64, dtype=torch.float32, block_size=64)
    cfg = FlashPrefillConfig(alpha=0.2, block_size=64, min_sparse_len=0)
    out, lse, index = reference.flash_prefill(q, k, v, cu, cu, max(lens), max(lens), 0.125, cfg)
    start = 0
    for b, L in enumerate(lens):
        one = cu_from_lens([L])
        o1, l1, i1 = reference.flash_prefill(q[start:start + L], k[start:start + L], v[start:start + L], one, one,
                                             L, L, 0.125, cfg)
        torch.testing.assert_close(out[start:start + L], o1)
        torch.testing.assert_close(lse[:, start:start + L], l1)
        nq = i1.block_count.shape[2]
        assert torch.equal(index.block_count[:, b, :nq], i1.block_count[:, 0])
        start += L


def test_bottom_right_alignment_matches_tail_of_full_attention():
    L, tail = 600, 170
    q, k, v, cu = synthetic.structured_qkv([L], 2, 1, 64, dtype=torch.float32, block_size=64)
    cfg = FlashPrefillConfig(alpha=TINY_ALPHA, block_size=64, min_sparse_len=0)
    full, full_lse, _ = reference.flash_prefill(q, k, v, cu, cu, L, L, 0.125, cfg)
    cu_q = cu_from_lens([tail])
    part, part_lse, index = reference.flash_prefill(q[L - tail:], k, v, cu_q, cu, tail, L, 0.125, cfg)
    torch.testing.assert_close(part, full[L - tail:])
    torch.testing.assert_close(part_lse, full_lse[:, L - tail:])
    assert_index_invariants(index, [tail], [L], cfg)


def test_causal_block_counts():
    cu_q, cu_k = cu_from_lens([130, 5]), cu_from_lens([130, 300])
    counts = causal_block_counts(cu_q, cu_k, 3, 64)
    # seq 0: self-attention, 3 query blocks see 1, 2, 3 key blocks; seq 1: 5 queries at positions 295..299.
    assert counts.tolist() == [[1, 2, 3], [5, 0, 0]]


def _floor_case(alpha, tau, block_size=64):
    lens = [1500, 700]
    q, k, v, cu = synthetic.structured_qkv(lens, 4, 2, 64, dtype=torch.float32, block_size=block_size)
    cfg = FlashPrefillConfig(alpha=alpha, tau=tau, block_size=block_size, min_sparse_len=0, num_dense_tail_blocks=0)
    index, energies = reference.build_index(q, k, cu, cu, max(lens), max(lens), 0.125, cfg)
    return lens, cu, cfg, index, energies


def _kept_share(index, energies, lens, cfg):
    """Per (sequence, head, query block): the kept blocks' share of the row's estimated energy, and the rows."""
    shares = []
    for b, L in enumerate(lens):
        keep = reference.index_to_mask(index, b, L, L)
        e = energies[b]
        w = torch.exp(e - e.amax(-1, keepdim=True)).nan_to_num(0.0)
        scored = torch.isfinite(e).any(-1)
        shares.append(((w * keep).sum(-1) / w.sum(-1))[scored])
    return torch.cat(shares)


def test_mass_floor_off_is_the_alpha_rule():
    lens, cu, cfg, plain, energies = _floor_case(0.3, 0.0)
    _, _, _, tiny, _ = _floor_case(0.3, 1e-9)     # the floor's code path, a floor every row meets
    assert torch.equal(plain.block_count, tiny.block_count) and torch.equal(plain.block_index, tiny.block_index)
    # A floor the alpha rule already meets changes nothing either.
    share = _kept_share(plain, energies, lens, cfg).min().item()
    _, _, _, low, _ = _floor_case(0.3, share * 0.999)
    assert torch.equal(plain.block_count, low.block_count) and torch.equal(plain.block_index, low.block_index)


@pytest.mark.parametrize("tau", [0.8, 0.95, 0.99])
def test_mass_floor_keeps_the_share_and_no_more_than_needed(tau):
    _, _, _, plain, _ = _floor_case(0.9, 0.0)
    lens, cu, cfg, index, energies = _floor_case(0.9, tau)
    shares = _kept_share(index, energies, lens, cfg)
    assert (shares >= tau - 1e-6).all(), f"a row keeps only {shares.min():.4f} of its energy (floor {tau})"
    plain_shares = _kept_share(plain, energies, lens, cfg)
    assert (plain_shares < tau).any(), "the case must have rows where the floor binds"
    assert block_density(index, cu, cu) > block_density(plain, cu, cu)
    # Superset of the alpha rule, and a threshold set: no dropped scored block outweighs a kept one by the floor.
    for b, L in enumerate(lens):
        keep, keep_plain = (reference.index_to_mask(ix, b, L, L) for ix in (index, plain))
        assert not (keep_plain & ~keep).any()
        e = energies[b]
        added = keep & ~keep_plain
        dropped = torch.isfinite(e) & ~keep
        lowest_added = torch.where(added, e, float("inf")).amin(-1)
        highest_dropped = torch.where(dropped, e, float("-inf")).amax(-1)
        assert (highest_dropped <= lowest_added + 1e-6).all()
        # Minimal up to the bisection's resolution: without the lowest added block(s) the row falls under the floor.
        rel = (e - e.amax(-1, keepdim=True)) / reference.LN2
        step = reference.FLOOR_RANGE_LOG2 / 2 ** reference.FLOOR_STEPS
        w = torch.exp(e - e.amax(-1, keepdim=True)).nan_to_num(0.0)
        lowest_rel = (lowest_added[..., None] - e.amax(-1, keepdim=True)) / reference.LN2
        without = keep & ~(added & (rel <= lowest_rel + step))
        has_added = added.any(-1)
        share_without = (w * without).sum(-1) / w.sum(-1)
        assert (share_without[has_added] < tau + 1e-6).all()


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan"), True, "0.9"])
def test_tau_validation(tau):
    with pytest.raises(ValueError, match="tau must be a number in \\[0, 1\\]"):
        FlashPrefillConfig(tau=tau)
