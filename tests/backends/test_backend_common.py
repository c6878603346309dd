"""The backend's mixins without vLLM: layer eligibility, planning, the sparse forward (the sparse part written in
place), the profiling workspace, and every stock-FlashAttention path counted."""

import logging
import types

import pytest
import torch

from flashprefill_vllm.backends import eligibility, planning, sparse_forward, workspace
from flashprefill_vllm.backends.eligibility import Settings
from flashprefill_vllm.backends.planning import SparsePartFields, SparsePlanning
from flashprefill_vllm.backends.sparse_forward import SparseForward, run_sparse_part, split_kv_cache
from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.ops import flash_prefill_varlen_func

ELIGIBLE = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", sliding_window=(-1, -1),
                alibi_slopes=None, logits_soft_cap=0, sinks=None, attn_type="decoder",
                kv_sharing_target_layer_name=None, dcp_world_size=1, pcp_world_size=1)


def test_eligible_layer_has_no_fallback_reason():
    assert eligibility.layer_stock_reason(**ELIGIBLE) is None
    assert eligibility.layer_stock_reason(**{**ELIGIBLE, "kv_cache_dtype": "bfloat16", "logits_soft_cap": None,
                                           "sliding_window": None, "dtype": torch.float16}) is None


@pytest.mark.parametrize("change,needle", [
    ({"attn_type": "encoder_only"}, "attention type encoder_only"),
    ({"attn_type": "encoder_decoder"}, "attention type"),
    ({"sliding_window": (4095, 0)}, "sliding-window"),
    ({"alibi_slopes": torch.ones(4)}, "ALiBi"),
    ({"logits_soft_cap": 30.0}, "soft-cap"),
    ({"sinks": torch.zeros(4)}, "sinks"),
    ({"kv_sharing_target_layer_name": "model.layers.0.attn"}, "shared"),
    ({"head_size": 96}, "head size 96"),
    ({"dtype": torch.float32}, "dtype torch.float32"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
    ({"kv_cache_dtype": "fp8_e4m3"}, "quantized KV cache"),
    ({"dcp_world_size": 2}, "context parallelism"),
    ({"pcp_world_size": 2}, "context parallelism"),
])
def test_fallback_reasons(change, needle):
    reason = eligibility.layer_stock_reason(**{**ELIGIBLE, **change})
    assert reason is not None and needle in reason


def test_fallback_is_logged_once_per_reason_and_counted(caplog):
    from flashprefill_vllm.backends import fallback_counts, fallbacks, reset_fallback_counts
    reset_fallback_counts()
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        for _ in range(3):
            fallbacks.note_stock("layers with ALiBi")
        fallbacks.note_stock("layers with logits soft-cap")
    assert [r.getMessage().count("ALiBi") for r in caplog.records] == [1, 0]
    assert fallback_counts() == {"layers with ALiBi": 3, "layers with logits soft-cap": 1}
    reset_fallback_counts()
    assert fallback_counts() == {}


class _Builder(SparsePlanning):
    """The planning mixin with what FlashAttention's builder and ``_fp_init_planning`` would have set."""

    def __init__(self, min_len=1000, **attrs):
        self.fp_settings = Settings(config=FlashPrefillConfig(min_sparse_len=min_len), log_density=False)
        self.fp_kv_block_size, self.device = 16, torch.device("cpu")
        self.__dict__.update(attrs)


def _cam(reqs):
    """(context, new tokens) per request -> a CommonAttentionMetadata stand-in with CPU lengths."""
    import types
    qsl, seq = [0], []
    for c, n in reqs:
        qsl.append(qsl[-1] + n)
        seq.append(c + n)
    return (types.SimpleNamespace(max_query_len=max(n for _, n in reqs), num_reqs=len(reqs),
                                  query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32)),
            torch.tensor(seq, dtype=torch.int32))


@pytest.mark.parametrize("builder_attrs,base_attrs,seq_known,reason", [
    ({}, {"use_cascade": True}, True, "steps with cascade attention"),
    ({}, {"causal": False}, True, "steps with per-request (non-causal) attention masks"),
    ({}, {"mm_prefix_range_tensor": torch.zeros(1)}, True, "steps with multimodal prefix ranges"),
    ({}, {"mm_prefix_query_range_tensor": torch.zeros(1)}, True, "steps with multimodal prefix ranges"),
    ({}, {"rswa_prefix_lens": torch.zeros(1)}, True, "steps with R-SWA prefix lengths"),
    ({}, {"sliding_window": (127, 0)}, True, "steps with a sliding window in their metadata"),
    ({"dcp_world_size": 2}, {}, True, "steps under decode context parallelism (DCP)"),
    ({}, {}, False, "steps without CPU sequence lengths"),
])
def test_each_stock_step_reason_is_logged_once_and_counted(builder_attrs, base_attrs, seq_known, reason, caplog):
    import types
    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    cam, seq = _cam([(0, 2000)])
    base = types.SimpleNamespace(**base_attrs)
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        for _ in range(2):
            md = _Builder(**builder_attrs)._fp_build(SparsePartFields, base, cam,
                                    seq if seq_known else None)
            assert md is base
    assert fallback_counts() == {reason: 2}
    assert sum(reason in r.getMessage() for r in caplog.records) == 1


def test_decode_steps_are_not_counted_as_fallbacks():
    import types
    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    cam, _ = _cam([(500, 1), (900, 1)])
    base = types.SimpleNamespace(use_cascade=True)
    assert _Builder()._fp_build(SparsePartFields, base, cam, None) is base
    assert fallback_counts() == {}


def test_long_prefills_before_an_ineligible_request_are_counted():
    import types
    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    cam, seq = _cam([(0, 3000), (10, 1)])               # a long fresh prefill, then a decode (non-V1 order)
    base = types.SimpleNamespace()
    assert _Builder()._fp_build(SparsePartFields, base, cam, seq) is base
    assert fallback_counts() == {"long prefills before a request that cannot run sparse (batch order)": 1}


def test_ineligible_layers_are_counted_per_layer(monkeypatch):
    import types
    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    monkeypatch.setattr(eligibility, "current_vllm_config", lambda: None)
    for _ in range(3):
        impl = eligibility.LayerEligibility()
        impl.__dict__.update(head_size=128, kv_cache_dtype="auto", sliding_window=None, alibi_slopes=torch.ones(4),
                             logits_soft_cap=None, kv_sharing_target_layer_name=None)
        impl._fp_init_layer()
        assert impl.fp_stock_reason == "ALiBi"
    assert fallback_counts() == {"layers with ALiBi": 3}


def _strided_qkv(tokens, hq, hkv, d, dtype=torch.float16):
    """Views into one fused QKV buffer, as vLLM passes them (row stride (hq + 2 hkv) * d)."""
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)


@pytest.mark.parametrize("output_2d,log_density,packed_cache", [(False, False, False), (True, True, True)],
                         ids=["out3d-kv_first", "out2d-log-kv_packed"])
def test_sparse_tail_writes_only_its_rows(output_2d, log_density, packed_cache, caplog):
    """Two fresh prefills and a request with cached context (a later chunk: its keys come from the paged cache)."""
    import types
    from flashprefill_vllm.synthetic import to_paged
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 64
    head, pad = 5, 3
    reqs = [(0, 300), (0, 200), (260, 150)]          # (cached context, new tokens)
    q_lens = [n for _, n in reqs]
    start, end = head, head + sum(q_lens)
    q, k, v = _strided_qkv(end + pad, hq, hkv, d)
    # The whole sequence of every request, as the paged cache holds it; the new rows also sit in the step's k/v.
    full_k = [torch.randn(c + n, hkv, d, dtype=torch.float16) for c, n in reqs]
    full_v = [torch.randn(c + n, hkv, d, dtype=torch.float16) for c, n in reqs]
    row = start
    for (c, n), fk, fv in zip(reqs, full_k, full_v):
        k[row:row + n], v[row:row + n] = fk[c:], fv[c:]
        row += n
    seq_lens = torch.tensor([c + n for c, n in reqs], dtype=torch.int32)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int32), seq_lens.cumsum(0).to(torch.int32)])
    key_cache, value_cache, block_table, seqused = to_paged(torch.cat(full_k), torch.cat(full_v), cu_k, 16, seed=3)
    if packed_cache:   # vLLM 0.26: (num_blocks, num_kv_heads, block_size, 2 * head_size)
        kv_cache = torch.cat([key_cache, value_cache], dim=-1).transpose(1, 2).contiguous()
    else:              # (2, num_blocks, block_size, num_kv_heads, head_size)
        kv_cache = torch.stack([key_cache, value_cache])
    output = torch.full((end + pad, hq, d), float("nan"), dtype=torch.float16)
    md = types.SimpleNamespace(
        fp_num_stock_tokens=start, fp_num_sparse_tokens=end - start,
        fp_sparse_cu_seqlens=torch.tensor([0, 300, 500, 650], dtype=torch.int32),
        fp_sparse_query_lens=tuple(q_lens), fp_sparse_seq_lens=tuple(seq_lens.tolist()),
        fp_sparse_seqused=seqused, fp_sparse_block_table=block_table)
    cfg = FlashPrefillConfig(alpha=0.05, block_size=64, min_sparse_len=128)
    settings = Settings(config=cfg, log_density=log_density)
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        run_sparse_part(q, k, v, output.view(end + pad, hq * d) if output_2d else output,
                               split_kv_cache(kv_cache, hkv, 16, d), md,
                               scale=0.11, num_heads=hq, num_kv_heads=hkv, head_size=d, settings=settings,
                               layer_name="layers.7.attn")
    row = start
    for (c, n), fk, fv in zip(reqs, full_k, full_v):
        cq, ck = torch.tensor([0, n], dtype=torch.int32), torch.tensor([0, c + n], dtype=torch.int32)
        want = flash_prefill_varlen_func(q[row:row + n].contiguous(), fk, fv, cq, ck, n, c + n, softmax_scale=0.11,
                                         config=cfg)
        torch.testing.assert_close(output[row:row + n], want)
        row += n
    assert output[:start].isnan().all() and output[end:].isnan().all()
    logged = [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    if log_density:
        assert len(logged) == 3 and "layers.7.attn: 1 prefill(s), 300 tokens, kept" in logged[0]
        assert "1 prefill(s), 150 tokens, kept" in logged[2] and "(260 cached tokens before them)" in logged[2]
    else:
        assert not logged


def test_every_sparse_request_runs_with_its_dense_tail():
    """A whole prompt and a chunk over cached context both attend densely in their last query blocks: the prompt's
    end is not known from vLLM's metadata, so no request drops the tail."""
    import types
    torch.manual_seed(2)
    hq, hkv, d, n = 4, 2, 64, 512
    q, k, v = _strided_qkv(n, hq, hkv, d)
    cfg = FlashPrefillConfig(alpha=1.0, tau=0.0, block_size=64, min_sparse_len=128, num_local_blocks=1, num_sink_blocks=0,
                             num_dense_tail_blocks=2)
    settings = Settings(config=cfg, log_density=False)
    cu = torch.tensor([0, n], dtype=torch.int32)
    md = types.SimpleNamespace(fp_num_stock_tokens=0, fp_num_sparse_tokens=n, fp_sparse_cu_seqlens=cu,
                               fp_sparse_query_lens=(n,), fp_sparse_seq_lens=(n,), fp_sparse_seqused=None,
                               fp_sparse_block_table=None)
    out = torch.empty(n, hq, d, dtype=torch.float16)
    run_sparse_part(q, k, v, out, None, md, scale=0.125, num_heads=hq, num_kv_heads=hkv, head_size=d,
                           settings=settings, layer_name="model.layers.0.self_attn.attn")
    args = (q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, n, n)
    want = flash_prefill_varlen_func(*args, softmax_scale=0.125, config=cfg)
    without = flash_prefill_varlen_func(*args, softmax_scale=0.125, config=cfg.replace(num_dense_tail_blocks=0))
    assert (want[-128:].float() - without[-128:].float()).abs().max() > 1e-2   # the tail rows differ
    torch.testing.assert_close(out, want)


def test_split_kv_cache_layouts():
    k = torch.randn(5, 16, 2, 64)
    v = torch.randn(5, 16, 2, 64)
    for cache in (torch.stack([k, v]), torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()):
        kc, vc = split_kv_cache(cache, 2, 16, 64)
        assert torch.equal(kc, k) and torch.equal(vc, v)
    assert split_kv_cache(torch.randn(5, 2, 16, 100), 2, 16, 64) is None


@pytest.mark.parametrize("shape,why", [
    ((5, 16, 2, 128), "(blocks, block_size, kv_heads, 2 * head_size): last dimension alone matches the packed one"),
    ((5, 4, 16, 128), "packed, but 4 KV heads where the layer has 2"),
    ((5, 2, 32, 128), "packed, but 32 tokens per page where the cache spec says 16"),
    ((2, 5, 2, 16, 64), "[2, ...] with heads and tokens swapped (HND)"),
    ((2, 5, 16, 2, 32), "[2, ...] with another head size"),
    ((3, 5, 16, 2, 64), "three planes"),
])
def test_split_kv_cache_checks_the_whole_shape(shape, why):
    assert split_kv_cache(torch.zeros(shape), 2, 16, 64) is None, why


def test_unreadable_kv_cache_layout_runs_the_step_stock(caplog):
    """A chunk over cached context, in a cache layout the backend cannot read: the whole step goes to stock
    FlashAttention with the full metadata, and the reason is logged once and counted."""
    import types

    from flashprefill_vllm.backends import reset_fallback_counts
    reset_fallback_counts()
    calls = []
    md = types.SimpleNamespace(fp_sparse_query_lens=(100,), fp_sparse_seq_lens=(300,), fp_stock_metadata=None,
                               fp_kv_block_size=16)
    impl = _Impl()
    output = torch.zeros(4)

    def stock(layer, query, key, value, kv_cache, metadata, out):
        calls.append(metadata)
        return out

    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        for _ in range(2):
            res = impl._fp_forward_split(stock, None, None, None, None, torch.zeros(3, 7, 64), md, output)
    assert res is output and calls == [md, md]
    assert sum("KV-cache layout (3, 7, 64)" in r.getMessage() for r in caplog.records) == 1
    from flashprefill_vllm.backends import fallback_counts
    assert [n for r, n in fallback_counts().items() if "(3, 7, 64)" in r] == [2]


def test_workspace_bound_is_the_op_allocation_of_the_longest_request():
    from flashprefill_vllm.ops.utils import cdiv
    for shared in (False, True):
        cfg = FlashPrefillConfig(block_size=128, gqa_shared_index=shared)
        heads = 8 if shared else 32
        nq, nk = cdiv(8192, 128), cdiv(131072, 128)
        want = heads * nq * (nk + 1) * 4 + 8 * nk * 128 * 2
        assert workspace.index_workspace_bytes(8192, 131072, 32, 8, 128, 2, cfg) == want
    # A whole-prompt step longer than any sequence bound: keys as many as the rows.
    assert workspace.index_workspace_bytes(4096, 0, 32, 8, 128, 2, FlashPrefillConfig()) == \
        32 * 32 * 33 * 4 + 8 * 32 * 128 * 2


class _Impl(SparseForward):
    """The impl mixins with what FlashAttention's impl and ``_fp_init_layer`` would have set."""

    num_heads, num_kv_heads, head_size, scale, kv_cache_dtype = 8, 2, 64, 0.125, "auto"

    def __init__(self, reason=None, min_len=1024):
        self.fp_stock_reason = reason
        self.fp_settings = Settings(config=FlashPrefillConfig(min_sparse_len=min_len), log_density=False)


def test_profile_reservation_only_for_eligible_long_steps():
    q = torch.empty(4096, 8, 64, dtype=torch.bfloat16)
    cfg = FlashPrefillConfig(min_sparse_len=1024)
    assert _Impl()._fp_reserve_profile_workspace(q) == workspace.index_workspace_bytes(4096, 0, 8, 2, 64, 2, cfg) > 0
    assert _Impl(reason="ALiBi")._fp_reserve_profile_workspace(q) == 0
    assert _Impl(min_len=8192)._fp_reserve_profile_workspace(q) == 0


def test_preset_dense_layer_runs_stock_and_others_sparse():
    """A preset's "dense" layer sends its steps to stock FlashAttention (as FLASHPREFILL_DENSE_LAYERS does), the
    other layers split."""
    from flashprefill_vllm.backends.sparse_forward import SparseForward
    from flashprefill_vllm.presets import DENSE, parse_preset
    preset = parse_preset({"format": "flashprefill-preset", "version": 1, "name": "t", "match": {"names": ["*t"]},
                           "block_size": 64, "alpha": 1.0, "layer_alphas": {"3": DENSE}, "provenance": "test"})

    class Impl(SparseForward):
        def _fp_forward_split(self, *args):
            return "split"

    impl = object.__new__(Impl)
    impl.fp_stock_reason = None
    impl.fp_settings = Settings(config=FlashPrefillConfig(num_dense_layers=0), log_density=False, preset=preset)
    md = SparsePartFields()
    md.fp_num_sparse_reqs = 1
    stock = lambda *args: "stock"  # noqa: E731
    got = {i: impl._fp_forward(stock, types.SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn"), None,
                               None, None, None, md, None) for i in (0, 3, 4)}
    assert got == {0: "split", 3: "stock", 4: "split"}


def test_planning_sees_chunks_shorter_than_the_length_gate():
    """With the default gate (8192), a 2048-token chunk over 10,000 cached tokens is eligible; a decode-only step
    is not planned at all."""
    import types
    builder = _Builder(min_len=8192)
    qsl = torch.tensor([0, 1, 2049], dtype=torch.int32)
    seq = torch.tensor([500, 12048], dtype=torch.int32)
    cam = types.SimpleNamespace(max_query_len=2048, query_start_loc_cpu=qsl, num_reqs=2)
    plan = builder._fp_plan(cam, seq)
    assert plan.num_stock_reqs == 1 and plan.sparse_query_lens == (2048,) and plan.sparse_seq_lens == (12048,)
    decode = types.SimpleNamespace(max_query_len=1, query_start_loc_cpu=torch.tensor([0, 1, 2]), num_reqs=2)
    assert builder._fp_plan(decode, torch.tensor([500, 12048])) is None


def test_stock_step_reason_reads_each_release_fields_with_defaults():
    from types import SimpleNamespace as NS
    reason = planning.stock_step_reason
    assert reason(NS(use_cascade=False)) is None                                  # 0.10: no causal, no DCP
    assert reason(NS(use_cascade=True)) == "steps with cascade attention"
    assert reason(NS(use_cascade=False, causal=False)) is not None
    assert reason(NS(use_cascade=False, causal=True), dcp_world_size=2) is not None
    assert reason(NS(causal=True, sliding_window=(-1, -1)), dcp_world_size=1) is None  # 0.32
    assert reason(NS(sliding_window=(127, 0))) is not None
    assert reason(NS(mm_prefix_query_range_tensor=torch.zeros(1))) is not None


def test_sparse_forward_sends_quantized_outputs_and_plain_steps_stock():
    from types import SimpleNamespace as NS

    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    calls = []

    def stock(layer, q, k, v, kv, md, out, *scales):
        calls.append(scales)
        return out

    impl, out = _Impl(), torch.zeros(2)
    md = SparsePartFields(fp_num_sparse_reqs=1)
    q = torch.zeros(4, 8, 64)
    # A sparse step asking for a quantized output goes stock, scales passed on, and is counted.
    assert impl._fp_forward(stock, None, q, None, None, None, md, out, torch.ones(1), None) is out
    assert len(calls) == 1 and calls[0][1] is None and calls[0][0] is not None
    assert fallback_counts() == {"layer calls asking for a quantized output": 1}
    # A step whose metadata is not ours (decode-only: the builder handed back FlashAttention's) goes stock, uncounted.
    impl._fp_forward(stock, None, q, None, None, None, NS(), out, None, None)
    # So does every step of a layer with a stock reason.
    _Impl(reason="ALiBi")._fp_forward(stock, None, q, None, None, None, md, out, None, None)
    assert len(calls) == 3 and fallback_counts() == {"layer calls asking for a quantized output": 1}


def test_first_layers_run_stock_flash_attention():
    """FLASHPREFILL_DENSE_LAYERS (default 1): a step with a sparse part goes whole to stock FlashAttention in the
    first layers (and in a preset's "dense" layers), counted; later layers take the split path."""
    import dataclasses as dc

    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    from flashprefill_vllm.backends.planning import SparsePartFields
    from flashprefill_vllm.backends.sparse_forward import SparseForward
    from flashprefill_vllm.presets import layer_runs_dense

    @dc.dataclass
    class Md(SparsePartFields):
        pass

    class Impl(SparseForward):
        def _fp_forward_split(self, *args):
            return "split"

    impl = object.__new__(Impl)
    impl.fp_stock_reason = None
    impl.fp_settings = Settings(config=FlashPrefillConfig(), log_density=False)
    md = Md(fp_num_sparse_reqs=1)
    stock = lambda *args: "stock"  # noqa: E731
    reset_fallback_counts()
    layer = lambda i: types.SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn")  # noqa: E731
    assert FlashPrefillConfig().num_dense_layers == 1
    assert impl._fp_forward(stock, layer(0), None, None, None, None, md, None) == "stock"
    assert impl._fp_forward(stock, layer(1), None, None, None, None, md, None) == "split"
    assert sum(n for r, n in fallback_counts().items() if "layers set dense" in r) == 1
    impl.fp_settings = Settings(config=FlashPrefillConfig(num_dense_layers=0), log_density=False)
    assert impl._fp_forward(stock, layer(0), None, None, None, None, md, None) == "split"
    cfg = FlashPrefillConfig(num_dense_layers=2)
    assert [layer_runs_dense(cfg, None, f"model.layers.{i}.self_attn.attn") for i in range(3)] == [True, True, False]
    assert not layer_runs_dense(cfg, None, "lm_head")


def test_preset_layers_past_the_model_stop_the_backend_at_start_up(monkeypatch, tmp_path):
    import json
    preset = {"format": "flashprefill-preset", "version": 1, "name": "t", "match": {"names": ["*t"]},
              "block_size": 128, "alpha": 0.2, "layer_alphas": {"30": 0.1}, "provenance": "test"}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(preset))
    monkeypatch.setenv("FLASHPREFILL_PRESET", str(path))
    vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(
        model="/models/t", hf_config=types.SimpleNamespace(architectures=["X"], num_hidden_layers=24)))
    eligibility.settings.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"lists layer\(s\) \[30\]; the served model has 24 decoder layers"):
            eligibility.settings(vllm_config)
        vllm_config.model_config.hf_config.num_hidden_layers = 32
        assert eligibility.settings(vllm_config).preset.layer_alpha(30) == 0.1
    finally:
        eligibility.settings.cache_clear()


def test_each_sparse_request_gets_its_own_rows_and_host_lengths(monkeypatch):
    """The op sees one request at a time: exactly its rows, cu_seqlens from 0, and its lengths on the host (what the
    FA4 route needs to run without a host sync)."""
    import types
    seen = []
    real = sparse_forward.flash_prefill_varlen_func

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        seen.append((q.shape[0], k.shape[0], cu_q.tolist(), None if cu_k is None else cu_k.tolist(), max_q, max_k,
                     kw["seqlens_host"], kw["out"].shape[0]))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(sparse_forward, "flash_prefill_varlen_func", spy)
    hq, hkv, d = 4, 2, 64
    q, k, v = _strided_qkv(700, hq, hkv, d)
    md = types.SimpleNamespace(fp_num_stock_tokens=0, fp_num_sparse_tokens=700,
                               fp_sparse_cu_seqlens=torch.tensor([0, 300, 700], dtype=torch.int32),
                               fp_sparse_query_lens=(300, 400), fp_sparse_seq_lens=(300, 400), fp_sparse_seqused=None,
                               fp_sparse_block_table=None)
    out = torch.empty(700, hq, d, dtype=torch.float16)
    run_sparse_part(q, k, v, out, None, md, scale=0.125, num_heads=hq, num_kv_heads=hkv, head_size=d,
                    settings=Settings(config=FlashPrefillConfig(block_size=64, min_sparse_len=128), log_density=False),
                    layer_name="layers.3.attn")
    assert seen == [(300, 300, [0, 300], [0, 300], 300, 300, (300, 300), 300),
                    (400, 400, [0, 400], [0, 400], 400, 400, (400, 400), 400)]


@pytest.mark.parametrize("page_size", [0, 16])
def test_warm_up_runs_every_call_kind_a_step_makes(page_size, monkeypatch):
    """The engine-start warm-up's calls are valid op calls (an invalid one would stop vLLM at start-up): a fresh
    prompt and, with a page size, a chunk over a paged cache; here on the CPU reference."""
    calls = []
    real = workspace.flash_prefill_varlen_func
    monkeypatch.setattr(workspace, "flash_prefill_varlen_func",
                        lambda *a, **kw: calls.append(("paged" if kw.get("block_table") is not None else "packed",
                                                       kw["seqlens_host"])) or real(*a, **kw))
    workspace.warm_up_op(4, 2, 64, 0.125, torch.bfloat16, FlashPrefillConfig(), page_size, torch.device("cpu"))
    want = [("packed", (512, 512))] + ([("paged", (128, 512))] if page_size else [])
    assert calls == want
