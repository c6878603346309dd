import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(*parts: str) -> str:
    with open(os.path.join(HERE, *parts), encoding="utf-8") as f:
        return f.read()


# One version, in the package (flashprefill_vllm.__version__), read without importing it (torch may be absent).
VERSION = re.search(r'^__version__ = "([^"]+)"', _read("flashprefill_vllm", "__init__.py"), re.M).group(1)

setup(
    name="flashprefill-vllm",
    version=VERSION,
    description="FlashPrefill sparse-prefill attention for long prompts, as a vLLM plugin",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["flashprefill_vllm", "flashprefill_vllm.*"]),
    # Data files the package reads at run time (e.g. preset JSON files) ship inside the wheel; CI checks that every
    # non-Python file under flashprefill_vllm/ is in it.
    package_data={"flashprefill_vllm": ["**/*.json", "**/*.txt"]},
    python_requires=">=3.10",
    # vLLM is not a hard requirement: users bring their own (it pins its own CUDA torch). On a machine with a CUDA
    # vLLM, install with --no-deps so pip leaves that torch alone. tqdm: progress of the evaluation tools.
    install_requires=["torch>=2.4", "triton>=3.2", "tqdm"],
    extras_require={
        # Loaders exist for 0.10, 0.12 and 0.13+ (registry API); see the README's version table for what was run.
        "vllm": ["vllm>=0.10"],
        # numpy<2.4: Triton 3.6's interpreter (CPU tests) converts 1-element arrays with int(), an error in 2.4.
        # build + setuptools: tests/test_packaging.py builds the wheel without network (--no-isolation).
        "test": ["pytest>=8", "numpy<2.4", "build>=1", "setuptools>=70.1"],
        "bench": ["matplotlib"],
    },
    entry_points={"vllm.general_plugins": ["flashprefill = flashprefill_vllm.plugin:register"]},
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
