"""One ``install(enabled)`` per vLLM API generation; each names backends by class-path string and imports none.

``plugin.register()`` picks the loader by probing imports, newest first: ``vllm_latest`` (the
``vllm.v1.attention.backends.registry`` of vLLM 0.13 and later), ``vllm_0_12`` (``vllm.attention.backends.registry``)
and ``vllm_0_10`` (no registry: it wraps the CUDA platform's backend choice). ``common`` holds the registration both
registry loaders share.
"""
