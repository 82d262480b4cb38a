"""Bad input fails fast, in one line, before any compute: through the CLI for the cases a user
meets, and by property-based fuzzing of every config key."""

import collections
import json
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hjepa import config as config_module
from hjepa.cli import main
from hjepa.config import CHOICES, Config, ConfigError, get_value, load_config, valid_keys
from hjepa.train.logging import read_metrics
from hjepa.train.trainer import NonFiniteLossError, Trainer
from tests.conftest import TINY, tiny

# -- fake Fashion-MNIST files ------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data[: len(data) - truncate])


def _fmnist(root: Path, *, splits=("train", "test"), truncate_train: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = {"train": ("train", 64), "test": ("t10k", 16)}
    for split in splits:
        prefix, n = names[split]
        images = rng.integers(0, 256, (n, 28, 28))
        _idx(root / f"{prefix}-images-idx3-ubyte", images, truncate_train * (split == "train"))
        _idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def _no_data(root: Path) -> None:
    root.mkdir()


def _truncated(root: Path) -> None:
    _fmnist(root, truncate_train=100)


def _train_split_only(root: Path) -> None:
    _fmnist(root, splits=("train",))


FMNIST = ["data.name=fashion_mnist", "data.channels=1"]

BAD_INPUTS = [
    # (make data.root, overrides, what the one-line message must say)
    (_no_data, FMNIST, "train-images-idx3-ubyte(.gz) not found"),
    (_truncated, FMNIST, "the file is truncated or damaged"),
    (_train_split_only, FMNIST, "t10k-images-idx3-ubyte(.gz) not found"),
    (None, ["data.synthetic_size=8"], "lower train.batch_size"),
    (None, ["masking.min_context=64"], "masking.min_context=64 cannot be met on a 8x8"),
    (None, ["masking.min_context=65"], "masking.min_context=65 exceeds the 8x8=64 token grid"),
    (
        None,
        ["masking.target_scale=[0.5, 0.5]", "masking.context_scale=[0.6, 0.6]"]
        + ["masking.min_context=8"],
        "masks leave fewer than min_context=8 context tokens",
    ),
    (None, ["data.image_size=8"], "model.levels=3 is too deep for a 2x2 token grid"),
    (None, ["train.device=cpu", "train.precision=fp16"], "fp16 needs a GPU"),
    (None, ["optim.lr=.nan"], "optim.lr=nan must be a finite number"),
    (None, ["model.num_heads=0"], "model.num_heads=0 must be >= 1"),
    (None, ["train.nonfinite=ignore"], "train.nonfinite='ignore' is not one of: stop, skip"),
]


@pytest.mark.parametrize(("make_root", "overrides", "expected"), BAD_INPUTS)
def test_bad_input_fails_fast_in_one_line(tmp_path, capsys, make_root, overrides, expected):
    run, root = tmp_path / "run", tmp_path / "data"
    if make_root is not None:
        make_root(root)
        overrides = [*overrides, f"data.root={root}"]
    args = ["train", "--config", "quickstart", *tiny(*overrides), f"run.dir={run}"]
    args += ["train.max_steps=2"]
    args += overrides
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hjepa train: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (run / "checkpoints").exists() and read_metrics(run, "train") == []


class _RGBDataset(torch.utils.data.Dataset):
    """A custom dataset with no ``channels`` attribute, yielding 3-channel images."""

    def __init__(self, dtype=torch.uint8):
        self.dtype = dtype

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):
        return torch.zeros(3, 32, 32, dtype=self.dtype), 0


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (
            torch.uint8,
            r"torch.uint8 \(3, 32, 32\), but the model takes uint8 \[1, H, W\]: "
            r"set data.channels=3",
        ),
        (torch.float32, r"torch.float32 .*: make it return uint8 \[C, H, W\] tensors"),
    ],
)
def test_dataset_images_the_model_cannot_take_are_refused_at_start(
    tiny_config, monkeypatch, dtype, expected
):
    import hjepa.train.parts as parts_module  # where the trainer's data is built

    monkeypatch.setattr(parts_module, "dataset_from_config", lambda *a, **k: _RGBDataset(dtype))
    with pytest.raises(ValueError, match=expected):
        Trainer(tiny_config())


# -- property-based fuzzing of the whole config ------------------------------------------------

INTS = ["-7", "-1", "0", "1", "2", "3", "5", "8", "16", "64", "1.5", "abc", "[1, 2]", "", ".nan"]
FLOATS = ["-1.0", "0", "1e-6", "0.1", "0.5", "0.99", "1", "2.5", "1e6", ".nan", ".inf", "-.inf"]
FLOATS += ["abc", "[0.1]", "true"]
BOOLS = ["true", "false", "1", "maybe", ""]
STRINGS = ["", "bogus", "1", "/nonexistent/path", "imagenet100", "digits"]
FLOAT_LISTS = ["[0.1, 0.2]", "[0.5, 0.5]", "[0.2, 0.1]", "[]", "[0.1]", "[-1, 2]", "[0.0, 1.0]"]
FLOAT_LISTS += ["[.nan, 1]", "[1, 2, 3]", "0.5", "[0.9, 0.999]", "[0.15, 0.2, 0.25]"]
INT_LISTS = ["[0]", "[]", "[0, 1]", "[-1]", "[a]"]
STR_LISTS = ["[]", "[digits]", "[bogus]", "[image_folder:/nonexistent]", "digits"]
# Left out: where the run goes, and torch.compile (a minute of compilation on a CPU).
NOT_FUZZED = {"run.dir", "train.compile"}


def _key_type(key: str) -> typing.Any:
    node: typing.Any = Config()
    *parents, name = key.split(".")
    for part in parents:
        node = getattr(node, part)
    return typing.get_type_hints(type(node))[name]


def _plausible(key: str) -> list[str]:
    """The default and values near it (YAML text)."""
    default = get_value(Config(), key)
    if key in CHOICES:
        return list(CHOICES[key])
    if isinstance(default, bool):
        return ["true", "false"]
    if isinstance(default, int):
        return [str(default), str(default * 2), str(default // 2), str(default + 1)]
    if isinstance(default, float):
        return [repr(default), repr(default * 0.5), repr(default * 1.5)]
    return [json.dumps(default) if isinstance(default, list) else str(default)]


def _implausible(key: str) -> list[str]:
    """Values of the wrong type, out of range, non-finite or absurd (YAML text)."""
    tp = _key_type(key)
    if key in CHOICES:
        return ["bogus", "", "1"]
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return {float: FLOAT_LISTS, int: INT_LISTS, str: STR_LISTS}[item]
    return {int: INTS, float: FLOATS, bool: BOOLS, str: STRINGS}[tp]


KEYS = [k for k in valid_keys() if k not in NOT_FUZZED]
# Half of the values near the default, half anything: most examples mix both kinds.
OVERRIDE = st.sampled_from(KEYS).flatmap(
    lambda k: st.tuples(
        st.just(k), st.sampled_from(_plausible(k)) | st.sampled_from(_implausible(k))
    )
)
OUTCOMES: collections.Counter = collections.Counter()


def _one_line(error: BaseException) -> None:
    text = str(error)
    assert text.strip() and "\n" not in text, f"{type(error).__name__}: {text!r}"


def _accept_or_refuse(overrides: list[tuple[str, str]]) -> None:
    """Validation + Trainer construction refuse the config cleanly, or it trains one step."""
    items = [f"{k}={v}" for k, v in overrides]
    # One optimizer step, unless the fuzzer picked the step limit itself.
    limit = [] if any(k == "train.stop_after" for k, _ in overrides) else ["train.stop_after=1"]
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = [*TINY, f"run.dir={tmp}/run", "train.max_steps=1"]
            cfg = load_config(None, [*base, *items, *limit])
        except ConfigError as e:
            _one_line(e)
            OUTCOMES["refused by validation"] += 1
            return
        try:
            trainer = Trainer(cfg)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            _one_line(e)
            OUTCOMES["refused by the trainer"] += 1
            return
        try:
            trainer.fit()
        except NonFiniteLossError as e:  # a clean stop, also one line
            _one_line(e)
            OUTCOMES["stopped"] += 1
            return
        finally:
            torch.set_num_threads(threads)  # train.threads is process-wide
        stop = cfg.train.stop_after or trainer.total_steps
        assert trainer.step == min(stop, trainer.total_steps)
        OUTCOMES["trained"] += 1


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
@example([("optim.lr", ".nan")])
@example([("train.threads", "-1")])
@example([("model.mlp_ratio", "0")])
@example([("model.patch_size", "0")])
@example([("run.checkpoint_every", "0")])
@example([("optim.betas", "[2.0, 0.5]")])
@example([("model.depth", "-1")])
@example([("masking.num_targets", "64")])
def _fuzz(overrides):
    _accept_or_refuse(overrides)


def test_random_config_overrides_are_accepted_and_train_or_refused_in_one_line():
    OUTCOMES.clear()
    _fuzz()
    assert OUTCOMES["trained"] > 0  # the property holds on both sides:
    assert OUTCOMES["refused by validation"] > 0  # some configs train, some are refused
    assert sum(OUTCOMES.values()) >= 30


def test_the_fuzzer_covers_every_key_type():
    # Each fuzzed key gets values of its own type, invalid ones included.
    for key in KEYS:
        assert _plausible(key) and len(_implausible(key)) >= 3, key
    assert set(KEYS) == set(valid_keys()) - NOT_FUZZED and "train.nonfinite" in KEYS
    assert config_module.MINIMUM.keys() <= set(valid_keys())
