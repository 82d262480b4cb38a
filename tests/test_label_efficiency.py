"""benchmarks/label_efficiency.py: the supervised line it compares with is the seed's own."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_scripts import load_benchmark


def test_the_supervised_row_is_the_last_textbook_vit_line_of_that_seed_alone(tmp_path):
    rows = [
        {"network": "vit", "recipe": "textbook", "overrides": ["train.threads=1"], "knn_test": 0.1},
        {"network": "cnn", "recipe": "textbook", "overrides": [], "knn_test": 0.2},
        {"network": "vit", "recipe": "run", "overrides": [], "knn_test": 0.3},
        {"network": "vit", "recipe": "textbook", "overrides": ["optim.lr=2e-3"], "knn_test": 0.4},
        {"network": "vit", "recipe": "textbook", "overrides": ["train.seed=1"], "knn_test": 0.5},
        {"network": "vit", "recipe": "textbook", "overrides": [], "knn_test": 0.6},
    ]
    path = tmp_path / "sup.jsonl"
    path.write_text("".join(json.dumps({**r, "linear_test": r["knn_test"]}) + "\n" for r in rows))
    pick = load_benchmark("label_efficiency").supervised_row
    assert pick(str(path), 0) == {"knn": 0.6, "linear": 0.6}  # the last seed-0 line
    assert pick(str(path), 1) == {"knn": 0.5, "linear": 0.5}
    with pytest.raises(SystemExit, match="no textbook ViT line"):
        pick(str(path), 2)
