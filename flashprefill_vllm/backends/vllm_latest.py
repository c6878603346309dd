"""FlashPrefill on vLLM's FlashAttention classes for the registry API (vLLM 0.13+; run on 0.26.0, checked against
0.32.0 in CI and against 0.34.0's sources in ``tests/legacy``).

The behaviour lives in the mixins (``planning``, ``sparse_forward``); what is here is what these releases do
differently from 0.10 / 0.12, one reason each:

- ``get_name()`` returns the slot's member name, and ``CUSTOM`` has its own class: from 0.24 on vLLM looks the
  backend up as ``AttentionBackendEnum[backend.get_name()]``.
- ``_cudagraph_support = UNIFORM_BATCH`` and ``_init_reorder_batch_threshold(1)``: as in 0.12.
- no ``use_cascade_attention`` override: a cascade step (0.26) runs stock, counted (0.32 dropped cascade from
  FlashAttention's metadata).
- ``_fp_seq_lens_cpu`` reads ``seq_lens_cpu_upper_bound`` (0.32+) or ``_seq_lens_cpu`` (0.26): CPU lengths, never the
  deprecated ``seq_lens_cpu`` property, which copies from the GPU (a host sync).
- ``update_block_table``: these releases reuse one step's metadata for another KV-cache group.
- ``supports_quant_query_input`` is an attribute (a method in 0.12).
- no ``fp_reshape_and_cache``: ``do_kv_cache_update`` writes every row of the KV cache before ``forward``.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata, FlashAttentionMetadataBuilder)

from .planning import SparsePartFields, SparsePlanning
from .sparse_forward import SparseForward


class FlashPrefillBackend(FlashAttentionBackend):
    """Serves the ``FLASH_ATTN`` slot (registered over it when ``FLASHPREFILL=1``); keeps FlashAttention's name,
    KV-cache layout and support checks."""

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"

    @staticmethod
    def get_impl_cls() -> type["FlashPrefillImpl"]:
        return FlashPrefillImpl

    @staticmethod
    def get_builder_cls() -> type["FlashPrefillMetadataBuilder"]:
        return FlashPrefillMetadataBuilder


class FlashPrefillCustomBackend(FlashPrefillBackend):
    """The same backend in the ``CUSTOM`` slot, for ``--attention-backend CUSTOM``. Note that CUSTOM applies to every
    attention layer of the model."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"


@dataclasses.dataclass
class FlashPrefillMetadata(SparsePartFields, FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's plan (``planning.SparsePartFields``)."""


class FlashPrefillMetadataBuilder(SparsePlanning, FlashAttentionMetadataBuilder):
    """FlashAttention's builder that also plans the sparse part (``planning.SparsePlanning``)."""

    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH
    fp_metadata_cls = FlashPrefillMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self._fp_init_planning(vllm_config, kv_cache_spec)

    def _fp_seq_lens_cpu(self, cam: CommonAttentionMetadata) -> torch.Tensor | None:
        # The upper bound is exact for prefill rows, which is all the plan needs (see split.plan_split).
        seq_lens_cpu = getattr(cam, "seq_lens_cpu_upper_bound", None)
        return getattr(cam, "_seq_lens_cpu", None) if seq_lens_cpu is None else seq_lens_cpu

    def update_block_table(self, metadata: FlashPrefillMetadata, blk_table: torch.Tensor,
                           slot_mapping: torch.Tensor) -> FlashPrefillMetadata:
        """Reuse the metadata for another KV-cache group; the stock part's and the sparse part's slices must follow
        the new block table."""
        new = super().update_block_table(metadata, blk_table, slot_mapping)
        if getattr(new, "fp_stock_metadata", None) is not None:
            new.fp_stock_metadata = dataclasses.replace(
                new.fp_stock_metadata, block_table=blk_table[:new.fp_num_stock_reqs],
                slot_mapping=slot_mapping[:new.fp_num_stock_tokens])
        if getattr(new, "fp_sparse_block_table", None) is not None:
            new.fp_sparse_block_table = blk_table[new.fp_num_stock_reqs:new.fp_num_stock_reqs + new.fp_num_sparse_reqs]
        return new


class FlashPrefillImpl(SparseForward, FlashAttentionImpl):
    """FlashAttention's impl that runs the sparse part of a step through the op (``sparse_forward.SparseForward``).
    Layers that cannot run sparse (``eligibility.layer_stock_reason``) always call ``super().forward``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.fp_stock_reason is None:
            # The op reads the query in the model dtype. (Only FP8 caches make vLLM pre-quantize the query, and
            # those layers stay dense, keeping FlashAttention's setting.)
            self.supports_quant_query_input = False

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        self._fp_warm_up_kernels(act_dtype)

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        return self._fp_forward(super().forward, layer, query, key, value, kv_cache, attn_metadata, output,
                                output_scale, output_block_scale)
