"""Throughput race: our training step against the official I-JEPA step, side by side.

Usage::

    python benchmarks/race_ijepa.py --ijepa /path/to/ijepa-checkout [--threads 2]

``--ijepa`` is a local checkout of https://github.com/facebookresearch/ijepa; its code is
imported from there (``sys.path``), never copied here. Both steps train the same ViT
(28 px, patch 4, width 192, depth 6, 3 heads; predictor width 96, depth 4) on the same batch
of 128 synthetic one-channel images with the same mask settings (4 target blocks of scale
0.15-0.2 and aspect 0.75-1.5, one context block of scale 0.85-1.0), AdamW and the EMA update.

Two timings per side, interleaved repeat by repeat (median), so slow phases of a shared
machine hit both sides alike:

* ``full``: everything one step of a training loop does after the batch is in memory: mask
  sampling (the official ``MaskCollator``; our sampler, plus our batched augmentation),
  forward, backward, optimizer step, EMA.
* ``model``: the same without mask sampling/augmentation (drawn before the clock starts):
  forward, backward, optimizer step, EMA.

FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and
attention, forward + backward) tell apart "less work" from "faster kernels". Prints JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

IMAGE, PATCH, CHANNELS, BATCH = 28, 4, 1, 128
WIDTH, DEPTH, HEADS = 192, 6, 3
PRED_WIDTH, PRED_DEPTH = 96, 4
TARGETS, TARGET_SCALE, ASPECT, CONTEXT_SCALE, MIN_KEEP = 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), 4


# -- ours --------------------------------------------------------------------------------------
def our_overrides(variant: str, predictor_mode: str) -> list[str]:
    common = [
        "data.name=synthetic",
        f"data.image_size={IMAGE}",
        f"data.channels={CHANNELS}",
        "data.synthetic_size=1024",
        f"model.patch_size={PATCH}",
        f"model.embed_dim={WIDTH}",
        f"model.depth={DEPTH}",
        f"model.num_heads={HEADS}",
        f"model.predictor_embed_dim={PRED_WIDTH}",
        f"model.predictor_depth={PRED_DEPTH}",
        f"model.predictor_num_heads={HEADS}",
        f"model.predictor_mode={predictor_mode}",
        f"masking.num_targets={TARGETS}",
        f"masking.target_scale=[{TARGET_SCALE[0]}, {TARGET_SCALE[1]}]",
        f"masking.target_aspect=[{ASPECT[0]}, {ASPECT[1]}]",
        f"masking.context_scale=[{CONTEXT_SCALE[0]}, {CONTEXT_SCALE[1]}]",
        f"masking.min_context={MIN_KEEP}",
        f"train.batch_size={BATCH}",
        "train.max_steps=1000",
        "train.device=cpu",
        "run.tensorboard=false",
        "run.progress=false",
        "run.dir=/tmp/hjepa_race_unused",
    ]
    if variant == "ijepa":  # the I-JEPA objective: one level, smooth L1, no clipping
        return [*common, "model.levels=1", "loss.distance=smooth_l1", "train.grad_clip=0"]
    return [*common, "model.levels=3"]  # our default hierarchy (3 levels, mse, clip 1.0)


class Ours:
    def __init__(self, variant: str, predictor_mode: str):
        from hjepa.config import load_config
        from hjepa.train.trainer import Trainer

        self.trainer = Trainer(load_config(None, our_overrides(variant, predictor_mode)))
        self.trainer.model.train()
        self.batches = self.trainer._batches()

    def draw(self):
        micro, images = next(self.batches)
        return self.trainer.prepare_inputs(images, micro)

    def model_step(self, inputs) -> None:
        self.trainer.forward_backward(*inputs)
        self.trainer._optimizer_step()


# -- the official code -------------------------------------------------------------------------
class Official:
    def __init__(self, root: Path, seed: int = 0):
        sys.path.insert(0, str(root))
        import src.models.vision_transformer as vit
        from src.helper import init_opt
        from src.masks.multiblock import MaskCollator
        from src.masks.utils import apply_masks
        from src.utils.tensors import repeat_interleave_batch

        logging.getLogger().setLevel(logging.WARNING)  # its helper logs at INFO to stdout
        torch.manual_seed(seed)
        self.apply_masks, self.repeat_interleave_batch = apply_masks, repeat_interleave_batch
        norm = partial(torch.nn.LayerNorm, eps=1e-6)
        self.encoder = vit.VisionTransformer(
            img_size=[IMAGE], patch_size=PATCH, in_chans=CHANNELS, embed_dim=WIDTH,
            depth=DEPTH, num_heads=HEADS, mlp_ratio=4, qkv_bias=True, norm_layer=norm,
        )  # fmt: skip
        self.predictor = vit.vit_predictor(
            num_patches=(IMAGE // PATCH) ** 2, embed_dim=WIDTH, predictor_embed_dim=PRED_WIDTH,
            depth=PRED_DEPTH, num_heads=HEADS,
        )  # fmt: skip
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        ipe, epochs = 1000, 1
        self.optimizer, _, self.scheduler, self.wd_scheduler = init_opt(
            self.encoder, self.predictor, ipe, 2e-4, 1e-3, 0, epochs,
            wd=0.04, final_wd=0.4, final_lr=1e-6, use_bfloat16=False, ipe_scale=1.0,
        )  # fmt: skip
        total = ipe * epochs
        self.momentum = iter([0.996 + i * (1.0 - 0.996) / total for i in range(total + 1)])
        self.collator = MaskCollator(
            input_size=(IMAGE, IMAGE), patch_size=PATCH, enc_mask_scale=CONTEXT_SCALE,
            pred_mask_scale=TARGET_SCALE, aspect_ratio=ASPECT, nenc=1, npred=TARGETS,
            min_keep=MIN_KEEP, allow_overlap=False,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(BATCH, CHANNELS, IMAGE, IMAGE, generator=gen) * 2 - 1

    def draw(self):
        _, masks_enc, masks_pred = self.collator([(img, 0) for img in self.images])
        return self.images, masks_enc, masks_pred

    def model_step(self, inputs) -> None:
        # The step of the official src/train.py (fp32, single process), without its logging.
        imgs, masks_enc, masks_pred = inputs
        self.scheduler.step()
        self.wd_scheduler.step()
        with torch.no_grad():
            h = self.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = self.apply_masks(h, masks_pred)
            h = self.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        m = next(self.momentum)
        with torch.no_grad():
            for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                k.data.mul_(m).add_((1.0 - m) * q.detach().data)
        float(loss.detach())


# -- measurement -------------------------------------------------------------------------------
def official_inputs(x, index, *_):
    """Our batch in the official format: the context and one index tensor per target block."""
    targets = index.blocks[0]
    return x, [index.context], [targets[:, m] for m in range(targets.shape[1])]


def flops_per_image(ours: Ours, official: Official, draws: int = 3) -> tuple[float, float]:
    """Mean FLOPs per image of one step on the same batches and masks.

    Our attention runs on SDPA's math backend here: the counter does not see inside the fused
    CPU kernel, and the official attention (explicit matmuls) is counted in full.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    totals = [0, 0]
    for _ in range(draws):
        inputs = ours.draw()
        for i, (side, args) in enumerate(((ours, inputs), (official, official_inputs(*inputs)))):
            with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
                side.model_step(args)
            totals[i] += counter.get_total_flops()
    return totals[0] / (draws * BATCH), totals[1] / (draws * BATCH)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def race(official: Official, ours: dict[str, Ours], repeats: int, warmup: int) -> dict:
    """Interleaved timings (seconds, median): per side ``masks`` (drawing one batch's masks;
    ours also augments) and ``model`` (step on identical batches and masks for all sides)."""
    names = ["official", *ours]
    times: dict[str, dict[str, list[float]]] = {n: {"masks": [], "model": []} for n in names}
    # The deepest hierarchy draws: its level-0 masks are all a shallower model reads.
    first = max(ours.values(), key=lambda side: side.trainer.cfg.model.levels)
    for i in range(warmup + repeats):
        keep = i >= warmup
        inputs = first.draw()
        shared = {name: inputs for name in ours}
        shared["official"] = official_inputs(*inputs)
        for name in names:
            side = official if name == "official" else ours[name]
            if keep:
                times[name]["masks"].append(timed(side.draw))
                times[name]["model"].append(timed(side.model_step, shared[name]))
            else:
                side.model_step(shared[name])
    medians = {n: {k: statistics.median(v) for k, v in per.items()} for n, per in times.items()}
    for per in medians.values():
        per["full"] = per["masks"] + per["model"]
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ijepa", type=Path, required=True, help="checkout of the official code")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--ours",
        default="ijepa:repeat,ijepa:shared,default:repeat",
        help="our variants, comma separated: OBJECTIVE:PREDICTOR_MODE with OBJECTIVE 'ijepa' "
        "(1 level, smooth L1, no clipping) or 'default' (3 levels, mse, clip 1)",
    )
    args = parser.parse_args(argv)
    if not (args.ijepa / "src" / "models" / "vision_transformer.py").is_file():
        parser.error(f"{args.ijepa} is not a checkout of facebookresearch/ijepa")
    torch.set_num_threads(args.threads)
    official = Official(args.ijepa)
    ours = {}
    for spec in args.ours.split(","):
        variant, mode = spec.split(":")
        ours[f"ours_{variant}_{mode}"] = Ours(variant, mode)
    flops = {}
    for name, side in ours.items():
        flops[name], flops["official"] = flops_per_image(side, official)
    seconds = race(official, ours, args.repeats, args.warmup)
    rates = {n: {k: BATCH / s for k, s in per.items()} for n, per in seconds.items()}
    base = rates["official"]
    report = {
        "threads": args.threads,
        "batch": BATCH,
        "repeats": args.repeats,
        "images_per_s": rates,
        "speedup_vs_official": {
            name: {kind: rate[kind] / base[kind] for kind in ("model", "full")}
            for name, rate in rates.items()
            if name != "official"
        },
        "gflops_per_image": {name: f / 1e9 for name, f in flops.items()},
        "flops_ratio_official_over_ours": {
            name: flops["official"] / f for name, f in flops.items() if name != "official"
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
