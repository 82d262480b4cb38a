"""``train.compile=true``: a step is two compiled graphs, built once per token bucket, with no
graph break, and gives the eager step's losses; a non-finite step stays skipped.

Under compile the mask indices are padded to the run's token buckets (:mod:`hjepa.data.buckets`)
and the step runs :func:`hjepa.train.compiled.forward_loss` (model and objective, one graph per
bucket) and :class:`hjepa.train.compiled.CompiledUpdate` (clip, non-finite decision, AdamW, EMA:
one graph for the run), both ``fullgraph=True``. Dynamo keeps one cache entry per graph of a
code object, so counting the entries of each region's code counts its graphs.
"""

import copy

import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import hjepa.train.trainer as trainer_module
from hjepa.train.compiled import CompiledUpdate, forward_loss
from hjepa.train.trainer import Trainer

STEPS = 20
SMALL = ("train.batch_size=8", "model.levels=2", "train.max_steps=40", "loss.regularizer=sigreg")


def _losses(trainer: Trainer, steps: int) -> list[float]:
    trainer.model.train()
    batches = trainer.step_batches()
    return [float(trainer.train_step(next(batches)).terms[0]) for _ in range(steps)]


def _graphs(code) -> int:
    """Graphs Dynamo keeps for the function of ``code`` (one cache entry each)."""
    return len(_debug_get_cache_entry_list(code))


def test_compiled_steps_build_one_graph_per_region_and_bucket_and_match_eager(
    tiny_config, monkeypatch
):
    torch._dynamo.reset()
    counters.clear()
    buckets = set()  # the padded (context, block) token counts the compiled steps saw
    compiled = trainer_module.compiled_forward_loss

    def recording(model, objective, x, index, *rest):
        buckets.add((index.context.shape[1], index.blocks[0].shape[2]))
        return compiled(model, objective, x, index, *rest)

    monkeypatch.setattr(trainer_module, "compiled_forward_loss", recording)
    got = _losses(Trainer(tiny_config(*SMALL, "train.compile=true")), STEPS)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(buckets) >= 2  # the counts below see more than one bucket
    assert _graphs(forward_loss.__code__) == len(buckets), buckets
    assert _graphs(CompiledUpdate._update.__code__) == 1  # lr, wd, momentum are tensors
    assert counters["stats"]["unique_graphs"] == len(buckets) + 1  # nothing else compiled
    # The eager CPU step does not pad and runs torch's fused AdamW: the same losses, to float32
    # rounding.
    want = _losses(Trainer(tiny_config(*SMALL, "train.compile=false")), STEPS)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)


def _state(trainer: Trainer) -> tuple[dict, dict]:
    return (
        copy.deepcopy(trainer.model.state_dict()),
        copy.deepcopy(trainer.optimizer.state_dict()["state"]),
    )


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_equal(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


def test_a_compiled_nan_step_changes_no_weight_no_moment_no_step_count(tiny_config):
    trainer = Trainer(tiny_config(*SMALL, "train.compile=true", "train.nonfinite=skip"))
    trainer.model.train()
    batches = trainer.step_batches()
    trainer.train_step(next(batches))  # a finite step: every optimizer state exists
    before = _state(trainer)
    pipeline = trainer.inputs

    def poisoned(images, micro):  # NaN pixels: every loss term and gradient is NaN
        x, index, views = pipeline(images, micro)
        return x * float("nan"), index, views

    micro_batches = next(batches)
    with trainer.using(inputs=poisoned):
        result = trainer.train_step(micro_batches)
    assert not bool(result.applied) and "non-finite" in result.skip_reason
    weights, moments = _state(trainer)
    _assert_equal(weights, before[0])  # context, target (EMA), predictor, heads
    _assert_equal(moments, before[1])  # moments and step counts
    result = trainer.train_step(next(batches))
    assert bool(result.applied)
    assert float(trainer.optimizer.state_dict()["state"][0]["step"]) == 2.0
    assert trainer.skipped_steps == 1 and trainer.step == 3
