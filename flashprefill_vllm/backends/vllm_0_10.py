"""FlashPrefill as subclasses of vLLM 0.10.0's V1 FlashAttention backend (``vllm/v1/attention/backends/flash_attn.py``).

``loaders/vllm_0_10.py`` makes the CUDA platform return this backend where it would return FlashAttention (0.10 has
no registry). What differs from the 0.13+ module: the builder takes ``(kv_cache_spec, vllm_config, device)`` and
reorders through its ``reorder_batch`` method; ``forward`` writes the KV cache itself, so the sparse tail's rows
are written here; full CUDA graphs are declared per batch with ``can_run_in_cudagraph``. The routing itself lives in
``common.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.attention.utils.fa_utils import reshape_and_cache_flash
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata, FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.utils import CommonAttentionMetadata, reorder_batch_to_split_decodes_and_prefills

from .common import SplitFields, build_split, init_builder, init_impl, route_forward


class FlashPrefillBackend(FlashAttentionBackend):
    """Keeps FlashAttention's name (``FLASH_ATTN_VLLM_V1``, which vLLM maps back to its enum, e.g. in the nixl
    connector), KV-cache layout and head-size/dtype lists."""

    @staticmethod
    def get_impl_cls() -> type["FlashPrefillImpl"]:
        return FlashPrefillImpl

    @staticmethod
    def get_metadata_cls() -> type["FlashPrefillMetadata"]:
        return FlashPrefillMetadata

    @staticmethod
    def get_builder_cls() -> type["FlashPrefillMetadataBuilder"]:
        return FlashPrefillMetadataBuilder


@dataclasses.dataclass
class FlashPrefillMetadata(SplitFields, FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's split (``common.SplitFields``)."""


class FlashPrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder that also plans which requests run sparse.

    ``reorder_batch`` puts requests of one scheduled token (decodes) first; 0.10 keeps extends and fresh prefills in
    one region after them, so the tail is the longest run of eligible fresh prefills at the end (``plan_split``).
    Cascade attention is off (its shared-prefix split would hide the fresh rows), and under
    ``full_cuda_graph=True`` only batches without a prefill replay the full graph.
    """

    def __init__(self, kv_cache_spec, vllm_config, device):
        super().__init__(kv_cache_spec, vllm_config, device)
        init_builder(self, vllm_config, kv_cache_spec)

    def reorder_batch(self, input_batch, scheduler_output) -> bool:
        # NOTE: 0.10's model runner lets only the first KV-cache group's builder reorder and asserts that the others
        # find nothing to move; on an already reordered batch this returns False, so several FlashPrefill groups agree.
        return reorder_batch_to_split_decodes_and_prefills(input_batch, scheduler_output, decode_threshold=1)

    def can_run_in_cudagraph(self, common_attn_metadata: CommonAttentionMetadata) -> bool:
        return common_attn_metadata.max_query_len <= 1

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FlashPrefillMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return build_split(self, FlashPrefillMetadata, base, common_attn_metadata,
                           common_attn_metadata.seq_lens_cpu)


class FlashPrefillImpl(FlashAttentionImpl):
    """FlashAttention's impl that runs the fresh-prefill tail of a batch through the sparse op (``common.py``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        init_impl(self)

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None) -> torch.Tensor:
        return route_forward(self, super().forward, FlashPrefillMetadata, layer, query, key, value, kv_cache,
                             attn_metadata, output, output_scale, reshape_and_cache_flash=reshape_and_cache_flash)
