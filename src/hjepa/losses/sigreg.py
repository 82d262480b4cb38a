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
2B` result): only :math:`2(A + B)` cosines per element are evaluated instead of :math:`2P`
(sines as :math:`\cos(\cdot - \pi/2)`, so one kernel fills the whole basis), no recurrence
accumulates rounding error, and the reduction over samples runs as a batched GEMM. The
gradient has the closed form

.. math::
    \frac{\partial\,\mathrm{EP}}{\partial x_n} = \sum_j 2 w_j t_j \big[\bar s_j \cos(t_j x_n)
        - (\bar c_j - e^{-t_j^2/2}) \sin(t_j x_n)\big]

(:math:`\bar c_j, \bar s_j` the empirical means), evaluated with the same factorisation in a
custom autograd function: no :math:`N \times K \times P` tensor is ever stored. The forward
keeps its :math:`2(A + B)`-row basis for the backward when it is small
(``_SAVED_BASIS_ELEMENTS``); otherwise the backward evaluates it again. The numbers are the same
either way.

Two evaluations of the basis. ``table`` (the default) takes every row from its own cosine.
``powers`` takes the cosines and sines of :math:`\theta` and :math:`B\theta` only (4 per
element instead of 16) and builds :math:`e^{i a B\theta}` and :math:`e^{i b \theta}` as
complex powers of them, with :math:`A = B` so that both ladders advance in the same step: at
most :math:`B - 1` products from a directly evaluated value, so the float32 rounding stays
within 3x that of the direct formula (1.4x on the value, 2.3x on the gradient, measured), but
it is other rounding than ``table``'s.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hjepa.config import CHOICES
from hjepa.losses.collectives import is_distributed

DRAWS = CHOICES["loss.sigreg_draw"]

# Largest temporary per chunk of directions, in elements. On CPU a small working set stays in
# cache (and avoids page faults on large fresh allocations); on accelerators one chunk is best,
# since every chunk costs about a dozen kernel launches.
_CPU_CHUNK_ELEMENTS = 1 << 17
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26
# The power ladder runs about a dozen small ops per chunk: on CPU larger chunks amortise them.
_CPU_POWERS_CHUNK_ELEMENTS = 1 << 21

# Largest basis, in elements, that forward keeps for backward (64 MiB in float32). Below it
# the backward reuses the forward's table (the same values, so the same gradient bit for bit)
# instead of evaluating it again; above it (token sets of large batches) memory wins and the
# backward recomputes the table chunk by chunk.
_SAVED_BASIS_ELEMENTS = 1 << 24

EVALUATIONS = CHOICES["loss.sigreg_eval"]


def _check_statistic_args(num_points: int, t_max: float) -> None:
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2 (got {num_points!r}); 17 is standard")
    if not (isinstance(t_max, (int, float)) and math.isfinite(t_max) and t_max > 0):
        raise ValueError(f"t_max must be a positive finite number (got {t_max!r}); 3.0 is standard")


def _check_evaluation(evaluation: str) -> None:
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")


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


class _Layout(NamedTuple):
    """Constants of the split for given (num_points, t_max, dtype, device)."""

    outer: int  # A
    inner: int  # B
    multiples: Tensor  # [1, 2A + 2B, 1]: a*B*dt (cos), a*B*dt (sin), b*dt (cos), b*dt (sin)
    phases: Tensor  # [1, 2A + 2B, 1]: 0 for cosine rows, -pi/2 for sine rows
    seed_multiples: (
        Tensor  # [1, 2, 2, N=1]: the ladder's seeds B*theta (cos, sin), theta (cos, sin)
    )
    seed_phases: Tensor  # [1, 2, 2, 1]
    pairing: Tensor  # [2J, 4AB]: combines the 2A x 2B products into cos(j theta), sin(j theta)
    target: Tensor  # [2J]: exp(-t_j^2 / 2), then zeros (the sine part of the Gaussian ECF)
    weights: Tensor  # [2J]: trapezoid weights w_j, twice
    gradient: Tensor  # [2J, 4AB]: [c - phi, s] -> G = [[alpha, beta], [beta, -alpha]], flattened


@functools.lru_cache(maxsize=32)
def _layout(
    num_points: int, t_max: float, dtype: torch.dtype, device: torch.device, square: bool = False
) -> _Layout:
    """``square``: A = B (the power ladder fills both halves of the basis in the same steps)."""
    num_freqs = num_points - 1
    dt = t_max / num_freqs
    outer, inner = _frequency_split(num_freqs)
    outer = inner if square else outer
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        t, weights, target = quadrature(num_points, t_max, dtype=dtype, device=device)
        t, weights, target = t[1:], weights[1:], target[1:]
        opts = {"dtype": dtype, "device": device}
        outer_mult = [a * inner * dt for a in range(outer)]
        inner_mult = [b * dt for b in range(1, inner + 1)]
        multiples = torch.tensor(2 * outer_mult + 2 * inner_mult, **opts).view(1, -1, 1)
        sine = -math.pi / 2  # sin(u) = cos(u - pi/2)
        phases = [0.0] * outer + [sine] * outer + [0.0] * inner + [sine] * inner
        phases = torch.tensor(phases, **opts).view(1, -1, 1)
        seed_multiples = torch.tensor([inner * dt] * 2 + [dt] * 2, **opts).view(1, 2, 2, 1)
        seed_phases = torch.tensor([0.0, sine] * 2, **opts).view(1, 2, 2, 1)
        # Rows of the product [cos aB; sin aB] x [cos b; sin b]^T: cos(j) = cc - ss and
        # sin(j) = sc + cs for j = aB + b.
        pairing = torch.zeros(2 * num_freqs, 2 * outer, 2 * inner, **opts)
        for j in range(num_freqs):
            a, b = divmod(j, inner)  # frequency j + 1 = a * B + (b + 1)
            pairing[j, a, b], pairing[j, outer + a, inner + b] = 1.0, -1.0
            pairing[num_freqs + j, outer + a, b] = pairing[num_freqs + j, a, inner + b] = 1.0
        pairing = pairing.view(2 * num_freqs, -1)
        # d EP / d x = sum_j alpha_j cos(t_j x) + beta_j sin(t_j x) with alpha_j = 2 w_j t_j s_j
        # and beta_j = -2 w_j t_j (c_j - phi_j): from [c - phi, s] swap halves, scale, pair.
        scale = (2 * weights * t).unsqueeze(1)
        gradient = torch.cat((-scale * pairing[num_freqs:], scale * pairing[:num_freqs]))
        target = torch.cat((target, torch.zeros_like(target)))
    return _Layout(
        outer,
        inner,
        multiples,
        phases,
        seed_multiples,
        seed_phases,
        pairing,
        target,
        weights.repeat(2),
        gradient,
    )


def _fill_table(block: Tensor, layout: _Layout, out: Tensor, seeds: Tensor | None) -> None:
    """The ``table`` evaluation: every row by its own cosine, one multiply-add and one cosine
    over the whole chunk."""
    # mul + add_ rather than addcmul: the broadcast addcmul is 3x slower on CPU.
    torch.mul(block.unsqueeze(1), layout.multiples, out=out).add_(layout.phases).cos_()


def _fill_powers(block: Tensor, layout: _Layout, out: Tensor, seeds: Tensor | None) -> None:
    r"""The ``powers`` evaluation: cosines and sines of :math:`B\theta` and :math:`\theta` only
    (4 per element), every other row by complex products, for a square layout (A = B).

    Viewed as ``[S, 2 (outer, inner), 2 (cos, sin), B, N]``, index ``i`` of the outer half holds
    :math:`e^{i\,iB\theta}` and of the inner half :math:`e^{i(i+1)\theta}`, so both halves
    advance in one step: entry ``i`` is entry ``i - 1`` times its seed
    (:math:`e^{iB\theta}`, :math:`e^{i\theta}`).
    """
    ladder = out.view(block.shape[0], 2, 2, layout.inner, block.shape[1])
    seeds = seeds[: block.shape[0]]  # [S, 2, 2, N]
    torch.mul(block.view(-1, 1, 1, block.shape[1]), layout.seed_multiples, out=seeds)
    seeds.add_(layout.seed_phases).cos_()
    seed_cos, seed_sin = seeds[:, :, 0], seeds[:, :, 1]
    ladder[:, 0, 0, 0] = 1.0  # e^{0}
    ladder[:, 0, 1, 0] = 0.0
    ladder[:, 1, :, 0] = seeds[:, 1]
    for i in range(1, layout.inner):
        cos, sin = ladder[:, :, 0, i], ladder[:, :, 1, i]
        prev_cos, prev_sin = ladder[:, :, 0, i - 1], ladder[:, :, 1, i - 1]
        torch.mul(prev_cos, seed_cos, out=cos).addcmul_(prev_sin, seed_sin, value=-1.0)
        torch.mul(prev_sin, seed_cos, out=sin).addcmul_(prev_cos, seed_sin)


_FILLS = {"table": _fill_table, "powers": _fill_powers}


class _Basis:
    """``[cos aB theta; sin aB theta]`` (a = 0..A-1) and ``[cos b theta; sin b theta]``
    (b = 1..B) of slice-major projections ``[S, N]``, chunk by chunk.

    Without ``keep`` one chunk buffer is allocated per call and reused by every chunk: fresh
    large allocations per chunk cost more than the arithmetic on CPU. With ``keep`` every chunk
    lands in one ``[K, rows, N]`` tensor, ``table``, that backward reads back chunk by chunk
    (``saved``) instead of evaluating it again.
    """

    def __init__(
        self,
        x_cols: Tensor,
        layout: _Layout,
        evaluation: str,
        *,
        keep: bool = False,
        saved: Tensor | None = None,
    ) -> None:
        self.x_cols, self.layout, self.fill = x_cols, layout, _FILLS[evaluation]
        rows = 2 * (layout.outer + layout.inner)
        cpu = x_cols.device.type == "cpu"
        if not cpu:
            budget = _ACCELERATOR_CHUNK_ELEMENTS
        else:
            budget = _CPU_CHUNK_ELEMENTS if evaluation == "table" else _CPU_POWERS_CHUNK_ELEMENTS
        self.chunk = max(1, min(x_cols.shape[0], budget // (rows * x_cols.shape[1])))
        self.saved = saved
        self._seeds = None
        if evaluation == "powers" and saved is None:
            self._seeds = x_cols.new_empty(self.chunk, 2, 2, x_cols.shape[1])
        if saved is not None:
            self.table = saved
        elif keep:
            self.table = x_cols.new_empty(x_cols.shape[0], rows, x_cols.shape[1])
        else:
            self.table = None
            self._buffer = x_cols.new_empty(self.chunk, rows, x_cols.shape[1])

    def __iter__(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(start, left [S, 2A, N], right [S, 2B, N]) for every chunk of directions."""
        split = 2 * self.layout.outer
        for start in range(0, self.x_cols.shape[0], self.chunk):
            block = self.x_cols[start : start + self.chunk]
            if self.table is None:
                basis = self._buffer[: block.shape[0]]
            else:
                basis = self.table[start : start + block.shape[0]]
            if self.saved is None:
                self.fill(block, self.layout, basis, self._seeds)
            yield start, basis[:, :split], basis[:, split:]


def _trig_sums(
    x_cols: Tensor, layout: _Layout, basis: _Basis, weights: Tensor | None = None
) -> Tensor:
    r"""Products :math:`[\cos aB\theta; \sin aB\theta][\cos b\theta; \sin b\theta]^\top`
    summed over samples (times their ``weights [N]``, when given), flattened: ``[K, 4AB]``
    (map them to frequencies with ``pairing``)."""
    outer, inner = layout.outer, layout.inner
    prod = x_cols.new_empty(x_cols.shape[0], 2 * outer, 2 * inner)
    for start, left, right in basis:
        left = left if weights is None else left * weights
        torch.bmm(left, right.mT, out=prod[start : start + left.shape[0]])
    return prod.flatten(1)


def _trig_combination(x_cols: Tensor, layout: _Layout, mix: Tensor, basis: _Basis) -> Tensor:
    r""":math:`\langle L_k, G_k R_k \rangle = \sum_j \alpha_{kj} \cos(t_j x_{kn}) + \beta_{kj}
    \sin(t_j x_{kn})` for coefficient matrices ``mix`` ``[K, 2A * 2B]`` (see ``_Layout``)."""
    mix = mix.view(-1, 2 * layout.outer, 2 * layout.inner)
    out = torch.empty_like(x_cols)
    mixed = x_cols.new_empty(basis.chunk, 2 * layout.outer, x_cols.shape[1])
    for start, left, right in basis:
        stop = start + left.shape[0]
        mixed_block = torch.bmm(mix[start:stop], right, out=mixed[: left.shape[0]])
        # What linalg.vecdot computes, without its temporary of the chunk's size.
        torch.sum(mixed_block.mul_(left), dim=1, out=out[start:stop])
    return out


class _EppsPulley(torch.autograd.Function):
    """Per-direction Epps–Pulley statistic of slice-major projections ``[K, N]``.

    Under ``distributed`` the sums and counts are all-reduced in forward, and the incoming
    gradients in backward: each rank then gets the sum over ranks of d(loss_r)/d(its shard),
    exactly what autograd through a differentiable all-reduce would give (see
    :mod:`hjepa.losses.collectives`). Plain collectives are right here because this function
    defines the cross-rank backward itself.
    """

    @staticmethod
    def forward(
        ctx,
        x_cols: Tensor,
        num_points: int,
        t_max: float,
        distributed: bool,
        evaluation: str,
        weights: Tensor | None = None,
    ) -> Tensor:
        with _full_precision(x_cols.device):
            square = evaluation == "powers"
            layout = _layout(num_points, t_max, x_cols.dtype, x_cols.device, square)
            rows = 2 * (layout.outer + layout.inner)
            keep = x_cols.requires_grad and x_cols.numel() * rows <= _SAVED_BASIS_ELEMENTS
            basis = _Basis(x_cols, layout, evaluation, keep=keep)
            products = _trig_sums(x_cols, layout, basis, weights)
            if distributed:
                # One collective for the sums and the sample count (shards may differ in size).
                sums = products @ layout.pairing.mT
                n = sums.new_tensor([x_cols.shape[1]]) if weights is None else weights.sum()[None]
                packed = torch.cat((sums.flatten(), n))
                dist.all_reduce(packed)
                count = packed[-1]
                deviations = packed[:-1].view_as(sums) / count - layout.target
            elif weights is not None:  # a weighted count: a tensor, never read back
                count = weights.sum()
                deviations = (products @ layout.pairing.mT) / count - layout.target
            else:
                count = x_cols.shape[1]
                # [c_j - phi_j, s_j]: empirical minus Gaussian characteristic function
                deviations = torch.addmm(
                    layout.target, products, layout.pairing.mT, beta=-1, alpha=1 / count
                )
            statistic = torch.mv(deviations.square(), layout.weights).mul_(count)
        ctx.save_for_backward(x_cols, deviations, basis.table, weights)
        ctx.layout, ctx.distributed, ctx.evaluation = layout, distributed, evaluation
        return statistic

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        x_cols, deviations, table, weights = ctx.saved_tensors
        with _full_precision(x_cols.device):
            if ctx.distributed:
                grad = grad.clone()
                dist.all_reduce(grad)
            # d EP / d x_n = sum_j 2 w_j t_j [s_j cos(t_j x_n) - (c_j - phi_j) sin(t_j x_n)]
            mix = (deviations * grad.unsqueeze(1)) @ ctx.layout.gradient
            basis = _Basis(x_cols, ctx.layout, ctx.evaluation, saved=table)
            grad_x = _trig_combination(x_cols, ctx.layout, mix, basis)
            if weights is not None:
                grad_x = grad_x * weights
            return grad_x, None, None, None, None, None


def epps_pulley(
    x: Tensor,
    num_points: int = 17,
    t_max: float = 3.0,
    *,
    distributed: bool = False,
    evaluation: str = "table",
    weights: Tensor | None = None,
) -> Tensor:
    r"""Epps–Pulley normality statistic of each column of ``x`` (see the module docstring).

    Args:
        x: projections ``[N, K]`` (samples × directions). Half precision is computed in float32.
        num_points: quadrature nodes :math:`P` on :math:`[0, t_{max}]`.
        t_max: last node.
        distributed: when ``torch.distributed`` runs with several processes, sum the empirical
            characteristic functions over ranks (with gradient) so that ``x`` is one shard of
            the global batch and :math:`N` is the global batch size. Every rank must call it.
        evaluation: how the cosines and sines of every frequency are obtained: ``table`` (each
            by its own cosine, 16 per value for P = 17) or ``powers`` (cosine and sine of
            :math:`\Delta t\,x` and :math:`B\Delta t\,x` only, the others by complex products:
            faster, the same value up to float32 rounding; see the module docstring).

        weights: ``[N]`` per sample (0 leaves a padded or empty one out; the count is their
            sum), or None: every sample counts once.

    Returns:
        ``[K]`` statistics, about 1.05 each for standard Gaussian columns.
    """
    _check_projections(x)
    _check_statistic_args(num_points, t_max)
    _check_evaluation(evaluation)
    x = _compute_dtype(x)
    sync = distributed and is_distributed()
    if weights is not None:
        weights = weights.to(x.dtype)
    return _EppsPulley.apply(x.mT.contiguous(), num_points, float(t_max), sync, evaluation, weights)


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


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, step): on the device for CUDA, on the CPU otherwise."""
    try:
        step = operator.index(step)
    except TypeError:
        step = -1
    if step < 0:
        raise ValueError("step must be a non-negative integer (the global optimizer step)")
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    return generator.manual_seed(_mix_seed(seed, step))


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
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = _step_generator(seed, step, device)
    d = torch.randn(dim, num_slices, generator=generator, dtype=dtype, device=generator.device)
    return (d / d.norm(dim=0, keepdim=True)).to(device)


def signed_permutation(
    dim: int,
    step: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``permuted`` draw's coordinate permutation ``[dim]`` and signs ``[dim]`` of a step."""
    if dim < 1:
        raise ValueError(f"need dim >= 1, got {dim}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = _step_generator(seed, step, device)
    perm = torch.randperm(dim, generator=generator, device=generator.device)
    bits = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
    return perm.to(device), (2 * bits - 1).to(dtype=dtype, device=device)


def permuted_directions(
    dim: int,
    num_slices: int,
    step: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``permuted`` draw's directions ``[dim, num_slices]`` of a step, written out.

    The step-0 Gaussian directions with their coordinates permuted and sign-flipped by the
    step's :func:`signed_permutation`: row ``perm[i]`` is ``signs[i]`` times row ``i``. Every
    column keeps its unit norm. SIGReg never builds them: it permutes and signs the columns of
    ``z`` instead, an ``N x D`` pass, since ``z @ directions == (z[:, perm] * signs) @ pool``.
    """
    pool = random_directions(dim, num_slices, 0, seed=seed, dtype=dtype, device=device)
    perm, signs = signed_permutation(dim, step, seed=seed, dtype=dtype, device=device)
    out = torch.empty_like(pool)
    out[perm] = pool * signs.unsqueeze(1)
    return out


class SIGReg(nn.Module):
    r"""Sketched isotropic Gaussian regulariser: mean Epps–Pulley statistic over directions.

    Args:
        num_slices: number :math:`K` of random directions per step.
        num_points: quadrature nodes of the Epps–Pulley statistic.
        t_max: last quadrature node.
        seed: mixed with the step into the direction generator (same on every rank).
        distributed: aggregate over ranks (below); ``False`` for a statistic of this rank's
            data alone (a diagnostic that only rank 0 computes).
        draw: ``gaussian`` (fresh Gaussian directions every step) or ``permuted`` (the step-0
            Gaussian directions under a fresh random signed permutation of the coordinates
            every step, :func:`permuted_directions`: no D x K draw per step; see
            docs/regularizers.md for what changes statistically).
        evaluation: ``table`` or ``powers``, how :func:`epps_pulley` evaluates the statistic.

    Call as ``sigreg(z, step=global_step)`` with ``z`` of shape ``[N, D]``: fresh directions are
    drawn from a generator seeded by ``(seed, step)``, so every rank uses the same ones and a
    resumed run draws the same ones as an uninterrupted run; further calls with the same step
    and width (the other sets of embeddings of that step) reuse the draw. There is deliberately
    no internal step counter (it would drift under gradient accumulation and be lost on
    resume): omitting both ``step`` and ``directions`` is an error. Explicit unit
    ``directions [D, K]`` override the draw. Under ``torch.distributed`` with several processes,
    the empirical characteristic functions are summed over ranks with gradient and :math:`N` is
    the global batch size; every rank must call the module. As with any loss that every rank
    evaluates on the global batch, a rank's gradient for its shard is ``world_size`` times its
    share, which DDP's gradient averaging divides back out.

    Computed in float32 (float64 inputs stay float64) with autocast and TF32 off: the statistic
    is built from differences of characteristic functions that half precision cannot resolve.
    """

    def __init__(
        self,
        num_slices: int = 1024,
        num_points: int = 17,
        t_max: float = 3.0,
        seed: int = 0,
        *,
        distributed: bool = True,
        draw: str = "gaussian",
        evaluation: str = "table",
    ) -> None:
        super().__init__()
        if not isinstance(num_slices, int) or num_slices < 1:
            raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
        _check_statistic_args(num_points, t_max)
        _check_evaluation(evaluation)
        self.num_slices = num_slices
        self.num_points = num_points
        self.t_max = float(t_max)
        self.seed = seed
        self.distributed = distributed
        self.draw = draw
        self.evaluation = evaluation
        self._drawn: dict[str, tuple[tuple, object]] = {}  # the last draw of each kind

    def _cached(self, kind: str, key: tuple, make) -> object:
        key = (*key, torch.is_inference_mode_enabled())
        if kind not in self._drawn or self._drawn[kind][0] != key:
            self._drawn[kind] = (key, make())
        return self._drawn[kind][1]

    def draw_at(
        self, step: int, dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, ...]:
        """The random projection of ``step`` for ``dim``-wide embeddings: ``(directions,)``
        (``gaussian``) or ``(pool, perm, signs)`` (``permuted``). Drawn once for all the sets
        of embeddings of a step (and, for ``permuted``, the pool once per run); pass it as
        ``forward(..., drawn=...)`` where the step must not be read (a compiled loss)."""
        opts = {"seed": self.seed, "dtype": dtype, "device": device}
        if self.draw == "gaussian":
            directions = self._cached(
                "directions",
                (dim, step, dtype, device),
                lambda: random_directions(dim, self.num_slices, step, **opts),
            )
            return (directions,)
        pool = self._cached(
            "pool", (dim, dtype, device), lambda: random_directions(dim, self.num_slices, 0, **opts)
        )
        perm, signs = self._cached(
            "permutation", (dim, step, dtype, device), lambda: signed_permutation(dim, step, **opts)
        )
        return pool, perm, signs

    def _project(self, z: Tensor, drawn: tuple[Tensor, ...]) -> Tensor:
        """Projections ``[N, K]`` of ``z`` on a step's draw (:meth:`draw_at`)."""
        if len(drawn) != (1 if self.draw == "gaussian" else 3) or drawn[0].shape[0] != z.shape[1]:
            raise ValueError(
                f"drawn must be SIGReg.draw_at(step, {z.shape[1]}, ...) of this {self.draw} "
                f"SIGReg, got {len(drawn)} tensor(s) of shapes {[tuple(t.shape) for t in drawn]}"
            )
        if self.draw == "gaussian":
            return (drawn[0].to(z.dtype).mT @ z.mT).mT
        pool, perm, signs = drawn
        return (pool.to(z.dtype).mT @ (z.index_select(1, perm) * signs.to(z.dtype)).mT).mT

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, num_points={self.num_points}, t_max={self.t_max}, "
            f"draw={self.draw}, evaluation={self.evaluation}"
        )

    def forward(
        self,
        z: Tensor,
        directions: Tensor | None = None,
        step: int | None = None,
        weights: Tensor | None = None,
        drawn: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """SIGReg of the embeddings ``z [N, D]``; ``weights [N]``: 0 leaves a point out. The
        directions: explicit ``directions``, a step's ``drawn`` projection (:meth:`draw_at`),
        or the one of ``step``."""
        if z.ndim != 2:
            raise ValueError(
                f"SIGReg expects embeddings [N, D], got shape {tuple(z.shape)}; "
                "flatten tokens (z.flatten(0, -2)) or pool them first"
            )
        with _full_precision(z.device):
            z = _compute_dtype(z)
            if directions is None:
                if drawn is None and step is None:
                    raise ValueError(
                        "SIGReg needs the global step to draw its random directions: call "
                        "sigreg(z, step=global_step) with the same step on every rank, "
                        "or pass directions=[D, K] unit columns"
                    )
                if drawn is None:
                    drawn = self.draw_at(step, z.shape[1], z.dtype, z.device)
                # Slice-major projections ([K, N] contiguous) are what the statistic reads.
                projections = self._project(z, drawn)
            elif directions.ndim != 2 or directions.shape[0] != z.shape[1]:
                raise ValueError(
                    f"directions must have shape [D, K] = [{z.shape[1]}, K], "
                    f"got {tuple(directions.shape)}"
                )
            else:
                projections = (directions.to(z.dtype).mT @ z.mT).mT
            return epps_pulley(
                projections,
                self.num_points,
                self.t_max,
                distributed=self.distributed,
                evaluation=self.evaluation,
                weights=weights,
            ).mean()
