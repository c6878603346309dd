"""Registration for vLLM 0.13+ (``vllm.v1.attention.backends.registry``; written against 0.26.0).

The registry maps an ``AttentionBackendEnum`` member to a class path that vLLM resolves lazily, so nothing here
imports the backend (or Triton, or touches CUDA). ``class_path`` is passed by keyword: in 0.12 the second positional
parameter was ``is_mamba``, and a positional path silently registered nothing.
"""

from __future__ import annotations

import logging

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

logger = logging.getLogger(__name__)

BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillBackend"
CUSTOM_BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillCustomBackend"


def _register(member: AttentionBackendEnum, class_path: str, *, replace_foreign: bool) -> bool:
    """Point ``member`` at ``class_path``; returns whether it now does. A slot another plugin registered is taken
    over only with ``replace_foreign`` (and a warning naming it), otherwise left alone."""
    if member.is_overridden():
        current = member.get_path()
        if current == class_path:
            return True
        if not replace_foreign:
            logger.info("FlashPrefill: %s is already registered to %s; leaving it", member.name, current)
            return False
        logger.warning("FlashPrefill: replacing the %s backend registered to %s", member.name, current)
    register_backend(member, class_path=class_path)
    return True


def install(enabled: bool) -> list[str]:
    """Register ``CUSTOM`` (explicit ``--attention-backend CUSTOM``) and, when ``enabled``, override ``FLASH_ATTN``
    so that automatic selection picks FlashPrefill with no CLI change. Idempotent.

    Returns the names of the slots that now point at FlashPrefill.
    """
    slots = []
    if _register(AttentionBackendEnum.CUSTOM, CUSTOM_BACKEND, replace_foreign=False):
        slots.append("CUSTOM")
    if enabled and _register(AttentionBackendEnum.FLASH_ATTN, BACKEND, replace_foreign=True):
        slots.append("FLASH_ATTN")
    return slots
