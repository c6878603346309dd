from setuptools import find_packages, setup

setup(
    name="flashprefill-vllm",
    version="0.1.0",
    description="FlashPrefill sparse-prefill attention for long prompts, as a vLLM plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["flashprefill_vllm", "flashprefill_vllm.*"]),
    python_requires=">=3.10",
    # vLLM is not a hard requirement: users bring their own (it pins its own CUDA torch).
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        "vllm": ["vllm>=0.13"],
        # numpy<2.4: Triton 3.6's interpreter (CPU tests) converts 1-element arrays with int(), an error in 2.4.
        "test": ["pytest>=8", "numpy<2.4"],
        "bench": ["matplotlib"],
    },
    entry_points={"vllm.general_plugins": ["flashprefill = flashprefill_vllm.plugin:register"]},
    license="Apache-2.0",
)
