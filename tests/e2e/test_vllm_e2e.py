"""End to end in vLLM: FlashPrefill on (keep-everything alpha) must generate what stock FlashAttention generates.

Needs a GPU, vLLM, this package installed (``pip install -e .``: vLLM finds the plugin through its entry point) and a
local model: ``FLASHPREFILL_TEST_MODEL=/path/to/hf_model_dir``; optionally ``FLASHPREFILL_TEST_TEXT=/path/to/text``
for real-text prompts, ``FLASHPREFILL_TEST_ARGS`` for more ``run_llm.py`` flags (e.g. ``--enforce-eager``) and
``FLASHPREFILL_TEST_LONG_OVERRIDES`` (JSON ``hf_overrides``; default: Qwen2.5's YaRN x4) for the 64K-prefix case. ``run_llm.py`` runs once with ``FLASHPREFILL=0``
and once with ``FLASHPREFILL=1 FLASHPREFILL_ALPHA=1e-30 FLASHPREFILL_MIN_LEN=1024``: with alpha that small every
causally visible block is kept, so the sparse op computes dense attention and only rounding may differ. The batch
mixes long prompts (sparse path) with short ones (stock path), and decoding runs on the stock path throughout.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def compare_greedy(on: dict, off: dict) -> list[str]:
    """Problems found comparing two runs, by vLLM's own rule (``check_logprobs_close``): per prompt, generated tokens
    must agree until the first mismatch, where each run's token must be among the other run's top logprobs;
    comparison stops there, since the sequences then diverge."""
    problems = []
    for a, b in zip(on["results"], off["results"]):
        for pos, (ta, tb) in enumerate(zip(a["token_ids"], b["token_ids"])):
            if ta == tb:
                continue
            if str(ta) not in b["logprobs"][pos] or str(tb) not in a["logprobs"][pos]:
                problems.append(f"prompt of {a['prompt_len']} tokens, position {pos}: on chose {ta}, off chose {tb}, "
                                "and neither is in the other's top logprobs")
            break
    return problems


def test_compare_greedy_rule():
    def run(tokens, tops):
        return {"results": [{"prompt_len": 9, "token_ids": tokens,
                             "logprobs": [{str(t): -1.0 for t in top} for top in tops]}]}
    same = run([1, 2, 3], [[1], [2], [3]])
    assert compare_greedy(same, same) == []
    assert compare_greedy(run([1, 5, 9], [[1], [5, 2], [9]]), run([1, 2, 3], [[1], [2, 5], [3]])) == []
    assert len(compare_greedy(run([1, 5], [[1], [5]]), run([1, 2], [[1], [2]]))) == 1


def _run(tmp_path: pathlib.Path, name: str, model: str, env_over: dict, extra: list[str]) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPREFILL")}
    env.update(env_over, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(HERE / "run_llm.py"), "--model", model, "--out", str(out)] + extra
    cmd += shlex.split(os.environ.get("FLASHPREFILL_TEST_ARGS", ""))
    if os.environ.get("FLASHPREFILL_TEST_TEXT"):
        cmd += ["--text", os.environ["FLASHPREFILL_TEST_TEXT"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} run failed:\n{log[-6000:]}"
    return json.loads(out.read_text()), log


CHUNKED = ["--max-num-batched-tokens", "2048", "--lengths", "12000,100,9000,700,5000", "--shared-prefix", "8192"]
# Qwen2.5's published recipe past its 32K training context: YaRN, factor 4 (vLLM then allows 131072 tokens).
# FLASHPREFILL_TEST_LONG_OVERRIDES replaces it for another model ("{}" if the model needs none).
YARN_X4 = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                               "rope_theta": 1000000.0}}
# A 64K shared prefix: the first request is prefilled in 8K chunks, the second hits its 64K cached prefix.
PREFIX_64K = ["--max-num-batched-tokens", "8192", "--lengths", "66000,300", "--shared-prefix", "65536",
              "--max-model-len", "69632", "--gpu-memory-utilization", "0.6"]


def _model() -> str:
    pytest.importorskip("vllm")
    model = os.environ.get("FLASHPREFILL_TEST_MODEL")
    if not model:
        pytest.skip("set FLASHPREFILL_TEST_MODEL to a local HF model directory")
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
    assert "flashprefill_vllm.plugin:register" in plugins, "install the package (pip install -e .) first"
    return model


def _long_overrides() -> list[str]:
    raw = os.environ.get("FLASHPREFILL_TEST_LONG_OVERRIDES", json.dumps(YARN_X4))
    return [] if json.loads(raw) == {} else ["--hf-overrides", raw]


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize("extra", [[], ["--attention-backend", "CUSTOM"], CHUNKED,
                                   ["--max-num-batched-tokens", "8192", "--lengths", "15000,300,9000"], PREFIX_64K],
                         ids=["flash_attn_slot", "custom_slot", "chunks_2k_prefix_hit", "chunks_8k",
                              "chunks_8k_prefix_hit_64k"])
def test_sparse_prefill_matches_stock(tmp_path, extra):
    model = _model()
    if extra is PREFIX_64K:
        extra = extra + _long_overrides()
    sparse_env = {"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "1e-30", "FLASHPREFILL_MIN_LEN": "1024",
                  "FLASHPREFILL_LOG_DENSITY": "1"}
    stock_extra = []
    if "CUSTOM" in extra:
        # Explicit selection: the CUSTOM slot is registered whatever the switch says.
        sparse_env["FLASHPREFILL"] = "0"
    else:
        stock_extra = extra                         # same scheduler settings and prompts for the stock run
    on, on_log = _run(tmp_path, "on", model, sparse_env, extra)
    off, off_log = _run(tmp_path, "off", model, {"FLASHPREFILL": "0"}, stock_extra)

    # The sparse path really ran (once per layer and prefill step), and never in the stock run.
    assert "of causal key blocks" in on_log, on_log[-6000:]
    assert "of causal key blocks" not in off_log
    if "--max-num-batched-tokens" in extra:
        # Later chunks (and the prefix-cache hit) ran sparse over cached context read from the paged KV cache.
        assert "cached tokens before them" in on_log, on_log[-6000:]
    assert [r["prompt_len"] for r in on["results"]] == [r["prompt_len"] for r in off["results"]]
    assert compare_greedy(on, off) == []


@pytest.mark.gpu
@pytest.mark.e2e
def test_chunked_density_matches_whole_prompt(tmp_path):
    """At the default alpha, one 12000-token prompt prefilled whole and in 2K chunks keeps nearly the same share of
    key blocks: the chunks' selections, folded back into the prompt, match the whole prompt's selection."""
    from flashprefill_vllm.eval import density_log

    model = _model()
    env = {"FLASHPREFILL": "1", "FLASHPREFILL_MIN_LEN": "1024", "FLASHPREFILL_LOG_DENSITY": "1"}
    length = 12000
    common = ["--lengths", str(length), "--max-tokens", "1", "--no-prefix-caching"]
    _, whole_log = _run(tmp_path, "whole", model, env, common + ["--max-num-batched-tokens", "16384"])
    _, chunk_log = _run(tmp_path, "chunks", model, env, common + ["--max-num-batched-tokens", "2048"])
    whole, chunks = density_log.parse(whole_log), density_log.parse(chunk_log)
    assert whole and all(d.cached == 0 and d.tokens == length for d in whole), whole_log[-3000:]
    assert {d.cached for d in chunks} == set(range(0, length, 2048)), chunk_log[-3000:]
    d_whole = density_log.prompt_density(whole, length, 128)
    d_chunks = density_log.prompt_density(chunks, length, 128)
    print(f"density whole {d_whole:.4f}, 2K chunks {d_chunks:.4f}; per chunk "
          + ", ".join(f"{c['start']}: {c['density']:.3f}" for c in density_log.by_chunk(chunks)))
    assert d_whole < 0.9, "the default alpha should skip blocks on a 12K prompt"
    assert abs(d_whole - d_chunks) <= 0.02


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize("budget", ["2048", "8192"])
def test_chunked_prompt_matches_whole_prompt(tmp_path, budget):
    """With every block kept (alpha -> 0), prompts prefilled in chunks of ``budget`` tokens generate what the same
    prompts prefilled whole generate, both with FlashPrefill on."""
    model = _model()
    env = {"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "1e-30", "FLASHPREFILL_MIN_LEN": "1024",
           "FLASHPREFILL_LOG_DENSITY": "1"}
    common = ["--lengths", "12000,700,9000", "--no-prefix-caching"]
    whole, _ = _run(tmp_path, "whole", model, env, common + ["--max-num-batched-tokens", "16384"])
    chunked, chunk_log = _run(tmp_path, f"chunks{budget}", model, env,
                              common + ["--max-num-batched-tokens", budget])
    assert "cached tokens before them" in chunk_log, chunk_log[-3000:]
    assert compare_greedy(chunked, whole) == []
