"""The FA4 route's glue on CPU (``ops/fa4_route.py``): when it runs, and that the rows, lengths, gathered pages and
block lists it hands to FA4 give the reference's output. FA4 itself is replaced by ``fake_fa4``, which reads the
block lists the way FA4's SM90 forward does (full blocks unmasked, masked blocks under the causal mask, nothing
else) and computes exact attention; the real kernel is checked against the Triton kernel in
``tests/gpu/test_fa4_route_gpu.py``."""

import pytest
import torch

from flashprefill_vllm.config import FlashPrefillConfig, env_kernel
from flashprefill_vllm.ops import fa4_route, flash_prefill_block_index, flash_prefill_varlen_func, reference
from flashprefill_vllm.ops.fa4_blocks import FA4BlockSparse, fa4_block_sparse, fa4_kept_mask
from flashprefill_vllm.ops.utils import gather_pages
from flashprefill_vllm.synthetic import structured_qkv

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the op's plain-torch reference on CPU
    monkeypatch.delenv("FLASHPREFILL_KERNEL", raising=False)


def fake_fa4(q, k, v, *, softmax_scale, causal, out, block_sparse_tensors):
    """Exact attention over the key blocks FA4 would visit (batched layout, batch 1), bottom-right causal."""
    assert causal and q.shape[0] == k.shape[0] == 1
    t = block_sparse_tensors
    _, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bs = t.block_size[0]
    assert t.full_block_cnt.shape[-1] == -(-lq // bs)          # FA4 wants exactly cdiv(seqlen_q, tile_m) tiles
    pos_q = torch.arange(lq)[:, None] + (lk - lq)
    causal_ok = torch.arange(lk)[None, :] <= pos_q
    for h in range(hq):
        blocks = fa4_kept_mask(t, 0, h, lq, lk)                  # (q tiles, k blocks)
        elem = blocks.repeat_interleave(bs, 0)[:lq].repeat_interleave(bs, 1)[:, :lk] & causal_ok
        s = (q[0, :, h].float() @ k[0, :, h // (hq // hkv)].float().T) * softmax_scale
        p = torch.softmax(s.masked_fill(~elem, float("-inf")), dim=-1).nan_to_num(0.0)
        out[0, :, h] = (p @ v[0, :, h // (hq // hkv)].float()).to(out.dtype)


@pytest.fixture
def fake_fa4_loaded(monkeypatch):
    monkeypatch.setattr(fa4_route, "load_fa4", lambda: (fake_fa4, FA4BlockSparse))


def _index(q, k, cu_q, cu_k, lq, lk, cfg, **paged):
    return flash_prefill_block_index(q, k, cu_q, cu_k, lq, lk, config=cfg, **paged)


@pytest.mark.parametrize("lq,lk,hq,hkv", [(1000, 1000, 4, 2), (300, 1000, 4, 1), (256, 1280, 2, 2)])
def test_packed_keys_give_the_reference_output(fake_fa4_loaded, lq, lk, hq, hkv):
    q, k, v, _ = structured_qkv([lk], hq, hkv, 64, dtype=torch.bfloat16, seed=lq + lk, block_size=128)
    q = q[lk - lq:]
    cfg = FlashPrefillConfig(alpha=0.3, tau=0.5, min_sparse_len=0)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32) for n in (lq, lk))
    index = _index(q, k, cu_q, cu_k, lq, lk, cfg)
    want = reference.sparse_attention(q, k, v, index, cu_q, cu_k, 0.125)
    out = torch.full_like(q, float("nan"))
    fa4_route.fa4_attend(q, k, v, index, cu_q, cu_k, (lq, lk), 0.125, out)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert 0 < index.block_count.sum() < hq * (-(-lq // 128)) * (-(-lk // 128))   # really sparse


def test_paged_keys_are_gathered_from_shuffled_pages(fake_fa4_loaded):
    lq, lk, page, hq, hkv, d = 200, 900, 16, 4, 2, 64
    q, k, v, _ = structured_qkv([lk], hq, hkv, d, dtype=torch.bfloat16, seed=5, block_size=128)
    q = q[lk - lq:]
    npg = -(-lk // page)
    perm = torch.randperm(npg + 7, generator=torch.Generator().manual_seed(0))[:npg]
    kc, vc = (torch.full((npg + 7, page, hkv, d), float("nan"), dtype=torch.bfloat16) for _ in range(2))
    pad = npg * page - lk
    kc[perm] = torch.cat([k, torch.zeros(pad, hkv, d, dtype=torch.bfloat16)]).view(npg, page, hkv, d)
    vc[perm] = torch.cat([v, torch.zeros(pad, hkv, d, dtype=torch.bfloat16)]).view(npg, page, hkv, d)
    table = torch.cat([perm, torch.full((5,), 10_000)]).int()[None]   # padding past the used pages: never read
    used = torch.tensor([lk], dtype=torch.int32)
    cu_q = torch.tensor([0, lq], dtype=torch.int32)
    cfg = FlashPrefillConfig(alpha=0.3, tau=0.5, min_sparse_len=0)
    index = _index(q, kc, cu_q, None, lq, lk, cfg, block_table=table, seqused_k=used)
    want = reference.sparse_attention(q, k, v, index, cu_q, torch.tensor([0, lk], dtype=torch.int32), 0.125)
    out = torch.empty_like(q)
    fa4_route.fa4_attend(q, kc, vc, index, cu_q, None, (lq, lk), 0.125, out, block_table=table, seqused_k=used)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_gather_pages_reads_only_the_pages_in_use():
    cache = torch.arange(6 * 4, dtype=torch.float32).view(6, 4, 1, 1)
    table = torch.tensor([[5, 0, 3, 99, -1]], dtype=torch.int32)
    got = gather_pages(cache, table[0], 10)
    assert got.shape == (10, 1, 1) and got.is_contiguous()
    assert got.flatten().tolist() == [20, 21, 22, 23, 0, 1, 2, 3, 12, 13]


def test_host_lengths_give_the_same_lists_as_the_device_lengths_and_are_checked():
    q, k, _, _ = structured_qkv([1000], 2, 1, 64, dtype=torch.bfloat16, seed=1, block_size=128)
    cu = torch.tensor([0, 1000], dtype=torch.int32)
    index = _index(q, k, cu, cu, 1000, 1280, FlashPrefillConfig(alpha=0.3, min_sparse_len=0))   # 10 key slots
    synced = fa4_block_sparse(index, cu, cu, 2, head_dim=64, varlen=False)
    host = fa4_block_sparse(index, cu, cu, 2, head_dim=64, varlen=False, host_lengths=(1000, 1000))
    assert index.block_index.shape[-1] == 10 and host.full_block_idx.shape[-1] == 8
    assert host.full_block_cnt.shape[-1] == 8 and synced.full_block_cnt.shape[-1] == 8
    for a, b in zip(host[:4], synced[:4]):
        assert torch.equal(a, b)
    short = fa4_block_sparse(index, cu, cu, 2, head_dim=64, varlen=False, host_lengths=(700, 1000))
    assert short.full_block_cnt.shape[-1] == 6 and torch.equal(short.full_block_cnt, synced.full_block_cnt[..., :6])
    with pytest.raises(ValueError, match="host_lengths"):
        fa4_block_sparse(index, cu, cu, 2, head_dim=64, varlen=False, host_lengths=(1000, 2000))


def test_where_the_route_runs(monkeypatch):
    monkeypatch.setattr(fa4_route, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4_route, "load_fa4", lambda: (fake_fa4, FA4BlockSparse))
    ok = dict(dtype=torch.bfloat16, head_dim=128, block_size=128)
    assert fa4_route.unavailable_reason(CUDA, **ok) is None
    assert fa4_route.unavailable_reason(CUDA, torch.bfloat16, 64, 128) is None
    assert "not a CUDA tensor" in fa4_route.unavailable_reason(torch.device("cpu"), **ok)
    assert "dtype torch.float32" in fa4_route.unavailable_reason(CUDA, torch.float32, 128, 128)
    assert "head_dim 256" in fa4_route.unavailable_reason(CUDA, torch.bfloat16, 256, 128)
    assert "64-token blocks" in fa4_route.unavailable_reason(CUDA, torch.bfloat16, 128, 64)
    monkeypatch.setattr(fa4_route, "_capability", lambda device: (10, 0))
    assert "compute capability 10.0" in fa4_route.unavailable_reason(CUDA, **ok)
    monkeypatch.setattr(fa4_route, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4_route, "load_fa4", lambda: "vllm.vllm_flash_attn.cute is not importable (X)")
    assert "not importable" in fa4_route.unavailable_reason(CUDA, **ok)
    monkeypatch.setenv("FLASHPREFILL_KERNEL", "Triton")
    assert fa4_route.unavailable_reason(CUDA, **ok) == "FLASHPREFILL_KERNEL=triton"


def test_kernel_variable_is_checked(monkeypatch):
    assert env_kernel({}) == "auto" and env_kernel({"FLASHPREFILL_KERNEL": " FA4 "}) == "fa4"
    with pytest.raises(ValueError, match=r"FLASHPREFILL_KERNEL='cuda': must be auto, fa4 or triton"):
        env_kernel({"FLASHPREFILL_KERNEL": "cuda"})


def test_the_fallback_is_logged_once_and_warns_when_fa4_was_asked(monkeypatch, caplog):
    monkeypatch.setattr(fa4_route, "_noted", set())
    monkeypatch.setenv("FLASHPREFILL_KERNEL", "fa4")
    with caplog.at_level("INFO", logger=fa4_route.logger.name):
        fa4_route.note_triton("compute capability 8.0: x")
        fa4_route.note_triton("compute capability 8.0: x")
    recs = [r for r in caplog.records if "Triton kernel, not FA4" in r.getMessage()]
    assert len(recs) == 1 and recs[0].levelname == "WARNING" and "asked for it" in recs[0].getMessage()


@pytest.mark.parametrize("bad,match", [((1, 2, 3), "pair of ints"), ((1.0, 2), "pair of ints"),
                                       ((600, 500), "0 < seqlen_q <= seqlen_k"), ((0, 500), "0 < seqlen_q"),
                                       ((500, 600), "exceeds")])
def test_seqlens_host_is_checked(bad, match):
    q, k, v, _ = structured_qkv([500], 2, 1, 64, dtype=torch.bfloat16, seed=2, block_size=128)
    cu = torch.tensor([0, 500], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        flash_prefill_varlen_func(q, k, v, cu, cu, 500, 500, seqlens_host=bad)


def test_seqlens_host_needs_one_sequence():
    q, k, v, _ = structured_qkv([300, 200], 2, 1, 64, dtype=torch.bfloat16, seed=3, block_size=128)
    cu = torch.tensor([0, 300, 500], dtype=torch.int32)
    with pytest.raises(ValueError, match="one sequence"):
        flash_prefill_varlen_func(q, k, v, cu, cu, 300, 300, seqlens_host=(300, 300))


def test_on_cpu_seqlens_host_changes_nothing():
    q, k, v, _ = structured_qkv([700], 2, 1, 64, dtype=torch.bfloat16, seed=4, block_size=128)
    cu = torch.tensor([0, 700], dtype=torch.int32)
    a = flash_prefill_varlen_func(q, k, v, cu, cu, 700, 700, min_sparse_len=0)
    b = flash_prefill_varlen_func(q, k, v, cu, cu, 700, 700, min_sparse_len=0, seqlens_host=(700, 700))
    assert torch.equal(a, b)
