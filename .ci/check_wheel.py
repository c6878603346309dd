"""Check a built wheel: its contents against the source tree, then the installed copy as vLLM would load it.

    python .ci/check_wheel.py contents WHEEL SOURCE_ROOT   # any interpreter
    python .ci/check_wheel.py installed WHEEL              # the interpreter the wheel is installed into; run it
                                                           # outside the checkout, so the source tree is not imported

``contents``: every file git tracks under ``flashprefill_vllm/`` (Python and data files alike, e.g. preset JSON)
is in the wheel, nothing outside the package is, the ``vllm.general_plugins`` entry point is declared, and vLLM is
not an unconditional dependency (users bring their own).

``installed``: the package and its entry point come from the installed wheel; every module imports, or fails only
for want of an optional dependency (never a missing package file); the built-in presets load; with vLLM present,
``vllm.plugins.load_general_plugins()`` discovers the entry point, runs ``register()`` from the installed copy and the
backend class paths it registers resolve; ``python -m flashprefill_vllm info`` exits 0.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
import zipfile

GROUP, NAME, TARGET = "vllm.general_plugins", "flashprefill", "flashprefill_vllm.plugin:register"
PACKAGE = "flashprefill_vllm"


def fail(msg: str) -> None:
    print(f"check_wheel: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def wheel_files(wheel: str) -> tuple[set[str], dict[str, str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = {n.rsplit("/", 1)[-1]: zf.read(n).decode() for n in names
                if n.split("/", 1)[0].endswith(".dist-info") and n.count("/") == 1}
    return names, meta


def tracked_package_files(root: str) -> list[str]:
    """Files of the package a clean clone of ``root`` would hold (tracked, or new and not ignored)."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                          PACKAGE], check=True, capture_output=True, text=True).stdout
    return sorted({p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))})


def check_contents(wheel: str, root: str) -> None:
    names, meta = wheel_files(wheel)
    tracked = tracked_package_files(root)
    if not tracked:
        fail(f"git lists no files under {PACKAGE}/ in {root}")
    missing = [p for p in tracked if p not in names]
    if missing:
        fail(f"{len(missing)} package file(s) not in the wheel: {missing[:10]}")
    stray = sorted(n for n in names if not n.startswith(PACKAGE + "/") and ".dist-info/" not in n)
    if stray:
        fail(f"files outside the package in the wheel: {stray[:10]}")
    entry_points = meta.get("entry_points.txt", "")
    section = entry_points.split(f"[{GROUP}]", 1)
    if len(section) != 2 or f"{NAME} = {TARGET}" not in section[1].split("[", 1)[0]:
        fail(f"entry_points.txt does not declare [{GROUP}] {NAME} = {TARGET}:\n{entry_points}")
    requires = [ln.split(":", 1)[1].strip() for ln in meta.get("METADATA", "").splitlines()
                if ln.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    if any(r.split()[0].lower().startswith("vllm") for r in unconditional):
        fail(f"vLLM is an unconditional dependency: {unconditional}")
    data = [p for p in tracked if not p.endswith(".py")]
    print(f"check_wheel: contents ok: {len(tracked)} tracked package files in the wheel ({len(data)} data files"
          f"{': ' + ', '.join(data) if data else ''}), entry point {NAME} = {TARGET}, requires {unconditional}")


def _under(path: str, prefix: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(prefix) + os.sep)


def check_installed(wheel: str) -> None:
    import flashprefill_vllm

    site = os.path.dirname(os.path.dirname(os.path.abspath(flashprefill_vllm.__file__)))
    dist = importlib.metadata.distribution("flashprefill-vllm")
    dist_path = str(dist.locate_file(""))
    if os.path.realpath(site) != os.path.realpath(dist_path):
        fail(f"flashprefill_vllm imported from {flashprefill_vllm.__file__}, not from the installed distribution "
             f"at {dist_path}")
    names, _ = wheel_files(wheel)
    for name in names:  # every file of the wheel is where the installed package reads it
        if name.startswith(PACKAGE + "/") and not os.path.isfile(os.path.join(site, name)):
            fail(f"{name} is in the wheel but not installed under {site}")
    eps = [ep for ep in importlib.metadata.entry_points(group=GROUP) if ep.name == NAME]
    if len(eps) != 1 or eps[0].value != TARGET:
        fail(f"entry points named {NAME} in {GROUP}: {[ep.value for ep in eps]}")
    ep_dist = getattr(eps[0], "dist", None)
    if ep_dist is not None and os.path.realpath(str(ep_dist.locate_file(""))) != os.path.realpath(dist_path):
        fail(f"the {NAME} entry point comes from {ep_dist.locate_file('')}, not the installed wheel at {dist_path}")

    # Every module imports from the installed copy; only a missing optional third-party module is excused.
    skipped = []
    for mod in pkgutil.walk_packages(flashprefill_vllm.__path__, PACKAGE + "."):
        if mod.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(mod.name)
        except ModuleNotFoundError as err:
            if (err.name or "").startswith(PACKAGE):
                fail(f"{mod.name}: {err}")
            skipped.append(f"{mod.name} (needs {err.name})")
            continue
        except ImportError as err:  # e.g. a legacy loader's vLLM names absent from the installed vLLM
            skipped.append(f"{mod.name} ({err})")
            continue
        if not _under(module.__file__, site):
            fail(f"{mod.name} imported from {module.__file__}, outside {site}")

    from flashprefill_vllm import presets
    for name in presets.BUILTIN_PRESETS:
        presets.lookup_preset(name)
    print(f"check_wheel: installed ok: {PACKAGE} from {site}; {len(presets.BUILTIN_PRESETS)} built-in presets; "
          f"modules not importable here: {skipped or 'none'}")

    try:
        import vllm.plugins
    except ImportError as err:
        print(f"check_wheel: vLLM not importable here ({err}); plugin-loader check skipped")
    else:
        check_vllm_loader(site)
    env = dict(os.environ, FLASHPREFILL="1")
    proc = subprocess.run([sys.executable, "-m", PACKAGE, "info"], env=env, capture_output=True, text=True)
    print(proc.stdout)
    if proc.returncode != 0 or "entry point      none" in proc.stdout:
        fail(f"python -m {PACKAGE} info: exit {proc.returncode}\n{proc.stderr[-3000:]}")


def check_vllm_loader(site: str) -> None:
    """vLLM's own loader finds our entry point and runs the installed ``register()``."""
    import vllm.plugins

    os.environ["FLASHPREFILL"] = "1"
    os.environ.pop("VLLM_PLUGINS", None)
    vllm.plugins.load_general_plugins()
    plugin = sys.modules.get(f"{PACKAGE}.plugin")
    if plugin is None or not _under(plugin.__file__, site):
        fail("vllm.plugins.load_general_plugins() did not import flashprefill_vllm.plugin from the installed wheel")
    if not plugin._announced:
        fail("register() ran but did not install a loader (see the log above)")
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    except ImportError:
        print("check_wheel: vLLM loaded the plugin (no 0.13+ registry to inspect)")
        return
    paths = {slot: getattr(E, slot).get_path() for slot in ("FLASH_ATTN", "CUSTOM")}
    for slot, path in paths.items():
        if not path.startswith(PACKAGE + "."):
            fail(f"{slot} resolves to {path}, not FlashPrefill")
        module, cls = path.rsplit(".", 1)
        obj = getattr(importlib.import_module(module), cls)
        if not _under(sys.modules[module].__file__, site):
            fail(f"{path} resolved outside the installed wheel")
        if obj.get_name() != slot:
            fail(f"{path}.get_name() is {obj.get_name()!r}, expected {slot!r}")
    print(f"check_wheel: vllm.plugins.load_general_plugins() ran the installed register(): {paths}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "contents":
        check_contents(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "installed":
        check_installed(sys.argv[2])
    else:
        sys.exit(__doc__)
