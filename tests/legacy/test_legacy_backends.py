"""Our 0.10 / 0.12 backends on top of the real vLLM 0.10.0 / 0.12.0 FlashAttention classes, run on the CPU.

Real here: the FlashAttention backend, metadata, builder (``build``) and impl (``__init__``, ``forward``), the V1
``CommonAttentionMetadata`` and the reorder helper of each release. Faked: the two CUDA ops, by plain-torch versions
(``torch_flash.py``), and the engine config (``legacy_batch.vllm_config``). Each scheduler step goes the way the
release's model runner drives it: reorder (0.10: the builder's ``reorder_batch``; 0.12: the helper with the builder's
``reorder_batch_threshold``), ``build``, then ``forward`` of one layer, compared with dense attention per request,
and the paged cache checked for every token of every request.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import torch_flash
from legacy_batch import FakeInputBatch, Layer, Req, Step, scheduler_output, vllm_config

from flashprefill_vllm.ops import flash_prefill_varlen_func

VERSIONS = ["0.10.0", "0.12.0"]
pytestmark = pytest.mark.parametrize("vllm_version", VERSIONS, indirect=True)

# Arrival order of a mixed step: two decodes, a chunked-prefill continuation, a short and two long fresh prefills.
MIXED = [Req("p300", 0, 300), Req("d1", 40, 1), Req("e50", 64, 50), Req("p60", 0, 60), Req("d2", 100, 1),
         Req("p200", 0, 200)]
MIN_LEN = 128
# fp16 inputs, fp32 inside, fp16 out (STYLE.md's fp16 tolerance).
TOL = dict(atol=1e-2, rtol=1e-3)


def backend(v):
    return importlib.import_module({"0.10.0": "flashprefill_vllm.backends.vllm_0_10",
                                    "0.12.0": "flashprefill_vllm.backends.vllm_0_12"}[v.version])


def make_builder(v, step: Step):
    b = backend(v)
    spec = types.SimpleNamespace(block_size=step.block_size, dtype=step.dtype)
    if v.version == "0.10.0":
        return b.FlashPrefillMetadataBuilder(spec, vllm_config(step), torch.device("cpu"))
    return b.FlashPrefillMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vllm_config(step),
                                         torch.device("cpu"))


def make_impl(v, step: Step):
    """The impl as ``Attention.__init__`` builds it: positional args, while the model dtype is the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(step.dtype)
    try:
        return backend(v).FlashPrefillImpl(step.num_heads, step.head_size, step.scale, step.num_kv_heads, None,
                                           None, "auto")
    finally:
        torch.set_default_dtype(previous)


def reorder(v, builder, reqs: list[Req]) -> list[str]:
    """Batch order after the model runner's reorder step of this release."""
    batch, sched = FakeInputBatch(reqs), scheduler_output(reqs)
    if v.version == "0.10.0":
        builder.reorder_batch(batch, sched)  # GPUModelRunner._may_reorder_batch (0.10)
    else:
        from vllm.v1.attention.backends.utils import reorder_batch_to_split_decodes_and_prefills
        assert builder.reorder_batch_threshold == 1
        reorder_batch_to_split_decodes_and_prefills(batch, sched, decode_threshold=builder.reorder_batch_threshold)
    return batch.req_ids


def run_step(v, reqs: list[Req], **step_kw):
    """Reorder, build and run one layer's forward. Returns the step, builder, impl, metadata ``md``, ``output`` and
    ``n``, the number of real rows."""
    from vllm.v1.attention.backends.utils import CommonAttentionMetadata

    step = Step(reqs, **step_kw)
    builder, impl = make_builder(v, step), make_impl(v, step)
    order = reorder(v, builder, reqs)
    cam, query, key, value, output = step.batch(order, CommonAttentionMetadata)
    md = builder.build(0, cam)
    torch_flash.CALLS.clear()
    result = impl.forward(Layer(), query, key, value, step.kv_cache, md, output)
    assert result is output
    n = cam.num_actual_tokens
    assert output[n:].isnan().all(), "rows past num_actual_tokens (padding) must stay untouched"
    return types.SimpleNamespace(step=step, builder=builder, impl=impl, md=md, output=output, n=n)


def assert_cache_holds_every_token(step: Step):
    for r in step.reqs:
        k, val = step.cached(r)
        assert torch.equal(k, step.k_full[r.id]) and torch.equal(val, step.v_full[r.id]), f"{r.id}: KV cache"


def test_mixed_step_runs_fresh_prefills_sparse_and_matches_dense(vllm_version):
    v = vllm_version
    v.env.setenv("FLASHPREFILL_MIN_LEN", str(MIN_LEN))
    v.env.setenv("FLASHPREFILL_BLOCK_SIZE", "64")
    v.env.setenv("FLASHPREFILL_ALPHA", "1e-30")  # keep every block: the sparse op then computes dense attention
    run = run_step(v, MIXED)
    step, md, output, n = run.step, run.md, run.output, run.n

    order = [r.id for r in step.order]
    assert set(order[:2]) == {"d1", "d2"}, order  # decodes first
    if v.version == "0.12.0":
        assert order[2] == "e50", order  # 0.12: decode -> extend -> fresh prefill
    sparse = order[md.fp_num_stock_reqs:md.fp_num_stock_reqs + md.fp_num_sparse_reqs]
    assert sparse and set(sparse) <= {"p300", "p200"}, (order, sparse)
    assert md.fp_num_sparse_tokens == sum(r.query_len for r in step.order if r.id in sparse)
    assert md.fp_sparse_cu_seqlens.tolist()[-1] == md.fp_num_sparse_tokens

    # Stock FlashAttention ran once, on the stock part only, with its slice of FlashAttention's own metadata.
    (call,) = torch_flash.CALLS
    k, h = md.fp_num_stock_reqs, md.fp_num_stock_tokens
    assert call["q"].shape[0] == h and call["out"].shape[0] == h
    assert call["cu_seqlens_q"].tolist() == md.query_start_loc[:k + 1].tolist()
    assert call["seqused_k"].tolist() == md.seq_lens[:k].tolist() and call["block_table"].shape[0] == k
    assert call["scheduler_metadata"] is None

    torch.testing.assert_close(output[:n], step.expected(), **TOL)
    assert_cache_holds_every_token(step)


def test_sparse_part_rows_are_the_op_and_stock_part_rows_are_stock(vllm_version):
    v = vllm_version
    for name, value in dict(MIN_LEN=MIN_LEN, BLOCK_SIZE=64, ALPHA=1.0, TAU=0, SINK_BLOCKS=1, LOCAL_BLOCKS=1,
                            TAIL_BLOCKS=1).items():
        v.env.setenv(f"FLASHPREFILL_{name}", str(value))
    run = run_step(v, MIXED)
    step, md, output = run.step, run.md, run.output

    from flashprefill_vllm.backends.eligibility import settings
    h, t = md.fp_num_stock_tokens, md.fp_num_sparse_tokens
    cam_rows = slice(h, h + t)
    sparse_reqs = step.order[md.fp_num_stock_reqs:md.fp_num_stock_reqs + md.fp_num_sparse_reqs]
    q = torch.cat([step.q_new[r.id] for r in sparse_reqs])
    k = torch.cat([step.k_full[r.id] for r in sparse_reqs])
    val = torch.cat([step.v_full[r.id] for r in sparse_reqs])
    cu = md.fp_sparse_cu_seqlens
    want = flash_prefill_varlen_func(q, k, val, cu, cu, md.fp_sparse_max_query_len, md.fp_sparse_max_query_len,
                                     softmax_scale=step.scale, config=settings().config)
    assert torch.equal(output[cam_rows], want)
    dense = step.expected()
    assert (output[cam_rows].float() - dense[cam_rows].float()).abs().max() > 1e-2, "alpha=1 must drop blocks"
    torch.testing.assert_close(output[:h], dense[:h], **TOL)
    assert_cache_holds_every_token(step)


def test_decode_and_short_steps_are_stock(vllm_version):
    v = vllm_version
    v.env.setenv("FLASHPREFILL_MIN_LEN", str(MIN_LEN))
    reqs = [Req("d1", 40, 1), Req("d2", 300, 1), Req("e50", 64, 50), Req("p100", 0, 100)]
    run = run_step(v, reqs)
    step, md, output, n = run.step, run.md, run.output, run.n
    assert not hasattr(md, "fp_num_sparse_reqs")  # the stock builder's metadata, not copied
    (call,) = torch_flash.CALLS
    assert call["q"].shape[0] == n and call["cu_seqlens_q"] is md.query_start_loc  # the whole batch, untouched
    torch.testing.assert_close(output[:n], step.expected(), **TOL)
    assert_cache_holds_every_token(step)


def test_fresh_only_step_never_calls_stock_attention_but_fills_the_cache(vllm_version):
    v = vllm_version
    v.env.setenv("FLASHPREFILL_MIN_LEN", str(MIN_LEN))
    v.env.setenv("FLASHPREFILL_ALPHA", "1e-30")
    run = run_step(v, [Req("p300", 0, 300), Req("p200", 0, 200)])
    step, md, output, n = run.step, run.md, run.output, run.n
    assert md.fp_num_stock_reqs == 0 and md.fp_num_sparse_reqs == 2 and md.fp_stock_metadata is None
    assert torch_flash.CALLS == []
    torch.testing.assert_close(output[:n], step.expected(), **TOL)
    assert_cache_holds_every_token(step)  # written by our forward alone, as upstream's forward would have


def test_chunk_continuation_runs_sparse_over_the_paged_cache(vllm_version):
    """A later chunk of a long prompt (cached context + 200 new rows) joins the sparse part: its keys are read back
    from the paged cache, after this forward wrote the new rows there, and match dense attention at alpha -> 0."""
    v = vllm_version
    v.env.setenv("FLASHPREFILL_MIN_LEN", str(MIN_LEN))
    v.env.setenv("FLASHPREFILL_BLOCK_SIZE", "64")
    v.env.setenv("FLASHPREFILL_ALPHA", "1e-30")
    run = run_step(v, [Req("d1", 40, 1), Req("c200", 300, 200), Req("p300", 0, 300)])
    step, md, output, n = run.step, run.md, run.output, run.n
    sparse = [r.id for r in step.order[md.fp_num_stock_reqs:md.fp_num_stock_reqs + md.fp_num_sparse_reqs]]
    assert "c200" in sparse and "p300" in sparse, sparse
    i = sparse.index("c200")
    assert md.fp_sparse_query_lens[i] == 200 and md.fp_sparse_seq_lens[i] == 500
    (call,) = torch_flash.CALLS                    # stock attention ran for the decode only
    assert call["q"].shape[0] == 1
    torch.testing.assert_close(output[:n], step.expected(), **TOL)
    assert_cache_holds_every_token(step)


def test_layer_the_op_cannot_serve_stays_stock(vllm_version):
    """Head size 96 is FlashAttention's, not the op's: the layer falls back as a whole, even on a sparse-able batch."""
    v = vllm_version
    v.env.setenv("FLASHPREFILL_MIN_LEN", str(MIN_LEN))
    run = run_step(v, MIXED, head_size=96)
    assert "head size 96" in run.impl.fp_stock_reason
    if v.version == "0.12.0":
        assert run.impl.supports_quant_query_input() is True  # FlashAttention's own answer
    assert run.md.fp_num_sparse_reqs == 2  # the builder plans per KV-cache group; this layer ignores the plan
    (call,) = torch_flash.CALLS
    assert call["q"].shape[0] == run.n
    torch.testing.assert_close(run.output[:run.n], run.step.expected(), **TOL)
    assert_cache_holds_every_token(run.step)


def test_classes_builder_flags_and_graph_policy(vllm_version):
    v = vllm_version
    b = backend(v)
    from vllm.v1.attention.backends import flash_attn as fa
    from vllm.v1.attention.backends.utils import CommonAttentionMetadata

    assert issubclass(b.FlashPrefillBackend, fa.FlashAttentionBackend)
    assert issubclass(b.FlashPrefillImpl, fa.FlashAttentionImpl)  # the FA builder asserts it (AOT sliding window)
    assert issubclass(b.FlashPrefillMetadata, fa.FlashAttentionMetadata)
    assert b.FlashPrefillBackend.get_impl_cls() is b.FlashPrefillImpl
    assert b.FlashPrefillBackend.get_builder_cls() is b.FlashPrefillMetadataBuilder
    assert b.FlashPrefillBackend.get_name() == fa.FlashAttentionBackend.get_name()
    assert b.FlashPrefillBackend.get_kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)

    step = Step([Req("d", 20, 1), Req("p", 0, 40)])
    builder = make_builder(v, step)
    assert builder.use_cascade_attention(1024, None, 4, 2, False, False, False, 132) is False
    impl = make_impl(v, step)
    assert impl.fp_stock_reason is None
    if v.version == "0.10.0":
        decode_cam, *_ = step.batch(["d"], CommonAttentionMetadata)
        mixed_cam, *_ = step.batch(["d", "p"], CommonAttentionMetadata)
        assert builder.can_run_in_cudagraph(decode_cam) and not builder.can_run_in_cudagraph(mixed_cam)
        reqs = [Req("p", 0, 40), Req("d", 20, 1)]
        batch, sched = FakeInputBatch(reqs), scheduler_output(reqs)
        assert builder.reorder_batch(batch, sched) is True and batch.req_ids == ["d", "p"]
        # 0.10's model runner asserts that every other KV-cache group finds nothing left to move.
        assert builder.reorder_batch(batch, sched) is False
    else:
        from vllm.v1.attention.backends.utils import AttentionCGSupport
        assert builder.reorder_batch_threshold == 1
        assert b.FlashPrefillMetadataBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_BATCH
        assert impl.supports_quant_query_input() is False
