"""FlashPrefill on vLLM 0.12.0's V1 FlashAttention classes (``vllm/v1/attention/backends/flash_attn.py``).

``loaders/vllm_0_12.py`` registers this backend over the ``FLASH_ATTN`` slot of ``vllm.attention.backends.registry``
(and in ``CUSTOM``). The behaviour lives in the mixins (``planning``, ``sparse_forward``); what is here is what 0.12
does differently, one reason each:

- ``_cudagraph_support = UNIFORM_BATCH``: steps with a prefill run attention eagerly; only uniform decode steps
  replay FULL graphs, and those always take the stock path (FA3 alone would declare ``ALWAYS``).
- ``_init_reorder_batch_threshold(1)``: model runner V1 then orders each step decode -> extend -> fresh prefill.
- ``use_cascade_attention`` False: 0.12's builder would cascade ≥ 8 requests sharing a prefix, hiding the fresh rows.
- ``fp_reshape_and_cache``: 0.12's ``forward`` writes the KV cache itself, so the sparse part's rows are written too.
- ``supports_quant_query_input()`` is a method in 0.12 (an attribute from 0.26 on).
- ``process_weights_after_loading(act_dtype)``: the hook for the kernel warm-up takes the dtype.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.attention.utils.fa_utils import reshape_and_cache_flash
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata, FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.utils import AttentionCGSupport

from .planning import SparsePartFields, SparsePlanning
from .sparse_forward import SparseForward


class FlashPrefillBackend(FlashAttentionBackend):
    """Serves the ``FLASH_ATTN`` slot (and ``CUSTOM``); keeps FlashAttention's name, which 0.12's experimental model
    runner V2 requires of every backend, its KV-cache layout and its support checks."""

    @staticmethod
    def get_impl_cls() -> type["FlashPrefillImpl"]:
        return FlashPrefillImpl

    @staticmethod
    def get_builder_cls() -> type["FlashPrefillMetadataBuilder"]:
        return FlashPrefillMetadataBuilder


@dataclasses.dataclass
class FlashPrefillMetadata(SparsePartFields, FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's plan (``planning.SparsePartFields``)."""


class FlashPrefillMetadataBuilder(SparsePlanning, FlashAttentionMetadataBuilder):
    """FlashAttention's builder that also plans the sparse part (``planning.SparsePlanning``, whose ``build`` reads
    this release's exact ``seq_lens_cpu``)."""

    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH
    fp_metadata_cls = FlashPrefillMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self._fp_init_planning(vllm_config, kv_cache_spec)

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False


class FlashPrefillImpl(SparseForward, FlashAttentionImpl):
    """FlashAttention's impl that runs the sparse part of a step through the op (``sparse_forward.SparseForward``)."""

    fp_reshape_and_cache = staticmethod(reshape_and_cache_flash)

    def supports_quant_query_input(self) -> bool:
        # The op reads the query in the model dtype. (Only FP8 caches make vLLM pre-quantize the query, and those
        # layers stay dense, keeping FlashAttention's answer.)
        return self.fp_stock_reason is not None and super().supports_quant_query_input()

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        self._fp_warm_up_kernels(act_dtype)

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        return self._fp_forward(super().forward, layer, query, key, value, kv_cache, attn_metadata, output,
                                output_scale, output_block_scale)
