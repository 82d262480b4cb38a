"""A training step reads nothing back from the device, and still skips a non-finite one.

Every operation that needs a value on the host (``.item()``, ``bool(t)``, ``nonzero``,
boolean-mask indexing, a tensor made from host values) is counted by a ``TorchDispatchMode``
(:class:`hjepa.train.sync_audit.SyncCounter`) around whole ``Trainer.train_step`` calls; the
masks are drawn ahead, before the step, and with a draw worker (an accelerator's default) the
training process reads nothing to get a batch either. The non-finite policy is decided on the
device and read back on the logging cadence.
"""

import copy
import dataclasses

import pytest
import torch

from hjepa.train.parts import build_inputs, build_parts
from hjepa.train.sync_audit import SyncCounter
from hjepa.train.trainer import NonFiniteLossError, Trainer

QUICKSTART_LIKE = ("model.levels=3", "loss.regularizer=sigreg", "model.predictor_mode=shared")
IJEPA_LIKE = ("model.levels=3", "model.predictor_mode=repeat", "train.grad_clip=0")


def test_the_counter_sees_each_kind_of_host_read():
    t = torch.tensor([0.0, 1.0, 2.0])
    counter = SyncCounter()
    with counter:
        t.sum().item()
        bool(t.any())
        t.nonzero()
        t[t > 0]
        torch.tensor([1.0])
        t * 2  # no host read
    kinds = counter.per_step(1)
    assert kinds["_local_scalar_dense"] == 2 and kinds["nonzero"] == 1
    assert kinds["index(bool mask)"] == 1 and kinds["host_tensor"] == 1
    assert kinds["total"] == 5


@pytest.mark.parametrize("overrides", [QUICKSTART_LIKE, IJEPA_LIKE], ids=["shared", "repeat"])
def test_a_training_step_reads_nothing_back(tiny_config, overrides):
    trainer = Trainer(tiny_config("train.max_steps=20", *overrides))
    trainer.model.train()
    batches = trainer.step_batches()
    trainer.train_step(next(batches))  # first step: optimizer state, cached tables
    counter = SyncCounter()
    for _ in range(3):
        micro_batches = next(batches)  # the producer: data and masks, off the step
        with counter:
            trainer.train_step(micro_batches)
    assert counter.total == 0, counter.per_step(3)
    assert counter.ops > 100  # it did count the steps' operations
    assert len(counter.attention_lengths) >= 2  # and saw their attention calls


@pytest.mark.parametrize("draw_workers", [0, 1])
def test_with_a_draw_worker_the_producer_reads_nothing_either(tiny_config, draw_workers):
    cfg = tiny_config("train.max_steps=20", *QUICKSTART_LIKE)
    parts = build_parts(cfg)
    inputs = build_inputs(cfg, parts.data, parts.env, parts.device, draw_workers=draw_workers)
    trainer = Trainer(cfg, parts=dataclasses.replace(parts, inputs=inputs))
    trainer.model.train()
    batches = trainer.step_batches()
    trainer.train_step(next(batches))  # first step: the draw loader's start, optimizer state
    producer, step, images_only = SyncCounter(), SyncCounter(), SyncCounter()
    for _ in range(3):
        with producer:
            micro_batches = next(batches)
        with step:
            trainer.train_step(micro_batches)
    images = trainer.loader.iter_epoch(1)
    for _ in range(3):  # what loading the images alone makes: the batches from host memory
        with images_only:
            next(images)
    assert step.total == 0, step.per_step(3)
    drawing = producer.total - images_only.total
    if draw_workers:  # masks and crops came from the worker: no read here, only the images
        assert drawing == 0 and set(producer.syncs) <= {"host_tensor"}, producer.per_step(3)
    else:  # drawn in this process, by the producer: the counter sees the draws' reads
        assert drawing > 0 and producer.syncs["_local_scalar_dense"] > 0


def _poison_objective(trainer: Trainer, monkeypatch) -> None:
    objective = trainer.objective.forward

    def poisoned(out, step):  # one NaN term: the loss and gradient are NaN too
        loss, terms = objective(out, step=step)
        return loss * float("nan"), {**terms, "loss_level1": terms["loss_level1"] * float("nan")}

    monkeypatch.setattr(trainer.objective, "forward", poisoned)


def _snapshot(trainer: Trainer) -> tuple[dict, dict]:
    """The weights, and the optimizer's state (moments and step counts; its hyperparameters
    follow the schedules, which move on over a skipped step too)."""
    optimizer_state = trainer.optimizer.state_dict()["state"]
    return copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(optimizer_state)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("timing", ["after_step", "before_step"])
def test_a_nan_step_changes_no_weight_no_optimizer_state_and_no_ema(
    tiny_config, monkeypatch, timing
):
    trainer = Trainer(
        tiny_config("train.max_steps=5", "train.nonfinite=skip", f"train.ema_timing={timing}")
    )
    trainer.model.train()
    batches = trainer.step_batches()
    trainer.train_step(next(batches))  # a finite step: every optimizer state exists
    weights, optimizer = _snapshot(trainer)
    _poison_objective(trainer, monkeypatch)
    counter = SyncCounter()
    micro_batches = next(batches)
    with counter:
        result = trainer.train_step(micro_batches)
    assert counter.total == 0, counter.per_step(1)  # the skip is decided on the device
    after_weights, after_optimizer = _snapshot(trainer)
    _assert_same(after_weights, weights, "model")  # context, target (EMA), predictor, heads
    _assert_same(after_optimizer, optimizer, "optimizer")  # moments and step counts
    assert not bool(result.applied) and "loss_level1=nan" in result.skip_reason
    assert trainer.skipped_steps == 1 and trainer.step == 2
    monkeypatch.undo()
    result = trainer.train_step(next(batches))
    assert bool(result.applied) and result.skip_reason is None
    moved = trainer.optimizer.state_dict()["state"][0]["step"]
    assert float(moved) == 2.0  # the skipped step left the count at 1, this one made it 2


def test_a_nan_gradient_from_a_finite_loss_is_skipped_on_the_device(tiny_config):
    trainer = Trainer(tiny_config("train.max_steps=5", "train.nonfinite=skip"))
    trainer.model.train()
    batches = trainer.step_batches()
    trainer.train_step(next(batches))
    weights, optimizer = _snapshot(trainer)
    weight = trainer.model.context_encoder.patch_embed.weight
    weight.register_hook(lambda g: g * float("nan") if trainer.step == 1 else g)
    result = trainer.train_step(next(batches))
    _assert_same(_snapshot(trainer), (weights, optimizer), "state")
    reason = result.skip_reason
    assert "non-finite gradient" in reason and "from a finite loss" in reason


def test_stop_is_read_on_the_logging_cadence_and_names_the_step(tiny_config, monkeypatch):
    """Read lazily: the run stops at the first logging step after the NaN, naming its step,
    and before any checkpoint of the steps after it is written."""
    trainer = Trainer(
        tiny_config("train.max_steps=8", "train.log_every=4", "run.checkpoint_every=4")
    )
    forward = trainer.model.forward

    def poisoned(images, masks, *views):
        out = forward(images, masks, *views)
        if trainer.step == 1:  # the second step
            out.predictions[0] = out.predictions[0] * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss_level0=nan\) at step 2;"):
        trainer.fit()
    assert trainer.step == 4  # read at step 4, the first logging step after it
    assert not (trainer.run_dir / "checkpoints").exists() or not any(
        (trainer.run_dir / "checkpoints").iterdir()
    )
