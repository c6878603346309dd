"""Per-step planning in the metadata builder: which requests of the step form the sparse part (``split.py``), and
the step's metadata carrying that plan to the impl. Runs on the CPU, once per step and KV-cache group, with no host
sync. No vLLM import: the version builders mix :class:`SparsePlanning` in.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .eligibility import Settings, settings
from .fallbacks import note_stock
from .split import SplitPlan, plan_split


@dataclasses.dataclass
class SparsePartFields:
    """FlashPrefill's per-step plan, added to a version's ``FlashAttentionMetadata``.

    Mix it in *before* that class (``class M(SparsePartFields, FlashAttentionMetadata)``): a dataclass orders fields
    from the last base to the first, so these defaulted fields come after FlashAttention's, and ``isinstance(m,
    FlashAttentionMetadata)`` still holds for vLLM's own checks. After the builder's reorder (``split.py`` draws the
    per-request timeline)::

        rows [0, fp_num_stock_tokens)                          requests [0, fp_num_stock_reqs): stock FlashAttention
        rows [fp_num_stock_tokens, + fp_num_sparse_tokens)     the next fp_num_sparse_reqs: the sparse op

    With ``fp_num_sparse_reqs == 0`` nothing runs sparse and the impl calls stock FlashAttention on the whole batch.
    Otherwise the stock part runs stock FlashAttention with ``fp_stock_metadata`` (``None`` when it is empty), and
    each sparse request runs the op: its rows are ``fp_sparse_cu_seqlens[i:i + 2]`` (int32, on the device, rebased to
    the sparse part), its lengths ``fp_sparse_query_lens[i]`` / ``fp_sparse_seq_lens[i]`` (CPU ints; equal for a
    fresh prefill), and for a request with cached context its sequence length and block-table row are
    ``fp_sparse_seqused[i]`` / ``fp_sparse_block_table[i]`` (slices of FlashAttention's own device tensors);
    ``fp_kv_block_size`` is the KV cache's tokens per page (the builder's ``kv_cache_spec.block_size``).
    """

    fp_num_stock_reqs: int = 0
    fp_num_stock_tokens: int = 0
    fp_stock_metadata: object | None = None
    fp_num_sparse_reqs: int = 0
    fp_num_sparse_tokens: int = 0
    fp_sparse_cu_seqlens: torch.Tensor | None = None
    fp_sparse_max_query_len: int = 0
    fp_sparse_query_lens: tuple[int, ...] = ()
    fp_sparse_seq_lens: tuple[int, ...] = ()
    fp_sparse_seqused: torch.Tensor | None = None
    fp_sparse_block_table: torch.Tensor | None = None
    fp_kv_block_size: int = 0


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def stock_step_reason(base, dcp_world_size: int = 1) -> str | None:
    """Why a whole step must run stock FlashAttention, or ``None``: batches using features the split does not carry
    over (cascade, per-request causality, multimodal prefix ranges, R-SWA, windows, DCP). Fields of ``base`` (the
    stock builder's metadata) are read with defaults because the metadata differs across releases (0.10 has no
    ``causal`` and no DCP; 0.32 dropped ``use_cascade`` and ``sliding_window`` and renamed ``mm_prefix_range_tensor``
    to ``mm_prefix_query_range_tensor``)."""
    if getattr(base, "use_cascade", False):
        return "steps with cascade attention"
    if getattr(base, "causal", True) is not True:
        return "steps with per-request (non-causal) attention masks"
    if (getattr(base, "mm_prefix_range_tensor", None) is not None
            or getattr(base, "mm_prefix_query_range_tensor", None) is not None):
        return "steps with multimodal prefix ranges"
    if getattr(base, "rswa_prefix_lens", None) is not None:
        return "steps with R-SWA prefix lengths"
    if getattr(base, "sliding_window", None) not in (None, (-1, -1)):
        return "steps with a sliding window in their metadata"
    if dcp_world_size != 1:
        return "steps under decode context parallelism (DCP)"
    return None


def sparse_part_metadata(md_cls: type, base, plan: SplitPlan | None, device: torch.device, kv_block_size: int):
    """``md_cls`` (a :class:`SparsePartFields` subclass of ``type(base)``) holding ``base``'s fields plus ``plan``.

    ``base`` is the stock builder's metadata for the whole batch; ``plan`` is ``None`` (or has no sparse part) when
    nothing runs sparse, and then ``base`` itself is returned (the impl sees stock metadata and takes the stock path).
    The stock part keeps FlashAttention's own tensors, sliced to its requests: slicing the leading requests leaves
    ``query_start_loc[:k + 1]`` valid as is. Only the sparse part's cu_seqlens go to the device (non-blocking copy
    from pinned memory on CUDA), so ``forward`` never syncs the host.
    """
    if plan is None or not plan.has_sparse:
        # Nothing runs sparse: the stock metadata as is (no per-step copy; every decode step takes this path).
        return base
    md = md_cls(**{name: getattr(base, name) for name in _field_names(type(base))})
    k, h = plan.num_stock_reqs, plan.num_stock_tokens
    if k:
        md.fp_stock_metadata = dataclasses.replace(
            base, num_actual_tokens=h, max_query_len=plan.stock_max_query_len,
            query_start_loc=base.query_start_loc[:k + 1], max_seq_len=plan.stock_max_seq_len,
            seq_lens=base.seq_lens[:k], block_table=base.block_table[:k], slot_mapping=base.slot_mapping[:h],
            # FA3's ahead-of-time schedule was made for the whole batch.
            scheduler_metadata=None)
    cu = plan.sparse_cu_seqlens
    if device.type == "cuda":
        cu = cu.pin_memory()
    md.fp_num_stock_reqs, md.fp_num_stock_tokens = k, h
    md.fp_num_sparse_reqs, md.fp_num_sparse_tokens = plan.num_sparse_reqs, plan.num_sparse_tokens
    md.fp_sparse_cu_seqlens = cu.to(device, non_blocking=True)
    md.fp_sparse_max_query_len = plan.sparse_max_query_len
    md.fp_sparse_query_lens, md.fp_sparse_seq_lens = plan.sparse_query_lens, plan.sparse_seq_lens
    end = k + plan.num_sparse_reqs
    md.fp_sparse_seqused = base.seq_lens[k:end]
    md.fp_sparse_block_table = base.block_table[k:end]
    md.fp_kv_block_size = kv_block_size
    return md


class SparsePlanning:
    """Builder mixin: plan each step's sparse part after FlashAttention's own ``build``.

    A version builder (``class B(SparsePlanning, FlashAttentionMetadataBuilder)``) sets ``fp_metadata_cls`` (its
    :class:`SparsePartFields` metadata class) and calls :meth:`_fp_init_planning` at the end of its ``__init__``.
    Reads ``self.device`` and, where the release has it, ``self.dcp_world_size`` (FlashAttention's builder
    attributes).
    """

    fp_metadata_cls: type
    fp_settings: Settings
    fp_kv_block_size: int

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        """FlashAttention's metadata for the step, with the step's plan (:meth:`_fp_build`)."""
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return self._fp_build(self.fp_metadata_cls, base, common_attn_metadata,
                              self._fp_seq_lens_cpu(common_attn_metadata))

    def _fp_seq_lens_cpu(self, cam) -> torch.Tensor | None:
        """The step's sequence lengths on the CPU (``None`` if the metadata has none): 0.10 and 0.12 keep an exact
        ``seq_lens_cpu`` field."""
        return cam.seq_lens_cpu

    def _fp_init_planning(self, vllm_config, kv_cache_spec) -> None:
        """Set ``fp_settings`` (the served model's settings) and ``fp_kv_block_size`` (tokens per KV-cache page)."""
        self.fp_settings = settings(vllm_config)
        self.fp_kv_block_size = kv_cache_spec.block_size

    def _fp_may_hold_sparse_rows(self, cam) -> bool:
        """Whether any request of the step can be eligible: one needs at least ``min_sparse_len`` new tokens (fresh
        prefill) or at least one block of them over cached context (chunk, prefix hit), so none is when the longest
        query is shorter than both (every decode step)."""
        config = self.fp_settings.config
        return cam.max_query_len >= max(min(config.min_sparse_len, config.block_size), 1)

    def _fp_plan(self, cam, seq_lens_cpu) -> SplitPlan | None:
        """The step's split from the ``CommonAttentionMetadata`` ``cam`` and CPU ``seq_lens_cpu``; ``None`` when no
        request can be eligible (:meth:`_fp_may_hold_sparse_rows`)."""
        if not self._fp_may_hold_sparse_rows(cam):
            return None
        config = self.fp_settings.config
        return plan_split(cam.query_start_loc_cpu, seq_lens_cpu, config.min_sparse_len, num_reqs=cam.num_reqs,
                          min_query_len=config.block_size)

    def _fp_build(self, md_cls: type, base, cam, seq_lens_cpu):
        """``base`` (FlashAttention's metadata for the step) with the step's plan (:func:`sparse_part_metadata`), or
        ``base`` itself when nothing runs sparse. Every reason a step that could hold long prefills runs stock is
        counted (:func:`fallbacks.note_stock`)."""
        if not self._fp_may_hold_sparse_rows(cam):
            return base                                 # decode-only and short steps: nothing to note
        reason = ("steps without CPU sequence lengths" if seq_lens_cpu is None
                  else stock_step_reason(base, getattr(self, "dcp_world_size", 1)))
        if reason is not None:
            note_stock(reason)
            return base
        plan = self._fp_plan(cam, seq_lens_cpu)
        if plan.num_eligible_kept_stock:
            note_stock("long prefills before a request that cannot run sparse (batch order)")
        return sparse_part_metadata(md_cls, base, plan, self.device, self.fp_kv_block_size)
