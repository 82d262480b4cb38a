"""The trainer runs the parts it is given; its checkpoint is their own state dicts; tools reach
the step through its public hooks (another part, ``using``, ``fit(stop_after, around_step)``)."""

import ast
import dataclasses
from pathlib import Path

import torch

from hjepa.train.parts import build_parts
from hjepa.train.trainer import Trainer

TRAIN = Path(__file__).resolve().parents[1] / "src" / "hjepa" / "train"


class _Counting:
    """An input pipeline that counts its calls and hands on to the real one."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.calls = pipeline, 0

    def __call__(self, images, micro):
        self.calls += 1
        return self.pipeline(images, micro)


def test_the_trainer_runs_the_parts_it_is_given(tiny_config):
    cfg = tiny_config("train.max_steps=3")
    parts = build_parts(cfg)
    counting = _Counting(parts.inputs)
    trainer = Trainer(cfg, parts=dataclasses.replace(parts, inputs=counting))
    assert trainer.model is parts.model and trainer.optimizer is parts.optimizer
    trainer.train_step(next(trainer.step_batches()))
    assert counting.calls == 1 and trainer.step == 1


def test_the_checkpoint_is_the_parts_state_dicts_and_the_counters(tiny_config):
    trainer = Trainer(tiny_config("train.max_steps=3"))
    trainer.train_step(next(trainer.step_batches()))
    state, own = trainer.state_dict(), trainer.parts.state_dict()
    assert set(state) == set(own) | {"step", "total_steps", "nonfinite_skipped", "config"}
    assert state["step"] == 1 and state["total_steps"] == 3
    for name, module in trainer.model.checkpoint_modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(state[name][key], value), f"{name}.{key}"
    assert state["optimizer"]["state"].keys() == own["optimizer"]["state"].keys()


def test_a_checkpoint_loads_into_fresh_parts(tiny_config):
    first = Trainer(tiny_config("train.max_steps=3"))
    first.train_step(next(first.step_batches()))
    second = Trainer(tiny_config("train.max_steps=3"))
    second.load_state_dict(first.state_dict())
    assert second.step == 1
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_fit_takes_each_step_through_around_step_and_stops_after(tiny_config):
    trainer = Trainer(tiny_config("train.max_steps=5"))
    seen = []

    def around(step, micro_batches):
        seen.append(trainer.step)
        return step(micro_batches)

    trainer.fit(stop_after=2, around_step=around)
    assert seen == [0, 1] and trainer.step == 2
    trainer.fit(stop_after=1)  # resumes from the checkpoint fit wrote, no hook
    assert seen == [0, 1] and trainer.step == 3


def test_using_replaces_a_part_for_a_while(tiny_config):
    trainer = Trainer(tiny_config("train.max_steps=3"))
    original = trainer.inputs
    counting = _Counting(original)
    with trainer.using(inputs=counting):
        assert trainer.inputs is counting
        trainer.train_step(next(trainer.step_batches()))
    assert trainer.inputs is original and counting.calls == 1


def test_the_run_dir_module_reads_no_trainer():
    tree = ast.parse((TRAIN / "resume.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "hjepa.train.trainer" not in imported
    assert not any(isinstance(n, ast.Name) and n.id == "trainer" for n in ast.walk(tree))
