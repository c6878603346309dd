"""The impl's forward: stock FlashAttention on the stock part of a step, the FlashPrefill op on its sparse part,
both into vLLM's output buffer. No vLLM import: the version impls mix :class:`SparseForward` in and pass their
bound ``FlashAttentionImpl.forward`` as the stock call.
"""

from __future__ import annotations

import torch

from ..ops import flash_prefill_varlen_func
from ..presets import config_for_layer, layer_runs_dense
from .density import log_density
from .eligibility import LayerEligibility, Settings
from .fallbacks import note_stock
from .planning import SparsePartFields
from .workspace import KernelWorkspace


def split_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int, block_size: int,
                   head_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(num_blocks, block_size, num_kv_heads, head_size)`` key and value views of a layer's FlashAttention KV
    cache, in either layout vLLM has used: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (0.10 - 0.12 and
    later releases) or K and V packed in the last dimension, ``[num_blocks, num_kv_heads, block_size,
    2 * head_size]`` (0.26). Each layout is recognised by its whole shape (every dimension but ``num_blocks``), so a
    cache whose last dimension merely happens to be ``2 * head_size`` is not taken for the packed one. Views only:
    strides as vLLM allocated them. ``None`` for any other layout (the step then runs stock)."""
    shape = tuple(kv_cache.shape)
    if kv_cache.dim() == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_size):
        return kv_cache.unbind(0)
    if kv_cache.dim() == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_size):
        key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return key_cache, value_cache
    return None


def run_sparse_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                    paged_kv: tuple[torch.Tensor, torch.Tensor] | None, md, *, scale: float, num_heads: int,
                    num_kv_heads: int, head_size: int, settings: Settings, layer_name: str) -> None:
    """Sparse causal attention of the sparse part of ``md`` (a :class:`planning.SparsePartFields` metadata), written
    into its rows of ``output``; one op call per request, so the op's index is sized by that request alone.

    ``query``/``output`` are ``(tokens, num_heads, head_size)`` or ``(tokens, num_heads * head_size)`` and ``key``/
    ``value`` the matching ``num_kv_heads`` shapes: vLLM's strided views of the fused QKV buffer, padded past the
    real tokens. No copy: the op takes strided rows. A fresh prefill reads its keys from those rows; a request with
    cached context reads its whole sequence through its block-table row from ``paged_kv``, the key and value views of
    the paged KV cache (:func:`split_kv_cache`; already holding the new rows; ``None`` when no request has cached
    context), bottom-right aligned. Every length and offset comes from the builder (CPU) or is a device-tensor
    slice, so nothing here syncs the host unless density logging is on. Each call gets its request's rows and exact
    lengths (``seqlens_host``), so the op runs FA4's block-sparse kernel where it can (``ops/fa4_route.py``).

    Every request keeps its dense tail (the op's default): vLLM's attention metadata does not say which chunk ends
    its prompt, so a chunk cut mid-prompt gets extra dense rows rather than the prompt's end losing them.
    """
    start = md.fp_num_stock_tokens
    end = start + md.fp_num_sparse_tokens
    q = query[start:end].view(-1, num_heads, head_size)
    k = key[start:end].view(-1, num_kv_heads, head_size)
    v = value[start:end].view(-1, num_kv_heads, head_size)
    out = output[start:end].view(-1, num_heads, head_size)
    config = config_for_layer(settings.config, settings.preset, layer_name)
    row = 0
    for i, (q_len, seq_len) in enumerate(zip(md.fp_sparse_query_lens, md.fp_sparse_seq_lens)):
        rows = slice(row, row + q_len)                    # this request's rows of the sparse part (host offsets)
        row += q_len
        cu = md.fp_sparse_cu_seqlens[i:i + 2]
        cu_q = cu - cu[:1]                                # the same rows from 0, on the device (no host sync)
        if q_len == seq_len:                              # fresh prefill: keys are the request's own rows
            keys, values, cu_k, seqused, extra = k[rows], v[rows], cu_q, None, {}
        else:                                             # cached context: the whole sequence from the paged cache
            keys, values, cu_k = paged_kv[0], paged_kv[1], None
            seqused = md.fp_sparse_seqused[i:i + 1]
            extra = dict(block_table=md.fp_sparse_block_table[i:i + 1], seqused_k=seqused)
        res = flash_prefill_varlen_func(q[rows], keys, values, cu_q, cu_k, q_len, seq_len, softmax_scale=scale,
                                        config=config, out=out[rows], return_index=settings.log_density,
                                        seqlens_host=(q_len, seq_len), **extra)
        if settings.log_density:
            log_density(res[1], cu_q, seqused, layer_name, q_len, seq_len)


class SparseForward(LayerEligibility, KernelWorkspace):
    """Impl mixin: a version's ``FlashPrefillImpl(SparseForward, FlashAttentionImpl)`` gets :meth:`_fp_init_layer`
    run after FlashAttention's ``__init__`` and returns :meth:`_fp_forward` from its ``forward``.

    ``fp_reshape_and_cache``: ``None`` where vLLM writes the KV cache before ``forward`` (0.13+:
    ``do_kv_cache_update``); vLLM's ``reshape_and_cache_flash`` (as a staticmethod) where ``forward`` writes it
    itself (0.10, 0.12): the stock call writes the stock part's rows, so the sparse part's rows are written here
    exactly as ``FlashAttentionImpl.forward`` writes them, and later decode and chunk steps read them back.
    """

    fp_reshape_and_cache = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fp_init_layer()

    def _fp_forward(self, stock_forward, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, kv_cache: torch.Tensor, md, output: torch.Tensor,
                    *quant_scales) -> torch.Tensor:
        """Reserve the op's workspace in vLLM's profiling run (``md`` is ``None``); send the step to
        ``stock_forward`` (bound ``FlashAttentionImpl.forward``) unless this layer runs part of it sparse and no
        output quantization is asked for (``quant_scales``: the release's ``output_scale`` /
        ``output_block_scale`` arguments, passed on to the stock call); else :meth:`_fp_forward_split`."""
        if md is None:
            self._fp_reserve_profile_workspace(query)
        if not (self.fp_stock_reason is None and isinstance(md, SparsePartFields) and md.fp_num_sparse_reqs > 0):
            return stock_forward(layer, query, key, value, kv_cache, md, output, *quant_scales)
        if layer_runs_dense(self.fp_settings.config, self.fp_settings.preset, getattr(layer, "layer_name", "")):
            note_stock("layers set dense (FLASHPREFILL_DENSE_LAYERS, or \"dense\" in the preset)")
            return stock_forward(layer, query, key, value, kv_cache, md, output, *quant_scales)
        if any(s is not None for s in quant_scales):
            note_stock("layer calls asking for a quantized output")
            return stock_forward(layer, query, key, value, kv_cache, md, output, *quant_scales)
        return self._fp_forward_split(stock_forward, layer, query, key, value, kv_cache, md, output)

    def _fp_forward_split(self, stock_forward, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, kv_cache: torch.Tensor, md, output: torch.Tensor) -> torch.Tensor:
        """``stock_forward`` on the stock part with ``md.fp_stock_metadata``, then the op on the sparse part
        (:func:`run_sparse_part`; requests with cached context read it from ``kv_cache``), both into ``output``."""
        has_context = any(q != s for q, s in zip(md.fp_sparse_query_lens, md.fp_sparse_seq_lens))
        paged_kv = (split_kv_cache(kv_cache, self.num_kv_heads, md.fp_kv_block_size, self.head_size)
                    if has_context else None)
        if has_context and paged_kv is None:
            note_stock(f"steps with chunks or prefix-cache hits over a KV-cache layout {tuple(kv_cache.shape)} the "
                       "backend cannot read")
            return stock_forward(layer, query, key, value, kv_cache, md, output)
        if md.fp_stock_metadata is not None:
            stock_forward(layer, query, key, value, kv_cache, md.fp_stock_metadata, output)
        if self.fp_reshape_and_cache is not None:
            start = md.fp_num_stock_tokens
            end = start + md.fp_num_sparse_tokens
            key_cache, value_cache = kv_cache.unbind(0)
            self.fp_reshape_and_cache(key[start:end], value[start:end], key_cache, value_cache,
                                      md.slot_mapping[start:end], self.kv_cache_dtype, layer._k_scale,
                                      layer._v_scale)
        run_sparse_part(query, key, value, output, paged_kv, md, scale=self.scale, num_heads=self.num_heads,
                        num_kv_heads=self.num_kv_heads, head_size=self.head_size, settings=self.fp_settings,
                        layer_name=getattr(layer, "layer_name", "?"))
        return output
