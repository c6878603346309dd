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

from .common import dense_fallback_reason, log_dense_fallback, run_sparse_tail, settings
from .split import plan_split

_FA_FIELDS = tuple(f.name for f in dataclasses.fields(FlashAttentionMetadata))


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
class FlashPrefillMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's split (see ``backends/split.py`` for the timeline).

    With ``fp_num_tail_reqs == 0`` nothing runs sparse and the impl calls stock FlashAttention on the whole batch.
    Otherwise requests ``[0, fp_num_head_reqs)`` (rows ``[0, fp_num_head_tokens)``) run stock FlashAttention with
    ``fp_head_metadata`` (``None`` when that head is empty), and the fresh prefills in rows
    ``[fp_num_head_tokens, fp_num_head_tokens + fp_num_tail_tokens)`` run the sparse op with the rebased int32
    ``fp_tail_cu_seqlens`` (on the device) and ``fp_tail_max_len``.
    """

    fp_num_head_reqs: int = 0
    fp_num_head_tokens: int = 0
    fp_head_metadata: FlashAttentionMetadata | None = None
    fp_num_tail_reqs: int = 0
    fp_num_tail_tokens: int = 0
    fp_tail_cu_seqlens: torch.Tensor | None = None
    fp_tail_max_len: int = 0


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
        self.fp_settings = settings()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FlashPrefillMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md = FlashPrefillMetadata(**{name: getattr(base, name) for name in _FA_FIELDS})
        cam = common_attn_metadata
        if not self._may_run_sparse(base, cam):
            return md
        # CPU lengths only: the deprecated ``seq_lens_cpu`` property would copy from the GPU (a host sync). The upper
        # bound is exact for prefill rows, which is all the plan needs (see plan_split).
        seq_lens_cpu = cam.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = cam._seq_lens_cpu
        if seq_lens_cpu is None:
            return md
        plan = plan_split(cam.query_start_loc_cpu, seq_lens_cpu, self.fp_settings.config.min_sparse_len,
                          num_reqs=cam.num_reqs)
        if not plan.has_tail:
            return md
        k, h = plan.num_head_reqs, plan.num_head_tokens
        if k:
            md.fp_head_metadata = dataclasses.replace(
                base, num_actual_tokens=h, max_query_len=plan.head_max_query_len,
                query_start_loc=base.query_start_loc[:k + 1], max_seq_len=plan.head_max_seq_len,
                seq_lens=base.seq_lens[:k], block_table=base.block_table[:k], slot_mapping=base.slot_mapping[:h],
                # FA3's ahead-of-time schedule was made for the whole batch.
                scheduler_metadata=None)
        cu = plan.tail_cu_seqlens
        if self.device.type == "cuda":
            cu = cu.pin_memory()
        md.fp_num_head_reqs, md.fp_num_head_tokens = k, h
        md.fp_num_tail_reqs, md.fp_num_tail_tokens = plan.num_tail_reqs, plan.num_tail_tokens
        md.fp_tail_cu_seqlens = cu.to(self.device, non_blocking=True)
        md.fp_tail_max_len = plan.tail_max_len
        return md

    def _may_run_sparse(self, base: FlashAttentionMetadata, cam: CommonAttentionMetadata) -> bool:
        """Whether this batch may hold sparse rows at all: a fresh prefill has query_len == seq_len, so none can be
        long enough when the longest query is short (every decode step), and batches using features the split does
        not carry over (cascade, per-request causality, multimodal prefix ranges, R-SWA, windows, DCP) stay stock."""
        return (cam.max_query_len >= max(self.fp_settings.config.min_sparse_len, 1)
                and not base.use_cascade
                and base.causal is True
                and base.mm_prefix_range_tensor is None
                and base.rswa_prefix_lens is None
                and base.sliding_window in (None, (-1, -1))
                and self.dcp_world_size == 1)

    def update_block_table(self, metadata: FlashPrefillMetadata, blk_table: torch.Tensor,
                           slot_mapping: torch.Tensor) -> FlashPrefillMetadata:
        """Reuse the metadata for another KV-cache group; the head's slices must follow the new block table."""
        new = super().update_block_table(metadata, blk_table, slot_mapping)
        if new.fp_head_metadata is not None:
            new.fp_head_metadata = dataclasses.replace(
                new.fp_head_metadata, block_table=blk_table[:new.fp_num_head_reqs],
                slot_mapping=slot_mapping[:new.fp_num_head_tokens])
        return new


class FlashPrefillImpl(FlashAttentionImpl):
    """FlashAttention's impl that runs the fresh-prefill tail of a batch through the sparse op.

    Layers that cannot run sparse (``common.dense_fallback_reason``) are decided once here and always call
    ``super().forward``; the reason is logged once per process.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fp_settings = settings()
        # The model dtype is the default dtype while vLLM builds layers (vLLM's Attention reads it the same way).
        self.fp_fallback_reason = dense_fallback_reason(
            head_size=self.head_size, dtype=torch.get_default_dtype(), kv_cache_dtype=self.kv_cache_dtype,
            sliding_window=self.sliding_window, alibi_slopes=self.alibi_slopes,
            logits_soft_cap=self.logits_soft_cap, sinks=self.sinks, attn_type=self.attn_type,
            kv_sharing_target_layer_name=self.kv_sharing_target_layer_name, dcp_world_size=self.dcp_world_size,
            pcp_world_size=self.pcp_world_size)
        if self.fp_fallback_reason is not None:
            log_dense_fallback(self.fp_fallback_reason)
        else:
            # The op reads the query in the model dtype. (Only FP8 caches make vLLM pre-quantize the query, and
            # those layers stay dense above, keeping FlashAttention's setting.)
            self.supports_quant_query_input = False

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: FlashAttentionMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        md = attn_metadata
        if (self.fp_fallback_reason is not None or not isinstance(md, FlashPrefillMetadata)
                or md.fp_num_tail_reqs == 0 or output_scale is not None or output_block_scale is not None):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if md.fp_head_metadata is not None:
            super().forward(layer, query, key, value, kv_cache, md.fp_head_metadata, output)
        # The KV cache already holds these rows (do_kv_cache_update runs before forward), so later decode and
        # chunk steps read them back through stock FlashAttention.
        run_sparse_tail(query, key, value, output, start=md.fp_num_head_tokens,
                        end=md.fp_num_head_tokens + md.fp_num_tail_tokens, cu_seqlens=md.fp_tail_cu_seqlens,
                        max_len=md.fp_tail_max_len, scale=self.scale, num_heads=self.num_heads,
                        num_kv_heads=self.num_kv_heads, head_size=self.head_size, settings=self.fp_settings,
                        layer_name=getattr(layer, "layer_name", "?"))
        return output
