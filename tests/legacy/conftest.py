"""Fixtures of the legacy tests: the real vLLM 0.10.0 / 0.12.0 sources and a few files of the newest release
(fetched once per cache), and an import
context per test that runs those files on the CPU (``legacy_vllm.py``, ``legacy_envs.py``).

A failed download fails these tests, with pip's message: they never turn green by skipping. Only with
``FLASHPREFILL_OFFLINE=1`` do they skip when the sources are not cached yet. The cache folder is
``FLASHPREFILL_VLLM_SRC_CACHE`` (default ``~/.cache/flashprefill_vllm/vllm-src``).
"""

from __future__ import annotations

import os
import pathlib
import time
import types

import legacy_envs
import legacy_vllm
import pytest
import torch_flash

from flashprefill_vllm.backends import eligibility


@pytest.fixture(scope="session")
def vllm_sources(request) -> dict:
    """``{version: folder holding that release's vllm/*.py}`` for every version of ``legacy_vllm.VERSIONS``."""
    cache = legacy_vllm.cache_dir()
    offline = os.environ.get("FLASHPREFILL_OFFLINE") == "1"
    roots = {}
    for version in legacy_vllm.VERSIONS:
        root = legacy_vllm.cached(version, cache)
        if root is None and offline:
            pytest.skip(f"FLASHPREFILL_OFFLINE=1 and the vLLM {version} sources are not cached in {cache}")
        if root is None:
            start, error = time.monotonic(), None
            try:
                root = legacy_vllm.fetch(version, cache)
            except legacy_vllm.FetchError as e:
                error = e
            if error is not None:  # failed outside the except block, so pytest shows the message once
                pytest.fail(f"could not fetch the vLLM {version} sources the legacy tests check against (set "
                            f"FLASHPREFILL_OFFLINE=1 to skip these tests offline): {error}", pytrace=False)
            request.config.stash.setdefault(_FETCHED, []).append(f"{version}: {time.monotonic() - start:.1f} s")
        roots[version] = root
    return roots


@pytest.fixture(scope="session")
def newest_sources(request) -> pathlib.Path:
    """The folder holding ``legacy_vllm.NEWEST_FILES`` of the newest vLLM release (read out of its wheel with range
    requests: about 1 MB). Same rules as :func:`vllm_sources`: a failed download fails, ``FLASHPREFILL_OFFLINE=1``
    skips when nothing is cached."""
    cache = legacy_vllm.cache_dir()
    root = cache / f"vllm-{legacy_vllm.NEWEST}-files"
    was_cached = (root / legacy_vllm.DONE).is_file() and all((root / f).is_file() for f in legacy_vllm.NEWEST_FILES)
    if os.environ.get("FLASHPREFILL_OFFLINE") == "1":
        if not was_cached:
            pytest.skip(f"FLASHPREFILL_OFFLINE=1 and the vLLM {legacy_vllm.NEWEST} files are not cached in {cache}")
        return root
    start, error = time.monotonic(), None
    try:
        fetched = legacy_vllm.fetch_files(legacy_vllm.NEWEST, legacy_vllm.NEWEST_FILES, legacy_vllm.NEWEST_TARGET,
                                          cache)
    except legacy_vllm.FetchError as e:
        error = e
    if error is not None:
        pytest.fail(f"could not fetch the vLLM {legacy_vllm.NEWEST} files the source checks read (set "
                    f"FLASHPREFILL_OFFLINE=1 to skip these tests offline): {error}", pytrace=False)
    if not was_cached:
        request.config.stash.setdefault(_FETCHED, []).append(f"{legacy_vllm.NEWEST} (files): "
                                                             f"{time.monotonic() - start:.1f} s")
    return fetched


_FETCHED = pytest.StashKey[list]()
_TEST_VARS = ("FLASHPREFILL_OFFLINE", "FLASHPREFILL_VLLM_SRC_CACHE")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    fetched = config.stash.get(_FETCHED, None)
    if fetched:
        terminalreporter.write_line(f"legacy vLLM sources fetched into {legacy_vllm.cache_dir()}: "
                                    + ", ".join(fetched))


@pytest.fixture
def flashprefill_env(monkeypatch):
    """Clean ``FLASHPREFILL*`` variables and settings cache, restored afterwards; tests set what they need."""
    for name in [n for n in os.environ if n.startswith("FLASHPREFILL") and n not in _TEST_VARS]:
        monkeypatch.delenv(name)
    eligibility.settings.cache_clear()
    yield monkeypatch
    eligibility.settings.cache_clear()


def open_sources(vllm_sources: dict, version: str, capability=(9, 0)):
    """Enter the import context of ``version``'s real files with an SM ``capability`` CUDA platform."""
    src = legacy_vllm.VllmSources(version, vllm_sources[version], legacy_envs.STUBS[version],
                                  real_inits=legacy_envs.REAL_INITS)
    src.__enter__()
    try:
        legacy_envs.set_platform(capability)
    except BaseException:
        src.__exit__(None, None, None)
        raise
    return src


@pytest.fixture
def vllm_version(request, vllm_sources, flashprefill_env):
    """Runs the test inside one release's sources: parametrize ``vllm_version`` with a version string."""
    src = open_sources(vllm_sources, request.param)
    torch_flash.CALLS.clear()
    try:
        yield types.SimpleNamespace(version=request.param, sources=src, env=flashprefill_env)
    finally:
        src.__exit__(None, None, None)
