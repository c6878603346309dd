"""Plain-torch specification of sparse prefill: the executable spec every kernel is tested against.

Per sequence (varlen, ``cu_seqlens``), per index head (a query head, or a KV group when the index is shared):

1. Pool keys: ``kbar_j`` = mean of the keys of block j (fp32 sum, divided by the block's real length), rounded to
   the input dtype as the tensor-core kernels consume it.
2. Score: for query block i, logits ``x[r, j] = s * q_r . kbar_j`` for every row r of the block (and, with a shared
   index, every query head of the group) and every key block j lying entirely at or before the row's position.
   With one max ``M`` over that whole 2-D tile, ``E[i, j] = sum_r exp(x[r, j] - M)`` (a joint softmax over rows x
   blocks with the rows summed out). Computed here as ``log E[i, j] = logsumexp_r x[r, j] - M``.
3. Threshold: keep j iff ``E[i, j] >= alpha * max_j E[i, j]`` (only scored blocks can pass), or, with the mass floor
   ``tau > 0``, iff ``E[i, j] >= t`` for the largest threshold ``t`` at which the kept blocks (forced ones included)
   hold at least ``tau`` of the row's summed energy, whichever keeps more (:func:`floor_log2_threshold`: a fixed
   bisection, as the kernel runs it, no sort). Always keep the first
   ``num_sink_blocks`` blocks, the local window (``num_local_blocks`` blocks ending at the block of the query
   block's first row, up to the block of its last row), and every visible block for the last
   ``num_dense_tail_blocks`` query blocks (of the sequences whose ``dense_tail`` flag is set: all by default) and for
   sequences with ``seqlen_k < min_sparse_len``. Never keep a block past the last row's position (causality).
4. Attend: causal attention restricted to the kept blocks (element mask, fp32), bottom-right aligned when
   ``seqlen_q < seqlen_k``.

Paged K/V (``block_table`` + ``seqused_k``, as in FlashAttention's varlen API) are first gathered through the block
table into packed rows; everything after that is the packed spec.
"""

from __future__ import annotations

import math

import torch

from ..config import FlashPrefillConfig
from .block_sparse_index import BlockSparseIndex
from .utils import LN2, cdiv, gather_pages

# Query rows per chunk in the reference attention: bounds memory at long lengths on the GPU.
_REF_Q_CHUNK = 1024


def _seq_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()
    return [(cu[b], cu[b + 1]) for b in range(len(cu) - 1)]


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seqused_k: torch.Tensor) -> torch.Tensor:
    """Packed ``(sum(seqused_k), H, D)`` rows of a paged cache ``(pages, page_size, H, D)``, sequence after sequence.

    Key t of sequence b is slot ``t % page_size`` of page ``block_table[b, t // page_size]``.
    """
    parts = [cache.new_empty(0, *cache.shape[2:])]
    parts += [gather_pages(cache, block_table[b], n) for b, n in enumerate(seqused_k.tolist())]
    return torch.cat(parts)


def cu_from_seqused(seqused_k: torch.Tensor) -> torch.Tensor:
    """int32 prefix sums ``(batch + 1,)`` of the key counts: the ``cu_seqlens_k`` of the gathered rows."""
    return torch.nn.functional.pad(seqused_k.cumsum(0, dtype=torch.int32), (1, 0))


def pool_keys(k: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int, block_size: int) -> torch.Tensor:
    """Mean of each key block: ``(batch, num_kv_heads, cdiv(max_seqlen_k, B), head_dim)`` in ``k.dtype``; zeros pad."""
    batch = cu_seqlens_k.numel() - 1
    nk_max = cdiv(max_seqlen_k, block_size)
    out = torch.zeros(batch, k.shape[1], nk_max, k.shape[2], dtype=k.dtype, device=k.device)
    for b, (s, e) in enumerate(_seq_bounds(cu_seqlens_k)):
        for j in range(cdiv(e - s, block_size)):
            blk = k[s + j * block_size: min(s + (j + 1) * block_size, e)].float()
            out[b, :, j] = (blk.sum(0) / blk.shape[0]).to(k.dtype)
    return out


def block_log_energies(q_seq: torch.Tensor, kbar_seq: torch.Tensor, seqlen_k: int, block_size: int,
                       softmax_scale: float, heads_per_index: int) -> torch.Tensor:
    """``log E[h, i, j]`` (natural log, relative to the tile-wide max) for one sequence; ``-inf`` where unscored.

    ``q_seq``: ``(seqlen_q, num_heads, D)``; ``kbar_seq``: ``(num_kv_heads, NK, D)`` with ``NK = cdiv(seqlen_k, B)``.
    Returns ``(num_heads // heads_per_index, cdiv(seqlen_q, B), NK)`` fp32.
    """
    lq, hq, _ = q_seq.shape
    hkv, nk, _ = kbar_seq.shape
    group = hq // hkv
    ctx = seqlen_k - lq
    nq = cdiv(lq, block_size)
    pos = ctx + torch.arange(lq, device=q_seq.device)                                   # (Lq,)
    block_end = torch.clamp((torch.arange(nk, device=q_seq.device) + 1) * block_size, max=seqlen_k) - 1
    scored = block_end[None, :] <= pos[:, None]                                         # (Lq, NK)
    logits = torch.einsum("rhd,hjd->hrj", q_seq.float(),
                          kbar_seq.float().repeat_interleave(group, 0)) * softmax_scale  # (Hq, Lq, NK)
    logits = logits.masked_fill(~scored[None], float("-inf"))
    pad = nq * block_size - lq
    logits = torch.nn.functional.pad(logits, (0, 0, 0, pad), value=float("-inf"))
    # (H_idx, heads_per_index, nq, B, NK) -> reduce over the group's heads and the block's rows.
    tiles = logits.view(hq // heads_per_index, heads_per_index, nq, block_size, nk)
    lse = torch.logsumexp(tiles.permute(0, 2, 4, 1, 3).reshape(hq // heads_per_index, nq, nk, -1), dim=-1)
    tile_max = torch.amax(tiles, dim=(1, 3, 4))                                          # (H_idx, nq): M
    # A query block with no scored entry (the first block, say) has no energies at all: -inf, not NaN.
    tile_max = torch.where(torch.isfinite(tile_max), tile_max, torch.zeros_like(tile_max))
    return lse - tile_max[..., None]


# Mass floor (kernel and reference run the same search): bisect the log2 threshold, relative to the row's largest
# energy, over [-FLOOR_RANGE_LOG2, log2(alpha)] in FLOOR_STEPS halvings (resolution 24 / 2**12 ~ 0.006 in log2).
# Blocks under 2**-24 of the row's largest are never added by the floor.
FLOOR_RANGE_LOG2 = 24.0
FLOOR_STEPS = 12


def floor_log2_threshold(rel_log2: torch.Tensor, forced: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """Per row, the keep threshold in log2 units relative to the row's largest energy: ``log2(alpha)``, lowered by
    the mass floor where that keeps less than a share ``tau`` of the row's energy.

    ``rel_log2``: ``(..., NK)`` log2-energies minus the row max (``-inf`` where unscored); ``forced``: blocks kept
    anyway (broadcastable), whose energy counts as kept. With ``S(t)`` the energy of the forced blocks and of the
    blocks at or above ``t``: ``log2(alpha)`` if ``S(log2 alpha) >= tau * S(-inf)``, else the lower end of a
    ``FLOOR_STEPS``-step bisection of ``S(t) >= tau * total`` over ``[-FLOOR_RANGE_LOG2, log2(alpha)]``.
    Returns ``(..., 1)`` fp32.
    """
    energy = torch.exp2(rel_log2.float())                                 # 0 where unscored
    forced = forced.expand_as(energy)
    target = tau * energy.sum(-1, keepdim=True)

    def kept_energy(t: torch.Tensor) -> torch.Tensor:
        return torch.where(forced | (rel_log2 >= t), energy, 0.0).sum(-1, keepdim=True)

    hi0 = torch.full_like(target, math.log2(alpha))
    lo = torch.full_like(target, -FLOOR_RANGE_LOG2)
    hi = hi0.clone()
    for _ in range(FLOOR_STEPS):
        mid = (lo + hi) * 0.5
        ok = kept_energy(mid) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(kept_energy(hi0) >= target, hi0, lo)


def row_thresholds(log_energy: torch.Tensor, forced: torch.Tensor, config: FlashPrefillConfig) -> torch.Tensor:
    """Natural-log keep threshold per row ``(..., 1)`` of ``block_log_energies``'s output (see
    :func:`floor_log2_threshold`); ``forced`` as there."""
    row_max = log_energy.amax(dim=-1, keepdim=True)
    if config.tau <= 0.0:
        return row_max + math.log(config.alpha)
    rel = torch.where(torch.isfinite(log_energy), (log_energy - row_max) / LN2, float("-inf"))
    return row_max + floor_log2_threshold(rel, forced, config.alpha, config.tau) * LN2


def select_blocks(log_energy: torch.Tensor, seqlen_q: int, seqlen_k: int, config: FlashPrefillConfig,
                  dense_tail: bool = True) -> torch.Tensor:
    """Keep mask ``(H_idx, cdiv(seqlen_q, B), cdiv(seqlen_k, B))`` (bool) for one sequence from its log-energies.

    ``dense_tail=False`` does not force the last ``num_dense_tail_blocks`` query blocks dense (a chunk that does
    not end its prompt).
    """
    b = config.block_size
    h_idx, nq, nk = log_energy.shape
    dev = log_energy.device
    ctx = seqlen_k - seqlen_q
    i = torch.arange(nq, device=dev)[:, None]
    j = torch.arange(nk, device=dev)[None, :]
    d_first = (ctx + i * b) // b
    d_last = (ctx + torch.clamp((i + 1) * b, max=seqlen_q) - 1) // b
    forced = (j < config.num_sink_blocks) | (j >= d_first - config.num_local_blocks + 1)
    by_score = torch.isfinite(log_energy) & (log_energy >= row_thresholds(log_energy, forced, config))
    dense = ((i >= nq - config.num_dense_tail_blocks) & dense_tail) | (seqlen_k < config.min_sparse_len)
    return (by_score | forced[None] | dense[None]) & (j <= d_last)[None]


def build_index(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None,
                max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, config: FlashPrefillConfig, *,
                block_table: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
                dense_tail: torch.Tensor | None = None) -> tuple[BlockSparseIndex, list[torch.Tensor]]:
    """Reference index for a varlen batch; also returns each sequence's log-energies (for near-tie checks).

    ``block_table`` / ``seqused_k``: ``k`` is a paged cache (see module docstring). ``dense_tail``: per-sequence
    bool flags (``None``: every sequence has its dense tail).
    """
    if block_table is not None:
        k, cu_seqlens_k = gather_paged(k, block_table, seqused_k), cu_from_seqused(seqused_k)
    tails = dense_tail.tolist() if dense_tail is not None else [True] * (cu_seqlens_q.numel() - 1)
    b = config.block_size
    hq, hkv = q.shape[1], k.shape[1]
    hpi = hq // hkv if config.gqa_shared_index else 1
    h_idx = hq // hpi
    nq_max, nk_max = cdiv(max_seqlen_q, b), cdiv(max_seqlen_k, b)
    batch = cu_seqlens_q.numel() - 1
    kbar = pool_keys(k, cu_seqlens_k, max_seqlen_k, b)
    count = torch.zeros(h_idx, batch, nq_max, dtype=torch.int32, device=q.device)
    index = torch.full((h_idx, batch, nq_max, nk_max), -1, dtype=torch.int32, device=q.device)
    energies = []
    for s, ((qs, qe), (ks, ke)) in enumerate(zip(_seq_bounds(cu_seqlens_q), _seq_bounds(cu_seqlens_k))):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            energies.append(torch.empty(h_idx, 0, cdiv(lk, b), device=q.device))
            continue
        nk = cdiv(lk, b)
        log_e = block_log_energies(q[qs:qe], kbar[s, :, :nk], lk, b, softmax_scale, hpi)
        energies.append(log_e)
        keep = select_blocks(log_e, lq, lk, config, tails[s])
        cnt, ids = mask_to_ids(keep)
        count[:, s, : keep.shape[1]] = cnt
        index[:, s, : keep.shape[1], :nk] = ids
    return BlockSparseIndex(count, index, b, hpi), energies


def mask_to_ids(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask ``(..., NK)`` -> (counts int32, ascending left-packed ids int32, -1 padded)."""
    nk = keep.shape[-1]
    j = torch.arange(nk, device=keep.device).expand_as(keep)
    ids = torch.sort(torch.where(keep, j, nk), dim=-1).values
    return keep.sum(-1).int(), torch.where(ids < nk, ids, -1).int()


def index_to_mask(index: BlockSparseIndex, seq: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """Kept-block mask ``(H_idx, cdiv(seqlen_q, B), cdiv(seqlen_k, B))`` of one sequence, from an index."""
    nq, nk = cdiv(seqlen_q, index.block_size), cdiv(seqlen_k, index.block_size)
    cnt = index.block_count[:, seq, :nq].long()
    ids = index.block_index[:, seq, :nq, :nk].long()
    valid = torch.arange(nk, device=ids.device)[None, None, :] < cnt[..., None]
    mask = torch.zeros(cnt.shape[0], nq, nk + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(2, torch.where(valid, ids, nk), True)   # invalid slots land in the extra column
    return mask[..., :nk]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockSparseIndex | None,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None, softmax_scale: float,
                     return_lse: bool = False, *, block_table: torch.Tensor | None = None,
                     seqused_k: torch.Tensor | None = None):
    """Causal (bottom-right) attention over the kept blocks in fp32; ``index=None`` means dense causal attention.

    Returns ``out`` ``(total_q, num_heads, D)`` in ``q.dtype`` and, with ``return_lse``, the natural-log LSE
    ``(num_heads, total_q)`` fp32 (``-inf`` for a row that sees no key). ``block_table`` / ``seqused_k``: ``k`` and
    ``v`` are paged caches.
    """
    if block_table is not None:
        k, v = gather_paged(k, block_table, seqused_k), gather_paged(v, block_table, seqused_k)
        cu_seqlens_k = cu_from_seqused(seqused_k)
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    out = torch.zeros_like(q)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for s, ((qs, qe), (ks, ke)) in enumerate(zip(_seq_bounds(cu_seqlens_q), _seq_bounds(cu_seqlens_k))):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        ctx = lk - lq
        block_mask = index_to_mask(index, s, lq, lk) if index is not None else None
        kpos = torch.arange(lk, device=q.device)
        for h in range(hq):
            kh = k[ks:ke, h // group].float()
            vh = v[ks:ke, h // group].float()
            for r0 in range(0, lq, _REF_Q_CHUNK):
                r1 = min(r0 + _REF_Q_CHUNK, lq)
                rows = torch.arange(r0, r1, device=q.device)
                allowed = kpos[None, :] <= (ctx + rows)[:, None]
                if block_mask is not None:
                    bm = block_mask[h // index.heads_per_index]
                    allowed &= bm[rows // index.block_size][:, kpos // index.block_size]
                scores = (q[qs + r0: qs + r1, h].float() @ kh.T) * softmax_scale
                scores = scores.masked_fill(~allowed, float("-inf"))
                row_lse = torch.logsumexp(scores, dim=-1)
                p = torch.exp(scores - row_lse[:, None]).nan_to_num(0.0)
                out[qs + r0: qs + r1, h] = (p @ vh).to(q.dtype)
                lse[h, qs + r0: qs + r1] = row_lse
    return (out, lse) if return_lse else out


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                  softmax_scale: float | None = None, config: FlashPrefillConfig | None = None, *,
                  block_table: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
                  dense_tail: torch.Tensor | None = None):
    """The whole op in plain torch: ``(out, lse, index)``. Inputs as in ``flash_prefill_varlen_func``."""
    config = config or FlashPrefillConfig()
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    paged = dict(block_table=block_table, seqused_k=seqused_k)
    index, _ = build_index(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, config,
                           dense_tail=dense_tail, **paged)
    out, lse = sparse_attention(q, k, v, index, cu_seqlens_q, cu_seqlens_k, softmax_scale, return_lse=True, **paged)
    return out, lse, index
