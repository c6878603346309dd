"""Which rows of a vLLM batch run sparse: pure functions over CPU lengths, no vLLM import.

A scheduler step packs requests back to back (request ``i`` owns query rows
``query_start_loc[i]:query_start_loc[i + 1]``)::

    |---------------- seq_len ----------------|
    |------ context_len ------|-- query_len --|     context_len = seq_len - query_len (tokens already cached)

A request is *eligible* when ``seq_len >= min_sparse_len`` (the length gate looks at the whole sequence so far, not
at the chunk) and either

- it is a *fresh prefill* (``context_len == 0``): its rows of ``key``/``value`` hold the whole sequence, so the op
  reads them in place; or
- it has cached context (a later chunk of a chunked prefill, or new tokens after a prefix-cache hit) and at least
  ``min_query_len`` new tokens (``None``: such requests are not eligible): the op reads the whole sequence from
  vLLM's paged KV cache, which already holds the new rows.

Decodes (one new token) and short extends stay on stock FlashAttention.

The plan is a *head* of requests for stock FlashAttention and a *tail* of eligible requests for the op. With
``reorder_batch_threshold = 1`` vLLM's V1 model runner orders a batch decode -> extend/prefill, so eligible
requests form the tail; under other orders (model runner V2 sorts by length) the tail is the longest run of
eligible requests at the end, and eligible requests before it simply run dense. Trailing requests with no query
rows (CUDA-graph padding) belong to neither part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Requests ``[0, num_head_reqs)`` (query rows ``[0, num_head_tokens)``) go to stock FlashAttention; requests
    ``[num_head_reqs, num_head_reqs + num_tail_reqs)`` (rows ``[num_head_tokens, num_head_tokens +
    num_tail_tokens)``) run the sparse op, one call per request.

    ``tail_cu_seqlens`` is the tail's int32 CPU ``(num_tail_reqs + 1,)`` prefix sum of query lengths, rebased to
    start at 0; ``tail_query_lens`` / ``tail_seq_lens`` are each tail request's new tokens and whole length (equal
    for a fresh prefill). ``tail_max_len`` bounds the tail's query lengths; ``num_eligible_kept_stock`` counts the
    eligible requests left in the head because a request after them is not eligible;
    ``head_max_query_len`` / ``head_max_seq_len`` bound the head's (0 when the head is empty).
    """

    num_head_reqs: int
    num_head_tokens: int
    head_max_query_len: int
    head_max_seq_len: int
    num_tail_reqs: int
    num_tail_tokens: int
    tail_cu_seqlens: torch.Tensor
    tail_max_len: int
    tail_query_lens: tuple[int, ...] = ()
    tail_seq_lens: tuple[int, ...] = ()
    num_eligible_kept_stock: int = 0

    @property
    def has_tail(self) -> bool:
        return self.num_tail_reqs > 0

    @property
    def tail_has_context(self) -> bool:
        """Whether any tail request reads cached context (then the op needs the paged KV cache)."""
        return any(q != s for q, s in zip(self.tail_query_lens, self.tail_seq_lens))


def _as_int64(x: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"plan_split needs CPU lengths (reading GPU ones would sync the host); got {x.device}")
        return x.to(torch.int64)
    return torch.as_tensor(list(x), dtype=torch.int64)


def plan_split(query_start_loc_cpu: torch.Tensor | Sequence[int], seq_lens_cpu: torch.Tensor | Sequence[int],
               min_sparse_len: int, num_reqs: int | None = None,
               min_query_len: int | None = None) -> SplitPlan:
    """Split a batch into a stock-FlashAttention head and a tail of eligible requests.

    Args:
        query_start_loc_cpu: ``(num_reqs + 1,)`` prefix sums of query lengths (CPU tensor or list; longer is fine).
        seq_lens_cpu: ``(num_reqs,)`` context + query lengths (CPU). An upper bound is fine for the rows that
            matter: it is exact for prefill rows, and an overestimate only ever makes a row look cached.
        min_sparse_len: requests whose whole sequence is shorter than this stay in the head.
        num_reqs: requests to consider; by default ``len(seq_lens_cpu)``.
        min_query_len: requests with cached context and at least this many new tokens are eligible too (their
            keys come from the paged cache); ``None`` keeps them in the head (only fresh prefills run sparse).

    Returns:
        A :class:`SplitPlan`; ``has_tail`` is False when no request runs sparse (the whole batch is the head).
    """
    qsl = _as_int64(query_start_loc_cpu)
    seq_lens = _as_int64(seq_lens_cpu)
    n = seq_lens.numel() if num_reqs is None else num_reqs
    if qsl.numel() < n + 1 or seq_lens.numel() < n:
        raise ValueError(f"need {n + 1} query_start_loc and {n} seq_lens entries; got {qsl.numel()} and "
                         f"{seq_lens.numel()}")
    qsl, seq_lens = qsl[:n + 1], seq_lens[:n]
    query_lens = qsl[1:] - qsl[:-1]

    # Drop trailing requests without query rows (padding): they would otherwise cut the eligible tail.
    has_rows = (query_lens > 0).nonzero()
    end = int(has_rows[-1]) + 1 if has_rows.numel() else 0

    q, s = query_lens[:end], seq_lens[:end]
    shape_ok = q == s
    if min_query_len is not None:
        shape_ok |= (q >= max(min_query_len, 2)) & (q < s)
    eligible = (q > 0) & shape_ok & (s >= min_sparse_len)
    not_eligible = (~eligible).nonzero()
    k = int(not_eligible[-1]) + 1 if not_eligible.numel() else 0  # first request of the eligible suffix

    head_tokens = int(qsl[k])
    tail_cu = (qsl[k:end + 1] - head_tokens).to(torch.int32)
    return SplitPlan(
        num_head_reqs=k,
        num_head_tokens=head_tokens,
        head_max_query_len=int(query_lens[:k].max()) if k else 0,
        head_max_seq_len=int(seq_lens[:k].max()) if k else 0,
        num_tail_reqs=end - k,
        num_tail_tokens=int(qsl[end]) - head_tokens,
        tail_cu_seqlens=tail_cu,
        tail_max_len=int(query_lens[k:end].max()) if end > k else 0,
        tail_query_lens=tuple(query_lens[k:end].tolist()),
        tail_seq_lens=tuple(seq_lens[k:end].tolist()),
        num_eligible_kept_stock=int(eligible[:k].sum()),
    )
