"""Config files: ``base:`` chains, the rule for a file without a base, ``--print-config``, and
the key table (``hjepa config --list``, docs/config.md) read from the schema."""

import signal
from pathlib import Path

import pytest
import yaml

from hjepa import config_table
from hjepa.cli import main
from hjepa.config import SCHEMA, Config, ConfigError, dump_yaml, load_config, preset_names

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_with_a_preset_base_holds_only_its_changes(tmp_path):
    path = _write(tmp_path / "mine.yaml", "base: quickstart\ntrain:\n  max_steps: 7\n")
    mine, quickstart = load_config(str(path)), load_config("quickstart")
    assert mine.train.max_steps == 7 and quickstart.train.max_steps != 7
    mine.train.max_steps = quickstart.train.max_steps
    assert mine == quickstart  # everything else is the preset's, regulariser included
    assert mine.loss.regularizer == "sigreg"


def test_bases_chain_and_relative_paths_resolve_from_the_files_folder(tmp_path, monkeypatch):
    _write(tmp_path / "a.yaml", "base: quickstart\ntrain:\n  max_steps: 5\noptim:\n  lr: 0.002\n")
    _write(tmp_path / "deep/b.yaml", "base: ../a.yaml\noptim:\n  lr: 0.01\n")
    c = _write(tmp_path / "deep/c.yaml", "base: b.yaml\nmodel:\n  depth: 2\n")
    monkeypatch.chdir(ROOT)  # not the files' folder: the paths are the files' own
    cfg = load_config(str(c), ["model.depth=3"])
    # each layer wins over its base; the override wins over all
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.model.depth) == (5, 0.01, 3)
    assert cfg.model.embed_dim == load_config("quickstart").model.embed_dim


def test_base_defaults_starts_from_the_schema_defaults(tmp_path):
    path = _write(tmp_path / "d.yaml", "base: defaults\nmodel:\n  depth: 2\n")
    cfg = load_config(str(path))
    expected = Config()
    expected.model.depth = 2
    assert cfg == expected


def test_a_cycle_of_bases_is_refused_naming_the_chain(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: ./a.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "a.yaml"))
    assert str(e.value) == (
        f"config bases form a cycle: {tmp_path}/a.yaml -> {tmp_path}/b.yaml -> {tmp_path}/a.yaml"
    )
    self_loop = _write(tmp_path / "s.yaml", "base: s.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(self_loop))


def test_a_partial_file_without_base_is_refused_and_says_what_to_add(tmp_path, capsys):
    path = _write(tmp_path / "three.yaml", "train:\n  max_steps: 5\n  batch_size: 32\n")
    with pytest.raises(ConfigError, match=r"sets 2 of \d+ keys and names no base: .*base: quickst"):
        load_config(str(path))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'base: defaults'" in err
    # a typo is still reported as a typo, naming the file
    typo = _write(tmp_path / "typo.yaml", "base: quickstart\ntrain:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown .*'train.max_steps'"):
        load_config(str(typo))


def test_a_complete_file_without_base_loads_as_it_is(tmp_path):
    cfg = load_config("fmnist", ["train.max_steps=9"])
    path = _write(tmp_path / "config.yaml", dump_yaml(cfg))  # what a run dir holds
    assert "base" not in yaml.safe_load(path.read_text())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("base", ["nonesuch", "missing.yaml", "", "[1, 2]"])
def test_a_base_that_names_nothing_is_refused(tmp_path, base):
    path = _write(tmp_path / "x.yaml", f"base: {base}\n")
    with pytest.raises(ConfigError, match="preset|not found|base must name"):
        load_config(str(path))


def test_every_preset_names_its_base():
    for name in preset_names():
        text = (ROOT / "src/hjepa/configs" / f"{name}.yaml").read_text()
        assert yaml.safe_load(text)["base"] == "defaults", name


def test_print_config_prints_the_resolved_yaml_and_creates_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    base = _write(tmp_path / "b.yaml", "base: quickstart\noptim:\n  lr: 0.003\n")
    # data.root points nowhere: reading data would fail, so exit 0 shows none was read
    args = ["--config", str(base), f"run.dir={run}", "data.root=/nonexistent", "train.seed=4"]
    assert main(["train", *args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not run.exists()
    expected = load_config(str(base), [f"run.dir={run}", "data.root=/nonexistent", "train.seed=4"])
    assert printed == dump_yaml(expected)
    resolved = _write(tmp_path / "resolved.yaml", printed)  # complete: loads without a base
    assert load_config(str(resolved)) == expected
    # an invalid config is still refused, not printed
    assert main(["train", "--print-config", "train.log_every=0"]) == 2
    assert capsys.readouterr().out == ""


def test_config_list_has_one_row_per_key_with_its_type_default_and_bounds(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "bounds", "description"]
    assert [line.split()[0] for line in lines[1:]] == list(SCHEMA)
    by_key = {line.split()[0]: line for line in lines[1:]}
    assert by_key["train.log_every"].split()[1:5] == ["int", "20", ">=", "1"]
    assert "constant|gentle|geometric" in by_key["masking.scale_mode"]
    assert by_key["optim.lr"].endswith(SCHEMA["optim.lr"].help)


def test_docs_config_md_is_the_generated_table():
    # after a schema change: python -m hjepa config --markdown > docs/config.md
    assert (ROOT / "docs/config.md").read_text() == config_table.markdown()
    rows = [line for line in config_table.markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(SCHEMA)
    assert "| `loss.regularizer` | `none`, `sigreg`, `vicreg`, `sigreg+vicreg` | `none` |" in (
        config_table.markdown()
    )


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path, capsys):
    twice = _write(
        tmp_path / "twice.yaml",
        "base: quickstart\ntrain:\n  max_steps: 5\nmodel:\n  depth: 2\ntrain:\n  seed: 3\n",
    )
    # PyYAML alone keeps the second train: section and drops max_steps without a word.
    assert main(["train", "--config", str(twice), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{twice}:6:1" in err
    assert "key 'train' appears twice (lines 2 and 6): merge them into one" in err
    _write(twice, "base: quickstart\ntrain:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match="key 'seed' appears twice"):
        load_config(str(twice))
    with pytest.raises(ConfigError, match="appears twice"):
        load_config("quickstart", ["data.augment={mixup: 0.1, mixup: 0.2}"])


def test_a_token_grid_past_the_supported_size_is_refused_at_once():
    def too_slow(signum, frame):
        raise TimeoutError("validating the config took over 30 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(30)  # the mask checks used to run for minutes on a 25000x25000 grid
    try:
        with pytest.raises(ConfigError, match=r"25000x25000 token grid, past the 256x256"):
            load_config("quickstart", ["data.image_size=100000"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert load_config("quickstart", ["data.image_size=1024"]).data.image_size == 1024  # 256
