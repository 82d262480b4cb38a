"""Forward + backward cost of the anti-collapse regularisers, measured side by side.

For each embedding width D it times, interleaved (round-robin repeats, median):

* ``sigreg``: ``SIGReg(z, step=...)`` with the fast Epps–Pulley evaluation, fresh directions
  drawn every call (what the trainer pays per set of embeddings);
* its parts: ``draw`` (drawing and normalising the K directions), ``floor`` (the projection
  ``z @ directions`` and its backward, the least any sliced regulariser must pay) and ``stat``
  (``epps_pulley`` on fixed projections, forward + backward);
* ``permuted``: ``SIGReg(draw="permuted")``, the step-0 directions under a fresh signed
  coordinate permutation per step instead of a fresh D x K Gaussian draw;
* ``powers``, ``perm+pow`` and ``stat_pow``: ``sigreg``, ``permuted`` and ``stat`` with
  ``evaluation="powers"`` (4 cosines per projected value and complex products, not 16 cosines);
* ``direct``: SIGReg with the direct formula (``epps_pulley_reference``);
* ``vicreg``: ``VICReg()(z)``, variance + covariance of the same one set ``z``;
* ``vicreg2``: ``VICReg()(z, z2)``, the call the trainer makes (two views: variance and
  covariance of each, plus invariance), about twice ``vicreg``.

Ratios: ``sig/vic`` (the issue's measure, against the one-set VICReg), ``perm/vic``,
``pow/vic``, ``p+p/vic`` (``perm+pow``) and ``dir/vic``; ``sig/vic2`` compares with what a
VICReg run pays per step.

Usage: ``python benchmarks/bench_regularizers.py [--quick] [--device cpu|cuda] [--threads T]``.
Wall times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hjepa.losses.sigreg import SIGReg, epps_pulley, epps_pulley_reference, random_directions
from hjepa.losses.vicreg import VICReg


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def _cases(z: torch.Tensor, z2: torch.Tensor, num_slices: int) -> dict[str, Callable[[], None]]:
    sigreg, vicreg = SIGReg(num_slices=num_slices), VICReg()
    permuted_sigreg = SIGReg(num_slices=num_slices, draw="permuted")
    powers_sigreg = SIGReg(num_slices=num_slices, evaluation="powers")
    permuted_powers_sigreg = SIGReg(num_slices=num_slices, draw="permuted", evaluation="powers")
    dim, step = z.shape[1], iter(range(10**9))
    fixed = random_directions(dim, num_slices, 0, device=z.device)
    projected = (z.detach() @ fixed).requires_grad_()

    def floor() -> None:
        z.grad = None
        projections = z @ fixed
        projections.backward(torch.ones_like(projections))

    def draw() -> None:
        random_directions(dim, num_slices, next(step), device=z.device)

    def stat() -> None:
        projected.grad = None
        epps_pulley(projected).mean().backward()

    def stat_powers() -> None:
        projected.grad = None
        epps_pulley(projected, evaluation="powers").mean().backward()

    def fast() -> None:
        z.grad = None
        sigreg(z, step=next(step)).backward()

    def permuted() -> None:
        z.grad = None
        permuted_sigreg(z, step=next(step)).backward()

    def powers() -> None:
        z.grad = None
        powers_sigreg(z, step=next(step)).backward()

    def permuted_powers() -> None:
        z.grad = None
        permuted_powers_sigreg(z, step=next(step)).backward()

    def direct() -> None:
        z.grad = None
        directions = random_directions(dim, num_slices, next(step), device=z.device)
        epps_pulley_reference(z @ directions).mean().backward()

    def vic() -> None:
        z.grad = None
        vicreg(z)["total"].backward()

    def vic2() -> None:
        z.grad = z2.grad = None
        vicreg(z, z2)["total"].backward()

    return {
        "floor": floor,
        "draw": draw,
        "stat": stat,
        "stat_pow": stat_powers,
        "sigreg": fast,
        "permuted": permuted,
        "powers": powers,
        "perm+pow": permuted_powers,
        "direct": direct,
        "vicreg": vic,
        "vicreg2": vic2,
    }


def measure(
    dim: int, batch: int, num_slices: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per forward + backward for each case at width ``dim``."""
    g = torch.Generator().manual_seed(dim)
    z, z2 = (torch.randn(batch, dim, generator=g).to(device).requires_grad_() for _ in "12")
    cases, timer = _cases(z, z2, num_slices), _timer(device)
    for fn in cases.values():  # warm-up: allocator, kernels, lazy initialisation
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two widths, few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--slices", type=int, default=1024)
    parser.add_argument("--dims", type=int, nargs="+", help="widths D (default: 192 ... 2048)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default: 15, quick 3)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dims = args.dims or ([192, 768] if args.quick else [192, 384, 768, 1024, 2048])
    repeats = args.repeats or (3 if args.quick else 15)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={name} threads={torch.get_num_threads()} N={args.batch} K={args.slices} "
        f"repeats={repeats} (median ms of forward+backward, interleaved)"
    )
    names = ["draw", "floor", "stat", "stat_pow", "sigreg", "permuted", "powers", "perm+pow"]
    names += ["direct", "vicreg", "vicreg2"]
    ratios = {"sig/vic": ("sigreg", "vicreg"), "sig/vic2": ("sigreg", "vicreg2")}
    ratios |= {"perm/vic": ("permuted", "vicreg"), "pow/vic": ("powers", "vicreg")}
    ratios |= {"p+p/vic": ("perm+pow", "vicreg"), "dir/vic": ("direct", "vicreg")}
    print(f"{'D':>5} " + " ".join(f"{k:>8}" for k in [*names, *ratios]))
    for dim in dims:
        t = {k: v * 1e3 for k, v in measure(dim, args.batch, args.slices, repeats, device).items()}
        cells = [f"{t[k]:>8.3f}" for k in names]
        cells += [f"{t[a] / t[b]:>8.2f}" for a, b in ratios.values()]
        print(f"{dim:>5} " + " ".join(cells))


if __name__ == "__main__":
    main()
