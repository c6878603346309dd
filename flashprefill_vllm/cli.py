"""One sub-command dispatcher for ``python -m flashprefill_vllm`` and ``python -m flashprefill_vllm.eval``.

A command is a module with a ``main(argv)``; it is imported only when run (``accuracy`` pulls in vLLM, ``info``
must work without it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None, footer: str = "") -> int:
    """Run ``commands[argv[0]]`` (``name -> (module, one-line doc)``) with the rest of ``argv``; usage on ``-h``,
    2 on no or an unknown command (with the allowed ones named)."""
    argv = sys.argv[1:] if argv is None else argv
    width = max(map(len, commands)) + 2
    usage = "\n".join([f"usage: {prog} <command> [options]", "", "commands:"]
                      + [f"  {name:<{width}}{doc}" for name, (_, doc) in commands.items()]
                      + (["", footer] if footer else []))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"unknown command {name!r}; allowed: {', '.join(commands)}\n\n{usage}", file=sys.stderr)
        return 2
    module_name = commands[name][0]
    if importlib.util.find_spec(module_name) is None:
        print(f"command {name!r} is not available in this installation (no module {module_name})", file=sys.stderr)
        return 2
    return importlib.import_module(module_name).main(rest) or 0
