"""Selection quality of the op on a real model's attention: ``python -m flashprefill_vllm.eval opquality --model PATH
--text FILE``.

Each layer's post-RoPE q/k/v come from a transformers forward pass over a slice of a long text (the forward itself
runs SDPA, so the model is unchanged). Against the exact causal softmax of those q/k, per (head, query block):

- recall: the share of the softmax mass (averaged over the query block's rows) inside the kept key blocks;
- density: kept / causally visible key blocks, as ``block_density`` counts them;
- rel_l2: ``||sparse - dense|| / ||dense||`` of the attention output, both from the op's attention kernel (dense: no
  index), so the number measures what the selection drops and nothing else;
- the oracle (``oracle_top_p``): per (head, query block), key blocks by descending exact mass until a share p of
  the mass is kept: the fewest blocks that give every query block recall p.

Selection rules ("rule") compared on the same q/k: ``op`` (the op's own, ``flash_prefill_block_index``: mean-pooled
keys, block energies summed over the rows, max-relative alpha and the mass floor tau), and plain-torch alternatives
whose energies go through the same reduction and the reference's threshold (same sink / local / tail blocks, same
alpha and tau): ``max_key`` (per channel, the key block's max or min, whichever bounds q.k from above: an upper bound
of the block's largest logit), ``pooled_query`` (mean-pooled queries against mean-pooled keys) and
``second_moment`` (the mean-pooled logit plus ``s^2 / 2 * sum_d q_d^2 var_jd``, the Gaussian estimate of
``log mean_t exp(s q.k_t)`` with the key block's per-channel variance: it lifts blocks whose keys vary, which the mean
alone underestimates) and ``antidiag16`` / ``antidiag64`` (exact logits at a sample of each block's entries: rows
``r`` and keys ``t`` with ``(r + t) % S == S - 1``, i.e. one antidiagonal per S x S tile, so every row and every key
is sampled once per S; the block's energy is the log-sum-exp of those logits, a direct estimate of its mass that a
few high keys inside a block of filler still reach). Each rule runs with one index per query head and/or one per KV
group (``gqa_shared_index``).

The command sweeps (alpha, tau) per length and layer, picks the sparsest point that meets the recall goals and
checks it against the oracle; it writes ``<out-dir>/opquality_<model>_<device>.{json,png}`` and prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..config import ALLOWED_BLOCK_SIZES, FlashPrefillConfig
from ..integrations.transformers import register_attention
from ..ops import reference
from ..ops.interface import block_sparse_attn_varlen_func, flash_prefill_block_index
from ..ops.block_sparse_index import BlockSparseIndex
from ..ops.utils import cdiv
from .plotting import pyplot

# ``antidiagS``: strided antidiagonal sampling with stride S (S = 16 or 64; scoring costs 1/S of the exact logits,
# the op's pooled keys 1/block_size).
ANTIDIAGONAL_STRIDES = {"antidiag16": 16, "antidiag64": 64}
RULES = ("op", "max_key", "pooled_query", "second_moment", *ANTIDIAGONAL_STRIDES)
# What a run compares unless --rules says otherwise: the antidiagonal rules cost 2-8x the others' scoring and were a
# one-off study (README "Selection quality").
DEFAULT_RULES = ("op", "max_key", "pooled_query", "second_moment")
GQA_MODES = ("per_head", "shared")
CAPTURE_IMPLEMENTATION = "opquality_capture"

# Goals of the summary: mean recall >= --recall (0.97 by default) and, at the chosen alpha, these.
WORST_LAYER_RECALL = 0.95
MAX_REL_L2 = 0.05
MAX_ORACLE_RATIO = 1.25
# Recall targets of the oracle's recall-vs-density curve (the plot); --recall is added.
ORACLE_CURVE_P = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
# fp32 scores alive at once in block_mass (2 GiB): sets the query rows per chunk.
_MASS_CHUNK_SCORES = 1 << 29

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
_capture_hook: Callable | None = None


def _cu(length: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, length], dtype=torch.int32, device=device)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q must be (L, Hq, D) and k (L, Hkv, D) with Hq a multiple of Hkv; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    if _capture_hook is not None:
        _capture_hook(module, query, key, value, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture_qkv(model, input_ids, layers: Iterable[int] | None = None,
                on_layer: LayerCallback | None = None) -> dict[int, tuple]:
    """Run ``model``'s decoder over one prompt (no grad, no cache) and capture every attention call's inputs.

    ``input_ids``: ``(L,)`` or ``(1, L)``. For each layer in ``layers`` (``None``: all; ``module.layer_idx``) the
    attention receives post-RoPE ``q (L, Hq, D)`` and ``k``, ``v`` ``(L, Hkv, D)`` in the model dtype, and its
    ``scale``. With ``on_layer`` each is passed to ``on_layer(layer_idx, q, k, v, scale)`` and dropped (long prompts);
    otherwise ``{layer_idx: (q, k, v, scale)}`` is returned. The attention itself runs transformers' SDPA; the
    model's ``attn_implementation`` is restored afterwards.
    """
    global _capture_hook
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (L,) or (1, L); got shape {tuple(ids.shape)}")
    wanted = None if layers is None else {int(i) for i in layers}
    captured: dict[int, tuple] = {}
    seen: list[int] = []

    def hook(module, query, key, value, scaling):
        idx = int(module.layer_idx)
        seen.append(idx)
        if wanted is not None and idx not in wanted:
            return
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        if on_layer is not None:
            on_layer(idx, q, k, v, scale)
        else:
            captured[idx] = (q, k, v, scale)

    register_attention(CAPTURE_IMPLEMENTATION, _capturing_attention)
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    _capture_hook = hook
    try:
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
        with torch.no_grad():
            model.base_model(input_ids=ids.to(device), use_cache=False)
    finally:
        _capture_hook = None
        model.set_attn_implementation(previous)
    if not seen:
        raise RuntimeError(f"{type(model).__name__} never called transformers' attention interface; capture_qkv "
                           "needs a model whose attention dispatches through AttentionInterface")
    return captured


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """Exact causal softmax mass per (query head, query block, key block): ``(Hq, NB, NB)`` fp32, ``NB = cdiv(L, B)``.

    ``q (L, Hq, D)``, ``k (L, Hkv, D)`` (self-attention, query head h reads KV head ``h // (Hq // Hkv)``). Entry
    ``[h, i, j]`` is the attention probability that the rows of query block i put on key block j, averaged over those
    rows, so every ``[h, i, :]`` sums to 1. fp32 scores, computed in query chunks that hold about 2 GiB of them.
    """
    _check_qk(q, k)
    length, hq, dim = q.shape
    hkv = k.shape[1]
    nb = cdiv(length, block_size)
    width = nb * block_size
    # Keys padded to whole blocks; the causal mask hides the padding from every row.
    keys = F.pad(k.float(), (0, 0, 0, 0, 0, width - length)).permute(1, 2, 0).contiguous()   # (Hkv, D, W)
    key_pos = torch.arange(width, device=q.device)
    rows = max(block_size, _MASS_CHUNK_SCORES // (hq * width) // block_size * block_size)
    mass = torch.empty(hq, nb, nb, dtype=torch.float32, device=q.device)
    for r0 in range(0, length, rows):
        r1 = min(length, r0 + rows)
        n = r1 - r0
        queries = q[r0:r1].float().permute(1, 0, 2).reshape(hkv, -1, dim)                   # (Hkv, g * n, D)
        p = torch.bmm(queries, keys).view(hq, n, width).mul_(scale)
        p.masked_fill_(key_pos[None, None, :] > torch.arange(r0, r1, device=q.device)[None, :, None], float("-inf"))
        p.sub_(p.amax(-1, keepdim=True)).exp_()
        p.div_(p.sum(-1, keepdim=True))
        per_block = p.view(hq, n, nb, block_size).sum(-1)                                     # (Hq, n, NB)
        del p
        nq = cdiv(n, block_size)
        per_block = F.pad(per_block, (0, 0, 0, nq * block_size - n))
        rows_in_block = (n - torch.arange(nq, device=q.device) * block_size).clamp(max=block_size)
        mass[:, r0 // block_size: r0 // block_size + nq] = (per_block.view(hq, nq, block_size, nb).sum(2)
                                                             / rows_in_block[None, :, None])
    return mass


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over every key, through the op's attention (no index): ``(L, Hq, D)``."""
    length = q.shape[0]
    cu = _cu(length, q.device)
    return block_sparse_attn_varlen_func(q, k, v, None, cu, cu, length, length, scale)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm()).item()


def sparse_rel_l2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, index: BlockSparseIndex,
                  dense_out: torch.Tensor) -> float:
    """Relative L2 error of attention restricted to ``index`` against ``dense_out``."""
    length = q.shape[0]
    cu = _cu(length, q.device)
    return rel_l2(block_sparse_attn_varlen_func(q, k, v, index, cu, cu, length, length, scale), dense_out)


def _block_last_rows(nb: int, block_size: int, length: int, device: torch.device) -> torch.Tensor:
    """Position of each key block's last row ``(NB,)``: a block is wholly visible to the rows at or after it."""
    return torch.clamp((torch.arange(nb, device=device) + 1) * block_size, max=length) - 1


def mean_corrected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: torch.Tensor,
                             block_size: int, correct: bool = True) -> torch.Tensor:
    """Causal attention over the kept blocks of ``keep (Hq, NB, NB)``, plus (``correct``) each skipped block's
    contribution estimated from its mean key and mean value: ``n_j exp(s q.kbar_j)`` joins the softmax's denominator
    and ``n_j exp(s q.kbar_j) vbar_j`` its numerator, for every skipped key block wholly before the row. Exact where a
    skipped block's keys are all equal; an underestimate of its weight otherwise (the mean of exponentials is at least
    the exponential of the mean). Plain torch, one head at a time, fp32: ``(L, Hq, D)``. ``correct=False`` is the
    sparse attention the kernel runs."""
    _check_qk(q, k)
    length, hq, _ = q.shape
    group = hq // k.shape[1]
    nb = cdiv(length, block_size)
    if tuple(keep.shape) != (hq, nb, nb):
        raise ValueError(f"keep must be ({hq}, {nb}, {nb}); got {tuple(keep.shape)}")
    cu = _cu(length, q.device)
    kbar = reference.pool_keys(k.float(), cu, length, block_size)[0]                           # fp32 (Hkv, NB, D)
    vbar = reference.pool_keys(v.float(), cu, length, block_size)[0]
    rows = (length - torch.arange(nb, device=q.device) * block_size).clamp(max=block_size).float()
    pos = torch.arange(length, device=q.device)
    blk = pos // block_size
    block_end = _block_last_rows(nb, block_size, length, q.device)
    causal = pos[None, :] <= pos[:, None]
    wholly_before = block_end[None, :] <= pos[:, None]                                         # (L, NB)
    out = torch.empty(length, hq, q.shape[2], dtype=torch.float32, device=q.device)
    for h in range(hq):
        qh, kh, vh = q[:, h].float(), k[:, h // group].float(), v[:, h // group].float()
        kept = keep[h][blk][:, blk] & causal
        logits = (qh @ kh.T * scale).masked_fill_(~kept, float("-inf"))
        top = logits.amax(-1)
        if correct:
            skipped = ~keep[h][blk] & wholly_before
            est = (qh @ kbar[h // group].T * scale + rows.log()[None, :]).masked_fill_(~skipped, float("-inf"))
            top = torch.maximum(top, est.amax(-1))
        p = (logits - top[:, None]).exp_()
        num, den = p @ vh, p.sum(-1)
        if correct:
            pe = (est - top[:, None]).exp_()
            num, den = num + pe @ vbar[h // group], den + pe.sum(-1)
        out[:, h] = num / den[:, None]
    return out


def _visible(nb: int, device: torch.device) -> torch.Tensor:
    """Causally visible (query block, key block) pairs when queries and keys are the same sequence."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def mask_quality(keep: torch.Tensor, mass: torch.Tensor) -> dict:
    """Density and recall of a kept-block mask ``(Hq, NB, NB)`` against ``block_mass``'s ``mass``.

    Returns ``density`` (kept / visible pairs over all heads), ``recall_mean`` / ``recall_min`` (over heads and query
    blocks) and ``recall_per_head`` (a list: mean over query blocks).
    """
    visible = _visible(mass.shape[1], mass.device)
    keep = keep & visible
    recall = (mass * keep).sum(-1)                                                           # (Hq, NB)
    per_head = recall.mean(-1)
    return {"density": (keep.sum() / (visible.sum() * keep.shape[0])).item(), "recall_mean": recall.mean().item(),
            "recall_min": recall.min().item(), "recall_per_head": per_head.tolist()}


def oracle_top_p(mass: torch.Tensor, p: float) -> dict:
    """Per (head, query block), the heaviest visible key blocks until their mass reaches a share ``p`` of the row's.

    ``mass``: ``block_mass``'s ``(Hq, NB, NB)``. The diagonal block is always kept (the attention kernel needs each
    row's own block); ``p = 1`` keeps every visible block. Returns ``mask_quality``'s numbers plus ``mask``
    (``(Hq, NB, NB)`` bool; ``index_from_mask`` turns it into an index).
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"p must be a number in (0, 1]; got {p!r}")
    visible = _visible(mass.shape[1], mass.device)
    if p == 1.0:
        # Rounding can leave the running sum just short of the row's total: keep everything by definition.
        keep = visible.expand_as(mass).clone()
    else:
        sorted_mass, order = mass.sort(-1, descending=True)
        heavier = sorted_mass.cumsum(-1) - sorted_mass
        take = heavier < p * mass.sum(-1, keepdim=True)
        keep = torch.zeros_like(take).scatter_(-1, order, take)
        keep |= torch.eye(mass.shape[1], dtype=torch.bool, device=mass.device)
        keep &= visible
    return {**mask_quality(keep, mass), "mask": keep}


def index_from_mask(keep: torch.Tensor, block_size: int) -> BlockSparseIndex:
    """One-sequence ``BlockSparseIndex`` (one list per query head) of a kept-block mask ``(Hq, NB, NB)``."""
    count, ids = reference.mask_to_ids(keep)
    return BlockSparseIndex(count[:, None], ids[:, None], block_size, 1)


def _key_block_extrema(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and min of each key block: two ``(Hkv, NB, D)`` tensors."""
    length = k.shape[0]
    nb = cdiv(length, block_size)
    # Repeating the last key fills the last block without changing its max or min.
    padded = torch.cat([k, k[-1:].expand(nb * block_size - length, -1, -1)])
    blocks = padded.view(nb, block_size, *k.shape[1:]).transpose(0, 2)                      # (Hkv, B, NB, D)
    return blocks.amax(1), blocks.amin(1)


def antidiagonal_log_energies(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, stride: int,
                              heads_per_index: int) -> torch.Tensor:
    """Log block energies ``(H_idx, NB, NB)`` from strided antidiagonal samples of the exact logits.

    For each phase ``a`` in ``0 .. stride-1``, rows ``r = a + stride * i`` meet keys ``t = stride - 1 - a + stride * j``
    (one antidiagonal of every ``stride x stride`` tile). A key block is scored for a row exactly where
    ``reference.block_log_energies`` scores it (the block ends at or before the row), and the result is relative to
    the tile-wide largest sampled logit, as there; blocks with no scored sample are ``-inf``.
    """
    length, hq, _ = q.shape
    if block_size % stride:
        raise ValueError(f"the antidiagonal stride {stride} must divide the block size {block_size}")
    nb = cdiv(length, block_size)
    per = block_size // stride                      # samples per block side and phase
    pad = nb * block_size - length
    qf = F.pad(q.float(), (0, 0, 0, 0, 0, pad))
    kf = F.pad(k.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(hq // k.shape[1], 1)
    block_end = _block_last_rows(nb, block_size, length, q.device)
    energy = torch.full((hq, nb, nb), float("-inf"), device=q.device)
    tile_max = torch.full((hq, nb), float("-inf"), device=q.device)
    for a in range(stride):
        rows = torch.arange(a, nb * block_size, stride, device=q.device)
        keys = torch.arange(stride - 1 - a, nb * block_size, stride, device=q.device)
        logits = torch.einsum("rhd,thd->hrt", qf[rows], kf[keys]) * scale                  # (Hq, NB*per, NB*per)
        scored = ((block_end[keys // block_size][None, :] <= rows[:, None]) & (rows < length)[:, None]
                  & (keys < length)[None, :])
        logits = logits.masked_fill(~scored[None], float("-inf")).view(hq, nb, per, nb, per)
        energy = torch.logaddexp(energy, torch.logsumexp(logits, dim=(2, 4)))
        tile_max = torch.maximum(tile_max, logits.amax(dim=(2, 3, 4)))
    h_idx = hq // heads_per_index
    energy = torch.logsumexp(energy.view(h_idx, heads_per_index, nb, nb), dim=1)
    tile_max = tile_max.view(h_idx, heads_per_index, nb).amax(1)
    tile_max = torch.where(torch.isfinite(tile_max), tile_max, torch.zeros_like(tile_max))
    return energy - tile_max[..., None]


def rule_log_energies(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig,
                      rule: str) -> torch.Tensor:
    """Log block energies ``(H_idx, NB, NB)`` of a plain-torch rule, as ``reference.block_log_energies`` returns them
    (the op's reduction over rows and, with ``config.gqa_shared_index``, the group's heads, applied to other logits).
    They do not depend on alpha."""
    _check_qk(q, k)
    length, b = q.shape[0], config.block_size
    hpi = q.shape[1] // k.shape[1] if config.gqa_shared_index else 1
    if rule == "max_key":
        # q . kmax on positive channels plus q . kmin on negative ones bounds q . k_t for every key t of the block.
        kmax, kmin = _key_block_extrema(k, b)
        return reference.block_log_energies(torch.cat([q.clamp(min=0), q.clamp(max=0)], -1),
                                            torch.cat([kmax, kmin], -1), length, b, scale, hpi)
    if rule == "second_moment":
        cu = _cu(length, q.device)
        kbar = reference.pool_keys(k, cu, length, b)[0].float()                                # (Hkv, NB, D)
        kvar = (reference.pool_keys((k.float() ** 2), cu, length, b)[0] - kbar ** 2).clamp(min=0)
        qf = q.float()
        return reference.block_log_energies(torch.cat([qf, 0.5 * scale * qf ** 2], -1),
                                            torch.cat([kbar, kvar], -1), length, b, scale, hpi)
    if rule in ANTIDIAGONAL_STRIDES:
        return antidiagonal_log_energies(q, k, scale, b, ANTIDIAGONAL_STRIDES[rule], hpi)
    if rule == "pooled_query":
        cu = _cu(length, q.device)
        qbar = reference.pool_keys(q, cu, length, b)[0]                                       # (Hq, NB, D)
        rows = qbar.transpose(0, 1).repeat_interleave(b, 0)[:length]                          # (L, Hq, D)
        return reference.block_log_energies(rows, reference.pool_keys(k, cu, length, b)[0], length, b, scale, hpi)
    raise ValueError(f"rule must be one of {RULES[1:]} (plain-torch rules); got {rule!r}")


def selection_index(q: torch.Tensor, k: torch.Tensor, scale: float, config: FlashPrefillConfig, rule: str = "op",
                    log_energy: torch.Tensor | None = None) -> BlockSparseIndex:
    """The kept blocks of one sequence (``q (L, Hq, D)``, ``k (L, Hkv, D)``) under ``rule`` (see ``RULES``).

    ``op`` is the op's own selection (Triton on CUDA, its reference on CPU). The other rules score blocks in plain
    torch (``rule_log_energies``; pass them as ``log_energy`` to reuse them across alphas) and select with
    ``reference.select_blocks``: same alpha, sink, local, tail, min_sparse_len and GQA settings.
    """
    _check_qk(q, k)
    length = q.shape[0]
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    if rule == "op":
        cu = _cu(length, q.device)
        return flash_prefill_block_index(q, k, cu, cu, length, length, scale, config=config)
    if log_energy is None:
        log_energy = rule_log_energies(q, k, scale, config, rule)
    count, ids = reference.mask_to_ids(reference.select_blocks(log_energy, length, length, config))
    return BlockSparseIndex(count[:, None], ids[:, None], config.block_size, q.shape[1] // log_energy.shape[0])


def index_quality(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, index: BlockSparseIndex,
                  mass: torch.Tensor, dense_out: torch.Tensor | None) -> dict:
    """``mask_quality`` of a one-sequence index against ``mass``, plus ``rel_l2`` of its attention vs ``dense_out``
    (NaN, not measured, when ``dense_out`` is None)."""
    length = q.shape[0]
    keep = reference.index_to_mask(index, 0, length, length).repeat_interleave(index.heads_per_index, 0)
    err = float("nan") if dense_out is None else sparse_rel_l2(q, k, v, scale, index, dense_out)
    return {**mask_quality(keep, mass), "rel_l2": err}


def selection_quality(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: FlashPrefillConfig,
                      mass: torch.Tensor | None = None, *, rule: str = "op",
                      dense_out: torch.Tensor | None = None) -> dict:
    """What ``rule``'s selection under ``config`` keeps on one sequence, against the exact attention.

    ``mass``: ``block_mass(q, k, scale, config.block_size)`` when already computed; ``dense_out``: ``dense_attention``
    likewise (both can be reused across alphas). Returns ``density``, ``recall_mean``, ``recall_min``,
    ``recall_per_head`` (see ``mask_quality``) and ``rel_l2`` of the sparse output against dense attention.
    """
    nb = cdiv(q.shape[0], config.block_size)
    if mass is None:
        mass = block_mass(q, k, scale, config.block_size)
    elif tuple(mass.shape) != (q.shape[1], nb, nb):
        raise ValueError(f"mass must be ({q.shape[1]}, {nb}, {nb}) for these q and block_size "
                         f"{config.block_size}; got {tuple(mass.shape)}")
    if dense_out is None:
        dense_out = dense_attention(q, k, v, scale)
    return index_quality(q, k, v, scale, selection_index(q, k, scale, config, rule), mass, dense_out)


def _scalars(result: dict) -> dict:
    """The JSON record of one measurement: its scalars, and the worst head's mean recall in place of the list."""
    record = {k: v for k, v in result.items() if isinstance(v, float)}
    record["recall_worst_head"] = min(result["recall_per_head"])
    return record


def sweep_points(alphas: Sequence[float], taus: Sequence[float] = (0.0,)) -> list[tuple[float, float]]:
    """The (alpha, tau) grid of a sweep, tau-major: one alpha curve per tau."""
    return [(a, t) for t in taus for a in alphas]


def evaluate_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: FlashPrefillConfig,
                   alphas: Sequence[float], recall: float, rules: Sequence[str] = DEFAULT_RULES,
                   modes: Sequence[str] = GQA_MODES, taus: Sequence[float] = (0.0,), rel_l2: bool = True) -> dict:
    """Oracle at ``recall`` (with rel_l2), the oracle's curve, and every (mode, rule, alpha, tau) of the sweep.
    ``rel_l2=False`` skips the attention outputs (recall and density only; rel_l2 is NaN): much faster on a CPU."""
    mass = block_mass(q, k, scale, config.block_size)
    dense = dense_attention(q, k, v, scale) if rel_l2 else None
    oracle = oracle_top_p(mass, recall)
    record = {"oracle": {**_scalars(oracle), "rel_l2": float("nan") if dense is None else sparse_rel_l2(
        q, k, v, scale, index_from_mask(oracle["mask"], config.block_size), dense)}}
    del oracle
    record["oracle_curve"] = [{"p": p, **_scalars(oracle_top_p(mass, p))}
                              for p in sorted({*ORACLE_CURVE_P, recall})]
    record["sweep"] = {mode: {} for mode in modes}
    for mode in modes:
        base = config.replace(gqa_shared_index=mode == "shared")
        for rule in rules:
            energy = None if rule == "op" else rule_log_energies(q, k, scale, base, rule)
            record["sweep"][mode][rule] = [
                {"alpha": a, "tau": t, **_scalars(index_quality(q, k, v, scale, selection_index(
                    q, k, scale, base.replace(alpha=a, tau=t), rule, energy), mass, dense))}
                for a, t in sweep_points(alphas, taus)]
            del energy
    return record


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(layers: dict[int, dict], recall: float) -> dict:
    """Per length: the oracle over layers, and per (mode, rule) the alpha sweep over layers and the chosen alpha.

    The chosen alpha has the least mean density among those with mean recall >= ``recall`` and worst-layer recall
    >= ``WORST_LAYER_RECALL`` (``None`` if none has); ``goals`` says which goals it meets.
    """
    recs = list(layers.values())
    oracle = {"density": _mean(r["oracle"]["density"] for r in recs),
              "density_worst_layer": max(r["oracle"]["density"] for r in recs),
              "recall_mean": _mean(r["oracle"]["recall_mean"] for r in recs),
              "rel_l2": _mean(r["oracle"]["rel_l2"] for r in recs)}
    curve = [{"p": pt["p"], "density": _mean(r["oracle_curve"][n]["density"] for r in recs),
              "recall_mean": _mean(r["oracle_curve"][n]["recall_mean"] for r in recs)}
             for n, pt in enumerate(recs[0]["oracle_curve"])]
    rules = {}
    for mode, by_rule in recs[0]["sweep"].items():
        for rule, points in by_rule.items():
            sweep = []
            for n, pt in enumerate(points):
                rows = [r["sweep"][mode][rule][n] for r in recs]
                sweep.append({"alpha": pt["alpha"], "tau": pt.get("tau", 0.0),
                              "density": _mean(x["density"] for x in rows),
                              "recall_mean": _mean(x["recall_mean"] for x in rows),
                              "recall_worst_layer": min(x["recall_mean"] for x in rows),
                              "rel_l2": _mean(x["rel_l2"] for x in rows)})
            rules[f"{mode}/{rule}"] = {"sweep": sweep, **_choose(sweep, recall, oracle["density"])}
    return {"oracle": oracle, "oracle_curve": curve, "rules": rules}


def _choose(sweep: list[dict], recall: float, oracle_density: float) -> dict:
    ok = [s for s in sweep if s["recall_mean"] >= recall and s["recall_worst_layer"] >= WORST_LAYER_RECALL]
    if not ok:
        return {"chosen": None, "goals": {"recall": False, "worst_layer_recall": False, "rel_l2": False,
                                          "density_vs_oracle": False}}
    best = min(ok, key=lambda s: s["density"])
    ratio = best["density"] / oracle_density
    return {"chosen": {**best, "density_vs_oracle": ratio},
            "goals": {"recall": True, "worst_layer_recall": True, "rel_l2": best["rel_l2"] <= MAX_REL_L2,
                      "density_vs_oracle": ratio <= MAX_ORACLE_RATIO}}


def format_summary(results: dict[int, dict], recall: float) -> str:
    """The summary table: per length, the oracle and each (mode, rule)'s chosen alpha against the goals."""
    lines = [f"goals: mean recall >= {recall:g}, worst-layer recall >= {WORST_LAYER_RECALL:g}, mean rel-L2 <= "
             f"{MAX_REL_L2:g}, density <= {MAX_ORACLE_RATIO:g}x the oracle's at top-p = {recall:g}",
             f"{'length':>7} {'index/rule':<22} {'alpha':>6} {'tau':>5} {'density':>8} {'oracle':>7} {'ratio':>6} "
             f"{'recall':>7} {'worst':>7} {'rel-L2':>7}  goals"]
    for length, res in results.items():
        s = res["summary"]
        o = s["oracle"]
        lines.append(f"{length:>7} {f'oracle top-p {recall:g}':<22} {'-':>6} {'-':>5} {o['density']:>8.3f} {'-':>7} "
                     f"{'-':>6} "
                     f"{o['recall_mean']:>7.3f} {'-':>7} {o['rel_l2']:>7.4f}  (worst-layer density "
                     f"{o['density_worst_layer']:.3f})")
        for name, r in s["rules"].items():
            c = r["chosen"]
            if c is None:
                top = max(r["sweep"], key=lambda x: x["recall_mean"])
                lines.append(f"{length:>7} {name:<22} {'none':>6} (best recall {top['recall_mean']:.3f} at alpha "
                             f"{top['alpha']:g} tau {top.get('tau', 0.0):g}, worst layer "
                             f"{top['recall_worst_layer']:.3f})  FAIL recall")
                continue
            failed = [g for g, met in r["goals"].items() if not met]
            lines.append(f"{length:>7} {name:<22} {c['alpha']:>6g} {c.get('tau', 0.0):>5g} {c['density']:>8.3f} "
                         f"{o['density']:>7.3f} "
                         f"{c['density_vs_oracle']:>6.2f} {c['recall_mean']:>7.3f} {c['recall_worst_layer']:>7.3f} "
                         f"{c['rel_l2']:>7.4f}  {'all met' if not failed else 'FAIL ' + ', '.join(failed)}")
    return "\n".join(lines)


def write_plot(results: dict[int, dict], recall: float, path: Path) -> None:
    """Top: recall vs density per length (alpha sweeps, oracle curve). Bottom: per-layer density and recall of the
    per-head op at its chosen alpha (the smallest alpha when none meets the goals) beside the oracle's."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 9), squeeze=False)
    for col, (length, res) in enumerate(results.items()):
        s = res["summary"]
        top, bottom = axes[0, col], axes[1, col]
        curve = s["oracle_curve"]
        top.plot([c["density"] for c in curve], [c["recall_mean"] for c in curve], "k*-", label="oracle top-p")
        n = 0
        for name, r in s["rules"].items():
            taus = sorted({x.get("tau", 0.0) for x in r["sweep"]})
            for tau in taus:
                pts = [x for x in r["sweep"] if x.get("tau", 0.0) == tau]
                label = name + (" (alpha only)" if tau == 0.0 else f" tau {tau:g}") if len(taus) > 1 else name
                top.plot([x["density"] for x in pts], [x["recall_mean"] for x in pts], marker="o", color=f"C{n % 10}",
                         ls="--" if name.startswith("shared") else "-", label=label)
                n += 1
        for x in s["rules"].get("per_head/op", {}).get("sweep", []):
            if x.get("tau", 0.0) == 0.0:
                top.annotate(f"{x['alpha']:g}", (x["density"], x["recall_mean"]), fontsize=7)
        top.axhline(recall, color="grey", lw=0.8, ls=":")
        top.set(xlabel="density (kept / visible blocks)", ylabel="mean recall (softmax mass kept)",
                title=f"{length} tokens: recall vs density (mean over layers)")
        top.grid(True, alpha=0.3)
        top.legend(fontsize=7)
        layer_ids = sorted(res["layers"])
        op = s["rules"].get("per_head/op")
        if op is None:
            continue
        pick = op["chosen"] or op["sweep"][0]
        alpha, tau = pick["alpha"], pick.get("tau", 0.0)
        n_alpha = [(x["alpha"], x.get("tau", 0.0)) for x in op["sweep"]].index((alpha, tau))
        ours = [res["layers"][i]["sweep"]["per_head"]["op"][n_alpha] for i in layer_ids]
        pos = list(range(len(layer_ids)))
        bottom.bar([p - 0.2 for p in pos], [o["density"] for o in ours], 0.4,
                   label=f"op density (alpha {alpha:g}, tau {tau:g})")
        bottom.bar([p + 0.2 for p in pos], [res["layers"][i]["oracle"]["density"] for i in layer_ids], 0.4,
                   label=f"oracle density (p {recall:g})")
        twin = bottom.twinx()
        twin.plot(pos, [o["recall_mean"] for o in ours], "r.-", label="op recall")
        twin.axhline(WORST_LAYER_RECALL, color="r", lw=0.8, ls=":")
        twin.set_ylim(min([0.9] + [o["recall_mean"] - 0.01 for o in ours]), 1.005)
        twin.set_ylabel("recall", color="r")
        bottom.set(xticks=pos, xlabel="layer", ylabel="density", title=f"{length} tokens: per layer")
        bottom.set_xticklabels(layer_ids, fontsize=7)
        bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _convert(kind: type, text: str):
    try:
        return kind(text.strip())
    except ValueError:
        return None


def _value(kind: type, allowed: str, check: Callable) -> Callable[[str], object]:
    """An argparse type for one value; argparse prefixes the option to the error, which names the value and what
    is allowed."""
    def parse(text: str):
        value = _convert(kind, text)
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
        return value
    return parse


def _list(kind: type, allowed: str, check: Callable) -> Callable[[str], list]:
    """An argparse type for a comma-separated list; the error names the bad items and what is allowed."""
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        values = [_convert(kind, t) for t in items]
        bad = [t for t, v in zip(items, values) if v is None or not check(v)]
        if not items or bad:
            what = f"{', '.join(map(repr, bad))} not allowed" if bad else "empty"
            raise argparse.ArgumentTypeError(f"{text!r}: {what}; give comma-separated {allowed}")
        return values
    return parse


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of ``allowed``."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in allowed for t in items):
            raise argparse.ArgumentTypeError(f"{text!r}: allowed values are {', '.join(allowed)} "
                                             "(comma-separated)")
        return items
    return parse


def _layers(text: str) -> list[int] | None:
    if text.strip() == "all":
        return None
    return _list(int, "'all' or layer indices >= 0", lambda x: x >= 0)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashprefill_vllm.eval opquality",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", required=True, help="transformers model folder (loaded in bf16 with SDPA)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--model-name", default=None, help="name in the output file names (default: the folder name)")
    p.add_argument("--text", required=True, help="long UTF-8 text; prompts are its first tokens (after --offset)")
    p.add_argument("--offset", type=_value(int, "an integer >= 0", lambda x: x >= 0), default=0,
                   help="tokens of the text skipped before the prompt")
    p.add_argument("--lengths", type=_list(int, "integers >= 1", lambda x: x >= 1),
                   default=[8192, 16384, 31744], help="prompt lengths in tokens (default 8192,16384,31744)")
    p.add_argument("--alphas", type=_list(float, "numbers in (0, 1]", lambda x: 0.0 < x <= 1.0),
                   default=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3], help="thresholds swept (default 0.02,...,0.3)")
    p.add_argument("--taus", type=_list(float, "numbers in [0, 1]", lambda x: 0.0 <= x <= 1.0),
                   default=[0.0], help="mass floors swept, each with every alpha (default 0: alpha alone)")
    p.add_argument("--no-rel-l2", action="store_true",
                   help="skip the attention outputs (recall and density only; much faster on a CPU)")
    p.add_argument("--recall", type=_value(float, "a number in (0, 1]", lambda x: 0.0 < x <= 1.0),
                   default=0.97, help="mean-recall goal and the oracle's top-p (default 0.97)")
    p.add_argument("--layers", type=_layers, default=None, help="'all' (default) or comma-separated layer indices")
    p.add_argument("--block-size", type=int, choices=ALLOWED_BLOCK_SIZES, default=FlashPrefillConfig.block_size)
    p.add_argument("--rules", type=_choices(RULES), default=list(DEFAULT_RULES),
                   help=f"selection rules compared, of {','.join(RULES)} (default {','.join(DEFAULT_RULES)})")
    p.add_argument("--gqa", type=_choices(GQA_MODES), default=list(GQA_MODES),
                   help="index per query head and/or shared per KV group (default per_head,shared)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="appended to the device part of the output file names")
    return p


def _slug(text: str, keep: str = "") -> str:
    return re.sub(rf"[^a-z0-9{keep}]+", "-", text.lower()).strip("-")


def _prompt_tokens(tokenizer, text_path: Path, needed: int) -> list[int]:
    """The first ``needed`` tokens of the text (tokenizing a generous prefix first: whole books are slow)."""
    text = text_path.read_text(encoding="utf-8")
    ids = tokenizer(text[: needed * 16], add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise SystemExit(f"--text {text_path}: has {len(ids)} tokens; --lengths and --offset need {needed}")
    return ids[:needed]


def _versions() -> dict:
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    text_path = Path(args.text)
    if not text_path.is_file():
        parser.error(f"--text {args.text!r}: no such file")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device).eval()
    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers)) if args.layers is None else args.layers
    if max(layers) >= num_layers:
        parser.error(f"--layers {','.join(map(str, layers))}: the model has {num_layers} layers (0-{num_layers - 1})")
    offset = args.offset
    tokens = _prompt_tokens(tokenizer, text_path, offset + max(args.lengths))[offset:]
    config = FlashPrefillConfig(block_size=args.block_size, min_sparse_len=0)
    results: dict[int, dict] = {}
    for length in args.lengths:
        started = time.perf_counter()
        per_layer: dict[int, dict] = {}
        with tqdm(total=len(layers), desc=f"{length} tokens", unit="layer") as bar:
            def on_layer(idx, q, k, v, scale):
                per_layer[idx] = evaluate_layer(q, k, v, scale, config, args.alphas, args.recall, args.rules,
                                                args.gqa, args.taus, not args.no_rel_l2)
                bar.update(1)
            capture_qkv(model, torch.tensor(tokens[:length]), layers, on_layer)
        per_layer = dict(sorted(per_layer.items()))
        results[length] = {"seconds": time.perf_counter() - started, "layers": per_layer,
                           "summary": summarize(per_layer, args.recall)}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model_name = args.model_name or Path(args.model).resolve().name
    stem = f"opquality_{_slug(model_name, '.')}_{_slug(device_name)}" + (f"-{_slug(args.tag)}" if args.tag else "")
    report = {"device": device_name, **_versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "model": args.model, "model_name": model_name, "text": str(text_path), "offset": offset,
              "config": dataclasses.asdict(config), "alphas": args.alphas, "taus": args.taus,
              "recall_goal": args.recall,
              "goals": {"recall_mean": args.recall, "worst_layer_recall": WORST_LAYER_RECALL, "rel_l2": MAX_REL_L2,
                        "density_vs_oracle": MAX_ORACLE_RATIO},
              "seconds": time.perf_counter() - t0, "lengths": {str(k): v for k, v in results.items()}}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1))
    print(f"wrote {json_path}")
    write_plot(results, args.recall, out_dir / f"{stem}.png")
    print(format_summary(results, args.recall))
    return 0


if __name__ == "__main__":
    main()
