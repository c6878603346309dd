"""Accuracy tools for sparse prefill: ``python -m flashprefill_vllm.eval <command> ...`` (see ``__main__.py``)."""
