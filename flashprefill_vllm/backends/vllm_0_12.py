"""FlashPrefill as subclasses of vLLM 0.12.0's V1 FlashAttention backend (``vllm/v1/attention/backends/flash_attn.py``).

``loaders/vllm_0_12.py`` registers this backend over the ``FLASH_ATTN`` slot of ``vllm.attention.backends.registry``
(and in ``CUSTOM``). What differs from the 0.13+ module: ``forward`` writes the KV cache itself, so the sparse tail's
rows are written here; query pre-quantization is a method, ``supports_quant_query_input()``. The routing itself lives
in ``common.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.attention.utils.fa_utils import reshape_and_cache_flash
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadata, FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.utils import AttentionCGSupport, CommonAttentionMetadata

from .common import SplitFields, build_split, init_builder, init_impl, route_forward, warm_up_kernels


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
class FlashPrefillMetadata(SplitFields, FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's split (``common.SplitFields``)."""


class FlashPrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder that also plans which requests run sparse.

    ``reorder_batch_threshold = 1`` makes model runner V1 order each batch decode -> extend -> fresh prefill, so
    fresh prefills form the tail. CUDA-graph support is ``UNIFORM_BATCH`` (FA3 alone declares ``ALWAYS``): batches
    with a prefill then run attention eagerly (piecewise graphs) and only uniform decode batches replay FULL graphs,
    which always take the stock path. Cascade attention is off.
    """

    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        init_builder(self, vllm_config, kv_cache_spec)

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

    def supports_quant_query_input(self) -> bool:
        # The op reads the query in the model dtype. (Only FP8 caches make vLLM pre-quantize the query, and those
        # layers stay dense, keeping FlashAttention's answer.)
        return self.fp_fallback_reason is not None and super().supports_quant_query_input()

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        warm_up_kernels(self, act_dtype)

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        return route_forward(self, super().forward, FlashPrefillMetadata, layer, query, key, value, kv_cache,
                             attn_metadata, output, output_scale, output_block_scale,
                             reshape_and_cache_flash=reshape_and_cache_flash)
