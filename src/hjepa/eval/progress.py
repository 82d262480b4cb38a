"""The progress bar of ``hjepa eval``: one bar over the whole evaluation, with an ETA.

The parts of an evaluation differ in cost by orders of magnitude (a feature pass over 60k
images against a kNN vote over a few thousand), so the bar counts estimated floating-point
work (calibrated per kind of work, below), not tasks, so its percentage and ETA follow wall
time. Estimates only steer the bar; no number of the evaluation depends on them.
"""

from __future__ import annotations

import threading

from torch import nn


def encoder_flops(encoder: nn.Module, tokens: int) -> float:
    """Forward FLOPs of one image: 2 per weight and token, plus attention's ``QK^T`` and ``AV``."""
    weights = sum(p.numel() for p in encoder.parameters() if p.dim() > 1)
    depth = len(getattr(encoder, "blocks", [])) or 1
    dim = int(getattr(encoder, "embed_dim", 0) or 0)
    return 2.0 * weights * tokens + 4.0 * depth * tokens * tokens * dim


def knn_flops(n_train: int, n_test: int, dim: int) -> float:
    return 2.0 * n_train * n_test * dim


#: Calibration of the estimates on a profiled quickstart evaluation (2-core CPU): the probe's
#: skinny float64 products run at about an eighth of the encoder's rate per FLOP, and each
#: L-BFGS loss evaluation pays a fixed cost (Python, line search, small tensors) that dominates
#: small fits.
LINEAR_SLOWDOWN = 8.0
LINEAR_EVAL_OVERHEAD = 4e8
#: Iterations of a typical converged fit (the quickstart's: 40-350, about 150 on average).
LINEAR_ITERATIONS = 150


def linear_flops(
    n: int, dim: int, classes: int, fits: int, max_iter: int = LINEAR_ITERATIONS
) -> float:
    """L-BFGS fits of ``max_iter`` iterations, about 1.5 loss evaluations (forward + backward)
    per iteration, in encoder-FLOP equivalents (see ``LINEAR_SLOWDOWN``)."""
    per_eval = LINEAR_SLOWDOWN * 6.0 * n * dim * classes + LINEAR_EVAL_OVERHEAD
    return fits * max_iter * 1.5 * per_eval


#: Calibration of the attentive probe's estimate (small batched products and the optimiser
#: step run slower per FLOP than the encoder's pass).
ATTENTIVE_SLOWDOWN = 4.0


def attentive_flops(
    n: int, tokens: int, dim: int, width: int, heads: int, probes: int, epochs: int
) -> float:
    """Attentive-probe training in encoder-FLOP equivalents: per image, epoch and probe the
    pooler's logits and pooling (``2 * heads * tokens * dim`` each), its value, output and MLP
    products (``dim * width + 9 * width**2``), forward and backward."""
    per_image = 2 * heads * tokens * dim * 2 + dim * width + 9 * width * width
    return ATTENTIVE_SLOWDOWN * 6.0 * per_image * n * probes * epochs


class EvalProgress:
    """A tqdm bar on stderr over ``total`` work units; ``stage`` names what runs now.
    :meth:`advance` may be called from several threads (fits run side by side)."""

    def __init__(self, total: float, enabled: bool) -> None:
        from tqdm import tqdm

        self.total = max(float(total), 1.0)
        self._bar = tqdm(
            total=self.total,
            disable=not enabled,
            desc="eval",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
            dynamic_ncols=True,
        )
        self._done = 0.0
        self._lock = threading.Lock()

    def stage(self, text: str) -> None:
        self._bar.set_description_str(f"eval: {text}", refresh=True)

    def advance(self, work: float) -> None:
        with self._lock:
            work = min(float(work), self.total - self._done)  # estimates may overshoot
            if work > 0:
                self._done += work
                self._bar.update(work)

    def close(self) -> None:
        self.advance(self.total - self._done)
        self._bar.close()
