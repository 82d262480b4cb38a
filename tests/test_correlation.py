"""Loss <-> accuracy Spearman correlation: against scipy, hand examples and hand-made runs."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy.stats import spearmanr

from hjepa.config import dump_yaml, load_config
from hjepa.experiments.correlation import (
    across_runs,
    average_ranks,
    correlation_markdown,
    correlation_report,
    probe_windows,
    spearman,
    within_run,
)
from tests.conftest import TINY


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30, 20]) == [1, 3, 3, 5, 3]
    assert average_ranks([3, 1, 2]) == [3, 1, 2]
    assert average_ranks([7, 7]) == [1.5, 1.5]


def test_spearman_hand_example_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; deviations from 2.5:
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, .5, -.5, 1.5] -> cov 4.5, var 4.5 and 5 -> 3/sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotone, not linear


@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_scipy_with_many_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 40)
    x = [rng.randint(0, 5) for _ in range(n)]  # few distinct values: many ties
    y = [xi + rng.choice([-2, -1, 0, 1, 2]) for xi in x]
    expected = spearmanr(x, y).statistic
    got = spearman(x, y)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_spearman_undefined_cases():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(spearman([], []))
    with pytest.raises(ValueError, match="3 values"):
        spearman([1, 2, 3], [1, 2])


def train_record(step, level_losses, sigreg=None):
    rec = {"step": step, "kind": "train", "loss": 99.0}  # 'loss' must not be used when levels exist
    rec.update({f"loss_level{i}": v for i, v in enumerate(level_losses)})
    if sigreg is not None:
        rec["sigreg"] = sigreg
    return rec


def test_probe_windows_average_the_train_records_since_the_previous_probe():
    weights = [1.0, 0.5]
    records = [
        train_record(1, [4.0, 2.0], 10.0),  # prediction 5
        train_record(2, [2.0, 2.0], 20.0),  # 3
        {"step": 2, "kind": "probe", "knn_concat": 0.3, "knn_level0": 0.1},
        train_record(3, [1.0, 0.0], 5.0),  # 1
        train_record(4, [1.0, 2.0], 7.0),  # 2
        {"step": 4, "kind": "probe", "knn_concat": 0.5},
        {"step": 5, "kind": "probe", "knn_concat": 0.6},  # no train record since step 4
        train_record(6, [0.5, 0.0]),  # 0.5, no sigreg logged
        {"step": 6, "kind": "probe", "knn_level0": 0.7},  # one level: level 0 is used
    ]
    points = probe_windows(records, weights)
    assert [p["step"] for p in points] == [2, 4, 6]
    assert [p["prediction"] for p in points] == pytest.approx([4.0, 1.5, 0.5])
    assert [p["knn"] for p in points] == [0.3, 0.5, 0.7]
    assert [p.get("sigreg") for p in points] == [15.0, 6.0, None]


def make_run(root, name, losses, knns, final_linear, sigregs=None):
    """A run dir with two levels (weights 1, 0.7): one train record and one probe per step."""
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config(None, [*TINY, "model.levels=2", f"run.dir={run}"])
    (run / "config.yaml").write_text(dump_yaml(cfg))
    lines = []
    for step, (loss, knn) in enumerate(zip(losses, knns), start=1):
        sig = None if sigregs is None else sigregs[step - 1]
        lines.append(train_record(step, [loss, 0.0], sig))
        lines.append({"step": step, "kind": "probe", "knn_concat": knn})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    trained = {"concat": {"knn": knns[-1], "linear": final_linear}}
    (run / "eval.json").write_text(json.dumps({"trained": trained}))
    return run


def test_within_and_across_runs_on_hand_made_runs(tmp_path):
    a = make_run(tmp_path, "a", [3, 2, 1, 0.5], [0.1, 0.2, 0.3, 0.4], 0.9, sigregs=[1, 1, 2, 3])
    b = make_run(tmp_path, "b", [2, 2, 1.8], [0.5, 0.1, 0.2], 0.2)
    c = make_run(tmp_path, "c", [5, 0.1], [0.3, 0.3], 0.5)
    w = within_run(a)
    assert w["points"] == 4 and w["prediction"] == pytest.approx(-1.0)
    assert w["sigreg"] == pytest.approx(spearman([1, 1, 2, 3], [0.1, 0.2, 0.3, 0.4]))
    assert within_run(b)["prediction"] == pytest.approx(spearman([2, 2, 1.8], [0.5, 0.1, 0.2]))
    assert within_run(c)["prediction"] is None  # constant kNN: undefined, not 0
    assert "sigreg" not in within_run(b)

    across = across_runs([a, b, c])
    assert across["runs"] == 3
    # final losses 0.5, 1.8, 0.1 vs final kNN 0.4, 0.2, 0.3 and linear 0.9, 0.2, 0.5
    assert across["prediction_vs_knn"] == pytest.approx(spearman([0.5, 1.8, 0.1], [0.4, 0.2, 0.3]))
    assert across["prediction_vs_linear"] == pytest.approx(-0.5)
    assert across["sigreg_n"] == 1 and across["sigreg_vs_knn"] is None

    # From the online probes: the same final kNN (make_run logs it last), and no linear probe.
    online = across_runs([a, b, c], source="online")
    assert online["prediction_vs_knn"] == pytest.approx(across["prediction_vs_knn"])
    assert "prediction_vs_linear" not in online
    (a / "eval.json").unlink()  # an online report needs no eval.json
    assert across_runs([a, b, c], source="online")["runs"] == 3
    assert across_runs([a, b, c])["runs"] == 2
    (a / "eval.json").write_text(json.dumps({"trained": {"concat": {"knn": 0.4, "linear": 0.9}}}))

    md = correlation_markdown(correlation_report([a, b, c]))
    assert "| a | 4 | -1.000 | +0.949 |" in md
    assert "| c | 2 | n/a | - |" in md
    assert "| prediction | 3 |" in md
