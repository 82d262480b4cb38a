"""hjepa eval's extra parts: low-shot, robustness, transfer, switches, report; determinism."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from PIL import Image

from hjepa.checkpoint import load_checkpoint
from hjepa.cli import main
from hjepa.config import ConfigError, load_config
from hjepa.data.datasets import dataset_from_config
from hjepa.data.normalize import channel_stats
from hjepa.data.tensors import ImageTensors
from hjepa.eval.attentive import fit_attentive_probe
from hjepa.eval.corruptions import CORRUPTIONS
from hjepa.eval.features import encoder_features, pixel_features, pixel_tokens
from hjepa.eval.linear import fit_linear_classifier, linear_probe
from hjepa.eval.robustness_probe import accuracy_table, corrupt_dataset, materialize
from hjepa.eval.runner import evaluate_run, format_table, load_run_config, probe
from hjepa.eval.transfer import digits_split, match_channels
from hjepa.experiments.report import eval_markdown
from hjepa.models.hjepa import build_encoder
from hjepa.train.trainer import Trainer, train
from tests.conftest import TINY

CHEAP = ["eval.low_shot=false", "eval.robustness=false", "eval.baselines=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_suite") / "run"
    train(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=2"]))
    return run


def clusters(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    feats = 3.0 * torch.eye(3, 5)[labels] + torch.randn(n, 5, generator=g)
    return feats, labels


def without_timing(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "seconds"}


def test_fitted_classifier_reproduces_linear_probe_exactly():
    (xtr, ytr), (xte, yte) = clusters(90, 0), clusters(60, 1)
    grid = (1e-3, 1e-1)
    clf = fit_linear_classifier(xtr, ytr, 3, seed=4, weight_decays=grid)
    ref = linear_probe(xtr, ytr, xte, yte, 3, seed=4, weight_decays=grid)
    assert clf.accuracy(xte, yte) == ref["accuracy"]
    assert clf.weight_decay == ref["weight_decay"] and clf.val_accuracy == ref["val_accuracy"]
    assert clf.accuracy(xte, yte) > 0.8
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        clf.accuracy(xte[:, :4], yte)


def test_same_checkpoint_gives_identical_numbers_twice(tiny_run):
    overrides = [
        "eval.baselines=false",
        "eval.linear=false",  # low-shot and robustness still fit linear probes
        "eval.low_shot_fractions=[0.1]",
        "eval.low_shot_seeds=[0,1]",
        "eval.robustness_limit=12",
    ]
    first = evaluate_run(tiny_run, overrides=overrides)
    second = evaluate_run(tiny_run, overrides=overrides)
    assert without_timing(first) == without_timing(second)
    assert json.loads((tiny_run / "eval.json").read_text())["low_shot"] == second["low_shot"]

    low = first["low_shot"]
    assert low["features"] == "concat" and set(low["trained"]) == {"0.1"}
    stats = low["trained"]["0.1"]
    assert len(stats["per_seed"]) == 2
    assert stats["mean"] == pytest.approx(statistics.fmean(stats["per_seed"]))
    assert stats["std"] == pytest.approx(statistics.stdev(stats["per_seed"]))

    rob = first["robustness"]
    assert rob["images"] == 12 and rob["features"] == "concat"
    for model in ("encoder", "pixels"):
        assert set(rob["accuracy"][model]) == set(CORRUPTIONS)
        assert all(set(t) == {"1", "2", "3", "4", "5"} for t in rob["accuracy"][model].values())
    for name in CORRUPTIONS:  # CE by hand from the stored tables
        enc = sum(1 - a for a in rob["accuracy"]["encoder"][name].values())
        pix = sum(1 - a for a in rob["accuracy"]["pixels"][name].values())
        assert rob["ce"][name] == pytest.approx(enc / pix)
    assert rob["mce"] == pytest.approx(statistics.fmean(rob["ce"].values()))


def test_every_eval_switch_changes_the_output(tiny_run):
    off = evaluate_run(tiny_run, overrides=CHEAP)
    assert not {"low_shot", "robustness", "random_init", "pixels", "transfer"} & off.keys()
    on = evaluate_run(
        tiny_run,
        overrides=[
            "eval.baselines=true",
            "eval.linear=false",
            "eval.low_shot_fractions=[0.2]",
            "eval.low_shot_seeds=[3]",
            "eval.robustness_limit=8",
        ],
    )
    assert {"low_shot", "robustness", "random_init", "pixels"} <= on.keys()
    assert "linear" not in on["trained"]["concat"]  # eval.linear=false
    assert set(on["low_shot"]["pixels"]) == {"0.2"}  # baselines add the pixel low-shot
    assert on["low_shot"]["trained"]["0.2"]["std"] == 0.0  # one seed
    assert on["robustness"]["images"] == 8


def test_eval_overrides_must_be_eval_keys(tiny_run):
    with pytest.raises(ConfigError, match="only eval"):
        load_run_config(tiny_run, ["model.depth=3"])
    with pytest.raises(ConfigError, match="transfer"):
        load_run_config(tiny_run, ["eval.transfer=[mnist]"])
    assert load_run_config(tiny_run, ["eval.robustness_limit=5"]).eval.robustness_limit == 5


def test_robustness_pieces_are_deterministic_and_consistent():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 12, 12), generator=g, dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(20) % 2)
    clean = materialize(data, 10)
    assert len(clean) == 10 and torch.equal(materialize(data, 10).images, clean.images)
    assert torch.equal(materialize(data, 0).images, images)
    noisy = corrupt_dataset(clean, "gaussian_noise", 3)
    assert torch.equal(noisy.images, corrupt_dataset(clean, "gaussian_noise", 3).images)
    assert not torch.equal(noisy.images, clean.images) and torch.equal(noisy.labels, clean.labels)

    def featurize(ds):
        return ds.images.flatten(1).float()

    clf = fit_linear_classifier(featurize(data), data.labels, 2)
    clean_acc, table = accuracy_table(
        {"a": featurize}, {"a": clf}, clean, corruptions=("gaussian_noise", "contrast")
    )
    assert clean_acc["a"] == clf.accuracy(featurize(clean), clean.labels)
    contrast4 = corrupt_dataset(clean, "contrast", 4)
    assert table["a"]["contrast"][4] == clf.accuracy(featurize(contrast4), clean.labels)
    assert set(table["a"]) == {"gaussian_noise", "contrast"}


def test_digits_split_is_fixed_stratified_and_scaled():
    train_set, test_set = digits_split("train"), digits_split("test")
    assert len(train_set) + len(test_set) == 1797
    assert train_set.images.shape[1:] == (1, 8, 8) and train_set.images.dtype == torch.uint8
    assert int(train_set.images.max()) == 255  # 16 grey levels scaled to the full range
    counts = torch.bincount(test_set.labels, minlength=10).float()
    totals = counts + torch.bincount(train_set.labels, minlength=10).float()
    assert torch.allclose(counts / totals, torch.full((10,), 0.3), atol=0.01)
    assert torch.equal(digits_split("test").images, test_set.images)
    rgb = match_channels(test_set, 3)
    assert rgb.images.shape[1] == 3 and torch.equal(rgb.images[:, 2], test_set.images[:, 0])


def test_transfer_to_digits_end_to_end(tiny_run):
    results = evaluate_run(tiny_run, overrides=[*CHEAP, "eval.transfer=[digits]"])
    entry = results["transfer"]["digits"]
    assert entry["train_images"] + entry["test_images"] == 1797
    assert set(entry["trained"]) == {"level0", "level1", "level2", "concat"}
    # Each entry is the probe of the checkpoint's target encoder on the fixed digits split.
    cfg = load_run_config(tiny_run)
    encoder = Trainer(cfg).model.target_encoder
    encoder.load_state_dict(load_checkpoint(tiny_run / "checkpoints/last.pt")["target_encoder"])
    kw = dict(levels=3, image_size=cfg.data.image_size, batch_size=cfg.eval.batch_size)
    mean, std = channel_stats(cfg.data.name, cfg.data.channels)
    train_feats, train_labels = encoder_features(
        encoder, digits_split("train"), mean=mean, std=std, **kw
    )
    test_feats, test_labels = encoder_features(
        encoder, digits_split("test"), mean=mean, std=std, **kw
    )
    for name, accs in entry["trained"].items():
        expected, _ = probe(
            (train_feats[name], train_labels), (test_feats[name], test_labels), 10, cfg
        )
        assert accs == expected, name
    # Even a barely trained encoder's features separate digits far above chance (0.1).
    assert entry["trained"]["concat"]["linear"] > 0.5


def make_image_folder(root, per_class: int = 4):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = 40 + 160 * c
                noise = torch.randint(0, 40, (20, 20), generator=g)
                Image.fromarray((base + noise).to(torch.uint8).numpy()).save(folder / f"{i}.png")


def test_cli_eval_transfer_to_an_image_folder_writes_report(tiny_run, tmp_path, capsys):
    make_image_folder(tmp_path / "folder")
    args = ["eval", str(tiny_run), "--no-low-shot", "--no-robustness", "--no-baselines"]
    args.append("eval.knn_k=3")  # also an eval.* override through the CLI
    assert main([*args, "--transfer", f"image_folder:{tmp_path / 'folder'}"]) == 0
    out = capsys.readouterr().out
    assert "transfer image_folder:folder trained concat" in out
    results = json.loads((tiny_run / "eval.json").read_text())
    entry = results["transfer"]["image_folder:folder"]
    assert entry["train_images"] == 8 and entry["test_images"] == 8
    assert results["eval"]["knn_k"] == 3
    assert entry["trained"]["concat"]["knn"] == 1.0  # dark vs light is trivially separable
    report = (tiny_run / "report.md").read_text()
    assert "## Transfer" in report and "| image_folder:folder | trained | concat |" in report
    assert "![Training curves](viz/curves.png)" in report
    assert (tiny_run / "viz" / "curves.png").stat().st_size > 0


def test_attentive_section_probes_the_three_encoders_through_one_probe(tiny_run):
    overrides = [*CHEAP, "eval.baselines=true", "eval.cache=false", "eval.attentive_epochs=2"]
    results = evaluate_run(tiny_run, overrides=overrides)
    att = results["attentive"]
    assert set(att) == {"trained", "random_init", "pixels"}
    levels = {"level0", "level1", "level2", "concat"}
    assert set(att["trained"]) == set(att["random_init"]) == levels
    assert set(att["pixels"]) == {"pixels"}
    assert "attentive trained concat" in format_table(results)
    row = f"| concat | {att['trained']['concat']['accuracy']:.4f} | "
    assert row + f"{att['random_init']['concat']['accuracy']:.4f} |" in eval_markdown(results, {})
    # Each entry is the probe of those very tokens: the checkpoint's (and the initial) level
    # tokens, concat being all levels with one pooler each, and the pixel patches with their
    # positions. The validation loss of the chosen probe differs with any bit of its tokens.
    cfg = load_run_config(tiny_run)
    torch.manual_seed(cfg.train.seed)
    encoder = build_encoder(cfg.model, 32, 1)
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    mean, std = channel_stats(cfg.data.name, cfg.data.channels)
    splits = [dataset_from_config(cfg, split) for split in ("train", "test")]
    probe_kw = dict(seed=0, epochs=2, width=32, num_heads=2)
    probe_kw["num_classes"] = splits[0].num_classes

    def probe_of(state, group, name, sets):
        encoder.load_state_dict(state)
        kw = dict(levels=3, image_size=32, batch_size=64, mean=mean, std=std)
        tokens = ({}, {})
        labels = [
            encoder_features(encoder, s, **kw, level_tokens=t)[1] for s, t in zip(splits, tokens)
        ]
        chosen = [[t[f"level{lvl}"] for lvl in sets] for t in tokens]
        expected = fit_attentive_probe(chosen[0], labels[0], chosen[1], labels[1], **probe_kw)
        assert att[group][name] == expected.as_dict(), (group, name)
        return labels

    trained = load_checkpoint(tiny_run / "checkpoints/last.pt")["target_encoder"]
    labels = probe_of(trained, "trained", "concat", range(3))
    probe_of(initial, "random_init", "level0", [0])
    pixels = [pixel_features(s, mean=mean, std=std, image_size=32)[0] for s in splits]
    patches = [pixel_tokens(p, 1, 4) for p in pixels]
    expected = fit_attentive_probe(patches[0], labels[0], patches[1], labels[1], **probe_kw)
    assert att["pixels"]["pixels"] == expected.as_dict()
    assert att["random_init"]["level0"]["val_loss"] != att["trained"]["level0"]["val_loss"]
    assert "attentive" not in evaluate_run(tiny_run, overrides=[*CHEAP, "eval.attentive=false"])
