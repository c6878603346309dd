"""What the legacy tests fake when they import vLLM 0.10.0 / 0.12.0's real files (``legacy_vllm.VllmSources``).

Everything not listed here is the release's own code, among it: the platform interface, the CUDA platform and its
``get_attn_backend_cls``, the attention selector (0.10) and the backend registry (0.12), ``vllm.envs``,
``vllm.logger``, the V1 attention ``utils`` (``CommonAttentionMetadata``, builder base, reorder helpers), the V1
FlashAttention backend, metadata, builder and impl, and ``fa_utils``. The stubs stand for:

- compiled code: ``vllm._C``, ``vllm._custom_ops`` and ``vllm.vllm_flash_attn`` (torch versions of the two ops
  FlashAttention calls, from ``torch_flash.py``; FA2 is reported as the supported version, so no AOT scheduling);
- modules whose import pulls in the whole engine (``vllm.config``, ``vllm.attention.layer``, quantization,
  multimodal, distributed state) or a package not installed here (``regex`` behind 0.12's ``import_utils``,
  ``vllm.utils`` of 0.10 with zmq, psutil, ...): only the names the real files use, with trivial values.

The package ``__init__`` files of ``vllm.platforms`` and ``vllm.plugins`` run for real; ``current_platform`` is then
set to :func:`cuda_platform` (the real ``CudaPlatformBase`` with a fixed device capability, no NVML).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import typing

import torch
import torch_flash


def resolve_obj_by_qualname(qualname: str):
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


class Attention:
    """Stand-in for ``vllm.attention.layer.Attention`` (only named in isinstance lookups of AOT scheduling)."""


class VllmConfig:
    pass


def _real_assignment(path: pathlib.Path, name: str):
    """The value of a module-level ``name = Literal[...]`` of a real file, without importing that file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return eval(compile(ast.Expression(node.value), str(path), "eval"), {"Literal": typing.Literal})
    raise LookupError(f"{name} is not assigned in {path}")


def _no_group():
    raise AssertionError("no distributed group in a CPU test")  # what vLLM's getters raise before init


_COMMON = {
    "vllm._C": {},
    "vllm._custom_ops": dict(reshape_and_cache_flash=torch_flash.reshape_and_cache_flash),
    "vllm.vllm_flash_attn": dict(flash_attn_varlen_func=torch_flash.flash_attn_varlen_func,
                                 get_scheduler_metadata=None),
    "vllm.vllm_flash_attn.flash_attn_interface": dict(is_fa_version_supported=lambda v: v == 2,
                                                      fa_version_unsupported_reason=lambda v: "CPU test: FA2 only"),
    "vllm.attention.layer": dict(Attention=Attention),
    "vllm.attention.ops.merge_attn_states": dict(merge_attn_states=None),
    "vllm.distributed.kv_transfer.kv_connector.utils": dict(get_kv_connector_cache_layout=lambda: "NHD"),
}

STUBS = {
    "0.10.0": {
        **_COMMON,
        "vllm.utils": dict(cuda_device_count_stateless=lambda: 1, import_pynvml=lambda: None,
                           STR_BACKEND_ENV_VAR="VLLM_ATTENTION_BACKEND",
                           resolve_obj_by_qualname=resolve_obj_by_qualname, supports_xccl=lambda: False, cdiv=_cdiv,
                           get_dtype_size=lambda dtype: torch.empty((), dtype=dtype).element_size()),
        "vllm.inputs": dict(ProcessorInputs=object, PromptType=object),
        "vllm.model_executor.layers.quantization.utils.quant_utils": dict(GroupShape=object),
        "vllm.multimodal": dict(MultiModalPlaceholderMap=type("MultiModalPlaceholderMap", (), {"IndexMap": dict})),
        "vllm.config": dict(VllmConfig=VllmConfig, get_layers_from_vllm_config=lambda *args: {}),
    },
    "0.12.0": {
        **_COMMON,
        "vllm.utils.import_utils": dict(resolve_obj_by_qualname=resolve_obj_by_qualname, import_pynvml=lambda: None),
        "vllm.config": dict(VllmConfig=VllmConfig, ParallelConfig=object, get_layers_from_vllm_config=lambda *a: {},
                            get_current_vllm_config=lambda: None),
        # The real type aliases, read from the real file (importing it would pull in pydantic and the whole config).
        "vllm.config.cache": lambda root: {name: _real_assignment(root / "vllm/config/cache.py", name)
                                           for name in ("BlockSize", "CacheDType")},
        "vllm.attention.ops.common": dict(cp_lse_ag_out_rs=None),
        "vllm.distributed.parallel_state": dict(get_dcp_group=_no_group, get_pcp_group=_no_group),
        "vllm.model_executor.layers.batch_invariant": dict(vllm_is_batch_invariant=lambda: False),
        "vllm.model_executor.layers.attention_layer_base": dict(AttentionLayerBase=object),
    },
}
REAL_INITS = ("vllm.platforms", "vllm.plugins")


def cuda_platform(capability: tuple[int, int] = (9, 0)):
    """An instance of a subclass of the real ``CudaPlatformBase`` (as vLLM's ``current_platform`` is) reporting
    ``capability`` (H100 by default) without NVML."""
    from vllm.platforms.cuda import CudaPlatformBase
    from vllm.platforms.interface import DeviceCapability

    class TestCudaPlatform(CudaPlatformBase):
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(*capability)

    return TestCudaPlatform()


def set_platform(capability: tuple[int, int] = (9, 0)):
    """Make :func:`cuda_platform` vLLM's ``current_platform`` (the real ``vllm.platforms`` resolves it lazily)."""
    import vllm.platforms

    vllm.platforms._current_platform = cuda_platform(capability)
    return vllm.platforms._current_platform
