"""Registration shared by the registry loaders (0.12: ``vllm.attention.backends.registry``; 0.13+:
``vllm.v1.attention.backends.registry``), which differ only in where the registry lives. No vLLM import here.

The registry maps an ``AttentionBackendEnum`` member to a class path that vLLM resolves lazily, so registering imports
no backend (nor Triton, nor CUDA). ``class_path`` is always passed by keyword: in 0.12 the second positional parameter
is ``is_mamba``, and a positional path silently registers nothing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _register(enum, register_backend, slot: str, class_path: str, *, replace_foreign: bool) -> bool:
    """Point member ``slot`` at ``class_path``; returns whether it now does. A slot another plugin registered is
    taken over only with ``replace_foreign`` (and a warning naming it), otherwise left alone."""
    member = enum[slot]
    if member.is_overridden():
        current = member.get_path()
        if current == class_path:
            return True
        if not replace_foreign:
            logger.info("FlashPrefill: %s is already registered to %s; leaving it", slot, current)
            return False
        logger.warning("FlashPrefill: replacing the %s backend registered to %s", slot, current)
    register_backend(member, class_path=class_path)
    return True


def register_slots(enum, register_backend, *, backend: str, custom_backend: str, enabled: bool) -> list[str]:
    """Register ``CUSTOM`` (explicit selection) and, when ``enabled``, override ``FLASH_ATTN`` so that automatic
    selection picks FlashPrefill with no CLI change. Idempotent.

    Returns the names of the slots that now point at FlashPrefill.
    """
    slots = []
    if _register(enum, register_backend, "CUSTOM", custom_backend, replace_foreign=False):
        slots.append("CUSTOM")
    if enabled and _register(enum, register_backend, "FLASH_ATTN", backend, replace_foreign=True):
        slots.append("FLASH_ATTN")
    return slots
