"""Version-agnostic parts of the FlashPrefill backend: settings, per-layer eligibility, the per-step split metadata
and the split forward (stock FlashAttention on the head rows, the sparse op on the fresh-prefill tail).

No vLLM import here: the version modules (``vllm_0_10.py``, ``vllm_0_12.py``, ``vllm_latest.py``) subclass that
version's FlashAttention classes and call these functions, which are unit-testable on CPU (CPU tensors make the op
run its plain-torch reference). Every FlashAttention attribute read here (metadata fields ``num_actual_tokens``,
``max_query_len``, ``query_start_loc``, ``max_seq_len``, ``seq_lens``, ``block_table``, ``slot_mapping``,
``scheduler_metadata``; impl attributes) has the same name in vLLM 0.10, 0.12 and 0.13+.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from ..config import FlashPrefillConfig, env_log_density
from ..ops import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, block_density, flash_prefill_varlen_func
from ..presets import Preset, active_preset, config_for_layer, model_identity
from .fallbacks import note_stock
from .split import SplitPlan, plan_split

logger = logging.getLogger(__name__)

# KV-cache dtypes whose cache holds the model dtype ("auto" = the model's): the fresh K/V the op reads then match
# what stock FlashAttention reads back from the cache. Quantized caches (fp8*, nvfp4, ...) stay dense.
UNQUANTIZED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the backend reads from the environment once per process (the plugin validated it at registration):
    the global ``config`` (``FLASHPREFILL_*`` with the ``FLASHPREFILL_PRESET`` applied), the ``preset`` whose
    per-layer alphas apply (``None`` for none) and whether to log densities."""

    config: FlashPrefillConfig
    log_density: bool
    preset: Preset | None = None


def settings(vllm_config=None) -> Settings:
    """The process's :class:`Settings` for the served model (``vllm_config``: vLLM's ``VllmConfig``, or ``None`` for
    the one vLLM is building now), parsed once from the ``FLASHPREFILL_*`` variables.

    Raises ``ValueError`` naming the variable on an invalid value (reached only with ``--attention-backend CUSTOM``
    and the toggle off, since otherwise ``register()`` has already rejected it at start-up).
    """
    if vllm_config is None:
        vllm_config = _current_vllm_config()
    return _settings(*model_identity(vllm_config))


@functools.cache
def _settings(model: str | None, architectures: tuple[str, ...]) -> Settings:
    active = active_preset(model, architectures)
    return Settings(config=active.config, log_density=env_log_density(), preset=active.preset)


def _settings_cache_clear() -> None:
    """Forget the parsed settings (and the resolved preset): the next :func:`settings` reads the environment."""
    _settings.cache_clear()
    active_preset.cache_clear()


settings.cache_clear = _settings_cache_clear  # type: ignore[attr-defined]


def _current_vllm_config():
    """vLLM's config while it builds the model (where impls are created); ``None`` outside vLLM."""
    try:
        from vllm.config import get_current_vllm_config
    except ImportError:
        return None
    try:
        return get_current_vllm_config()
    except Exception:  # noqa: BLE001 - an unset config only means "unknown model": the preset falls back
        return None


def dense_fallback_reason(*, head_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                          sliding_window: tuple[int, int] | None, alibi_slopes, logits_soft_cap: float | None,
                          sinks, attn_type: str, kv_sharing_target_layer_name: str | None,
                          dcp_world_size: int, pcp_world_size: int) -> str | None:
    """Why a layer with these attributes must run stock FlashAttention for every request, or ``None`` if its fresh
    prefills can run sparse. The arguments are the FlashAttention impl's attributes after its ``__init__``."""
    if attn_type != "decoder":
        return f"attention type {attn_type!s} (only causal decoder self-attention runs sparse)"
    if sliding_window is not None and tuple(sliding_window) != (-1, -1):
        return "sliding-window attention"
    if alibi_slopes is not None:
        return "ALiBi"
    if logits_soft_cap:
        return "logits soft-cap"
    if sinks is not None:
        return "learned attention sinks"
    if kv_sharing_target_layer_name is not None:
        return "KV cache shared with another layer (no fresh K/V)"
    if head_size not in SUPPORTED_HEAD_DIMS:
        return f"head size {head_size} (FlashPrefill supports {SUPPORTED_HEAD_DIMS})"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (FlashPrefill supports float16 and bfloat16)"
    if kv_cache_dtype not in UNQUANTIZED_KV_CACHE_DTYPES:
        return f"kv_cache_dtype={kv_cache_dtype} (quantized KV cache)"
    if dcp_world_size > 1 or pcp_world_size > 1:
        return f"context parallelism (dcp={dcp_world_size}, pcp={pcp_world_size})"
    return None


def run_sparse_tail(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                    paged_kv: tuple[torch.Tensor, torch.Tensor] | None, md, *, scale: float, num_heads: int, num_kv_heads: int,
                    head_size: int, settings: Settings, layer_name: str) -> None:
    """Sparse causal attention of the tail requests of ``md`` (a :class:`SplitFields` metadata), written into their
    rows of ``output``; one op call per request, so the op's index is sized by that request alone.

    ``query``/``output`` are ``(tokens, num_heads, head_size)`` or ``(tokens, num_heads * head_size)`` and ``key``/
    ``value`` the matching ``num_kv_heads`` shapes: vLLM's strided views of the fused QKV buffer, padded past the
    real tokens. No copy: the op takes strided rows. A fresh prefill reads its keys from those rows; a request with
    cached context reads its whole sequence through its block-table row from ``paged_kv``, the key and value views of
    the paged KV cache (:func:`split_kv_cache`; already holding the new rows; ``None`` when no request has cached
    context), bottom-right aligned. Every length
    and offset comes from the builder (CPU) or is a device-tensor slice, so nothing here syncs the host unless
    density logging is on.
    """
    start = md.fp_num_head_tokens
    end = start + md.fp_num_tail_tokens
    q = query[start:end].view(-1, num_heads, head_size)
    k = key[start:end].view(-1, num_kv_heads, head_size)
    v = value[start:end].view(-1, num_kv_heads, head_size)
    out = output[start:end].view(-1, num_heads, head_size)
    config = config_for_layer(settings.config, settings.preset, layer_name)
    # Every request keeps its dense tail (the op's default): vLLM's attention metadata does not say which chunk ends
    # its prompt, so a chunk cut mid-prompt gets extra dense rows rather than the prompt's end losing them.
    for i, (q_len, seq_len) in enumerate(zip(md.fp_tail_query_lens, md.fp_tail_seq_lens)):
        cu_q = md.fp_tail_cu_seqlens[i:i + 2]          # this request's rows of the tail, on the device
        if q_len == seq_len:                            # fresh prefill: keys are the request's own rows
            keys, values, cu_k, seqused, extra = k, v, cu_q, None, {}
        else:                                           # cached context: the whole sequence from the paged cache
            keys, values, cu_k = paged_kv[0], paged_kv[1], None
            seqused = md.fp_tail_seqused[i:i + 1]
            extra = dict(block_table=md.fp_tail_block_table[i:i + 1], seqused_k=seqused)
        res = flash_prefill_varlen_func(q, keys, values, cu_q, cu_k, q_len, seq_len, softmax_scale=scale,
                                        config=config, out=out, return_index=settings.log_density, **extra)
        if settings.log_density:
            _log_density(res[1], cu_q, seqused, layer_name, q_len, seq_len)


def split_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int, block_size: int,
                   head_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(num_blocks, block_size, num_kv_heads, head_size)`` key and value views of a layer's FlashAttention KV
    cache, in either layout vLLM has used: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (0.10 - 0.12 and
    later releases) or K and V packed in the last dimension, ``[num_blocks, num_kv_heads, block_size,
    2 * head_size]`` (0.26). Each layout is recognised by its whole shape (every dimension but ``num_blocks``), so a
    cache whose last dimension merely happens to be ``2 * head_size`` is not taken for the packed one. Views only:
    strides as vLLM allocated them. ``None`` for any other layout (:func:`forward_split` then runs the step stock)."""
    shape = tuple(kv_cache.shape)
    if kv_cache.dim() == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_size):
        return kv_cache.unbind(0)
    if kv_cache.dim() == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_size):
        key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return key_cache, value_cache
    return None


def _log_density(index, cu_q: torch.Tensor, seqused: torch.Tensor | None, layer_name: str, q_len: int,
                 seq_len: int) -> None:
    # block_density reads the index back from the GPU: a host sync per layer, accepted while logging.
    if index is None:
        density = 1.0
    elif seqused is None:
        density = block_density(index, cu_q, cu_q)
    else:
        density = block_density(index, cu_q, None, seqused_k=seqused)
    cached = f" ({seq_len - q_len} cached tokens before them)" if seq_len != q_len else ""
    logger.info("FlashPrefill %s: 1 prefill(s), %d tokens, kept %.1f%% of causal key blocks%s", layer_name, q_len,
                100.0 * density, cached)


def init_impl(impl) -> None:
    """Decide once, after a FlashAttention impl's ``__init__``, whether the layer may run sparse: sets
    ``impl.fp_settings`` and ``impl.fp_fallback_reason`` (``None`` when eligible; otherwise logged once per reason).

    Attributes a vLLM version lacks take the value that version implies: 0.10's impl has no ``sinks``, no
    ``attn_type`` (it rejects every type but decoder in ``__init__``) and no context parallelism.
    """
    vllm_config = _current_vllm_config()
    impl.fp_settings = settings(vllm_config)
    impl.fp_max_seq_len = getattr(getattr(vllm_config, "model_config", None), "max_model_len", 0) or 0
    # The model dtype is the default dtype while vLLM builds layers (vLLM's Attention reads it the same way).
    impl.fp_fallback_reason = dense_fallback_reason(
        head_size=impl.head_size, dtype=torch.get_default_dtype(), kv_cache_dtype=impl.kv_cache_dtype,
        sliding_window=impl.sliding_window, alibi_slopes=impl.alibi_slopes, logits_soft_cap=impl.logits_soft_cap,
        sinks=getattr(impl, "sinks", None), attn_type=getattr(impl, "attn_type", "decoder"),
        kv_sharing_target_layer_name=impl.kv_sharing_target_layer_name,
        dcp_world_size=getattr(impl, "dcp_world_size", 1), pcp_world_size=getattr(impl, "pcp_world_size", 1))
    if impl.fp_fallback_reason is not None:
        note_stock(f"layers with {impl.fp_fallback_reason}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def index_workspace_bytes(num_tokens: int, max_seq_len: int, num_heads: int, num_kv_heads: int, head_size: int,
                          itemsize: int, config: FlashPrefillConfig) -> int:
    """Upper bound on the memory the op allocates in one call of :func:`run_sparse_tail` (one request) when a step
    holds ``num_tokens`` new rows and a sequence is at most ``max_seq_len`` long: the index (``num_index_heads x
    nq x nk`` int32 plus counts, ``nq`` from the new rows, ``nk`` from the whole sequence) and the pooled keys."""
    bs = config.block_size
    heads = num_kv_heads if config.gqa_shared_index else num_heads
    nq = _cdiv(num_tokens, bs)
    nk = _cdiv(max(max_seq_len, num_tokens), bs)
    return heads * nq * (nk + 1) * 4 + num_kv_heads * nk * head_size * itemsize


def reserve_profile_workspace(impl, query: torch.Tensor) -> int:
    """During vLLM's memory-profiling run (attention metadata ``None``), allocate and free the op's worst-case
    workspace for a step of ``query``'s rows, so the peak that sizes the KV cache includes it. Steps shorter than
    the length gate never run sparse and reserve nothing. Returns the bytes reserved."""
    config = impl.fp_settings.config
    num_tokens = query.shape[0]
    if impl.fp_fallback_reason is not None or num_tokens < config.min_sparse_len:
        return 0
    nbytes = index_workspace_bytes(num_tokens, getattr(impl, "fp_max_seq_len", num_tokens), impl.num_heads,
                                   impl.num_kv_heads, impl.head_size, query.element_size(), config)
    if nbytes:
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=query.device)
        del workspace
    return nbytes


_warmed_up: set[tuple] = set()


def warm_up_kernels(impl, dtype: torch.dtype) -> None:
    """Compile the op's Triton kernels for this layer's shape at engine start (after weight loading) instead of
    during the first long request: one small sparse call on q/k/v views of a fused QKV buffer, as vLLM passes them.
    Once per process and (heads, kv heads, head size, dtype, block size, GQA mode)."""
    config = impl.fp_settings.config
    if impl.fp_fallback_reason is not None or not torch.cuda.is_available() or dtype not in SUPPORTED_DTYPES:
        return
    key = (impl.num_heads, impl.num_kv_heads, impl.head_size, dtype, config.block_size, config.gqa_shared_index)
    if key in _warmed_up:
        return
    _warmed_up.add(key)
    hq, hkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    tokens = 4 * config.block_size
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=torch.cuda.current_device())
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d)
    out = torch.empty(tokens, hq * d, dtype=dtype, device=qkv.device).view(tokens, hq, d)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=qkv.device)
    flash_prefill_varlen_func(q, k, v, cu, cu, tokens, tokens, softmax_scale=impl.scale,
                              config=config.replace(min_sparse_len=0), out=out)
    torch.cuda.synchronize()


@dataclasses.dataclass
class SplitFields:
    """FlashPrefill's per-step split, added to a version's ``FlashAttentionMetadata``.

    Mix it in *before* that class (``class M(SplitFields, FlashAttentionMetadata)``): a dataclass orders fields from
    the last base to the first, so these defaulted fields come after FlashAttention's, and ``isinstance(m,
    FlashAttentionMetadata)`` still holds for vLLM's own checks. After the builder's reorder (``split.py`` draws the
    per-request timeline)::

        rows [0, fp_num_head_tokens)                                 requests [0, fp_num_head_reqs): stock FA
        rows [fp_num_head_tokens, fp_num_head_tokens + fp_num_tail_tokens)   the next fp_num_tail_reqs: sparse op

    With ``fp_num_tail_reqs == 0`` nothing runs sparse and the impl calls stock FlashAttention on the whole batch.
    Otherwise the head runs stock FlashAttention with ``fp_head_metadata`` (``None`` when the head is empty), and
    each tail request runs the sparse op: its rows are ``fp_tail_cu_seqlens[i:i + 2]`` (int32, on the device,
    rebased to the tail), its lengths ``fp_tail_query_lens[i]`` / ``fp_tail_seq_lens[i]`` (CPU ints; equal for a
    fresh prefill), and for a request with cached context its sequence length and block-table row are
    ``fp_tail_seqused[i]`` / ``fp_tail_block_table[i]`` (slices of FlashAttention's own device tensors);
    ``fp_kv_block_size`` is the KV cache's tokens per page (the builder's ``kv_cache_spec.block_size``).
    """

    fp_num_head_reqs: int = 0
    fp_num_head_tokens: int = 0
    fp_head_metadata: object | None = None
    fp_num_tail_reqs: int = 0
    fp_num_tail_tokens: int = 0
    fp_tail_cu_seqlens: torch.Tensor | None = None
    fp_tail_max_len: int = 0
    fp_tail_query_lens: tuple[int, ...] = ()
    fp_tail_seq_lens: tuple[int, ...] = ()
    fp_tail_seqused: torch.Tensor | None = None
    fp_tail_block_table: torch.Tensor | None = None
    fp_kv_block_size: int = 0


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def init_builder(builder, vllm_config, kv_cache_spec) -> None:
    """Set what a version's metadata builder plans with: ``fp_settings`` (:func:`settings` for the served model) and
    ``fp_kv_block_size``, the KV cache's tokens per page (``kv_cache_spec.block_size``)."""
    builder.fp_settings = settings(vllm_config)
    builder.fp_kv_block_size = kv_cache_spec.block_size


def plan_batch(builder, cam, seq_lens_cpu) -> SplitPlan | None:
    """The step's split for a builder set up by :func:`init_builder`, from the ``CommonAttentionMetadata`` ``cam``
    and CPU ``seq_lens_cpu``; ``None`` when no request can be eligible: a request needs at least ``min_sparse_len``
    new tokens (fresh prefill) or at least one block of them over cached context (chunk, prefix hit), so none is
    when the longest query is shorter than both (every decode step)."""
    if not _may_hold_sparse_rows(builder, cam):
        return None
    config = builder.fp_settings.config
    return plan_split(cam.query_start_loc_cpu, seq_lens_cpu, config.min_sparse_len, num_reqs=cam.num_reqs,
                      min_query_len=config.block_size)


def stock_step_reason(builder, base) -> str | None:
    """Why a whole step must run stock FlashAttention, or ``None``: batches using features the split does not
    carry over (cascade, per-request causality, multimodal prefix ranges, R-SWA, windows, DCP). Fields are read with
    defaults because the metadata differs across releases (0.10 has no ``causal`` and no DCP; 0.32 dropped
    ``use_cascade`` and ``sliding_window`` and renamed ``mm_prefix_range_tensor`` to
    ``mm_prefix_query_range_tensor``)."""
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
    if getattr(builder, "dcp_world_size", 1) != 1:
        return "steps under decode context parallelism (DCP)"
    return None


def _may_hold_sparse_rows(builder, cam) -> bool:
    config = builder.fp_settings.config
    return cam.max_query_len >= max(min(config.min_sparse_len, config.block_size), 1)


def may_run_sparse(builder, base) -> bool:
    """Whether a batch may hold sparse rows at all (:func:`stock_step_reason` is ``None``)."""
    return stock_step_reason(builder, base) is None


def build_split(builder, md_cls: type, base, cam, seq_lens_cpu):
    """A version builder's ``build`` after ``super().build``: plan the step (:func:`plan_batch`) when it
    :func:`may_run_sparse` and CPU sequence lengths are known, and wrap ``base`` (:func:`split_metadata`). Every
    reason a step that could hold long prefills runs stock is counted (:func:`fallbacks.note_stock`)."""
    if not _may_hold_sparse_rows(builder, cam):
        return base                                     # decode-only and short steps: nothing to note
    reason = "steps without CPU sequence lengths" if seq_lens_cpu is None else stock_step_reason(builder, base)
    if reason is not None:
        note_stock(reason)
        return base
    plan = plan_batch(builder, cam, seq_lens_cpu)
    if plan is not None and plan.num_eligible_kept_stock:
        note_stock("long prefills before a request that cannot run sparse (batch order)")
    return split_metadata(md_cls, base, plan, builder.device, builder.fp_kv_block_size)


def split_metadata(md_cls: type, base, plan: SplitPlan | None, device: torch.device, kv_block_size: int = 0):
    """``md_cls`` (a :class:`SplitFields` subclass of ``type(base)``) holding ``base``'s fields plus ``plan``.

    ``base`` is the stock builder's metadata for the whole batch; ``plan`` is ``None`` (or has no tail) when nothing
    runs sparse, and then ``base`` itself is returned (the impl sees stock metadata and takes the stock path). The
    head keeps FlashAttention's own tensors, sliced to its requests: slicing the leading requests leaves
    ``query_start_loc[:k + 1]`` valid as is. Only the tail's cu_seqlens go to the device (non-blocking copy
    from pinned memory on CUDA), so ``forward`` never syncs the host.
    """
    if plan is None or not plan.has_tail:
        # Nothing runs sparse: the stock metadata as is (no per-step copy; every decode step takes this path).
        return base
    md = md_cls(**{name: getattr(base, name) for name in _field_names(type(base))})
    k, h = plan.num_head_reqs, plan.num_head_tokens
    if k:
        md.fp_head_metadata = dataclasses.replace(
            base, num_actual_tokens=h, max_query_len=plan.head_max_query_len,
            query_start_loc=base.query_start_loc[:k + 1], max_seq_len=plan.head_max_seq_len,
            seq_lens=base.seq_lens[:k], block_table=base.block_table[:k], slot_mapping=base.slot_mapping[:h],
            # FA3's ahead-of-time schedule was made for the whole batch.
            scheduler_metadata=None)
    cu = plan.tail_cu_seqlens
    if device.type == "cuda":
        cu = cu.pin_memory()
    md.fp_num_head_reqs, md.fp_num_head_tokens = k, h
    md.fp_num_tail_reqs, md.fp_num_tail_tokens = plan.num_tail_reqs, plan.num_tail_tokens
    md.fp_tail_cu_seqlens = cu.to(device, non_blocking=True)
    md.fp_tail_max_len = plan.tail_max_len
    md.fp_tail_query_lens, md.fp_tail_seq_lens = plan.tail_query_lens, plan.tail_seq_lens
    end = k + plan.num_tail_reqs
    md.fp_tail_seqused = base.seq_lens[k:end]
    md.fp_tail_block_table = base.block_table[k:end]
    md.fp_kv_block_size = kv_block_size
    return md


def has_sparse_tail(impl, md, md_cls: type) -> bool:
    """Whether this layer runs part of this batch sparse: an eligible layer (:func:`init_impl`) and a split from our
    builder with a non-empty tail. Everything else (profiling runs, decode-only batches, layers with a fallback
    reason) is the stock call, unchanged."""
    return impl.fp_fallback_reason is None and isinstance(md, md_cls) and md.fp_num_tail_reqs > 0


def route_forward(impl, stock_forward, md_cls: type, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, kv_cache: torch.Tensor, md, output: torch.Tensor, *quant_scales,
                  reshape_and_cache_flash=None) -> torch.Tensor:
    """A version impl's ``forward``: reserve the op's workspace in vLLM's profiling run (``md`` is ``None``), send
    the step to ``stock_forward`` (bound ``FlashAttentionImpl.forward``) unless it :func:`has_sparse_tail` and no
    output quantization is asked for (``quant_scales``: the release's ``output_scale`` / ``output_block_scale``
    arguments, passed on to the stock call), else :func:`forward_split`."""
    if md is None:
        reserve_profile_workspace(impl, query)
    if not has_sparse_tail(impl, md, md_cls):
        return stock_forward(layer, query, key, value, kv_cache, md, output, *quant_scales)
    if any(s is not None for s in quant_scales):
        note_stock("layer calls asking for a quantized output")
        return stock_forward(layer, query, key, value, kv_cache, md, output, *quant_scales)
    return forward_split(impl, stock_forward, layer, query, key, value, kv_cache, md, output,
                         reshape_and_cache_flash=reshape_and_cache_flash)


def forward_split(impl, stock_forward, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, kv_cache: torch.Tensor, md, output: torch.Tensor, *,
                  reshape_and_cache_flash=None) -> torch.Tensor:
    """Run a batch that :func:`has_sparse_tail`: ``stock_forward`` (the version's ``FlashAttentionImpl.forward``,
    bound) on the head with ``md.fp_head_metadata``, then the sparse op on the tail (:func:`run_sparse_tail`;
    requests with cached context read it from ``kv_cache``), both into ``output``.

    ``reshape_and_cache_flash``: pass vLLM's op where ``forward`` writes the KV cache itself (0.10 and 0.12, cache
    ``[2, num_blocks, block_size, num_kv_heads, head_size]``). The stock call wrote the head's rows (the head metadata
    carries the head's ``slot_mapping``); the tail's rows are written here exactly as ``FlashAttentionImpl.forward``
    writes them, so later decode and chunk steps read them back. From 0.13 on, ``do_kv_cache_update`` has already
    written every row before ``forward``: pass ``None``.
    """
    has_context = any(q != s for q, s in zip(md.fp_tail_query_lens, md.fp_tail_seq_lens))
    paged_kv = (split_kv_cache(kv_cache, impl.num_kv_heads, md.fp_kv_block_size, impl.head_size) if has_context
                else None)
    if has_context and paged_kv is None:
        note_stock(f"steps with chunks or prefix-cache hits over a KV-cache layout {tuple(kv_cache.shape)} the "
                   "backend cannot read")
        return stock_forward(layer, query, key, value, kv_cache, md, output)
    if md.fp_head_metadata is not None:
        stock_forward(layer, query, key, value, kv_cache, md.fp_head_metadata, output)
    start = md.fp_num_head_tokens
    end = start + md.fp_num_tail_tokens
    if reshape_and_cache_flash is not None:
        key_cache, value_cache = kv_cache.unbind(0)
        reshape_and_cache_flash(key[start:end], value[start:end], key_cache, value_cache, md.slot_mapping[start:end],
                                impl.kv_cache_dtype, layer._k_scale, layer._v_scale)
    run_sparse_tail(query, key, value, output, paged_kv, md, scale=impl.scale, num_heads=impl.num_heads,
                    num_kv_heads=impl.num_kv_heads, head_size=impl.head_size, settings=impl.fp_settings,
                    layer_name=getattr(layer, "layer_name", "?"))
    return output
