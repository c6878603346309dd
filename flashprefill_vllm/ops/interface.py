"""Public ops: defaults, validation, output allocation. FlashAttention's varlen names and shapes.

On CUDA tensors the ops run the Triton kernels. On CPU tensors they run the plain-torch reference
(``ops/reference.py``), or the Triton kernels under the interpreter when ``TRITON_INTERPRET=1`` is set
before ``triton`` is imported (slow; for tests on small shapes).
"""

from __future__ import annotations

import os

import torch

from ..config import ALLOWED_BLOCK_SIZES, FlashPrefillConfig
from . import reference
from .block_sparse_index import BlockSparseIndex, block_density

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

__all__ = ["flash_prefill_varlen_func", "flash_prefill_block_index", "block_sparse_attn_varlen_func",
           "BlockSparseIndex", "block_density", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _describe(t) -> str:
    return (f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
            else type(t).__name__)


def _stride_note(t) -> str:
    return (f" with strides {t.stride()} (the kernels read it with unit stride: pass .contiguous())"
            if isinstance(t, torch.Tensor) and not t.is_contiguous() else "")


def _check_int_vector(name: str, t, length: int, device: torch.device, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32 or t.numel() != length \
            or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D int32 tensor of length {length} ({what}); got "
                         f"{_describe(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")


def _check_paged(k, cu_seqlens_k, block_table, seqused_k, batch: int, device: torch.device) -> None:
    """``block_table`` given: k/v are paged caches, key counts come from ``seqused_k``."""
    if cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_k must be None when block_table is given (paged K/V: the key counts come from "
                         f"seqused_k); got {_describe(cu_seqlens_k)}")
    if seqused_k is None:
        raise ValueError("seqused_k is required when block_table is given: int32 (batch,) key counts per sequence "
                         "(cached context + new tokens)")
    _check_int_vector("seqused_k", seqused_k, batch, device, "batch = cu_seqlens_q.numel() - 1 key counts")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32 \
            or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be a 2-D int32 tensor (batch={batch}, max_pages_per_seq) of page ids; "
                         f"got {_describe(block_table)}")
    if block_table.stride(-1) != 1:
        raise ValueError(f"block_table must have unit stride in its last dimension; got strides "
                         f"{block_table.stride()}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on {device}; got {block_table.device}")
    if k.shape[1] < 1:
        raise ValueError(f"page_size (k.shape[1]) must be positive; got k of shape {tuple(k.shape)}")


def _check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               block_table=None, seqused_k=None):
    paged = block_table is not None
    layouts = {"q": "(tokens, heads, head_dim)"}
    layouts["k"] = layouts["v"] = ("(num_pages, page_size, num_kv_heads, head_dim) paged cache, as block_table is "
                                   "given" if paged else "(tokens, heads, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        dims = 4 if paged and name != "q" else 3
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D tensor {layouts[name]}; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of (torch.float16, torch.bfloat16); got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension; got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}; got {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim; got {q.shape[2]} and {k.shape[-1]}")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}; got {q.shape[2]}")
    if k.shape[-2] == 0 or q.shape[1] % k.shape[-2] != 0:
        raise ValueError(f"num_heads of q ({q.shape[1]}) must be a multiple of num_heads of k/v ({k.shape[-2]})")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.dtype != torch.int32 \
            or cu_seqlens_q.numel() < 1 or not cu_seqlens_q.is_contiguous():
        raise ValueError(f"cu_seqlens_q must be a contiguous 1-D int32 tensor of length batch + 1; got "
                         f"{_describe(cu_seqlens_q)}{_stride_note(cu_seqlens_q)}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q must be on {q.device}; got {cu_seqlens_q.device}")
    if paged:
        _check_paged(k, cu_seqlens_k, block_table, seqused_k, cu_seqlens_q.numel() - 1, q.device)
    else:
        if seqused_k is not None:
            raise ValueError("seqused_k is only supported together with block_table (paged K/V); packed K/V take "
                             "their lengths from cu_seqlens_k")
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1 \
                or cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.numel() < 1 or not cu_seqlens_k.is_contiguous():
            raise ValueError(f"cu_seqlens_k must be a contiguous 1-D int32 tensor of length batch + 1 (or None with "
                             f"block_table and seqused_k); got {_describe(cu_seqlens_k)}{_stride_note(cu_seqlens_k)}")
        if cu_seqlens_k.device != q.device:
            raise ValueError(f"cu_seqlens_k must be on {q.device}; got {cu_seqlens_k.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length; got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int; got {val!r}")
    if max_seqlen_q > max_seqlen_k:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) must not exceed max_seqlen_k ({max_seqlen_k}): queries "
                         "are the last seqlen_q positions of each sequence (bottom-right causal alignment)")
    if softmax_scale is None:
        softmax_scale = q.shape[2] ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0 \
            or softmax_scale == float("inf"):
        raise ValueError(f"softmax_scale must be a positive finite number or None; got {softmax_scale!r}")
    if causal is not True:
        raise NotImplementedError("flash_prefill supports causal attention only (causal=True); run non-causal "
                                  "attention densely")
    return float(softmax_scale)


def _check_dense_tail(dense_tail, cu_seqlens_q: torch.Tensor) -> None:
    batch = cu_seqlens_q.numel() - 1
    if dense_tail is None:
        return
    if not isinstance(dense_tail, torch.Tensor) or dense_tail.dim() != 1 or dense_tail.dtype != torch.bool \
            or dense_tail.numel() != batch or not dense_tail.is_contiguous():
        raise ValueError(f"dense_tail must be None or a contiguous 1-D torch.bool tensor of length {batch} (one flag "
                         f"per sequence); got {_describe(dense_tail)}")
    if dense_tail.device != cu_seqlens_q.device:
        raise ValueError(f"dense_tail must be on {cu_seqlens_q.device}; got {dense_tail.device}")


def _resolve_config(config: FlashPrefillConfig | None, **knobs) -> FlashPrefillConfig:
    if config is not None and not isinstance(config, FlashPrefillConfig):
        raise ValueError(f"config must be a FlashPrefillConfig or None; got {type(config).__name__}")
    return (config or FlashPrefillConfig()).replace(**knobs)


def _check_seqlens_host(seqlens_host, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, paged: bool) -> None:
    """``seqlens_host``: ``None`` or the lengths ``(seqlen_q, seqlen_k)`` of a one-sequence batch, as Python ints."""
    if seqlens_host is None:
        return
    if not (isinstance(seqlens_host, (tuple, list)) and len(seqlens_host) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in seqlens_host)):
        raise ValueError(f"seqlens_host must be None or a pair of ints (seqlen_q, seqlen_k); got {seqlens_host!r}")
    lq, lk = seqlens_host
    if cu_seqlens_q.numel() != 2:
        raise ValueError(f"seqlens_host is for a batch of one sequence; cu_seqlens_q holds "
                         f"{cu_seqlens_q.numel() - 1}")
    if not 0 < lq <= lk:
        raise ValueError(f"seqlens_host {tuple(seqlens_host)}: need 0 < seqlen_q <= seqlen_k")
    if lq > min(max_seqlen_q, q.shape[0]) or lk > max_seqlen_k or (not paged and lk > k.shape[0]):
        raise ValueError(f"seqlens_host {tuple(seqlens_host)} exceeds max_seqlen_q={max_seqlen_q} / "
                         f"max_seqlen_k={max_seqlen_k} or the rows of q ({q.shape[0]})"
                         + ("" if paged else f" / k ({k.shape[0]})"))


def _alloc_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}; got "
                         f"{(out.dtype, tuple(out.shape), out.device) if isinstance(out, torch.Tensor) else out!r}")
    if out.stride(-1) != 1:
        raise ValueError(f"out must have unit stride in its last dimension; got strides {out.stride()}")
    return out


def flash_prefill_block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                              *, block_table=None, seqused_k=None, dense_tail=None,
                              config: FlashPrefillConfig | None = None, **knobs) -> BlockSparseIndex:
    """Selection only: the kept key blocks of every (index head, sequence, query block). See ``BlockSparseIndex``.

    Arguments as in ``flash_prefill_varlen_func`` (``k`` alone: no values are read). ``knobs`` are
    ``FlashPrefillConfig`` fields (``alpha``, ``block_size``, ...) overriding ``config``.
    """
    scale = _check_qkv(q, k, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, True,
                       block_table, seqused_k)
    _check_dense_tail(dense_tail, cu_seqlens_q)
    return _block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                        _resolve_config(config, **knobs), block_table=block_table, seqused_k=seqused_k,
                        dense_tail=dense_tail)


def _block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale: float,
                 cfg: FlashPrefillConfig, **paged) -> BlockSparseIndex:
    """``flash_prefill_block_index`` on checked arguments (``paged``: block_table, seqused_k, dense_tail)."""
    if _use_triton(q):
        from .index import build_block_index
        return build_block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, cfg, **paged)
    return reference.build_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, cfg,
                                 **paged)[0]


def block_sparse_attn_varlen_func(q, k, v, block_index: BlockSparseIndex | None, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True, *, block_table=None,
                                  seqused_k=None, out=None, return_lse=False, seqlens_host=None):
    """Causal attention over the key blocks listed in ``block_index`` (``None``: every visible block, i.e. dense).

    Arguments as in ``flash_prefill_varlen_func`` (packed or paged K/V). The index must list, for each query
    block, the local blocks from the block of its first row's position through the block of its last row's
    position (indices from ``flash_prefill_block_index`` always do).
    """
    scale = _check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       block_table, seqused_k)
    _check_seqlens_host(seqlens_host, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table is not None)
    if block_index is not None:
        if not isinstance(block_index, BlockSparseIndex):
            raise ValueError(f"block_index must be a BlockSparseIndex or None; got {type(block_index).__name__}")
        if block_index.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_index.block_size must be one of {ALLOWED_BLOCK_SIZES}; got "
                             f"{block_index.block_size}")
        hpi = block_index.heads_per_index
        if hpi not in (1, q.shape[1] // k.shape[-2]) or block_index.block_count.shape[0] * hpi != q.shape[1]:
            raise ValueError(f"block_index has {block_index.block_count.shape[0]} index heads of {hpi} query heads; "
                             f"q has {q.shape[1]} heads and k {k.shape[-2]}")
    return _attend(q, k, v, block_index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, _alloc_out(q, out),
                   return_lse, seqlens_host, block_table=block_table, seqused_k=seqused_k)


def _attend(q, k, v, block_index: BlockSparseIndex | None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale: float,
            out: torch.Tensor, return_lse: bool, seqlens_host=None, **paged):
    """``block_sparse_attn_varlen_func`` on checked arguments into ``out`` (``paged``: block_table, seqused_k).
    A one-sequence call with ``seqlens_host`` and an index runs on FA4 where it can (``fa4_route``)."""
    # Without an index the attention walks every visible block, in tiles of the default block size.
    block_size = block_index.block_size if block_index is not None else FlashPrefillConfig.block_size
    if seqlens_host is not None and block_index is not None and not return_lse and q.is_cuda:
        from . import fa4_route
        reason = fa4_route.unavailable_reason(q.device, q.dtype, q.shape[-1], block_size)
        if reason is None:
            fa4_route.fa4_attend(q, k, v, block_index, cu_seqlens_q, cu_seqlens_k, tuple(seqlens_host), scale, out,
                                 **paged)
            return out
        fa4_route.note_triton(reason)
    if _use_triton(q):
        from .attention import sparse_attention
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
        sparse_attention(q, k, v, block_index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, out, lse, block_size,
                         **paged)
    else:
        res, lse = reference.sparse_attention(q, k, v, block_index, cu_seqlens_q, cu_seqlens_k, scale,
                                              return_lse=True, **paged)
        out.copy_(res)
    return (out, lse) if return_lse else out


def flash_prefill_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                              causal=True, *, block_table=None, seqused_k=None, dense_tail=None, alpha=None,
                              tau=None, block_size=None, num_sink_blocks=None, num_local_blocks=None,
                              num_dense_tail_blocks=None, min_sparse_len=None, gqa_shared_index=None,
                              config: FlashPrefillConfig | None = None, out=None, return_lse=False,
                              return_index=False, seqlens_host=None):
    """Sparse-prefill causal attention over a packed varlen batch.

    Args:
        q: ``(total_q, num_heads, head_dim)``; k, v: ``(total_k, num_kv_heads, head_dim)``. fp16 or bf16,
            head_dim 64/128/256, any strides with a unit last stride (views into a fused QKV buffer are fine).
            Query head ``h`` uses KV head ``h // (num_heads // num_kv_heads)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` prefix sums of the lengths.
        max_seqlen_q, max_seqlen_k: Python ints bounding the lengths (they size the grid; no host sync).
        softmax_scale: the model's scale; ``None`` means ``head_dim ** -0.5``.
        causal: must be True. When ``seqlen_q < seqlen_k`` the queries are the last ``seqlen_q`` positions
            (bottom-right alignment, as in FlashAttention): query row p sees keys ``<= seqlen_k - seqlen_q + p``.
        block_table, seqused_k: paged K/V, as in FlashAttention's varlen API. With ``block_table`` (int32
            ``(batch, max_pages_per_seq)`` page ids, unit last stride), k and v are the paged caches
            ``(num_pages, page_size, num_kv_heads, head_dim)`` (any strides with a unit last one, any
            ``page_size >= 1``), ``cu_seqlens_k`` must be None and ``seqused_k`` (int32 ``(batch,)``) gives each
            sequence's key count (cached context + new tokens, already written to the cache). Key t of sequence
            b is slot ``t % page_size`` of page ``block_table[b, t // page_size]``. Not checked on the device (that
            would synchronise): ``seqlen_q <= seqused_k[b] <= max_seqlen_k`` and the table row covering
            ``cdiv(seqused_k[b], page_size)`` valid pages.
        dense_tail: bool ``(batch,)`` on the device, or None (every sequence): whether the last
            ``num_dense_tail_blocks`` query blocks of a sequence attend densely. Pass False for a chunk that does
            not end its prompt (the dense tail belongs to the prompt's end, where the first token is produced).
        alpha, tau, block_size, num_sink_blocks, num_local_blocks, num_dense_tail_blocks, min_sparse_len,
            gqa_shared_index: override the fields of ``config`` (``FlashPrefillConfig()`` by default). ``alpha``
            is the max-relative threshold, ``tau`` the mass floor (each query block keeps its heaviest key blocks
            until they hold this share of its estimated energy; 0 turns it off).
            Sequences with ``seqlen_k < min_sparse_len`` attend densely; if every sequence does, no selection runs.
        out: optional ``(total_q, num_heads, head_dim)`` output buffer (written in place and returned).
        return_lse: also return the natural-log LSE ``(num_heads, total_q)`` fp32.
        seqlens_host: for a batch of one sequence, its ``(seqlen_q, seqlen_k)`` as Python ints, with
            ``cu_seqlens_q == [0, seqlen_q]`` and ``cu_seqlens_k == [0, seqlen_k]`` (or ``seqused_k == [seqlen_k]``;
            not checked on the device). With it, the sparse attention runs on vLLM's FlashAttention-4 block-sparse
            kernel where that runs (Hopper, head_dim 64-128, 128-token blocks, no ``return_lse``; paged keys are
            gathered first; ``FLASHPREFILL_KERNEL`` chooses), else on the Triton kernel. The serving path passes it.
        return_index: also return the ``BlockSparseIndex`` used (``None`` when the whole batch ran dense);
            ``block_density(index, cu_seqlens_q, cu_seqlens_k)`` reads the density it chose
            (``block_density(index, cu_seqlens_q, None, seqused_k=seqused_k)`` for paged K/V).

    Returns:
        ``out``, or a tuple ``(out[, lse][, index])`` when ``return_lse`` / ``return_index`` are set.
    """
    scale = _check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       block_table, seqused_k)
    _check_dense_tail(dense_tail, cu_seqlens_q)
    _check_seqlens_host(seqlens_host, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table is not None)
    cfg = _resolve_config(config, alpha=alpha, tau=tau, block_size=block_size, num_sink_blocks=num_sink_blocks,
                          num_local_blocks=num_local_blocks, num_dense_tail_blocks=num_dense_tail_blocks,
                          min_sparse_len=min_sparse_len, gqa_shared_index=gqa_shared_index)
    out = _alloc_out(q, out)
    paged = dict(block_table=block_table, seqused_k=seqused_k)
    index = None
    if max_seqlen_k >= cfg.min_sparse_len:
        index = _block_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, cfg,
                             dense_tail=dense_tail, **paged)
    res = _attend(q, k, v, index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, out, return_lse, seqlens_host,
                  **paged)
    if not (return_lse or return_index):
        return res
    extra = (res if return_lse else (res,))
    return (*extra, index) if return_index else extra
