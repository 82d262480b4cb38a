"""Attentive probe: learned queries cross-attend to frozen tokens, then a linear classifier.

The probe of V-JEPA (its pooler of depth 1; V-JEPA 2 puts three self-attention blocks in
front, which the CPU budget does not allow). One pooler per token set ``s`` (a hierarchy
level's cells; several sets for the levels together): tokens :math:`x_1..x_N \\in
\\mathbb{R}^{D}`, standardised per channel with the statistics of the training tokens,
:math:`\\tilde x = (x - \\mu) / \\sigma`, and learned queries :math:`q_r \\in \\mathbb{R}^W`.
Head :math:`h` of :math:`H` (width :math:`d = W / H`):

.. math::
    a_{rhj} = \\operatorname{softmax}_j \\frac{(W^Q_h q_r + b^Q_h)^\\top W^K_h \\tilde x_j}
    {\\sqrt d}, \\qquad o_{rh} = \\sum_j a_{rhj} (W^V_h \\tilde x_j + b^V_h),

    z_r = q_r + W^O [o_{r1}; \\dots; o_{rH}] + b^O, \\qquad
    z'_r = z_r + \\operatorname{MLP}(\\operatorname{LN}(z_r)),

and the logits are :math:`W^C [z'_{s,r}]_{s,r} + b^C`, over every set's and query's output.

Computed in the token space: :math:`(W^Q_h q + b^Q_h)^\\top W^K_h \\tilde x_j = u_h^\\top
\\tilde x_j` with :math:`u_h = W^{K\\top}_h (W^Q_h q + b^Q_h)`, and :math:`\\sum_j a_{hj} W^V_h
\\tilde x_j = W^V_h \\sum_j a_{hj} \\tilde x_j`: per image :math:`O(H N D)` instead of
projecting every token, :math:`O(N D W)` -- the same function (a test compares it with the
textbook form), about 20x cheaper at the quickstart's sizes. A key bias would add the same
logit to every token of a head, which the softmax ignores, so there is none.

Why standardisation instead of V-JEPA's LayerNorm on the tokens: a LayerNorm over a 16-value
pixel patch would erase the patch's brightness (its mean), the pixel baseline's main signal;
the encoder's tokens are already layer-normalised (:func:`hjepa.models.hjepa.level_features`),
and a LayerNorm's learnable scale and shift on them are absorbed by :math:`W^K, W^V, b^V`.

Training: AdamW (weight decay on matrices and queries only), linear warm-up over the first
10 % of the steps then cosine to zero, cross-entropy, fixed batch size. A grid of (learning
rate, weight decay) is trained in lockstep (same initialisation, same batches) on a seeded
90 % of the training set; the best accuracy on the held-out 10 % picks the probe whose test
accuracy is reported (no refit). Everything is seeded; :func:`fit_attentive_probe` runs on
one intra-op thread, so its numbers do not depend on the machine's core count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.eval.linear import single_threaded

#: Probe training defaults (``eval.attentive_*`` in the config).
DEFAULT_EPOCHS = 4
DEFAULT_LRS: tuple[float, ...] = (0.01, 0.03)
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.05,)
BATCH_SIZE = 256
WARMUP_FRACTION = 0.1

TokenSets = Sequence[Tensor]


class AttentivePooler(nn.Module):
    """``[B, N, in_dim]`` standardised tokens -> ``[B, num_queries, width]`` (module doc)."""

    def __init__(
        self, in_dim: int, width: int, num_heads: int, num_queries: int = 1, mlp_ratio: int = 4
    ):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"attentive probe: width {width} not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.queries = nn.Parameter(torch.zeros(num_queries, width))
        self.query_proj = nn.Linear(width, width)
        self.key_proj = nn.Linear(in_dim, width, bias=False)
        self.value_proj = nn.Linear(in_dim, width)
        self.out_proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        h, d = self.num_heads, self.head_dim
        q = self.query_proj(self.queries).view(-1, h, d)  # [R, H, d]
        # u_h = W^K_h^T q_h: the query in token space, so no token is ever projected.
        u = torch.einsum("rhd,hdi->rhi", q, self.key_proj.weight.view(h, d, -1))
        logits = torch.einsum("bni,rhi->brhn", tokens, u) / math.sqrt(d)
        pooled = torch.einsum("brhn,bni->brhi", logits.softmax(dim=-1), tokens)
        values = torch.einsum("brhi,hdi->brhd", pooled, self.value_proj.weight.view(h, d, -1))
        values = values + self.value_proj.bias.view(h, d)
        z = self.queries + self.out_proj(values.flatten(2))
        return z + self.mlp(z)


class AttentiveClassifier(nn.Module):
    """One :class:`AttentivePooler` per token set, a linear classifier on all their outputs."""

    def __init__(
        self,
        in_dims: Sequence[int],
        num_classes: int,
        width: int,
        num_heads: int,
        num_queries: int = 1,
    ):
        super().__init__()
        self.poolers = nn.ModuleList(
            AttentivePooler(d, width, num_heads, num_queries) for d in in_dims
        )
        self.head = nn.Linear(len(in_dims) * num_queries * width, num_classes)

    def forward(self, token_sets: TokenSets) -> Tensor:
        pooled = [pooler(t).flatten(1) for pooler, t in zip(self.poolers, token_sets, strict=True)]
        return self.head(torch.cat(pooled, dim=1))


def init_probe(module: nn.Module, generator: torch.Generator) -> None:
    """V-JEPA's initialisation: truncated normal (std 0.02) matrices and queries, zero biases,
    unit LayerNorms; drawn from ``generator``, so a seed fixes the probe."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=generator)
        elif name.endswith("weight"):  # LayerNorm scale
            nn.init.ones_(p)
        else:
            nn.init.zeros_(p)


@dataclass
class TokenScaler:
    """Per-channel standardisation of one token set (statistics over images and tokens)."""

    mean: Tensor  # [D]
    std: Tensor  # [D]

    @classmethod
    def fit(cls, tokens: Tensor, chunk: int = 1 << 16) -> TokenScaler:
        flat = tokens.flatten(0, 1)
        mean = flat.mean(dim=0)
        # Two passes, the squares summed chunk by chunk: no copy of the whole set (and
        # several times faster than torch.var_mean, which walks the strided dimension).
        squares = sum((c - mean).square_().sum(dim=0).double() for c in flat.split(chunk))
        std = (squares / flat.shape[0]).sqrt().float()
        # Constant channels carry no signal; any positive scale keeps them finite.
        return cls(mean, std.clamp_min(1e-6))

    def __call__(self, tokens: Tensor) -> Tensor:
        return (tokens - self.mean) / self.std


def lr_factor(step: int, total: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of the steps, then cosine to 0."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def level_token_sets(level_tokens: dict[str, Tensor]) -> dict[str, list[Tensor]]:
    """The probe's inputs from an encoder's ``{"level0": [N, N_0, D], ...}``: each level alone
    and, with several levels, ``concat``: every level's cells, one pooler per level, one
    classifier on all of them (the attentive counterpart of concatenated pooled features)."""
    sets = {name: [tokens] for name, tokens in level_tokens.items()}
    if len(level_tokens) > 1:
        sets["concat"] = list(level_tokens.values())
    return sets


@dataclass
class AttentiveResult:
    """The selected probe's test accuracy, its hyperparameters, its validation accuracy and
    mean cross-entropy (a finer record of the fit than the accuracies)."""

    accuracy: float
    lr: float
    weight_decay: float
    val_accuracy: float
    val_loss: float

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def attentive_probe(
    train_tokens: Tensor | TokenSets,
    train_labels: Tensor,
    test_tokens: Tensor | TokenSets,
    test_labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    **options,
) -> float:
    """Test accuracy of the attentive probe on frozen tokens ``[N, T, D]`` (or a list of such
    token sets, one pooler each); ``options`` as :func:`fit_attentive_probe`."""
    result = fit_attentive_probe(
        train_tokens, train_labels, test_tokens, test_labels, num_classes, seed=seed, **options
    )
    return result.accuracy


def fit_attentive_probe(
    train_tokens: Tensor | TokenSets,
    train_labels: Tensor,
    test_tokens: Tensor | TokenSets,
    test_labels: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    width: int | None = None,
    num_heads: int = 4,
    num_queries: int = 1,
    batch_size: int = BATCH_SIZE,
    val_fraction: float = 0.1,
) -> AttentiveResult:
    """Train the (lr, weight decay) grid of probes on ``1 - val_fraction`` of the training
    images (split seeded by ``seed``, like the initialisation and the batch order), pick the
    best on the rest (ties: the first in ``lrs`` x ``weight_decays`` order), score it on the
    test set. ``width`` defaults to the first token set's channels."""
    train_sets, test_sets = _as_sets(train_tokens), _as_sets(test_tokens)
    _check_sets(train_sets, train_labels, test_sets, test_labels, num_classes)
    if epochs < 1 or not lrs or not weight_decays:
        raise ValueError("attentive probe: needs epochs >= 1 and non-empty lrs, weight_decays")
    n = train_labels.shape[0]
    n_val = max(1, round(val_fraction * n))
    if not 0.0 < val_fraction < 1.0 or n - n_val < 1:
        raise ValueError(f"attentive probe: {n} images cannot hold out {val_fraction:g}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(train_labels.device)
    val_idx, fit_idx = order[:n_val], order[n_val:]
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    with single_threaded():  # reductions too: their rounding follows the thread count
        scalers = [TokenScaler.fit(t) for t in train_sets]
        probes = _new_probes(train_sets, num_classes, width, num_heads, num_queries, grid, seed)
        _train_in_lockstep(
            probes, grid, train_sets, scalers, train_labels, fit_idx, epochs, batch_size, generator
        )
        val = [_evaluate(p, train_sets, scalers, train_labels, val_idx) for p in probes]
        best = max(range(len(grid)), key=lambda i: (val[i][0], -i))
        test, _ = _evaluate(probes[best], test_sets, scalers, test_labels, None)
    return AttentiveResult(test, *grid[best], *val[best])


def _as_sets(tokens: Tensor | TokenSets) -> list[Tensor]:
    return [tokens] if isinstance(tokens, Tensor) else list(tokens)


def _check_sets(
    train: list[Tensor], train_labels: Tensor, test: list[Tensor], test_labels: Tensor, classes: int
) -> None:
    if not train or len(train) != len(test):
        raise ValueError("attentive probe: give the same (non-empty) token sets for train, test")
    for a, b in zip(train, test, strict=True):
        if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"attentive probe: token sets must be [N, T, D] alike for train and test; got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != train_labels.shape[0] or b.shape[0] != test_labels.shape[0]:
            raise ValueError("attentive probe: one label per image of every token set")
    for labels in (train_labels, test_labels):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"attentive probe: labels must lie in [0, {classes - 1}]")


def _new_probes(
    sets: list[Tensor],
    num_classes: int,
    width: int | None,
    num_heads: int,
    num_queries: int,
    grid: list[tuple[float, float]],
    seed: int,
) -> list[AttentiveClassifier]:
    """One probe per grid point, all with the same initial weights (drawn on the CPU)."""
    dims = [t.shape[-1] for t in sets]
    probes = []
    for _ in grid:
        probe = AttentiveClassifier(dims, num_classes, width or dims[0], num_heads, num_queries)
        init_probe(probe, torch.Generator().manual_seed(seed))
        probes.append(probe.to(sets[0].device))
    return probes


def _train_in_lockstep(
    probes: list[AttentiveClassifier],
    grid: list[tuple[float, float]],
    sets: list[Tensor],
    scalers: list[TokenScaler],
    labels: Tensor,
    fit_idx: Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """AdamW on cross-entropy, every probe on the same batches (one gather serves them all)."""
    optimizers = [_adamw(p, lr, wd) for p, (lr, wd) in zip(probes, grid, strict=True)]
    steps_per_epoch = math.ceil(fit_idx.numel() / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for probe in probes:
        probe.train()
    for _ in range(epochs):
        order = fit_idx[torch.randperm(fit_idx.numel(), generator=generator).to(fit_idx.device)]
        for idx in order.split(batch_size):
            batch = [scale(t[idx]) for t, scale in zip(sets, scalers, strict=True)]
            y = labels[idx]
            factor = lr_factor(step, total)
            for probe, optimizer, (lr, _) in zip(probes, optimizers, grid, strict=True):
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor
                loss = F.cross_entropy(probe(batch), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            step += 1


def _adamw(probe: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Weight decay on matrices and queries; none on biases and LayerNorms (V-JEPA)."""
    decay = [p for p in probe.parameters() if p.dim() >= 2]
    rest = [p for p in probe.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    fused = next(probe.parameters()).device.type in ("cpu", "cuda")  # one kernel per step
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


@torch.no_grad()
def _evaluate(
    probe: AttentiveClassifier,
    sets: list[Tensor],
    scalers: list[TokenScaler],
    labels: Tensor,
    index: Tensor | None,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on the images ``index`` of ``sets`` (all when None)."""
    probe.eval()
    index = torch.arange(labels.shape[0], device=labels.device) if index is None else index
    correct, loss = 0, 0.0
    for idx in index.split(batch_size):
        logits = probe([scale(t[idx]) for t, scale in zip(sets, scalers, strict=True)])
        correct += int((logits.argmax(dim=1) == labels[idx]).sum())
        loss += float(F.cross_entropy(logits, labels[idx], reduction="sum"))
    count = max(1, index.numel())
    return correct / count, loss / count
