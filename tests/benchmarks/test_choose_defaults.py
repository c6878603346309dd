"""The default-choosing rule over operator-quality reports (benchmarks/choose_defaults.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import choose_defaults  # noqa: E402


def _report(tmp_path, name, points):
    """points: {(alpha, tau): (density, recall_mean, worst)} at one length."""
    sweep = [{"alpha": a, "tau": t, "density": d, "recall_mean": r, "recall_worst_layer": w, "rel_l2": 0.01}
             for (a, t), (d, r, w) in points.items()]
    report = {"model_name": name, "recall_goal": 0.97,
              "lengths": {"8192": {"summary": {"rules": {"per_head/op": {"sweep": sweep}}}}}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_lowest_mean_density_among_points_meeting_goals_on_every_model(tmp_path, capsys):
    a = _report(tmp_path, "a", {(0.1, 0.0): (0.2, 0.90, 0.80), (0.1, 0.9): (0.4, 0.98, 0.96),
                                (0.3, 0.95): (0.35, 0.975, 0.955), (0.01, 0.0): (0.6, 0.99, 0.97)})
    b = _report(tmp_path, "b", {(0.1, 0.0): (0.2, 0.96, 0.90), (0.1, 0.9): (0.3, 0.97, 0.95),
                                (0.3, 0.95): (0.3, 0.96, 0.96), (0.01, 0.0): (0.5, 0.99, 0.98)})
    assert choose_defaults.main([a, b]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # (0.3, 0.95) is sparser but misses b's mean recall; (0.1, 0.9) meets both at mean density 0.35 < 0.55.
    assert out[-1] == "0.1 0.9" and "meets the recall goals" in out[-2]


def test_no_point_qualifies_reports_the_closest(tmp_path, capsys):
    a = _report(tmp_path, "a", {(0.1, 0.0): (0.2, 0.90, 0.80), (0.01, 0.0): (0.6, 0.965, 0.94)})
    choose_defaults.main([a])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "0.01 0" and "FAILS the goals" in out[-2]
