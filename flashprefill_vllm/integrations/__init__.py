"""Integrations of the op outside vLLM. ``integrations.transformers``: an ``attn_implementation`` for Hugging Face
transformers. Nothing is imported here, so importing the package costs nothing without transformers."""
