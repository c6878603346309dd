"""One ``install()`` per vLLM API generation; each registers backends by class-path string and imports no backend.

``plugin.register()`` picks the loader by probing imports (``vllm_latest``: the ``vllm.v1.attention.backends.registry``
API of vLLM 0.13 and later).
"""
