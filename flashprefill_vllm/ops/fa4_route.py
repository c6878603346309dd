"""The op's attention on FlashAttention-4's block-sparse forward (vLLM's CuTe-DSL kernel) where it runs.

Where: a Hopper GPU (SM90; the block mapping of :mod:`fa4_blocks` is written for its tiles), fp16/bf16, a head_dim
whose SM90 tile is 128 x 128 (64 to 128) with 128-token blocks, one sequence whose lengths the caller knows on the
host (``seqlens_host``: the serving path runs one op call per request and knows them), and
``vllm.vllm_flash_attn.cute`` importable (it needs ``nvidia-cutlass-dsl`` and ``quack-kernels``, both requirements
of vLLM itself). ``FLASHPREFILL_KERNEL`` = ``auto`` (the default: FA4 where it runs), ``fa4`` (the same, and a
warning where it cannot) or ``triton`` (never FA4). Everything else runs our Triton kernel.

Why: on an H100 (``benchmarks/results/bench_fa4_sparse_nvidia-h100-80gb-hbm3-fa4.*``) FA4 computes 500-580 TFLOP/s
per kept block at head_dim 128 where our kernel computes 327-427, with the same outputs to bf16 rounding.

FA4's ``page_table`` does not combine with block sparsity on SM90 (its block-sparse loads skip the page lookup;
measured: rel-L2 0.91), so a chunk whose keys sit in vLLM's paged cache has them copied into contiguous rows first:
one gather of the sequence's pages (0.1-0.4 ms at 32K-128K tokens, 8 KV heads of 128), cheaper than what FA4 saves.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..config import env_kernel
from .block_sparse_index import BlockSparseIndex
from .fa4_blocks import fa4_block_sparse, sm90_tile
from .utils import gather_pages

logger = logging.getLogger(__name__)

FA4_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def load_fa4():
    """``(forward, BlockSparseTensorsTorch)`` from vLLM's CuTe-DSL FlashAttention-4, or the reason it cannot be
    imported (a string). Probed once per process."""
    try:
        from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd
    except Exception as e:  # noqa: BLE001 - ImportError (no vLLM, no cutlass-dsl / quack) or a failing module init
        return f"vllm.vllm_flash_attn.cute is not importable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return _flash_attn_fwd, BlockSparseTensorsTorch


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """Why the FA4 route cannot run these inputs (a phrase for a log line), or ``None`` when it can."""
    if env_kernel() == "triton":
        return "FLASHPREFILL_KERNEL=triton"
    if device.type != "cuda":
        return "not a CUDA tensor"
    major, minor = _capability(device)
    if major != 9:
        return f"compute capability {major}.{minor}: the block mapping is written for Hopper (SM90) tiles"
    if dtype not in FA4_DTYPES:
        return f"dtype {dtype}: FA4's block sparsity is used here for fp16 and bf16 only"
    tile = sm90_tile(head_dim, head_dim, block_size)
    if tile != (block_size, block_size):
        return (f"head_dim {head_dim} with {block_size}-token blocks: FA4's SM90 tile for it is {tile[0]} x {tile[1]}, "
                f"so the blocks do not map one to one (head_dim 64-128 with 128-token blocks do)")
    loaded = load_fa4()
    return loaded if isinstance(loaded, str) else None


_noted: set[str] = set()


def note_triton(reason: str) -> None:
    """Log once per process and reason that the Triton kernel runs instead of FA4 (a warning when
    ``FLASHPREFILL_KERNEL=fa4`` asked for FA4)."""
    if reason in _noted:
        return
    _noted.add(reason)
    asked = env_kernel() == "fa4"
    logger.log(logging.WARNING if asked else logging.INFO,
               "FlashPrefill: sparse attention on the Triton kernel, not FA4%s: %s (logged once)",
               " (FLASHPREFILL_KERNEL=fa4 asked for it)" if asked else "", reason)


def fa4_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockSparseIndex,
               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None, seqlens_host: tuple[int, int],
               scale: float, out: torch.Tensor, *, block_table: torch.Tensor | None = None,
               seqused_k: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (bottom-right) attention of one sequence over the index's kept blocks, on FA4, into ``out``.

    ``seqlens_host = (seqlen_q, seqlen_k)``: the sequence's query rows are ``q[:seqlen_q]`` and its keys
    ``k[:seqlen_k]`` (packed) or the first ``seqlen_k`` keys of block-table row 0 (paged). ``cu_seqlens_q`` /
    ``cu_seqlens_k`` / ``seqused_k`` are the same lengths on the device (the block mapping reads them there: no
    host sync). The caller has checked what :func:`unavailable_reason` checks.
    """
    fwd, tensors = load_fa4()
    seqlen_q, seqlen_k = seqlens_host
    if block_table is not None:
        k, v = gather_pages(k, block_table[0], seqlen_k), gather_pages(v, block_table[0], seqlen_k)
    else:
        k, v = k[:seqlen_k], v[:seqlen_k]
    sparse = fa4_block_sparse(index, cu_seqlens_q, cu_seqlens_k, q.shape[1], seqused_k=seqused_k,
                              head_dim=q.shape[-1], varlen=False, host_lengths=seqlens_host)
    fwd(q[:seqlen_q].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), softmax_scale=scale, causal=True,
        out=out[:seqlen_q].unsqueeze(0), block_sparse_tensors=tensors(**sparse._asdict()))
    return out
