"""The schema is the one definition of every key: the choice lists, the lower bounds and the
checks other modules use are read from it, and every key says what it does."""

import re
import typing

import pytest

from hjepa import config as config_module
from hjepa.config import CHOICES, MINIMUM, SCHEMA, Config, ConfigError, load_config, valid_keys

HISTORY_WORDS = re.compile(r"old bug|option [AB]\b|earlier code|seed review|reviewed|the bug", re.I)


def test_every_key_has_a_one_line_description_without_history():
    assert list(SCHEMA) == valid_keys() and len(SCHEMA) > 100
    for key in SCHEMA.values():
        assert key.help.strip() and "\n" not in key.help and len(key.help) <= 100, key.name
        assert not HISTORY_WORDS.search(key.help), key.name


def test_defaults_come_from_the_schema_and_match_a_fresh_config():
    cfg = Config()
    for name, key in SCHEMA.items():
        assert config_module.get_value(cfg, name) == key.default, name


def test_choices_are_the_literal_types_of_the_schema():
    hints = typing.get_type_hints(config_module.LossConfig)
    assert typing.get_origin(hints["regularizer"]) is typing.Literal
    assert CHOICES["loss.regularizer"] == ("none", "sigreg", "vicreg", "sigreg+vicreg")
    literal = {k for k, key in SCHEMA.items() if typing.get_origin(key.type) is typing.Literal}
    assert set(CHOICES) == literal and {"masking.scale_mode", "model.attention"} <= literal
    # every choice is accepted, anything else refused
    for value in CHOICES["model.fpn"]:
        assert load_config(None, [f"model.fpn={value}", "model.levels=3"]).model.fpn == value
    with pytest.raises(ConfigError, match="model.fpn='sum' is not one of: none, add, concat"):
        load_config(None, ["model.fpn=sum"])


def test_modules_use_the_schema_choices_not_their_own_lists():
    from hjepa.data.datasets import DATASET_NAMES
    from hjepa.losses.combined import REGULARIZE_ON, REGULARIZERS
    from hjepa.losses.prediction import DISTANCES
    from hjepa.losses.sigreg import DRAWS, EVALUATIONS
    from hjepa.models.predictor import PREDICTOR_MODES
    from hjepa.models.vit import ATTENTION_BACKENDS, POS_EMBEDS

    assert REGULARIZERS is CHOICES["loss.regularizer"]
    assert REGULARIZE_ON is CHOICES["loss.regularize_on"]
    assert DRAWS is CHOICES["loss.sigreg_draw"]
    assert EVALUATIONS is CHOICES["loss.sigreg_eval"]
    assert PREDICTOR_MODES is CHOICES["model.predictor_mode"]
    assert POS_EMBEDS is CHOICES["model.pos_embed"]
    assert ATTENTION_BACKENDS is CHOICES["model.attention"]
    assert DATASET_NAMES is CHOICES["data.name"]
    assert tuple(DISTANCES) == CHOICES["loss.distance"]  # the implementations, one per choice


def test_minimum_is_every_closed_lower_bound_and_each_is_enforced():
    assert MINIMUM["model.num_heads"] == 1 and MINIMUM["train.log_every"] == 1
    assert "optim.lr" not in MINIMUM  # > 0, not >= 0: an open bound
    for name, low in MINIMUM.items():
        below = low - 1 if SCHEMA[name].type is int else low - 0.5
        with pytest.raises(ConfigError, match=re.escape(f"{name}=")):
            load_config(None, [f"{name}={below}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("data.hflip=1.5", "data.hflip=1.5 must be a probability in [0, 1]"),
        ("model.drop_path=1.0", "model.drop_path=1.0 must be in [0, 1)"),
        ("model.levels=5", "model.levels=5 must be in [1, 4]"),
        ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]: every entry must be in [0, 1)"),
        ("masking.target_scale=[0.3, 0.2]", "masking.target_scale must be [min, max] with"),
        ("eval.low_shot_seeds=[]", "eval.low_shot_seeds is empty"),
        ("loss.level_weights=[1, -1, 1]", "every entry must be >= 0"),
    ],
)
def test_bounds_from_the_schema_are_enforced_with_the_bound_in_the_message(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_bounds_accept_their_edges():
    cfg = load_config(None, ["data.hflip=1.0", "model.drop_path=0.0", "model.levels=1"])
    assert (cfg.data.hflip, cfg.model.drop_path, cfg.model.levels) == (1.0, 0.0, 1)


def test_constructors_take_the_config_section_whole():
    from hjepa.config import AugmentConfig, LossConfig
    from hjepa.data.deit3 import DeiT3Augment
    from hjepa.losses.combined import Objective

    loss = LossConfig(
        regularizer="sigreg+vicreg", sigreg_weight=0.3, vicreg_weight=0.2, vicreg_cov_weight=2.0,
        contrastive=True, contrastive_weight=0.7,
    )  # fmt: skip
    objective = Objective(loss, [1.0, 0.5], multicrop_weight=0.4)
    assert objective.weights == {
        "loss_level0": 1.0,
        "loss_level1": 0.5,
        "sigreg": 0.3,
        "vicreg_var": 0.2 * 25.0,
        "vicreg_cov": 0.2 * 2.0,
        "vicreg_inv": 0.2 * 25.0,
        "contrastive": 0.7,
        "multicrop": 0.4,
    }
    loss.sigreg_weight = 9.0  # the objective keeps its own copy of the section
    assert objective.weights["sigreg"] == 0.3
    augment = AugmentConfig(three_augment=0.5, blur_sigma=[0.2, 1.0], mixup=0.8)
    built = DeiT3Augment.from_config(augment, mean=[0.5], std=[0.5])
    by_hand = DeiT3Augment(
        mean=[0.5], std=[0.5], three_augment=0.5, blur_sigma=(0.2, 1.0), mixup=0.8
    )
    assert vars(built).keys() == vars(by_hand).keys()
    for name, value in vars(by_hand).items():
        same = (
            value.equal(vars(built)[name])
            if hasattr(value, "equal")
            else value == vars(built)[name]
        )
        assert same, name
