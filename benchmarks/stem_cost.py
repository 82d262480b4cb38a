"""What a convolutional stem costs: training-step time and target pixels the context sees.

    python benchmarks/stem_cost.py --config quickstart [--stems patch conv deepconv convpool]
        [--repeats 8] [--threads 2] [key=value ...]

Two tables, one JSON line each:

* ``step``: the preset's training step (forward, backward, optimizer, EMA) with each
  ``model.stem``, steps interleaved round-robin after a warm-up step each, median per stem, as a
  ratio to the first stem listed. Wall times are printed only as these ratios.
* ``leak``: the context encoder runs the stem on the whole image and keeps the context tokens
  only, so a context token whose receptive field reaches into a target block has seen target
  pixels. For the preset's own masks (one batch of ``train.batch_size`` draws, seed
  ``train.seed``) it reports, per stem, the fraction of target pixels (pixels of level-0
  target tokens) inside the receptive field of at least one context token. The patch
  embedding's is 0 by construction.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import torch
from torch import Tensor

from hjepa.config import Config, load_config
from hjepa.data.masks import MaskBatch, sampler_from_config
from hjepa.models.vit import ConvStem
from hjepa.train.trainer import Trainer


def pixel_cover(first: int, size: int, patch: int, grid: int, image: int) -> torch.Tensor:
    """``[image, grid]`` bool: pixel row ``y`` lies in the receptive field of token row ``r``
    (token ``r`` sees pixels ``first + r * patch`` .. ``first + r * patch + size - 1``)."""
    y = torch.arange(image)[:, None]
    start = first + torch.arange(grid)[None, :] * patch
    return (y >= start) & (y < start + size)


def receptive_field(cfg: Config, stem: str) -> tuple[int, int]:
    """``(first, size)`` of ``stem``'s tokens for ``cfg``'s patch size (see ConvStem)."""
    m = cfg.model
    if stem == "patch":
        return 0, m.patch_size
    return ConvStem(1, m.embed_dim, m.patch_size, stem).receptive_field()


def leaked_fraction(masks: MaskBatch, first: int, size: int, patch: int, image: int) -> Tensor:
    """Per image of ``masks``: the fraction of its target pixels (pixels of its level-0 target
    tokens) inside the receptive field ``(first, size)`` of at least one of its context
    tokens."""
    b, n = masks.context.shape
    grid = math.isqrt(n)
    context = masks.context.view(b, grid, grid).float()
    target = masks.targets.any(1).view(b, grid, grid).float()
    seen = pixel_cover(first, size, patch, grid, image).float()
    own = pixel_cover(0, patch, patch, grid, image).float()
    visible = (seen @ context @ seen.T) > 0  # [B, H, W]
    target_px = (own @ target @ own.T) > 0
    return (visible & target_px).sum((1, 2)) / target_px.sum((1, 2))


def preset_leak(cfg: Config, stem: str) -> float:
    """:func:`leaked_fraction` of ``stem`` over one batch of ``cfg``'s own masks."""
    masks = sampler_from_config(cfg).sample(
        cfg.train.batch_size, torch.Generator().manual_seed(cfg.train.seed)
    )
    first, size = receptive_field(cfg, stem)
    return float(
        leaked_fraction(masks, first, size, cfg.model.patch_size, cfg.data.image_size).mean()
    )


def step_ratios(cfg_name: str, overrides: list[str], stems: list[str], repeats: int) -> dict:
    """Median training-step time per stem over interleaved repeats, over the first stem's."""
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stem in stems:
            run = [*overrides, f"model.stem={stem}", f"run.dir={tmp}/{stem}", "run.progress=false"]
            trainer = Trainer(load_config(cfg_name, run))
            trainer.model.train()
            batches = trainer.step_batches()
            steps[stem] = lambda t=trainer, it=batches: t.train_step(next(it))
        times: dict[str, list[float]] = {stem: [] for stem in stems}
        for fn in steps.values():
            fn()  # warm-up: optimizer state, allocator
        for _ in range(repeats):
            for stem, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[stem].append(time.perf_counter() - start)
    base = statistics.median(times[stems[0]])
    return {stem: round(statistics.median(t) / base, 3) for stem, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="preset name or YAML path")
    parser.add_argument("--stems", nargs="+", default=["conv", "deepconv", "convpool"])
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per stem")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--no-steps", action="store_true", help="the leak table only")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    leak = {stem: round(preset_leak(cfg, stem), 4) for stem in args.stems}
    print(json.dumps({"table": "leak", "config": args.config, "leaked_target_fraction": leak}))
    if not args.no_steps:
        ratios = step_ratios(args.config, args.overrides, args.stems, args.repeats)
        print(
            json.dumps(
                {
                    "table": "step",
                    "config": args.config,
                    "threads": torch.get_num_threads(),
                    "repeats": args.repeats,
                    "step_time_over_first": ratios,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
