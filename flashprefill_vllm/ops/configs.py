"""Fixed launch configurations per head_dim: nothing here depends on sequence length, so no length re-tuning.

Values were chosen by timing on an H100 (dense causal, 16K-32K, bf16): head_dim 64 (128, 64, 4 warps, 3 stages)
384 TFLOP/s; 128 (128, 128, 8, 3) 505-516; 256 (128, 64, 8, 2) 454. They are also valid for the interpreter.
"""

from __future__ import annotations

from typing import NamedTuple


class AttnLaunch(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class SelectLaunch(NamedTuple):
    rows: int
    k_tile: int
    num_warps: int
    num_stages: int


_ATTN = {
    64: AttnLaunch(128, 64, 4, 3),
    128: AttnLaunch(128, 128, 8, 3),
    256: AttnLaunch(128, 64, 8, 2),
}


def attn_launch(head_dim: int, block_size: int) -> AttnLaunch:
    cfg = _ATTN[head_dim]
    # A query tile never spans two selection blocks: each tile reads exactly one index row.
    return cfg._replace(block_m=min(cfg.block_m, block_size), block_n=min(cfg.block_n, block_size))


def select_launch(head_dim: int, block_size: int) -> SelectLaunch:
    # H100, 32K-64K, D=128: k_tile 32 / 4 warps was the fastest of six configs (0.47 ms vs 0.61 for k_tile 64).
    rows = min(block_size, 128 if head_dim <= 128 else 64)
    return SelectLaunch(rows=rows, k_tile=32, num_warps=4, num_stages=1)


def pool_rows(head_dim: int, block_size: int) -> int:
    return min(block_size, 64 if head_dim <= 128 else 32)
