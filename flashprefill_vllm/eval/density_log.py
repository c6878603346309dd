"""Reading the density lines the plugin logs with ``FLASHPREFILL_LOG_DENSITY=1``.

One line per layer and sparse prefill step, e.g.::

    FlashPrefill model.layers.3.self_attn.attn: 1 prefill(s), 8192 tokens, kept 12.3% of causal key blocks
    FlashPrefill model.layers.3.self_attn.attn: 1 prefill(s), 2048 tokens, kept 9.8% of causal key blocks (6144 cached tokens before them)

The second form is a later chunk of a prompt (or the new tokens after a prefix-cache hit): its queries attend over
the cached tokens too. :func:`prompt_density` folds the chunks of one prompt back into the density of the whole
prompt (each chunk weighted by its causally visible key blocks; rows no line covers ran stock FlashAttention, i.e.
densely), so a chunked prefill can be compared with the same prompt prefilled at once.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Iterable

import torch

from ..ops.block_sparse_index import causal_block_counts
from ..ops.utils import cdiv

LINE_RE = re.compile(r"FlashPrefill (\S+): 1 prefill\(s\), (\d+) tokens, kept ([0-9.]+)% of causal key blocks"
                     r"(?: \((\d+) cached tokens before them\))?")


@dataclass(frozen=True)
class DensityLine:
    layer: str
    tokens: int          # query tokens of this prefill step (the chunk)
    cached: int          # tokens before them in the sequence (0: a fresh prefill)
    density: float       # kept fraction of the causally visible key blocks


def parse_line(line: str) -> DensityLine | None:
    m = LINE_RE.search(line)
    if m is None:
        return None
    return DensityLine(m.group(1), int(m.group(2)), int(m.group(4) or 0), float(m.group(3)) / 100.0)


def parse(text: str) -> list[DensityLine]:
    return [d for d in map(parse_line, text.splitlines()) if d is not None]


def visible_blocks(tokens: int, cached: int, block_size: int) -> int:
    """Causally visible (query block, key block) pairs of ``tokens`` queries after ``cached`` tokens, bottom-right
    aligned: the denominator of a density line."""
    if tokens <= 0:
        return 0
    cu_q = torch.tensor([0, tokens])
    counts = causal_block_counts(cu_q, None, cdiv(tokens, block_size), block_size,
                                 seqused_k=torch.tensor([cached + tokens]))
    return int(counts.sum())


def prompt_density(lines: Iterable[DensityLine], prompt_len: int, block_size: int) -> float:
    """Density of one prompt's prefill, whole or in chunks: per layer, the chunks' densities weighted by their
    visible blocks, with the rows no line covers counted as dense (they ran stock); then the mean over layers.
    ``lines`` are that prompt's lines only. 1.0 when none (the whole prompt ran stock)."""
    by_layer: dict[str, list[DensityLine]] = {}
    for d in lines:
        if d.cached + d.tokens > prompt_len:
            raise ValueError(f"density line {d} reaches past the prompt's {prompt_len} tokens")
        by_layer.setdefault(d.layer, []).append(d)
    if not by_layer:
        return 1.0
    total = visible_blocks(prompt_len, 0, block_size)
    per_layer = []
    for chunks in by_layer.values():
        covered = sum(visible_blocks(d.tokens, d.cached, block_size) for d in chunks)
        kept = sum(d.density * visible_blocks(d.tokens, d.cached, block_size) for d in chunks)
        per_layer.append((kept + max(total - covered, 0)) / total)
    return statistics.fmean(per_layer)


def by_chunk(lines: Iterable[DensityLine]) -> list[dict]:
    """Per prefill step of one prompt, in order of position: its start (cached tokens), its tokens and the mean
    density over layers."""
    steps: dict[tuple[int, int], list[float]] = {}
    for d in lines:
        steps.setdefault((d.cached, d.tokens), []).append(d.density)
    return [{"start": c, "tokens": t, "density": statistics.fmean(v), "layers": len(v)}
            for (c, t), v in sorted(steps.items())]
