"""vLLM attention backends built on the FlashPrefill op.

The mixin modules import no vLLM at import time (``settings`` reads vLLM's current config lazily, inside a
function); each ``vllm_*`` module subclasses one vLLM generation's FlashAttention classes and is imported only by
vLLM itself, through the class path a loader registered. :func:`fallback_counts` says how often, and why, work went
to stock FlashAttention in this process.
"""

from .fallbacks import fallback_counts, reset_fallback_counts

__all__ = ["fallback_counts", "reset_fallback_counts"]
