"""The standalone FlashPrefill op. No vLLM import at module load: `fa4_route` imports vLLM's FA4 kernel only when a
call could run on it."""

from .interface import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, block_sparse_attn_varlen_func,
                        flash_prefill_block_index, flash_prefill_varlen_func)
from .block_sparse_index import BlockSparseIndex, block_density

__all__ = ["flash_prefill_varlen_func", "flash_prefill_block_index", "block_sparse_attn_varlen_func",
           "BlockSparseIndex", "block_density", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]
