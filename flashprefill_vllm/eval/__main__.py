"""``python -m flashprefill_vllm.eval <command> [options]``: run one of the evaluation tools.

Each command is the module ``flashprefill_vllm.eval.<command>`` with a ``main(argv)``; ``<command> --help`` lists
its options.
"""

from __future__ import annotations

import sys

from ..cli import dispatch

COMMANDS = {
    "accuracy": ("flashprefill_vllm.eval.accuracy",
                 "the same prompts in vLLM with sparse prefill off and on: needles, perplexity, greedy agreement"),
    "opquality": ("flashprefill_vllm.eval.opquality", "quality of the sparse op itself (see its --help)"),
    "calibrate": ("flashprefill_vllm.eval.calibrate", "calibration of the selection threshold (see its --help)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m flashprefill_vllm.eval", COMMANDS, argv)


# The guard matters: vLLM starts its engine core with spawn, which imports this module again.
if __name__ == "__main__":
    sys.exit(main())
