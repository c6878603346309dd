"""Packaging: the sdist and wheel that ``python -m build`` makes from this tree, installed outside the checkout.

The wheel is built from the sdist (``build``'s default), so a file missing from either fails here. The checks live
in ``.ci/check_wheel.py`` (CI runs them too, on a wheel built with build isolation and installed into a fresh
environment): every package file, data files included, is in the wheel; the ``vllm.general_plugins`` entry point is
declared; installed in a separate folder, the package and entry point come from there, every module imports,
vLLM's ``load_general_plugins()`` runs the installed ``register()``, and ``python -m flashprefill_vllm info`` works.
Built with ``--no-isolation`` (build and setuptools from the ``test`` extras), so no network is needed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_wheel.py"


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLASHPREFILL") and k not in ("VLLM_PLUGINS", "PYTHONPATH")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    """sdist and wheel of a copy of the tree a clean clone would hold (tracked and new, not ignored, files)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _wheel(dist: pathlib.Path) -> pathlib.Path:
    (wheel,) = dist.glob("flashprefill_vllm-*-py3-none-any.whl")
    return wheel


def test_wheel_holds_every_package_file_and_the_entry_point(dist):
    wheel = _wheel(dist)
    proc = subprocess.run([sys.executable, str(CHECK), "contents", str(wheel), str(REPO)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta).decode()
    import flashprefill_vllm
    assert f"Version: {flashprefill_vllm.__version__}" in metadata  # one version, read from the package
    assert "flashprefill_vllm/info.py" in names and "flashprefill_vllm/__main__.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    (sdist,) = dist.glob("flashprefill_vllm-*.tar.gz")
    assert sdist.stat().st_size > 0


def test_contents_check_catches_a_missing_data_file(dist, tmp_path):
    """The check is not vacuous: a wheel without one package file fails it."""
    wheel = _wheel(dist)
    broken = tmp_path / wheel.name
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(broken, "w") as zout:
        for item in zin.infolist():
            if item.filename != "flashprefill_vllm/presets.py":
                zout.writestr(item, zin.read(item.filename))
    proc = subprocess.run([sys.executable, str(CHECK), "contents", str(broken), str(REPO)], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "flashprefill_vllm/presets.py" in proc.stderr


def test_installed_wheel_is_what_vllm_loads(dist, tmp_path):
    wheel = _wheel(dist)
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    # Run outside the checkout, with the installed copy first on the path (this environment's editable install of
    # the checkout stays behind it, and the check fails if anything is imported from there).
    proc = subprocess.run([sys.executable, str(CHECK), "installed", str(wheel)], cwd=tmp_path, capture_output=True,
                          text=True, env=_clean_env(PYTHONPATH=str(target)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"flashprefill_vllm from {target}" in proc.stdout
    assert "flashprefill_vllm.plugin:register" in proc.stdout  # the info report, from the installed copy
