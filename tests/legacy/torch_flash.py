"""Plain-torch stand-ins for the two CUDA ops vLLM 0.10/0.12's FlashAttention impl calls, so that the real
``FlashAttentionImpl.forward`` (and ours on top of it) runs on the CPU.

- :func:`reshape_and_cache_flash`: ``vllm._custom_ops.reshape_and_cache_flash`` for the NHD cache
  ``[num_blocks, block_size, num_kv_heads, head_size]`` per K and V, unquantized.
- :func:`flash_attn_varlen_func`: ``vllm.vllm_flash_attn.flash_attn_varlen_func`` over a paged cache
  (``block_table`` + ``seqused_k``), causal aligned bottom-right, fp32 inside, GQA; only the features the tests use
  (no window, soft-cap, ALiBi, sinks or FP8), each refused if asked for.

Every call is appended to :data:`CALLS` (the keyword arguments), so tests can see what stock FlashAttention got.
"""

from __future__ import annotations

import torch

CALLS: list[dict] = []


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    assert kv_cache_dtype == "auto", kv_cache_dtype
    n = slot_mapping.shape[0]  # like the CUDA op: key/value may be padded, slot_mapping is not
    slots = slot_mapping.long()
    keep = slots >= 0
    block_size = key_cache.shape[1]
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    key_cache[blocks, offsets] = key[:n][keep]
    value_cache[blocks, offsets] = value[:n][keep]


def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None,
                           softmax_scale=None, causal=False, window_size=None, softcap=0.0, alibi_slopes=None,
                           block_table=None, out=None, return_softmax_lse=False, s_aux=None, **kwargs):
    CALLS.append(dict(q=q, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
                      max_seqlen_k=max_seqlen_k, causal=causal, block_table=block_table, out=out, **kwargs))
    assert block_table is not None and seqused_k is not None and cu_seqlens_k is None, "paged KV only"
    assert window_size is None or tuple(window_size) == (-1, -1), window_size
    assert not softcap and alibi_slopes is None and s_aux is None
    assert not return_softmax_lse
    block_size = k.shape[1]
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        seq_len = int(seqused_k[i])
        if qe == qs:
            continue
        blocks = block_table[i, :(seq_len + block_size - 1) // block_size].long()
        keys = k[blocks].flatten(0, 1)[:seq_len]                     # [seq_len, Hkv, D]
        vals = v[blocks].flatten(0, 1)[:seq_len]
        out[qs:qe] = dense_attention(q[qs:qe], keys, vals, softmax_scale, causal).to(out.dtype)
    return out


def dense_attention(q, k, v, scale, causal=True):
    """Causal attention of ``q`` [Lq, H, D] over ``k``/``v`` [Lk, Hkv, D], bottom-right aligned, in fp32."""
    lq, lk, groups = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
