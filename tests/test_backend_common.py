"""Version-agnostic backend logic (no vLLM): per-layer dense fallback, and the sparse tail written in place."""

import logging

import pytest
import torch

from flashprefill_vllm.backends import common
from flashprefill_vllm.config import FlashPrefillConfig
from flashprefill_vllm.ops import flash_prefill_varlen_func

ELIGIBLE = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", sliding_window=(-1, -1),
                alibi_slopes=None, logits_soft_cap=0, sinks=None, attn_type="decoder",
                kv_sharing_target_layer_name=None, dcp_world_size=1, pcp_world_size=1)


def test_eligible_layer_has_no_fallback_reason():
    assert common.dense_fallback_reason(**ELIGIBLE) is None
    assert common.dense_fallback_reason(**{**ELIGIBLE, "kv_cache_dtype": "bfloat16", "logits_soft_cap": None,
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
    reason = common.dense_fallback_reason(**{**ELIGIBLE, **change})
    assert reason is not None and needle in reason


def test_fallback_is_logged_once_per_reason(caplog, monkeypatch):
    monkeypatch.setattr(common, "_logged_fallbacks", set())
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        for _ in range(3):
            common.log_dense_fallback("ALiBi")
        common.log_dense_fallback("logits soft-cap")
    assert [r.getMessage().count("ALiBi") for r in caplog.records] == [1, 0]
    assert len(caplog.records) == 2


def _strided_qkv(tokens, hq, hkv, d, dtype=torch.float16):
    """Views into one fused QKV buffer, as vLLM passes them (row stride (hq + 2 hkv) * d)."""
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)


@pytest.mark.parametrize("output_2d,log_density", [(False, False), (True, True)], ids=["out3d", "out2d-log"])
def test_sparse_tail_writes_only_its_rows(output_2d, log_density, caplog):
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 64
    head, lens, pad = 5, [300, 200], 3
    start, end = head, head + sum(lens)
    q, k, v = _strided_qkv(end + pad, hq, hkv, d)
    output = torch.full((end + pad, hq, d), float("nan"), dtype=torch.float16)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    cfg = FlashPrefillConfig(alpha=0.05, block_size=64, min_sparse_len=128)
    settings = common.Settings(config=cfg, log_density=log_density)
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        common.run_sparse_tail(q, k, v, output.view(end + pad, hq * d) if output_2d else output, start=start,
                               end=end, cu_seqlens=cu, max_len=max(lens), scale=0.11, num_heads=hq,
                               num_kv_heads=hkv, head_size=d, settings=settings, layer_name="layers.7.attn")
    want = flash_prefill_varlen_func(q[start:end].contiguous(), k[start:end].contiguous(),
                                     v[start:end].contiguous(), cu, cu, max(lens), max(lens), softmax_scale=0.11,
                                     config=cfg)
    torch.testing.assert_close(output[start:end], want)
    assert output[:start].isnan().all() and output[end:].isnan().all()
    logged = [r.getMessage() for r in caplog.records if "kept" in r.getMessage()]
    if log_density:
        assert len(logged) == 1 and "layers.7.attn: 2 prefill(s), 500 tokens, kept" in logged[0]
    else:
        assert not logged


def _real_index_bytes(lengths, heads, kv_heads, d, itemsize, config):
    """Bytes the op's index launcher allocates for these fresh prefills (its shapes, from the op's own code)."""
    from flashprefill_vllm.ops.utils import cdiv
    n = cdiv(max(lengths), config.block_size)
    hidx = heads // (heads // kv_heads) if config.gqa_shared_index else heads
    return hidx * len(lengths) * n * (n + 1) * 4 + len(lengths) * kv_heads * n * d * itemsize


@pytest.mark.parametrize("shared", [False, True])
def test_workspace_bound_covers_every_split_of_the_budget(shared):
    cfg = FlashPrefillConfig(min_sparse_len=1024, block_size=128, gqa_shared_index=shared)
    budget = 8192
    bound = common.index_workspace_bytes(budget, 32, 8, 128, 2, cfg)
    worst = 0
    # Every way to fill the budget with eligible prompts, one long and the rest at the gate.
    for batch in range(1, budget // 1024 + 1):
        lengths = [budget - (batch - 1) * 1024] + [1024] * (batch - 1)
        worst = max(worst, _real_index_bytes(lengths, 32, 8, 128, 2, cfg))
        assert _real_index_bytes(lengths, 32, 8, 128, 2, cfg) <= bound
    assert bound == worst
    # Several prompts can need more than one prompt of the whole budget (the index is padded to the longest).
    assert bound > _real_index_bytes([budget], 32, 8, 128, 2, cfg)


class _Impl:
    num_heads, num_kv_heads, head_size = 8, 2, 64

    def __init__(self, reason=None, min_len=1024):
        self.fp_fallback_reason = reason
        self.fp_settings = common.Settings(config=FlashPrefillConfig(min_sparse_len=min_len), log_density=False)


def test_profile_reservation_only_for_eligible_long_steps():
    q = torch.empty(4096, 8, 64, dtype=torch.bfloat16)
    cfg = FlashPrefillConfig(min_sparse_len=1024)
    assert common.reserve_profile_workspace(_Impl(), q) == common.index_workspace_bytes(4096, 8, 2, 64, 2, cfg) > 0
    assert common.reserve_profile_workspace(_Impl(reason="ALiBi"), q) == 0
    assert common.reserve_profile_workspace(_Impl(min_len=8192), q) == 0
