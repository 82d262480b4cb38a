"""hjepa ablate: variants, grids, planning, skip/resume, reports, summarize_runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from hjepa.cli import main
from hjepa.config import ConfigError, dump_yaml, load_config
from hjepa.experiments.ablate import (
    REVIEW_STUDY,
    Variant,
    grid_variants,
    parse_grid,
    plan_runs,
    read_variants,
    run_ablation,
    split_values,
)
from hjepa.experiments.report import ablation_markdown, ablation_rows, fmt_mean_std, group_runs
from hjepa.train.trainer import train
from tests.benchmark_scripts import load_benchmark
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# Cheapest meaningful runs: 2 steps, probes at the end, kNN-only evaluation.
FAST = [
    *TINY,
    "train.max_steps=2",
    "eval.linear=false",
    "eval.baselines=false",
    "eval.low_shot=false",
    "eval.robustness=false",
]


def test_split_values_handles_lists_and_pipes():
    assert split_values("1,2,3") == ["1", "2", "3"]
    assert split_values("[1,0.5,0.25]|[1,0.7,0.5]") == ["[1,0.5,0.25]", "[1,0.7,0.5]"]
    assert split_values("[1,0.5],[1,0.7]") == ["[1,0.5]", "[1,0.7]"]
    assert split_values(" gentle , constant ") == ["gentle", "constant"]
    with pytest.raises(ConfigError, match="empty"):
        split_values("1,,2")
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid("model.levels")


def test_grid_is_a_cartesian_product_with_readable_names():
    variants = grid_variants(["model.levels=1,2", "loss.level_weights=[1]|[1,0.5]"])
    assert [v.name for v in variants] == [
        "levels-1__level_weights-1",
        "levels-1__level_weights-1_0.5",
        "levels-2__level_weights-1",
        "levels-2__level_weights-1_0.5",
    ]
    assert variants[1].overrides == ("model.levels=1", "loss.level_weights=[1,0.5]")
    clash = grid_variants(["model.depth=2", "train.depth=3"])  # same last component
    assert clash[0].name == "model-depth-2__train-depth-3"
    with pytest.raises(ConfigError, match="distinct"):
        grid_variants(["model.levels=1", "model.levels=2"])


def test_read_variants_file(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# comment\n\nfast|train.max_steps=3 'optim.lr=0.1'  # why\nplain|\n")
    assert read_variants(path) == [
        Variant("fast", ("train.max_steps=3", "optim.lr=0.1")),
        Variant("plain", ()),
    ]
    path.write_text("no separator here\n")
    with pytest.raises(ConfigError, match=":1:"):
        read_variants(path)


def test_plan_orders_overrides_and_checks_names(tmp_path):
    runs = plan_runs([Variant("a", ("model.levels=2",))], [0, 3], tmp_path, ["optim.lr=0.1"])
    assert [r.run_dir for r in runs] == [tmp_path / "runs/a_s0", tmp_path / "runs/a_s3"]
    assert runs[1].overrides == (
        "optim.lr=0.1",
        "model.levels=2",
        "train.seed=3",
        f"run.dir={tmp_path / 'runs/a_s3'}",
    )
    assert runs[0].status() == "new"
    for bad in ("x_s2", "bad name", ""):
        with pytest.raises(ConfigError, match="variant name"):
            plan_runs([Variant(bad, ())], [0], tmp_path, [])
    with pytest.raises(ConfigError, match="distinct"):
        plan_runs([Variant("a", ()), Variant("a", ())], [0], tmp_path, [])
    with pytest.raises(ConfigError, match="seeds"):
        plan_runs([Variant("a", ())], [1, 1], tmp_path, [])


def test_review_study_reproduces_the_old_bugs_then_fixes_them():
    expected = {  # (EMA timing, mask scale mode, regulariser)
        "baseline": ("before_step", "geometric", "none"),
        "ema_fix": ("after_step", "geometric", "none"),
        "mask_fix": ("after_step", "constant", "none"),
        "sigreg": ("after_step", "constant", "sigreg"),
    }
    assert [v.name for v in REVIEW_STUDY] == list(expected)
    for variant in REVIEW_STUDY:
        cfg = load_config("quickstart", list(variant.overrides))
        got = (cfg.train.ema_timing, cfg.masking.scale_mode, cfg.loss.regularizer)
        assert got == expected[variant.name]


def test_ablation_skips_finished_runs_and_resumes_unfinished_ones(tmp_path):
    calls: list[str] = []

    def counting_train(cfg):
        calls.append(Path(cfg.run.dir).name)
        return train(cfg)

    variants = [REVIEW_STUDY[0], Variant("lv1", ("model.levels=1",))]
    out = tmp_path / "study"
    plan = plan_runs(variants, [0], out, FAST)
    # An interrupted run: the baseline stopped after 1 of its 2 steps.
    train(load_config(None, [*plan[0].overrides, "train.stop_after=1"]))
    assert plan[0].status() == "partial"

    paths = run_ablation(variants, [0], out, preset=None, extra=FAST, train_fn=counting_train)
    assert calls == ["baseline_s0", "lv1_s0"]
    steps = [
        r["step"]
        for r in map(json.loads, (plan[0].run_dir / "metrics.jsonl").open())
        if r["kind"] == "train"
    ]
    assert steps == [1, 2]  # continued from step 1, not restarted
    ckpt = torch.load(plan[0].run_dir / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(r.status() == "done" for r in plan)

    run_ablation(variants, [0], out, preset=None, extra=FAST, train_fn=counting_train)
    assert len(calls) == 2  # everything evaluated: nothing trained again

    (plan[1].run_dir / "eval.json").unlink()  # trained, but its evaluation was lost
    run_ablation(variants, [0], out, preset=None, extra=FAST, train_fn=counting_train)
    assert calls[2:] == ["lv1_s0"] and plan[1].status() == "done"

    table = paths["ablation.md"].read_text()
    assert "| baseline | 1/1 |" in table and "| lv1 | 1/1 |" in table
    assert paths["ablation.png"].stat().st_size > 0
    report = paths["report.md"].read_text()
    assert "![ablation](ablation.png)" in report and "runs/lv1_s0/report.md" in report
    assert (plan[1].run_dir / "report.md").is_file()
    corr = json.loads(paths["correlation.json"].read_text())
    assert set(corr["within"]) == {"baseline_s0", "lv1_s0"} and corr["across"]["runs"] == 2


def test_cli_dry_run_lists_runs_without_training(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["ablate", "--dry-run", "--out", str(out), "--grid", "model.levels=1,2"]
    assert main([*args, "--seeds", "0", "1", *FAST]) == 0  # overrides after --seeds
    text = capsys.readouterr().out
    for name in ("levels-1_s0", "levels-1_s1", "levels-2_s0", "levels-2_s1"):
        assert f"| {name} | new |" in text
    assert "4 runs" in text and not out.exists()
    assert main(["ablate", "--dry-run", "--review", "--grid", "model.levels=1", *FAST]) == 0
    assert "| sigreg_s1 | new |" in capsys.readouterr().out
    assert main(["ablate", "--dry-run", "--grid", "model.levels=9", *FAST]) == 2
    assert "model.levels" in capsys.readouterr().err


def write_eval(run_dir: Path, knn: float, linear: float, collapsed: bool, concat: bool = True):
    run_dir.mkdir(parents=True)
    trained = {"level0": {"knn": knn - 0.1, "linear": linear - 0.1}}
    if concat:
        trained["concat"] = {"knn": knn, "linear": linear}
    collapse = {"level0": {"collapsed": collapsed}}
    (run_dir / "eval.json").write_text(json.dumps({"trained": trained, "collapse": collapse}))


def test_ablation_table_is_mean_and_sample_std_over_seeds(tmp_path):
    write_eval(tmp_path / "a_s0", 0.8, 0.9, False)
    write_eval(tmp_path / "a_s1", 0.6, 0.7, True)
    write_eval(tmp_path / "one_s0", 0.5, 0.55, False, concat=False)
    (tmp_path / "b_s0").mkdir()  # planned but never evaluated
    groups = group_runs(sorted(tmp_path.iterdir()))
    assert list(groups) == ["a", "b", "one"]
    rows = {r["name"]: r for r in ablation_rows(groups)}
    assert rows["a"]["kNN concat"] == [0.8, 0.6]
    assert fmt_mean_std([0.8, 0.6]) == f"0.7000 ± {statistics.stdev([0.8, 0.6]):.4f}"
    assert rows["one"]["kNN concat"] == [0.4]  # one level: concat falls back to level 0
    table = ablation_markdown(list(rows.values()))
    assert "| a | 2/2 | 0.7000 ± 0.1414 | 0.8000 ± 0.1414 |" in table
    assert "**collapsed** (1/2 seeds)" in table
    assert "| b | 0/1 | - | - | - | - | not evaluated |" in table
    assert "| one | 1/1 | 0.4000 |" in table


def test_summarize_runs_script_prints_the_same_table(tmp_path, capsys):
    for name, knn in (("x_s0", 0.5), ("x_s1", 0.7)):
        write_eval(tmp_path / "runs" / name, knn, knn, False)
        cfg = load_config(None, [*TINY, f"run.dir={tmp_path / 'runs' / name}"])
        (tmp_path / "runs" / name / "config.yaml").write_text(dump_yaml(cfg))
    script = load_benchmark("summarize_runs")
    assert script.main([str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    rows = ablation_rows(group_runs(sorted((tmp_path / "runs").iterdir())))
    assert printed == ablation_markdown(rows)
    assert "| x | 2/2 | 0.6000 ± 0.1414 |" in printed
    assert (tmp_path / "o" / "ablation.png").stat().st_size > 0


def write_probes(run_dir: Path, probes: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"step": p["step"], "kind": "probe", **p} for p in probes]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_online_table_reads_the_last_probe_of_each_run(tmp_path):
    early = {"step": 100, "knn_level0": 0.9, "knn_concat": 0.9, "rank_level0": 50.0}
    write_probes(
        tmp_path / "a_s0",
        [early, {"step": 200, "knn_level0": 0.5, "knn_concat": 0.6, "rank_level0": 2.0,
                 "std_level0": 0.01, "collapsed_level0": False, "collapsed_level1": True}],
    )  # fmt: skip
    write_probes(
        tmp_path / "a_s1",
        [{"step": 200, "knn_level0": 0.7, "knn_concat": 0.8, "rank_level0": 4.0,
          "std_level0": 0.03, "collapsed_level0": False}],
    )  # fmt: skip
    write_probes(tmp_path / "flat_s0", [{"step": 50, "knn_level0": 0.4, "rank_level0": 9.0}])
    (tmp_path / "b_s0").mkdir()  # no probe logged
    groups = group_runs(sorted(tmp_path.iterdir()))
    rows = {r["name"]: r for r in ablation_rows(groups, source="online")}
    assert rows["a"]["kNN concat"] == [0.6, 0.8] and rows["a"]["eff. rank level0"] == [2.0, 4.0]
    assert rows["a"]["collapsed"] == 1  # level 1 of seed 0 collapsed
    assert rows["flat"]["kNN concat"] == [0.4]  # one level: concat falls back to level 0
    assert rows["b"]["evaluated"] == 0
    table = ablation_markdown(list(rows.values()))
    assert "| variant | seeds | kNN concat | kNN level0 | eff. rank level0 | norm. std" in table
    assert "| a | 2/2 | 0.7000 ± 0.1414 | 0.6000 ± 0.1414 | 3.0 ± 1.4 | 0.0200 ± 0.0141 |" in table
    assert "linear" not in table
    with pytest.raises(ValueError, match="source"):
        ablation_rows(groups, source="eval.json")


def test_run_variants_skips_duplicate_configs_and_respects_the_deadline(tmp_path):
    script = load_benchmark("run_variants")
    variants = [
        ("none", ["loss.regularizer=none"]),
        ("fixed", ["train.ema_timing=after_step", "loss.regularizer=none"]),  # defaults: same
        ("geo", ["masking.scale_mode=geometric", "loss.regularizer=none"]),
        ("none_again", ["loss.regularizer=none", "loss.regularizer=none"]),
    ]
    assert script.same_as_earlier(variants, "quickstart", []) == {
        "fixed": "none",
        "none_again": "none",
    }
    # Shared overrides come first, so a variant's own explicit default still wins over them.
    assert (
        script.same_as_earlier(variants[:2], "quickstart", ["train.ema_timing=before_step"]) == {}
    )
    args = type("Args", (), {"deadline": 1.0, "started": 0.0})()  # launched long ago
    record = script.run_one("late", ["train.seed=1"], args)
    assert record["rc"] is None and "deadline" in record["skipped"]
