"""Static checks on the newest vLLM release (``legacy_vllm.NEWEST``, 0.34.0): what the registry loader
(``loaders/vllm_latest.py``) and the backend (``backends/vllm_latest.py`` with its mixins) rely on is there, as they
use it. Read with ``ast`` from a few files of the release wheel (``conftest.newest_sources``); nothing is imported.
The same backend runs on 0.26.0 (GPU) and 0.32.0 (CPU integration tests): what differs between those releases is
probed at run time (``getattr``), never by version string.
"""

from __future__ import annotations

import ast
import pathlib

from test_legacy_sources import REPO, Source, calls, params, self_attrs

FA = "vllm/v1/attention/backends/flash_attn.py"
BACKEND = "vllm/v1/attention/backend.py"
# What planning.sparse_part_metadata reads or replaces on FlashAttention's metadata for the stock part.
FA_METADATA_FIELDS = {"num_actual_tokens", "max_query_len", "query_start_loc", "max_seq_len", "seq_lens",
                      "block_table", "slot_mapping", "scheduler_metadata"}
# What the impl mixins read on FlashAttention's impl.
IMPL_ATTRS = {"num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window", "kv_cache_dtype",
              "logits_soft_cap", "kv_sharing_target_layer_name", "attn_type", "sinks"}
OURS = Source(REPO, "flashprefill_vllm/backends/vllm_latest.py")


def _impl_method(root: pathlib.Path, name: str) -> ast.FunctionDef:
    """``name`` as FlashAttentionImpl resolves it through its bases (AttentionImpl, AttentionImplBase in 0.34)."""
    fa, backend = Source(root, FA), Source(root, BACKEND)
    for source, cls in ((fa, "FlashAttentionImpl"), (backend, "AttentionImpl"), (backend, "AttentionImplBase")):
        if cls in source.classes and any(isinstance(n, ast.FunctionDef) and n.name == name
                                         for n in source.classes[cls].body):
            return source.method(cls, name)
    raise AssertionError(f"no {name} on FlashAttentionImpl or its bases")


def _methods_we_override(cls: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in OURS.classes[cls].body if isinstance(n, ast.FunctionDef)}


def test_flash_attention_classes_keep_what_we_subclass(newest_sources):
    fa = Source(newest_sources, FA)
    assert {"get_name", "get_impl_cls", "get_builder_cls"} <= fa.class_names("FlashAttentionBackend")
    assert FA_METADATA_FIELDS | {"causal"} <= fa.class_names("FlashAttentionMetadata")
    # Our builder overrides these with FlashAttention's parameters; SparsePlanning.build has build's.
    for name, ours in _methods_we_override("FlashPrefillMetadataBuilder").items():
        if not name.startswith("_fp_"):
            assert params(fa.method("FlashAttentionMetadataBuilder", name)) == params(ours), name
    assert params(fa.method("FlashAttentionMetadataBuilder", "build")) == \
        ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]
    assert "_cudagraph_support" in fa.class_names("FlashAttentionMetadataBuilder")
    assert "device" in self_attrs(Source(newest_sources, BACKEND).method("AttentionMetadataBuilder", "__init__"))
    for name, ours in _methods_we_override("FlashPrefillImpl").items():
        if name != "__init__":
            assert params(_impl_method(newest_sources, name)) == params(ours), name
    impl_init = fa.method("FlashAttentionImpl", "__init__")
    assert IMPL_ATTRS <= self_attrs(impl_init)
    # An instance attribute (as from 0.26 on), which our impl overwrites per instance, not a method.
    assert "supports_quant_query_input" in self_attrs(impl_init)
    assert "supports_quant_query_input" not in fa.class_names("FlashAttentionImpl")


def test_what_0_34_removed_is_not_used():
    """0.34 dropped ``CommonAttentionMetadata.naive_query_lens`` and ``build_for_drafting``: nothing of ours uses
    them (the builder plans from ``query_start_loc_cpu`` and CPU sequence lengths)."""
    for path in (REPO / "flashprefill_vllm").rglob("*.py"):
        text = path.read_text()
        assert "naive_query_lens" not in text and "build_for_drafting" not in text, path


def test_common_attention_metadata_carries_the_cpu_lengths_we_plan_from(newest_sources):
    backend = Source(newest_sources, BACKEND)
    fields = backend.class_names("CommonAttentionMetadata")
    assert {"query_start_loc_cpu", "num_reqs", "max_query_len", "num_actual_tokens", "seq_lens_cpu_upper_bound",
            "causal"} <= fields
    assert "naive_query_lens" not in fields
    assert "UNIFORM_BATCH" in backend.class_names("AttentionCGSupport")
    assert params(backend.method("AttentionMetadataBuilder", "_init_reorder_batch_threshold"))[:2] == \
        ["self", "reorder_batch_threshold"]
    new = ast.unparse(_impl_method(newest_sources, "__new__"))     # read with getattr defaults by our impl mixins
    assert "self.dcp_world_size" in new and "self.pcp_world_size" in new
    # Model runner V2 (the only runner in 0.34) fills the upper bound our builder reads.
    runner = Source(newest_sources, "vllm/v1/worker/gpu/model_states/default.py")
    (build,) = calls(runner.tree, "build_attn_metadata")
    assert "seq_lens_cpu_upper_bound" in [k.arg for k in build.keywords]


def test_process_weights_after_loading_reaches_our_impl_with_the_dtype(newest_sources):
    """0.34's Attention layer takes no argument in ``process_weights_after_loading()`` but still passes the
    activation dtype to the impl's, which our warm-up hooks."""
    layer = Source(newest_sources, "vllm/model_executor/layers/attention/attention.py")
    fn = layer.method("Attention", "process_weights_after_loading")
    assert params(fn) == ["self"]
    (call,) = calls(fn, "process_weights_after_loading")
    assert ast.unparse(call.func) == "self.impl.process_weights_after_loading" and len(call.args) == 1
    assert params(_impl_method(newest_sources, "process_weights_after_loading")) == ["self", "act_dtype"]


def test_registry_calls_of_our_loader(newest_sources):
    registry = Source(newest_sources, "vllm/v1/attention/backends/registry.py")
    fn = registry.functions["register_backend"]
    assert params(fn)[:2] == ["backend", "class_path"]
    assert {"FLASH_ATTN", "CUSTOM", "get_path", "is_overridden", "get_class"} <= \
        registry.class_names("AttentionBackendEnum")
    assert registry.assigned("_ATTN_OVERRIDES")
    loader = Source(REPO, "flashprefill_vllm/loaders/common.py").functions["_register"]
    (ours,) = calls(loader, "register_backend")
    assert [k.arg for k in ours.keywords] == ["class_path"] and len(ours.args) == 1
    # get_name() must be the member's name: the selector looks the backend up by it.
    fa = Source(newest_sources, FA)
    assert fa.method("FlashAttentionBackend", "get_name").body[-1].value.value == "FLASH_ATTN"
    for cls, name in (("FlashPrefillBackend", "FLASH_ATTN"), ("FlashPrefillCustomBackend", "CUSTOM")):
        assert _methods_we_override(cls)["get_name"].body[-1].value.value == name
    assert (newest_sources / "vllm/v1/attention/backends/registry.py").is_file()  # what plugin._find_loader probes


def test_fa4_block_sparse_forward_keeps_what_the_fa4_route_passes(newest_sources):
    """``ops/fa4_route.py`` calls ``_flash_attn_fwd(q, k, v, softmax_scale=, causal=, out=, block_sparse_tensors=)``
    and builds ``BlockSparseTensorsTorch(**FA4BlockSparse._asdict())``: both must still take those names."""
    from flashprefill_vllm.ops.fa4_blocks import FA4BlockSparse

    interface = Source(newest_sources, "vllm/vllm_flash_attn/cute/interface.py")
    names = params(interface.functions["_flash_attn_fwd"])
    assert names[:3] == ["q", "k", "v"]
    assert {"softmax_scale", "causal", "out", "block_sparse_tensors"} <= set(names)
    sparsity = Source(newest_sources, "vllm/vllm_flash_attn/cute/block_sparsity.py")
    fields = [n.target.id for n in sparsity.classes["BlockSparseTensorsTorch"].body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    assert fields[:len(FA4BlockSparse._fields)] == list(FA4BlockSparse._fields), fields
