"""Online health checks during training: a short kNN probe and collapse diagnostics.

A falling JEPA loss proves nothing (a collapsed encoder drives it to zero), so every
``train.knn_every`` steps the target encoder's features of a fixed train subset (memory bank)
and a fixed held-out test subset are compared with a kNN, and per level the embedding std,
effective rank, collapse verdict and SIGReg statistic of the test features are logged (the
statistic whether or not SIGReg is in the loss). :func:`collapse_warning` turns a collapsed
verdict into the warning line the trainer prints. The probe takes values and datasets, not
the config: :meth:`OnlineProbe.from_config` reads what it needs (:class:`ProbeSettings`).

With ``linear`` naming features (``("concat",)``; the time-to-accuracy benchmark, not the
trainer) a linear probe is also fit on those bank features and scored on the same queries, and
:meth:`OnlineProbe.pixels` gives both probes on raw pixels, so curves and their baselines share
one protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hjepa.config import Config
from hjepa.data.datasets import dataset_from_config
from hjepa.data.subsets import fixed_subset
from hjepa.eval.collapse import collapse_report
from hjepa.eval.features import encoder_features, pixel_features
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


@dataclass(frozen=True)
class ProbeSettings:
    """What the online probe reads of a run's config (:meth:`OnlineProbe.from_config`)."""

    levels: int  # model.levels: the feature sets probed, level0.. and concat
    image_size: int  # data.image_size
    batch_size: int  # eval.batch_size: images per forward pass
    knn_k: int  # eval.knn_k
    knn_temperature: float  # eval.knn_temperature
    bank_size: int  # train.knn_bank_size: training images in the memory bank
    query_size: int  # train.knn_query_size: held-out images scored against it


class OnlineProbe:
    """The kNN probe (and collapse diagnostics) of an encoder on a fixed ``settings.bank_size``
    subset of ``train_split`` (the memory bank) and a fixed ``settings.query_size`` subset of
    ``test_split`` (the queries): the same images at every call. ``bank`` and ``query`` are
    those subsets."""

    def __init__(
        self,
        settings: ProbeSettings,
        train_split: Dataset,
        test_split: Dataset,
        mean: Tensor,
        std: Tensor,
        device,
        linear: Sequence[str] = (),
    ):
        self.settings, self.mean, self.std, self.device = settings, mean, std, device
        self.linear = tuple(linear)  # features that also get a linear probe ("pixels" too)
        self.bank = fixed_subset(train_split, settings.bank_size, seed=1)
        self.query = fixed_subset(test_split, settings.query_size, seed=2)
        self.num_classes = int(getattr(train_split, "num_classes", 0))
        # Rank 0 alone probes: a statistic of its features, no collective with other ranks.
        self.sigreg = SIGReg(PROBE_SIGREG_SLICES, distributed=False)

    @classmethod
    def from_config(
        cls, cfg: Config, mean: Tensor, std: Tensor, device, linear: Sequence[str] = ()
    ) -> OnlineProbe:
        """The probe of the run ``cfg`` describes, its two splits loaded now (so a missing or
        damaged test split fails before training, not after it)."""
        settings = ProbeSettings(
            levels=cfg.model.levels,
            image_size=cfg.data.image_size,
            batch_size=cfg.eval.batch_size,
            knn_k=cfg.eval.knn_k,
            knn_temperature=cfg.eval.knn_temperature,
            bank_size=cfg.train.knn_bank_size,
            query_size=cfg.train.knn_query_size,
        )
        splits = (dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test"))
        return cls(settings, *splits, mean, std, device, linear)

    def _features(self, encoder: VisionTransformer, dataset: Dataset):
        s = self.settings
        return encoder_features(
            encoder,
            dataset,
            levels=s.levels,
            mean=self.mean,
            std=self.std,
            image_size=s.image_size,
            batch_size=s.batch_size,
            device=self.device,
        )

    def _knn(self, bank: Tensor, bank_labels: Tensor, query: Tensor, labels: Tensor) -> float:
        s = self.settings
        return knn_accuracy(
            bank,
            bank_labels,
            query,
            labels,
            self.num_classes,
            k=s.knn_k,
            temperature=s.knn_temperature,
        )

    @torch.no_grad()
    def __call__(self, encoder: VisionTransformer) -> dict[str, float | bool]:
        # Decoded in this process (small sets): an unreadable image's warning reaches the user.
        bank_feats, bank_labels = self._features(encoder, self.bank)
        query_feats, query_labels = self._features(encoder, self.query)
        out: dict[str, float | bool] = {}
        for name, feats in query_feats.items():
            out[f"knn_{name}"] = self._knn(bank_feats[name], bank_labels, feats, query_labels)
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
        # The evaluation's probe, fit to convergence (5 weight decays + refit on a 5 000-image
        # bank: 10-20 s per feature set on the shared 2-core CPU, so fit only what a curve shows).
        fit = linear_probe(bank, bank_labels, query, labels, self.num_classes)
        return fit["accuracy"]

    @torch.no_grad()
    def pixels(self) -> dict[str, float]:
        """kNN (and, when ``linear`` names any feature, the linear probe) of raw normalised
        pixels on the same bank and queries: the baseline every curve of this probe is drawn
        against."""
        kw = dict(mean=self.mean, std=self.std, image_size=self.settings.image_size)
        bank_feats, bank_labels = pixel_features(self.bank, **kw)
        query_feats, query_labels = pixel_features(self.query, **kw)
        out = {"knn": self._knn(bank_feats, bank_labels, query_feats, query_labels)}
        if self.linear:
            out["linear"] = self._linear(bank_feats, bank_labels, query_feats, query_labels)
        return out
