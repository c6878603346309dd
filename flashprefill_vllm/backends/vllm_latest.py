"""FlashPrefill as subclasses of vLLM's FlashAttention backend, for the registry API (vLLM 0.13+; written against
0.26.0's ``vllm/v1/attention/backends/flash_attn.py``).

Only long fresh prefills change path: the builder plans once per step which requests they are (CPU lengths, no
sync), and the impl runs stock FlashAttention on everything else, then the sparse op on those rows of the same
output buffer. Anything it cannot prove eligible goes to ``super().forward`` unchanged, so decode-only batches (and
the FULL CUDA graphs captured for them) are exactly stock.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata, FlashAttentionMetadataBuilder)

from .common import SplitFields, build_split, init_builder, init_impl, route_forward, warm_up_kernels


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
    """The same backend in the ``CUSTOM`` slot, for ``--attention-backend CUSTOM`` (vLLM requires ``get_name()`` to
    be the member's name). Note that CUSTOM applies to every attention layer of the model."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"


@dataclasses.dataclass
class FlashPrefillMetadata(SplitFields, FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's split (``common.SplitFields``)."""


class FlashPrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder that also plans which requests run sparse.

    ``reorder_batch_threshold = 1`` makes model runner V1 order each batch decode -> extend -> fresh prefill, so
    fresh prefills form the tail. CUDA-graph support is ``UNIFORM_BATCH`` (FA3 alone declares ``ALWAYS``): batches
    with a prefill then run attention eagerly (piecewise graphs) and only uniform decode batches replay FULL graphs,
    which always take the stock path.
    """

    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        init_builder(self, vllm_config, kv_cache_spec)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FlashPrefillMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cam = common_attn_metadata
        # CPU lengths only: the deprecated ``seq_lens_cpu`` property would copy from the GPU (a host sync). The upper
        # bound is exact for prefill rows, which is all the plan needs (see plan_split).
        seq_lens_cpu = cam.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = getattr(cam, "_seq_lens_cpu", None)
        return build_split(self, FlashPrefillMetadata, base, cam, seq_lens_cpu)

    def update_block_table(self, metadata: FlashPrefillMetadata, blk_table: torch.Tensor,
                           slot_mapping: torch.Tensor) -> FlashPrefillMetadata:
        """Reuse the metadata for another KV-cache group; the head's and the tail's slices must follow the new block
        table."""
        new = super().update_block_table(metadata, blk_table, slot_mapping)
        if getattr(new, "fp_head_metadata", None) is not None:
            new.fp_head_metadata = dataclasses.replace(
                new.fp_head_metadata, block_table=blk_table[:new.fp_num_head_reqs],
                slot_mapping=slot_mapping[:new.fp_num_head_tokens])
        if getattr(new, "fp_tail_block_table", None) is not None:
            new.fp_tail_block_table = blk_table[new.fp_num_head_reqs:new.fp_num_head_reqs + new.fp_num_tail_reqs]
        return new


class FlashPrefillImpl(FlashAttentionImpl):
    """FlashAttention's impl that runs the fresh-prefill tail of a batch through the sparse op.

    Layers that cannot run sparse (``common.dense_fallback_reason``) are decided once here and always call
    ``super().forward``; the reason is logged once per process.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        init_impl(self)
        if self.fp_fallback_reason is None:
            # The op reads the query in the model dtype. (Only FP8 caches make vLLM pre-quantize the query, and
            # those layers stay dense, keeping FlashAttention's setting.) An attribute here since 0.26, not a method.
            self.supports_quant_query_input = False

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        warm_up_kernels(self, act_dtype)

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        # The KV cache already holds every row (do_kv_cache_update runs before forward).
        return route_forward(self, super().forward, FlashPrefillMetadata, layer, query, key, value, kv_cache,
                             attn_metadata, output, output_scale, output_block_scale)
