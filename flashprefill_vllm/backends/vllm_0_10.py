"""FlashPrefill on vLLM 0.10.0's V1 FlashAttention classes (``vllm/v1/attention/backends/flash_attn.py``).

``loaders/vllm_0_10.py`` makes the CUDA platform return this backend where it would return FlashAttention (0.10 has
no registry). The behaviour lives in the mixins (``planning``, ``sparse_forward``); what is here is what 0.10 does
differently, one reason each:

- ``get_metadata_cls``: 0.10's backend names its metadata class, so ours must be named here.
- builder ``__init__(kv_cache_spec, vllm_config, device)``: 0.10's signature (no ``layer_names``).
- ``reorder_batch``: 0.10 reorders through this builder method (later releases read ``reorder_batch_threshold``).
- ``can_run_in_cudagraph``: 0.10 asks per batch (later releases declare ``_cudagraph_support``).
- ``use_cascade_attention`` False: 0.10's builder would cascade ≥ 8 requests sharing a prefix, hiding the fresh rows.
- ``fp_reshape_and_cache``: 0.10's ``forward`` writes the KV cache itself, so the sparse part's rows are written too.
- no kernel warm-up: 0.10's impl defines no ``process_weights_after_loading`` to extend (the first long prompt
  compiles the kernels).
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.attention.utils.fa_utils import reshape_and_cache_flash
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata, FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.utils import CommonAttentionMetadata, reorder_batch_to_split_decodes_and_prefills

from .planning import SparsePartFields, SparsePlanning
from .sparse_forward import SparseForward


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
class FlashPrefillMetadata(SparsePartFields, FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's plan (``planning.SparsePartFields``)."""


class FlashPrefillMetadataBuilder(SparsePlanning, FlashAttentionMetadataBuilder):
    """FlashAttention's builder that also plans the sparse part (``planning.SparsePlanning``, whose ``build`` reads
    this release's exact ``seq_lens_cpu``). ``reorder_batch`` puts
    requests of one scheduled token (decodes) first; 0.10 keeps extends and fresh prefills in one region after them,
    and under ``full_cuda_graph=True`` only batches without a prefill replay the full graph."""

    fp_metadata_cls = FlashPrefillMetadata

    def __init__(self, kv_cache_spec, vllm_config, device):
        super().__init__(kv_cache_spec, vllm_config, device)
        self._fp_init_planning(vllm_config, kv_cache_spec)

    def reorder_batch(self, input_batch, scheduler_output) -> bool:
        # NOTE: 0.10's model runner lets only the first KV-cache group's builder reorder and asserts that the others
        # find nothing to move; on an already reordered batch this returns False, so several FlashPrefill groups agree.
        return reorder_batch_to_split_decodes_and_prefills(input_batch, scheduler_output, decode_threshold=1)

    def can_run_in_cudagraph(self, common_attn_metadata: CommonAttentionMetadata) -> bool:
        return common_attn_metadata.max_query_len <= 1

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False


class FlashPrefillImpl(SparseForward, FlashAttentionImpl):
    """FlashAttention's impl that runs the sparse part of a step through the op (``sparse_forward.SparseForward``)."""

    fp_reshape_and_cache = staticmethod(reshape_and_cache_flash)

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None) -> torch.Tensor:
        return self._fp_forward(super().forward, layer, query, key, value, kv_cache, attn_metadata, output,
                                output_scale)
