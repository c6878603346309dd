"""Randomized GPU suite: the Triton op against the reference (index and output) and, at alpha -> 0, against dense
attention. 1-8 sequences, lengths 1..20K (mostly not block multiples), some with queries shorter than keys, GQA
ratios 1/2/4/8, head dims 64/128/256, bf16 and fp16, block sizes 64/128/256, shared and per-head index.

The paged suite reads K/V from vLLM-style paged caches (shuffled pages of 16/64/256 slots, NaN in every slot that
holds no key) with cached context (queries shorter than keys) and mixed per-sequence dense tails."""

import os
import random

import pytest
import torch

from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm import synthetic
from flashprefill_vllm.ops import (BlockSparseIndex, block_sparse_attn_varlen_func, flash_prefill_block_index,
                                   flash_prefill_varlen_func, reference)
from flashprefill_vllm.ops.block_sparse_index import causal_block_counts

from helpers import assert_index_invariants, assert_same_index, cu_from_lens

pytestmark = pytest.mark.gpu
N_CASES = 240
MAX_TOTAL_TOKENS = 24_000
# FLASHPREFILL_GPU_SEEDS="0:120" runs a slice of the cases (the whole suite takes ~10 minutes on an H100).
_lo, _hi = (int(x) for x in os.environ.get("FLASHPREFILL_GPU_SEEDS", f"0:{N_CASES}").split(":"))
N_PAGED_CASES = 16
MAX_PAGED_TOKENS = 12_000
_plo, _phi = (int(x) for x in os.environ.get("FLASHPREFILL_GPU_PAGED_SEEDS", f"0:{N_PAGED_CASES}").split(":"))


def _case(seed: int):
    rng = random.Random(seed)
    n_seq = rng.randint(1, 8)
    lens_k = []
    for _ in range(n_seq):
        L = int(round(10 ** rng.uniform(0, 4.3)))   # log-uniform 1 .. 20K
        lens_k.append(max(1, min(L, 20_000)))
    while sum(lens_k) > MAX_TOTAL_TOKENS:
        lens_k[lens_k.index(max(lens_k))] //= 2
    lens_q = [L if rng.random() < 0.75 else rng.randint(1, L) for L in lens_k]   # some bottom-right chunks
    ratio = rng.choice([1, 2, 4, 8])
    hkv = rng.choice([1, 2])
    return dict(
        lens_q=lens_q, lens_k=lens_k, hq=hkv * ratio, hkv=hkv, d=rng.choice([64, 128, 256]),
        dtype=rng.choice([torch.bfloat16, torch.float16]), block_size=rng.choice([64, 128, 256]),
        shared=rng.random() < 0.5, alpha=rng.choice([1e-30, 0.05, 0.1, 0.3]),
        min_sparse_len=rng.choice([0, 0, 0, 4096]), scale=rng.choice([None, 0.08]),
        tau=rng.choice([0.0, 0.0, 0.9, 0.99]),
    )


def _inputs(c, seed):
    qs, ks, vs = [], [], []
    for i, (lq, lk) in enumerate(zip(c["lens_q"], c["lens_k"])):
        q, k, v, _ = synthetic.structured_qkv([lk], c["hq"], c["hkv"], c["d"], dtype=c["dtype"], seed=seed * 31 + i,
                                              block_size=c["block_size"])
        qs.append(q[lk - lq:])
        ks.append(k)
        vs.append(v)
    dev = "cuda"
    return (torch.cat(qs).to(dev), torch.cat(ks).to(dev), torch.cat(vs).to(dev),
            cu_from_lens(c["lens_q"], dev), cu_from_lens(c["lens_k"], dev))


@pytest.mark.parametrize("seed", range(_lo, _hi))
def test_random_case(seed):
    c = _case(seed)
    q, k, v, cu_q, cu_k = _inputs(c, seed)
    cfg = FlashPrefillConfig(alpha=c["alpha"], block_size=c["block_size"], min_sparse_len=c["min_sparse_len"],
                             gqa_shared_index=c["shared"], tau=c["tau"])
    scale = c["scale"] if c["scale"] is not None else c["d"] ** -0.5
    mq, mk = max(c["lens_q"]), max(c["lens_k"])
    out = torch.full_like(q, float("nan"))
    out, lse, index = flash_prefill_varlen_func(q, k, v, cu_q, cu_k, mq, mk, c["scale"], config=cfg, out=out,
                                                return_lse=True, return_index=True)
    assert not torch.isnan(out).any()
    tol = dict(atol=2e-2, rtol=1.6e-2) if c["dtype"] == torch.bfloat16 else dict(atol=1e-2, rtol=1e-3)
    if index is not None:
        want_idx, energies = reference.build_index(q, k, cu_q, cu_k, mq, mk, scale, cfg)
        assert_same_index(index, want_idx, energies, c["lens_q"], cfg.alpha, c["dtype"], c["lens_k"], config=cfg)
        assert_index_invariants(index, c["lens_q"], c["lens_k"], cfg)
    want, want_lse = reference.sparse_attention(q, k, v, index, cu_q, cu_k, scale, return_lse=True)
    torch.testing.assert_close(out.float(), want.float(), **tol)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-4)
    if c["alpha"] == 1e-30:
        # alpha -> 0 keeps every block within ~69 nats of the row's strongest: the rest carry no softmax mass.
        dense = reference.sparse_attention(q, k, v, None, cu_q, cu_k, scale)
        torch.testing.assert_close(out.float(), dense.float(), **tol)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_dense_mode_matches_sdpa_bf16(d):
    """Independent dense check against torch SDPA at a long length (our kernel with every block)."""
    L = 9000
    q, k, v, cu = synthetic.structured_qkv([L], 8, 2, d, dtype=torch.bfloat16, device="cuda")
    out = flash_prefill_varlen_func(q, k, v, cu, cu, L, L, alpha=1e-30, min_sparse_len=0)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None].repeat_interleave(4, 1),
        v.transpose(0, 1)[None].repeat_interleave(4, 1), is_causal=True)[0].transpose(0, 1)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1.6e-2)


def _paged_case(seed: int):
    rng = random.Random(10_000 + seed)
    n_seq = rng.randint(1, 4)
    lens_k = [max(1, min(int(round(10 ** rng.uniform(1.5, 4.1))), 12_000)) for _ in range(n_seq)]
    while sum(lens_k) > MAX_PAGED_TOKENS:
        lens_k[lens_k.index(max(lens_k))] //= 2
    # Mostly later chunks / prefix-cache hits (new tokens after cached context), some fresh prompts, some 1-token.
    lens_q = [rng.choice([L, rng.randint(1, L), rng.randint(max(1, L // 4), L), 1]) for L in lens_k]
    ratio, hkv = rng.choice([1, 2, 4, 8]), rng.choice([1, 2])
    return dict(
        lens_q=lens_q, lens_k=lens_k, hq=hkv * ratio, hkv=hkv, d=rng.choice([64, 128]),
        dtype=rng.choice([torch.bfloat16, torch.float16]), block_size=rng.choice([64, 128, 256]),
        page_size=rng.choice([16, 16, 64, 256]), head_major=rng.random() < 0.25, shared=rng.random() < 0.5,
        alpha=rng.choice([1e-30, 0.05, 0.1, 0.3]), min_sparse_len=rng.choice([0, 0, 0, 4096]),
        dense_tail=[rng.random() < 0.5 for _ in lens_k], tau=rng.choice([0.0, 0.0, 0.9, 0.99]),
    )


def _assert_dense_tails(index, c, cu_q, cu_k, cfg):
    """Sequences whose flag is set keep every visible block in their last ``num_dense_tail_blocks`` query blocks."""
    visible = causal_block_counts(cu_q, cu_k, index.block_count.shape[2], index.block_size)
    for b, (lq, tail) in enumerate(zip(c["lens_q"], c["dense_tail"])):
        nq = -(-lq // index.block_size)
        rows = slice(max(nq - cfg.num_dense_tail_blocks, 0), nq)
        if tail:
            assert (index.block_count[:, b, rows] == visible[b, rows]).all(), f"seq {b}: dense tail missing"


@pytest.mark.parametrize("seed", range(_plo, _phi))
def test_random_paged_case(seed):
    c = _paged_case(seed)
    q, k, v, cu_q, cu_k = _inputs(c, 10_000 + seed)
    kc, vc, bt, su = synthetic.to_paged(k, v, cu_k, c["page_size"], seed=seed, head_major=c["head_major"])
    tail = torch.tensor(c["dense_tail"], device="cuda")
    cfg = FlashPrefillConfig(alpha=c["alpha"], block_size=c["block_size"], min_sparse_len=c["min_sparse_len"],
                             gqa_shared_index=c["shared"], tau=c["tau"])
    scale = c["d"] ** -0.5
    mq, mk = max(c["lens_q"]), max(c["lens_k"])
    paged = dict(block_table=bt, seqused_k=su)
    out = torch.full_like(q, float("nan"))
    out, lse, index = flash_prefill_varlen_func(q, kc, vc, cu_q, None, mq, mk, config=cfg, out=out, dense_tail=tail,
                                                return_lse=True, return_index=True, **paged)
    assert not torch.isnan(out).any()
    tol = dict(atol=2e-2, rtol=1.6e-2) if c["dtype"] == torch.bfloat16 else dict(atol=1e-2, rtol=1e-3)
    if index is not None:
        want_idx, energies = reference.build_index(q, k, cu_q, cu_k, mq, mk, scale, cfg, dense_tail=tail)
        assert_same_index(index, want_idx, energies, c["lens_q"], cfg.alpha, c["dtype"], c["lens_k"], config=cfg)
        assert_index_invariants(index, c["lens_q"], c["lens_k"], cfg.replace(num_dense_tail_blocks=0))
        _assert_dense_tails(index, c, cu_q, cu_k, cfg)
    want, want_lse = reference.sparse_attention(q, kc, vc, index, cu_q, None, scale, return_lse=True, **paged)
    torch.testing.assert_close(out.float(), want.float(), **tol)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-4)
    # The packed kernel on the same data and index reads the same keys.
    packed, _ = block_sparse_attn_varlen_func(q, k, v, index, cu_q, cu_k, mq, mk, scale, return_lse=True)
    torch.testing.assert_close(out.float(), packed.float(), **tol)
    if c["alpha"] == 1e-30 or index is None:
        dense = reference.sparse_attention(q, k, v, None, cu_q, cu_k, scale)
        torch.testing.assert_close(out.float(), dense.float(), **tol)


@pytest.mark.parametrize("page_size", [16, 256])
def test_chunked_prefill_over_paged_cache_matches_whole_prompt(page_size):
    """A 16K prompt in three block-aligned chunks (dense tail only on the last), each over the paged cache, keeps
    the blocks the whole prompt keeps in one call (up to near-threshold ties) and attends correctly."""
    L, cuts, bs = 16_000, [0, 6144, 12_288, 16_000], 128
    q, k, v, cu = synthetic.structured_qkv([L], 16, 4, 128, dtype=torch.bfloat16, device="cuda", block_size=bs)
    cfg = FlashPrefillConfig(block_size=bs, min_sparse_len=0)
    whole = flash_prefill_block_index(q, k, cu, cu, L, L, config=cfg)
    kc, vc, bt, _ = synthetic.to_paged(k, v, cu, page_size)
    for lo, hi in zip(cuts, cuts[1:]):
        cu_q, used = cu_from_lens([hi - lo], "cuda"), torch.tensor([hi], dtype=torch.int32, device="cuda")
        paged = dict(block_table=bt, seqused_k=used, dense_tail=torch.tensor([hi == L], device="cuda"))
        out, lse, index = flash_prefill_varlen_func(q[lo:hi], kc, vc, cu_q, None, hi - lo, hi, config=cfg,
                                                    return_lse=True, return_index=True, **paged)
        _, energies = reference.build_index(q[lo:hi], kc, cu_q, None, hi - lo, hi, 128 ** -0.5, cfg, **paged)
        r0, nq, nk = lo // bs, index.block_count.shape[2], index.block_index.shape[3]
        rows = BlockSparseIndex(whole.block_count[:, :, r0:r0 + nq], whole.block_index[:, :, r0:r0 + nq, :nk], bs,
                                whole.heads_per_index)
        assert_same_index(index, rows, energies, [hi - lo], cfg.alpha, torch.bfloat16, [hi], config=cfg)
        paged.pop("dense_tail")
        want, want_lse = reference.sparse_attention(q[lo:hi], kc, vc, index, cu_q, None, 128 ** -0.5,
                                                    return_lse=True, **paged)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=1.6e-2)
        torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-4)
