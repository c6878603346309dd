"""``python -m flashprefill_vllm <command>``: ``info`` (what this install would do inside vLLM).

The evaluation tools have their own entry: ``python -m flashprefill_vllm.eval <command>``.
"""

from __future__ import annotations

import sys

COMMANDS = {"info": "the installed vLLM, loader, plugin discovery, GPU and kernel path, and the active settings"}


def _usage() -> str:
    lines = ["usage: python -m flashprefill_vllm <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {doc}" for name, doc in COMMANDS.items()]
    lines += ["", "evaluation tools (accuracy, opquality, calibrate): python -m flashprefill_vllm.eval <command>"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] != "info":
        print(f"unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    from .info import main as info_main
    return info_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
