"""hjepa eval: one feature pass per encoder and split, an inference path that changes no bit,
linear fits on one thread each (the same numbers whatever the core count), side by side."""

from __future__ import annotations

import pytest
import torch

from hjepa.config import load_config
from hjepa.data.datasets import dataset_from_config
from hjepa.data.normalize import channel_stats, to_input
from hjepa.data.tensors import ImageTensors
from hjepa.eval.features import encoder_features, pooled_features
from hjepa.eval.runner import evaluate_run
from hjepa.models.hjepa import build_encoder
from hjepa.models.vit import VisionTransformer
from hjepa.train.trainer import train
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_passes") / "run"
    train(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=2"]))
    return run


def test_one_feature_pass_per_encoder_serves_every_probe(tiny_run, monkeypatch):
    """kNN, linear, low-shot and collapse all read one pass of each encoder over each split:
    the images through the encoder are (train + test) for the trained encoder and as many
    again for the random-init one, not once per probe."""
    seen = []
    forward = VisionTransformer.forward

    def counting(self, images, keep=None):
        seen.append(images.shape[0])
        return forward(self, images, keep)

    monkeypatch.setattr(VisionTransformer, "forward", counting)
    results = evaluate_run(
        tiny_run,
        overrides=[
            "eval.baselines=true",
            "eval.cache=false",
            "eval.robustness=false",
            "eval.low_shot_fractions=[0.2,0.5]",
            "eval.low_shot_seeds=[0,1]",
        ],
    )
    assert "low_shot" in results and "linear" in results["trained"]["concat"]
    cfg = load_config(None, TINY)
    train_set, test_set = (dataset_from_config(cfg, split) for split in ("train", "test"))
    assert len(train_set) > 0 and len(test_set) > 0
    assert sum(seen) == 2 * (len(train_set) + len(test_set))


def test_inference_path_gives_the_plain_forward_bit_for_bit():
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, "model.levels=2"])
    encoder = build_encoder(cfg.model, 32, 1).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (37, 1, 32, 32), dtype=torch.uint8, generator=g)
    data = ImageTensors(images, torch.arange(37) % 3, 3)
    mean, std = channel_stats("synthetic", 1)
    feats, labels = encoder_features(
        encoder, data, levels=2, mean=mean, std=std, image_size=32, batch_size=16
    )
    with torch.no_grad():  # the reference: one batch, autograd's no_grad, nothing else
        ref = pooled_features(encoder(to_input(images, mean, std, 32)), encoder.grid_size, 2)
    assert set(feats) == {"level0", "level1", "concat"}
    for name in feats:
        assert torch.equal(feats[name], ref[name])
        assert not feats[name].is_inference()  # the probes fit on them with autograd
    assert torch.equal(labels, torch.arange(37) % 3)


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    feats = torch.randn(n, 32, generator=g) + 0.5 * torch.randn(5, 32, generator=g)[labels]
    return feats, labels


def test_linear_fit_is_the_same_whatever_the_callers_thread_count():
    """L-BFGS at its iteration cap turns another reduction order into other weights (on this
    very problem, a fit on 2 threads differs from one on 1); the probe pins its fits to one
    thread, so the weights are bit-identical whatever the caller runs on."""
    from hjepa.eval.linear import fit_linear_classifier

    feats, labels = _task(4000, 0)
    threads = torch.get_num_threads()
    fits = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fits.append(fit_linear_classifier(feats, labels, 5, weight_decays=(1e-5,)))
            assert torch.get_num_threads() == n  # restored after the fit
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fits[0].weight, fits[1].weight)
    assert torch.equal(fits[0].bias, fits[1].bias)


def test_fits_side_by_side_equal_the_fits_one_after_the_other():
    from hjepa.eval.linear import fit_linear_classifier, run_side_by_side

    tasks = [_task(n, seed) for n, seed in ((3000, 1), (1500, 2), (2000, 3))]

    def fit(i):
        return fit_linear_classifier(*tasks[i], 5, weight_decays=(1e-4, 1e-2))

    threads = torch.get_num_threads()
    alone = [fit(i) for i in range(3)]
    together = run_side_by_side([lambda i=i: fit(i) for i in range(3)], workers=2)
    assert torch.get_num_threads() == threads
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert a.weight_decay == b.weight_decay and a.val_accuracy == b.val_accuracy
