"""Backend selection of the real vLLM 0.10.0 / 0.12.0 with our plugin: the entry point picks the loader by probing
the real package layout, and the real selector then returns FlashPrefill for FlashAttention layers only.

Real here: ``vllm.platforms`` (``__init__`` and ``interface``), ``CudaPlatformBase.get_attn_backend_cls``, the
attention selector with its cache and env-var handling, 0.12's registry, and the backend classes the selector
resolves (ours and FlashAttention's). The CUDA platform reports a fixed device capability instead of asking NVML.
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import runpy

import legacy_envs
import pytest
import torch

from flashprefill_vllm import plugin

REPO = pathlib.Path(__file__).resolve().parents[2]
FA = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
OURS_0_10 = "flashprefill_vllm.backends.vllm_0_10.FlashPrefillBackend"
OURS_0_12 = "flashprefill_vllm.backends.vllm_0_12.FlashPrefillBackend"


def qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture
def fresh_plugin(monkeypatch):
    monkeypatch.setattr(plugin, "_announced", False)
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(plugin.logger, attr, getattr(plugin.logger, attr))
    return plugin


@pytest.mark.parametrize("vllm_version,loader", [("0.10.0", "vllm_0_10"), ("0.12.0", "vllm_0_12")],
                         indirect=["vllm_version"])
def test_entry_point_probes_the_real_layout(vllm_version, loader, fresh_plugin):
    assert fresh_plugin._find_loader(True) is importlib.import_module(f"flashprefill_vllm.loaders.{loader}")


# ---------------------------------------------------------------------------------------------------- vLLM 0.10.0

def select_0_10(head_size=128, dtype=torch.bfloat16, use_mla=False):
    """What ``Attention.__init__`` gets: the real (cached) ``vllm.attention.selector.get_attn_backend``."""
    from vllm.attention.selector import get_attn_backend
    return qualname(get_attn_backend(head_size, dtype, "auto", 16, False, use_mla=use_mla))


@pytest.mark.parametrize("vllm_version", ["0.10.0"], indirect=True)
def test_0_10_register_makes_the_selector_return_flashprefill(vllm_version, fresh_plugin, caplog):
    assert select_0_10() == FA  # cached now, as layers built before the plugin would have it
    vllm_version.env.setenv("FLASHPREFILL", "1")
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        fresh_plugin.register()
        fresh_plugin.register()
    assert "FlashPrefill: on (backend slots FLASH_ATTN)" in caplog.text
    assert select_0_10() == OURS_0_10  # the cache was cleared
    # What the model runner resolves for the KV-cache group (it passes the cache's torch dtype as kv_cache_dtype).
    from vllm.attention.selector import get_attn_backend
    assert qualname(get_attn_backend(128, torch.bfloat16, torch.bfloat16, 16, False, use_mla=False)) == OURS_0_10
    vllm_version.env.setenv("VLLM_ATTENTION_BACKEND", "FLASH_ATTN")
    from vllm.attention import selector
    selector._cached_get_attn_backend.cache_clear()
    assert select_0_10() == OURS_0_10
    # One wrapper however often it is installed: its original is vLLM's own function.
    from vllm.platforms.cuda import CudaPlatformBase
    original = CudaPlatformBase.get_attn_backend_cls.__func__.__flashprefill_original__
    assert original.__module__ == "vllm.platforms.cuda" and not hasattr(original, "__flashprefill_original__")


@pytest.mark.parametrize("vllm_version", ["0.10.0"], indirect=True)
def test_0_10_off_leaves_selection_alone(vllm_version, fresh_plugin):
    vllm_version.env.setenv("FLASHPREFILL", "0")
    fresh_plugin.register()
    from vllm.platforms.cuda import CudaPlatformBase
    assert not hasattr(CudaPlatformBase.get_attn_backend_cls, "__flashprefill_original__")
    assert select_0_10() == FA


# (selected backend name or None, head_size, dtype, block_size, use_v1, use_mla, device capability)
STOCK_0_10 = {
    "mla": (None, 576, torch.bfloat16, 16, True, True, (9, 0)),
    "flashinfer": ("FLASHINFER", 128, torch.bfloat16, 16, True, False, (9, 0)),
    "flex": ("FLEX_ATTENTION", 128, torch.bfloat16, 16, True, False, (9, 0)),
    "triton": ("TRITON_ATTN_VLLM_V1", 128, torch.bfloat16, 16, True, False, (9, 0)),
    "head_size_96": (None, 96, torch.bfloat16, 16, True, False, (9, 0)),
    "float32": ("FLASH_ATTN", 128, torch.float32, 16, True, False, (9, 0)),
    "sm75": (None, 128, torch.float16, 16, True, False, (7, 5)),
    "v0_engine": ("FLASH_ATTN", 128, torch.float16, 16, False, False, (7, 5)),
}


@pytest.mark.parametrize("case", STOCK_0_10)
@pytest.mark.parametrize("vllm_version", ["0.10.0"], indirect=True)
def test_0_10_everything_else_gets_the_stock_answer(vllm_version, case):
    selected, head_size, dtype, block_size, use_v1, use_mla, capability = STOCK_0_10[case]
    platform = legacy_envs.set_platform(capability)
    from flashprefill_vllm.loaders import vllm_0_10
    from vllm.platforms.interface import _Backend

    assert vllm_0_10.install(enabled=True) == ["FLASH_ATTN"]
    args = (None if selected is None else _Backend[selected], head_size, dtype, "auto", block_size, use_v1, use_mla)
    original = type(platform).get_attn_backend_cls.__func__.__flashprefill_original__
    answer = platform.get_attn_backend_cls(*args)
    assert answer == original(type(platform), *args) and answer != vllm_0_10.BACKEND


@pytest.mark.parametrize("vllm_version", ["0.10.0"], indirect=True)
def test_0_10_eligible_answers(vllm_version):
    """Where vLLM itself picks V1 FlashAttention (no selection, FLASH_ATTN, FLASH_ATTN_VLLM_V1), ours is returned."""
    platform = legacy_envs.set_platform((8, 0))
    from flashprefill_vllm.loaders import vllm_0_10
    from vllm.platforms.interface import _Backend

    vllm_0_10.install(enabled=True)
    for selected in (None, _Backend.FLASH_ATTN, _Backend.FLASH_ATTN_VLLM_V1):
        for head_size, dtype in ((64, torch.float16), (128, torch.bfloat16), (256, torch.bfloat16)):
            assert platform.get_attn_backend_cls(selected, head_size, dtype, "auto", 16, True, False) == OURS_0_10


@pytest.mark.parametrize("vllm_version", ["0.12.0"], indirect=True)
def test_0_10_loader_refuses_another_version(vllm_version):
    """Applied to 0.12 (whose get_attn_backend_cls has other parameters), the 0.10 loader raises instead of
    wrapping; through the entry point that is logged and vLLM stays stock."""
    from flashprefill_vllm.loaders import vllm_0_10
    with pytest.raises(RuntimeError, match="expects CudaPlatformBase.get_attn_backend_cls"):
        vllm_0_10.install(enabled=True)


# ---------------------------------------------------------------------------------------------------- vLLM 0.12.0

def select_0_12(head_size=128, dtype=torch.bfloat16):
    from vllm.attention.selector import _cached_get_attn_backend, get_attn_backend
    _cached_get_attn_backend.cache_clear()
    return qualname(get_attn_backend(head_size, dtype, "auto", 16))


@pytest.mark.parametrize("vllm_version", ["0.12.0"], indirect=True)
def test_0_12_registry_maps_flash_attn_to_flashprefill_and_keeps_the_rest(vllm_version, fresh_plugin):
    from vllm.attention.backends import registry
    E = registry.AttentionBackendEnum
    assert select_0_12() == FA
    vllm_version.env.setenv("FLASHPREFILL", "1")
    fresh_plugin.register()
    fresh_plugin.register()
    # CUSTOM is an alias of TORCH_SDPA in 0.12.0 (both ""), so its override is stored under that member.
    assert E.CUSTOM is E.TORCH_SDPA
    assert registry._ATTN_OVERRIDES == {E.FLASH_ATTN: OURS_0_12, E.TORCH_SDPA: OURS_0_12}
    for member in E:
        if member not in (E.FLASH_ATTN, E.TORCH_SDPA):
            assert member.get_path() == member.value, member
    # Automatic selection (no env var) walks the priority list and validates our subclass with vLLM's own hooks.
    assert select_0_12() == OURS_0_12
    assert select_0_12(head_size=64, dtype=torch.float16) == OURS_0_12
    vllm_version.env.setenv("VLLM_ATTENTION_BACKEND", "CUSTOM")
    assert select_0_12() == OURS_0_12


@pytest.mark.parametrize("vllm_version", ["0.12.0"], indirect=True)
def test_0_12_off_registers_only_custom(vllm_version, fresh_plugin):
    from vllm.attention.backends import registry
    E = registry.AttentionBackendEnum
    fresh_plugin.register()
    assert registry._ATTN_OVERRIDES == {E.TORCH_SDPA: OURS_0_12}
    assert select_0_12() == FA
    vllm_version.env.setenv("VLLM_ATTENTION_BACKEND", "CUSTOM")
    assert select_0_12() == OURS_0_12


@pytest.mark.parametrize("vllm_version", ["0.12.0"], indirect=True)
def test_0_12_positional_class_path_registers_nothing(vllm_version):
    """Why the loaders pass ``class_path=`` by keyword: 0.12's second parameter is ``is_mamba``."""
    from vllm.attention.backends import registry
    registry.register_backend(registry.AttentionBackendEnum.FLASH_ATTN, "some.module.Backend")
    assert registry._ATTN_OVERRIDES == {}


# ---------------------------------------------------------------------------------------------------- patches/

@pytest.mark.parametrize("vllm_version,patch,expected", [
    ("0.10.0", "patch_loader_vllm_0_10_0.py", OURS_0_10), ("0.12.0", "patch_loader_vllm_0_12_0.py", OURS_0_12)],
    indirect=["vllm_version"])
def test_importing_the_patch_applies_its_loader(vllm_version, patch, expected):
    vllm_version.env.setenv("FLASHPREFILL", "0")  # the patch switches it on; restored after the test
    runpy.run_path(str(REPO / "patches" / patch))
    assert os.environ["FLASHPREFILL"] == "1"  # spawned engine processes re-apply it through the plugin
    assert (select_0_10() if vllm_version.version == "0.10.0" else select_0_12()) == expected
