"""Every accepted option does something: a key the chosen mode never reads is refused.

The cases come from the schema itself (every key declared ``setting(..., when=MODE)``), so a key
added to a mode is tested without anyone writing its case.
"""

import pytest

from hjepa.config import SCHEMA, ConfigError, Key, from_stored, load_config
from hjepa.train.sizes import warmup_steps

GATED = [key for key in SCHEMA.values() if key.when is not None]


def _candidates(key: Key) -> list:
    """Values other than the default, from the key's type, choices and bounds."""
    d = key.default
    if key.choices:
        return [c for c in key.choices if c != d]
    if isinstance(d, bool):
        return [not d]
    if isinstance(d, list):
        return [[v / 2 for v in d], [v * 2 for v in d]]
    if isinstance(d, str):
        return ["imagenet100", "elsewhere"]
    return [d * 2 or 1, d / 2 if isinstance(d, float) else d // 2, d + 1, d * 0.9999]


def _load(*overrides: str):
    return load_config(None, ["data.name=synthetic", *overrides])


def _setting(key: Key, value) -> str:
    if isinstance(value, list):
        return f"{key.name}=[{', '.join(map(str, value))}]"
    return f"{key.name}={str(value).lower() if isinstance(value, bool) else value}"


def _value_the_mode_accepts(key: Key) -> str:
    """The first non-default value that loads with the key's mode on."""
    for value in _candidates(key):
        with_it = _setting(key, value)
        try:
            cfg = _load(*key.when.on, with_it)
        except ConfigError:
            continue
        assert key.when.active(cfg), f"{key.name}: the mode's 'on' overrides leave it off"
        return with_it
    raise AssertionError(f"{key.name}: no candidate value loads with its mode on")


def test_the_schema_gates_the_keys_that_act_only_in_one_mode():
    names = {key.name for key in GATED}
    # 28 training keys and 8 eval keys when issue 28 closed (its report prints the count).
    assert len(GATED) >= 36
    assert {"train.ema_start", "loss.vicreg_weight", "loss.contrastive_temperature"} <= names
    assert {"loss.sigreg_slices", "data.multicrop.weight", "optim.start_lr"} <= names
    assert {name for name in names if name.startswith("eval.")} == {
        "eval.low_shot_fractions",
        "eval.low_shot_seeds",
        "eval.attentive_epochs",
        "eval.attentive_lrs",
        "eval.attentive_weight_decays",
        "eval.robustness_limit",
        "eval.cache",
        "eval.cache_dir",
    }


@pytest.mark.parametrize("key", GATED, ids=lambda k: k.name)
def test_a_key_its_mode_ignores_is_refused_naming_the_key_and_the_mode(key):
    with_it = _value_the_mode_accepts(key)
    off = _load(*key.when.off)
    assert not key.when.active(off), f"{key.name}: the mode's 'off' overrides leave it on"
    mode_key = key.when.state(off).split("=")[0]  # e.g. "loss.regularizer"
    with pytest.raises(ConfigError) as refused:
        _load(*key.when.off, with_it)
    message = str(refused.value)
    assert key.name in message and mode_key in message and "\n" not in message
    # Its default is accepted in the same mode: the refusal is about the value, not the mode.
    _load(*key.when.off)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.target=shared", "loss.regularizer=sigreg", "train.ema_start=0.5"],
            "train.ema_start=0.5 has no effect with model.target=shared",
        ),
        (
            ["loss.regularizer=sigreg", "loss.vicreg_weight=5"],
            "loss.vicreg_weight=5 has no effect with loss.regularizer=sigreg; remove it or choose"
            " loss.regularizer=vicreg or sigreg+vicreg",
        ),
        (
            ["loss.contrastive=false", "loss.contrastive_temperature=0.9"],
            "loss.contrastive_temperature=0.9 has no effect with loss.contrastive=false",
        ),
        (
            ["loss.regularizer=none", "loss.sigreg_slices=3"],
            "loss.sigreg_slices=3 has no effect with loss.regularizer=none",
        ),
        (
            ["data.multicrop.weight=2"],
            "data.multicrop.weight=2 has no effect with data.multicrop.num_local=0",
        ),
        (["optim.start_lr=0.01", "optim.lr=0.001"], "optim.start_lr=0.01 is above the peak"),
        (["train.max_steps=10", "optim.warmup_steps=20"], "longer than the run"),
        (["loss.regularizer=none", "loss.level_weights=[0, 0, 0]"], "the loss is 0 at every step"),
    ],
)
def test_the_issues_no_op_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
        _load(*overrides)


def test_a_packaged_presets_value_does_not_block_switching_its_mode_off():
    # quickstart sets loss.sigreg_weight=0.1; turning SIGReg off on top of it is a choice ...
    assert load_config("quickstart", ["loss.regularizer=none"]).loss.regularizer == "none"
    # ... but a SIGReg weight the user gives with SIGReg off is refused.
    with pytest.raises(ConfigError, match="loss.sigreg_weight=0.3 has no effect"):
        load_config("quickstart", ["loss.regularizer=none", "loss.sigreg_weight=0.3"])


def test_the_zero_prediction_ablation_with_a_regularizer_still_loads():
    cfg = _load("loss.regularizer=sigreg", "loss.level_weights=[0, 0, 0]")
    assert cfg.loss.level_weights == [0.0, 0.0, 0.0]


def test_a_warmup_longer_than_an_epoch_counted_run_is_refused_against_its_length():
    cfg = _load("train.epochs=1", "optim.warmup_steps=50")  # the length needs the data
    assert warmup_steps(cfg, total=50) == 50
    with pytest.raises(ConfigError, match=r"warmup_steps=50 is longer than the run \(49 steps\)"):
        warmup_steps(cfg, total=49)


def _stored(*overrides: str) -> dict:
    """A run's config.yaml as ``hjepa eval`` reads it."""
    return _load(*overrides).to_dict()


def test_an_eval_override_its_mode_ignores_is_refused_on_top_of_a_stored_run():
    stored = _stored("eval.robustness=false")  # quickstart's choice
    with pytest.raises(ConfigError, match="eval.robustness_limit=500 has no effect with eval.robu"):
        from_stored(stored, ["eval.robustness_limit=500"])
    cfg = from_stored(stored, ["eval.robustness=true", "eval.robustness_limit=500"])
    assert (cfg.eval.robustness, cfg.eval.robustness_limit) == (True, 500)
    with pytest.raises(ConfigError, match=r"eval.attentive_lrs=\[0.1\] has no effect with eval"):
        from_stored(stored, ["eval.attentive=false", "eval.attentive_lrs=[0.1]"])


def test_a_stored_value_counts_as_a_default_when_hjepa_eval_switches_its_mode_off():
    # A run trained with 8 attentive epochs: evaluating it without the attentive probe is a
    # choice about this evaluation, not a no-op the user typed.
    stored = _stored("eval.attentive_epochs=8")
    assert from_stored(stored, ["eval.attentive=false"]).eval.attentive_epochs == 8
    # A run written before the rule, its mode off and the key set, still loads as written.
    stored["eval"] |= {"attentive": False}
    assert from_stored(stored).eval.attentive_epochs == 8
    # Only the overrides' own keys count: the model stays the run's.
    with pytest.raises(ConfigError, match=r"accepts only eval.\* overrides"):
        from_stored(stored, ["model.depth=3"])
