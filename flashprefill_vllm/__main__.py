"""``python -m flashprefill_vllm <command>``: ``info`` (what this install would do inside vLLM).

The evaluation tools have their own entry: ``python -m flashprefill_vllm.eval <command>``.
"""

from __future__ import annotations

import sys

from .cli import dispatch

COMMANDS = {"info": ("flashprefill_vllm.info",
                     "the installed vLLM, loader, plugin discovery, GPU and kernel path, and the active settings")}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m flashprefill_vllm", COMMANDS, argv,
                    footer="evaluation tools (accuracy, opquality, calibrate): "
                           "python -m flashprefill_vllm.eval <command>")


if __name__ == "__main__":
    sys.exit(main())
