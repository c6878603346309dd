"""The vllm.general_plugins entry point: cheap when off, never raises except on invalid settings, registers by class
path. Two cases run in a fresh interpreter so that sys.modules shows exactly what register() imported.

Without vLLM installed (CI) the registry cases use a stand-in ``vllm.v1.attention.backends.registry`` that copies
the API of vLLM 0.26.0 (``AttentionBackendEnum`` values are class paths, ``CUSTOM = None``, overrides in a dict,
``register_backend(backend, class_path=None, is_mamba=False)``); the last test runs against the real one.
"""

import ast
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillBackend"
CUSTOM_BACKEND = "flashprefill_vllm.backends.vllm_latest.FlashPrefillCustomBackend"

FAKE_REGISTRY = '''
from enum import Enum

class AttentionBackendEnum(Enum):
    FLASH_ATTN = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    TRITON_ATTN = "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"
    CUSTOM = None

    def get_path(self):
        path = _ATTN_OVERRIDES.get(self, self.value)
        if not path:
            raise ValueError(f"Backend {self.name} must be registered before use.")
        return path

    def is_overridden(self):
        return self in _ATTN_OVERRIDES

_ATTN_OVERRIDES = {}

def register_backend(backend, class_path=None, is_mamba=False):
    assert not is_mamba
    if class_path is None:
        raise AssertionError("register by keyword class_path (a decorator call would register nothing here)")
    _ATTN_OVERRIDES[backend] = class_path
    return lambda x: x
'''


def fake_vllm(root: pathlib.Path) -> pathlib.Path:
    """A stand-in vLLM package on disk, for the subprocess cases."""
    pkg = root / "vllm"
    (pkg / "v1" / "attention" / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0.26.0"\n')
    for sub in ("v1", "v1/attention", "v1/attention/backends"):
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "v1/attention/backends/registry.py").write_text(FAKE_REGISTRY)
    return root


def run_register(env: dict, vllm_root: pathlib.Path | None = None):
    """register() in a fresh interpreter; returns (returncode, stderr, flashprefill/triton modules it imported)."""
    script = textwrap.dedent('''
        import json, logging, sys
        logging.basicConfig(level=logging.DEBUG)
        if "{root}" == "None":
            sys.modules["vllm"] = None  # import vllm -> ImportError, whatever is installed
        from flashprefill_vllm.plugin import register
        register()
        print("MODULES" + json.dumps(sorted(m for m in sys.modules
                                            if m.startswith(("flashprefill_vllm.backends", "triton")))))
    ''').format(root=vllm_root)
    path = [str(REPO)] + ([str(vllm_root)] if vllm_root else [])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPREFILL")}
    full_env.update(env, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=120)
    modules = [json.loads(line[len("MODULES"):]) for line in proc.stdout.splitlines() if line.startswith("MODULES")]
    return proc.returncode, proc.stderr, modules[0] if modules else None


def test_off_imports_no_backend_and_no_triton():
    rc, err, modules = run_register({"FLASHPREFILL": "0"})
    assert rc == 0, err
    assert modules == []


def test_on_registers_without_importing_backends_or_triton(tmp_path):
    rc, err, modules = run_register({"FLASHPREFILL": "1"}, vllm_root=fake_vllm(tmp_path))
    assert rc == 0, err
    assert "FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN)" in err
    assert modules == []  # class paths only: vLLM imports the backend when it selects it


@pytest.fixture
def plugin(monkeypatch):
    """The plugin module with its once-per-process state and logger restored after the test."""
    from flashprefill_vllm import loaders, plugin

    monkeypatch.setattr(plugin, "_announced", False)
    monkeypatch.setattr(plugin, "_env_checked", False)
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(plugin.logger, attr, getattr(plugin.logger, attr))
    for name in [n for n in os.environ if n.startswith("FLASHPREFILL")]:
        monkeypatch.delenv(name)
    # The loader binds the registry at import: import it afresh against this test's registry, and afterwards put
    # back whatever was there (a loader bound to a stand-in registry must not leak into later tests).
    name = "flashprefill_vllm.loaders.vllm_latest"
    saved_module, saved_attr = sys.modules.pop(name, None), loaders.__dict__.pop("vllm_latest", None)
    yield plugin
    sys.modules.pop(name, None)
    loaders.__dict__.pop("vllm_latest", None)
    if saved_module is not None:
        sys.modules[name] = saved_module
    if saved_attr is not None:
        loaders.vllm_latest = saved_attr


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)


@pytest.fixture
def registry(monkeypatch):
    """The stand-in registry, installed in sys.modules (with parent packages) for this test."""
    modules = {}
    for name in ("vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.backends",
                 "vllm.v1.attention.backends.registry"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["vllm"].__version__ = "0.26.0"
    exec(FAKE_REGISTRY, modules["vllm.v1.attention.backends.registry"].__dict__)
    return modules["vllm.v1.attention.backends.registry"]


def overrides(registry):
    return {member.name: path for member, path in registry._ATTN_OVERRIDES.items()}


@pytest.mark.parametrize("toggle", [None, "0", "false"])
def test_off_without_vllm_is_silent(plugin, no_vllm, monkeypatch, caplog, toggle):
    if toggle is not None:
        monkeypatch.setenv("FLASHPREFILL", toggle)
    with caplog.at_level(logging.DEBUG, logger="flashprefill_vllm"):
        plugin.register()
    assert all(r.levelno < logging.WARNING for r in caplog.records)


def test_on_without_vllm_logs_and_stays_stock(plugin, no_vllm, monkeypatch, caplog):
    monkeypatch.setenv("FLASHPREFILL", "1")
    plugin.register()
    assert "FlashPrefill: vLLM is not installed; nothing to register" in caplog.text


def test_invalid_knob_stops_start_up_with_a_clear_message(plugin, registry, monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "5")
    with pytest.raises(ValueError, match=re.escape("invalid FLASHPREFILL_ALPHA='5': must be a number in (0, 1]")):
        plugin.register()
    assert overrides(registry) == {}


def test_invalid_kernel_choice_stops_start_up(plugin, registry, monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_KERNEL", "fa3")
    with pytest.raises(ValueError, match="invalid FLASHPREFILL_KERNEL='fa3': must be auto, fa4 or triton"):
        plugin.register()
    assert overrides(registry) == {}


def test_invalid_toggle_stops_start_up(plugin, no_vllm, monkeypatch):
    monkeypatch.setenv("FLASHPREFILL", "yes")
    with pytest.raises(ValueError, match="invalid FLASHPREFILL='yes': must be 1, 0, true or false"):
        plugin.register()


def test_invalid_knob_is_ignored_while_off(plugin, registry, monkeypatch):
    monkeypatch.setenv("FLASHPREFILL_ALPHA", "5")
    plugin.register()
    assert overrides(registry) == {"CUSTOM": CUSTOM_BACKEND}


def test_on_overrides_flash_attn_and_registers_custom_idempotently(plugin, registry, monkeypatch, caplog):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_MIN_LEN", "1024")
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        for _ in range(3):
            plugin.register()
    assert overrides(registry) == {"CUSTOM": CUSTOM_BACKEND, "FLASH_ATTN": BACKEND}
    assert caplog.text.count("FlashPrefill: on (backend slots CUSTOM/FLASH_ATTN): prefills of sequences >= 1024") == 1


def test_off_registers_only_custom(plugin, registry, caplog):
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        plugin.register()
    assert overrides(registry) == {"CUSTOM": CUSTOM_BACKEND}
    assert caplog.text == ""


def test_custom_of_another_plugin_is_kept_but_flash_attn_is_taken_over_with_a_warning(plugin, registry,
                                                                                      monkeypatch, caplog):
    registry.register_backend(registry.AttentionBackendEnum.CUSTOM, class_path="other.Backend")
    registry.register_backend(registry.AttentionBackendEnum.FLASH_ATTN, class_path="other.FlashBackend")
    monkeypatch.setenv("FLASHPREFILL", "1")
    with caplog.at_level(logging.INFO, logger="flashprefill_vllm"):
        plugin.register()
    assert overrides(registry) == {"CUSTOM": "other.Backend", "FLASH_ATTN": BACKEND}
    assert "CUSTOM is already registered to other.Backend; leaving it" in caplog.text
    assert "replacing the FLASH_ATTN backend registered to other.FlashBackend" in caplog.text
    assert "backend slots FLASH_ATTN)" in caplog.text


def test_vllm_without_registry_stays_stock_and_says_so_at_error_level(plugin, registry, monkeypatch, caplog):
    from flashprefill_vllm.backends import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.registry", None)
    monkeypatch.setenv("FLASHPREFILL", "1")
    plugin.register()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert ("FLASHPREFILL=1 but registration failed: unsupported vLLM 0.26.0 (none of "
            "vllm.v1.attention.backends.registry, vllm.attention.backends.registry, vllm.platforms._Backend). vLLM "
            "SERVES ITS STOCK ATTENTION") in errors[0].getMessage()
    assert fallback_counts() == {"failed registrations (FLASHPREFILL=1)": 1}


def test_registration_failure_is_logged_at_error_level_not_raised(plugin, registry, monkeypatch, caplog):
    def broken(member, class_path=None, is_mamba=False):
        raise RuntimeError("registry changed shape")

    monkeypatch.setattr(registry, "register_backend", broken)
    monkeypatch.setenv("FLASHPREFILL", "1")
    plugin.register()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "FLASHPREFILL=1 but registration failed: RuntimeError: registry changed shape" in \
        errors[0].getMessage() and "STOCK ATTENTION" in errors[0].getMessage()
    assert errors[0].exc_info is not None and overrides(registry) == {}


def test_registration_failure_with_the_switch_off_is_quiet(plugin, registry, monkeypatch, caplog):
    def broken(member, class_path=None, is_mamba=False):
        raise RuntimeError("registry changed shape")

    monkeypatch.setattr(registry, "register_backend", broken)
    with caplog.at_level(logging.DEBUG, logger="flashprefill_vllm"):
        plugin.register()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "registry changed shape; staying stock" in caplog.text


def test_registered_class_paths_exist():
    """The loader's strings name classes of backends/vllm_latest.py (read without importing vLLM)."""
    tree = ast.parse((REPO / "flashprefill_vllm/backends/vllm_latest.py").read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for path in (BACKEND, CUSTOM_BACKEND):
        module, name = path.rsplit(".", 1)
        assert module == "flashprefill_vllm.backends.vllm_latest" and name in classes


def test_entry_point_is_declared():
    assert '"vllm.general_plugins": ["flashprefill = flashprefill_vllm.plugin:register"]' in \
        (REPO / "setup.py").read_text()


def test_real_vllm_registry(plugin, monkeypatch):
    pytest.importorskip("vllm")
    registry = pytest.importorskip("vllm.v1.attention.backends.registry")

    E = registry.AttentionBackendEnum
    saved = dict(registry._ATTN_OVERRIDES)
    monkeypatch.setenv("FLASHPREFILL", "1")
    try:
        registry._ATTN_OVERRIDES.clear()
        plugin.register()
        plugin.register()
        assert E.FLASH_ATTN.get_path() == BACKEND and E.CUSTOM.get_path() == CUSTOM_BACKEND
    finally:
        registry._ATTN_OVERRIDES.clear()
        registry._ATTN_OVERRIDES.update(saved)


def test_misspelled_variable_is_warned_once_with_the_closest_name(plugin, registry, monkeypatch, caplog):
    monkeypatch.setenv("FLASHPREFILL", "1")
    monkeypatch.setenv("FLASHPREFILL_APLHA", "0.2")
    plugin.register()
    plugin.register()
    warned = [r.getMessage() for r in caplog.records if "FLASHPREFILL_APLHA" in r.getMessage()]
    assert len(warned) == 1 and "did you mean FLASHPREFILL_ALPHA?" in warned[0]
    assert overrides(registry)["FLASH_ATTN"] == BACKEND          # still registered: a warning, not an error
