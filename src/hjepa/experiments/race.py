"""The race between our training step and the official I-JEPA step, shared by the benchmarks
that run it (benchmarks/race_ijepa.py, race_loop.py, step_parts.py, quickstart_clock.py).

Both steps train the same ViT (28 px, patch 4, width 192, depth 6, 3 heads; predictor width 96,
depth 4) on batches of 128 one-channel images with the same mask settings (4 target blocks of
scale 0.15-0.2 and aspect 0.75-1.5, one context block of scale 0.85-1.0), AdamW and the EMA
update. :class:`Ours` is our trainer on that ViT; :class:`Official` the official step, its code
imported from a local checkout (:func:`official_module`), never copied here.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import logging
import statistics
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

IMAGE, PATCH, CHANNELS, BATCH = 28, 4, 1, 128
WIDTH, DEPTH, HEADS = 192, 6, 3
PRED_WIDTH, PRED_DEPTH = 96, 4
TARGETS, TARGET_SCALE, ASPECT, CONTEXT_SCALE, MIN_KEEP = 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), 4

RACE_VIT = [
    f"model.embed_dim={WIDTH}",
    f"model.depth={DEPTH}",
    f"model.num_heads={HEADS}",
    f"model.predictor_embed_dim={PRED_WIDTH}",
    f"model.predictor_depth={PRED_DEPTH}",
    f"model.predictor_num_heads={HEADS}",
    f"train.batch_size={BATCH}",
    "train.knn_every=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.checkpoint_every=100",
]
# max_steps: the schedules of a Fashion-MNIST epoch (468 steps), not those of 4096 images
SYNTHETIC = [
    "data.name=synthetic",
    "data.channels=1",
    "data.synthetic_size=4096",
    "train.max_steps=468",
]


def our_overrides(variant: str, predictor_mode: str, device: str = "cpu") -> list[str]:
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
        f"train.device={device}",
        "train.precision=fp32",  # the official step runs in fp32 (use_bfloat16=False)
        "run.tensorboard=false",
        "run.progress=false",
        "run.dir=/tmp/hjepa_race_unused",
    ]
    if variant == "ijepa":  # the I-JEPA objective: one level, smooth L1, no clipping
        return [*common, "model.levels=1", "loss.distance=smooth_l1", "train.grad_clip=0"]
    if variant == "quickstart":  # the quickstart preset's recipe (conv stem, SIGReg) on this ViT
        return common
    return [*common, "model.levels=3"]  # our default hierarchy (3 levels, mse, clip 1.0)


PRESETS = {"quickstart": "quickstart"}  # variants whose base is a preset, not the schema


class Ours:
    def __init__(
        self, variant: str, predictor_mode: str, extra: tuple[str, ...] = (), device: str = "cpu"
    ):
        from hjepa.config import load_config
        from hjepa.train.parts import build_parts
        from hjepa.train.trainer import Trainer

        overrides = our_overrides(variant, predictor_mode, device) + list(extra)
        cfg = load_config(PRESETS.get(variant), overrides)
        parts = build_parts(cfg)
        # The official step gets its masks from the data loader's collator: ours are drawn in
        # draw() too, and the step reads them back instead of drawing them inside the timing.
        self.pipeline, self.drawn = parts.inputs, Drawn()
        self.trainer = Trainer(cfg, parts=dataclasses.replace(parts, inputs=self.drawn))
        self.trainer.model.train()
        self.batches = self.trainer.batches()

    def draw(self):
        micro, images = next(self.batches)
        return micro, images, self.pipeline(images, micro)

    def model_step(self, inputs) -> None:
        micro, images, self.drawn.drawn = inputs
        self.trainer.train_step([(micro, images)])


class Drawn:
    """Stands in for the trainer's input pipeline: hands back what :meth:`Ours.draw` drew."""

    drawn: tuple = ()

    def __call__(self, images, micro):
        return self.drawn


def official_module(root: Path, name: str) -> ModuleType:
    """Module ``src.<name>`` of the official I-JEPA checkout at ``root``. Its modules import
    each other as ``src.*``, so ``src`` is registered (once) as that checkout's package; the
    import path itself is left alone."""
    package = sys.modules.get("src")
    folder = str(Path(root) / "src")
    if package is None or list(getattr(package, "__path__", [])) != [folder]:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{root} is not an I-JEPA checkout: it has no src/ folder")
        spec = importlib.machinery.ModuleSpec("src", None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [folder]
        sys.modules["src"] = package
    return importlib.import_module(f"src.{name}")


class Official:
    """The official I-JEPA training step (its ``src/train.py``, fp32, one process) on the
    race's ViT, from a checkout of https://github.com/facebookresearch/ijepa at ``root``."""

    def __init__(self, root: Path, seed: int = 0, device: str = "cpu"):
        vit = official_module(root, "models.vision_transformer")
        init_opt = official_module(root, "helper").init_opt
        MaskCollator = official_module(root, "masks.multiblock").MaskCollator  # noqa: N806
        apply_masks = official_module(root, "masks.utils").apply_masks
        repeat_interleave_batch = official_module(root, "utils.tensors").repeat_interleave_batch

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
        self.encoder.to(device)
        self.predictor.to(device)
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
        self.images = (torch.rand(BATCH, CHANNELS, IMAGE, IMAGE, generator=gen) * 2 - 1).to(device)

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


def official_inputs(_micro, _images, drawn):
    """Our batch (``Ours.draw``: micro-batch number, raw images, the input pipeline's augmented
    images and mask indices) in the official format: the context and one index tensor per
    target block."""
    x, index = drawn[0], drawn[1]
    targets = index.blocks[0]
    return x, [index.context], [targets[:, m] for m in range(targets.shape[1])]


def data_overrides() -> list[str]:
    """Fashion-MNIST where it is installed (nothing to override), else the race's synthetic
    data on the schedules of a Fashion-MNIST epoch."""
    from hjepa.data.datasets import build_dataset

    try:
        build_dataset("fashion_mnist", None, "train", image_size=28)
        return []
    except (FileNotFoundError, ValueError):
        return list(SYNTHETIC)


def median_quartiles(values: list[float]) -> dict[str, float]:
    """Median and quartiles of paired ratios (one value: all three are it)."""
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"median": median, "q25": q1, "q75": q3}
