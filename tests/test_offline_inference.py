"""examples/offline_inference.py (the README's main job): which condition sends it to the CPU demo, the CPU demo's
progress, and the GPU run's parent side (report, density, JSON/PNG) on recorded child output (the children need a
GPU and vLLM)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
PATH = REPO / "examples" / "offline_inference.py"
spec = importlib.util.spec_from_file_location("offline_inference", PATH)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def test_cpu_demo_names_its_reasons_and_shows_progress():
    proc = subprocess.run([sys.executable, str(PATH), "--model", "/some/model", "--length", "1024"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CPU demo instead of the TTFT run in vLLM, because: no CUDA GPU (torch.cuda.is_available() is False)." in out
    assert "--model /some/model is not used" in out and "no --model given" not in out
    for i in (1, 2, 3):
        assert f"[{i}/3] " in out
    assert "density chosen: " in out and "rel-L2" in out


def test_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert example.cpu_demo_reasons(None) == [
        "no CUDA GPU (torch.cuda.is_available() is False)", "vLLM is not installed", "no --model given"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert example.cpu_demo_reasons("/m") == []


def _density_lines(tokens: int, layers: int, pct: float) -> str:
    return "\n".join(f"INFO FlashPrefill model.layers.{i}.self_attn.attn: 1 prefill(s), {tokens} tokens, kept "
                     f"{pct}% of causal key blocks" for i in range(layers))


def test_gpu_run_reports_ttft_density_and_writes_json(monkeypatch, tmp_path, capsys):
    children = {
        "dense": "RESULT " + json.dumps({"tokens": 8192, "ttft_s": 2.0, "text": " 68329."}),
        "sparse": "FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN): ...\nRESULT "
                  + json.dumps({"tokens": 8192, "ttft_s": 0.5, "text": " 68329."}),
        "density": "FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN): ...\n" + _density_lines(8192, 2, 25.0)
                   + "\nRESULT " + json.dumps({"tokens": 8192}),
    }
    calls = []

    def fake_child(name, args, env):
        calls.append((name, env["FLASHPREFILL"], env["FLASHPREFILL_LOG_DENSITY"]))
        return subprocess.CompletedProcess([], 0, children[name], "")

    monkeypatch.setattr(example, "start_child", fake_child)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("FLASHPREFILL_PRESET", raising=False)
    monkeypatch.delenv("FLASHPREFILL_BLOCK_SIZE", raising=False)
    args = example.argparse.Namespace(model="/models/Qwen2.5-7B-Instruct", length=8192, out_dir=str(tmp_path),
                                      no_density=False)
    example.gpu_run(args)
    out = capsys.readouterr().out
    assert calls == [("dense", "0", "0"), ("sparse", "1", "0"), ("density", "1", "1")]
    assert "TTFT dense (FlashPrefill off):     2000 ms" in out and "TTFT sparse (FlashPrefill on):      500 ms" in out
    assert "speed-up: x4.00" in out and "WARNING" not in out
    stem = tmp_path / "offline_inference_qwen2.5-7b-instruct_8192"
    result = json.loads(pathlib.Path(f"{stem}.json").read_text())
    # Every layer kept 25% of the visible blocks of the one whole-prompt prefill.
    assert result["density"]["density"] == pytest.approx(0.25) and "density chosen: 0.250" in out
    assert result["dense"]["ttft_s"] == 2.0 and result["sparse"]["ttft_s"] == 0.5 and result["gpu"].startswith("NVIDIA")
    assert (tmp_path / f"{stem.name}_sparse.log").read_text() == children["sparse"]
    if importlib.util.find_spec("matplotlib"):
        assert pathlib.Path(f"{stem}.png").stat().st_size > 0 and f"and {stem}.png" in out
    else:
        assert not pathlib.Path(f"{stem}.png").exists() and "matplotlib not installed: no PNG" in out


def test_gpu_run_warns_when_the_plugin_did_not_load(monkeypatch, tmp_path, capsys):
    result = "RESULT " + json.dumps({"tokens": 4096, "ttft_s": 1.0, "text": "x"})
    monkeypatch.setattr(example, "start_child", lambda name, args, env: subprocess.CompletedProcess([], 0, result, ""))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU")
    example.gpu_run(example.argparse.Namespace(model="m", length=4096, out_dir=str(tmp_path), no_density=True))
    out = capsys.readouterr().out
    assert "WARNING: no 'FlashPrefill: on (...)' line" in out and "python -m flashprefill_vllm info" in out
