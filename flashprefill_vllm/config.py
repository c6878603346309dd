"""Knobs of sparse prefill, in one frozen dataclass.

Every consumer (the op, the vLLM backend, benchmarks) receives a :class:`FlashPrefillConfig`; only this module
validates values, so every error names the knob, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math

# Selection block sizes the kernels are built for (tokens per query block and per key block).
ALLOWED_BLOCK_SIZES = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class FlashPrefillConfig:
    # Max-relative threshold: keep key block j iff its energy >= alpha * (largest energy of the row).
    # Larger alpha keeps fewer blocks. 0.1 lies between the published per-model values (0.08-0.18 at block 128).
    alpha: float = 0.1
    # Tokens per query block and per key block (selection granularity).
    block_size: int = 128
    # First key blocks every query block keeps (attention sinks).
    num_sink_blocks: int = 2
    # Key blocks kept up to the diagonal (local window, diagonal included); at least 1 so no row is left empty.
    num_local_blocks: int = 4
    # Last query blocks of each sequence that attend densely (they produce the first generated token).
    num_dense_tail_blocks: int = 2
    # Sequences whose key length is below this attend densely (selection does not pay off on short prompts).
    min_sparse_len: int = 8192
    # True: one block list per KV group, shared by its query heads (cheaper); False: one list per query head.
    gqa_shared_index: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 < a <= 1.0:
            raise ValueError(f"alpha must be a number in (0, 1]; got {a!r}")
        if self.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {ALLOWED_BLOCK_SIZES}; got {self.block_size!r}")
        for name, lo in (("num_sink_blocks", 0), ("num_local_blocks", 1), ("num_dense_tail_blocks", 0),
                         ("min_sparse_len", 0)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}; got {val!r}")
        if not isinstance(self.gqa_shared_index, bool):
            raise ValueError(f"gqa_shared_index must be a bool; got {self.gqa_shared_index!r}")

    def replace(self, **changes) -> "FlashPrefillConfig":
        """A copy with some fields changed; ``None`` values are ignored (so callers can forward optional kwargs)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown FlashPrefillConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes) if changes else self
