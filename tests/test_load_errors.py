"""Loading and calling a trained encoder: input outside what it was trained on is refused, and
every checkpoint error names its real cause (no GPU, a truncated file, the shapes that differ)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hjepa
from hjepa import checkpoint as ckpt
from hjepa.cli import main
from hjepa.config import load_config
from hjepa.train.trainer import Trainer, train
from tests.conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("load") / "run"
    train(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=1"]))
    return run


def test_features_refuse_floats_outside_0_1_and_non_finite_values(run):
    encoder = hjepa.load_encoder(run)
    images = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\].*got values in \[\S+, 2\d\d\S*\].*uint8"):
        encoder.features(images * 255)  # 0-255 floats: the usual slip
    with pytest.raises(ValueError, match=r"\[0, 1\].*got values in \[-0\.5, -0\.5\]"):
        encoder.tokens(torch.full((1, 1, 32, 32), -0.5))
    broken = images.clone()
    broken[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encoder.features(broken)
    # The range's ends, and uint8 (the path named in the message), give the same features.
    u8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        assert torch.equal(encoder.features(u8), encoder.features(u8.float() / 255))
        encoder.features(torch.zeros(1, 1, 32, 32)), encoder.features(torch.ones(1, 1, 32, 32))


def test_a_gpu_map_location_without_a_gpu_says_so(run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for path in (run, run / "checkpoints" / "last.pt"):
        with pytest.raises(ValueError, match="no CUDA GPU is visible") as caught:
            hjepa.load_encoder(path, map_location="cuda")
        message = str(caught.value)
        assert "map_location='cpu'" in message and "unreadable" not in message
        assert "move it aside" not in message  # the checkpoint is fine


def test_a_truncated_checkpoint_names_the_byte_it_ends_at(run, tmp_path):
    data = (run / "checkpoints" / "last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load_checkpoint(cut)
    message = str(caught.value)
    assert f"is truncated at byte {len(data) // 2} of a zip archive" in message
    assert message.endswith("or start a new run.dir") and "likelihood" not in message
    # Other damage: the cause's whole first sentence, never cut off inside it.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"x" * 100)
    with pytest.raises(ckpt.CheckpointError, match=r"\(.*\.\); move it aside"):
        ckpt.load_checkpoint(junk)


def test_an_architecture_mismatch_names_the_shapes(run, tmp_path, capsys):
    other = tmp_path / "other"
    train(load_config(None, [*TINY, f"run.dir={other}", "train.max_steps=1", "model.embed_dim=64"]))
    # Weights of the wide run under the narrow run's config.
    state = ckpt.load_checkpoint(other / "checkpoints" / "last.pt")
    state["config"] = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["config"]
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"saved \[[\d, ]*64\] vs model \[[\d, ]*32\]"):
        hjepa.load_encoder(tmp_path / "mixed.pt")
    # hjepa eval --checkpoint of another architecture: one line with the shapes.
    cheap = ["eval.low_shot=false", "eval.robustness=false", "eval.baselines=false"]
    capsys.readouterr()  # the training runs' own lines
    assert main(["eval", str(run), "--checkpoint", str(other / "checkpoints/last.pt"), *cheap]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "saved [" in err and "] vs model [" in err
    # A resume whose checkpoint does not fit the model names them too.
    cfg = load_config(None, [*TINY, f"run.dir={tmp_path / 'swap'}", "train.max_steps=2"])
    (tmp_path / "swap" / "checkpoints").mkdir(parents=True)
    torch.save({**state, "config": cfg.to_dict()}, tmp_path / "swap" / "checkpoints" / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"context_encoder: .*saved \[.*\] vs model"):
        Trainer(cfg).fit()
