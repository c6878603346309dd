"""One scheduler step on the CPU, in the shapes vLLM 0.10 / 0.12's V1 FlashAttention sees, and its dense answer.

Per request (``Req``): the whole sequence's K/V and the query of its ``query_len`` new tokens, drawn at random. The
paged cache ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (NaN where nothing was written) holds each
request's context in shuffled blocks; the step's ``query``/``key``/``value`` are strided views of one fused QKV buffer
padded past the real tokens (as with piecewise CUDA graphs), and ``output`` starts as NaN.

    |---------------- seq_len ----------------|
    |------ context_len ------|-- query_len --|   context in the cache; the step brings query_len new tokens
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import torch
from torch_flash import dense_attention, reshape_and_cache_flash


@dataclasses.dataclass(frozen=True)
class Req:
    id: str
    context_len: int
    query_len: int

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


class FakeInputBatch:
    """The two things vLLM's reorder helpers use of ``InputBatch``: ids in batch order, computed tokens, swaps."""

    def __init__(self, reqs: list[Req]):
        self.req_ids = [r.id for r in reqs]
        self.num_computed_tokens_cpu = np.array([r.context_len for r in reqs], dtype=np.int32)

    def swap_states(self, i: int, j: int) -> None:
        self.req_ids[i], self.req_ids[j] = self.req_ids[j], self.req_ids[i]
        c = self.num_computed_tokens_cpu
        c[i], c[j] = c[j], c[i]


def scheduler_output(reqs: list[Req]):
    return types.SimpleNamespace(num_scheduled_tokens={r.id: r.query_len for r in reqs})


class Step:
    def __init__(self, reqs: list[Req], *, num_heads=2, num_kv_heads=1, head_size=64, block_size=16,
                 dtype=torch.float16, pad=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.reqs, self.block_size, self.dtype = list(reqs), block_size, dtype
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = head_size ** -0.5
        self.k_full = {r.id: torch.randn(r.seq_len, num_kv_heads, head_size, generator=g).to(dtype) for r in reqs}
        self.v_full = {r.id: torch.randn(r.seq_len, num_kv_heads, head_size, generator=g).to(dtype) for r in reqs}
        self.q_new = {r.id: torch.randn(r.query_len, num_heads, head_size, generator=g).to(dtype) for r in reqs}
        blocks_per_req = [-(-r.seq_len // block_size) for r in reqs]
        num_blocks = sum(blocks_per_req) + 3
        ids = torch.randperm(num_blocks, generator=g).tolist()  # shuffled blocks, a few never used
        self.blocks = {}
        for r, n in zip(reqs, blocks_per_req):
            self.blocks[r.id], ids = ids[:n], ids[n:]
        self.kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), float("nan"), dtype=dtype)
        for r in reqs:
            if r.context_len:
                reshape_and_cache_flash(self.k_full[r.id][:r.context_len], self.v_full[r.id][:r.context_len],
                                        self.kv_cache[0], self.kv_cache[1], self.slots(r, 0, r.context_len), "auto",
                                        None, None)

    def slots(self, r: Req, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(self.blocks[r.id])
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def batch(self, order: list[str], cam_cls, pad: int = 5):
        """The step's tensors with requests in ``order``: ``(cam, query, key, value, output)`` where ``cam`` is the
        version's real ``CommonAttentionMetadata`` (only the fields that version has are passed)."""
        reqs = [next(r for r in self.reqs if r.id == i) for i in order]
        self.order = reqs
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_size
        n = sum(r.query_len for r in reqs)
        qkv = torch.full((n + pad, (h + 2 * hkv) * d), float("nan"), dtype=self.dtype)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        query, key, value = q.view(-1, h, d), k.view(-1, hkv, d), v.view(-1, hkv, d)
        row = 0
        for r in reqs:
            query[row:row + r.query_len] = self.q_new[r.id]
            key[row:row + r.query_len] = self.k_full[r.id][r.context_len:]
            value[row:row + r.query_len] = self.v_full[r.id][r.context_len:]
            row += r.query_len
        qsl = torch.tensor([0] + np.cumsum([r.query_len for r in reqs]).tolist(), dtype=torch.int32)
        seq_lens = torch.tensor([r.seq_len for r in reqs], dtype=torch.int32)
        width = max(len(self.blocks[r.id]) for r in reqs)
        block_table = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, r in enumerate(reqs):
            block_table[i, :len(self.blocks[r.id])] = torch.tensor(self.blocks[r.id])
        slot_mapping = torch.cat([self.slots(r, r.context_len, r.seq_len) for r in reqs])
        fields = dict(query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq_lens,
                      seq_lens_cpu=seq_lens.clone(),
                      num_computed_tokens_cpu=torch.tensor([r.context_len for r in reqs], dtype=torch.int32),
                      num_reqs=len(reqs), num_actual_tokens=n, max_query_len=max(r.query_len for r in reqs),
                      max_seq_len=max(r.seq_len for r in reqs), block_table_tensor=block_table,
                      slot_mapping=slot_mapping, causal=True)
        names = {f.name for f in dataclasses.fields(cam_cls)}
        cam = cam_cls(**{k: v for k, v in fields.items() if k in names})
        output = torch.full((n + pad, h, d), float("nan"), dtype=self.dtype)
        return cam, query, key, value, output

    def expected(self) -> torch.Tensor:
        """Dense causal attention of each request's new tokens over its whole sequence, in batch order."""
        return torch.cat([dense_attention(self.q_new[r.id], self.k_full[r.id], self.v_full[r.id], self.scale)
                          for r in self.order]).to(self.dtype)

    def cached(self, r: Req) -> tuple[torch.Tensor, torch.Tensor]:
        """What the paged cache holds for request ``r``'s positions ``[0, seq_len)``."""
        s = self.slots(r, 0, r.seq_len)
        flat = self.kv_cache.flatten(1, 2)                                  # [2, num_blocks * block_size, Hkv, D]
        return flat[0, s], flat[1, s]


class Layer(torch.nn.Module):
    """What ``FlashAttentionImpl.forward`` reads of its ``Attention`` layer: the unit scales and the name."""

    def __init__(self, name="model.layers.1.self_attn.attn"):
        super().__init__()
        self.layer_name = name
        self._q_scale = self._k_scale = self._v_scale = torch.tensor(1.0)


def vllm_config(step: Step, max_num_seqs: int = 16):
    """The parts of ``VllmConfig`` the FlashAttention builders of 0.10 and 0.12 read (FA2, no CUDA graphs, no CP)."""
    ns = types.SimpleNamespace
    return ns(model_config=ns(get_num_attention_heads=lambda p: step.num_heads,
                              get_num_kv_heads=lambda p: step.num_kv_heads, get_head_size=lambda: step.head_size),
              parallel_config=ns(cp_kv_cache_interleave_size=1, decode_context_parallel_size=1),
              cache_config=ns(cache_dtype="auto"), scheduler_config=ns(max_num_seqs=max_num_seqs),
              compilation_config=ns(full_cuda_graph=False, cudagraph_capture_sizes=[], max_cudagraph_capture_size=0,
                                    cudagraph_mode=ns(has_full_cudagraphs=lambda: False)),
              speculative_config=None)
