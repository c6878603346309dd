"""Pick the default (alpha, tau) from operator-quality sweeps of several models: the rule, written down.

``python benchmarks/choose_defaults.py opquality_A.json opquality_B.json [--rule per_head/op] [--out choice.json]``

Each file is a ``python -m flashprefill_vllm.eval opquality ... --taus ...`` report. A sweep point (alpha, tau)
*qualifies* when, for every model and every length, its recall averaged over layers is >= the report's recall goal
(0.97) and its worst layer's recall is >= the worst-layer goal (0.95). Among qualifying points the default is the
one with the lowest density averaged over models and lengths (the fastest lossless setting); ties go to the larger
alpha. If no point qualifies, the point whose smallest margin to the two goals (over models and lengths) is largest
is printed instead, marked as failing. The last line printed is ``ALPHA TAU`` (for a shell ``read``).

``--dense-layers N`` scores the points as served with ``FLASHPREFILL_DENSE_LAYERS=N``: the first N layers attend
densely (recall 1, density 1, rel-L2 0), recomputed from the per-layer records of the reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WORST_LAYER_GOAL = 0.95


def _with_dense_layers(res: dict, rule: str, dense_layers: int) -> list[dict]:
    """The summary sweep of ``rule`` recomputed from per-layer records, the first ``dense_layers`` layers dense."""
    mode, name = rule.split("/")
    layers = sorted(res["layers"], key=int)
    per_layer = [res["layers"][i]["sweep"][mode][name] for i in layers]
    sweep = []
    for n, point in enumerate(per_layer[0]):
        rows = [dict(recs[n], **({"recall_mean": 1.0, "density": 1.0, "rel_l2": 0.0} if int(i) < dense_layers
                                 else {})) for i, recs in zip(layers, per_layer)]
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        sweep.append({"alpha": point["alpha"], "tau": point.get("tau", 0.0), "density": mean("density"),
                      "recall_mean": mean("recall_mean"), "rel_l2": mean("rel_l2"),
                      "recall_worst_layer": min(r["recall_mean"] for r in rows)})
    return sweep


def load(paths: list[str], rule: str, dense_layers: int = 0) -> dict[str, dict[int, dict[tuple[float, float], dict]]]:
    """``{model: {length: {(alpha, tau): summary point}}}`` for ``rule`` (``mode/rule`` as in the summaries)."""
    models = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        by_length = {}
        for length, res in report["lengths"].items():
            sweep = (_with_dense_layers(res, rule, dense_layers) if dense_layers
                     else res["summary"]["rules"][rule]["sweep"])
            by_length[int(length)] = {(p["alpha"], p.get("tau", 0.0)): p for p in sweep}
        models[report.get("model_name", path)] = {"goal": report.get("recall_goal", 0.97), "lengths": by_length}
    return models


def choose(models: dict) -> dict:
    """The choice and, for every point, its margins and mean density (see the module docstring)."""
    points = set.intersection(*(set(pts) for m in models.values() for pts in m["lengths"].values()))
    table = []
    for pt in sorted(points):
        cells = [(name, length, m["lengths"][length][pt], m["goal"]) for name, m in models.items()
                 for length in sorted(m["lengths"])]
        margin = min(min(c["recall_mean"] - goal, c["recall_worst_layer"] - WORST_LAYER_GOAL)
                     for _, _, c, goal in cells)
        density = sum(c["density"] for _, _, c, _ in cells) / len(cells)
        table.append({"alpha": pt[0], "tau": pt[1], "qualifies": margin >= 0, "margin": margin,
                      "mean_density": density,
                      "cells": [{"model": n, "length": L, "density": c["density"], "recall_mean": c["recall_mean"],
                                 "recall_worst_layer": c["recall_worst_layer"], "rel_l2": c["rel_l2"]}
                                for n, L, c, _ in cells]})
    ok = [t for t in table if t["qualifies"]]
    best = (min(ok, key=lambda t: (t["mean_density"], -t["alpha"])) if ok
            else max(table, key=lambda t: t["margin"]))
    return {"choice": {"alpha": best["alpha"], "tau": best["tau"], "qualifies": best["qualifies"],
                       "margin": best["margin"], "mean_density": best["mean_density"]}, "points": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="opquality JSON reports (one per model)")
    p.add_argument("--rule", default="per_head/op", help="mode/rule of the summaries (default per_head/op)")
    p.add_argument("--dense-layers", type=int, default=0, help="first layers served densely (default 0)")
    p.add_argument("--out", default=None, help="also write the table and the choice as JSON")
    args = p.parse_args(argv)
    result = choose(load(args.reports, args.rule, args.dense_layers))
    for t in sorted(result["points"], key=lambda t: t["mean_density"]):
        cells = " ".join(f"{c['length'] // 1024}K:{c['recall_mean']:.3f}/{c['recall_worst_layer']:.3f}"
                         for c in t["cells"])
        print(f"alpha {t['alpha']:<6g} tau {t['tau']:<6g} density {t['mean_density']:.3f} margin {t['margin']:+.3f} "
              f"{'OK  ' if t['qualifies'] else 'fail'} {cells}")
    c = result["choice"]
    print(f"choice: alpha {c['alpha']:g}, tau {c['tau']:g}, mean density {c['mean_density']:.3f}, "
          f"{'meets the recall goals on every model and length' if c['qualifies'] else 'FAILS the goals'} "
          f"(margin {c['margin']:+.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{c['alpha']:g} {c['tau']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
