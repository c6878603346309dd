"""vLLM attention backends built on the FlashPrefill op.

``split`` and ``common`` import no vLLM; each ``vllm_*`` module subclasses one vLLM generation's FlashAttention
classes and is imported only by vLLM itself, through the class path a loader registered.
"""
