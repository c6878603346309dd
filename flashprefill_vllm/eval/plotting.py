"""Optional plots for the tools and benchmarks: matplotlib is not a dependency, and every tool writes its JSON first."""

from __future__ import annotations


def pyplot(quiet: bool = False):
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` when matplotlib cannot be imported
    (with a one-line note unless ``quiet``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        if not quiet:
            print(f"note: no plot (matplotlib not importable: {e})")
        return None
    return plt
