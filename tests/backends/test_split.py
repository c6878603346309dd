"""Routing plans: which requests of a batch run stock FlashAttention (stock part) and which run sparse (sparse part)."""

import pytest
import torch

from flashprefill_vllm.backends.split import plan_split

MIN = 1000


def batch(*reqs):
    """reqs: (context_len, query_len) per request, in batch order -> (query_start_loc, seq_lens) CPU int32."""
    qsl, seq = [0], []
    for ctx, q in reqs:
        qsl.append(qsl[-1] + q)
        seq.append(ctx + q)
    return torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq, dtype=torch.int32)


def check(plan, stock_reqs, stock_tokens, sparse_lens):
    assert plan.num_stock_reqs == stock_reqs and plan.num_stock_tokens == stock_tokens
    assert plan.num_sparse_reqs == len(sparse_lens) and plan.num_sparse_tokens == sum(sparse_lens)
    assert plan.sparse_cu_seqlens.dtype == torch.int32
    assert plan.sparse_cu_seqlens.tolist() == [0] + torch.tensor(sparse_lens, dtype=torch.long).cumsum(0).tolist()
    assert plan.sparse_max_query_len == max(sparse_lens, default=0)
    assert plan.has_sparse == bool(sparse_lens)


def test_decodes_extends_then_fresh_prefills():
    # V1 order with threshold 1: decode, decode, extend (chunk / prefix hit), short fresh, long fresh x2.
    qsl, seq = batch((50, 1), (3000, 1), (2048, 600), (0, 700), (0, 1500), (0, 2500))
    plan = plan_split(qsl, seq, MIN)
    # The short fresh prefill (700 < MIN) ends the stock part: the sparse part is the eligible suffix.
    check(plan, stock_reqs=4, stock_tokens=1 + 1 + 600 + 700, sparse_lens=[1500, 2500])
    assert plan.stock_max_query_len == 700 and plan.stock_max_seq_len == 3001


def test_only_decodes_has_no_sparse_part():
    qsl, seq = batch((100, 1), (5000, 1), (20000, 1))
    plan = plan_split(qsl, seq, MIN)
    check(plan, stock_reqs=3, stock_tokens=3, sparse_lens=[])


def test_single_fresh_prefill_is_all_sparse():
    qsl, seq = batch((0, 9000))
    plan = plan_split(qsl, seq, MIN)
    check(plan, stock_reqs=0, stock_tokens=0, sparse_lens=[9000])
    assert plan.stock_max_query_len == 0 and plan.stock_max_seq_len == 0


@pytest.mark.parametrize("reqs,why", [
    (((0, 999),), "shorter than min_sparse_len"),
    (((4096, 4096),), "chunked-prefill continuation (context cached)"),
    (((0, 5000), (1, 5000)), "last request has one cached token"),
    (((0, 2000), (10, 1)), "decode after the prefill (non-V1 order)"),
])
def test_ineligible_last_request_means_no_sparse_part(reqs, why):
    qsl, seq = batch(*reqs)
    plan = plan_split(qsl, seq, MIN)
    assert not plan.has_sparse, why
    assert plan.num_stock_reqs == len(reqs) and plan.num_stock_tokens == int(qsl[-1])


def test_eligible_before_an_ineligible_request_runs_dense():
    # Model runner V2 sorts by length: a long fresh prefill may precede a longer extend. It runs stock (and is counted).
    qsl, seq = batch((7, 1), (0, 1200), (500, 3000), (0, 4000), (0, 5000))
    plan = plan_split(qsl, seq, MIN)
    check(plan, stock_reqs=3, stock_tokens=1 + 1200 + 3000, sparse_lens=[4000, 5000])
    assert plan.num_eligible_kept_stock == 1


def test_min_len_boundary_is_inclusive():
    qsl, seq = batch((5, 1), (0, MIN))
    check(plan_split(qsl, seq, MIN), stock_reqs=1, stock_tokens=1, sparse_lens=[MIN])


def test_trailing_padding_requests_are_ignored():
    # CUDA-graph padding appends requests with no query rows; they must not cut the sparse part.
    qsl = torch.tensor([0, 1, 2001, 2001, 2001], dtype=torch.int32)
    seq = torch.tensor([10, 2000, 0, 0], dtype=torch.int32)
    check(plan_split(qsl, seq, MIN), stock_reqs=1, stock_tokens=1, sparse_lens=[2000])


def test_num_reqs_limits_and_lists_are_accepted():
    plan = plan_split([0, 1, 3001, 3002], [9, 3000, 77], MIN, num_reqs=2)
    check(plan, stock_reqs=1, stock_tokens=1, sparse_lens=[3000])


def test_upper_bound_seq_lens_never_make_a_cached_row_fresh():
    # An optimistic (larger) seq_len for a decode row can only look *more* cached.
    qsl, seq = batch((0, 3000))
    plan_exact = plan_split(qsl, seq, MIN)
    plan_upper = plan_split(qsl, seq + 3, MIN)
    assert plan_exact.has_sparse and not plan_upper.has_sparse


def test_min_sparse_len_zero_keeps_empty_rows_out():
    qsl = torch.tensor([0, 1, 1], dtype=torch.int32)
    seq = torch.tensor([1, 0], dtype=torch.int32)
    check(plan_split(qsl, seq, 0), stock_reqs=0, stock_tokens=0, sparse_lens=[1])


def test_rejects_gpu_or_short_inputs():
    with pytest.raises(ValueError, match="need 3 query_start_loc and 2 seq_lens"):
        plan_split([0, 1], [1, 1], MIN)
    with pytest.raises(ValueError, match="CPU lengths"):
        plan_split(torch.zeros(2, dtype=torch.int32, device="meta"), [1], MIN)


def test_cached_context_requests_join_the_sparse_part_when_enabled():
    # decode, short extend (below min_query_len), a later chunk, a prefix-cache hit, a fresh prefill.
    reqs = ((50, 1), (3000, 64), (4096, 600), (900, 300), (0, 1500))
    qsl, seq = batch(*reqs)
    off = plan_split(qsl, seq, MIN)                       # fresh prefills only
    check(off, stock_reqs=4, stock_tokens=1 + 64 + 600 + 300, sparse_lens=[1500])
    on = plan_split(qsl, seq, MIN, min_query_len=128)
    check(on, stock_reqs=2, stock_tokens=1 + 64, sparse_lens=[600, 300, 1500])
    assert on.sparse_query_lens == (600, 300, 1500) and on.sparse_seq_lens == (4696, 1200, 1500)
    assert on.sparse_has_context and not off.sparse_has_context
    assert on.sparse_max_query_len == 1500 and on.stock_max_seq_len == 3064


def test_length_gate_looks_at_the_whole_sequence_not_the_chunk():
    qsl, seq = batch((5, 1), (MIN - 200, 200))          # a 200-token chunk that brings the sequence to MIN
    check(plan_split(qsl, seq, MIN, min_query_len=128), stock_reqs=1, stock_tokens=1, sparse_lens=[200])
    qsl, seq = batch((5, 1), (MIN - 201, 200))          # one token short of the gate
    assert not plan_split(qsl, seq, MIN, min_query_len=128).has_sparse


def test_plan_split_takes_no_step_budget():
    """Whether a chunk ends its prompt is not guessed from the step's token budget (vLLM's metadata does not carry
    prompt lengths): a plan has no per-request end-of-prompt flag, and every sparse request keeps its dense tail."""
    import dataclasses
    import inspect
    assert "token_budget" not in inspect.signature(plan_split).parameters
    qsl, seq = batch((0, 4096),)
    plan = plan_split(qsl, seq, MIN, min_query_len=128)
    assert "tail_ends_prompt" not in {f.name for f in dataclasses.fields(plan)}
