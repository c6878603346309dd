"""``FLASHPREFILL_LOG_DENSITY=1``: one log line per sparse request and layer with the share of causal key blocks the
selection kept (read back from the GPU: one host sync per layer, accepted while logging). ``eval/`` parses these
lines; keep their wording."""

from __future__ import annotations

import logging

import torch

from ..ops import block_density

logger = logging.getLogger(__name__)


def log_density(index, cu_q: torch.Tensor, seqused: torch.Tensor | None, layer_name: str, q_len: int,
                seq_len: int) -> None:
    """Log the density of one op call's ``index`` (``None``: the op ran dense); ``seqused`` is the request's key
    count when it read cached context from the paged cache, ``None`` for a fresh prefill."""
    if index is None:
        density = 1.0
    elif seqused is None:
        density = block_density(index, cu_q, cu_q)
    else:
        density = block_density(index, cu_q, None, seqused_k=seqused)
    cached = f" ({seq_len - q_len} cached tokens before them)" if seq_len != q_len else ""
    logger.info("FlashPrefill %s: 1 prefill(s), %d tokens, kept %.1f%% of causal key blocks%s", layer_name, q_len,
                100.0 * density, cached)
