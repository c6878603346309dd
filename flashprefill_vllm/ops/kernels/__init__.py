"""The @triton.jit kernels, one concern per file; launched from ``ops/index.py`` and ``ops/attention.py``."""

from .pool import _mean_pool_k_kernel
from .select import _select_blocks_kernel
from .sparse_attn import _sparse_attn_fwd_kernel

__all__ = ["_mean_pool_k_kernel", "_select_blocks_kernel", "_sparse_attn_fwd_kernel"]
