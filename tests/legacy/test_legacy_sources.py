"""Static checks on the real vLLM 0.10.0 / 0.12.0 files: every class, method, parameter list, attribute and call
shape our loaders and backends rely on is there, as we use it (read with ``ast``; nothing is imported).

The execution tests (``test_legacy_selection.py``, ``test_legacy_backends.py``) run the same code paths; these
checks pin down what execution alone would not show: parameter *order* where we pass arguments positionally, that no
subclass overrides what we patch, that the model runner calls the hooks we override, and that our sparse part's KV
write has the exact argument shape of upstream's.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from flashprefill_vllm.loaders import vllm_0_10 as loader_0_10

REPO = pathlib.Path(__file__).resolve().parents[2]
# FlashAttention metadata fields that backends/planning.py reads or replaces when it slices the stock part.
FA_METADATA_FIELDS = {"num_actual_tokens", "max_query_len", "query_start_loc", "max_seq_len", "seq_lens",
                      "block_table", "slot_mapping", "scheduler_metadata", "use_cascade"}
# FlashAttentionImpl attributes the impl mixins read (0.10 lacks the getattr-defaulted ones).
IMPL_ATTRS = {"num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window", "kv_cache_dtype",
              "logits_soft_cap", "kv_sharing_target_layer_name"}
CAM_FIELDS = {"query_start_loc_cpu", "seq_lens_cpu", "num_reqs", "max_query_len", "num_actual_tokens"}
IMPL_INIT = ["self", "num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window",
             "kv_cache_dtype", "logits_soft_cap", "attn_type", "kv_sharing_target_layer_name"]
FORWARD = ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale"]


class Source:
    """One parsed file: classes and module-level functions by name."""

    def __init__(self, root: pathlib.Path, rel: str):
        self.path = root / rel
        self.tree = ast.parse(self.path.read_text(), filename=str(self.path))
        self.classes = {n.name: n for n in ast.walk(self.tree) if isinstance(n, ast.ClassDef)}
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}

    def method(self, cls: str, name: str) -> ast.FunctionDef:
        assert cls in self.classes, f"{self.path}: no class {cls}"
        for node in self.classes[cls].body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return node
        raise AssertionError(f"{self.path}: {cls} has no method {name}")

    def class_names(self, cls: str) -> set[str]:
        """Names a class body binds: fields (annotated), attributes, methods."""
        names = set()
        for node in self.classes[cls].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.FunctionDef):
                names.add(node.name)
        return names

    def assigned(self, name: str) -> bool:
        """Whether ``name`` is bound anywhere at module level (also inside ``if`` blocks)."""
        for n in ast.walk(self.tree):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        return False


def params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def decorators(fn: ast.FunctionDef) -> set[str]:
    return {ast.unparse(d) for d in fn.decorator_list}


def self_attrs(fn: ast.FunctionDef) -> set[str]:
    return {t.attr for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Calls of ``name`` or ``<anything>.name`` inside ``node``."""
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)
            and (isinstance(n.func, ast.Name) and n.func.id == name
                 or isinstance(n.func, ast.Attribute) and n.func.attr == name)]


def kv_write_shape(call: ast.Call, renames: dict[str, str]) -> list[str]:
    """A ``reshape_and_cache_flash(...)`` call's arguments, with row slices dropped and receivers renamed, so that
    upstream's write of all rows and ours of the sparse part's rows compare equal when they match argument for
    argument."""
    out = []
    for arg in call.args:
        if isinstance(arg, ast.Subscript):
            arg = arg.value
        text = ast.unparse(arg)
        for old, new in renames.items():
            text = text.replace(old, new)
        out.append(text)
    return out


@pytest.fixture(params=["0.10.0", "0.12.0"])
def version(request, vllm_sources):
    return request.param, vllm_sources[request.param]


def test_flash_attention_classes(version):
    ver, root = version
    fa = Source(root, "vllm/v1/attention/backends/flash_attn.py")
    backend = fa.class_names("FlashAttentionBackend")
    assert {"get_name", "get_impl_cls", "get_builder_cls", "get_kv_cache_shape"} <= backend
    name = fa.method("FlashAttentionBackend", "get_name").body[-1].value.value
    assert name == {"0.10.0": "FLASH_ATTN_VLLM_V1", "0.12.0": "FLASH_ATTN"}[ver]
    assert FA_METADATA_FIELDS | ({"causal"} if ver == "0.12.0" else set()) <= fa.class_names("FlashAttentionMetadata")

    init = fa.method("FlashAttentionMetadataBuilder", "__init__")
    assert params(init) == {"0.10.0": ["self", "kv_cache_spec", "vllm_config", "device"],
                            "0.12.0": ["self", "kv_cache_spec", "layer_names", "vllm_config", "device"]}[ver]
    assert params(fa.method("FlashAttentionMetadataBuilder", "build")) == \
        ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]
    assert "use_cascade_attention" in fa.class_names("FlashAttentionMetadataBuilder")
    if ver == "0.10.0":
        assert params(fa.method("FlashAttentionMetadataBuilder", "can_run_in_cudagraph")) == \
            ["self", "common_attn_metadata"]
        assert "device" in self_attrs(init)
    else:
        assert "_cudagraph_support" in fa.class_names("FlashAttentionMetadataBuilder")
        assert "dcp_world_size" in self_attrs(init)  # read by our build()

    impl_init = fa.method("FlashAttentionImpl", "__init__")
    assert params(impl_init) == IMPL_INIT + (["sinks"] if ver == "0.12.0" else [])
    assert IMPL_ATTRS | ({"attn_type", "sinks"} if ver == "0.12.0" else set()) <= self_attrs(impl_init)
    forward = fa.method("FlashAttentionImpl", "forward")
    assert params(forward) == FORWARD + (["output_block_scale"] if ver == "0.12.0" else [])
    if ver == "0.12.0":
        # A method in 0.12 (an instance attribute from 0.26 on): our override must be a method too.
        assert params(fa.method("FlashAttentionImpl", "supports_quant_query_input")) == ["self"]


def test_kv_write_in_forward_matches_ours(version):
    """0.10/0.12 write K/V inside ``forward``: ``key_cache, value_cache = kv_cache.unbind(0)`` then one
    ``reshape_and_cache_flash`` over the batch's rows; ``SparseForward._fp_forward_split`` writes the sparse part's
    rows the same way, through the ``fp_reshape_and_cache`` these releases' impls set to that function."""
    ver, root = version
    forward = Source(root, "vllm/v1/attention/backends/flash_attn.py").method("FlashAttentionImpl", "forward")
    unbinds = [n for n in ast.walk(forward) if isinstance(n, ast.Assign) and ast.unparse(n) ==
               "key_cache, value_cache = kv_cache.unbind(0)"]
    assert len(unbinds) == 1
    (theirs,) = calls(forward, "reshape_and_cache_flash")
    ours_fn = Source(REPO, "flashprefill_vllm/backends/sparse_forward.py").method("SparseForward", "_fp_forward_split")
    (ours,) = calls(ours_fn, "fp_reshape_and_cache")
    assert "key_cache, value_cache = kv_cache.unbind(0)" in ast.unparse(ours_fn)
    want = ["key", "value", "key_cache", "value_cache", "md.slot_mapping", "self.kv_cache_dtype", "layer._k_scale",
            "layer._v_scale"]
    assert kv_write_shape(theirs, {"attn_metadata.": "md."}) == want
    assert kv_write_shape(ours, {}) == want
    assert Source(root, "vllm/attention/utils/fa_utils.py").assigned("reshape_and_cache_flash")
    module = {"0.10.0": "vllm_0_10", "0.12.0": "vllm_0_12"}[ver]
    impl = Source(REPO, f"flashprefill_vllm/backends/{module}.py").classes["FlashPrefillImpl"]
    assert "fp_reshape_and_cache = staticmethod(reshape_and_cache_flash)" in ast.unparse(impl)


def test_attention_metadata_utils(version):
    ver, root = version
    utils = Source(root, "vllm/v1/attention/backends/utils.py")
    assert CAM_FIELDS <= utils.class_names("CommonAttentionMetadata")
    assert params(utils.functions["reorder_batch_to_split_decodes_and_prefills"]) == \
        ["input_batch", "scheduler_output", "decode_threshold"]
    runner = Source(root, "vllm/v1/worker/gpu_model_runner.py")
    if ver == "0.10.0":
        assert params(utils.method("AttentionMetadataBuilder", "reorder_batch")) == \
            ["self", "input_batch", "scheduler_output"]
        # The model runner drives the hooks our 0.10 builder overrides.
        for hook in ("reorder_batch", "can_run_in_cudagraph", "use_cascade_attention"):
            assert calls(runner.tree, hook), hook
    else:
        assert params(utils.method("AttentionMetadataBuilder", "_init_reorder_batch_threshold"))[:2] == \
            ["self", "reorder_batch_threshold"]
        assert {"reorder_batch_threshold", "get_cudagraph_support"} <= utils.class_names("AttentionMetadataBuilder")
        assert "UNIFORM_BATCH" in utils.class_names("AttentionCGSupport")
        (reorder,) = calls(runner.tree, "reorder_batch_to_split_decodes_and_prefills")
        assert [k.arg for k in reorder.keywords] == ["decode_threshold"]
        assert "self.reorder_batch_threshold" in ast.unparse(reorder)
        assert calls(runner.tree, "use_cascade_attention")
        abstract = Source(root, "vllm/attention/backends/abstract.py")
        assert {"dcp_world_size", "pcp_world_size"} <= self_attrs(abstract.method("AttentionImpl", "__new__"))


def test_0_10_choke_point(vllm_sources):
    root = vllm_sources["0.10.0"]
    cuda = Source(root, "vllm/platforms/cuda.py")
    fn = cuda.method("CudaPlatformBase", "get_attn_backend_cls")
    assert "classmethod" in decorators(fn)
    assert tuple(params(fn)) == loader_0_10.PARAMS
    others = [c for c, node in cuda.classes.items() if c != "CudaPlatformBase"
              and any(isinstance(m, ast.FunctionDef) and m.name == "get_attn_backend_cls" for m in node.body)]
    assert others == [], "a CUDA platform subclass overrides the method the 0.10 loader wraps"
    literals = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert loader_0_10.FLASH_ATTN_V1 in literals
    interface = Source(root, "vllm/platforms/interface.py")
    assert {"FLASH_ATTN", "FLASH_ATTN_VLLM_V1"} <= interface.class_names("_Backend")
    assert "is_cuda" in interface.class_names("Platform")
    selector = Source(root, "vllm/attention/selector.py")
    cached = selector.functions["_cached_get_attn_backend"]
    assert "cache" in decorators(cached)
    (call,) = calls(cached, "get_attn_backend_cls")
    assert ast.unparse(call.func) == "current_platform.get_attn_backend_cls"
    assert len(call.args) == len(loader_0_10.PARAMS) - 1 and not call.keywords
    # What plugin._find_loader probes: no registry module in either place, and _Backend exported by vllm.platforms.
    assert not (root / "vllm/attention/backends/registry.py").exists()
    assert not (root / "vllm/v1/attention/backends/registry.py").exists()
    platforms = Source(root, "vllm/platforms/__init__.py")
    assert any(isinstance(n, ast.ImportFrom) and "_Backend" in [a.name for a in n.names] for n in platforms.tree.body)


def test_0_12_registry(vllm_sources):
    root = vllm_sources["0.12.0"]
    registry = Source(root, "vllm/attention/backends/registry.py")
    fn = registry.functions["register_backend"]
    # class_path is third: a positional path lands in is_mamba. Our loaders pass it by keyword.
    assert params(fn) == ["backend", "is_mamba", "class_path"]
    members = registry.class_names("AttentionBackendEnum")
    assert {"FLASH_ATTN", "CUSTOM", "TORCH_SDPA", "get_path", "is_overridden", "get_class"} <= members
    assert registry.assigned("_ATTN_OVERRIDES")
    assert not (root / "vllm/v1/attention/backends/registry.py").exists()
    cuda = Source(root, "vllm/platforms/cuda.py")
    # Overrides are honoured in automatic and explicit selection: both resolve members through get_class().
    for method in ("get_attn_backend_cls", "get_valid_backends"):
        assert calls(cuda.method("CudaPlatformBase", method), "get_class"), method
    loader = Source(REPO, "flashprefill_vllm/loaders/common.py").functions["_register"]
    (ours,) = calls(loader, "register_backend")
    assert [k.arg for k in ours.keywords] == ["class_path"] and len(ours.args) == 1
