"""Which requests of a vLLM step run sparse: pure functions over CPU lengths, no vLLM import.

Vocabulary (used across ``backends/``): the *sparse part* of a step is the requests that run the FlashPrefill op;
the *stock part* is every other request, run by stock FlashAttention; the *dense tail* is something else, the last
query blocks of a prompt, which attend densely inside the op.

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

The sparse part is the longest run of eligible requests at the end of the batch; the stock part is the requests
before it. With ``reorder_batch_threshold = 1`` vLLM's V1 model runner orders a batch decode -> extend/prefill, so
eligible requests come last; under other orders (model runner V2 sorts by length) eligible requests before an
ineligible one run stock (counted: ``num_eligible_kept_stock``). Trailing requests with no query rows (CUDA-graph
padding) belong to neither part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """The stock part, requests ``[0, num_stock_reqs)`` (query rows ``[0, num_stock_tokens)``), goes to stock
    FlashAttention; the sparse part, requests ``[num_stock_reqs, num_stock_reqs + num_sparse_reqs)`` (rows
    ``[num_stock_tokens, num_stock_tokens + num_sparse_tokens)``), runs the op, one call per request.

    ``sparse_cu_seqlens`` is the sparse part's int32 CPU ``(num_sparse_reqs + 1,)`` prefix sum of query lengths,
    rebased to start at 0; ``sparse_query_lens`` / ``sparse_seq_lens`` are each sparse request's new tokens and whole
    length (equal for a fresh prefill); ``sparse_max_query_len`` bounds its query lengths. ``stock_max_query_len`` /
    ``stock_max_seq_len`` bound the stock part's (0 when it is empty); ``num_eligible_kept_stock`` counts the
    eligible requests left in the stock part because a request after them is not eligible.
    """

    num_stock_reqs: int
    num_stock_tokens: int
    stock_max_query_len: int
    stock_max_seq_len: int
    num_sparse_reqs: int
    num_sparse_tokens: int
    sparse_cu_seqlens: torch.Tensor
    sparse_max_query_len: int
    sparse_query_lens: tuple[int, ...] = ()
    sparse_seq_lens: tuple[int, ...] = ()
    num_eligible_kept_stock: int = 0

    @property
    def has_sparse(self) -> bool:
        return self.num_sparse_reqs > 0

    @property
    def sparse_has_context(self) -> bool:
        """Whether any sparse request reads cached context (then the op needs the paged KV cache)."""
        return any(q != s for q, s in zip(self.sparse_query_lens, self.sparse_seq_lens))


def _as_int64(x: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"plan_split needs CPU lengths (reading GPU ones would sync the host); got {x.device}")
        return x.to(torch.int64)
    return torch.as_tensor(list(x), dtype=torch.int64)


def plan_split(query_start_loc_cpu: torch.Tensor | Sequence[int], seq_lens_cpu: torch.Tensor | Sequence[int],
               min_sparse_len: int, num_reqs: int | None = None,
               min_query_len: int | None = None) -> SplitPlan:
    """Split a batch into a stock part and a sparse part (the longest run of eligible requests at the end).

    Args:
        query_start_loc_cpu: ``(num_reqs + 1,)`` prefix sums of query lengths (CPU tensor or list; longer is fine).
        seq_lens_cpu: ``(num_reqs,)`` context + query lengths (CPU). An upper bound is fine for the rows that
            matter: it is exact for prefill rows, and an overestimate only ever makes a row look cached.
        min_sparse_len: requests whose whole sequence is shorter than this run stock.
        num_reqs: requests to consider; by default ``len(seq_lens_cpu)``.
        min_query_len: requests with cached context and at least this many new tokens are eligible too (their
            keys come from the paged cache); ``None`` keeps them stock (only fresh prefills run sparse).

    Returns:
        A :class:`SplitPlan`; ``has_sparse`` is False when no request runs sparse (the whole batch is the stock part).
    """
    qsl = _as_int64(query_start_loc_cpu)
    seq_lens = _as_int64(seq_lens_cpu)
    n = seq_lens.numel() if num_reqs is None else num_reqs
    if qsl.numel() < n + 1 or seq_lens.numel() < n:
        raise ValueError(f"need {n + 1} query_start_loc and {n} seq_lens entries; got {qsl.numel()} and "
                         f"{seq_lens.numel()}")
    qsl, seq_lens = qsl[:n + 1], seq_lens[:n]
    query_lens = qsl[1:] - qsl[:-1]

    # Drop trailing requests without query rows (padding): they would otherwise cut the sparse part.
    has_rows = (query_lens > 0).nonzero()
    end = int(has_rows[-1]) + 1 if has_rows.numel() else 0

    q, s = query_lens[:end], seq_lens[:end]
    shape_ok = q == s
    if min_query_len is not None:
        shape_ok |= (q >= max(min_query_len, 2)) & (q < s)
    eligible = (q > 0) & shape_ok & (s >= min_sparse_len)
    not_eligible = (~eligible).nonzero()
    k = int(not_eligible[-1]) + 1 if not_eligible.numel() else 0  # first request of the sparse part

    stock_tokens = int(qsl[k])
    sparse_cu = (qsl[k:end + 1] - stock_tokens).to(torch.int32)
    return SplitPlan(
        num_stock_reqs=k,
        num_stock_tokens=stock_tokens,
        stock_max_query_len=int(query_lens[:k].max()) if k else 0,
        stock_max_seq_len=int(seq_lens[:k].max()) if k else 0,
        num_sparse_reqs=end - k,
        num_sparse_tokens=int(qsl[end]) - stock_tokens,
        sparse_cu_seqlens=sparse_cu,
        sparse_max_query_len=int(query_lens[k:end].max()) if end > k else 0,
        sparse_query_lens=tuple(query_lens[k:end].tolist()),
        sparse_seq_lens=tuple(seq_lens[k:end].tolist()),
        num_eligible_kept_stock=int(eligible[:k].sum()),
    )
