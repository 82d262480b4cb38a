"""Validation rules a new user meets: empty run dir, masks with no room for a context, integers
written as 1e3, the real bound of train.log_every, bare key names, YAML syntax errors."""

import pytest
import torch

from hjepa.cli import main
from hjepa.config import ConfigError, expected_context, load_config
from hjepa.data.masks import sampler_from_config


@pytest.mark.parametrize("value", ["", " ", "''"])
def test_empty_run_dir_is_refused(value):
    with pytest.raises(ConfigError, match="run.dir is empty"):
        load_config("quickstart", [f"run.dir={value}"])


def test_target_blocks_that_leave_no_context_are_refused():
    with pytest.raises(ConfigError, match=r"masks leave fewer than min_context=4.*7x7"):
        load_config("quickstart", ["masking.target_scale=[0.9,0.95]"])
    # fewer blocks of that size leave room: the rule counts the blocks, not just their scale
    cfg = load_config("quickstart", ["masking.target_scale=[0.9,0.95]", "masking.num_targets=1"])
    assert cfg.masking.num_targets == 1
    load_config("quickstart")  # the defaults leave plenty


def test_expected_context_is_what_the_sampler_leaves_on_average():
    # Point ranges fix the block sizes, so the formula is exact: compare with 4000 draws.
    overrides = [
        "data.name=synthetic",
        "data.image_size=32",
        "model.patch_size=4",
        "masking.target_scale=[0.25,0.25]",
        "masking.target_aspect=[1.0,1.0]",
        "masking.context_scale=[0.7,0.7]",
        "masking.num_targets=3",
        "masking.min_context=1",
    ]
    cfg = load_config(None, overrides)
    masks = sampler_from_config(cfg).sample(4000, torch.Generator().manual_seed(0))
    left = (masks.context_block & ~masks.targets.any(1)).sum(-1).double()
    assert left.min() > 0  # no sample needed a redraw, so the draws are unbiased
    assert expected_context(cfg) == pytest.approx(left.mean().item(), rel=0.03)
    assert 5 < expected_context(cfg) < 40  # a case where the blocks matter


def test_integers_written_in_e_notation_are_integers():
    cfg = load_config("quickstart", ["train.max_steps=1e3"])
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    with pytest.raises(ConfigError, match="must be an integer, got 1.5"):
        load_config("quickstart", ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config("quickstart", ["train.max_steps=1e-3"])


def test_log_every_states_its_real_bound():
    with pytest.raises(ConfigError, match=r"train.log_every=0 must be >= 1"):
        load_config("quickstart", ["train.log_every=0"])
    assert load_config("quickstart", ["train.log_every=1"]).train.log_every == 1


@pytest.mark.parametrize(
    ("bare", "meant"),
    [("batch_size", "train.batch_size"), ("seed", "train.seed"), ("lr", "optim.lr")],
)
def test_a_bare_name_suggests_the_key_it_ends(bare, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        load_config("quickstart", [f"{bare}=8"])


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("base: quickstart\ntrain:\n  batch_size: 3\n   seed: [1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"hjepa train: error: {path}:4:8: invalid YAML: mapping values are not allowed here\n"
    )
    assert main(["train", "train.max_steps=[1,"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "override 'train.max_steps=[1,'" in err


def test_a_stored_config_with_a_cleared_run_dir_still_loads():
    # an exported card clears run.dir; rebuilding its model must not need one
    from hjepa.config import from_dict

    tree = load_config("quickstart").to_dict()
    tree["run"]["dir"] = ""
    assert from_dict(tree).run.dir == ""
    with pytest.raises(ConfigError, match="run.dir is empty"):  # but no run starts from it
        load_config("quickstart", ["run.dir="])
