"""``python -m flashprefill_vllm info``: the report against the code vLLM runs (plugin.register, the loader probe,
config and presets), in-process where the environment is set per test, and as a command in subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from flashprefill_vllm import info, plugin, presets
from flashprefill_vllm.config import ENV_VARS, FlashPrefillConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No FLASHPREFILL* or VLLM_PLUGINS from the caller's shell; the resolved preset forgotten before and after."""
    for var in ENV_VARS:
        monkeypatch.delenv(var.name, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    presets.active_preset.cache_clear()
    yield
    presets.active_preset.cache_clear()


def run_cli(*args, env=None, cwd=REPO):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPREFILL") and k != "VLLM_PLUGINS"}
    return subprocess.run([sys.executable, "-m", "flashprefill_vllm", *args], env={**base, **(env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_config_field_is_reported_with_its_source(monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_MIN_LEN", "4096")
    report = info.collect(probe_vllm=False)
    cfg = report.settings["config"]
    # Every field of the dataclass, so a new knob shows up without touching info.py.
    assert list(cfg) == [f.name for f in dataclasses.fields(FlashPrefillConfig)]
    assert cfg["min_sparse_len"] == {"value": 4096, "source": "FLASHPREFILL_MIN_LEN"}
    assert cfg["alpha"] == {"value": FlashPrefillConfig.alpha, "source": "default"}
    assert report.settings["enabled"] is True and report.errors == [] and report.exit_code == 0
    text = info.render(report)
    for field in cfg:
        assert f"  {field} " in text
    assert "[FLASHPREFILL_MIN_LEN]" in text
    # The default alpha is flagged as not chosen for the model.
    assert any(f"alpha={FlashPrefillConfig.alpha:g}, tau={FlashPrefillConfig.tau:g} are the defaults" in n
               for n in report.notes)


def _startup_error(monkeypatch) -> str:
    """The message vLLM stops with: what plugin.register(), the entry point vLLM calls, raises (it raises before
    probing vLLM; the probe is stubbed anyway, so that vLLM's registry is never touched here)."""
    monkeypatch.setattr(plugin, "_find_loader", lambda enabled: None)
    with pytest.raises(ValueError) as err:
        plugin.register()
    return str(err.value)


@pytest.mark.parametrize("env", [
    {"FLASHPREFILL": "yes"},
    {"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "2"},
    {"FLASHPREFILL": "1", "FLASHPREFILL_TAU": "-0.5"},
    {"FLASHPREFILL": "1", "FLASHPREFILL_BLOCK_SIZE": "100"},
    {"FLASHPREFILL": "1", "FLASHPREFILL_PRESET": "no-such-preset"},
    {"FLASHPREFILL": "1", "FLASHPREFILL_PRESET": "llama-3.1-8b-instruct", "FLASHPREFILL_BLOCK_SIZE": "64"},
], ids=["switch", "alpha", "tau", "block", "preset", "preset-block"])
def test_bad_values_are_reported_exactly_as_at_vllm_startup(monkeypatch, env, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = _startup_error(monkeypatch)
    report = info.collect(probe_vllm=False)
    assert report.errors[0] == expected and report.exit_code == 1
    assert info.main(["--no-vllm"]) == 1
    out = capsys.readouterr().out
    assert "errors (vLLM stops at start-up with this):" in out and f"  - {expected}" in out


def test_bad_knob_with_the_switch_off_is_an_error_for_when_it_is_on(monkeypatch, capsys):
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "0")
    monkeypatch.setattr(plugin, "_find_loader", lambda enabled: None)
    plugin.register()  # the switch is off: vLLM starts ...
    monkeypatch.setenv("FLASHPREFILL", "1")
    expected = _startup_error(monkeypatch)  # ... and stops once it is on
    monkeypatch.delenv("FLASHPREFILL")
    assert info.main(["--no-vllm"]) == 1
    out = capsys.readouterr().out
    assert f"  - {expected}" in out and "once FLASHPREFILL=1" in out


def test_preset_then_environment_precedence_and_per_layer_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_PRESET", "llama-3.1-8b-instruct")
    report = info.collect(model="meta-llama/Llama-3.1-8B-Instruct", probe_vllm=False)
    assert report.settings["config"]["alpha"] == {"value": 0.18, "source": "preset 'llama-3.1-8b-instruct'"}
    assert report.settings["preset"]["name"] == "llama-3.1-8b-instruct" and report.warnings == []

    preset = presets.BUILTIN_PRESETS["qwen2.5-7b-instruct"].to_dict()
    preset.update(name="mine", layer_alphas={"0": "dense", "3": 0.25})
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset))
    monkeypatch.setenv("FLASHPREFILL_PRESET", str(path))
    report = info.collect(model="Qwen/Qwen2.5-7B-Instruct", probe_vllm=False)
    assert report.settings["layer_overrides"] == {"0": "dense", "3": 0.25}
    assert report.settings["config"]["alpha"]["value"] == 0.08
    assert "per-layer alphas       0: dense, 3: 0.25" in info.render(report)

    monkeypatch.setenv("FLASHPREFILL_ALPHA", "0.05")  # an explicit alpha beats the preset and drops its layers
    report = info.collect(model="Qwen/Qwen2.5-7B-Instruct", probe_vllm=False)
    assert report.settings["config"]["alpha"] == {"value": 0.05, "source": "FLASHPREFILL_ALPHA"}
    assert report.settings["layer_overrides"] == {}
    assert "overrides its alpha" in report.settings["preset_message"]


def test_misspelt_variable_is_named_with_the_closest_known_one(monkeypatch, capsys):
    """A FLASHPREFILL_* variable nothing reads is reported as plugin.register() logs it, beside any error."""
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_TAUU", "0.9")
    report = info.collect(probe_vllm=False)
    assert report.exit_code == 0
    assert any("FLASHPREFILL_TAUU='0.9'" in w and "did you mean FLASHPREFILL_TAU?" in w for w in report.warnings)
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "2")
    report = info.collect(probe_vllm=False)
    assert report.exit_code == 1 and any("did you mean FLASHPREFILL_TAU?" in w for w in report.warnings)


def test_preset_made_for_another_model_warns(monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_PRESET", "qwen2.5-7b-instruct")
    report = info.collect(model="meta-llama/Llama-3.1-8B-Instruct", probe_vllm=False)
    assert report.exit_code == 0
    assert [w for w in report.warnings if "was made for models matching ['*qwen2.5-7b-instruct']" in w
            and "Llama-3.1-8B-Instruct" in w]
    report = info.collect(probe_vllm=False)  # no model given: said, not warned
    assert not report.warnings and any("pass --model" in n for n in report.notes)


def test_auto_preset_resolves_for_the_model_and_reads_architectures_from_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_PRESET", "auto")
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    report = info.collect(model=str(folder), probe_vllm=False)
    assert report.settings["architectures"] == ["Qwen2ForCausalLM"]
    assert report.settings["preset"]["name"] == "qwen2.5-7b-instruct"
    # Another architecture in the folder: auto falls back to the default alpha, as in vLLM.
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    report = info.collect(model=str(folder), probe_vllm=False)
    assert report.settings["preset"] is None and "no built-in preset matches" in report.settings["preset_message"]
    report = info.collect(probe_vllm=False)
    assert any("auto picks its preset when vLLM builds the model" in n for n in report.notes)


@pytest.mark.parametrize("value,allowed", [(None, True), ("flashprefill", True), ("other,flashprefill", True),
                                           ("other", False), ("", False), ("flashprefill_x", False)])
def test_vllm_plugins_allowlist(monkeypatch, value, allowed):
    if value is not None:
        monkeypatch.setenv("VLLM_PLUGINS", value)
    report = info.collect(probe_vllm=False)
    assert report.plugin["allowed"] is allowed
    assert any("does not list 'flashprefill'" in w for w in report.warnings) is not allowed


def test_missing_entry_point_warns(monkeypatch):
    monkeypatch.setattr(info, "_entry_point", lambda: None)
    report = info.collect(probe_vllm=False)
    assert report.package["entry_point"] is None
    assert any("vLLM will not load the plugin" in w for w in report.warnings)


def test_installed_entry_point_is_reported():
    report = info.collect(probe_vllm=False)
    assert report.package["entry_point"]["value"] == "flashprefill_vllm.plugin:register"
    assert report.package["entry_point"]["distribution"] == "flashprefill-vllm"


def test_kernel_path_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "plain-torch reference" in info.collect(probe_vllm=False).device["kernel_path"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "Triton interpreter" in info.collect(probe_vllm=False).device["kernel_path"]


def test_kernel_path_on_an_old_gpu(monkeypatch):
    # Stands in for a GPU (none here): the report's reading of what torch says about it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    report = info.collect(probe_vllm=False)
    assert report.device["kernel_path"].startswith("Triton kernels on CUDA")
    assert "Tesla T4 (SM 7.5" in report.device["gpu"]
    assert any("only on SM 8.0 and newer" in w for w in report.warnings)


def test_vllm_probe_uses_the_plugins_loader(monkeypatch):
    vllm = pytest.importorskip("vllm")  # tests/integration needs it too; present in CI
    report = info.collect()
    loader = plugin._find_loader(False)
    assert report.vllm["installed"] and report.vllm["version"] == vllm.__version__
    assert report.vllm["loader"] == loader.__name__.rsplit(".", 1)[-1]
    assert report.vllm["api"] == loader.__doc__.strip().splitlines()[0].replace("``", "")
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        assert any("never selects FLASH_ATTN" in w for w in report.warnings)


def test_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(info, "_dist_version", lambda name: None if name.startswith("vllm") else "3.6.0")
    monkeypatch.setenv("FLASHPREFILL", "1")
    report = info.collect()
    assert report.vllm["installed"] is False and report.vllm["loader"] is None
    assert any("vLLM is not installed" in n for n in report.notes)
    # plugin._find_loader's own warning, captured instead of printed.
    assert "FlashPrefill: vLLM is not installed; nothing to register" in report.warnings
    assert report.exit_code == 0 and "vLLM               not installed" in info.render(report)


def test_cli_when_vllm_does_not_import(tmp_path):
    stub = tmp_path / "vllm"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('broken vllm for the test')\n")
    proc = run_cli("info", env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "FLASHPREFILL": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "installed but not importable: broken vllm for the test" in proc.stdout
    assert "loader           none" in proc.stdout


def test_cli_json_and_usage():
    proc = run_cli("info", "--json", "--no-vllm", env={"FLASHPREFILL": "1", "FLASHPREFILL_ALPHA": "0.2"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["settings"]["config"]["alpha"] == {"value": 0.2, "source": "FLASHPREFILL_ALPHA"}
    assert data["exit_code"] == 0
    proc = run_cli("info", "--no-vllm", env={"FLASHPREFILL": "1", "FLASHPREFILL_LOCAL_BLOCKS": "0"})
    assert proc.returncode == 1 and "invalid FLASHPREFILL_LOCAL_BLOCKS='0'" in proc.stdout
    assert run_cli().returncode == 2 and run_cli("nope").returncode == 2
    assert run_cli("--help").returncode == 0


def test_fa4_line_says_whether_the_fa4_route_runs(monkeypatch):
    from flashprefill_vllm.ops import fa4_route
    monkeypatch.setattr(fa4_route, "unavailable_reason", lambda *a: None)
    assert info._fa4_line({}).startswith("yes: FA4 block-sparse forward") and "FLASHPREFILL_KERNEL=auto" in \
        info._fa4_line({})
    monkeypatch.setattr(fa4_route, "unavailable_reason", lambda *a: "compute capability 8.0: x")
    assert info._fa4_line({}) == "no, the Triton kernel runs: compute capability 8.0: x"
    assert info._fa4_line({"FLASHPREFILL_KERNEL": "fa5"}).startswith("unknown: invalid FLASHPREFILL_KERNEL='fa5'")
