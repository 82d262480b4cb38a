r"""SIGReg (LeJEPA): push embeddings towards an isotropic standard Gaussian.

Embeddings :math:`z \in \mathbb{R}^{N \times D}` are projected on :math:`K` random unit
directions, :math:`x = z\,d \in \mathbb{R}^{N \times K}`. For each direction the Epps–Pulley
statistic compares the empirical characteristic function of :math:`x` with that of
:math:`\mathcal{N}(0, 1)`, :math:`\varphi(t) = e^{-t^2/2}`:

.. math::
    \mathrm{EP}(x) = N \sum_{j=0}^{P-1} w_j \Big[\big(\tfrac1N \textstyle\sum_n \cos(t_j x_n)
        - e^{-t_j^2/2}\big)^2 + \big(\tfrac1N \textstyle\sum_n \sin(t_j x_n)\big)^2\Big],

with :math:`t_j = j\,\Delta t`, :math:`\Delta t = t_{max}/(P-1)`, :math:`P = 17`,
:math:`t_{max} = 3`, and :math:`w_j = 2\Delta t\,e^{-t_j^2/2}` except
:math:`\Delta t\,e^{-t_j^2/2}` at both ends: the trapezoid rule for
:math:`\int_{-3}^{3} |\hat\varphi_N(t) - \varphi(t)|^2 e^{-t^2/2}\,dt`, folded by symmetry.
Standard Gaussian data gives :math:`\mathbb{E}\,\mathrm{EP} \approx 1.05`; collapsed data gives
a value that grows with :math:`N`. SIGReg is the mean of EP over the directions. There is no
per-direction standardisation: it would hide exactly the collapse SIGReg must penalise.

Fast evaluation. The :math:`j = 0` term is exactly zero. For :math:`j \ge 1` write
:math:`j = aB + b` with :math:`1 \le b \le B`, :math:`0 \le a < A` (:math:`A = B = 4` for
:math:`P = 17`) and :math:`\theta = \Delta t\,x`. The angle-addition formulas

.. math::
    \cos j\theta = \cos aB\theta \cos b\theta - \sin aB\theta \sin b\theta, \qquad
    \sin j\theta = \sin aB\theta \cos b\theta + \cos aB\theta \sin b\theta

turn the :math:`2(P-1)` sums over samples into one small matrix product per direction,
:math:`[\cos aB\theta; \sin aB\theta]\,[\cos b\theta; \sin b\theta]^\top` (a :math:`2A \times
2B` result), so only :math:`2(A + B)` cosines/sines per element are evaluated instead of
:math:`2P`, no recurrence accumulates rounding error, and the reduction over samples runs as a
batched GEMM. The backward pass uses the same factorisation through a custom autograd function
and never stores an :math:`N \times K \times P` tensor.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hjepa.losses.distributed import all_reduce_sum, is_distributed

# Largest temporary per chunk of directions, in elements. On CPU a small working set stays in
# cache (and avoids page faults on large fresh allocations); on accelerators one chunk is best,
# since every chunk costs about a dozen kernel launches.
_CPU_CHUNK_ELEMENTS = 1 << 18
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _check_statistic_args(num_points: int, t_max: float) -> None:
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2 (got {num_points!r}); 17 is standard")
    if not (isinstance(t_max, (int, float)) and math.isfinite(t_max) and t_max > 0):
        raise ValueError(f"t_max must be a positive finite number (got {t_max!r}); 3.0 is standard")


def _check_projections(x: Tensor) -> None:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"expected projections of shape [N, K] with N, K > 0, got {tuple(x.shape)}; "
            "project embeddings z [N, D] on unit directions [D, K] first (x = z @ directions)"
        )
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}; call .float() first")


def _compute_dtype(x: Tensor) -> Tensor:
    """Half and bfloat16 are too coarse for differences of characteristic functions."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32 matmuls: the sums over samples need full float32 precision."""
    autocast = (
        torch.autocast(device.type, enabled=False)
        if torch.amp.is_autocast_available(device.type)
        else contextlib.nullcontext()
    )
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with autocast:
            yield
    finally:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True


def quadrature(
    num_points: int = 17,
    t_max: float = 3.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Nodes :math:`t_j`, trapezoid weights :math:`w_j` and target :math:`e^{-t_j^2/2}`."""
    _check_statistic_args(num_points, t_max)
    dt = t_max / (num_points - 1)
    t = torch.arange(num_points, dtype=dtype, device=device) * dt
    target = torch.exp(-0.5 * t * t)
    weights = 2.0 * dt * target
    weights[0] = dt * target[0]
    weights[-1] = dt * target[-1]
    return t, weights, target


def _frequency_split(num_freqs: int) -> tuple[int, int]:
    """(A, B) with A * B >= num_freqs and B = ceil(sqrt(num_freqs)): j = a * B + b."""
    inner = math.isqrt(num_freqs)
    inner += inner * inner < num_freqs
    return -(-num_freqs // inner), inner


@functools.lru_cache(maxsize=32)
def _split_angles(
    num_freqs: int, dt: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Multipliers ``a * B * dt`` (a = 1..A-1) and ``b * dt`` (b = 1..B) as [1, M, 1], and
    every ``j * dt`` (j = 1..J)."""
    outer, inner = _frequency_split(num_freqs)
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        outer_freqs = torch.arange(1, outer, dtype=dtype, device=device) * (inner * dt)
        inner_freqs = torch.arange(1, inner + 1, dtype=dtype, device=device) * dt
        all_freqs = torch.arange(1, num_freqs + 1, dtype=dtype, device=device) * dt
    return outer_freqs.view(1, -1, 1), inner_freqs.view(1, -1, 1), all_freqs


@functools.lru_cache(maxsize=32)
def _statistic_constants(
    num_points: int, t_max: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Nodes, weights and Gaussian target for j >= 1 (the j = 0 term is exactly zero)."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        t, weights, target = quadrature(num_points, t_max, dtype=dtype, device=device)
    return t[1:], weights[1:], target[1:]


class _TrigBasis:
    """Trig factors of the split ``j = a * B + b`` for chunks of slice-major projections.

    For a chunk ``x [S, N]`` it fills ``left = [cos(aB dt x); sin(aB dt x)]`` ``[S, 2A, N]``
    (a = 0..A-1) and ``right = [cos(b dt x); sin(b dt x)]`` ``[S, 2B, N]`` (b = 1..B). The
    buffers are allocated once per call and reused by every chunk (fresh large allocations per
    chunk cost more than the arithmetic on CPU); the constant ``a = 0`` rows are filled once.
    """

    def __init__(self, x_cols: Tensor, dt: float, num_freqs: int) -> None:
        self.outer, self.inner = outer, inner = _frequency_split(num_freqs)
        budget = _CPU_CHUNK_ELEMENTS if x_cols.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
        num_samples = x_cols.shape[1]
        self.chunk = chunk = max(1, min(x_cols.shape[0], budget // (2 * inner * num_samples)))
        opts = {"dtype": x_cols.dtype, "device": x_cols.device}
        self._outer_freqs, self._inner_freqs, _ = _split_angles(num_freqs, dt, **opts)
        self._outer_angles = torch.empty(chunk, outer - 1, num_samples, **opts)
        self._inner_angles = torch.empty(chunk, inner, num_samples, **opts)
        self._left = torch.empty(chunk, 2 * outer, num_samples, **opts)
        self._left[:, 0].fill_(1.0)  # cos(0)
        self._left[:, outer].fill_(0.0)  # sin(0)
        self._right = torch.empty(chunk, 2 * inner, num_samples, **opts)

    def __call__(self, block: Tensor) -> tuple[Tensor, Tensor]:
        rows, outer = block.shape[0], self.outer
        left, right = self._left[:rows], self._right[:rows]
        if outer > 1:
            angles = torch.mul(block.unsqueeze(1), self._outer_freqs, out=self._outer_angles[:rows])
            torch.cos(angles, out=left[:, 1:outer])
            torch.sin(angles, out=left[:, outer + 1 :])
        angles = torch.mul(block.unsqueeze(1), self._inner_freqs, out=self._inner_angles[:rows])
        torch.cos(angles, out=right[:, : self.inner])
        torch.sin(angles, out=right[:, self.inner :])
        return left, right

    def scratch(self, rows: int) -> Tensor:
        """A buffer shaped like ``left`` for ``rows`` directions."""
        return torch.empty_like(self._left[:rows])


def _trig_sums(x_cols: Tensor, dt: float, num_freqs: int) -> tuple[Tensor, Tensor]:
    r""":math:`\sum_n \cos(j\,dt\,x_{kn})` and :math:`\sum_n \sin(\cdot)`, j = 1..J: [K, J] each."""
    basis = _TrigBasis(x_cols, dt, num_freqs)
    outer, inner = basis.outer, basis.inner
    prod = torch.empty(
        x_cols.shape[0], 2 * outer, 2 * inner, dtype=x_cols.dtype, device=x_cols.device
    )
    for block, prod_block in zip(x_cols.split(basis.chunk), prod.split(basis.chunk)):
        left, right = basis(block)
        torch.bmm(left, right.transpose(1, 2), out=prod_block)  # sums over samples
    cc, cs = prod[:, :outer, :inner], prod[:, :outer, inner:]
    sc, ss = prod[:, outer:, :inner], prod[:, outer:, inner:]
    cos_sums = (cc - ss).reshape(x_cols.shape[0], -1)[:, :num_freqs]
    sin_sums = (sc + cs).reshape(x_cols.shape[0], -1)[:, :num_freqs]
    return cos_sums, sin_sums


def _trig_sums_grad(
    x_cols: Tensor, dt: float, num_freqs: int, grad_cos: Tensor, grad_sin: Tensor
) -> Tensor:
    r"""Vector-Jacobian product of :func:`_trig_sums`.

    .. math::
        \frac{\partial L}{\partial x_{kn}} = \sum_j \alpha_{kj} \cos j\theta_{kn}
            + \beta_{kj} \sin j\theta_{kn}, \quad
        \alpha = j\,dt\,\frac{\partial L}{\partial S^{\sin}}, \quad
        \beta = -j\,dt\,\frac{\partial L}{\partial S^{\cos}},

    evaluated as :math:`\langle L_k, G_k R_k \rangle` with the factors of :class:`_TrigBasis`
    and the :math:`2A \times 2B` coefficient matrix :math:`G = [[\alpha, \beta], [\beta, -\alpha]]`.
    """
    basis = _TrigBasis(x_cols, dt, num_freqs)
    outer, inner = basis.outer, basis.inner
    _, _, freqs = _split_angles(num_freqs, dt, x_cols.dtype, x_cols.device)
    pad = outer * inner - num_freqs
    alpha = nn.functional.pad(grad_sin * freqs, (0, pad)).view(-1, outer, inner)
    beta = nn.functional.pad(-grad_cos * freqs, (0, pad)).view(-1, outer, inner)
    mix = torch.cat((torch.cat((alpha, beta), 2), torch.cat((beta, -alpha), 2)), 1)
    grad = torch.empty_like(x_cols)
    mixed = basis.scratch(basis.chunk)
    for block, mix_block, grad_block in zip(
        x_cols.split(basis.chunk), mix.split(basis.chunk), grad.split(basis.chunk)
    ):
        left, right = basis(block)
        torch.bmm(mix_block, right, out=mixed[: block.shape[0]])
        torch.linalg.vecdot(left, mixed[: block.shape[0]], dim=1, out=grad_block)
    return grad


class _TrigSums(torch.autograd.Function):
    """Sums over samples of cos/sin(j * dt * x) for slice-major projections ``[K, N]``."""

    @staticmethod
    def forward(ctx, x_cols: Tensor, dt: float, num_freqs: int) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x_cols)
        ctx.dt, ctx.num_freqs = dt, num_freqs
        return _trig_sums(x_cols, dt, num_freqs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cos: Tensor, grad_sin: Tensor) -> tuple[Tensor, None, None]:
        (x_cols,) = ctx.saved_tensors
        return _trig_sums_grad(x_cols, ctx.dt, ctx.num_freqs, grad_cos, grad_sin), None, None


def epps_pulley(
    x: Tensor, num_points: int = 17, t_max: float = 3.0, *, distributed: bool = False
) -> Tensor:
    r"""Epps–Pulley normality statistic of each column of ``x`` (see the module docstring).

    Args:
        x: projections ``[N, K]`` (samples × directions). Half precision is computed in float32.
        num_points: quadrature nodes :math:`P` on :math:`[0, t_{max}]`.
        t_max: last node.
        distributed: when ``torch.distributed`` runs with several processes, sum the empirical
            characteristic functions over ranks (with gradient) so that ``x`` is one shard of
            the global batch and :math:`N` is the global batch size. Every rank must call it.

    Returns:
        ``[K]`` statistics, about 1.05 each for standard Gaussian columns.
    """
    _check_projections(x)
    _check_statistic_args(num_points, t_max)
    with _full_precision(x.device):
        x = _compute_dtype(x)
        num_freqs = num_points - 1
        dt = t_max / num_freqs
        cos_sums, sin_sums = _TrigSums.apply(x.mT.contiguous(), dt, num_freqs)
        count: Tensor | float = float(x.shape[0])
        if distributed and is_distributed():
            # One collective for both sums and the sample count (shards may differ in size).
            local_count = torch.full((1,), count, dtype=x.dtype, device=x.device)
            packed = torch.cat((cos_sums.flatten(), sin_sums.flatten(), local_count))
            packed = all_reduce_sum(packed)
            cos_sums, sin_sums = packed[:-1].view(2, *cos_sums.shape).unbind(0)
            count = packed[-1:].detach()
        _, weights, target = _statistic_constants(num_points, t_max, x.dtype, x.device)
        cos_mean, sin_mean = cos_sums / count, sin_sums / count
        deviation = (cos_mean - target).square() + sin_mean.square()
        return count * (deviation * weights).sum(-1)


def epps_pulley_reference(x: Tensor, num_points: int = 17, t_max: float = 3.0) -> Tensor:
    """Direct evaluation of :func:`epps_pulley` (cos/sin of every ``t_j * x``), for tests.

    Memory and time grow as ``N * K * num_points``; single process only.
    """
    _check_projections(x)
    with _full_precision(x.device):
        x = _compute_dtype(x)
        t, weights, target = quadrature(num_points, t_max, dtype=x.dtype, device=x.device)
        tx = x.unsqueeze(-1) * t  # [N, K, P]
        cos_mean, sin_mean = tx.cos().mean(0), tx.sin().mean(0)
        deviation = (cos_mean - target).square() + sin_mean.square()
        return x.shape[0] * (deviation * weights).sum(-1)


def _mix_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): CPU generators keep only the low 32 bits of a seed."""
    mask = (1 << 64) - 1
    value = ((seed & mask) * 0x9E3779B97F4A7C15 + step) & mask
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
    return value ^ (value >> 31)


def random_directions(
    dim: int,
    num_slices: int,
    step: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Unit-norm Gaussian directions ``[dim, num_slices]``, a pure function of (seed, step).

    The generator lives on the target device for CUDA (no host-side sampling every step) and on
    the CPU otherwise, so every rank of a job (same device type) draws the same directions.
    """
    if dim < 1 or num_slices < 1:
        raise ValueError(f"need dim >= 1 and num_slices >= 1, got {dim} and {num_slices}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int (the global step), got {step!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(device=gen_device)
    generator.manual_seed(_mix_seed(seed, step))
    d = torch.randn(dim, num_slices, generator=generator, dtype=dtype, device=gen_device)
    return (d / d.norm(dim=0, keepdim=True)).to(device)


class SIGReg(nn.Module):
    r"""Sketched isotropic Gaussian regulariser: mean Epps–Pulley statistic over directions.

    Args:
        num_slices: number :math:`K` of random directions per step.
        num_points: quadrature nodes of the Epps–Pulley statistic.
        t_max: last quadrature node.
        seed: mixed with the step into the direction generator (same on every rank).

    Call as ``sigreg(z, step=global_step)`` with ``z`` of shape ``[N, D]``: fresh directions are
    drawn from a generator seeded by ``(seed, step)``, so every rank uses the same ones and a
    resumed run draws the same ones as an uninterrupted run. There is deliberately no internal
    step counter (it would drift under gradient accumulation and be lost on resume): omitting
    both ``step`` and ``directions`` is an error. Explicit unit ``directions [D, K]`` override
    the draw. Under ``torch.distributed`` with several processes, the empirical characteristic
    functions are summed over ranks with gradient and :math:`N` is the global batch size; every
    rank must call the module.
    """

    def __init__(
        self, num_slices: int = 1024, num_points: int = 17, t_max: float = 3.0, seed: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(num_slices, int) or num_slices < 1:
            raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
        _check_statistic_args(num_points, t_max)
        self.num_slices = num_slices
        self.num_points = num_points
        self.t_max = float(t_max)
        self.seed = seed

    def extra_repr(self) -> str:
        return f"num_slices={self.num_slices}, num_points={self.num_points}, t_max={self.t_max}"

    def forward(
        self, z: Tensor, directions: Tensor | None = None, step: int | None = None
    ) -> Tensor:
        if z.ndim != 2:
            raise ValueError(
                f"SIGReg expects embeddings [N, D], got shape {tuple(z.shape)}; "
                "flatten tokens (z.flatten(0, -2)) or pool them first"
            )
        with _full_precision(z.device):
            z = _compute_dtype(z)
            if directions is None:
                if step is None:
                    raise ValueError(
                        "SIGReg needs the global step to draw its random directions: call "
                        "sigreg(z, step=global_step) with the same step on every rank, "
                        "or pass directions=[D, K] unit columns"
                    )
                directions = random_directions(
                    z.shape[1], self.num_slices, step, seed=self.seed, dtype=z.dtype,
                    device=z.device,
                )  # fmt: skip
            elif directions.ndim != 2 or directions.shape[0] != z.shape[1]:
                raise ValueError(
                    f"directions must have shape [D, K] = [{z.shape[1]}, K], "
                    f"got {tuple(directions.shape)}"
                )
            # Slice-major projections ([K, N] contiguous) are what the statistic reads.
            projections = (directions.to(z.dtype).mT @ z.mT).mT
            return epps_pulley(projections, self.num_points, self.t_max, distributed=True).mean()
