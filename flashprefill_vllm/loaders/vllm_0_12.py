"""Registration for vLLM 0.12 (``vllm.attention.backends.registry``; written against 0.12.0).

One class serves both slots: 0.12 takes ``get_name()`` as a free string, and its model runner V2 wants
``"FLASH_ATTN"``. NOTE: in 0.12.0 ``CUSTOM = ""`` is an alias of ``TORCH_SDPA = ""`` (fixed after 0.12.0 by vLLM
PR #30869), so the CUSTOM registration is stored under TORCH_SDPA and vLLM logs that name when
``VLLM_ATTENTION_BACKEND=CUSTOM`` selects it; the ViT path never resolves that slot's class, so it stays stock.
"""

from __future__ import annotations

from vllm.attention.backends.registry import AttentionBackendEnum, register_backend

from .common import register_slots

BACKEND = "flashprefill_vllm.backends.vllm_0_12.FlashPrefillBackend"


def install(enabled: bool) -> list[str]:
    """Register ``CUSTOM`` (``VLLM_ATTENTION_BACKEND=CUSTOM``; 0.12 has no CLI flag) and, when ``enabled``, override
    ``FLASH_ATTN`` so that automatic selection picks FlashPrefill. Idempotent.

    Returns the names of the slots that now point at FlashPrefill.
    """
    return register_slots(AttentionBackendEnum, register_backend, backend=BACKEND, custom_backend=BACKEND,
                          enabled=enabled)
