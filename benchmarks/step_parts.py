"""Where a training step stands against the sgemm roofline, part by part.

Usage::

    python benchmarks/step_parts.py [--threads 2] [--repeats 5] [key=value ...]

Builds the trainer of the quickstart preset on the race's ViT
(``hjepa.experiments.race.RACE_VIT``: 28 px, patch 4, width 192, depth 6; predictor 96 x 4;
batch 128; ``key=value`` overrides after it, e.g. ``model.predictor_mode=shared`` or
``train.precision=bf16``) and times, interleaved per
repeat on one batch and its masks: the target encoder's forward pass, the context encoder's
forward + backward, the predictor's forward + backward (level 0's blocks), the whole model and
loss forward + backward, a whole ``Trainer.train_step``, and the roofline probe: the encoder
MLP's first matmul (``B*49 x 192 -> 768``, 16 calls in a row). FLOPs are counted with
``FlopCounterMode`` (SDPA's math kernel for the count, whose work the fused kernel does too).
Prints, per part, the median time, its GFLOP and its GFLOP/s as a fraction of the probe's, per
repeat, in one run: 1.0 would be a part that runs every FLOP at the speed of that matmul.

``--attention auto,math`` instead times the model and loss forward + backward under
each ``model.attention`` choice in turn, per repeat on the same batch, and prints each choice's
median time and the median and quartiles of its per-repeat speedup over the first choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from hjepa.experiments.race import RACE_VIT, data_overrides, median_quartiles

SGEMM = (128 * 49, 192, 768)
SGEMM_CALLS = 16


def parts(trainer) -> dict:
    """The timed callables, each on the same batch and masks."""
    model = trainer.model
    model.train()
    batches = trainer.step_batches()
    (micro, images), *_ = next(batches)
    x, index, _ = trainer.inputs(images, micro)
    context = model.context_encoder(x, keep=index.context).detach()
    a, b = torch.randn(SGEMM[0], SGEMM[1]), torch.randn(SGEMM[1], SGEMM[2])

    def target():
        with torch.no_grad():
            model.target_levels(x)

    def context_encoder():
        out = model.context_encoder(x, keep=index.context)
        out.backward(torch.ones_like(out))

    def predictor():
        out = model.predictor(context, index.context, index.blocks[0])
        out.backward(torch.ones_like(out))

    def model_and_loss():
        loss, _ = trainer.objective(model(x, index), step=trainer.step)
        loss.backward()

    return {
        # 16 back-to-back calls: about as long as a part, so it sees the same share of a loaded
        # machine (a single short call would catch its quiet moments).
        "sgemm": lambda: [torch.mm(a, b) for _ in range(SGEMM_CALLS)],
        "target_encoder_forward": target,
        "context_encoder_forward_backward": context_encoder,
        "predictor_forward_backward": predictor,
        "model_and_loss_forward_backward": model_and_loss,
        "train_step": lambda: trainer.train_step(next(batches)),
    }


def compare_attention(step, args) -> dict:
    """``step`` under each ``args.attention`` choice in turn, ``args.repeats`` times."""
    from hjepa.models.vit import attention_backend

    choices = args.attention.split(",")
    times: dict[str, list[float]] = {name: [] for name in choices}
    begin = time.perf_counter()
    for i in range(args.repeats + 1):  # the first round warms up
        if args.budget_s and i > 2 and time.perf_counter() - begin > args.budget_s:
            break
        for name in choices if i % 2 else choices[::-1]:  # alternate the order
            with attention_backend(name):
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            if i:
                times[name].append(elapsed)
    base = times[choices[0]]
    return {
        "threads": args.threads,
        "repeats": len(base),
        "overrides": args.overrides,
        "ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
        "speedup_vs_" + choices[0]: {
            name: median_quartiles([b / t for b, t in zip(base, ts)]) for name, ts in times.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--attention", help="compare model.attention choices, comma separated (first: baseline)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=0, help="with --attention: stop repeating after this"
    )
    parser.add_argument("overrides", nargs="*", help="config key=value after the race's ViT")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hjepa.config import load_config
    from hjepa.models.vit import attention_backend
    from hjepa.train.trainer import Trainer

    overrides = [*RACE_VIT, *data_overrides(), *args.overrides, "run.dir=/tmp/hjepa_parts_unused"]
    trainer = Trainer(load_config("quickstart", overrides))
    timed = parts(trainer)
    if args.attention:
        report = compare_attention(timed["model_and_loss_forward_backward"], args)
        print(json.dumps(report, indent=2))
        return 0
    flops = {"sgemm": 2 * SGEMM[0] * SGEMM[1] * SGEMM[2] * SGEMM_CALLS}
    with attention_backend("math"):
        for name, fn in timed.items():
            if name not in ("sgemm", "train_step"):  # a train_step would move the trainer on
                with FlopCounterMode(display=False) as counter:
                    fn()
                flops[name] = counter.get_total_flops()
    # the steps' own batches: their token counts differ a little from the counted one's
    flops["train_step"] = flops["model_and_loss_forward_backward"]
    times: dict[str, list[float]] = {name: [] for name in timed}
    with attention_backend(trainer.cfg.model.attention):
        for fn in timed.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in timed.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    trainer.model.zero_grad(set_to_none=True)
    peak = [flops["sgemm"] / t for t in times["sgemm"]]
    report = {
        "threads": args.threads,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "sgemm_shape": list(SGEMM),
        "sgemm_gflops_per_s": statistics.median(peak) / 1e9,
        "parts": {
            name: {
                "ms": 1e3 * statistics.median(times[name]),
                "gflop": flops[name] / 1e9,
                "fraction_of_sgemm": statistics.median(
                    flops[name] / t / p for t, p in zip(times[name], peak)
                ),
            }
            for name in timed
            if name != "sgemm"
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
