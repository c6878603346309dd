"""Registration for vLLM 0.13+ (``vllm.v1.attention.backends.registry``; written against 0.26.0).

``CUSTOM`` gets its own class, since from 0.24 on ``get_name()`` must be the member's name.
"""

from __future__ import annotations

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from .common import register_slots

BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillBackend"
CUSTOM_BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillCustomBackend"


def install(enabled: bool) -> list[str]:
    """Register ``CUSTOM`` (``--attention-backend CUSTOM``) and, when ``enabled``, override ``FLASH_ATTN``. Idempotent.

    Returns the names of the slots that now point at FlashPrefill.
    """
    return register_slots(AttentionBackendEnum, register_backend, backend=BACKEND, custom_backend=CUSTOM_BACKEND,
                          enabled=enabled)
