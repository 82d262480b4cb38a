"""Online health checks during training: a short kNN probe and collapse diagnostics.

A falling JEPA loss proves nothing (a collapsed encoder drives it to zero), so every
``train.knn_every`` steps the target encoder's features of a fixed train subset (memory bank)
and a fixed held-out test subset are compared with a kNN, and per level the embedding std,
effective rank, collapse verdict and SIGReg statistic of the test features are logged (the
statistic whether or not SIGReg is in the loss). :func:`collapse_warning` turns a collapsed
verdict into the warning line the trainer prints.

With ``linear`` naming features (``("concat",)``; the time-to-accuracy benchmark, not the
trainer) a linear probe is also fit on those bank features and scored on the same queries, and
:meth:`OnlineProbe.pixels` gives both probes on raw pixels, so curves and their baselines share
one protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hjepa.config import Config
from hjepa.data.datasets import dataset_from_config
from hjepa.data.subsets import fixed_subset
from hjepa.eval.collapse import collapse_report
from hjepa.eval.features import pixel_features, run_features
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.linear import linear_probe
from hjepa.losses.sigreg import SIGReg
from hjepa.models.vit import VisionTransformer

#: Directions of the probe's SIGReg statistic: fixed (step 0) and independent of the loss
#: settings, so values are comparable between probes and between runs.
PROBE_SIGREG_SLICES = 1024


def collapse_warning(step: int, probe: dict) -> str | None:
    """A one-line warning naming the collapsed levels of a probe record, or None."""
    levels = [k.removeprefix("collapsed_") for k, v in probe.items() if k.startswith("collapsed_")]
    collapsed = [name for name in levels if probe[f"collapsed_{name}"]]
    if not collapsed:
        return None
    detail = "; ".join(
        f"{name}: effective rank {probe[f'rank_{name}']:.2f}, "
        f"normalized std {probe[f'std_{name}']:.3g}"
        for name in collapsed
    )
    return (
        f"WARNING: step {step}: collapsed features at {', '.join(collapsed)} ({detail}): the "
        "encoder maps every image to nearly the same embedding; if this persists, add or "
        "strengthen an anti-collapse regulariser (loss.regularizer, loss.sigreg_weight) or "
        "lower optim.lr"
    )


class OnlineProbe:
    def __init__(
        self,
        cfg: Config,
        channels: int,
        mean: Tensor,
        std: Tensor,
        device,
        linear: Sequence[str] = (),
    ):
        self.cfg, self.mean, self.std, self.device = cfg, mean, std, device
        self.linear = tuple(linear)  # features that also get a linear probe ("pixels" too)
        self._sets: tuple[Dataset, Dataset, int] | None = None
        # Rank 0 alone probes: a statistic of its features, no collective with other ranks.
        self.sigreg = SIGReg(PROBE_SIGREG_SLICES, distributed=False)

    def datasets(self) -> tuple[Dataset, Dataset, int]:
        """The kNN memory bank, the held-out query set and the number of classes."""
        if self._sets is None:  # loaded on first use, so short runs that never probe pay nothing
            t = self.cfg.train
            train = dataset_from_config(self.cfg, "train")
            test = dataset_from_config(self.cfg, "test")
            num_classes = int(getattr(train, "num_classes", 0))
            self._sets = (
                fixed_subset(train, t.knn_bank_size, seed=1),
                fixed_subset(test, t.knn_query_size, seed=2),
                num_classes,
            )
        return self._sets

    @torch.no_grad()
    def __call__(self, encoder: VisionTransformer) -> dict[str, float | bool]:
        bank, query, num_classes = self.datasets()
        # Decoded in this process (small sets): an unreadable image's warning reaches the user.
        setup = (self.cfg, self.mean, self.std, self.device)
        bank_feats, bank_labels = run_features(encoder, bank, *setup)
        query_feats, query_labels = run_features(encoder, query, *setup)
        out: dict[str, float | bool] = {}
        for name, feats in query_feats.items():
            out[f"knn_{name}"] = knn_accuracy(
                bank_feats[name],
                bank_labels,
                feats,
                query_labels,
                num_classes,
                k=self.cfg.eval.knn_k,
                temperature=self.cfg.eval.knn_temperature,
            )
            if name in self.linear:
                out[f"linear_{name}"] = self._linear(
                    bank_feats[name], bank_labels, feats, query_labels
                )
            if name != "concat":
                report = collapse_report(feats)
                out[f"std_{name}"] = report["normalized_embedding_std"]
                out[f"rank_{name}"] = report["effective_rank"]
                out[f"collapsed_{name}"] = report["collapsed"]
                # What SIGReg would say of these features: about 1 for N(0, I), large when
                # collapsed (it grows with the number of images).
                out[f"sigreg_{name}"] = float(self.sigreg(feats.float(), step=0))
        return out

    def _linear(self, bank: Tensor, bank_labels: Tensor, query: Tensor, labels: Tensor) -> float:
        num_classes = self.datasets()[2]
        # The evaluation's probe, fit to convergence (5 weight decays + refit on a 5 000-image
        # bank: 10-20 s per feature set on the shared 2-core CPU, so fit only what a curve shows).
        fit = linear_probe(bank, bank_labels, query, labels, num_classes)
        return fit["accuracy"]

    @torch.no_grad()
    def pixels(self) -> dict[str, float]:
        """kNN (and, when ``linear`` names any feature, the linear probe) of raw normalised
        pixels on the same bank and queries: the baseline every curve of this probe is drawn
        against."""
        bank, query, num_classes = self.datasets()
        kw = dict(mean=self.mean, std=self.std, image_size=self.cfg.data.image_size)
        bank_feats, bank_labels = pixel_features(bank, **kw)
        query_feats, query_labels = pixel_features(query, **kw)
        e = self.cfg.eval
        out = {
            "knn": knn_accuracy(
                bank_feats,
                bank_labels,
                query_feats,
                query_labels,
                num_classes,
                k=e.knn_k,
                temperature=e.knn_temperature,
            )
        }
        if self.linear:
            out["linear"] = self._linear(bank_feats, bank_labels, query_feats, query_labels)
        return out
