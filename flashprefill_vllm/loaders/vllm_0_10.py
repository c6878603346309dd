"""Registration for vLLM 0.10 (V1 engine, no backend registry; written against 0.10.0).

0.10's ``_Backend`` is a closed enum with no ``CUSTOM`` slot, so the one choke point is the CUDA platform's choice,
the classmethod ``CudaPlatformBase.get_attn_backend_cls(cls, selected_backend, head_size, dtype, kv_cache_dtype,
block_size, use_v1, use_mla) -> str`` (the NVML and non-NVML platforms inherit it). Both callers, ``Attention``
layers and ``GPUModelRunner.initialize_attn_backend``, reach it through the cached
``vllm.attention.selector._cached_get_attn_backend``, so :func:`install` clears that cache.

The wrapper asks the original first and substitutes FlashPrefill only where the original chose V1 FlashAttention, so
vLLM's own device rules (FlashInfer first on SM 10.0, FlexAttention below SM 8.0) still hold. ``kv_cache_dtype`` is
not looked at: the model runner passes the cache's torch dtype where layers pass the string, and both must agree.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

from ..ops.interface import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

logger = logging.getLogger(__name__)

BACKEND = "flashprefill_vllm.backends.vllm_0_10.FlashPrefillBackend"
FLASH_ATTN_V1 = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
# The original's parameters, in order: the wrapper passes them on positionally.
PARAMS = ("cls", "selected_backend", "head_size", "dtype", "kv_cache_dtype", "block_size", "use_v1", "use_mla")


def _wrap(original, eligible_selections: tuple):
    """``get_attn_backend_cls`` that returns :data:`BACKEND` for eligible layers and ``original``'s answer otherwise."""

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, head_size, dtype, kv_cache_dtype, block_size, use_v1, use_mla):
        path = original(cls, selected_backend, head_size, dtype, kv_cache_dtype, block_size, use_v1, use_mla)
        if (path == FLASH_ATTN_V1 and use_v1 and not use_mla and selected_backend in eligible_selections
                and head_size in SUPPORTED_HEAD_DIMS and dtype in SUPPORTED_DTYPES):
            return BACKEND
        return path

    get_attn_backend_cls.__flashprefill_original__ = original
    return get_attn_backend_cls


def install(enabled: bool) -> list[str]:
    """When ``enabled``, wrap ``CudaPlatformBase.get_attn_backend_cls`` so that V1 FlashAttention layers (no
    selection, or ``VLLM_ATTENTION_BACKEND=FLASH_ATTN``) get FlashPrefill; otherwise change nothing. Idempotent.

    Returns the names of the slots that now point at FlashPrefill (``["FLASH_ATTN"]`` or ``[]``).

    Raises:
        RuntimeError: if ``get_attn_backend_cls`` does not have 0.10's parameters (another vLLM version).
    """
    if not enabled:
        return []
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        logger.info("FlashPrefill: platform %s is not CUDA; staying stock", type(current_platform).__name__)
        return []
    from vllm.platforms.cuda import CudaPlatformBase

    current = CudaPlatformBase.get_attn_backend_cls.__func__
    if getattr(current, "__flashprefill_original__", None) is None:
        params = tuple(inspect.signature(current).parameters)
        if params != PARAMS:
            raise RuntimeError(f"the vLLM 0.10 loader expects CudaPlatformBase.get_attn_backend_cls{PARAMS}; this "
                               f"vLLM has {params}")
        from vllm.platforms.interface import _Backend
        wrapped = _wrap(current, (None, _Backend.FLASH_ATTN, _Backend.FLASH_ATTN_VLLM_V1))
        CudaPlatformBase.get_attn_backend_cls = classmethod(wrapped)
    # Selections made before the wrap are cached; nothing is cached if the selector is not imported yet.
    selector = sys.modules.get("vllm.attention.selector")
    if selector is not None:
        selector._cached_get_attn_backend.cache_clear()
    return ["FLASH_ATTN"]
