"""The Python API (hjepa.load_encoder), hjepa extract, --checkpoint and the run-dir records."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import hjepa
from hjepa import checkpoint as ckpt
from hjepa.cli import main
from hjepa.config import load_config
from hjepa.data.datasets import dataset_from_config
from hjepa.data.normalize import STATS, channel_stats, to_input
from hjepa.encoder import Encoder
from hjepa.eval.features import iter_batches, run_features
from hjepa.export import export_run
from hjepa.models.hjepa import build_encoder, level_features
from hjepa.models.vit import VisionTransformer
from hjepa.train.trainer import train
from tests.conftest import TINY

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BATCH = 64  # TINY's eval.batch_size: the batches eval and extract use
# Four steps, checkpoints at 2 and 4 both kept: two different sets of weights in one run.
RUN_ARGS = ["train.max_steps=4", "run.checkpoint_every=2", "run.keep_every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("api") / "run"
    train(load_config(None, [*TINY, f"run.dir={run}", *RUN_ARGS]))
    return run


@pytest.fixture(scope="module")
def held_out(run):
    return dataset_from_config(load_config(None, [*TINY, f"run.dir={run}"]), "test")


def _uint8_images(held_out) -> torch.Tensor:
    return torch.cat([images for images, _ in iter_batches(held_out, BATCH)])


def _eval_features(run: Path, checkpoint: Path, held_out) -> dict[str, torch.Tensor]:
    """The features ``hjepa eval`` probes: its feature set-up with the run's own config."""
    cfg = load_config(None, [*TINY, f"run.dir={run}"])
    vit = build_encoder(cfg.model, cfg.data.image_size, cfg.data.channels)
    vit.load_state_dict(ckpt.load_checkpoint(checkpoint)["target_encoder"])
    mean, std = channel_stats(cfg.data.name, cfg.data.channels)
    assert cfg.eval.batch_size == BATCH
    return run_features(vit, held_out, cfg, mean, std, "cpu")[0]


def _batched(encoder: Encoder, images: torch.Tensor, level: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder.features(x, level) for x in images.split(BATCH)])


def test_three_load_paths_give_eval_features_exactly(run, held_out, tmp_path):
    weights = tmp_path / "share" / "enc.safetensors"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    last = run / "checkpoints" / "last.pt"
    encoders = {
        "run dir": hjepa.load_encoder(run),
        "checkpoint": hjepa.load_encoder(last),
        "safetensors": hjepa.load_encoder(weights),
        "card": hjepa.load_encoder(weights.with_suffix(".json")),
    }
    reference = _eval_features(run, last, held_out)
    assert set(reference) == {"level0", "level1", "level2", "concat"}
    u8 = _uint8_images(held_out)
    unit = u8.float() / 255.0  # what a user hands over: [0, 1], not normalised
    for name, encoder in encoders.items():
        assert isinstance(encoder, torch.nn.Module) and not encoder.training, name
        assert encoder.feature_names == ["level0", "level1", "level2", "concat"]
        assert encoder.step == 4
        for level, expected in reference.items():
            assert torch.equal(_batched(encoder, unit, level), expected), (name, level)
            assert torch.equal(_batched(encoder, u8, level), expected), (name, level)
    # Normalised images are not what it takes (the normalisation is inside): refused.
    mean, std = channel_stats("synthetic", 1)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], got values in"):
        _batched(encoders["run dir"], (unit - mean) / std, "concat")


def test_tokens_and_levels(run, held_out):
    encoder = hjepa.load_encoder(run)
    u8 = _uint8_images(held_out)[:5]
    mean, std = channel_stats("synthetic", 1)
    assert torch.equal(encoder.mean.flatten(), torch.tensor(STATS["synthetic"][0]))
    with torch.no_grad():
        tokens = encoder.tokens(u8.float() / 255.0)
        assert tokens.shape == (5, (32 // 4) ** 2, 32)
        assert torch.equal(tokens, encoder.backbone(to_input(u8, mean, std, 32)))
        levels = level_features(tokens, 8, 3)
        assert torch.equal(encoder.features(u8, "level0"), levels[0].mean(1))
        assert torch.equal(encoder.features(u8, "level2"), levels[2].mean(1))
        concat = encoder(u8)
        assert concat.shape == (5, 3 * 32) and encoder.feature_dim() == 96
        assert torch.equal(concat, torch.cat([lv.mean(1) for lv in levels], dim=1))
        # Another input size is resized to the encoder's, as eval does.
        big = torch.nn.functional.interpolate(u8.float() / 255, size=(48, 48))
        assert encoder.features(big).shape == (5, 96)
    with pytest.raises(ValueError, match="level0, level1, level2, concat"):
        encoder.features(u8, "level3")
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        encoder.features(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="float in"):
        encoder.features(torch.ones(2, 1, 32, 32, dtype=torch.int64))


def test_one_level_model_concat_is_level0():
    vit = VisionTransformer(16, 4, 1, 16, 1, 2).eval()
    mean, std = channel_stats("synthetic", 1)
    encoder = Encoder(vit, levels=1, mean=mean, std=std, image_size=16)
    images = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder.features(images), encoder.features(images, "level0"))
    assert encoder.feature_names == ["level0", "concat"] and encoder.feature_dim() == 16


def test_exported_card_describes_the_encoder(run, tmp_path):
    weights = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["levels"] == 3
    assert card["data"] == {"name": "synthetic", "channels": 1, "image_size": 32}
    arch = card["architecture"]
    assert (arch["patch_size"], arch["embed_dim"], arch["depth"], arch["tokens"]) == (4, 32, 2, 64)
    assert card["feature_dims"] == {"level0": 32, "level1": 32, "level2": 32, "concat": 96}
    assert card["normalize"] == {"mean": [0.5], "std": [0.25]}


def test_extract_writes_the_features_and_labels(run, held_out, tmp_path, capsys):
    out = tmp_path / "test.npz"
    assert main(["extract", str(run), "--split", "test", "--out", str(out)]) == 0
    assert "extract test" in capsys.readouterr().err  # the progress bar
    saved = np.load(out)
    assert set(saved.files) == {"features", "labels", "index"}  # in-memory data: no files
    np.testing.assert_array_equal(saved["index"], np.arange(len(held_out)))
    assert saved["features"].dtype == np.float32 and saved["labels"].dtype == np.int64
    reference = _eval_features(run, run / "checkpoints" / "last.pt", held_out)
    np.testing.assert_array_equal(saved["features"], reference["concat"].numpy())
    labels = torch.cat([y for _, y in iter_batches(held_out, BATCH)])
    np.testing.assert_array_equal(saved["labels"], labels.numpy())
    assert saved["features"].shape == (len(held_out), 96)

    one = tmp_path / "level1.npz"
    assert main(["extract", str(run), "--split", "train", "--out", str(one), "--level",
                 "level1", "--no-progress"]) == 0  # fmt: skip
    train_set = dataset_from_config(load_config(None, [*TINY, f"run.dir={run}"]), "train")
    assert np.load(one)["features"].shape == (len(train_set), 32)


def test_extract_data_overrides_and_refusals(run, tmp_path, capsys):
    out = tmp_path / "other.npz"
    # Another dataset: the synthetic generator with another size.
    args = ["extract", str(run), "--split", "test", "--out", str(out), "--no-progress"]
    assert main([*args, "data.synthetic_size=40"]) == 0
    n_default = len(dataset_from_config(load_config(None, [*TINY, f"run.dir={run}"]), "test"))
    cfg = load_config(None, [*TINY, f"run.dir={run}", "data.synthetic_size=40"])
    assert np.load(out)["features"].shape[0] == len(dataset_from_config(cfg, "test"))
    assert len(dataset_from_config(cfg, "test")) != n_default
    capsys.readouterr()
    assert main([*args, "model.depth=3"]) == 2
    assert "model.depth" in capsys.readouterr().err
    assert main([*args, "--level", "level9"]) == 2
    assert "level0, level1, level2, concat" in capsys.readouterr().err
    assert main([*args[:-3], "--out", str(tmp_path / "x.npy")]) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_checkpoint_flag_picks_the_named_checkpoint(run, held_out, tmp_path, capsys):
    step2 = run / "checkpoints" / "step_00000002.pt"
    assert step2.is_file()
    u8 = _uint8_images(held_out)
    # extract
    out = tmp_path / "s2.npz"
    assert main(["extract", str(run), "--split", "test", "--out", str(out), "--no-progress",
                 "--checkpoint", str(step2)]) == 0  # fmt: skip
    expected = _eval_features(run, step2, held_out)["concat"]
    np.testing.assert_array_equal(np.load(out)["features"], expected.numpy())
    assert not torch.equal(expected, _eval_features(run, run / "checkpoints/last.pt", held_out)[
        "concat"])  # fmt: skip
    # export
    weights = tmp_path / "s2.safetensors"
    assert main(["export", str(run), "--out", str(weights), "--checkpoint", str(step2)]) == 0
    assert json.loads(weights.with_suffix(".json").read_text())["step"] == 2
    assert torch.equal(_batched(hjepa.load_encoder(weights), u8, "concat"), expected)
    # eval
    cheap = ["eval.low_shot=false", "eval.robustness=false", "eval.baselines=false"]
    assert main(["eval", str(run), "--checkpoint", str(step2), *cheap]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 2 and report["checkpoint"] == str(step2)
    assert main(["eval", str(run), *cheap]) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 4
    # viz: the PCA picture of other weights differs; naming last.pt gives the default's bytes
    pictures = {}
    for name, extra in {
        "default": [],
        "last": ["--checkpoint", str(run / "checkpoints/last.pt")],
        "step2": ["--checkpoint", str(step2)],
    }.items():
        assert main(["viz", str(run), "--only", "pca", *extra]) == 0
        pictures[name] = (run / "viz" / "pca.png").read_bytes()
    assert pictures["default"] == pictures["last"] != pictures["step2"]
    # a missing file, and a checkpoint of another architecture, are one-line errors
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", str(tmp_path / "nope.pt"), *cheap]) == 2
    assert "nope.pt is not a file" in capsys.readouterr().err
    other = tmp_path / "other"
    train(load_config(None, [*TINY, f"run.dir={other}", "train.max_steps=1", "model.depth=1"]))
    assert main(["eval", str(run), "--checkpoint", str(other / "checkpoints/last.pt")]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_version_and_a_light_import(capsys):
    assert hjepa.__version__ == metadata.version("hjepa")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hjepa {hjepa.__version__}"
    src = str(Path(hjepa.__file__).parents[1])
    code = "import sys, hjepa; assert 'torch' not in sys.modules; print(hjepa.load_encoder)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": src}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "function load_encoder" in done.stdout


def test_the_documented_example_runs(run, tmp_path, monkeypatch, capsys):
    """The Python example of docs/api.md (the README's), verbatim, on a tiny run."""
    example = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(run)
    exec(compile(example, str(DOCS), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip() == "torch.Size([8, 64, 32]) torch.Size([8, 96]) torch.Size([8, 32])"


def test_conv_stem_encoder_loads_the_same_from_every_path(tmp_path, held_out):
    run = tmp_path / "conv"
    train(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=1", "model.stem=conv"]))
    weights, _ = export_run(run)
    last = run / "checkpoints" / "last.pt"
    u8 = _uint8_images(held_out)
    cfg = load_config(None, [*TINY, f"run.dir={run}", "model.stem=conv"])
    vit = build_encoder(cfg.model, 32, 1)
    vit.load_state_dict(ckpt.load_checkpoint(last)["target_encoder"])
    mean, std = channel_stats("synthetic", 1)
    expected = run_features(vit, held_out, cfg, mean, std, "cpu")[0]["concat"]
    for source in (run, last, weights):
        encoder = hjepa.load_encoder(source)
        assert encoder.channels == 1
        assert torch.equal(_batched(encoder, u8.float() / 255, "concat"), expected), source
