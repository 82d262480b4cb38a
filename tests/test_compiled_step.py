"""``train.compile=true``: one graph per token bucket, no graph break, the eager step's losses.

Under compile the mask indices are padded to the run's token buckets
(:mod:`hjepa.data.buckets`), and the encoders and the predictor are compiled with static
shapes: Dynamo builds one graph per module and bucket, and never breaks a graph. The loss,
optimizer and EMA stay eager (docs/speed.md says why).
"""

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hjepa.train.parts import mask_preparer
from hjepa.train.trainer import Trainer

STEPS = 20
SMALL = ("train.batch_size=8", "model.levels=2", "train.max_steps=40")


def _losses(trainer: Trainer, steps: int) -> list[float]:
    trainer.model.train()
    batches = trainer.step_batches()
    return [float(trainer.train_step(next(batches)).terms[0]) for _ in range(steps)]


def _bucket_sizes(cfg, steps: int) -> tuple[set, set]:
    """The padded context sizes and (context, block) size pairs of the first ``steps`` steps."""
    prepare = mask_preparer(cfg, cfg.train.batch_size, pad_tokens=True)
    indices = [prepare(micro) for micro in range(steps)]
    contexts = {index.context.shape[1] for index in indices}
    return contexts, {(index.context.shape[1], index.blocks[0].shape[2]) for index in indices}


def test_compiled_steps_build_one_graph_per_bucket_and_match_eager(tiny_config):
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config(*SMALL, "train.compile=true")
    got = _losses(Trainer(cfg), STEPS)
    graphs = counters["stats"]["unique_graphs"]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # The target encoder: one shape; the context encoder: one per context bucket; the
    # predictor: one per (context, block) bucket pair.
    contexts, pairs = _bucket_sizes(cfg, STEPS)
    assert 0 < graphs <= 1 + len(contexts) + len(pairs), (graphs, contexts, pairs)
    # The eager CPU step does not pad: the same losses, to float32 rounding.
    want = _losses(Trainer(tiny_config(*SMALL, "train.compile=false")), STEPS)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
