import copy
import json
import math

import pytest
import torch

from hjepa import checkpoint as ckpt
from hjepa.cli import main
from hjepa.data.datasets import dataset_from_config
from hjepa.data.normalize import channel_stats
from hjepa.eval.collapse import collapse_report
from hjepa.eval.features import encoder_features
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.runner import load_run_config, probe
from hjepa.train.ema import ema_update
from hjepa.train.optim import param_groups
from hjepa.train.schedules import cosine, linear, warmup_cosine
from hjepa.train.trainer import Trainer
from tests.state import checkpoint_tensors


def test_schedules_against_hand_values():
    assert warmup_cosine(0, 100, 10, 0.1, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(5, 100, 10, 0.1, 1.0, 0.0) == pytest.approx(0.55)
    assert warmup_cosine(10, 100, 10, 0.1, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert linear(0, 4, 0.996, 1.0) == pytest.approx(0.996)
    assert linear(1, 4, 0.996, 1.0) == pytest.approx(0.997)
    assert linear(4, 4, 0.996, 1.0) == pytest.approx(1.0)


def test_ema_update_formula():
    target, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, a, b in zip(target.parameters(), t0, online.parameters()):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)


def test_ema_update_decided_on_the_device_rounds_as_the_scalar_update():
    """The trainer passes ``applied`` (no host read); the update must stay bit-identical to
    the scalar lerp (runs reproduce across the change) and be the identity when not applied."""
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    scalar, device = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)), None
    device = copy.deepcopy(scalar)
    ema_update(scalar, online, 0.996)
    ema_update(device, online, 0.996, applied=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(scalar.parameters(), device.parameters()))
    before = _snapshot(device)
    ema_update(device, online, 0.996, applied=torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in device.state_dict().items())


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups([model])
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("timing", ["after_step", "before_step"])
def test_ema_follows_the_weights_of_the_optimizer_step(tiny_config, timing):
    trainer = Trainer(
        tiny_config("train.ema_start=0.9", "train.ema_end=0.9", f"train.ema_timing={timing}")
    )
    model = trainer.model
    model.train()
    target0 = _snapshot(model.target_encoder)
    context0 = _snapshot(model.context_encoder)
    trainer.train_step(next(trainer.step_batches()))
    context1 = _snapshot(model.context_encoder)
    source = context1 if timing == "after_step" else context0
    moved = False
    for name, value in model.target_encoder.state_dict().items():
        torch.testing.assert_close(value, 0.9 * target0[name] + 0.1 * source[name])
        moved |= not torch.equal(context1[name], context0[name])
    assert moved  # the step changed the context encoder, so the two timings differ


def test_ema_once_per_optimizer_step_under_accumulation(tiny_config):
    trainer = Trainer(
        tiny_config("train.accum_steps=2", "train.ema_start=0.5", "train.ema_end=0.5")
    )
    trainer.model.train()
    target0 = _snapshot(trainer.model.target_encoder)
    micro_batches = next(trainer.step_batches())
    assert len(micro_batches) == 2
    trainer.train_step(micro_batches)
    assert trainer.step == 1
    context1 = _snapshot(trainer.model.context_encoder)
    for name, value in trainer.model.target_encoder.state_dict().items():
        torch.testing.assert_close(value, 0.5 * target0[name] + 0.5 * context1[name])


def _all_state(trainer):
    return checkpoint_tensors(trainer.state_dict())


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_config, tmp_path):
    common = [
        "train.max_steps=6",
        "train.accum_steps=2",
        "model.drop_path=0.1",
        "run.checkpoint_every=100",
    ]
    full = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'full'}"))
    full.fit()
    first = Trainer(tiny_config(*common, "train.stop_after=4", f"run.dir={tmp_path / 'part'}"))
    first.fit()
    assert first.step == 4
    resumed = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'part'}"))
    resumed.fit()
    assert resumed.step == 6
    a, b = _all_state(full), _all_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [
        r["step"]
        for r in map(json.loads, (tmp_path / "part/metrics.jsonl").open())
        if r["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_architecture(tiny_config, tmp_path):
    Trainer(tiny_config("train.max_steps=1")).fit()
    with pytest.raises(ValueError, match="different architecture"):
        Trainer(tiny_config("train.max_steps=2", "model.depth=3")).fit()


def test_checkpoint_contents_and_weights_only_load(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.max_steps=2"))
    trainer.fit()
    last = tmp_path / "run/checkpoints/last.pt"
    state = torch.load(last, weights_only=True)
    for key in ("context_encoder", "target_encoder", "predictor", "optimizer", "step", "config"):
        assert key in state
    assert state["step"] == 2
    assert not list(last.parent.glob("*.tmp"))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.atomic_save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        ckpt.atomic_save({"step": 2, "x": Boom()}, path)
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ckpt.CheckpointError, match="bad.pt"):
        ckpt.load_checkpoint(path)


def frozen_features(encoder, cfg, split: str):
    """Per-level features of a whole split, as ``hjepa eval`` and the online probe take them."""
    mean, std = channel_stats(cfg.data.name, cfg.data.channels)
    return encoder_features(
        encoder,
        dataset_from_config(cfg, split),
        levels=cfg.model.levels,
        mean=mean,
        std=std,
        image_size=cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
    )


def test_training_logs_metrics_and_probe(tiny_config, tmp_path):
    # Bank and query are the whole train (128) and test (32) splits, so the logged probe can
    # be recomputed here from the final target encoder without knowing the probe's subsets.
    trainer = Trainer(
        tiny_config(
            "train.max_steps=4",
            "train.knn_every=2",
            "train.knn_bank_size=0",
            "train.knn_query_size=0",
        )
    )
    last = trainer.fit()
    assert math.isfinite(last["loss"])
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").open()]
    probes = [r for r in records if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [2, 4]
    assert {"rank_level0", "std_level2", "knn_concat"} <= probes[-1].keys()
    # The step-4 probe is the kNN of the step-4 target encoder: train split as the bank, the
    # held-out test split as the queries, with eval.knn_k / knn_temperature.
    cfg = trainer.cfg
    bank, bank_labels = frozen_features(trainer.model.target_encoder, cfg, "train")
    query, query_labels = frozen_features(trainer.model.target_encoder, cfg, "test")
    assert query_labels.numel() == 32
    for name in ("level0", "level1", "level2", "concat"):
        expected = knn_accuracy(
            bank[name],
            bank_labels,
            query[name],
            query_labels,
            10,
            k=cfg.eval.knn_k,
            temperature=cfg.eval.knn_temperature,
        )
        assert probes[-1][f"knn_{name}"] == expected, name
    # Its collapse statistics describe the query features of the same encoder.
    report = collapse_report(query["level0"])
    assert probes[-1]["rank_level0"] == pytest.approx(report["effective_rank"])
    assert probes[-1]["std_level0"] == pytest.approx(report["normalized_embedding_std"])
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss_level0", "loss_level1", "loss_level2", "lr", "ema_momentum"} <= train[0].keys()
    assert train[0]["ema_momentum"] == pytest.approx(0.996)


def test_cli_train_then_eval(tiny_config, tmp_path, capsys):
    from tests.conftest import TINY

    run = tmp_path / "cli"
    args = ["train", "--config", "quickstart", *TINY, f"run.dir={run}", "train.max_steps=3"]
    # A target that follows the context encoder at once, and big steps: three steps then move
    # the trained encoder's accuracies away from the random init's, so the checks below can
    # tell the two encoders apart.
    args += ["train.ema_start=0.0", "optim.lr=0.01"]
    assert main(args) == 0
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "random_init" in out and "pixels" in out
    results = json.loads((run / "eval.json").read_text())
    # "trained" probes the checkpoint's target encoder, "random_init" the very encoder the
    # run started from (the trainer's initialisation under the run's seed), on full splits.
    cfg = load_run_config(run)
    encoders = {"random_init": Trainer(cfg).model.target_encoder}
    encoders["trained"] = copy.deepcopy(encoders["random_init"])
    encoders["trained"].load_state_dict(
        ckpt.load_checkpoint(run / "checkpoints/last.pt")["target_encoder"]
    )
    for group, encoder in encoders.items():
        assert set(results[group]) == {"level0", "level1", "level2", "concat"}
        train_feats, train_labels = frozen_features(encoder, cfg, "train")
        test_feats, test_labels = frozen_features(encoder, cfg, "test")
        for name, accs in results[group].items():
            expected, _ = probe(
                (train_feats[name], train_labels), (test_feats[name], test_labels), 10, cfg
            )
            assert accs == expected, (group, name)
    assert results["trained"] != results["random_init"]
    assert results["pixels"]["pixels"]["knn"] > 0.2  # synthetic classes are visible in pixels


def test_cli_reports_bad_config_without_traceback(capsys):
    assert main(["train", "train.max_step=3"]) == 2
    assert "train.max_steps" in capsys.readouterr().err


def test_resume_accepts_a_checkpoint_written_before_new_config_keys(tiny_config, tmp_path):
    Trainer(tiny_config("train.max_steps=2", "train.stop_after=1")).fit()
    last = tmp_path / "run/checkpoints/last.pt"
    state = torch.load(last, weights_only=True)
    del state["config"]["model"]["levels"]  # as if written before the key existed
    torch.save(state, last)
    resumed = Trainer(tiny_config("train.max_steps=2"))
    resumed.fit()
    assert resumed.step == 2
