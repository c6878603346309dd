"""flashprefill_vllm: FlashPrefill sparse-prefill attention as a vLLM plugin. Imports without vLLM or a GPU."""

__version__ = "0.1.0"

from .config import FlashPrefillConfig
from .ops import (BlockSparseIndex, block_density, block_sparse_attn_varlen_func, flash_prefill_block_index,
                  flash_prefill_varlen_func)

__all__ = ["__version__", "FlashPrefillConfig", "flash_prefill_varlen_func", "flash_prefill_block_index",
           "block_sparse_attn_varlen_func", "BlockSparseIndex", "block_density"]
