"""Every path on which FlashPrefill's backend hands work to stock FlashAttention, counted and logged once.

A reason is a short phrase (``"cascade attention"``, ``"layers with ALiBi"``, ...). :func:`note_stock` adds one to its
count and logs it the first time it is seen in the process; :func:`fallback_counts` is what a user reads (per
process: vLLM's engine core and each worker count their own). Units: per layer for a layer that never runs sparse
(counted when vLLM builds it), per step for a step's metadata, per layer call for what ``forward`` decides.
"""

from __future__ import annotations

import collections
import logging

logger = logging.getLogger(__name__)

_counts: collections.Counter[str] = collections.Counter()


def note_stock(reason: str, level: int = logging.INFO) -> None:
    """Count one stock-FlashAttention fallback for ``reason``; log it the first time this process sees it."""
    first = reason not in _counts
    _counts[reason] += 1
    if first:
        logger.log(level, "FlashPrefill: %s -> stock FlashAttention (dense); logged once, counted in "
                   "flashprefill_vllm.backends.fallback_counts()", reason)


def fallback_counts() -> dict[str, int]:
    """How often each reason sent work to stock FlashAttention in this process so far."""
    return dict(_counts)


def reset_fallback_counts() -> None:
    """Forget the counts (and which reasons were logged)."""
    _counts.clear()
