"""The ``vllm.general_plugins`` entry point (``flashprefill = flashprefill_vllm.plugin:register`` in setup.py).

vLLM calls :func:`register` with no arguments in every process it starts (front end, engine core, each worker),
before any model is built. It must stay cheap and safe there: it imports no backend module and no Triton (backends
are named by class-path string and resolved by vLLM when it selects them), never initialises CUDA, and may run
several times. Set ``VLLM_PLUGINS`` to a list that includes ``flashprefill``, or leave it unset.
"""

from __future__ import annotations

import importlib
import logging

from .config import env_enabled, env_kernel, env_unknown_warnings
from .presets import env_config

logger = logging.getLogger("flashprefill_vllm")

_announced = False
_env_checked = False


def _use_vllm_logging() -> None:
    """Send this package's log records through vLLM's handler and level (vLLM's logger does not propagate to the
    root logger, where our INFO lines would otherwise be dropped), unless the user configured ours."""
    vllm_logger = logging.getLogger("vllm")
    if logger.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(vllm_logger.level)
    logger.propagate = False


def _find_loader(enabled: bool):
    """The loader module for the installed vLLM's attention-backend API, probed by import (newest first), or ``None``
    (logged: an error when the switch is on, a debug line when off) if there is none."""
    try:
        import vllm
    except ImportError:
        (logger.warning if enabled else logger.debug)("FlashPrefill: vLLM is not installed; nothing to register")
        return None
    if _importable("vllm.v1.attention.backends.registry"):  # 0.13+
        from .loaders import vllm_latest
        return vllm_latest
    if _importable("vllm.attention.backends.registry"):  # 0.12 (registry, before it moved under v1/)
        from .loaders import vllm_0_12
        return vllm_0_12
    try:
        from vllm.platforms import _Backend  # noqa: F401  (0.10: closed enum, no registry)
    except ImportError:
        _registration_failed(enabled, "unsupported vLLM %s (none of vllm.v1.attention.backends.registry, "
                             "vllm.attention.backends.registry, vllm.platforms._Backend)",
                             getattr(vllm, "__version__", "?"))
        return None
    from .loaders import vllm_0_10
    return vllm_0_10


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _registration_failed(enabled: bool, what: str, *args, exc_info: bool = False) -> None:
    """Say that FlashPrefill is not registered: with ``FLASHPREFILL=1`` at ERROR level, saying that vLLM serves its
    stock attention, and counted (``backends.fallback_counts()``); with the switch off, a debug line."""
    if not enabled:
        logger.debug("FlashPrefill: " + what + "; staying stock", *args, exc_info=exc_info)
        return
    logger.error("FlashPrefill: FLASHPREFILL=1 but registration failed: " + what + ". vLLM SERVES ITS STOCK "
                 "ATTENTION: no prefill runs sparse", *args, exc_info=exc_info)
    from .backends.fallbacks import note_stock   # only on failure: registration imports no backend module
    note_stock("failed registrations (FLASHPREFILL=1)", level=logging.DEBUG)


def register() -> None:
    """Register FlashPrefill with vLLM's attention-backend selection, through the loader for the installed API.

    - Always (registry versions, 0.12 and later): the ``CUSTOM`` slot, so ``--attention-backend CUSTOM`` (or
      ``LLM(attention_backend="CUSTOM")``; ``VLLM_ATTENTION_BACKEND=CUSTOM`` in 0.12) selects FlashPrefill explicitly.
    - With ``FLASHPREFILL=1``: the ``FLASH_ATTN`` slot, so layers that would use FlashAttention use FlashPrefill
      with no other change (``LLM(...)`` and ``vllm serve`` alike). vLLM 0.10 has no registry: there the loader
      wraps the CUDA platform's backend choice instead, and only when the switch is on.

    Any failure to find or use the registry leaves vLLM stock; with ``FLASHPREFILL=1`` it is logged at ERROR level
    (vLLM then serves its stock attention) and counted in ``backends.fallback_counts()``. An invalid ``FLASHPREFILL``
    value, or an invalid ``FLASHPREFILL_*`` knob while the switch is on, raises ``ValueError`` naming the variable:
    vLLM then stops at start-up rather than serving with settings the user did not ask for.
    """
    global _announced, _env_checked
    _use_vllm_logging()
    if not _env_checked:
        _env_checked = True
        for warning in env_unknown_warnings():   # a misspelled FLASHPREFILL_* would otherwise be ignored silently
            logger.warning("%s", warning)
    enabled = env_enabled()
    config, preset = env_config() if enabled else (None, None)   # invalid values stop vLLM here, at start-up
    kernel = env_kernel() if enabled else None
    try:
        loader = _find_loader(enabled)
        if loader is None:
            return
        slots = loader.install(enabled)
    except Exception as exc:  # noqa: BLE001 - never take vLLM down for a plugin that could not register
        _registration_failed(enabled, "%s: %s", type(exc).__name__, exc, exc_info=True)
        return
    if _announced:
        return
    _announced = True
    if config is None:
        logger.debug("FlashPrefill: off (FLASHPREFILL unset or 0); backend slots registered: %s", slots)
        return
    logger.info("FlashPrefill: on (backend slots %s): prefills of sequences >= %d tokens run sparse (alpha=%g, "
                "tau=%g, first %d layer(s) dense, block_size=%d, sink/local/tail blocks=%d/%d/%d, "
                "gqa_shared_index=%s, kernel=%s%s)", "/".join(slots),
                config.min_sparse_len, config.alpha, config.tau, config.num_dense_layers, config.block_size,
                config.num_sink_blocks, config.num_local_blocks, config.num_dense_tail_blocks, config.gqa_shared_index,
                kernel, f"; FLASHPREFILL_PRESET={preset} applies per model when the engine builds it" if preset else "")
