"""Synthetic Q/K/V with attention structure, for tests, benchmarks and the CPU demo.

Random Gaussian Q/K give near-uniform attention, where any sensible selection keeps almost everything. These
inputs plant what real long-context attention shows: a heavy sink at the start, a local (diagonal) bias, and a
few far-away key blocks that some query rows attend to strongly.
"""

from __future__ import annotations

import math

import torch

from .ops.utils import cdiv


def structured_qkv(seqlens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0,
                   num_planted: int = 4, block_size: int = 128):
    """Packed ``(q, k, v, cu_seqlens)`` for self-attention over ``seqlens`` (q_len == k_len per sequence).

    Per KV head: keys carry a smooth positional code (sum of sinusoids over a few frequencies), so nearby
    query/key pairs align (local bias); the first block's keys carry a direction every query shares (sink); and
    ``num_planted`` random key blocks carry a private direction that queries in a later span share (planted
    far blocks). Magnitudes are set against ``head_dim ** -0.5`` so the softmax is peaked, not uniform.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(seqlens)
    group = num_heads // num_kv_heads
    q = torch.randn(total, num_heads, head_dim, generator=g) * 0.5
    k = torch.randn(total, num_kv_heads, head_dim, generator=g) * 0.5
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    scale = math.sqrt(head_dim)
    n_freq = head_dim // 4
    start = 0
    for L in seqlens:
        if L == 0:
            continue
        pos = torch.arange(L, dtype=torch.float32)
        for h in range(num_kv_heads):
            freqs = torch.exp(torch.empty(n_freq).uniform_(math.log(1e-4), math.log(0.05), generator=g))
            ang = pos[:, None] * freqs[None, :]
            code = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)                        # (L, 2*n_freq)
            proj = torch.randn(2 * n_freq, head_dim, generator=g) / math.sqrt(2 * n_freq)
            loc = code @ proj * 1.5
            sink_dir = torch.randn(head_dim, generator=g)
            sink_dir /= sink_dir.norm()
            k[start:start + L, h] += loc
            k[start:start + min(L, block_size), h] += sink_dir * 2.0
            qh = slice(h * group, (h + 1) * group)
            q[start:start + L, qh] += (loc * 1.5)[:, None, :] + (sink_dir * 1.0)[None, None, :]
            n_blocks = cdiv(L, block_size)
            for _ in range(num_planted if n_blocks > 8 else 0):
                j = int(torch.randint(1, n_blocks - 4, (1,), generator=g))
                d = torch.randn(head_dim, generator=g)
                d /= d.norm()
                k[start + j * block_size: start + min(L, (j + 1) * block_size), h] += d * 2.0
                r0 = int(torch.randint((j + 2) * block_size, L, (1,), generator=g))
                r1 = min(L, r0 + 4 * block_size)
                q[start + r0: start + r1, qh] += d * 3.0
        start += L
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()), dtype=torch.int32)
    # Keys are scaled up so s * q.k has a spread of several nats (peaked attention at softmax_scale d**-0.5).
    k = k * (scale ** 0.5) / 2
    q = q * (scale ** 0.5) / 2
    return (q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device), cu.to(device))


def to_paged(k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor, page_size: int, seed: int = 0,
             head_major: bool = False):
    """Packed K/V ``(total_k, H, D)`` moved into paged caches the way vLLM holds them, for tests and benchmarks.

    Returns ``(key_cache, value_cache, block_table, seqused_k)``. The caches are the two halves of one buffer
    ``(2, num_pages, page_size, H, D)`` (vLLM's FlashAttention layout) or, with ``head_major``, transposed views of a
    ``(2, num_pages, H, page_size, D)`` buffer (strides not in shape order); either way ``(num_pages, page_size, H,
    D)`` views at an offset into the buffer. Pages 1.. are handed out in random order; page 0 is the spare page the
    table rows are padded with (as vLLM's null block). Every slot that holds no key (page 0, the rest of a sequence's
    last page) is NaN, so a kernel that reads a key it should not produces NaN.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().cpu()
    n_pages = -(-lens // page_size)   # element-wise on a tensor of lengths
    total_pages = int(n_pages.sum()) + 1
    perm = torch.randperm(total_pages - 1, generator=g) + 1
    width = int(n_pages.max()) + 1 if lens.numel() else 1
    block_table = torch.zeros(lens.numel(), width, dtype=torch.int32)
    block_table[torch.arange(width)[None, :] < n_pages[:, None]] = perm.to(torch.int32)
    _, hkv, d = k.shape
    shape = (2, total_pages, hkv, page_size, d) if head_major else (2, total_pages, page_size, hkv, d)
    kv_cache = torch.full(shape, float("nan"), dtype=k.dtype, device=k.device)
    if head_major:
        kv_cache = kv_cache.transpose(2, 3)
    key_cache, value_cache = kv_cache.unbind(0)
    seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    pos = torch.arange(int(lens.sum())) - torch.repeat_interleave(cu_seqlens_k[:-1].long().cpu(), lens)
    page = block_table[seq, pos // page_size].long().to(k.device)
    key_cache[page, (pos % page_size).to(k.device)] = k
    value_cache[page, (pos % page_size).to(k.device)] = v
    return key_cache, value_cache, block_table.to(k.device), lens.to(torch.int32).to(k.device)
