"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al., 2018) as used by DINO (Caron et al., 2021):
features are L2-normalised, so the dot product is the cosine similarity
:math:`s_{ij} = \\langle \\hat x_i, \\hat t_j \\rangle`. Each test sample takes its
``k`` most similar training samples :math:`\\mathcal{N}_k(i)` and scores class ``c`` as

.. math::
    \\text{score}_i(c) = \\sum_{j \\in \\mathcal{N}_k(i)} e^{s_{ij} / \\tau} \\, [y_j = c],

predicting :math:`\\arg\\max_c \\text{score}_i(c)` (the lowest class index on an exact
tie). Test rows are processed in chunks so memory stays at ``chunk x N_train`` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_inputs(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int, k: int
) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(
            "knn: features must be 2-D [num_samples, dim]; got train "
            f"{tuple(train_feats.shape)} and test {tuple(test_feats.shape)}. "
            "Flatten or pool token features before calling."
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"knn: train dim {train_feats.shape[1]} != test dim {test_feats.shape[1]}; "
            "extract both with the same encoder and pooling."
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(
            f"knn: train_labels must have shape [{train_feats.shape[0]}] to match "
            f"train_feats; got {tuple(train_labels.shape)}."
        )
    if num_classes < 1:
        raise ValueError(f"knn: num_classes must be >= 1, got {num_classes}.")
    if train_labels.numel() and (
        int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes
    ):
        raise ValueError(
            f"knn: train labels must lie in [0, {num_classes - 1}]; got range "
            f"[{int(train_labels.min())}, {int(train_labels.max())}]. Check num_classes."
        )
    if not 1 <= k <= train_feats.shape[0]:
        raise ValueError(
            f"knn: k must be between 1 and the number of training samples "
            f"({train_feats.shape[0]}); got k={k}. Lower k or use more training data."
        )


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Predict labels of ``test_feats`` [M, D] by weighted kNN over ``train_feats`` [N, D].

    Args:
        train_feats: training features ``[N, D]``.
        train_labels: integer labels ``[N]`` in ``[0, num_classes)``.
        test_feats: query features ``[M, D]``.
        num_classes: number of classes ``C``.
        k: neighbours per query (DINO uses 20).
        temperature: :math:`\\tau` in the vote weight :math:`e^{s/\\tau}`.
        chunk: test rows scored at once; bounds memory to ``chunk * N`` floats.

    Returns:
        Predicted labels ``[M]`` (int64) on ``test_feats``' device.
    """
    _check_inputs(train_feats, train_labels, test_feats, num_classes, k)
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}.")
    if chunk < 1:
        raise ValueError(f"knn: chunk must be >= 1, got {chunk}.")

    device = test_feats.device
    # float32 at least: half-precision similarities tie too often and exp(1/0.07) overflows fp16.
    dtype = torch.promote_types(train_feats.dtype, torch.float32)
    train = F.normalize(train_feats.to(device=device, dtype=dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.long)
    predictions = torch.empty(test_feats.shape[0], dtype=torch.long, device=device)

    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start : start + chunk].to(dtype), dim=1)
        similarity = query @ train.T  # [chunk, N]
        top_sim, top_idx = similarity.topk(k, dim=1)  # sorted, deterministic on CPU
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=dtype, device=device)
        votes.scatter_add_(1, labels[top_idx], weights)
        predictions[start : start + query.shape[0]] = votes.argmax(dim=1)
    return predictions


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` against ``test_labels`` [M]."""
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(
            f"knn: test_labels must have shape [{test_feats.shape[0]}] to match test_feats; "
            f"got {tuple(test_labels.shape)}."
        )
    if test_feats.shape[0] == 0:
        raise ValueError("knn: no test samples; accuracy is undefined.")
    predictions = knn_predict(
        train_feats, train_labels, test_feats, num_classes, k, temperature, chunk
    )
    return (predictions == test_labels.to(predictions.device)).double().mean().item()
