"""Version-agnostic parts of the FlashPrefill attention impl: settings, per-layer eligibility, the sparse tail call.

No vLLM import here: the version modules (``vllm_latest.py``) subclass vLLM's FlashAttention classes and call these
functions, which are unit-testable on CPU (CPU tensors make the op run its plain-torch reference).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from ..config import FlashPrefillConfig, env_log_density
from ..ops import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, block_density, flash_prefill_varlen_func

logger = logging.getLogger(__name__)

# KV-cache dtypes whose cache holds the model dtype ("auto" = the model's): the fresh K/V the op reads then match
# what stock FlashAttention reads back from the cache. Quantized caches (fp8*, nvfp4, ...) stay dense.
UNQUANTIZED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the backend reads from the environment once per process (the plugin validated it at registration)."""

    config: FlashPrefillConfig
    log_density: bool


@functools.cache
def settings() -> Settings:
    """The process's :class:`Settings`, parsed once from the ``FLASHPREFILL_*`` variables.

    Raises ``ValueError`` naming the variable on an invalid value (reached only with ``--attention-backend CUSTOM``
    and the toggle off, since otherwise ``register()`` has already rejected it at start-up).
    """
    return Settings(config=FlashPrefillConfig.from_env(), log_density=env_log_density())


def dense_fallback_reason(*, head_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                          sliding_window: tuple[int, int] | None, alibi_slopes, logits_soft_cap: float | None,
                          sinks, attn_type: str, kv_sharing_target_layer_name: str | None,
                          dcp_world_size: int, pcp_world_size: int) -> str | None:
    """Why a layer with these attributes must run stock FlashAttention for every request, or ``None`` if its fresh
    prefills can run sparse. The arguments are the FlashAttention impl's attributes after its ``__init__``."""
    if attn_type != "decoder":
        return f"attention type {attn_type!s} (only causal decoder self-attention runs sparse)"
    if sliding_window is not None and tuple(sliding_window) != (-1, -1):
        return "sliding-window attention"
    if alibi_slopes is not None:
        return "ALiBi"
    if logits_soft_cap:
        return "logits soft-cap"
    if sinks is not None:
        return "learned attention sinks"
    if kv_sharing_target_layer_name is not None:
        return "KV cache shared with another layer (no fresh K/V)"
    if head_size not in SUPPORTED_HEAD_DIMS:
        return f"head size {head_size} (FlashPrefill supports {SUPPORTED_HEAD_DIMS})"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (FlashPrefill supports float16 and bfloat16)"
    if kv_cache_dtype not in UNQUANTIZED_KV_CACHE_DTYPES:
        return f"kv_cache_dtype={kv_cache_dtype} (quantized KV cache)"
    if dcp_world_size > 1 or pcp_world_size > 1:
        return f"context parallelism (dcp={dcp_world_size}, pcp={pcp_world_size})"
    return None


_logged_fallbacks: set[str] = set()


def log_dense_fallback(reason: str) -> None:
    """Log, once per process and reason, that layers run stock FlashAttention."""
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logger.info("FlashPrefill: layers with %s run stock FlashAttention (dense)", reason)


def run_sparse_tail(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, *,
                    start: int, end: int, cu_seqlens: torch.Tensor, max_len: int, scale: float, num_heads: int,
                    num_kv_heads: int, head_size: int, settings: Settings, layer_name: str) -> None:
    """Sparse causal attention of the fresh prefills in rows ``[start, end)``, written into ``output[start:end]``.

    ``query``/``output`` are ``(tokens, num_heads, head_size)`` or ``(tokens, num_heads * head_size)`` and ``key``/
    ``value`` the matching ``num_kv_heads`` shapes: vLLM's strided views of the fused QKV buffer, padded past the
    real tokens. No copy: the op takes strided rows. ``cu_seqlens`` (int32, on the device, starting at 0) and
    ``max_len`` come from the metadata builder, so nothing here syncs the host unless density logging is on.
    """
    q = query[start:end].view(-1, num_heads, head_size)
    k = key[start:end].view(-1, num_kv_heads, head_size)
    v = value[start:end].view(-1, num_kv_heads, head_size)
    out = output[start:end].view(-1, num_heads, head_size)
    if not settings.log_density:
        flash_prefill_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale,
                                  config=settings.config, out=out)
        return
    _, index = flash_prefill_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale,
                                         config=settings.config, out=out, return_index=True)
    # block_density reads the index back from the GPU: a host sync per layer, accepted while logging.
    density = block_density(index, cu_seqlens, cu_seqlens) if index is not None else 1.0
    logger.info("FlashPrefill %s: %d prefill(s), %d tokens, kept %.1f%% of causal key blocks", layer_name,
                cu_seqlens.numel() - 1, end - start, 100.0 * density)
