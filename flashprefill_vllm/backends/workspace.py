"""The op's memory and compile cost moved to engine start: its worst-case workspace reserved in vLLM's memory
profiling run (so the KV cache is sized with it), and its Triton kernels compiled once per layer shape after weight
loading. No vLLM import: the version impls mix :class:`KernelWorkspace` in.
"""

from __future__ import annotations

import logging
import time

import torch

from ..config import FlashPrefillConfig
from ..ops import SUPPORTED_DTYPES, fa4_route, flash_prefill_varlen_func
from ..ops.utils import cdiv
from .eligibility import Settings


def index_workspace_bytes(num_tokens: int, max_seq_len: int, num_heads: int, num_kv_heads: int, head_size: int,
                          itemsize: int, config: FlashPrefillConfig) -> int:
    """Upper bound on the memory the op allocates in one call (one sparse request) when a step holds ``num_tokens``
    new rows and a sequence is at most ``max_seq_len`` long: the index (``num_index_heads x nq x nk`` int32 plus
    counts, ``nq`` from the new rows, ``nk`` from the whole sequence) and the pooled keys."""
    bs = config.block_size
    heads = num_kv_heads if config.gqa_shared_index else num_heads
    nq = cdiv(num_tokens, bs)
    nk = cdiv(max(max_seq_len, num_tokens), bs)
    return heads * nq * (nk + 1) * 4 + num_kv_heads * nk * head_size * itemsize


logger = logging.getLogger(__name__)
_warmed_up: set[tuple] = set()


class KernelWorkspace:
    """Impl mixin (after :class:`eligibility.LayerEligibility`, whose ``fp_settings`` / ``fp_stock_reason`` /
    ``fp_max_seq_len`` it reads, and FlashAttention's ``num_heads`` / ``num_kv_heads`` / ``head_size`` / ``scale``)."""

    fp_settings: Settings
    fp_stock_reason: str | None

    def _fp_reserve_profile_workspace(self, query: torch.Tensor) -> int:
        """During vLLM's memory-profiling run (attention metadata ``None``), allocate and free the op's worst-case
        workspace for a step of ``query``'s rows, so the peak that sizes the KV cache includes it. Steps shorter
        than the length gate never run sparse and reserve nothing. Returns the bytes reserved."""
        config = self.fp_settings.config
        num_tokens = query.shape[0]
        if self.fp_stock_reason is not None or num_tokens < config.min_sparse_len:
            return 0
        nbytes = index_workspace_bytes(num_tokens, getattr(self, "fp_max_seq_len", num_tokens), self.num_heads,
                                       self.num_kv_heads, self.head_size, query.element_size(), config)
        if nbytes:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=query.device)
            del workspace
        return nbytes

    def _fp_warm_up_kernels(self, dtype: torch.dtype) -> None:
        """Compile the op's Triton kernels for this layer's shape at engine start (after weight loading) instead of
        during the first long request: one small sparse call on q/k/v views of a fused QKV buffer, as vLLM passes
        them, with the request's lengths on the host as the serving path passes them, so FA4's block-sparse kernel
        is compiled too where it runs; then a chunk over a small paged cache of the KV cache's page size (the
        selection and attention kernels have paged variants). Once per process and (heads, kv heads, head size,
        dtype, block size, GQA mode, page size); logs which kernel the sparse attention runs on."""
        config = self.fp_settings.config
        if self.fp_stock_reason is not None or not torch.cuda.is_available() or dtype not in SUPPORTED_DTYPES:
            return
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_size
        page = int(getattr(self, "fp_kv_page_size", 0) or 0)
        key = (hq, hkv, d, dtype, config.block_size, config.gqa_shared_index, page)
        if key in _warmed_up:
            return
        _warmed_up.add(key)
        dev = torch.device("cuda", torch.cuda.current_device())
        t0 = time.perf_counter()
        warm_up_op(hq, hkv, d, self.scale, dtype, config, page, dev)
        torch.cuda.synchronize()
        bs = config.block_size
        reason = fa4_route.unavailable_reason(dev, dtype, d, bs)
        logger.info("FlashPrefill: sparse attention for %d query / %d KV heads of %d (%s) runs on %s; kernels "
                    "compiled in %.1f s", hq, hkv, d, dtype, "the Triton kernel" if reason else
                    "FA4 (vLLM's CuTe-DSL FlashAttention-4 block-sparse forward; paged keys gathered first)",
                    time.perf_counter() - t0)


def warm_up_op(hq: int, hkv: int, d: int, scale: float, dtype: torch.dtype, config: FlashPrefillConfig,
               page_size: int, device: torch.device) -> None:
    """One small sparse call of every kind a serving step makes, on q/k/v views of a fused QKV buffer as vLLM
    passes them, with the request's lengths on the host: a fresh prompt, and (``page_size > 0``) a chunk over
    cached context in a paged cache of ``page_size``-token pages."""
    bs = config.block_size
    tokens = 4 * bs
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d)
    out = torch.empty(tokens, hq * d, dtype=dtype, device=device).view(tokens, hq, d)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    cfg = config.replace(min_sparse_len=0)
    flash_prefill_varlen_func(q, k, v, cu, cu, tokens, tokens, softmax_scale=scale, config=cfg, out=out,
                              seqlens_host=(tokens, tokens))
    if page_size > 0:
        pages = cdiv(tokens, page_size)
        kc, vc = (torch.randn(pages, page_size, hkv, d, dtype=dtype, device=device) for _ in range(2))
        table = torch.arange(pages, dtype=torch.int32, device=device)[None]
        used = torch.tensor([tokens], dtype=torch.int32, device=device)
        cu_q = torch.tensor([0, bs], dtype=torch.int32, device=device)
        flash_prefill_varlen_func(q[-bs:], kc, vc, cu_q, None, bs, tokens, softmax_scale=scale, config=cfg,
                                  out=out[-bs:], block_table=table, seqused_k=used, seqlens_host=(bs, tokens))
