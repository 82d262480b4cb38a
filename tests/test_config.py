import pytest

from hjepa.config import ConfigError, load_config, preset_names, valid_keys

PUBLIC_KEYS = {
    "run.dir": "runs/x",
    "train.seed": 3,
    "train.max_steps": 7,
    "train.stop_after": 2,
    "train.batch_size": 64,
    "data.name": "image_folder",  # data.root is read by the datasets decoded from files
    "data.root": "/tmp/somewhere",
    "data.image_size": 32,
    "data.channels": 3,
    "model.patch_size": 4,
    "model.embed_dim": 64,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.predictor_embed_dim": 48,
    "model.predictor_depth": 2,
    "model.levels": 2,
    "loss.distance": "smooth_l1",
    "masking.scale_mode": "gentle",
    "train.ema_start": 0.99,
    "train.ema_end": 0.999,
    "train.ema_timing": "before_step",
    "optim.lr": 0.002,
    "loss.regularizer": "none",
}


def test_presets_exist_and_load():
    names = preset_names()
    assert {"quickstart", "fmnist"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.run.dir


@pytest.mark.parametrize("preset", ["quickstart", "fmnist"])
def test_every_public_key_works_in_every_preset(preset):
    overrides = [f"{k}={v}" for k, v in PUBLIC_KEYS.items()]
    cfg = load_config(preset, overrides)
    for key, value in PUBLIC_KEYS.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_step=10"])
    with pytest.raises(ConfigError, match="model.embed_dim"):
        load_config(None, ["modle.embed_dim=10"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["zzz=1"])


def test_unknown_key_in_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(str(path))


def test_values_are_type_checked_and_choices_enforced():
    with pytest.raises(ConfigError, match="integer"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["run.progress=maybe"])
    with pytest.raises(ConfigError, match="constant"):
        load_config(None, ["masking.scale_mode=linear"])
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(None, ["optim.lr=2e-3"]).optim.lr == 0.002
    with pytest.raises(ConfigError, match="number"):
        load_config(None, ["optim.lr=fast"])


def test_contradictions_fail_fast():
    with pytest.raises(ConfigError, match="too deep"):
        load_config(None, ["data.image_size=28", "model.patch_size=14", "model.levels=3"])
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        load_config(None, ["data.image_size=30", "model.patch_size=4"])
    with pytest.raises(ConfigError, match="one weight per level"):
        load_config(None, ["model.levels=2", "loss.level_weights=[1.0, 0.5, 0.2]"])
    with pytest.raises(ConfigError, match="accum_steps"):
        load_config(None, ["train.batch_size=10", "train.accum_steps=3"])


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "train.ema_timing" in keys and "masking.scale_mode" in keys
    assert len(keys) == len(set(keys))
