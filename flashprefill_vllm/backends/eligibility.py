"""Which layers may run sparse, with which settings: read once per process (settings) and once per layer (the stock
reason of a layer that cannot). Imports vLLM only inside :func:`current_vllm_config`, to read the config vLLM is
building; everything else is unit-testable without vLLM.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import FlashPrefillConfig, env_kernel, env_log_density
from ..ops import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from ..presets import Preset, active_preset, active_preset_for_vllm
from .fallbacks import note_stock

# KV-cache dtypes whose cache holds the model dtype ("auto" = the model's): the fresh K/V the op reads then match
# what stock FlashAttention reads back from the cache. Quantized caches (fp8*, nvfp4, ...) stay dense.
UNQUANTIZED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the backend reads from the environment once per process (the plugin validated it at registration):
    the global ``config`` (``FLASHPREFILL_*`` with the ``FLASHPREFILL_PRESET`` applied), the ``preset`` whose
    per-layer alphas apply (``None`` for none) and whether to log densities."""

    config: FlashPrefillConfig
    log_density: bool
    preset: Preset | None = None


def settings(vllm_config=None) -> Settings:
    """The process's :class:`Settings` for the served model (``vllm_config``: vLLM's ``VllmConfig``, or ``None`` for
    the one vLLM is building now), parsed once from the ``FLASHPREFILL_*`` variables.

    Raises ``ValueError`` naming the variable on an invalid value (reached only with ``--attention-backend CUSTOM``
    and the toggle off, since otherwise ``register()`` has already rejected it at start-up), or a preset whose
    per-layer alphas name layers the model does not have (while vLLM builds the model, so it stops at start-up).
    """
    if vllm_config is None:
        vllm_config = current_vllm_config()
    active = active_preset_for_vllm(vllm_config)   # resolved and logged once per process and model
    env_kernel()                                     # FLASHPREFILL_KERNEL is read per call: reject a bad value now
    return Settings(config=active.config, log_density=env_log_density(), preset=active.preset)


def _settings_cache_clear() -> None:
    """Forget the resolved preset: the next :func:`settings` reads the environment."""
    active_preset.cache_clear()


settings.cache_clear = _settings_cache_clear  # type: ignore[attr-defined]


def current_vllm_config():
    """vLLM's config while it builds the model (where impls are created); ``None`` outside vLLM."""
    try:
        from vllm.config import get_current_vllm_config
    except ImportError:
        return None
    try:
        return get_current_vllm_config()
    except Exception:  # noqa: BLE001 - an unset config only means "unknown model": the preset falls back
        return None


def layer_stock_reason(*, head_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                       sliding_window: tuple[int, int] | None, alibi_slopes, logits_soft_cap: float | None,
                       sinks, attn_type: str, kv_sharing_target_layer_name: str | None,
                       dcp_world_size: int, pcp_world_size: int) -> str | None:
    """Why a layer with these attributes must run stock FlashAttention for every request, or ``None`` if its long
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


class LayerEligibility:
    """Impl mixin: after FlashAttention's ``__init__``, decide once whether the layer may run sparse.

    Sets ``fp_settings``, ``fp_max_seq_len`` (the model's ``max_model_len``, 0 if unknown) and ``fp_stock_reason``
    (``None`` when eligible; otherwise counted once per layer and logged once per reason). Attributes a vLLM release
    lacks take the value that release implies: 0.10's impl has no ``sinks``, no ``attn_type`` (it rejects every type
    but decoder in ``__init__``) and no context parallelism.
    """

    fp_settings: Settings
    fp_max_seq_len: int
    fp_stock_reason: str | None

    def _fp_init_layer(self) -> None:
        vllm_config = current_vllm_config()
        self.fp_settings = settings(vllm_config)
        self.fp_max_seq_len = getattr(getattr(vllm_config, "model_config", None), "max_model_len", 0) or 0
        # Tokens per KV-cache page, for the kernel warm-up of chunks read from the paged cache (0: unknown, skipped).
        self.fp_kv_page_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", 0) or 0
        # The model dtype is the default dtype while vLLM builds layers (vLLM's Attention reads it the same way).
        self.fp_stock_reason = layer_stock_reason(
            head_size=self.head_size, dtype=torch.get_default_dtype(), kv_cache_dtype=self.kv_cache_dtype,
            sliding_window=self.sliding_window, alibi_slopes=self.alibi_slopes,
            logits_soft_cap=self.logits_soft_cap, sinks=getattr(self, "sinks", None),
            attn_type=getattr(self, "attn_type", "decoder"),
            kv_sharing_target_layer_name=self.kv_sharing_target_layer_name,
            dcp_world_size=getattr(self, "dcp_world_size", 1), pcp_world_size=getattr(self, "pcp_world_size", 1))
        if self.fp_stock_reason is not None:
            note_stock(f"layers with {self.fp_stock_reason}")
