"""FlashPrefill as a Hugging Face transformers attention implementation (``attn_implementation="sparse_prefill"``).

    from flashprefill_vllm.integrations.transformers import register
    name = register()               # knobs from the FLASHPREFILL_* variables, or register(FlashPrefillConfig(...))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)

The name has no "flash" in it: transformers takes any implementation name containing "flash" for a FlashAttention
variant and tries to load its kernel. The function is registered in transformers' ``AttentionInterface``, and SDPA's mask builder under the same name in
``AttentionMaskInterface``: padding then reaches the attention function as a 4-D boolean mask, and a plain causal
prefill as ``None``. Each call gets post-RoPE ``query (B, H, Lq, D)`` and ``key``/``value`` ``(B, Hkv, Lk, D)`` (cache
included). A causal prefill with no padding whose key length is at least ``min_sparse_len`` runs the op in its varlen
layout, bottom-right aligned when the cache holds earlier tokens. Every other call runs transformers' own
``sdpa_attention_forward`` unchanged (see ``FALLBACK_REASONS``); each reason is logged once and every call is counted
in ``CALL_COUNTS``. CPU tensors run the op's plain-torch reference (slow; for tests).
"""

from __future__ import annotations

import collections
import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..config import FlashPrefillConfig
from ..ops.interface import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, flash_prefill_varlen_func

ATTN_IMPLEMENTATION = "sparse_prefill"

# Why a call runs dense SDPA instead of the op. The first five are keyword arguments some models pass (a non-None
# value is a feature the op does not implement).
FALLBACK_REASONS = {
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "s_aux": "learned attention sinks",
    "position_bias": "an additive position bias",
    "cache": "a paged cache (continuous batching)",
    "decode": "a decode step (one query row)",
    "non_causal": "non-causal attention",
    "dropout": "attention dropout (training)",
    "autograd": "inputs that require grad (the op has no backward)",
    "head_dim": f"a head_dim outside {SUPPORTED_HEAD_DIMS}",
    "dtype": "a dtype other than float16/bfloat16",
    "mask": "padding or a custom attention mask",
    "short": "a key length below min_sparse_len",
}
_KWARG_REASONS = ("sliding_window", "softcap", "s_aux", "position_bias", "cache")

# Calls since import (or reset_counts()) per outcome: "sparse", or a FALLBACK_REASONS key.
CALL_COUNTS: collections.Counter = collections.Counter()

logger = logging.getLogger(__name__)
_logged: set[str] = set()
_config: FlashPrefillConfig | None = None


def register_attention(name: str, fn) -> None:
    """Register ``fn`` (``sdpa_attention_forward``'s signature) as attention implementation ``name``, with SDPA's mask
    builder. Idempotent: registering again replaces the entry."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def register(config: FlashPrefillConfig | None = None) -> str:
    """Make ``attn_implementation="sparse_prefill"`` (``ATTN_IMPLEMENTATION``) available; returns that name.

    ``config``: the knobs every call uses; ``None`` reads ``FlashPrefillConfig.from_env()`` (the FLASHPREFILL_*
    variables). Calling again is harmless and replaces the config (models already loaded pick it up).
    """
    global _config
    if config is not None and not isinstance(config, FlashPrefillConfig):
        raise ValueError(f"config must be a FlashPrefillConfig or None; got {type(config).__name__}")
    _config = config if config is not None else FlashPrefillConfig.from_env()
    register_attention(ATTN_IMPLEMENTATION, flashprefill_attention_forward)
    return ATTN_IMPLEMENTATION


def get_config() -> FlashPrefillConfig:
    """The config in use (``FlashPrefillConfig.from_env()`` until ``register`` sets one)."""
    global _config
    if _config is None:
        _config = FlashPrefillConfig.from_env()
    return _config


def reset_counts() -> None:
    """Clear ``CALL_COUNTS`` and the once-per-reason log memory."""
    CALL_COUNTS.clear()
    _logged.clear()


def flashprefill_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None,
                                   **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: ``(out (B, Lq, H, D), None)``, as ``sdpa_attention_forward`` returns."""
    cfg = get_config()
    reason, key_len = _route(module, query, key, value, attention_mask, dropout, is_causal, kwargs, cfg)
    if reason is not None:
        _count_fallback(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    CALL_COUNTS["sparse"] += 1
    return _sparse_prefill(query, key[:, :, :key_len], value[:, :, :key_len], scaling, cfg), None


def _route(module, query, key, value, attention_mask, dropout, is_causal, kwargs,
           cfg: FlashPrefillConfig) -> tuple[str | None, int]:
    """``(fallback reason, 0)``, or ``(None, number of keys the queries attend to)`` for the sparse path."""
    for name in _KWARG_REASONS:
        if kwargs.get(name) is not None:
            return name, 0
    if query.shape[2] == 1:
        return "decode", 0
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return "non_causal", 0
    if dropout > 0:
        return "dropout", 0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "autograd", 0
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return "head_dim", 0
    if query.dtype not in SUPPORTED_DTYPES:
        return "dtype", 0
    key_len = causal_key_len(attention_mask, query.shape[2], key.shape[2])
    if key_len is None:
        return "mask", 0
    if key_len < cfg.min_sparse_len:
        return "short", 0
    return None, key_len


def causal_key_len(attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> int | None:
    """How many leading keys a plain causal mask lets the queries see, or ``None`` for any other mask.

    ``None`` mask: SDPA's ``is_causal`` over the first ``q_len`` keys (transformers passes no mask for a prefill
    without padding; keys past ``q_len`` are then empty static-cache slots). A 4-D boolean mask qualifies when every
    batch row equals the bottom-right causal pattern over its first ``n >= q_len`` keys (query row p sees keys
    ``<= n - q_len + p``): a prefill that continues a cache. Reads the mask on the host.
    """
    if attention_mask is None:
        return q_len
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, kv_len):
        return None
    n = int(attention_mask[0, 0, -1].sum())
    if n < q_len:
        return None
    dev = attention_mask.device
    last_key = torch.arange(q_len, device=dev) + (n - q_len)
    causal = torch.arange(kv_len, device=dev)[None, :] <= last_key[:, None]
    return n if bool((attention_mask == causal).all()) else None


def _sparse_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                    cfg: FlashPrefillConfig) -> torch.Tensor:
    """The op on ``(B, H, L, D)`` tensors, every batch row one sequence; returns ``(B, Lq, H, D)``."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    steps = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    out = flash_prefill_varlen_func(query.transpose(1, 2).reshape(batch * q_len, heads, head_dim),
                                    key.transpose(1, 2).reshape(batch * kv_len, kv_heads, head_dim),
                                    value.transpose(1, 2).reshape(batch * kv_len, kv_heads, head_dim),
                                    steps * q_len, steps * kv_len, q_len, kv_len, scaling, config=cfg)
    return out.view(batch, q_len, heads, head_dim)


def _count_fallback(reason: str) -> None:
    CALL_COUNTS[reason] += 1
    if reason not in _logged:
        _logged.add(reason)
        logger.info("FlashPrefill: %s runs dense SDPA (logged once per reason)", FALLBACK_REASONS[reason])
