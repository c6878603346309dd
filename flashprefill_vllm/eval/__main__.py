"""``python -m flashprefill_vllm.eval <command> [options]``: run one of the evaluation tools.

Each command is the module ``flashprefill_vllm.eval.<command>`` with a ``main(argv)``; ``<command> --help`` lists
its options.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

COMMANDS = {
    "accuracy": "the same prompts in vLLM with sparse prefill off and on: needles, perplexity, greedy agreement",
    "opquality": "quality of the sparse op itself (see its --help)",
    "calibrate": "calibration of the selection threshold (see its --help)",
}


def _usage() -> str:
    lines = ["usage: python -m flashprefill_vllm.eval <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, doc in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}; allowed: {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = f"{__package__ or 'flashprefill_vllm.eval'}.{name}"
    if importlib.util.find_spec(module_name) is None:
        print(f"command {name!r} is not available in this installation (no module {module_name})", file=sys.stderr)
        return 2
    return importlib.import_module(module_name).main(rest) or 0


# The guard matters: vLLM starts its engine core with spawn, which imports this module again.
if __name__ == "__main__":
    sys.exit(main())
