"""FlashPrefill for vLLM 0.10.0, the original project's way: ``import patch_loader_vllm_0_10_0`` before ``LLM(...)``.

Sets ``FLASHPREFILL=1`` (so engine processes vLLM spawns re-apply it through the installed plugin) and applies the
package's 0.10 loader in this process. Knobs: the ``FLASHPREFILL_*`` variables (see the README).
"""
import os

os.environ["FLASHPREFILL"] = "1"
from flashprefill_vllm.loaders import vllm_0_10  # noqa: E402

vllm_0_10.install(enabled=True)
