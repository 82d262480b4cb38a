"""Resume refuses a changed recipe; allowed changes are recorded; train.init_from starts a new
run from another run's encoder weights."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from hjepa.cli import main
from hjepa.config import ConfigError, load_config
from hjepa.train import recipe
from hjepa.train.logging import read_metrics
from hjepa.train.schedules import warmup_cosine
from hjepa.train.trainer import Trainer
from tests.conftest import TINY
from tests.state import checkpoint_tensors

# -- the diff and its rules, no training -------------------------------------------------------


def _cfg(*overrides):
    return load_config("quickstart", [*TINY, *overrides])


def test_diff_names_each_changed_key_with_old_and_new_values_and_ignores_run_dir():
    stored = _cfg("run.dir=/a", "optim.lr=0.001").to_dict()
    current = _cfg("run.dir=/b", "optim.lr=5e-3", "loss.regularizer=none", "train.log_every=7")
    changes = recipe.config_diff(stored, current)
    assert [(c.key, c.old, c.new) for c in changes] == [
        ("train.log_every", 1, 7),
        ("optim.lr", 0.001, 0.005),
        ("loss.regularizer", "sigreg", "none"),
    ]
    run_only, changed = recipe.split(changes)
    assert [c.key for c in run_only] == ["train.log_every"]
    assert [str(c) for c in changed] == [
        "optim.lr 0.001 -> 0.005",
        "loss.regularizer 'sigreg' -> 'none'",
    ]


def test_a_key_missing_from_an_old_checkpoint_takes_its_default_not_a_change():
    stored = _cfg().to_dict()
    del stored["model"]["pos_embed"], stored["train"]["nonfinite"]
    assert recipe.config_diff(stored, _cfg()) == []
    # ... but a non-default value for that key is a change against the default.
    assert [c.key for c in recipe.config_diff(stored, _cfg("model.pos_embed=rope"))] == [
        "model.pos_embed"
    ]


def test_every_run_only_key_is_a_schema_key_and_none_sets_the_recipe():
    from hjepa.config import valid_keys

    keys = set(valid_keys())
    assert set(recipe.RUN_ONLY_KEYS) <= keys
    assert all(any(k.startswith(p) for k in keys) for p in recipe.RUN_ONLY_PREFIXES)
    # Keys that shape the schedule, the data, the loss or the weights are never run-only.
    for key in (
        "train.epochs",
        "train.max_steps",
        "train.batch_size",
        "train.accum_steps",
        "train.seed",
        "train.precision",
        "train.ema_start",
        "optim.lr",
        "data.root",
        "masking.target_scale",
        "loss.regularizer",
        "model.depth",
        "model.drop_path",
    ):
        assert not recipe.is_run_only(key), key


def test_check_resume_refuses_in_one_line_naming_both_ways_on():
    stored = _cfg("optim.lr=0.001").to_dict()
    current = _cfg("optim.lr=0.005", "loss.regularizer=none")
    with pytest.raises(recipe.RecipeChangeError) as info:
        recipe.check_resume(stored, current, "runs/x")
    text = str(info.value)
    assert "\n" not in text
    assert "optim.lr 0.001 -> 0.005" in text and "loss.regularizer 'sigreg' -> 'none'" in text
    assert "new run.dir" in text and "--allow-config-change" in text
    # Allowed: the changes come back to be recorded.
    run_only, changed = recipe.check_resume(stored, current, "runs/x", allow=True)
    assert run_only == [] and [c.key for c in changed] == ["optim.lr", "loss.regularizer"]


def test_architecture_and_init_from_changes_are_refused_even_when_allowed():
    stored = _cfg().to_dict()
    with pytest.raises(
        recipe.RecipeChangeError, match=r"different architecture \(model.depth 2 -> 3\)"
    ):
        recipe.check_resume(stored, _cfg("model.depth=3"), "runs/x", allow=True)
    with pytest.raises(recipe.RecipeChangeError, match="train.init_from only sets"):
        recipe.check_resume(stored, _cfg("train.init_from=runs/y"), "runs/x", allow=True)
    # Leaving the stored init_from out of a resume is no change.
    started = _cfg("train.init_from=runs/y").to_dict()
    assert recipe.check_resume(started, _cfg(), "runs/x") == ([], [])


# -- on a run dir ------------------------------------------------------------------------------

STEPS = ["train.max_steps=4", "run.checkpoint_every=100"]


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints/last.pt", weights_only=True)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """A reference run of 4 steps and a run of the same recipe stopped after 2."""
    base = tmp_path_factory.mktemp("resume")
    torch.set_num_threads(1)
    Trainer(load_config("quickstart", [*TINY, *STEPS, f"run.dir={base / 'full'}"])).fit()
    Trainer(
        load_config("quickstart", [*TINY, *STEPS, "train.stop_after=2", f"run.dir={base / 'half'}"])
    ).fit()
    return base


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("finished", [False, True])
def test_a_changed_recipe_is_refused_and_nothing_on_disk_changes(
    half_run, tmp_path, capsys, finished
):
    run = _copy(half_run / ("full" if finished else "half"), tmp_path / "run")
    (run / "checkpoints/.last.pt.x.tmp").write_bytes(b"partial")  # stale: kept when refused
    before = _files(run)
    args = ["train", "--config", "quickstart", *TINY, *STEPS, f"run.dir={run}"]
    code = main([*args, "optim.lr=5e-3", "loss.regularizer=none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hjepa train: error: ")
    assert "optim.lr 0.001 -> 0.005" in err and "loss.regularizer 'sigreg' -> 'none'" in err
    assert _files(run) == before  # config.yaml, checkpoints, metrics: byte for byte


def test_run_only_settings_may_differ_and_the_result_is_bit_identical(half_run, tmp_path, capsys):
    run = _copy(half_run / "half", tmp_path / "run")
    config_before = (run / "config.yaml").read_bytes()
    other = ["train.log_every=3", "train.knn_every=1", "eval.knn_k=5", "run.checkpoint_every=1"]
    other += ["run.keep_every=1", "train.threads=1", "train.nonfinite=skip"]
    trainer = Trainer(load_config("quickstart", [*TINY, *STEPS, *other, f"run.dir={run}"]))
    trainer.fit()
    out = capsys.readouterr().out
    assert "resuming" in out and "train.log_every 1 -> 3" in out and "eval.knn_k 20 -> 5" in out
    assert trainer.step == 4
    assert (run / "config.yaml").read_bytes() == config_before  # never rewritten by a resume
    assert not (run / recipe.HISTORY).exists()
    a, b = checkpoint_tensors(_last(half_run / "full")), checkpoint_tensors(_last(run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(run, "probe")] == [3, 4]  # the probe ran: it acted


def test_an_allowed_change_is_recorded_and_continues(half_run, tmp_path, capsys):
    run = _copy(half_run / "half", tmp_path / "run")
    config_before = (run / "config.yaml").read_bytes()
    args = ["train", "--config", "quickstart", *TINY, *STEPS, f"run.dir={run}", "optim.lr=5e-3"]
    assert main([*args, "--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "optim.lr 0.001 -> 0.005" in out
    assert (run / "config.yaml").read_bytes() == config_before
    history = yaml.safe_load((run / recipe.HISTORY).read_text())
    assert len(history) == 1 and history[0]["step"] == 2
    assert history[0]["changes"] == {"optim.lr": {"old": 0.001, "new": 0.005}}
    assert history[0]["checkpoint"].endswith("last.pt")
    events = read_metrics(run, "config_change")
    assert [(e["step"], e["changes"]) for e in events] == [(2, {"optim.lr": [0.001, 0.005]})]
    # Steps 3 and 4 followed the new peak learning rate (warmup 5% of 4 steps: 0 -> cosine).
    train = {r["step"]: r["lr"] for r in read_metrics(run, "train")}
    for step in (3, 4):
        assert train[step] == pytest.approx(warmup_cosine(step - 1, 4, 0, 2e-4, 5e-3, 1e-6))
    assert _last(run)["config"]["optim"]["lr"] == 0.005
    # The run now holds the new recipe: the old one is the change now.
    assert main([*args[:-1], "train.max_steps=4"]) == 2
    assert "optim.lr 0.005 -> 0.001" in capsys.readouterr().err


def test_the_python_api_takes_allow_config_change(half_run, tmp_path):
    run = _copy(half_run / "half", tmp_path / "run")
    cfg = load_config("quickstart", [*TINY, *STEPS, f"run.dir={run}", "optim.weight_decay=0.1"])
    with pytest.raises(ConfigError, match="optim.weight_decay 0.04 -> 0.1"):
        Trainer(cfg).fit()
    trainer = Trainer(cfg, allow_config_change=True)
    trainer.fit()
    assert trainer.step == 4 and len(recipe.read_history(run)) == 1


# -- train.init_from ---------------------------------------------------------------------------


def test_init_from_copies_the_encoders_and_predictor_with_a_fresh_schedule(
    half_run, tmp_path, capsys
):
    source = _last(half_run / "full")
    run = tmp_path / "new"
    cfg = load_config(
        "quickstart",
        [*TINY, "train.max_steps=2", f"run.dir={run}", f"train.init_from={half_run / 'full'}"],
    )
    trainer = Trainer(cfg)
    for part in ("context_encoder", "target_encoder", "predictor", "heads"):
        mine = getattr(trainer.model, part).state_dict()
        assert all(torch.equal(mine[k], source[part][k]) for k in mine), part
    assert trainer.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    trainer.fit()
    assert trainer.step == 2 and _last(run)["step"] == 2
    out = capsys.readouterr().out
    assert f"starting from {half_run / 'full'}/checkpoints/last.pt (step 4)" in out
    assert "predictor" in out
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["train"]["init_from"] == str(half_run / "full")  # recorded in the config
    (event,) = read_metrics(run, "init_from")
    assert event["step"] == 0 and event["source_step"] == 4
    assert event["loaded"] == ["context encoder", "target encoder", "predictor"]
    # The first step's lr is the start of a fresh schedule, not the source's end of it.
    first, source_end = read_metrics(run, "train")[0], read_metrics(half_run / "full", "train")[-1]
    assert first["lr"] == pytest.approx(warmup_cosine(0, 2, 0, 2e-4, 1e-3, 1e-6)) == 1e-3
    assert source_end["lr"] < 1e-3 / 2


def test_init_from_with_another_predictor_keeps_a_fresh_one(half_run, tmp_path, capsys):
    cfg = load_config(
        "quickstart",
        [
            *TINY,
            "train.max_steps=1",
            f"run.dir={tmp_path / 'new'}",
            f"train.init_from={half_run / 'full' / 'checkpoints' / 'last.pt'}",
            "model.predictor_depth=2",
        ],
    )
    trainer = Trainer(cfg)
    assert trainer.warm_start.loaded == ("context encoder", "target encoder")
    assert "a new predictor" in trainer.warm_start.describe()


def test_init_from_errors_are_one_line_and_name_the_misfit(half_run, tmp_path):
    base = [*TINY, "train.max_steps=1", f"run.dir={tmp_path / 'new'}"]
    with pytest.raises(ConfigError, match=r"model.embed_dim 32 -> 64"):
        Trainer(
            load_config(
                "quickstart", [*base, f"train.init_from={half_run / 'full'}", "model.embed_dim=64"]
            )
        )
    with pytest.raises(ConfigError, match="no such run dir or checkpoint"):
        Trainer(load_config("quickstart", [*base, f"train.init_from={tmp_path / 'nowhere'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no checkpoints/last.pt"):
        Trainer(load_config("quickstart", [*base, f"train.init_from={tmp_path / 'empty'}"]))
    assert not (tmp_path / "new").exists()  # refused before the run dir was made


def test_init_from_on_an_existing_run_is_refused_unless_it_is_the_stored_one(half_run, tmp_path):
    run = _copy(half_run / "half", tmp_path / "run")
    before = _files(run)
    cfg = load_config(
        "quickstart", [*TINY, *STEPS, f"run.dir={run}", f"train.init_from={half_run / 'full'}"]
    )
    with pytest.raises(ConfigError, match="already holds a run.*use a new run.dir"):
        Trainer(cfg, allow_config_change=True).fit()
    assert _files(run) == before
    # A run started with init_from resumes with the same command, or without init_from.
    started = tmp_path / "started"
    args = [*TINY, *STEPS, f"run.dir={started}", f"train.init_from={half_run / 'full'}"]
    Trainer(load_config("quickstart", [*args, "train.stop_after=2"])).fit()
    Trainer(load_config("quickstart", [*args, "train.stop_after=1"])).fit()
    resumed = Trainer(load_config("quickstart", [*TINY, *STEPS, f"run.dir={started}"]))
    resumed.fit()
    assert resumed.step == 4
    assert _last(started)["config"]["train"]["init_from"] == str(half_run / "full")
    assert [r["step"] for r in read_metrics(started, "init_from")] == [0]
    assert (
        json.loads((started / "metrics.jsonl").read_text().splitlines()[0])["kind"] == "init_from"
    )
